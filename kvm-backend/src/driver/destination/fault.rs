//! The fault thread (`dst-fault`): reads userfaultfd faults, starts their
//! clocks, and hands them to the core, whose requests it writes on the
//! return path itself (no hand-off on the fault path).

use std::sync::atomic::Ordering;
use std::thread::Scope;
use std::time::{Duration, Instant};

use postcopy_core::{PageNumber, Waiter};

use super::state::DestinationDriver;
use crate::driver::clock::now;
use crate::driver::placement::latency_thread;
use crate::driver::shell::SideDriver;
use crate::error::error_chain;
use crate::uffd::PageFault;

/// How long the fault thread blocks in one poll (it checks for shutdown
/// in between).
const FAULT_POLL: Duration = Duration::from_millis(50);
/// How long the fault thread waits after a failed read before reading again.
const FAULT_RETRY: Duration = Duration::from_millis(10);

impl DestinationDriver<'_> {
    pub(super) fn fault_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        let Some(m) = self.machine.get() else { return };
        latency_thread(&self.opts.tuning, "dst-fault");
        let spin = self.opts.tuning.spin();
        let mut reader = m.uffd.fault_reader();
        let mut faults: Vec<PageFault> = Vec::new();
        tracing::debug!(spin_us = spin.as_micros(), "serving faults");
        while !self.shell.is_stopping() {
            faults.clear();
            let got = if spin.is_zero() {
                match reader.wait(FAULT_POLL) {
                    Ok(true) => reader.read(&mut faults),
                    Ok(false) => continue,
                    Err(e) => Err(e),
                }
            } else {
                let until = Instant::now() + spin;
                loop {
                    match reader.read(&mut faults) {
                        Ok(0) if Instant::now() < until => std::hint::spin_loop(),
                        Ok(0) => match reader.wait(FAULT_POLL) {
                            Ok(true) => break reader.read(&mut faults),
                            Ok(false) => break Ok(0),
                            Err(e) => break Err(e),
                        },
                        other => break other,
                    }
                }
            };
            match got {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(e = error_chain(&e), "reading faults failed");
                    std::thread::sleep(FAULT_RETRY);
                    continue;
                }
            }
            // Writes to a checkpoint's write-protected pages: copied, then
            // let go; they are not missing pages.
            faults.retain(|f| {
                if f.write_protected {
                    self.copy_before_write(m, f.page);
                }
                !f.write_protected
            });
            if faults.is_empty() {
                continue;
            }
            let t = now();
            let tids = self.vcpu_tids.get();
            let pages: Vec<(PageNumber, Waiter)> = faults
                .iter()
                .filter_map(|f| {
                    if let Some(p) = &self.opts.population {
                        p.note_fault(f.page);
                    }
                    let page = m.map.number(f.page)?;
                    m.clock.start(page.0, t.0);
                    let vcpu = f.thread_id.and_then(|tid| tids.and_then(|ts| ts.iter().position(|&x| x == tid)));
                    if let (Some(b), Some(i)) = (&self.opts.blocktime, vcpu) {
                        b.blocked(i, page.0, t.0);
                    }
                    Some((page, vcpu.map_or(Waiter::Vmm, |i| Waiter::Vcpu(i as u32))))
                })
                .collect();
            self.faults_read.fetch_add(pages.len() as u64, Ordering::Relaxed);
            self.event(s, |l, now| {
                for (page, waiter) in pages {
                    if let Err(e) = l.core.handle_page_fault(now, page, waiter) {
                        // Once the migration failed here, a blocked vCPU may
                        // fault again until the guest is abandoned: expected.
                        if l.core.state().is_terminal() {
                            tracing::debug!(%e, page = page.0, "page fault after the end");
                        } else {
                            tracing::error!(%e, page = page.0, "page fault");
                        }
                    }
                }
            });
        }
    }
}
