//! After the core finished: wait for the vCPUs, sum up the run, let the
//! guest run a while, check that every page arrived and that the pattern
//! guest's memory holds its pattern, dump memory if asked, and report.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use postcopy_core::{DestinationStats, Finished, LatencySummary};

use super::state::{DestinationDriver, Machine};
use crate::devices::{lock, GuestStats};
use crate::driver::clock::now;
use crate::driver::machine::{GuestKind, MachineDescription};
use crate::driver::report::{DestinationReport, PatternCheck};
use crate::error::error_chain;
use crate::guest::TestGuest;
use crate::memory::GuestRam;
use crate::runner::VcpuSet;
use crate::vcpu::VcpuState;
use crate::vm::Vm;

/// How long the report waits for the vCPUs of a completed migration.
const VCPU_START_WAIT: Duration = Duration::from_secs(10);
/// How long a guest with a hole is given to park (vCPUs blocked on the
/// hole never do; they run no guest code either).
const HOLE_PAUSE_WAIT: Duration = Duration::from_millis(100);
/// How long a destination that keeps its guest waits for the source to
/// close its connections after the migration completed.
const SOURCE_CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Bad pages the guest reported itself that the report describes.
const GUEST_ERRORS_SHOWN: usize = 4;

/// Why the migrated guest failed its checks here.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A page never arrived.
    #[error("page {page} was never installed")]
    NeverInstalled {
        /// Its global number.
        page: u64,
    },
    /// The core completed but the vCPUs were not started.
    #[error("the migration completed but the vCPUs never started here")]
    VcpusNeverStarted,
    /// The guest could not be stopped or its memory read.
    #[error("cannot check the guest's memory")]
    Pattern(#[source] crate::error::Error),
    /// The dump file could not be created.
    #[error("cannot create the memory dump {}", path.display())]
    DumpCreate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the dump failed.
    #[error("cannot dump memory to {}", path.display())]
    DumpWrite {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::error::Error,
    },
}

impl DestinationDriver<'_> {
    /// After the core finished: run the guest a while, check it, report.
    pub(super) fn verify_and_report(&self) -> DestinationReport {
        let finished = lock(&self.finished).clone();
        let completed = finished.as_ref().is_some_and(|f| f.result.is_ok());
        if completed {
            self.wait_for_vcpus();
        }
        let mut report = self.report_of(finished.as_ref());
        let Some(m) = self.machine.get() else { return report };
        if report.ok {
            self.check_guest(m, &mut report);
        } else {
            report.digest = m.digests.fold();
        }
        report
    }

    /// After the core finished, for a guest that stays here: the report,
    /// with every page installed and the digest of the pages as installed,
    /// but no run-after wait and no check (the guest keeps running).
    pub(super) fn report_kept(&self) -> DestinationReport {
        let finished = lock(&self.finished).clone();
        if finished.as_ref().is_some_and(|f| f.result.is_ok()) {
            self.wait_for_vcpus();
            // The source completes when our end of copy reaches it, and
            // then closes: cutting the connections first would leave it
            // recovering a migration that is over.
            let t0 = Instant::now();
            while self.shell.any_connection() && t0.elapsed() < SOURCE_CLOSE_WAIT {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut report = self.report_of(finished.as_ref());
        let Some(m) = self.machine.get() else { return report };
        report.digest = m.digests.fold();
        report.pages_installed = m.installed.count();
        if report.ok {
            if let Some(page) = m.installed.first_clear() {
                fail(&mut report, &VerifyError::NeverInstalled { page });
            }
            if lock(&self.running).is_none() {
                fail(&mut report, &VerifyError::VcpusNeverStarted);
            }
        }
        report
    }

    /// The core may complete (all pages present, EOC sent by another
    /// thread) while the thread that took StartGuest still starts the
    /// vCPUs: wait for them, within a bound.
    fn wait_for_vcpus(&self) {
        let t0 = Instant::now();
        while lock(&self.running).is_none() && lock(&self.fatal).is_none() && t0.elapsed() < VCPU_START_WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The run as the driver saw it: the core's verdict and statistics, the
    /// driver's own failure, timeline, counters and fault latency.
    fn report_of(&self, finished: Option<&Finished<DestinationStats>>) -> DestinationReport {
        let t = &self.timeline;
        let mut report = DestinationReport {
            resume_ns: t.resume_ns.load(Ordering::SeqCst),
            device_state_received_ns: t.device_state_received_ns.load(Ordering::SeqCst),
            device_state_loaded_ns: t.device_state_loaded_ns.load(Ordering::SeqCst),
            start_received_ns: t.start_received_ns.load(Ordering::SeqCst),
            end_ns: t.end_ns.load(Ordering::SeqCst),
            damage: self.opts.damage.map(|d| format!("{d:?}")),
            notices: self.shell.notices(),
            install_anomalies: self.install_counters.anomalies.load(Ordering::Relaxed),
            install_busy_ns: self.install_counters.busy_ns.load(Ordering::Relaxed),
            preallocated: self.opts.preallocated.is_some(),
            fault_latency: latency_summary(&lock(&self.latency)),
            fallback: self.opts.config.fallback.is_some().then(|| lock(&self.fallback_log).summary.clone()),
            ..Default::default()
        };
        if let Some(f) = finished {
            report.stats = f.stats.clone();
            report.error = f.result.as_ref().err().map(|e| error_chain(e));
        }
        if let Some(e) = lock(&self.fatal).as_ref() {
            let fatal = error_chain(e);
            report.error = Some(report.error.map_or(fatal.clone(), |r| format!("{fatal}; {r}")));
        }
        report.ok = finished.is_some_and(|f| f.result.is_ok()) && report.error.is_none();
        report
    }

    /// The guest runs here now: let it run, then stop and check it. Each
    /// failed check marks the report (the last one found names the error).
    fn check_guest(&self, m: &Machine, report: &mut DestinationReport) {
        let stats = m.vm.devices().stats().clone();
        let t_done = report.end_ns;
        std::thread::sleep(self.opts.run_after);
        report.progress_during_pages_per_s = stats.pages_rate(report.resume_ns, t_done);
        report.progress_after_pages_per_s = stats.pages_rate(t_done, now().0);
        report.pages_installed = m.installed.count();
        if let Some(page) = m.installed.first_clear() {
            // Reading through the guest mapping would block on the hole: no
            // verification, no dump. The guest is paused (vCPUs blocked on
            // the hole stay kicked; the stop abandons them).
            fail(report, &VerifyError::NeverInstalled { page });
            if let Some(vcpus) = lock(&self.running).as_ref() {
                vcpus.pause_within(HOLE_PAUSE_WAIT);
            }
            report.digest = m.digests.fold();
            return;
        }
        // Held until the end: the guest stays stopped while it is checked.
        let running = lock(&self.running);
        let Some(vcpus) = running.as_ref() else {
            fail(report, &VerifyError::VcpusNeverStarted);
            return;
        };
        let states = vcpus.pause().and_then(|_| vcpus.save_states());
        report.digest = m.digests.fold();
        if m.desc.guest == GuestKind::Pattern {
            match states
                .map_err(VerifyError::Pattern)
                .and_then(|states| check_pattern(&m.desc, &m.ram, &states, &stats))
            {
                Ok(check) => report.pattern = Some(check),
                Err(e) => fail(report, &e),
            }
        }
        if let Some(path) = &self.opts.dump_memory {
            if let Err(e) = dump_memory(m, path) {
                fail(report, &e);
            }
        }
    }
}

/// Marks `report` failed with `error`.
fn fail(report: &mut DestinationReport, error: &VerifyError) {
    report.ok = false;
    report.error = Some(error_chain(error));
}

/// Checks a pattern guest now: pauses its vCPUs, checks its memory against
/// where each stood, and resumes them if `resume`. None for a guest that
/// is not the pattern guest (nothing to check).
pub fn check_running_guest(
    vm: &Vm,
    vcpus: &VcpuSet,
    desc: &MachineDescription,
    resume: bool,
) -> Result<Option<PatternCheck>, VerifyError> {
    if desc.guest != GuestKind::Pattern {
        return Ok(None);
    }
    let states = vcpus.pause().and_then(|_| vcpus.save_states());
    let checked = states
        .map_err(VerifyError::Pattern)
        .and_then(|states| check_pattern(desc, vm.ram(), &states, vm.devices().stats()));
    if resume {
        vcpus.resume();
    }
    checked.map(Some)
}

/// Checks the pattern guest's memory against where each vCPU stood when
/// it was stopped (`states`).
fn check_pattern(
    desc: &MachineDescription,
    ram: &GuestRam,
    states: &[VcpuState],
    stats: &GuestStats,
) -> Result<PatternCheck, VerifyError> {
    let guest = TestGuest::new(&desc.ram, desc.vcpus).map_err(VerifyError::Pattern)?;
    let positions = states
        .iter()
        .enumerate()
        .map(|(i, st)| guest.position_from_regs(i, &st.regs))
        .collect::<Result<Vec<_>, _>>()
        .map_err(VerifyError::Pattern)?;
    let v = guest.verify(ram, &positions).map_err(VerifyError::Pattern)?;
    let first_bad =
        v.first_bad
            .iter()
            .map(|b| format!("vcpu {} gpa {:#x}: expected {:#x}, found {:#x}", b.vcpu, b.gpa, b.expected, b.found))
            .chain(
                stats.errors().iter().take(GUEST_ERRORS_SHOWN).map(|e| {
                    format!("guest reported gpa {:#x}: expected {:#x}, found {:#x}", e.gpa, e.expected, e.found)
                }),
            )
            .collect();
    Ok(PatternCheck {
        pages_checked: v.pages_checked,
        bad_pages: v.bad_pages,
        bad_reserved_bytes: v.bad_reserved_bytes,
        guest_reported_errors: stats.error_count(),
        first_bad,
        passes_after: stats.snapshot().reports.iter().sum(),
    })
}

/// Writes guest RAM to `path` (the guest is stopped).
fn dump_memory(m: &Machine, path: &Path) -> Result<(), VerifyError> {
    let file =
        std::fs::File::create(path).map_err(|source| VerifyError::DumpCreate { path: path.to_path_buf(), source })?;
    m.ram
        .dump(&mut std::io::BufWriter::new(file))
        .map_err(|source| VerifyError::DumpWrite { path: path.to_path_buf(), source: source.into() })
}

/// Fault latency percentiles from the driver's histogram (ns).
fn latency_summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    let us = |ns: u64| ns as f64 / 1e3;
    LatencySummary {
        count: h.len(),
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        max_us: us(h.max()),
        mean_us: h.mean() / 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_summary_reads_the_histogram_in_microseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        assert_eq!(latency_summary(&h).count, 0);
        for ns in [10_000u64, 20_000, 30_000, 40_000] {
            h.record(ns).unwrap();
        }
        let s = latency_summary(&h);
        assert_eq!(s.count, 4);
        assert!((s.p50_us - 20.0).abs() < 0.1, "{s:?}");
        assert!((s.max_us - 40.0).abs() < 0.1, "{s:?}");
        assert!((s.mean_us - 25.0).abs() < 0.1, "{s:?}");
    }
}
