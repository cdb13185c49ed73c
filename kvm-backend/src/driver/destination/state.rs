//! The destination driver's state: its options, the struct that each job's
//! module (`guest`, `install`, `fault`, `verify`, and the connections in
//! the parent) extends with its own methods, the machine it builds, its
//! timeline and its operations. Data only: every module of the destination
//! imports this one, and this one imports none of them.

use crate::driver::checkpoint_memory::CheckpointMemory;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use postcopy_core::wire::PageData;
use postcopy_core::{Config, Destination, DestinationStats, Finished, Notice, PageNumber};

use super::damage::Damage;
use super::error::DestinationError;
use crate::devices::SerialOutput;
use crate::driver::clock::now;
use crate::driver::digest::PageDigests;
use crate::driver::machine::{MachineDescription, PageMap};
use crate::driver::placement::Tuning;
use crate::driver::security::{Acceptor, ChannelSecurity, SourceIdentity};
use crate::driver::shell::{ConnectionOp, Shell};
use crate::driver::sync::{Doorbell, FaultClock, InstallsInFlight, PageBits};
use crate::driver::watch::ListenerSlot;
use crate::memory::GuestRam;
use crate::runner::VcpuSet;
use crate::uffd::UffdRam;
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// How to run the destination.
#[derive(Clone, Debug)]
pub struct DestinationOptions {
    /// The core's settings.
    pub config: Config,
    /// Thread placement and polling.
    pub tuning: Tuning,
    /// Where the guest's serial port writes.
    pub serial: SerialOutput,
    /// How long the guest runs here after the migration before it is checked.
    pub run_after: Duration,
    /// Write guest RAM here after the migration (guest stopped).
    pub dump_memory: Option<PathBuf>,
    /// Test-only damage to one page.
    pub damage: Option<Damage>,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress_bar: bool,
    /// Guest RAM allocated ahead of the migration, in shared memory
    /// ([`GuestRam::new_preallocated`], or [`GuestRam::new_unpopulated`]
    /// populated in the background), for the layout the source is expected
    /// to send; None: anonymous RAM allocated when the machine description
    /// arrives.
    pub preallocated: Option<Arc<GuestRam>>,
    /// The background population of `preallocated`
    /// ([`crate::driver::populate::preallocate`]; None: allocated up front, or not
    /// preallocated): stopped when the migration ends, and reported.
    pub population: Option<Arc<crate::driver::populate::Population>>,
    /// Account vCPU blocktime and remote fault latency here (QMP's
    /// `postcopy-blocktime` capability); None: not measured.
    pub blocktime: Option<Arc<crate::driver::blocktime::Blocktime>>,
    /// Plain TCP or mutual TLS (and a migration secret).
    pub security: ChannelSecurity,
    /// Fallback: where checkpoints are copied (reserved ahead, kept).
    pub checkpoint_memory: CheckpointMemory,
}

/// What the destination builds for the guest when the hello arrives.
pub(super) struct Machine {
    pub(super) desc: MachineDescription,
    pub(super) ram: Arc<GuestRam>,
    pub(super) uffd: UffdRam,
    /// Fallback: RAM registered for write-protect faults, so checkpoints
    /// copy on write ([`crate::driver::placement::CheckpointCopy::WriteProtect`]).
    pub(super) write_protect: bool,
    pub(super) vm: Vm,
    pub(super) map: PageMap,
    pub(super) installed: PageBits,
    pub(super) digests: PageDigests,
    pub(super) clock: FaultClock,
}

/// What the installing threads count, for the report.
#[derive(Debug, Default)]
pub(super) struct InstallCounters {
    /// Installs that failed or found the page already there.
    pub(super) anomalies: AtomicU64,
    /// Wall time in the calls that placed pages, summed over the installers.
    pub(super) busy_ns: AtomicU64,
    /// Installs drained from the core and not yet carried out (added under
    /// the core lock): the EOC waits for them, as a failure must reach the
    /// core before it leaves.
    pub(super) in_flight: InstallsInFlight,
}

/// When the switchover's steps happened (monotonic ns, 0: not yet).
#[derive(Debug, Default)]
pub(super) struct Timeline {
    /// The whole device state received (loading starts).
    pub(super) device_state_received_ns: AtomicU64,
    /// The device state loaded.
    pub(super) device_state_loaded_ns: AtomicU64,
    /// StartGuest received (the vCPU threads start).
    pub(super) start_received_ns: AtomicU64,
    /// The vCPUs started.
    pub(super) resume_ns: AtomicU64,
    /// The core finished.
    pub(super) end_ns: AtomicU64,
}

impl Timeline {
    pub(super) fn mark(at: &AtomicU64) {
        at.store(now().0, Ordering::SeqCst);
    }
}

/// What the destination's driver does for the core, resolved while the
/// core lock is held.
pub(super) enum DestinationOp {
    Prepare(Bytes),
    Install {
        page: PageNumber,
        data: PageData,
        overwrite: bool,
    },
    /// A part of a page arriving in parts: into the placement mapping.
    PlacePart {
        page: PageNumber,
        offset: u32,
        data: Bytes,
    },
    /// Every part placed: map the page whole.
    InstallPlaced {
        page: PageNumber,
    },
    Discard {
        first: PageNumber,
        count: u64,
    },
    LoadDeviceState(Bytes),
    ResumeVcpus,
    Wake(PageNumber),
    Close(ConnectionOp),
    Notice(Notice),
    Finished(Box<Finished<DestinationStats>>),
    /// Fallback: the lease lapsed.
    Fence,
    /// Fallback: take this checkpoint.
    TakeCheckpoint(u64),
    /// Fallback: the source took the guest back.
    DiscardGuest,
}

/// The destination's driver: the shell, the machine once built, the vCPUs,
/// the verdict, and what the report needs.
pub(super) struct DestinationDriver<'a> {
    pub(super) shell: Shell<Destination>,
    pub(super) opts: &'a DestinationOptions,
    /// Where connections are accepted (a VMM may close it or move it).
    pub(super) listener: Arc<ListenerSlot>,
    /// Bounds connections in their handshake; runs TLS and the preamble.
    pub(super) acceptor: Acceptor,
    /// The TLS identity the migration is bound to, once bound.
    pub(super) source_identity: SourceIdentity,
    /// The machine is being built: nothing goes out on the return path
    /// (the welcome would let the source stop its guest before this side
    /// can take it). Read and written only under the core lock.
    pub(super) preparing: AtomicBool,
    pub(super) machine: OnceLock<Machine>,
    /// The vCPUs, created with the machine, until they start.
    pub(super) vcpus: Mutex<Option<Vec<Vcpu>>>,
    /// The vCPU threads, once started.
    pub(super) running: Mutex<Option<VcpuSet>>,
    pub(super) vcpu_tids: OnceLock<Vec<i32>>,
    pub(super) finished: Mutex<Option<Finished<DestinationStats>>>,
    pub(super) finished_flag: AtomicBool,
    pub(super) finished_bell: Doorbell,
    /// Fallback: rung when the return path has checkpoint frames or the
    /// end of copy for its writer.
    pub(super) return_bell: Doorbell,
    pub(super) fatal: Mutex<Option<DestinationError>>,
    /// Fault read to page in place, ns.
    pub(super) latency: Mutex<Histogram<u64>>,
    pub(super) timeline: Timeline,
    pub(super) faults_read: AtomicU64,
    pub(super) install_counters: InstallCounters,
    /// Fallback: who holds the vCPUs stopped (lock it before `running`).
    pub(super) vcpu_hold: Mutex<super::fallback_state::VcpuHold>,
    /// Fallback: checkpoints and fences, for the report.
    pub(super) fallback_log: Mutex<super::fallback_state::FallbackLog>,
    /// Fallback: the checkpoint being copied on write, if any.
    pub(super) copy_on_write: Mutex<Option<super::fallback_state::CopyOnWrite>>,
    /// The checkpoints' copy buffer, kept between checkpoints.
    pub(super) checkpoint_buffers: CheckpointMemory,
    /// Pages arriving in parts: parts handed out and not placed yet.
    pub(super) parts_in_flight: crate::driver::sync::PartsInFlight,
    /// Pages arriving in parts: their parts' hashes, for the digest.
    pub(super) part_hashes: crate::driver::digest::PartHashes,
    /// Pages arriving in parts that cannot be placed in guest RAM before
    /// they are mapped (RAM without a placement mapping, or parts smaller
    /// than 4 KiB): their bytes so far.
    pub(super) staged_parts: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
}
