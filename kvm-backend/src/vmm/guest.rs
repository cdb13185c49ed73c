//! The guest a VMM process runs: booted here (the pattern guest or a boot
//! sector) or arrived by migration.

use std::path::PathBuf;
use std::sync::Arc;

use crate::devices::SerialOutput;
use crate::driver::digest::MemoryDigest;
use crate::driver::machine::{GuestKind, MachineDescription, MACHINE_FORMAT};
use crate::driver::{ArrivedGuest, Tuning};
use crate::guest::bootsector::BootSector;
use crate::guest::TestGuest;
use crate::layout::MemoryMap;
use crate::memory::GuestRam;
use crate::runner::VcpuSet;
use crate::vm::{Vm, VmConfig};

/// What guest to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// A 512-byte PC boot sector instead of the built-in pattern guest.
    pub image: Option<PathBuf>,
}

/// Why a guest could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The guest image could not be read.
    #[error("cannot read the guest image {}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A step of the VMM failed.
    #[error("cannot {step}")]
    Vmm {
        /// What was being done.
        step: &'static str,
        /// Why.
        #[source]
        source: crate::error::Error,
    },
}

/// A guest running in this process.
pub struct LiveGuest {
    /// The VM.
    pub vm: Vm,
    /// Its running vCPUs.
    pub vcpus: VcpuSet,
    /// What it is (what a destination builds from).
    pub machine: MachineDescription,
    /// For a guest that arrived by migration: the digest of its pages as
    /// installed.
    pub arrived_digest: Option<MemoryDigest>,
}

impl LiveGuest {
    /// Boots a guest and starts its vCPUs.
    pub fn boot(spec: &GuestSpec, serial: SerialOutput, tuning: &Tuning) -> Result<LiveGuest, BootError> {
        fn step<E: Into<crate::error::Error>>(step: &'static str) -> impl FnOnce(E) -> BootError {
            move |source| BootError::Vmm { step, source: source.into() }
        }
        let layout = MemoryMap::pc(spec.mem_bytes).map_err(step("lay out the guest's RAM"))?;
        let ram = match tuning.hugepages {
            // Huge pages: a hugetlbfs memfd, every page allocated now.
            Some(huge) => GuestRam::new_preallocated_with(layout.clone(), Some(huge)),
            None => GuestRam::new(layout.clone()),
        };
        let ram = Arc::new(ram.map_err(step("allocate the guest's RAM"))?);
        let kind = match &spec.image {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| BootError::Image { path: path.clone(), source })?;
                let sector = BootSector::from_bytes(&bytes).map_err(step("use the guest image"))?;
                sector.load(&ram).map_err(step("load the guest image"))?;
                GuestKind::BootSector
            }
            None => {
                let guest = TestGuest::new(&layout, spec.vcpus).map_err(step("build the pattern guest"))?;
                guest.load(&ram).map_err(step("load the pattern guest"))?;
                GuestKind::Pattern
            }
        };
        let vcpus = spec.vcpus;
        let vm = Vm::new(ram, VmConfig { vcpus, irqchip: true, serial }).map_err(step("create the VM"))?;
        let v = vm.create_vcpus().map_err(step("create the vCPUs"))?;
        match kind {
            GuestKind::Pattern => {
                TestGuest::new(&layout, vcpus).and_then(|t| t.configure_vcpus(&v)).map_err(step("set up the vCPUs"))?
            }
            GuestKind::BootSector => BootSector::configure_vcpus(&v, true).map_err(step("set up the vCPUs"))?,
        }
        let set = VcpuSet::start(v, vm.devices().clone()).map_err(step("start the vCPUs"))?;
        if let Some(cpu) = tuning.vcpu_cpu {
            for tid in set.thread_ids() {
                let _ = crate::sys::pin_thread(tid, cpu);
            }
        }
        let machine = MachineDescription { format: MACHINE_FORMAT, vcpus, irqchip: true, ram: layout, guest: kind };
        Ok(LiveGuest { vm, vcpus: set, machine, arrived_digest: None })
    }

    /// Whether every vCPU of the pattern guest has written its whole share
    /// once (memory holds the pattern, not zeros); true for other guests.
    pub fn first_pass_done(&self) -> bool {
        self.machine.guest != GuestKind::Pattern || self.vm.devices().stats().snapshot().reports.iter().all(|&r| r >= 1)
    }
}

impl From<ArrivedGuest> for LiveGuest {
    fn from(g: ArrivedGuest) -> LiveGuest {
        LiveGuest { vm: g.vm, vcpus: g.vcpus, machine: g.machine, arrived_digest: Some(g.digest) }
    }
}
