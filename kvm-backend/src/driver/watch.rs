//! What a long-running VMM sees of a migration while it runs, and how it
//! steers one: a [`Watch`] hears of every change of the core's state and
//! gets a sample of the core every [`SAMPLE_INTERVAL`] from the timer
//! thread, and hands the driver the user's requests (cancel, switch to
//! postcopy, pause, resume) and hears how the core took them. A
//! destination's [`ListenerSlot`] lets the VMM close its listener or open
//! another one (QMP's `migrate-recover`) while the migration runs.
//!
//! Cost on the fault path: one comparison of the core's state per event
//! (the watch is called only when it changed, a few times per migration).
//! Samples are taken by the timer thread in the hold of the core lock it
//! takes anyway, so a client polling the VMM never touches the core lock.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postcopy_core::{EventError, Timestamp};

use crate::devices::lock;

/// How often the timer thread samples the core for a watch, at most.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(20);

/// What the user asks of a running migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserRequest {
    /// Give up before the switchover; the guest keeps running on the source.
    Cancel,
    /// Stop the precopy rounds and switch to postcopy now (source only).
    SwitchToPostcopy,
    /// Pause a postcopy migration: its connections close, and (on the
    /// source) no reconnection is tried until [`UserRequest::Resume`].
    Pause,
    /// Reconnect a paused migration now, to this address (source only).
    Resume(SocketAddr),
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
    /// How the core took `request` (called by the timer thread after the
    /// event, without the core lock).
    fn request_handled(&self, _request: UserRequest, _result: &Result<(), EventError>) {}
}

/// Where a destination accepts connections, changeable while it runs: the
/// VMM closes it (manual recovery: nothing listens while paused) or puts a
/// listener on another address in its place (`migrate-recover`). The
/// accept loop looks at it before each poll (every 50 ms at most).
#[derive(Debug, Default)]
pub struct ListenerSlot {
    current: Mutex<Option<Arc<TcpListener>>>,
}

impl ListenerSlot {
    /// A slot holding `listener`.
    pub fn new(listener: TcpListener) -> Self {
        Self { current: Mutex::new(Some(Arc::new(listener))) }
    }

    /// The listener to accept on now, if any.
    pub fn current(&self) -> Option<Arc<TcpListener>> {
        lock(&self.current).clone()
    }

    /// Accept on `listener` from now on; the one it replaces stops
    /// listening once the accept loop lets go of it.
    pub fn replace(&self, listener: TcpListener) {
        *lock(&self.current) = Some(Arc::new(listener));
    }

    /// Stop listening (the socket closes once the accept loop lets go of it).
    pub fn close(&self) {
        lock(&self.current).take();
    }

    /// Whether a listener is in place.
    pub fn is_listening(&self) -> bool {
        lock(&self.current).is_some()
    }
}
