//! Checkers: separate from the simulation, they watch it and never steer it.
//!
//! They hold the guest's own history (the newest content version of every
//! page, wherever the guest ran) and check docs/protocol.md's invariants as the
//! simulation reports what happens:
//!
//! 1. no page lost: every destination read sees the newest version; when
//!    the guest starts on the destination every present page is newest;
//!    pages installed after that are newest; at COMPLETED every page is
//!    present and newest; the source's guest never reads an old version;
//! 2. one runner: never both sides at once, and the source never resumes
//!    after transmitting StartGuest;
//! 3. EOC reaches COMPLETED (liveness, checked by the simulation's deadline);
//! 4. each page crosses once: a page frame sent in postcopy (background or
//!    requested) while an earlier postcopy copy of the page was delivered or
//!    is still in flight is a second crossing (copies that the network
//!    dropped with a lost connection do not count);
//! 5. bounded queues: the source's request queue, the destination's
//!    outstanding faults and every socket buffer stay within their bounds.
//!
//! Any protocol error is a violation too: the simulated network never
//! corrupts bytes, so one means the two cores disagree.

use serde::Serialize;
use std::fmt;

use crate::guest::MISSING;

/// A broken invariant, with what was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Violation {
    StaleRead {
        page: u64,
        expected: u64,
        found: Option<u64>,
    },
    SourceStaleRead {
        page: u64,
        expected: u64,
        found: u64,
    },
    StaleAtStart {
        page: u64,
        expected: u64,
        found: u64,
    },
    StaleInstall {
        page: u64,
        expected: u64,
        found: u64,
    },
    WrongPageAtEnd {
        page: u64,
        expected: u64,
        found: Option<u64>,
    },
    CorruptPage {
        page: u64,
    },
    /// A huge page made visible without all of its bytes from one version.
    HalfFilledHugePage {
        page: u64,
        bytes: u64,
        page_bytes: u64,
    },
    InstallOverPresent {
        page: u64,
        guest_started: bool,
    },
    DiscardWhileRunning {
        page: u64,
    },
    TwoRunners,
    SourceResumedAfterStart,
    PageSentTwice {
        page: u64,
        kind: &'static str,
    },
    QueueOverBound {
        queue: String,
        len: u64,
        bound: u64,
    },
    DeviceStateMismatch,
    DriverEvent {
        side: &'static str,
        error: String,
    },
    ProtocolError {
        side: &'static str,
        error: String,
    },
    TimerLivelock {
        side: &'static str,
        at_ns: u64,
    },
    NoProgress {
        detail: String,
    },
    MigrationFailed {
        detail: String,
    },
    Disagreement {
        detail: String,
    },
    /// Invariant 7: after a takeover the source's memory is not the guest
    /// at the last committed checkpoint's instant.
    RollbackMismatch {
        checkpoint: u64,
        page: u64,
        expected: u64,
        found: u64,
    },
    /// Invariant 7: the takeover's device state is not the checkpoint's, or
    /// no image of that instant was recorded.
    RollbackDeviceState {
        checkpoint: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// Which side's guest acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    Source,
    Destination,
}

/// What the checkers need to see of the world after each step.
#[derive(Clone, Copy, Debug)]
pub struct StepView {
    pub source_running: bool,
    pub destination_running: bool,
    pub source_queue: u64,
    pub destination_faults: u64,
    pub max_outstanding: u64,
    pub max_buffered: u64,
    pub buffer_bound: u64,
}

/// The checkers and the guest's history.
#[derive(Clone, Debug)]
pub struct Checkers {
    latest: Vec<u64>,
    next_version: u64,
    /// Postcopy copies of each page sent and not dropped, this attempt.
    alive: Vec<u8>,
    /// Per page pushed in parts, a bit for each part of its copy sent, and
    /// the copy's page kind.
    parts: std::collections::HashMap<u64, (u64, u8)>,
    /// Fallback: the guest's image at each instant the source may restart
    /// it from (0: the stop; then each checkpoint), pruned to those not
    /// older than the last commit: at most three.
    images: Vec<(u64, Vec<u64>)>,
    pub violations: Vec<Violation>,
}

impl Checkers {
    pub fn new(pages: u64) -> Self {
        Self {
            latest: vec![0; pages as usize],
            next_version: 1,
            alive: vec![0; pages as usize],
            parts: std::collections::HashMap::new(),
            images: Vec::new(),
            violations: Vec::new(),
        }
    }

    /// Fallback: the guest's image now is the one checkpoint `seq` (0: the
    /// stop) captures; images older than `committed` are dropped.
    pub fn record_image(&mut self, seq: u64, committed: u64) {
        self.images.retain(|(s, _)| *s >= committed && *s != seq);
        self.images.push((seq, self.latest.clone()));
    }

    /// Fallback: the source restarted the guest from checkpoint
    /// `checkpoint` with `memory` (invariant 7); the guest's history is
    /// that image's from now on.
    pub fn took_over(&mut self, checkpoint: u64, memory: &[u64], device_state_matches: bool) {
        if !device_state_matches {
            self.flag(Violation::RollbackDeviceState { checkpoint });
        }
        let Some(image) = self.images.iter().find(|(s, _)| *s == checkpoint).map(|(_, i)| i.clone()) else {
            self.flag(Violation::RollbackDeviceState { checkpoint });
            return;
        };
        if let Some(page) = (0..image.len()).find(|&p| memory.get(p) != Some(&image[p])) {
            let found = memory.get(page).copied().unwrap_or(MISSING);
            self.flag(Violation::RollbackMismatch { checkpoint, page: page as u64, expected: image[page], found });
        }
        self.latest = image;
    }

    fn flag(&mut self, violation: Violation) {
        if self.violations.len() < 16 {
            self.violations.push(violation);
        }
    }

    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// A guest write: the new content's version.
    pub fn write(&mut self, page: u64) -> u64 {
        let version = self.next_version;
        self.next_version += 1;
        self.latest[page as usize] = version;
        version
    }

    pub fn latest(&self, page: u64) -> u64 {
        self.latest[page as usize]
    }

    /// A guest read of `found` (invariant 1).
    pub fn read(&mut self, side: Where, page: u64, found: u64) {
        let expected = self.latest[page as usize];
        if found != expected {
            self.flag(match side {
                Where::Source => Violation::SourceStaleRead { page, expected, found },
                Where::Destination => {
                    Violation::StaleRead { page, expected, found: (found != MISSING).then_some(found) }
                }
            });
        }
    }

    /// A page installed on the destination. `guest_started`: the guest has
    /// run there, so only the newest content may arrive.
    pub fn install(
        &mut self,
        page: u64,
        version: Option<u64>,
        was_present: bool,
        overwrite: bool,
        guest_started: bool,
    ) {
        let Some(version) = version else {
            self.flag(Violation::CorruptPage { page });
            return;
        };
        if (was_present && !overwrite) || (overwrite && guest_started) {
            self.flag(Violation::InstallOverPresent { page, guest_started });
        }
        if guest_started && version != self.latest[page as usize] {
            self.flag(Violation::StaleInstall { page, expected: self.latest[page as usize], found: version });
        }
    }

    /// A page of the huge-page block is being made visible with `bytes`:
    /// it must be all `page_bytes` of it, of one version (checked before
    /// [`Checkers::install`], which checks the version).
    pub fn huge_install(&mut self, page: u64, bytes: u64, page_bytes: u64, version: Option<u64>) {
        if bytes != page_bytes || version.is_none() {
            self.flag(Violation::HalfFilledHugePage { page, bytes, page_bytes });
        }
    }

    pub fn discard(&mut self, page: u64, guest_started: bool) {
        if guest_started {
            self.flag(Violation::DiscardWhileRunning { page });
        }
    }

    /// The guest starts on the destination: every present page is newest.
    pub fn guest_started(&mut self, memory: &[u64]) {
        if let Some((page, &found)) = memory.iter().enumerate().find(|&(p, &v)| v != MISSING && v != self.latest[p]) {
            let page = page as u64;
            self.flag(Violation::StaleAtStart { page, expected: self.latest[page as usize], found });
        }
    }

    /// The destination reached COMPLETED: every page present and newest.
    pub fn completed(&mut self, memory: &[u64]) {
        let bad = (0..self.latest.len()).find(|&p| memory.get(p).copied().unwrap_or(MISSING) != self.latest[p]);
        if let Some(page) = bad {
            let found = memory.get(page).copied().filter(|&v| v != MISSING);
            self.flag(Violation::WrongPageAtEnd { page: page as u64, expected: self.latest[page], found });
        }
    }

    /// A page frame entered a connection (invariant 4). `kind`: the wire's
    /// page kind code (0 precopy, 1 background, 2 requested).
    pub fn page_sent(&mut self, page: u64, kind: u8) {
        if kind == 0 {
            return;
        }
        let alive = &mut self.alive[page as usize];
        if *alive > 0 {
            let kind = if kind == 1 { "background" } else { "requested" };
            *alive = alive.saturating_add(1);
            self.flag(Violation::PageSentTwice { page, kind });
            return;
        }
        *alive = 1;
    }

    /// Part `part` of a page pushed in parts entered a connection: its first
    /// part is a copy of the page (invariant 4 as for a page frame); a part
    /// sent again while the copy lives is a second crossing.
    pub fn part_sent(&mut self, page: u64, part: u32, kind: u8) {
        let bit = 1u64.checked_shl(part).unwrap_or(0);
        let (mask, _) = self.parts.entry(page).or_insert((0, kind));
        if *mask == 0 {
            *mask = bit;
            self.page_sent(page, kind);
        } else if *mask & bit != 0 || bit == 0 {
            let kind = if kind == 1 { "background" } else { "requested" };
            self.flag(Violation::PageSentTwice { page, kind });
        } else {
            *mask |= bit;
        }
    }

    /// A part was lost with its connection: the destination drops the
    /// incomplete page, so this copy is void (the page goes again).
    pub fn part_dropped(&mut self, page: u64, kind: u8) {
        if self.parts.remove(&page).is_some_and(|(mask, _)| mask != 0) {
            self.page_dropped(page, kind);
        }
    }

    /// The destination paused: it drops the parts it holds of pages not
    /// complete (`memory`: not present), so those copies are void and the
    /// pages go again after the recovery, whether or not a part of them
    /// was lost in flight.
    pub fn destination_paused(&mut self, memory: &[u64]) {
        let void: Vec<(u64, u8)> = self
            .parts
            .iter()
            .filter(|&(&page, &(mask, _))| mask != 0 && memory.get(page as usize).is_none_or(|&v| v == MISSING))
            .map(|(&page, &(_, kind))| (page, kind))
            .collect();
        for (page, kind) in void {
            self.parts.remove(&page);
            self.page_dropped(page, kind);
        }
    }

    /// A page frame was lost with its connection.
    pub fn page_dropped(&mut self, page: u64, kind: u8) {
        if kind != 0 {
            let alive = &mut self.alive[page as usize];
            *alive = alive.saturating_sub(1);
        }
    }

    /// A new migration attempt starts from scratch.
    pub fn new_attempt(&mut self) {
        self.alive.fill(0);
        self.parts.clear();
    }

    /// Invariants 2 and 5, after every step.
    pub fn step(&mut self, view: StepView) {
        if view.source_running && view.destination_running {
            self.flag(Violation::TwoRunners);
        }
        let bounds = [
            ("source request queue", view.source_queue, view.max_outstanding),
            ("destination outstanding faults", view.destination_faults, view.max_outstanding),
            ("socket buffer", view.max_buffered, view.buffer_bound),
        ];
        for (queue, len, bound) in bounds {
            if len > bound {
                self.flag(Violation::QueueOverBound { queue: queue.into(), len, bound });
            }
        }
    }

    pub fn source_resumed(&mut self, past_start: bool) {
        if past_start {
            self.flag(Violation::SourceResumedAfterStart);
        }
    }

    pub fn device_state(&mut self, matches: bool) {
        if !matches {
            self.flag(Violation::DeviceStateMismatch);
        }
    }

    pub fn driver_event(&mut self, side: &'static str, error: String) {
        self.flag(Violation::DriverEvent { side, error });
    }

    pub fn protocol_error(&mut self, side: &'static str, error: String) {
        self.flag(Violation::ProtocolError { side, error });
    }

    pub fn timer_livelock(&mut self, side: &'static str, at_ns: u64) {
        self.flag(Violation::TimerLivelock { side, at_ns });
    }

    pub fn no_progress(&mut self, detail: String) {
        self.flag(Violation::NoProgress { detail });
    }

    pub fn migration_failed(&mut self, detail: String) {
        self.flag(Violation::MigrationFailed { detail });
    }

    pub fn disagreement(&mut self, detail: String) {
        self.flag(Violation::Disagreement { detail });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catches_stale_reads_and_double_sends() {
        let mut c = Checkers::new(4);
        let v = c.write(1);
        c.read(Where::Destination, 1, v);
        assert!(c.ok());
        c.page_sent(2, 1);
        c.page_dropped(2, 1);
        c.page_sent(2, 2);
        assert!(c.ok());
        c.page_sent(2, 1);
        assert!(matches!(c.violations[0], Violation::PageSentTwice { page: 2, .. }));
        c.read(Where::Destination, 1, MISSING);
        assert!(matches!(c.violations[1], Violation::StaleRead { page: 1, found: None, .. }));
        c.completed(&[0, v, 0, MISSING]);
        assert!(matches!(c.violations[2], Violation::WrongPageAtEnd { page: 3, .. }));
    }

    #[test]
    fn a_destination_pause_voids_only_incomplete_pages_in_parts() {
        let mut c = Checkers::new(4);
        // Page 1: two of its parts delivered, none in flight; page 2: every
        // part delivered and the page installed.
        c.part_sent(1, 0, 1);
        c.part_sent(1, 1, 1);
        c.part_sent(2, 0, 1);
        c.part_sent(2, 1, 1);
        c.destination_paused(&[MISSING, MISSING, 7, MISSING]);
        // The destination dropped page 1's parts: it goes again.
        c.part_sent(1, 0, 1);
        assert!(c.ok(), "{:?}", c.violations);
        // Page 2 is there: a second copy is a second crossing.
        c.part_sent(2, 0, 1);
        assert!(matches!(c.violations[..], [Violation::PageSentTwice { page: 2, .. }]), "{:?}", c.violations);
    }
}
