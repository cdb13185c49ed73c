//! The guest's machine on this side: built from the source's description
//! when the hello arrives (RAM registered with userfaultfd, VM, vCPUs),
//! the device state loaded into it, the vCPUs started.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::Scope;

use bytes::Bytes;
use postcopy_core::PageNumber;

use super::error::{BuildError, DestinationError};
use super::state::{DestinationDriver, Machine, Timeline};
use crate::devices::lock;
use crate::driver::digest::PageDigests;
use crate::driver::machine::{core_layout, MachineDescription, PageMap};
use crate::driver::placement::set_policy;
use crate::driver::shell::{spawn, SideDriver};
use crate::driver::sync::{FaultClock, PageBits};
use crate::error::error_chain;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestRam;
use crate::runner::VcpuSet;
use crate::state::DeviceState;
use crate::uffd::UffdRam;
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmConfig};

/// Why the device state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The machine was never built.
    #[error("no machine to load the device state into")]
    NoMachine,
    /// The vCPUs are not there (already started, or never created).
    #[error("no vCPUs to load the device state into")]
    NoVcpus,
    /// Decoding or restoring the state failed.
    #[error("cannot restore the device state")]
    Restore(#[source] crate::error::Error),
}

impl DestinationDriver<'_> {
    /// Builds the VM and its userfaultfd-registered RAM before any vCPU
    /// runs, and starts serving faults.
    pub(super) fn prepare<'s>(&'s self, s: &'s Scope<'s, '_>, machine: &[u8]) {
        let built = self.build_machine(machine);
        {
            // Cleared under the core lock, as it is read.
            let _l = lock(&self.shell.locked);
            self.preparing.store(false, Ordering::Relaxed);
        }
        match built {
            Ok((machine, vcpus)) => {
                tracing::info!(
                    vcpus = machine.desc.vcpus,
                    mib = machine.desc.ram.total_bytes() >> 20,
                    preallocated = self.opts.preallocated.is_some(),
                    "machine built"
                );
                if self.machine.set(machine).is_err() {
                    tracing::error!("the machine was prepared twice");
                    return;
                }
                // Only the vCPUs of the machine in place: a second prepare
                // must not swap in vCPUs of a VM that was dropped.
                *lock(&self.vcpus) = Some(vcpus);
                self.arm_install_fault();
                spawn(s, "dst-fault", move || self.fault_loop(s));
            }
            Err(e) => {
                let e = DestinationError::Build(e);
                tracing::error!(e = error_chain(&e));
                *lock(&self.fatal) = Some(e);
                self.event(s, |l, now| {
                    let _ = l.core.handle_cancel(now);
                });
            }
        }
    }

    /// The machine and its vCPUs (stored by the caller once the machine is).
    fn build_machine(&self, machine: &[u8]) -> Result<(Machine, Vec<Vcpu>), BuildError> {
        fn step<E: Into<crate::error::Error>>(step: &'static str) -> impl FnOnce(E) -> BuildError {
            move |source| BuildError::Step { step, source: source.into() }
        }
        let desc = MachineDescription::from_bytes(machine).map_err(BuildError::Description)?;
        // Called from an op, after the lock was released.
        let layout = lock(&self.shell.locked).core.layout().cloned().ok_or(BuildError::NoLayout)?;
        let huge = self.opts.tuning.hugepages;
        let unit_pages = huge.map_or(1, |h| h.small_pages());
        if core_layout(&desc.ram, unit_pages).map_err(BuildError::CoreLayout)? != layout {
            return Err(BuildError::LayoutMismatch);
        }
        let ram = match &self.opts.preallocated {
            Some(ram) if ram.layout() == &desc.ram && ram.huge_pages() == huge => ram.clone(),
            Some(ram) => {
                return Err(BuildError::PreallocatedMismatch {
                    source_mib: desc.ram.total_bytes() >> 20,
                    preallocated_mib: ram.layout().total_bytes() >> 20,
                })
            }
            // Huge pages are allocated whole, now, from the reserved pool.
            None if huge.is_some() => Arc::new(
                GuestRam::new_preallocated_with(desc.ram.clone(), huge)
                    .map_err(step("allocate guest RAM on huge pages"))?,
            ),
            None => Arc::new(GuestRam::new(desc.ram.clone()).map_err(step("allocate guest RAM"))?),
        };
        // Fallback copies checkpoints on write where the kernel can
        // write-protect this memory; else during the stop.
        let wants_wp = self.opts.config.fallback.is_some()
            && self.opts.tuning.checkpoint_copy == crate::driver::placement::CheckpointCopy::WriteProtect;
        let (uffd, write_protect) = match UffdRam::register_with_write_protect(ram.clone(), wants_wp) {
            Ok(uffd) => (uffd, wants_wp),
            Err(e) if wants_wp => {
                tracing::warn!(e = error_chain(&e), "no userfaultfd write-protect: checkpoints copy during the stop");
                (UffdRam::register(ram.clone()).map_err(step("register guest RAM with userfaultfd"))?, false)
            }
            Err(e) => return Err(step("register guest RAM with userfaultfd")(e)),
        };
        let config = VmConfig { vcpus: desc.vcpus, irqchip: desc.irqchip, serial: self.opts.serial.clone() };
        let vm = Vm::new(ram.clone(), config).map_err(step("create the VM"))?;
        let vcpus = vm.create_vcpus().map_err(step("create the vCPUs"))?;
        let map = PageMap::new(ram.layout(), ram.unit_pages());
        let pages = map.total_pages();
        let machine = Machine {
            desc,
            ram,
            uffd,
            write_protect,
            vm,
            map,
            installed: PageBits::new(pages),
            digests: PageDigests::new(pages, (unit_pages * PAGE_SIZE) as usize),
            clock: FaultClock::new(pages),
        };
        Ok((machine, vcpus))
    }

    /// Loads the device state in its own thread: restoring may touch guest
    /// RAM, whose faults the fault thread keeps serving.
    pub(super) fn load<'s>(&'s self, s: &'s Scope<'s, '_>, state: Bytes) {
        set_policy(self.opts.tuning.rt_switchover, "dst-loader");
        let result = self.load_device_state(&state);
        Timeline::mark(&self.timeline.device_state_loaded_ns);
        let result = match result {
            Ok(()) => {
                tracing::debug!(bytes = state.len(), "device state loaded");
                Ok(())
            }
            Err(e) => {
                let text = error_chain(&e);
                tracing::error!(e = text, "loading the device state failed");
                // The core keeps the reason as text.
                Err(text)
            }
        };
        self.event(s, |l, now| {
            if let Err(e) = l.core.handle_device_state_loaded(now, result) {
                tracing::error!(%e, "device state loaded");
            }
        });
    }

    fn load_device_state(&self, state: &[u8]) -> Result<(), LoadError> {
        let m = self.machine.get().ok_or(LoadError::NoMachine)?;
        let vcpus = lock(&self.vcpus).take().ok_or(LoadError::NoVcpus)?;
        let restored = DeviceState::from_bytes(state).and_then(|st| st.restore(&m.vm, &vcpus));
        *lock(&self.vcpus) = Some(vcpus);
        restored.map_err(LoadError::Restore)
    }

    /// Starts the vCPU threads (the core took StartGuest).
    pub(super) fn resume(&self) {
        let Some(m) = self.machine.get() else { return };
        let Some(vcpus) = lock(&self.vcpus).take() else {
            tracing::error!("resume without vCPUs");
            return;
        };
        // Fallback: checkpoints hold the pages the guest dirties here, from
        // its first instruction.
        if self.opts.config.fallback.is_some() {
            if let Err(e) = m.vm.set_dirty_logging(true) {
                tracing::error!(e = error_chain(&e), "cannot turn on dirty logging: no checkpoint can be taken");
            }
        }
        // vCPU threads inherit this thread's policy, possibly real time;
        // each switches itself to the normal policy first thing (runner.rs).
        match VcpuSet::start(vcpus, m.vm.devices().clone()) {
            Ok(running) => {
                Timeline::mark(&self.timeline.resume_ns);
                let tids = running.thread_ids();
                // vCPU threads inherit the policy of the thread that spawned
                // them: never leave a guest in real time.
                for &tid in &tids {
                    let _ = crate::sys::set_realtime(tid, None);
                }
                if let Some(cpu) = self.opts.tuning.vcpu_cpu {
                    for &tid in &tids {
                        if let Err(e) = crate::sys::pin_thread(tid, cpu) {
                            tracing::warn!(%e, tid, cpu, "pinning a vCPU");
                        }
                    }
                }
                tracing::info!(vcpus = tids.len(), "the guest runs here");
                // Per-vCPU accounts need the faulting thread's id.
                if let (Some(b), true) = (&self.opts.blocktime, m.uffd.reports_thread_ids()) {
                    b.set_vcpus(tids.len());
                }
                let _ = self.vcpu_tids.set(tids);
                *lock(&self.running) = Some(running);
            }
            Err(e) => {
                // Past StartGuest nothing can give the guest back: report loudly.
                let e = DestinationError::StartVcpus(e);
                tracing::error!(e = error_chain(&e));
                *lock(&self.fatal) = Some(e);
            }
        }
    }

    /// Wakes the threads waiting for `page` (it is present already).
    pub(super) fn wake(&self, page: PageNumber) {
        let Some(m) = self.machine.get() else { return };
        if let Some(b) = &self.opts.blocktime {
            b.resolved(page.0, crate::driver::clock::now().0, None);
        }
        if let Some(r) = m.map.page_ref(page) {
            if let Err(e) = m.uffd.wake_pages(r, m.map.unit_pages()) {
                tracing::warn!(%e, page = page.0, "wake");
            }
        }
    }
}
