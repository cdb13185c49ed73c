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
//!   starting the vCPUs), `destination::install` (placing pages, batching,
//!   the test-only damage switch), `destination::fault` (the fault thread)
//!   and `destination::verify` (the checks after the migration, the report).
//! - [`net`] (connections), [`machine`] (what the destination builds),
//!   [`digest`], [`report`], [`sync`] (lock-free pieces, checked with loom).
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
//! - `dst-accept`: accepts connections in any order, reads each preamble,
//!   and hands the connection to the core (`handle_connected`); keeps
//!   accepting for recoveries. A bad or missing preamble refuses that
//!   connection alone (a notice), like the core's refusal of a stranger.
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

pub mod digest;
pub mod framing;
pub mod install_faults;
pub mod machine;
pub mod net;
pub mod report;
pub mod sync;
pub mod watch;

mod destination;
mod shell;
mod source;

pub use destination::{
    check_running_guest, run_destination, run_destination_kept, ArrivedGuest, BuildError, Damage, DamageError,
    DestinationError, DestinationOptions, DestinationOutcome, KeptOutcome, LoadError, VerifyError, DAMAGE_ENV,
};
pub use source::{new_session_id, run_source, run_source_watched, SourceError, SourceOptions, SourceOutcome};

use std::time::Duration;

use postcopy_core::Timestamp;

/// Where the driver's threads run and how they wait.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tuning {
    /// CPU for the fault path (destination fault thread and urgent reader,
    /// source return-path reader).
    pub latency_cpu: Option<usize>,
    /// CPU for the bulk path (source main writer, destination main reader).
    pub bulk_cpu: Option<usize>,
    /// CPU for every vCPU thread.
    pub vcpu_cpu: Option<usize>,
    /// How long fault-path readers spin before blocking, in microseconds.
    pub spin_us: u64,
    /// Run the fault path's threads in `SCHED_FIFO` at this priority, so
    /// that a wake-up never waits behind other work on the CPU.
    pub rt_priority: Option<i32>,
    /// Run the switchover's threads (source main writer until the guest
    /// starts on the destination; destination main and urgent readers and
    /// the device-state loader until then) in `SCHED_FIFO` at this
    /// priority, and in the normal policy after: the downtime then does not
    /// wait for other work on the CPUs.
    pub rt_switchover: Option<i32>,
    /// Nice value of the bulk path's threads (source main writer,
    /// destination main reader) in postcopy: above 0, the guest's vCPUs get
    /// the CPU first and the background push takes what is left.
    pub bulk_nice: i32,
    /// TCP congestion control of every connection (None: the system's).
    /// The pacing of BBR, a common system default, runs from timer
    /// interrupts that land on whichever thread holds the CPU, fault path
    /// included; see the README.
    pub tcp_congestion: Option<String>,
    /// Send and receive buffer of the main channel's sockets, in bytes
    /// (None: the kernel autotunes them, up to megabytes). A page requested
    /// just after the background push sent it is not sent again: the fault
    /// waits for everything queued ahead of it on the main channel, so this
    /// bounds the slowest faults.
    pub main_socket_buffer: Option<usize>,
    /// Back guest RAM with huge pages of this size (None: 4 KiB pages). The
    /// migration then moves whole huge pages; both sides must agree.
    #[serde(default)]
    pub hugepages: Option<crate::hugepages::HugePageSize>,
}

impl Tuning {
    /// Bytes of the pages guest RAM is backed with and the migration moves.
    pub fn page_bytes(&self) -> u64 {
        self.hugepages.map_or(crate::layout::PAGE_SIZE, crate::hugepages::HugePageSize::bytes)
    }

    pub(crate) fn spin(&self) -> Duration {
        Duration::from_micros(self.spin_us)
    }

    /// Applies the socket settings to a new connection for `channel` (a
    /// failure is logged: the connection works with the system's settings).
    pub fn tune_socket(&self, stream: &std::net::TcpStream, channel: postcopy_core::Channel) {
        if let Some(name) = &self.tcp_congestion {
            if let Err(e) = crate::sys::set_tcp_congestion(stream, name) {
                tracing::warn!(%e, name, "cannot set the TCP congestion control");
            }
        }
        if let (postcopy_core::Channel::Main, Some(bytes)) = (channel, self.main_socket_buffer) {
            if let Err(e) = crate::sys::set_socket_buffers(stream, bytes) {
                tracing::warn!(%e, bytes, "cannot set the main channel's socket buffers");
            }
        }
    }
}

/// Pins the calling thread, when asked (a failure is logged, not fatal).
pub(crate) fn pin_self(cpu: Option<usize>, what: &str) {
    if let Some(cpu) = cpu {
        if let Err(e) = crate::sys::pin_thread(0, cpu) {
            tracing::warn!(%e, cpu, what, "cannot pin thread");
        }
    }
}

/// Places a fault-path thread: its CPU, and real-time priority if asked.
pub(crate) fn latency_thread(tuning: &Tuning, what: &str) {
    pin_self(tuning.latency_cpu, what);
    set_policy(tuning.rt_priority, what);
}

/// Sets the calling thread's scheduling policy: `SCHED_FIFO` at `priority`,
/// or the normal policy (threads inherit their creator's policy, so every
/// driver thread sets its own).
pub(crate) fn set_policy(priority: Option<i32>, what: &str) {
    if let Err(e) = crate::sys::set_realtime(0, priority) {
        if priority.is_some() {
            tracing::warn!(%e, what, "cannot change the scheduling policy");
        }
    }
}

/// A thread's real-time boost during the switchover, changed only when it
/// must change.
#[derive(Debug)]
pub(crate) struct Boost {
    on: bool,
    first_nice: bool,
}

impl Default for Boost {
    fn default() -> Self {
        Self { on: false, first_nice: true }
    }
}

impl Boost {
    /// Runs the calling thread at `boosted` (when `Some`) while `want`, and
    /// at `base` otherwise.
    pub(crate) fn set(&mut self, base: Option<i32>, boosted: Option<i32>, want: bool, what: &str) {
        let want = want && boosted.is_some();
        if want != self.on {
            self.on = want;
            set_policy(if want { boosted } else { base }, what);
        }
    }

    /// As [`Boost::set`], and when not boosted, runs at nice value `nice`.
    pub(crate) fn set_nice(&mut self, boosted: Option<i32>, want: bool, nice: i32, what: &str) {
        let before = self.on;
        self.set(None, boosted, want, what);
        if before && !self.on || self.first_nice {
            self.first_nice = false;
            if let Err(e) = crate::sys::set_nice(if self.on { 0 } else { nice }) {
                tracing::warn!(%e, what, "cannot change the nice value");
            }
        }
    }
}

/// The driver's clock: `CLOCK_MONOTONIC`, shared by every process of a host.
pub fn now() -> Timestamp {
    Timestamp(crate::sys::monotonic_ns())
}

/// `error` and its sources, as one line ("a: b: c"). A source whose text
/// its parent already shows (errors that print their cause) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_shows_every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(error_chain(&e), "outer: middle: inner");
    }
}
