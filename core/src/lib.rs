//! Sans-IO core of postcopy live migration.
//!
//! Two state machines, [`Source`] and [`Destination`], and the wire codec
//! ([`wire`]) they speak. Nothing here opens a socket, starts a thread, reads
//! a clock, draws a random number or maps guest memory: drivers feed events
//! (`handle_*`: bytes from a channel, a page fault, a timer, a lost
//! connection, a user command) and carry out what the cores ask (`poll_*`:
//! frames to write, pages to install, vCPUs to stop or resume, timers to
//! arm). The KVM backend, the simulator, the model checker and the fuzzers
//! all drive these same two types.
//!
//! Rules for drivers, after str0m and quinn-proto:
//! - after every `handle_*` call, drain `poll_action` and carry the actions
//!   out in order, then call `poll_transmit` for channels that can take
//!   bytes, and re-arm the timer from `poll_timeout`;
//! - time is an argument ([`Timestamp`]), never read inside;
//! - per-page state lives in bitmaps, so a 1 TiB guest of 4 KiB pages needs
//!   about 128 MiB of bookkeeping on the source and 64 MiB on the destination.
//!
//! The state diagrams are in the docs of [`source`] and [`destination`].

#[cfg(feature = "planted-bugs")]
macro_rules! planted {
    ($config:expr, $bug:ident) => {
        $config.plant == Some($crate::plant::PlantedBug::$bug)
    };
}

#[cfg(not(feature = "planted-bugs"))]
macro_rules! planted {
    ($config:expr, $bug:ident) => {
        false
    };
}

pub mod bitmap;
pub mod channel;
pub mod config;
pub mod destination;
pub mod error;
pub mod layout;
mod link;
#[cfg(feature = "planted-bugs")]
pub mod plant;
pub mod source;
pub mod stats;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
mod timer;
pub mod wire;

use serde::{Deserialize, Serialize};

pub use channel::Channel;
pub use config::{Config, Mode};
pub use destination::{Destination, DestinationAction, DestinationState, Waiter};
pub use error::{EventError, LayoutError, MigrationError, ProtocolError, WireError};
pub use layout::{PageAddress, PageNumber, RamBlock, RamLayout};
#[cfg(feature = "planted-bugs")]
pub use plant::PlantedBug;
pub use source::{DeferredPage, GuestMemory, Source, SourceAction, SourceState};
pub use stats::{DestinationStats, LatencySummary, SourceStats};
pub use time::Timestamp;

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
    ConnectionRefused { channel: crate::Channel, error: ProtocolError },
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
