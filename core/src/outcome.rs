//! What a core tells its driver besides actions: how a migration ended
//! ([`Finished`], on which [`Side`] the guest lives) and what the user should
//! hear on the way ([`Notice`]).

use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::error::{MigrationError, ProtocolError};

/// One of the two hosts of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Source,
    Destination,
}

/// How a migration ended, as one side saw it.
///
/// Comparisons and hashes look at `result` and `guest_on` only: statistics
/// are observations, not part of what happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Finished<S> {
    /// `Ok` when the migration completed.
    pub result: Result<(), MigrationError>,
    /// Where the guest lives now.
    pub guest_on: Side,
    pub stats: S,
}

/// Something worth telling the user while the migration goes on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Notice {
    /// Connections were lost after the switchover: both sides keep their
    /// memory and wait for a new connection.
    Paused { reason: MigrationError },
    /// The source tries to reconnect (attempts count from 1).
    RecoveryAttempt { attempt: u32 },
    /// The migration was abandoned before StartGuest left and the guest runs
    /// on the source again; the source reconnects only to tell the
    /// destination to drop its copy.
    Withdrawing { reason: MigrationError },
    /// A recovery attempt ended without success; another follows.
    RecoveryFailed { attempt: u32, reason: MigrationError },
    /// The migration resumed on new connections.
    Recovered { epoch: u32 },
    /// A connection was refused for bad bytes or a wrong hello while nothing
    /// was at stake (paused, or already completed); the migration goes on.
    ConnectionRefused { channel: Channel, error: ProtocolError },
    /// A connection that had not shown this migration's identity sent
    /// garbage, another migration's id or a hello that does not fit: it was
    /// closed alone, and nothing else changed (also: no identity shown
    /// within the handshake timeout, before any migration was bound).
    StrangerRefused { channel: Channel, reason: MigrationError },
    /// Fallback, destination: the lease lapsed; the vCPUs are stopped until
    /// a grant renews it (or for good, if the source takes the guest back).
    Fenced,
    /// Fallback, destination: a grant renewed a lapsed lease; the vCPUs run again.
    LeaseRestored,
    /// Fallback, source: a checkpoint is committed: the guest restarts from
    /// it if the destination is lost.
    CheckpointCommitted { seq: u64 },
    /// Fallback, source: the destination was silent past its lease; the
    /// guest restarted here from checkpoint `checkpoint` (0: the switchover's state).
    TookOver { checkpoint: u64 },
}

impl<S> PartialEq for Finished<S> {
    fn eq(&self, other: &Self) -> bool {
        self.result == other.result && self.guest_on == other.guest_on
    }
}

impl<S> Eq for Finished<S> {}

impl<S> std::hash::Hash for Finished<S> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.result.hash(state);
        self.guest_on.hash(state);
    }
}
