//! A vCPU ([`Vcpu`]) and its architectural state ([`VcpuState`]): saving it
//! on the source and restoring it on the destination, in the orders KVM
//! requires.

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::error::{kvm_err, Error, Result};
use crate::memory::GuestRam;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: restored after IA32_TSC and after the LAPIC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Entries per KVM_GET/SET_MSRS call.
const MSR_CHUNK: usize = 128;
/// CPUID entries asked of KVM.
pub(crate) const CPUID_ENTRIES: usize = 256;

/// x87/SSE state (`kvm_fpu` has no serde support of its own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// ST0-ST7 (80 bits each, padded to 16 bytes).
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One model-specific register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// Everything KVM holds about one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU id (APIC id).
    pub id: u64,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87/SSE state (used when XSAVE is not available).
    pub fpu: FpuState,
    /// XSAVE area (x87, SSE, AVX, AVX-512...): the 1024 words of
    /// `kvm_xsave.region`.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers (in-kernel irqchip only).
    pub lapic: Option<kvm_lapic_state>,
    /// The MSRs of KVM's list that this vCPU can read.
    pub msrs: Vec<MsrValue>,
    /// Pending exceptions, interrupts, NMIs, SMIs, interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
}

/// What KVM offers for vCPU state on this host, probed once per VM.
#[derive(Debug, Clone)]
pub(crate) struct VcpuCaps {
    pub(crate) xsave: bool,
    /// Bytes KVM reads and writes for KVM_GET/SET_XSAVE (KVM_CAP_XSAVE2).
    pub(crate) xsave_size: usize,
    pub(crate) xcrs: bool,
    pub(crate) irqchip: bool,
    /// MSRs to save: KVM's list, less those that cannot be read.
    pub(crate) msrs: Vec<u32>,
}

/// A vCPU of a [`crate::vm::Vm`].
///
/// Holds the guest RAM alive: KVM keeps the memory slots (raw host
/// addresses) as long as any fd of the VM is open, vCPU fds included.
#[derive(Debug)]
pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    index: usize,
    caps: Arc<VcpuCaps>,
    _ram: Arc<GuestRam>,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, index: usize, caps: Arc<VcpuCaps>, ram: Arc<GuestRam>) -> Self {
        Self { fd, index, caps, _ram: ram }
    }

    /// Index (also the vCPU id and APIC id).
    pub fn index(&self) -> usize {
        self.index
    }

    /// General-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))
    }

    /// Sets the general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Special registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))
    }

    /// Sets the special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(kvm_err("KVM_SET_SREGS"))
    }

    /// Makes the vCPU runnable (application processors of an in-kernel
    /// irqchip otherwise wait for INIT/SIPI).
    pub fn set_runnable(&self) -> Result<()> {
        self.fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm_err("KVM_SET_MP_STATE"))
    }

    /// Sets x87 and SSE control words to their reset values (FCW 0x37f,
    /// MXCSR 0x1f80), as firmware would.
    pub fn init_fpu(&self) -> Result<()> {
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))
    }

    /// Saves the whole vCPU state. The vCPU must not be running (the VMM
    /// pauses it first, completing any pending I/O with `immediate_exit`).
    pub fn save_state(&self) -> Result<VcpuState> {
        // Order:
        // - KVM_GET_MP_STATE first: it runs kvm_apic_accept_events(), which
        //   may change vCPU and LAPIC state (a latched INIT/SIPI); whatever
        //   is read after it is then consistent with it.
        // - KVM_GET_LAPIC may update the LAPIC before returning it, so it
        //   comes before the state that depends on it (TSC deadline MSR).
        // - KVM_GET_VCPU_EVENTS last: it reports pending exceptions and
        //   interrupts, which the other GET ioctls may still have changed.
        let mp_state = self.fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let fpu = FpuState::from(&self.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?);
        let xsave = if self.caps.xsave {
            Some(self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?.region.to_vec())
        } else {
            None
        };
        let xcrs = if self.caps.xcrs { Some(self.fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?) } else { None };
        let debug_regs = self.fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = if self.caps.irqchip { Some(self.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?) } else { None };
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self.cpuid()?;
        let msrs = self.read_msrs(&self.caps.msrs)?;
        let vcpu_events = self.fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.index as u64,
            cpuid,
            tsc_khz,
            mp_state,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            vcpu_events,
        })
    }

    /// Restores a state saved by [`Vcpu::save_state`] into this (new,
    /// never run) vCPU.
    pub fn restore_state(&self, state: &VcpuState) -> Result<()> {
        if state.id != self.index as u64 {
            return Err(Error::State(format!("state of vCPU {} given to vCPU {}", state.id, self.index)));
        }
        if state.lapic.is_some() != self.caps.irqchip {
            return Err(Error::State("LAPIC state and in-kernel irqchip do not match".into()));
        }
        // Order:
        // 1. CPUID first: it decides which MSRs, XCR0 bits and EFER bits are
        //    valid (KVM rejects EFER.LME without CPUID.LM, for instance), and
        //    KVM refuses a CPUID change after the vCPU has run.
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| Error::State(format!("CPUID: {e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        // 2. TSC frequency before the TSC MSR, so that the TSC offset is
        //    computed at the guest's frequency.
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = self.fd.set_tsc_khz(khz) {
                    tracing::warn!(vcpu = self.index, khz, %e, "cannot scale the TSC");
                }
            }
        }
        // 3. MP state: KVM only records it here and acts on a pending
        //    INIT/SIPI at the next KVM_RUN, so the registers restored next
        //    are what the vCPU resumes with (Firecracker's order).
        self.fd.set_mp_state(state.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        // 4. Registers before vCPU events: KVM_SET_REGS clears pending
        //    exceptions, which KVM_SET_VCPU_EVENTS restores.
        self.set_regs(&state.regs)?;
        // 5. Special registers before the LAPIC (they carry the APIC base
        //    MSR, which decides the LAPIC's mode) and before the MSRs (EFER).
        self.set_sregs(&state.sregs)?;
        // 6. FPU or XSAVE, then XCRs (QEMU's order; both are checked against
        //    CPUID, set in step 1, not against each other).
        match &state.xsave {
            Some(words) if self.caps.xsave => {
                let mut xsave = kvm_xsave::default();
                if words.len() != xsave.region.len() {
                    return Err(Error::State(format!("XSAVE area of {} words", words.len())));
                }
                xsave.region.copy_from_slice(words);
                crate::sys::set_xsave(&self.fd, &xsave, self.caps.xsave_size).map_err(kvm_err("KVM_SET_XSAVE"))?
            }
            Some(_) => return Err(Error::State("XSAVE state but no KVM_CAP_XSAVE".into())),
            None => self.fd.set_fpu(&kvm_fpu::from(&state.fpu)).map_err(kvm_err("KVM_SET_FPU"))?,
        }
        if let Some(xcrs) = &state.xcrs {
            self.fd.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        self.fd.set_debug_regs(&state.debug_regs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        // 7. LAPIC after SREGS (APIC base) and before the MSRs: the TSC
        //    deadline MSR is only accepted once the LAPIC is in TSC-deadline
        //    mode.
        if let Some(lapic) = &state.lapic {
            self.fd.set_lapic(lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        }
        // 8. MSRs, IA32_TSC before IA32_TSC_DEADLINE (the deadline is
        //    compared with the TSC when written).
        let (deferred, first): (Vec<MsrValue>, Vec<MsrValue>) =
            state.msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        self.write_msrs(&first)?;
        self.write_msrs(&deferred)?;
        // 9. vCPU events last: pending exceptions/interrupts/NMIs on top of
        //    everything else (SET_REGS and SET_SREGS would clear them).
        self.fd.set_vcpu_events(&state.vcpu_events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    fn cpuid(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        let cpuid = self.fd.get_cpuid2(CPUID_ENTRIES).map_err(kvm_err("KVM_GET_CPUID2"))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .filter(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0))
            .copied()
            .collect())
    }

    /// Reads `indices`; fails if KVM refuses one of them.
    pub(crate) fn read_msrs(&self, indices: &[u32]) -> Result<Vec<MsrValue>> {
        let mut out = Vec::with_capacity(indices.len());
        for chunk in indices.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
            if n != chunk.len() {
                return Err(Error::State(format!("MSR {:#x} cannot be read", chunk[n.min(chunk.len() - 1)])));
            }
            out.extend(msrs.as_slice().iter().map(|e| MsrValue { index: e.index, data: e.data }));
        }
        Ok(out)
    }

    fn write_msrs(&self, values: &[MsrValue]) -> Result<()> {
        for chunk in values.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> =
                chunk.iter().map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() }).collect();
            let msrs = Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
            let n = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if n != chunk.len() {
                return Err(Error::State(format!("MSR {:#x} cannot be written", chunk[n.min(chunk.len() - 1)].index)));
            }
        }
        Ok(())
    }

    /// Of `candidates`, the MSRs that can be saved and restored: readable,
    /// and writable back with the value read (some are readable only, e.g.
    /// MSR_KVM_ASYNC_PF_INT without an in-kernel LAPIC). Probed on a fresh
    /// vCPU, where writing back the reset values changes nothing.
    pub(crate) fn saveable_msrs(&self, candidates: &[u32]) -> Result<Vec<u32>> {
        let readable = self.readable_msrs(candidates)?;
        let values = self.read_msrs(&readable)?;
        let mut keep = Vec::with_capacity(values.len());
        for chunk in values.chunks(MSR_CHUNK) {
            let mut rest: Vec<MsrValue> = chunk.to_vec();
            while !rest.is_empty() {
                let entries: Vec<kvm_msr_entry> =
                    rest.iter().map(|m| kvm_msr_entry { index: m.index, data: m.data, ..Default::default() }).collect();
                let msrs = Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
                let n = self.fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
                keep.extend(rest[..n.min(rest.len())].iter().map(|m| m.index));
                if n >= rest.len() {
                    break;
                }
                tracing::debug!(msr = format_args!("{:#x}", rest[n].index), "MSR not writable, not saved");
                rest.drain(..=n);
            }
        }
        Ok(keep)
    }

    /// Of `candidates`, the MSRs this vCPU can read (KVM_GET_MSRS stops at
    /// the first one it refuses; drop it and go on).
    fn readable_msrs(&self, candidates: &[u32]) -> Result<Vec<u32>> {
        let mut keep = Vec::with_capacity(candidates.len());
        for chunk in candidates.chunks(MSR_CHUNK) {
            let mut rest: Vec<u32> = chunk.to_vec();
            while !rest.is_empty() {
                let entries: Vec<kvm_msr_entry> =
                    rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
                let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
                let n = self.fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
                keep.extend_from_slice(&rest[..n.min(rest.len())]);
                if n >= rest.len() {
                    break;
                }
                tracing::debug!(msr = format_args!("{:#x}", rest[n]), "MSR not readable, not saved");
                rest.drain(..=n);
            }
        }
        Ok(keep)
    }
}
