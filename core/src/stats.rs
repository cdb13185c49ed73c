//! What a run reports (docs/protocol.md, "What a run reports"), as far as each
//! side's core can know it. Serde-serialisable for `--json` output.
//!
//! Statistics are observations only: no decision of a core ever reads them,
//! which is why [`Observed`] leaves them out of a core's identity.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::time::Timestamp;
use crate::wire::PageKind;

/// Wraps data that never feeds a decision (statistics, timestamps for them):
/// it is cloned along, but two cores that differ only in it are equal. The
/// model checker relies on this to merge states that behave the same.
#[derive(Clone, Debug, Default)]
pub struct Observed<T>(pub T);

impl<T> PartialEq for Observed<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Observed<T> {}

impl<T> Hash for Observed<T> {
    fn hash<H: Hasher>(&self, _: &mut H) {}
}

/// Pages (or bytes) by why they crossed the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByKind {
    pub precopy: u64,
    pub background: u64,
    pub requested: u64,
    /// Sent again because a lost connection lost the first copy.
    pub resent: u64,
    /// Of all the above, pages that were all zero (sent as a flag only).
    pub zero: u64,
}

impl ByKind {
    pub(crate) fn add(&mut self, kind: PageKind, amount: u64) {
        match kind {
            PageKind::Precopy => self.precopy += amount,
            PageKind::Background => self.background += amount,
            PageKind::Requested => self.requested += amount,
        }
    }

    /// Pages sent for any reason (re-sent and zero pages are already counted
    /// in their kind).
    pub fn total(&self) -> u64 {
        self.precopy + self.background + self.requested
    }
}

/// Durations of a migration's phases on one side, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Connecting and handshaking.
    pub setup_ns: u64,
    /// Precopy rounds (zero in pure postcopy).
    pub precopy_ns: u64,
    /// Guest stopped: from the source's stop to the start of the guest on
    /// the destination (as each side sees it).
    pub downtime_ns: u64,
    /// From the guest's start on the destination to completion.
    pub postcopy_ns: u64,
    /// Time spent paused after lost connections.
    pub paused_ns: u64,
    /// From the first event to completion.
    pub total_ns: u64,
}

/// The source's report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStats {
    pub phases: PhaseTimes,
    pub pages_sent: ByKind,
    /// Bytes on the wire for pages, headers included.
    pub page_bytes_sent: ByKind,
    pub precopy_rounds: u32,
    /// Pages sent in precopy that the guest dirtied again before the stop and
    /// that the destination was told to drop.
    pub stale_pages_discarded: u64,
    pub requests_received: u64,
    /// Requests for pages already on their way (served by that copy).
    pub requests_for_sent_pages: u64,
    /// Of those, requests for a page whose parts the background push was
    /// sending: its parts not yet sent went on the urgent channel.
    pub requests_for_pages_in_parts: u64,
    /// Page part frames sent (pages larger than the part size, pushed in
    /// postcopy; see `Config::page_part_bytes`).
    pub page_parts_sent: u64,
    pub device_state_bytes: u64,
    pub recoveries: u32,
    /// Bytes of heap the per-page bookkeeping holds.
    pub bookkeeping_bytes: u64,
}

/// A fault latency distribution, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// Fault latencies in nanoseconds: the first [`EXACT_LATENCY_SAMPLES`]
/// exactly, then a histogram (1 ns to 1 hour, 3 significant digits).
///
/// A migration with few remote faults (and every state of the model
/// checker, which clones a destination per explored state) never pays for
/// the histogram's 256 KiB of counts; once it exists it is shared
/// copy-on-write, so clones stay cheap and a record on an unshared one
/// costs one reference check.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    samples: Vec<u64>,
    histogram: Option<Arc<Histogram<u64>>>,
}

/// Latencies kept exactly before switching to a histogram.
pub const EXACT_LATENCY_SAMPLES: usize = 64;

impl LatencyHistogram {
    pub fn record_ns(&mut self, nanos: u64) {
        let nanos = nanos.max(1);
        if let Some(histogram) = &mut self.histogram {
            Arc::make_mut(histogram).saturating_record(nanos);
        } else if self.samples.len() < EXACT_LATENCY_SAMPLES {
            self.samples.push(nanos);
        } else {
            // Constant bounds that hdrhistogram accepts: this cannot fail at run time.
            let mut histogram =
                Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("constant histogram bounds are valid");
            for sample in self.samples.drain(..).chain([nanos]) {
                histogram.saturating_record(sample);
            }
            self.histogram = Some(Arc::new(histogram));
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let us = |ns: u64| ns as f64 / 1000.0;
        if let Some(h) = &self.histogram {
            return LatencySummary {
                count: h.len(),
                p50_us: us(h.value_at_quantile(0.50)),
                p90_us: us(h.value_at_quantile(0.90)),
                p99_us: us(h.value_at_quantile(0.99)),
                max_us: us(h.max()),
                mean_us: h.mean() / 1000.0,
            };
        }
        if self.samples.is_empty() {
            return LatencySummary::default();
        }
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let count = sorted.len();
        // Nearest rank: the smallest sample with at least `q` of all at or below it.
        let at = |q: f64| sorted[((q * count as f64).ceil() as usize).clamp(1, count) - 1];
        LatencySummary {
            count: count as u64,
            p50_us: us(at(0.50)),
            p90_us: us(at(0.90)),
            p99_us: us(at(0.99)),
            max_us: us(sorted[count - 1]),
            mean_us: sorted.iter().map(|&ns| ns as f64).sum::<f64>() / count as f64 / 1000.0,
        }
    }
}

/// The destination's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationStats {
    pub phases: PhaseTimes,
    pub pages_received: ByKind,
    /// Page frames for pages already present, dropped.
    pub duplicate_pages: u64,
    /// Page part frames received (see `Config::page_part_bytes`).
    pub page_parts_received: u64,
    /// Precopy pages dropped because the guest dirtied them on the source.
    pub stale_pages_discarded: u64,
    /// Faults that needed a page from the source.
    pub remote_faults: u64,
    /// Faults on pages that were already present (raced with an install).
    pub faults_on_present_pages: u64,
    pub requests_sent: u64,
    pub fault_latency: LatencySummary,
    /// Time each vCPU spent blocked on remote faults, in nanoseconds.
    pub vcpu_blocked_ns: Vec<u64>,
    pub device_state_bytes: u64,
    pub recoveries: u32,
    pub bookkeeping_bytes: u64,
}

/// Timestamps of phase boundaries, turned into [`PhaseTimes`] at the end.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PhaseClock {
    pub first_event: Option<Timestamp>,
    pub handshake_done: Option<Timestamp>,
    pub stopped: Option<Timestamp>,
    pub started: Option<Timestamp>,
    pub paused_since: Option<Timestamp>,
    pub paused_ns: u64,
}

impl PhaseClock {
    pub fn touch(&mut self, now: Timestamp) {
        self.first_event.get_or_insert(now);
    }

    pub fn pause(&mut self, now: Timestamp) {
        self.paused_since.get_or_insert(now);
    }

    pub fn unpause(&mut self, now: Timestamp) {
        if let Some(since) = self.paused_since.take() {
            self.paused_ns += now.saturating_since(since).as_nanos() as u64;
        }
    }

    pub fn times(&self, now: Timestamp) -> PhaseTimes {
        let ns = |from: Option<Timestamp>, to: Option<Timestamp>| match (from, to) {
            (Some(from), Some(to)) => to.saturating_since(from).as_nanos() as u64,
            _ => 0,
        };
        let first = self.first_event;
        PhaseTimes {
            setup_ns: ns(first, self.handshake_done),
            precopy_ns: ns(self.handshake_done, self.stopped),
            downtime_ns: ns(self.stopped, self.started),
            postcopy_ns: ns(self.started, Some(now)),
            paused_ns: self.paused_ns,
            total_ns: ns(first, Some(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_latencies_are_exact_many_go_to_the_histogram() {
        let mut latency = LatencyHistogram::default();
        assert_eq!(latency.summary(), LatencySummary::default());
        for us in [5_u64, 1, 3, 2, 4] {
            latency.record_ns(us * 1000);
        }
        let summary = latency.summary();
        assert_eq!((summary.count, summary.p50_us, summary.p90_us, summary.max_us), (5, 3.0, 5.0, 5.0));
        assert_eq!(summary.mean_us, 3.0);
        for us in 6..=200_u64 {
            latency.record_ns(us * 1000);
        }
        let summary = latency.summary();
        assert_eq!(summary.count, 200);
        assert!((summary.p50_us - 100.0).abs() < 0.2, "{summary:?}");
        assert!((summary.p99_us - 198.0).abs() < 0.3, "{summary:?}");
        assert!((summary.max_us - 200.0).abs() < 0.3, "{summary:?}");
        // Clones share the histogram until one of them records.
        let mut copy = latency.clone();
        copy.record_ns(1);
        assert_eq!(latency.summary().count, 200);
        assert_eq!(copy.summary().count, 201);
    }
}
