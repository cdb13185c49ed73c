//! What a run reports, as a table for people and as JSON.

use serde::Serialize;
use std::fmt::Write;

use postcopy_core::stats::{ByKind, PhaseTimes};
use postcopy_core::LatencySummary;

/// The guest's progress: page accesses per simulated millisecond (all vCPUs).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GuestProgress {
    /// On the source before the migration started.
    pub before_per_ms: Option<f64>,
    /// On the source while migrating (precopy rounds; failed attempts).
    pub migrating_on_source_per_ms: Option<f64>,
    /// On the destination from its start to completion.
    pub postcopy_per_ms: Option<f64>,
    /// On the destination after completion.
    pub after_per_ms: Option<f64>,
    /// `postcopy_per_ms / before_per_ms`: 1.0 means no slowdown.
    pub postcopy_vs_before: Option<f64>,
}

/// The migration's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// From the start of the (first) migration to both sides completed.
    pub total_ms: Option<f64>,
    /// From the source stopping the guest to the destination running it.
    pub downtime_ms: Option<f64>,
    /// The source core's phase times (the last attempt).
    pub phases: PhaseTimes,
    pub pages_sent: ByKind,
    /// Bytes on the network, pages charged at 4 KiB.
    pub network_bytes: u64,
    pub remote_faults: u64,
    pub fault_latency: LatencySummary,
    pub vcpu_blocked_ms_total: f64,
    pub vcpu_blocked_ms_max: f64,
    pub recoveries: u32,
    pub duplicate_pages: u64,
    pub stale_pages_discarded: u64,
    pub requests_sent: u64,
    /// Page part frames the source sent (huge pages pushed in parts).
    pub page_parts_sent: u64,
    /// Requests for a page whose parts the push was sending (the rest went
    /// on the urgent channel).
    pub requests_for_pages_in_parts: u64,
    /// Fallback: checkpoints the destination's driver abandoned (all).
    pub checkpoints_abandoned: u64,
    /// Fallback: of those, the ones abandoned waiting for a vCPU to park
    /// (fenced or dropped meanwhile).
    pub checkpoints_abandoned_parking: u64,
    /// Fallback with `return_writer_us`: wake-ups of the destination's
    /// return writer (one per ring it answered).
    pub return_writer_wakes: u64,
    pub guest: GuestProgress,
}

/// One run: the scenario, the outcome, the numbers, the simulator's speed.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub seed: u64,
    /// Every option, `key=value`.
    pub options: String,
    /// The command that replays this run.
    pub replay: String,
    /// `completed`, `violation` or `unfinished`.
    pub outcome: String,
    pub violations: Vec<String>,
    /// Things worth knowing (failed attempts, skipped crashes).
    pub notes: Vec<String>,
    pub attempts: u32,
    pub sim_ms: f64,
    pub real_ms: f64,
    pub events: u64,
    /// Page frames the source wrote (all kinds, re-sends included).
    pub page_transfers: u64,
    pub transfers_per_sec: f64,
    pub trace_hash: String,
    pub trace_records: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tail: Vec<String>,
    pub report: Report,
}

impl RunResult {
    /// No violation, and the migration completed or, with fallback, the
    /// source took the guest back from a checkpoint after losing the
    /// destination (both end with the guest running, checked).
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && (self.outcome == "completed" || self.outcome == "fell-back")
    }
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn ns_ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

/// The human table of one run.
pub fn table(result: &RunResult) -> String {
    let r = &result.report;
    let mut out = String::new();
    let mut row = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<34} {value}");
    };
    row("outcome", format!("{} (attempts: {})", result.outcome, result.attempts));
    row("total time (ms)", opt(r.total_ms, 3));
    row("downtime (ms)", opt(r.downtime_ms, 3));
    let p = &r.phases;
    row(
        "phases: setup/precopy/down/post (ms)",
        format!(
            "{} / {} / {} / {}",
            ns_ms(p.setup_ns),
            ns_ms(p.precopy_ns),
            ns_ms(p.downtime_ns),
            ns_ms(p.postcopy_ns)
        ),
    );
    row("paused (ms)", ns_ms(p.paused_ns));
    let s = &r.pages_sent;
    row(
        "pages: precopy/background/requested",
        format!("{} / {} / {} (re-sent {}, zero {})", s.precopy, s.background, s.requested, s.resent, s.zero),
    );
    row("network bytes (4 KiB pages)", format!("{} ({:.1} MiB)", r.network_bytes, r.network_bytes as f64 / 1048576.0));
    row("remote faults", r.remote_faults.to_string());
    let l = &r.fault_latency;
    row(
        "fault latency p50/p90/p99/max (us)",
        format!("{:.1} / {:.1} / {:.1} / {:.1}", l.p50_us, l.p90_us, l.p99_us, l.max_us),
    );
    row("vCPU blocked total / max (ms)", format!("{:.3} / {:.3}", r.vcpu_blocked_ms_total, r.vcpu_blocked_ms_max));
    row("recoveries", r.recoveries.to_string());
    row("duplicates / stale discarded", format!("{} / {}", r.duplicate_pages, r.stale_pages_discarded));
    if r.page_parts_sent > 0 {
        let parts = format!("{} / {}", r.page_parts_sent, r.requests_for_pages_in_parts);
        row("page parts sent / requests for pages in parts", parts);
    }
    let g = &r.guest;
    row(
        "guest accesses/ms before/src/post/after",
        format!(
            "{} / {} / {} / {}",
            opt(g.before_per_ms, 0),
            opt(g.migrating_on_source_per_ms, 0),
            opt(g.postcopy_per_ms, 0),
            opt(g.after_per_ms, 0)
        ),
    );
    row("guest progress in postcopy vs before", opt(g.postcopy_vs_before, 3));
    row("simulated / real time (ms)", format!("{:.1} / {:.1}", result.sim_ms, result.real_ms));
    row(
        "page transfers / events",
        format!("{} / {} ({:.2} M transfers/s)", result.page_transfers, result.events, result.transfers_per_sec / 1e6),
    );
    row("trace hash", result.trace_hash.clone());
    out
}
