//! The production driver: runs `postcopy_core::Source` / `Destination`
//! against the VMM layer over TCP. It makes no protocol decisions: it turns
//! socket reads, userfaultfd faults, timers and vCPU events into core events
//! and carries out the core's actions.
//!
//! # Modules
//!
//! - `shell`: what both sides share. The core and the table of current
//!   connections under one mutex (`LockedCore`); one event at a time
//!   (`SideDriver::event`); the timer thread; a lost connection; the
//!   farewell; the try-lock flush of the fault path's outgoing channel.
//!   Generic over the core (`ProtocolCore`, implemented here for
//!   `postcopy_core::Source` and `Destination`) and the side.
//! - `source`: the source's operations: connecting, the bulk writer,
//!   stopping the vCPUs and capturing their state, dirty logging.
//! - `destination`: accepting and reading connections; by job in
//!   `destination::guest` (building the machine, loading the device state,
//!   starting the vCPUs), `destination::install` (placing pages, batching),
//!   `destination::fault` (the fault thread) and `destination::verify` (the
//!   checks after the migration, the report); their shared data in
//!   `destination::state`, their errors in `destination::error`, the
//!   test-only damage switch in `destination::damage`.
//! - `placement` ([`Tuning`]: CPUs, scheduling policy, the switchover's
//!   boost, socket settings), `clock` ([`now`]).
//! - [`net`] (connections), [`machine`] (what the destination builds),
//! - [`security`]: plain TCP or mutual TLS; how the source connects and
//!   the destination admits, and the identity a migration is bound to.
//!   [`digest`], [`report`], [`sync`] (lock-free pieces, checked with loom).
//!
//! Imports point down or sideways, never up: this module only declares and
//! re-exports, and a module imports its siblings, not its parent
//! (`scripts/module-cycles` checks every crate).
//! - [`watch`]: how a long-running VMM (`crate::vmm`) follows a migration
//!   (state changes, samples from the timer thread) and steers it (cancel,
//!   switch to postcopy) without touching the fault path;
//!   [`run_destination_kept`] hands the arrived guest over instead of
//!   checking and stopping it.
//!
//! # Threads and what they own
//!
//! Each side keeps its core and the table of current connections under one
//! mutex (`LockedCore`); a thread locks it for one event (a few
//! microseconds), drains the actions into driver operations while still
//! holding it (so a `Close` names exactly the connection the core meant),
//! then carries them out with the lock released. Lock order: a channel's
//! write lock, then the core lock; nobody takes a write lock while holding
//! the core lock.
//!
//! Source:
//! - `src-bulk`: writes the main channel (hello, precopy pages, discards,
//!   device state, background pages): gathers frames in 32 KiB steps under
//!   the core lock, writes 256 KiB at a time without it.
//! - one reader per connection; the return path's reader handles requests
//!   and writes the urgent channel itself (no hand-off on the fault path).
//! - `src-timer`: the core's timers; connector threads for `Connect`.
//! - the vCPU threads of the running guest (paused at the switchover).
//!
//! Destination:
//! - `dst-accept`: accepts connections in any order; a `dst-conn` thread
//!   per connection takes it through the handshake gate, TLS (unless
//!   `--insecure`), its preamble and migration-secret proof
//!   ([`security::Acceptor`]), checks its TLS identity against the source
//!   the migration is bound to, and hands it to the core
//!   (`handle_accepted`): current, or provisional until its hello shows
//!   this migration's id (the core then promotes or closes it). Keeps
//!   accepting for recoveries. A connection that fails any step is refused
//!   alone (a notice), like the core's refusal of a stranger.
//! - one reader per connection: the main channel's installs precopy and
//!   background pages; the urgent channel's installs requested pages.
//! - `dst-fault`: reads userfaultfd faults, turns them into
//!   `handle_page_fault` and writes the requests on the return path itself.
//! - `dst-loader`: loads the device state while faults are served.
//! - `dst-timer`, and a progress bar.
//!
//! Shared outside the core lock: [`sync::PageBits`] (pages installed),
//! [`sync::FaultClock`] (fault start times), [`sync::Doorbell`] (work for
//! the bulk writer), [`sync::InstallsInFlight`] (installs the end of copy
//! waits for), all checked with loom.
//!
//! # Placement and polling
//! [`Tuning`] pins the fault path (destination fault thread and urgent
//! reader, source return reader) and the bulk path to CPUs, and lets the
//! fault-path readers spin on non-blocking receives for a while before they
//! block: on this machine a wake-up across CPUs costs about 30 us.

pub mod blocktime;
pub mod checkpoint_memory;
pub mod digest;
pub mod framing;
pub mod install_faults;
pub mod machine;
pub mod net;
pub mod populate;
pub mod report;
pub mod security;
pub mod sync;
pub mod watch;

mod clock;
mod destination;
mod fallback_image;
mod placement;
mod shell;
mod source;

pub use destination::{
    check_running_guest, run_destination, run_destination_kept, ArrivedGuest, BuildError, Damage, DamageError,
    DestinationError, DestinationOptions, DestinationOutcome, KeptOutcome, LoadError, VerifyError,
    COPY_ON_WRITE_HEAD_START_ENV, DAMAGE_ENV, DIE_AFTER_CHECKPOINT_ENV,
};
pub use security::{ChannelSecurity, ConnectError, TlsSettings};
pub use source::{
    new_session_id, run_source, run_source_watched, ReportedGuest, SourceError, SourceOptions, SourceOutcome,
};

pub use crate::error::error_chain;
pub use clock::now;
pub use placement::{pin_self, CheckpointCopy, Tuning};
