//! A KVM virtual machine: guest RAM registered as memory slots (one per
//! block), optional dirty logging, the optional in-kernel irqchip (PIC,
//! IOAPIC, LAPICs, PIT), the port devices, vCPU creation with CPUID, and the
//! VM-wide state (irqchip, PIT, clock).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, CpuId, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::{Devices, SerialIrq, SerialOutput};
use crate::error::{kvm_err, Error, Result};
use crate::memory::{DirtyBitmap, GuestRam};
use crate::vcpu::{Vcpu, VcpuCaps, CPUID_ENTRIES};

/// Whether `/dev/kvm` can be opened here.
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

/// Most vCPUs a VM may have here.
pub const MAX_VCPUS: usize = 64;
/// GSI of the serial port's interrupt (COM1 = IRQ 4).
pub const SERIAL_GSI: u32 = 4;
/// Address of the 3-page TSS area KVM needs for real mode on VMX (in the
/// MMIO hole, never RAM).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Address of the identity-map page KVM needs for real mode on VMX.
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// How to build a [`Vm`].
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Create the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT. Needed
    /// for LAPIC state and for any guest that uses interrupts (a Linux
    /// guest); without it HLT exits to the VMM.
    pub irqchip: bool,
    /// Where the serial port writes.
    pub serial: SerialOutput,
}

impl VmConfig {
    /// `vcpus` vCPUs, in-kernel irqchip, serial output dropped.
    pub fn new(vcpus: usize) -> Self {
        Self { vcpus, irqchip: true, serial: SerialOutput::Sink }
    }
}

/// VM-wide state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// In-kernel PIC, IOAPIC and PIT, when the VM has them.
    pub irqchip: Option<IrqchipState>,
}

/// State of the in-kernel interrupt controllers and timer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
}

/// A KVM VM with its RAM and devices.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    ram: Arc<GuestRam>,
    vcpus: usize,
    irqchip: bool,
    xsave_size: Option<usize>,
    xcrs: bool,
    cpuid: CpuId,
    msr_candidates: Vec<u32>,
    caps: OnceLock<Arc<VcpuCaps>>,
    vcpus_created: AtomicBool,
    dirty_logging: AtomicBool,
    devices: Arc<Devices>,
}

impl Vm {
    /// Creates the VM and registers `ram` (one slot per block).
    pub fn new(ram: Arc<GuestRam>, config: VmConfig) -> Result<Self> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("{} vCPUs (1..={MAX_VCPUS})", config.vcpus)));
        }
        let kvm = Kvm::new().map_err(Error::KvmUnavailable)?;
        for (cap, name) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::MpState, "KVM_CAP_MP_STATE"),
            (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
            (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        if config.irqchip {
            for (cap, name) in
                [(Cap::Irqchip, "KVM_CAP_IRQCHIP"), (Cap::Pit2, "KVM_CAP_PIT2"), (Cap::Irqfd, "KVM_CAP_IRQFD")]
            {
                if !kvm.check_extension(cap) {
                    return Err(Error::MissingCapability(name));
                }
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if fd.check_extension(Cap::SetIdentityMapAddr) {
            fd.set_identity_map_address(IDENTITY_MAP_ADDRESS).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        let serial_irq = if config.irqchip {
            fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Os { op: "eventfd", source: e })?;
            fd.register_irqfd(&evt, SERIAL_GSI).map_err(kvm_err("KVM_IRQFD"))?;
            SerialIrq(Some(evt))
        } else {
            SerialIrq(None)
        };
        let xsave_size = if kvm.check_extension(Cap::Xsave) {
            let size = match fd.check_extension_int(Cap::Xsave2) {
                n if n > 0 => n as usize,
                _ => std::mem::size_of::<kvm_bindings::kvm_xsave>(),
            };
            if size > std::mem::size_of::<kvm_bindings::kvm_xsave>() {
                // AMX-sized areas need KVM_GET_XSAVE2; not supported here.
                return Err(Error::MissingCapability("XSAVE area of at most 4 KiB"));
            }
            Some(size)
        } else {
            None
        };
        let xcrs = kvm.check_extension(Cap::Xcrs);
        let cpuid = kvm.get_supported_cpuid(CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_candidates = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec();
        let devices = Arc::new(Devices::new(config.vcpus, config.serial, serial_irq));
        let vm = Self {
            kvm,
            fd,
            ram,
            vcpus: config.vcpus,
            irqchip: config.irqchip,
            xsave_size,
            xcrs,
            cpuid,
            msr_candidates,
            caps: OnceLock::new(),
            vcpus_created: AtomicBool::new(false),
            dirty_logging: AtomicBool::new(false),
            devices,
        };
        vm.set_slots(false)?;
        Ok(vm)
    }

    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The port devices.
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    /// Whether the VM has the in-kernel irqchip.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// The KVM API version (for logs).
    pub fn kvm_api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }

    fn set_slots(&self, log_dirty: bool) -> Result<()> {
        let flags = if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        for (slot, block) in self.ram.layout().blocks().iter().enumerate() {
            let (host, size) = self.ram.block_host_range(slot).ok_or_else(|| {
                Error::Layout(crate::layout::MemoryMapError::Invalid(format!("no mapping for block {slot}")))
            })?;
            // SAFETY: `host..host + size` is the block's anonymous mapping
            // owned by `self.ram`; every fd of this VM (the VmFd here, the
            // VcpuFds in `Vcpu`, which hold an `Arc<GuestRam>`) keeps that
            // `GuestRam` alive, so the mapping outlives the VM's use of it.
            unsafe { crate::sys::set_memory_slot(&self.fd, slot as u32, block.gpa, size, host, flags) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// Turns KVM's dirty logging on or off for all RAM. Turning it on starts
    /// with an empty log (and clears the VMM's own record, so both start at
    /// the same moment).
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        self.set_slots(on)?;
        if on {
            let _ = self.ram.take_vmm_dirty();
        }
        self.dirty_logging.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Ordering::SeqCst)
    }

    /// Pages written since the previous call (or since logging was turned
    /// on): KVM's dirty log of the guest's writes, united with the writes the
    /// VMM made through [`GuestRam`]. Both records are cleared.
    pub fn take_dirty_log(&self) -> Result<DirtyBitmap> {
        if !self.dirty_logging() {
            return Err(Error::Config("dirty logging is off".into()));
        }
        let layout = self.ram.layout();
        let words = layout
            .blocks()
            .iter()
            .enumerate()
            .map(|(slot, b)| self.fd.get_dirty_log(slot as u32, b.size as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG")))
            .collect::<Result<Vec<_>>>()?;
        let mut dirty = DirtyBitmap::from_words(layout, words);
        dirty.union_with(&self.ram.take_vmm_dirty());
        Ok(dirty)
    }

    /// Creates all vCPUs (once), with the host's supported CPUID patched with
    /// each vCPU's APIC id.
    pub fn create_vcpus(&self) -> Result<Vec<Vcpu>> {
        if self.vcpus_created.swap(true, Ordering::SeqCst) {
            return Err(Error::Config("vCPUs already created".into()));
        }
        let mut out = Vec::with_capacity(self.vcpus);
        for index in 0..self.vcpus {
            let fd = self.fd.create_vcpu(index as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = self.cpuid.clone();
            patch_cpuid(&mut cpuid, index as u32);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            let caps = match self.caps.get() {
                Some(c) => c.clone(),
                None => {
                    // Probe the MSR list on the first vCPU (after CPUID,
                    // which decides which MSRs exist).
                    let probe = Vcpu::new(
                        fd,
                        index,
                        Arc::new(VcpuCaps {
                            xsave: false,
                            xsave_size: 0,
                            xcrs: false,
                            irqchip: false,
                            msrs: Vec::new(),
                        }),
                        self.ram.clone(),
                    );
                    let msrs = probe.saveable_msrs(&self.msr_candidates)?;
                    let caps = Arc::new(VcpuCaps {
                        xsave: self.xsave_size.is_some(),
                        xsave_size: self.xsave_size.unwrap_or(0),
                        xcrs: self.xcrs,
                        irqchip: self.irqchip,
                        msrs,
                    });
                    let caps = self.caps.get_or_init(|| caps).clone();
                    out.push(Vcpu::new(probe.fd, index, caps, self.ram.clone()));
                    continue;
                }
            };
            out.push(Vcpu::new(fd, index, caps, self.ram.clone()));
        }
        Ok(out)
    }

    /// Saves the VM-wide state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState> {
        let clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        let irqchip = if self.irqchip {
            let chip = |chip_id| -> Result<kvm_irqchip> {
                let mut c = kvm_irqchip { chip_id, ..Default::default() };
                self.fd.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
                Ok(c)
            };
            Some(IrqchipState {
                pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
                pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
                ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
                pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            })
        } else {
            None
        };
        Ok(VmState { clock, irqchip })
    }

    /// Restores VM-wide state, before any vCPU state and before any vCPU
    /// runs.
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        match (&state.irqchip, self.irqchip) {
            (Some(chip), true) => {
                // PIT first, then the clock, then the interrupt controllers
                // (Firecracker's order; none of these reads the others).
                self.fd.set_pit2(&chip.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
                self.set_clock(&state.clock)?;
                for (c, id) in [
                    (&chip.pic_master, KVM_IRQCHIP_PIC_MASTER),
                    (&chip.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
                    (&chip.ioapic, KVM_IRQCHIP_IOAPIC),
                ] {
                    if c.chip_id != id {
                        return Err(Error::State(format!("irqchip {} where {id} was expected", c.chip_id)));
                    }
                    self.fd.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
                }
                Ok(())
            }
            (None, false) => self.set_clock(&state.clock),
            _ => Err(Error::State("irqchip state does not match the VM's irqchip".into())),
        }
    }

    fn set_clock(&self, clock: &kvm_clock_data) -> Result<()> {
        let mut c = *clock;
        // TSC_STABLE is a property of the source host, not settable.
        c.flags &= !KVM_CLOCK_TSC_STABLE;
        self.fd.set_clock(&c).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}

/// Sets the APIC id of vCPU `id` in CPUID leaves 1, 0xB and 0x1F.
fn patch_cpuid(cpuid: &mut CpuId, id: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
}
