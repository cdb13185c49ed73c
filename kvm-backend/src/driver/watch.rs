//! What a long-running VMM sees of a migration while it runs, and how it
//! steers one: a [`Watch`] hears of every change of the core's state and
//! gets a sample of the core every [`SAMPLE_INTERVAL`] from the timer
//! thread, and hands the driver the user's requests (cancel, switch to
//! postcopy).
//!
//! Cost on the fault path: one comparison of the core's state per event
//! (the watch is called only when it changed, a few times per migration).
//! Samples are taken by the timer thread in the hold of the core lock it
//! takes anyway, so a client polling the VMM never touches the core lock.

use std::time::Duration;

use postcopy_core::Timestamp;

/// How often the timer thread samples the core for a watch, at most.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// What the user asks of a running migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserRequest {
    /// Give up before the switchover; the guest keeps running on the source.
    Cancel,
    /// Stop the precopy rounds and switch to postcopy now (source only).
    SwitchToPostcopy,
}

/// A VMM's view of one side's core. Called with the core lock held: every
/// method must return at once (no waiting on a lock a QMP client may hold
/// long, no I/O).
pub trait Watch<C>: Send + Sync {
    /// The core's state changed (seen after an event or a transmit poll).
    fn state_changed(&self, core: &C, now: Timestamp);
    /// A periodic look at the core (statistics for `query-migrate`).
    fn sample(&self, core: &C, now: Timestamp);
    /// The user's next request, if any (polled by the timer thread).
    fn take_request(&self) -> Option<UserRequest>;
}
