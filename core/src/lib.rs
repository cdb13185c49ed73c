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
//!   64 MiB of bookkeeping on the source in pure postcopy (sent and queued
//!   bits; up to 128 MiB in hybrid mode after a recovery: stale and lost
//!   bits) and 32 MiB on the destination (present bits).
//!
//! The state diagrams are in the docs of [`source`] and [`destination`].

#![forbid(unsafe_code)]

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

pub mod admission;
pub mod bitmap;
pub mod channel;
pub mod config;
pub mod destination;
pub mod error;
pub mod fallback;
pub mod layout;
mod link;
pub mod outcome;
#[cfg(feature = "planted-bugs")]
pub mod plant;
pub mod source;
pub mod stats;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod time;
mod timer;
pub mod wire;

pub use admission::{Admission, ConnectionId, MAX_PROVISIONAL_PER_CHANNEL};
pub use channel::{Channel, PushStream, MAX_PUSH_STREAMS};
pub use config::{Config, Mode};
pub use destination::{Destination, DestinationAction, DestinationState, Waiter};
pub use error::{EventError, MigrationError, ProtocolError};
pub use fallback::{Checkpoint, FallbackConfig};
pub use layout::{LayoutError, PageAddress, PageNumber, RamBlock, RamLayout};
pub use outcome::{Finished, Notice, Side};
#[cfg(feature = "planted-bugs")]
pub use plant::PlantedBug;
pub use source::{DeferredPage, GuestMemory, Source, SourceAction, SourceState};
pub use stats::{DestinationStats, LatencySummary, SourceStats};
pub use time::Timestamp;
pub use wire::WireError;
