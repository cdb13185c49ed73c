//! The guest's own history, and what counts as breaking docs/protocol.md.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::layout::PageNumber;

/// A broken invariant, with what was seen.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Violation {
    /// Invariant 1: the destination's guest read a page that does not hold
    /// the newest content of the guest's history.
    StaleRead { page: u64, expected: u64, found: Option<u64> },
    /// Invariant 1: the source's guest read a page older than the newest
    /// content (it ran again after the destination wrote).
    SourceStaleRead { page: u64, expected: u64, found: u64 },
    /// Invariant 1: at completion a page is missing or not the newest.
    WrongPageAtEnd { page: u64, expected: u64, found: Option<u64> },
    /// A page's bytes are not a valid content of that page.
    CorruptPage { page: u64 },
    /// A page was made visible with fewer or more bytes than its block's
    /// page size: a huge page must be installed whole.
    HalfFilledPage { page: u64, bytes: u64, page_size: u32 },
    /// The core asked to install over a present page without `overwrite`.
    InstallOverPresent { page: u64 },
    /// Invariant 2: both sides run the guest.
    TwoRunners,
    /// Invariant 2: the source resumed the guest after transmitting StartGuest.
    SourceResumedAfterStart,
    /// Invariant 4: pure postcopy without a lost connection sent a page twice.
    PageSentTwice { sent: u64, pages: u64 },
    /// Invariant 5: a queue grew past its bound.
    QueueOverBound { queue: String, len: u64, bound: u64 },
    /// The destination got device state different from what the source sent.
    DeviceStateMismatch,
    /// A core refused an event the harness delivered as a driver should.
    DriverEvent { error: String },
    /// Invariant 3: a fair run without faults did not complete in time.
    NoProgress { detail: String },
    /// A healed run ended in failure.
    MigrationFailed { side: String, error: String },
    /// One side completed and the other failed.
    Disagreement { detail: String },
    /// A connection carried frames in an order the protocol does not allow
    /// (its opening frame first, a present report whole and in order...).
    FrameOrder { channel: crate::channel::Channel, detail: String },
    /// A connection from a peer of another migration changed the
    /// destination, or made it do more than close that connection.
    StrangerChangedState { channel: crate::channel::Channel },
    /// Invariant 7: after a takeover the source's memory is not exactly the
    /// guest at the last committed checkpoint's instant.
    RollbackMismatch { checkpoint: u64, page: u64, expected: u64, found: u64 },
    /// Invariant 7: after a takeover the source was given another device
    /// state than the last committed checkpoint's.
    RollbackDeviceState { checkpoint: u64 },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// The newest content version of every page in the guest's history,
/// wherever the guest ran.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Oracle {
    latest: Vec<u64>,
    next_version: u64,
}

impl Oracle {
    /// A guest whose pages all start zero (version 0).
    pub fn new(pages: u64) -> Self {
        Self { latest: vec![0; pages as usize], next_version: 1 }
    }

    /// Records a write by the guest and returns the new content's version.
    pub fn write(&mut self, page: PageNumber) -> u64 {
        let version = self.next_version;
        self.next_version += 1;
        self.latest[page.0 as usize] = version;
        version
    }

    pub fn latest(&self, page: PageNumber) -> u64 {
        self.latest[page.0 as usize]
    }

    /// The newest version of every page: the guest at this instant.
    pub fn image(&self) -> Vec<u64> {
        self.latest.clone()
    }

    /// The guest restarted from `image` (a fallback takeover): its history
    /// goes back to that instant.
    pub fn roll_back(&mut self, image: &[u64]) {
        self.latest.copy_from_slice(image);
    }

    pub fn pages(&self) -> u64 {
        self.latest.len() as u64
    }
}
