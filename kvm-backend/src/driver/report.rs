//! What each side reports (serde, for `--json`), and the table of
//! docs/protocol.md's "What a run reports" built from both.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::digest::MemoryDigest;
use postcopy_core::{DestinationStats, LatencySummary, SourceStats};

/// What fallback did on the source (docs/fallback.md).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FallbackRecord {
    /// Checkpoints committed into the fallback image.
    pub checkpoints_committed: u64,
    /// Their pages.
    pub checkpoint_pages: u64,
    /// Those pages' bytes (zero pages count none).
    pub checkpoint_bytes: u64,
    /// Checkpoints cut off and dropped.
    pub checkpoints_discarded: u64,
    /// The takeover, if the source took the guest back.
    pub takeover: Option<Takeover>,
}

/// Fallback on the source: checkpoints committed into the image and
/// dropped, counted as it happens, so that a VMM reads them while the
/// migration runs (`query-migrate`), not only in the final record.
#[derive(Debug, Default)]
pub struct CheckpointCounters {
    committed: AtomicU64,
    pages: AtomicU64,
    bytes: AtomicU64,
    discarded: AtomicU64,
}

impl CheckpointCounters {
    /// A checkpoint of `pages` pages, `bytes` of them not zero, committed.
    pub fn count_committed(&self, pages: u64, bytes: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.committed.fetch_add(1, Ordering::Release);
    }

    /// A checkpoint cut off and dropped.
    pub fn count_discarded(&self) {
        self.discarded.fetch_add(1, Ordering::Release);
    }

    /// The counts so far, as a record (without a takeover).
    pub fn record(&self) -> FallbackRecord {
        FallbackRecord {
            checkpoints_committed: self.committed.load(Ordering::Acquire),
            checkpoint_pages: self.pages.load(Ordering::Relaxed),
            checkpoint_bytes: self.bytes.load(Ordering::Relaxed),
            checkpoints_discarded: self.discarded.load(Ordering::Acquire),
            takeover: None,
        }
    }
}

/// The source took the guest back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Takeover {
    /// The checkpoint the guest restarted from (0: the switchover's state).
    pub checkpoint: u64,
    /// Monotonic ns: when the last frame from the destination arrived
    /// (the takeover waits from there).
    pub last_heard_ns: u64,
    /// Monotonic ns: when the guest ran here again.
    pub running_ns: u64,
    /// Why the guest could not run again here, if it could not.
    pub error: Option<String>,
}

/// What fallback did on the destination, for the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FallbackSummary {
    /// Checkpoints taken and handed to the core.
    pub checkpoints: u64,
    /// Pages in them.
    pub checkpoint_pages: u64,
    /// Those pages' bytes (zero pages count none).
    pub checkpoint_bytes: u64,
    /// How long the vCPUs were stopped per checkpoint, median, us.
    pub stop_us_p50: f64,
    /// The 99th percentile of those stops, us.
    #[serde(default)]
    pub stop_us_p99: f64,
    /// The longest such stop, us.
    pub stop_us_max: f64,
    /// The longest time a checkpoint spent copying pages, us (within the
    /// stop; with write-protect, after it, while the guest runs).
    pub copy_us_max: f64,
    /// Checkpoint pages copied by the fault thread before a guest write
    /// (copy on write); the others were copied in the background.
    #[serde(default)]
    pub copied_on_write: u64,
    /// Times the lease lapsed and the vCPUs were fenced.
    pub fences: u64,
    /// The longest time from a fence's kick to every vCPU parked, us.
    pub fence_us_max: f64,
    /// The source took the guest back and this copy was dropped.
    pub discarded: bool,
}

impl FallbackSummary {
    /// Counts a checkpoint; `stops` holds every stop so far, in us.
    pub(crate) fn add_checkpoint(&mut self, stop_us: f64, copy_us: f64, pages: u64, bytes: u64, stops: &mut Vec<f64>) {
        self.checkpoints += 1;
        self.checkpoint_pages += pages;
        self.checkpoint_bytes += bytes;
        self.copy_us_max = self.copy_us_max.max(copy_us);
        stops.push(stop_us);
        let mut sorted = stops.clone();
        sorted.sort_by(f64::total_cmp);
        self.stop_us_p50 = sorted[sorted.len() / 2];
        self.stop_us_p99 = sorted[(sorted.len() * 99).div_ceil(100) - 1];
        self.stop_us_max = sorted[sorted.len() - 1];
    }
}

/// The source's report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SourceReport {
    /// The migration completed.
    pub ok: bool,
    /// Why it did not.
    pub error: Option<String>,
    /// "source" or "destination".
    pub guest_on: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// "postcopy" or "hybrid".
    pub mode: String,
    /// The core's statistics.
    pub stats: SourceStats,
    /// Monotonic ns: migration start, vCPU stop, end.
    pub start_ns: u64,
    /// When the source stopped the vCPUs (0: never).
    pub stop_ns: u64,
    /// When the source's migration ended.
    pub end_ns: u64,
    /// Time to pause the vCPUs and capture the device state, in us.
    pub stop_capture_us: f64,
    /// Time to pause the vCPUs alone, in us.
    pub pause_us: f64,
    /// Digest of every page as sent (its content at the stop).
    pub digest: MemoryDigest,
    /// Guest pages written per second before the migration.
    pub progress_before_pages_per_s: Option<f64>,
    /// Pattern passes completed before the migration (all vCPUs).
    pub passes_before: u64,
    /// After a failure: pages per second the guest wrote on the source.
    pub progress_after_failure_pages_per_s: Option<f64>,
    /// Notices (pauses, recoveries).
    pub notices: Vec<String>,
    /// Each connection's opening (TCP, TLS handshake, preamble, proof):
    /// start and end, monotonic ns.
    #[serde(default)]
    pub handshakes_ns: Vec<(u64, u64)>,
    /// Fallback (docs/fallback.md): checkpoints committed, the takeover.
    #[serde(default)]
    pub fallback: Option<FallbackRecord>,
    /// After a takeover: the pattern guest's memory check here, against
    /// the registers it restarted with and ran on from.
    #[serde(default)]
    pub pattern_after_takeover: Option<PatternCheck>,
}

impl SourceReport {
    /// Time spent opening connections inside `[from_ns, to_ns]` (the
    /// downtime, when given the stop and the resume), in ms: overlapping
    /// openings counted once.
    pub fn handshake_ms_within(&self, from_ns: u64, to_ns: u64) -> f64 {
        let mut spans: Vec<(u64, u64)> =
            self.handshakes_ns.iter().map(|&(a, b)| (a.max(from_ns), b.min(to_ns))).filter(|&(a, b)| a < b).collect();
        spans.sort_unstable();
        let (mut total, mut reach) = (0u64, 0u64);
        for (a, b) in spans {
            let start = a.max(reach);
            if b > start {
                total += b - start;
            }
            reach = reach.max(b);
        }
        total as f64 / 1e6
    }
}

/// The pattern check of the destination's memory after the migration.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PatternCheck {
    /// Pages checked.
    pub pages_checked: u64,
    /// Pages that did not hold the pattern.
    pub bad_pages: u64,
    /// Reserved bytes (code, tables) that differ.
    pub bad_reserved_bytes: u64,
    /// Bad pages the guest itself reported through its error port.
    pub guest_reported_errors: u64,
    /// The first bad pages, described.
    pub first_bad: Vec<String>,
    /// Passes of the guest (all vCPUs) completed on the destination.
    pub passes_after: u64,
}

impl PatternCheck {
    /// Whether the pattern held everywhere.
    pub fn ok(&self) -> bool {
        self.bad_pages == 0 && self.bad_reserved_bytes == 0 && self.guest_reported_errors == 0
    }
}

/// The destination's report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestinationReport {
    /// The migration completed.
    pub ok: bool,
    /// Why it did not.
    pub error: Option<String>,
    /// The core's statistics.
    pub stats: DestinationStats,
    /// Monotonic ns when the vCPUs started here (0: never).
    pub resume_ns: u64,
    /// Monotonic ns: the whole device state received (loading starts).
    pub device_state_received_ns: u64,
    /// Monotonic ns: the device state loaded.
    pub device_state_loaded_ns: u64,
    /// Monotonic ns: StartGuest received (the vCPU threads start).
    pub start_received_ns: u64,
    /// Monotonic ns when this side completed.
    pub end_ns: u64,
    /// Fault latency measured by the driver: fault read from userfaultfd
    /// to the page in place (taken before its waiting threads are woken).
    pub fault_latency: LatencySummary,
    /// Digest of every page as installed.
    pub digest: MemoryDigest,
    /// Pages installed (each at most once, overwrites aside).
    pub pages_installed: u64,
    /// Installs that failed or found the page already there.
    pub install_anomalies: u64,
    /// Wall time in the calls that placed pages (`UFFDIO_COPY` /
    /// `UFFDIO_ZEROPAGE`, or for preallocated RAM a copy and
    /// `UFFDIO_CONTINUE`; writes over present pages), summed over the
    /// installing threads. With RAM allocated as pages arrive, mostly the
    /// kernel backing fresh memory here (see docs/machine.md, "Memory").
    #[serde(default)]
    pub install_busy_ns: u64,
    /// Guest RAM was preallocated before the migration (shared memory,
    /// minor faults) rather than allocated as pages arrived.
    #[serde(default)]
    pub preallocated: bool,
    /// The background population of the preallocated RAM, when it had one:
    /// how far it got before the migration ended.
    #[serde(default)]
    pub population: Option<crate::driver::populate::PopulationSummary>,
    /// Guest pages written per second while postcopy ran.
    pub progress_during_pages_per_s: Option<f64>,
    /// Guest pages written per second after the migration.
    pub progress_after_pages_per_s: Option<f64>,
    /// The pattern guest's memory check (pattern guests only).
    pub pattern: Option<PatternCheck>,
    /// The boot-sector guest's serial output after the migration, if kept.
    pub notices: Vec<String>,
    /// Test-only damage that was applied.
    pub damage: Option<String>,
    /// Fallback (docs/fallback.md): checkpoints taken, fences.
    #[serde(default)]
    pub fallback: Option<FallbackSummary>,
}

/// Both sides' reports and the checks that need both.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// The source's report.
    pub source: SourceReport,
    /// The destination's report.
    pub destination: DestinationReport,
    /// Source stop to destination resume, in ms (one host, one clock).
    pub downtime_ms: f64,
    /// Source start to destination completion, in ms.
    pub total_ms: f64,
    /// The page digests of both sides agree.
    pub digests_match: bool,
    /// Digests and pattern both passed.
    pub integrity_ok: bool,
}

impl RunReport {
    /// Combines the two sides' reports.
    pub fn new(source: SourceReport, destination: DestinationReport) -> Self {
        let ms = |a: u64, b: u64| if a != 0 && b >= a { (b - a) as f64 / 1e6 } else { 0.0 };
        let downtime_ms = ms(source.stop_ns, destination.resume_ns);
        let total_ms = ms(source.start_ns, destination.end_ns.max(source.end_ns));
        let digests_match = source.digest == destination.digest && source.digest.missing_pages == 0;
        let pattern_ok = destination.pattern.as_ref().is_none_or(PatternCheck::ok);
        let integrity_ok = source.ok && destination.ok && digests_match && pattern_ok;
        Self { source, destination, downtime_ms, total_ms, digests_match, integrity_ok }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let s = &self.source;
        let d = &self.destination;
        let ms = |ns: u64| ns as f64 / 1e6;
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<34} {v}\n"));
        row("result", if self.integrity_ok { "COMPLETED, verified".into() } else { "FAILED".into() });
        row("guest", format!("{} MiB, {} vCPUs, {} mode", s.mem_bytes >> 20, s.vcpus, s.mode));
        row("total time", format!("{:.1} ms", self.total_ms));
        row("downtime (source stop -> dest resume)", format!("{:.2} ms", self.downtime_ms));
        let p = &s.stats.phases;
        row(
            "phases (source view)",
            format!(
                "setup {:.1} ms, precopy {:.1} ms, stopped {:.2} ms, postcopy {:.1} ms, paused {:.1} ms",
                ms(p.setup_ns),
                ms(p.precopy_ns),
                ms(p.downtime_ns),
                ms(p.postcopy_ns),
                ms(p.paused_ns)
            ),
        );
        row(
            "stop + device state capture",
            format!(
                "{:.2} ms (pause {:.2} ms; {} bytes of state)",
                s.stop_capture_us / 1e3,
                s.pause_us / 1e3,
                s.stats.device_state_bytes
            ),
        );
        let at = |t: u64| {
            if t >= s.stop_ns && s.stop_ns != 0 {
                format!("{:.2}", (t - s.stop_ns) as f64 / 1e6)
            } else {
                "-".into()
            }
        };
        row(
            "downtime steps (ms after the stop)",
            format!(
                "state captured {}, state received {}, loaded {}, start received {}, vCPUs running {}",
                at(s.stop_ns + (s.stop_capture_us * 1e3) as u64),
                at(d.device_state_received_ns),
                at(d.device_state_loaded_ns),
                at(d.start_received_ns),
                at(d.resume_ns)
            ),
        );
        let n = &s.stats.pages_sent;
        let b = &s.stats.page_bytes_sent;
        let mib = |x: u64| x as f64 / (1 << 20) as f64;
        row("pages sent: precopy", format!("{} ({:.1} MiB)", n.precopy, mib(b.precopy)));
        row("pages sent: requested", format!("{} ({:.1} MiB)", n.requested, mib(b.requested)));
        row("pages sent: background", format!("{} ({:.1} MiB)", n.background, mib(b.background)));
        row("pages sent: re-sent after a loss", format!("{} ({:.1} MiB)", n.resent, mib(b.resent)));
        row("pages sent: zero (flag only)", format!("{}", n.zero));
        row("stale precopy pages discarded", format!("{}", s.stats.stale_pages_discarded));
        row(
            "remote faults",
            format!("{} ({} on pages already present)", d.stats.remote_faults, d.stats.faults_on_present_pages),
        );
        let l = &d.fault_latency;
        row(
            "fault latency (fault read -> installed)",
            format!("p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, max {:.0} us", l.p50_us, l.p90_us, l.p99_us, l.max_us),
        );
        row(
            "time placing pages",
            format!(
                "{:.1} ms for {} pages, {:.2} us/page ({})",
                ms(d.install_busy_ns),
                d.pages_installed,
                d.install_busy_ns as f64 / 1e3 / d.pages_installed.max(1) as f64,
                if d.preallocated {
                    "preallocated RAM: copy + UFFDIO_CONTINUE"
                } else {
                    "RAM allocated as pages arrive: UFFDIO_COPY/ZEROPAGE"
                }
            ),
        );
        if let Some(p) = &d.population {
            row(
                "RAM populated in the background",
                format!(
                    "{:.0}% in {:.0} ms{}; {} faults ahead of it",
                    100.0 * p.pages as f64 / p.total_pages.max(1) as f64,
                    p.ms,
                    if p.complete { "" } else { " (stopped at the end of the migration)" },
                    p.faults_ahead
                ),
            );
        }
        let blocked: Vec<String> =
            d.stats.vcpu_blocked_ns.iter().enumerate().map(|(i, ns)| format!("vcpu{i} {:.1} ms", ms(*ns))).collect();
        row("vCPU time blocked on faults", if blocked.is_empty() { "none".into() } else { blocked.join(", ") });
        let rate = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{:.0}k pages/s", r / 1e3));
        row(
            "guest progress before/during/after",
            format!(
                "{} / {} / {}",
                rate(s.progress_before_pages_per_s),
                rate(d.progress_during_pages_per_s),
                rate(d.progress_after_pages_per_s)
            ),
        );
        row("recoveries", format!("{}", s.stats.recoveries.max(d.stats.recoveries)));
        row(
            "page digests (sent vs installed)",
            format!(
                "{:016x} vs {:016x}: {}",
                s.digest.digest,
                d.digest.digest,
                if self.digests_match { "match" } else { "MISMATCH" }
            ),
        );
        match &d.pattern {
            Some(p) => row(
                "guest pattern over all memory",
                format!(
                    "{} pages checked, {} bad, {} reserved bytes bad, {} errors reported by the guest: {}",
                    p.pages_checked,
                    p.bad_pages,
                    p.bad_reserved_bytes,
                    p.guest_reported_errors,
                    if p.ok() { "ok" } else { "FAILED" }
                ),
            ),
            None => row("guest pattern over all memory", "n/a (not the pattern guest)".into()),
        }
        if let Some(e) = &s.error {
            row("source error", e.clone());
        }
        if let Some(e) = &d.error {
            row("destination error", e.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SourceReport, DestinationReport) {
        let digest = MemoryDigest { digest: 42, missing_pages: 0 };
        let s = SourceReport {
            ok: true,
            start_ns: 1_000,
            stop_ns: 2_000_000,
            end_ns: 9_000_000,
            digest,
            ..Default::default()
        };
        let d = DestinationReport {
            ok: true,
            resume_ns: 3_500_000,
            end_ns: 10_000_000,
            digest,
            pattern: Some(PatternCheck { pages_checked: 10, ..Default::default() }),
            ..Default::default()
        };
        (s, d)
    }

    #[test]
    fn handshake_time_in_a_window_counts_overlaps_once() {
        let r = SourceReport { handshakes_ns: vec![(0, 10), (5, 20), (30, 40), (50, 60)], ..Default::default() };
        // [0,20) merged and clipped to [8,35): 12; [30,35): 5.
        assert_eq!(r.handshake_ms_within(8, 35), 17.0 / 1e6);
        assert_eq!(r.handshake_ms_within(100, 200), 0.0);
    }

    #[test]
    fn integrity_needs_equal_digests_and_an_intact_pattern() {
        let (s, d) = pair();
        let r = RunReport::new(s.clone(), d.clone());
        assert!(r.integrity_ok && r.digests_match);
        assert_eq!(r.downtime_ms, 1.5);
        assert!((r.total_ms - 9.999).abs() < 1e-9);
        assert!(r.table().contains("COMPLETED, verified"));

        let mut d2 = d.clone();
        d2.digest.digest = 43;
        let r = RunReport::new(s.clone(), d2);
        assert!(!r.digests_match && !r.integrity_ok);
        assert!(r.table().contains("MISMATCH"));

        let mut d3 = d.clone();
        if let Some(p) = d3.pattern.as_mut() {
            p.guest_reported_errors = 1;
        }
        assert!(!RunReport::new(s.clone(), d3).integrity_ok);

        let mut s2 = s.clone();
        s2.digest.missing_pages = 1;
        let mut d4 = d.clone();
        d4.digest.missing_pages = 1;
        assert!(!RunReport::new(s2, d4).digests_match, "a page missing on both sides is no match");

        let mut d5 = d;
        d5.ok = false;
        assert!(!RunReport::new(s, d5).integrity_ok);
    }
}
