//! The device state of a stopped guest as one versioned, bounded blob: what
//! the migration carries (as opaque bytes) at the switchover.
//!
//! Layout: magic `PCKVMSTA` (8 bytes), format version (u32 LE), payload
//! length (u32 LE), payload (postcard encoding of [`DeviceState`]), FNV-1a
//! 64 of the payload (u64 LE). Decoding checks all of them and never panics
//! on bad input.

use serde::{Deserialize, Serialize};

use crate::devices::DevicesState;
use crate::error::{Error, Result};
use crate::layout::MemoryMap;
use crate::runner::VcpuSet;
use crate::vcpu::{Vcpu, VcpuState};
use crate::vm::{Vm, VmState};

/// Magic at the start of a state blob.
pub const STATE_MAGIC: [u8; 8] = *b"PCKVMSTA";
/// Version of the blob format; bump on any change of [`DeviceState`].
pub const STATE_VERSION: u32 = 1;
/// Largest blob accepted or produced.
pub const MAX_STATE_BYTES: usize = 1 << 20;
const HEADER_BYTES: usize = 16;
const TRAILER_BYTES: usize = 8;

/// Everything but RAM that a guest needs to resume elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// RAM layout the state belongs to (checked at restore).
    pub ram: MemoryMap,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Per-vCPU KVM state, by index.
    pub vcpus: Vec<VcpuState>,
    /// Port devices.
    pub devices: DevicesState,
}

impl DeviceState {
    /// Captures the state of `vm` whose vCPUs run in `set`; the vCPUs must
    /// be paused.
    pub fn capture(vm: &Vm, set: &VcpuSet) -> Result<Self> {
        let vcpus = set.save_states()?;
        Ok(Self { ram: vm.ram().layout().clone(), vm: vm.save_state()?, vcpus, devices: vm.devices().save_state() })
    }

    /// Restores into `vm` and its new vCPUs (none may have run).
    pub fn restore(&self, vm: &Vm, vcpus: &[Vcpu]) -> Result<()> {
        if &self.ram != vm.ram().layout() {
            return Err(Error::State("RAM layout differs from the saved one".into()));
        }
        if self.vcpus.len() != vcpus.len() {
            return Err(Error::State(format!("{} saved vCPUs for {} vCPUs", self.vcpus.len(), vcpus.len())));
        }
        // VM-wide state first (PIT, clock, PIC/IOAPIC), then each vCPU (its
        // LAPIC refers to nothing of the VM-wide state, but the vCPUs must
        // not run before the interrupt controllers hold their saved state).
        vm.restore_state(&self.vm)?;
        for (vcpu, state) in vcpus.iter().zip(&self.vcpus) {
            vcpu.restore_state(state)?;
        }
        vm.devices().restore_state(&self.devices)
    }

    /// Restores into `vm` whose vCPU threads in `set` are parked (they ran
    /// before: a fallback's takeover restarts the guest from a checkpoint);
    /// they stay parked until resumed.
    pub fn restore_parked(&self, vm: &Vm, set: &VcpuSet) -> Result<()> {
        if &self.ram != vm.ram().layout() {
            return Err(Error::State("RAM layout differs from the saved one".into()));
        }
        // The same order as `restore`.
        vm.restore_state(&self.vm)?;
        set.restore_states(&self.vcpus)?;
        vm.devices().restore_state(&self.devices)
    }

    /// Encodes the blob.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let payload = postcard::to_stdvec(self).map_err(|e| Error::State(format!("encode: {e}")))?;
        let total = HEADER_BYTES + payload.len() + TRAILER_BYTES;
        if total > MAX_STATE_BYTES {
            return Err(Error::State(format!("{total} bytes of state, at most {MAX_STATE_BYTES}")));
        }
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
        Ok(out)
    }

    /// Decodes and checks a blob.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_STATE_BYTES {
            return Err(Error::State(format!("{} bytes, too large", bytes.len())));
        }
        if bytes.len() < HEADER_BYTES + TRAILER_BYTES {
            return Err(Error::State("truncated header".into()));
        }
        let (header, rest) = bytes.split_at(HEADER_BYTES);
        if header[..8] != STATE_MAGIC {
            return Err(Error::State("bad magic".into()));
        }
        let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let version = word(8);
        if version != STATE_VERSION {
            return Err(Error::State(format!("format version {version}, this build reads {STATE_VERSION}")));
        }
        let len = word(12) as usize;
        if rest.len() != len + TRAILER_BYTES {
            return Err(Error::State(format!(
                "payload of {len} bytes announced, {} present",
                rest.len().saturating_sub(TRAILER_BYTES)
            )));
        }
        let (payload, trailer) = rest.split_at(len);
        let mut sum = [0u8; 8];
        sum.copy_from_slice(trailer);
        if u64::from_le_bytes(sum) != fnv1a64(payload) {
            return Err(Error::State("checksum mismatch".into()));
        }
        let (state, left): (Self, &[u8]) =
            postcard::take_from_bytes(payload).map_err(|e| Error::State(format!("decode: {e}")))?;
        if !left.is_empty() {
            return Err(Error::State("trailing bytes in payload".into()));
        }
        Ok(state)
    }
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}
