//! The destination side's driver. See the module docs of [`super`] for
//! threads. By job: `guest` builds the machine, loads the device state and
//! starts the vCPUs; `install` places pages; `fault` is the fault thread;
//! `verify` checks the guest after the migration and reports. Their shared
//! data is in `state` (options, the driver struct each job extends, the
//! machine, the timeline, the operations), their errors in `error`, the
//! test-only damage switch in `damage`: the jobs import those, never this
//! module. Here: running a migration, the core's operations, accepting
//! connections and reading them.

mod checkpoint;
mod damage;
mod error;
mod fallback_state;
mod fault;
mod guest;
mod install;
mod state;
mod verify;

pub use checkpoint::{COPY_ON_WRITE_HEAD_START_ENV, DIE_AFTER_CHECKPOINT_ENV};
pub use damage::{Damage, DamageError, DAMAGE_ENV};
pub use error::{BuildError, DestinationError};
pub use guest::LoadError;
pub use state::DestinationOptions;
pub use verify::{check_running_guest, VerifyError};

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Scope;
use std::time::Duration;

use hdrhistogram::Histogram;
use postcopy_core::wire::PageData;
use postcopy_core::{Channel, DeferredPage, Destination, DestinationAction, Timestamp};

use super::clock::now;
use super::digest::MemoryDigest;
use super::framing::{read_frames_until_closed, FrameAligner};
use super::machine::MachineDescription;
use super::net::Connection;
use super::placement::{pin_self, set_policy, Boost};
use super::report::DestinationReport;
use super::security::{Acceptor, AdmissionError, SourceIdentity};
use super::shell::{spawn, LockedCore, Shell, SideDriver};
use super::sync::Doorbell;
use super::watch::{ListenerSlot, Watch};
use crate::devices::lock;
use crate::error::error_chain;
use crate::layout::PAGE_SIZE;
use crate::runner::VcpuSet;
use crate::vm::Vm;
use state::{DestinationDriver, DestinationOp, InstallCounters, Timeline};

/// Bytes read per receive on the main channel.
const MAIN_READ_BYTES: usize = 256 * 1024;
/// Bytes read per receive on the urgent channel.
const URGENT_READ_BYTES: usize = 64 * 1024;
/// Bytes read per receive on the return path (only the source's farewell).
const RETURN_READ_BYTES: usize = 4096;
/// Bytes of frames the return path writes per system call at most.
const RETURN_WRITE_BYTES: usize = 64 * 1024;
/// Receive buffers a main or urgent reader touches before the first huge
/// page arrives (the reader and the installer hold two at a time).
const WARM_BUFFERS: usize = 3;
/// Room in a warm buffer beyond one huge page: a frame's header and what
/// a read may bring after it.
const WARM_BUFFER_MARGIN: usize = 64 * 1024;
/// How long the acceptor blocks in one poll (it checks for shutdown in between).
const ACCEPT_POLL: Duration = Duration::from_millis(50);
/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(50);

/// What the destination reports, and whether it succeeded.
#[derive(Debug)]
pub struct DestinationOutcome {
    /// The report (also for failures).
    pub report: DestinationReport,
}

/// A guest that arrived by a completed migration and keeps running in this
/// process ([`run_destination_kept`]): it can be checked, stopped, or
/// migrated onward as a source.
pub struct ArrivedGuest {
    /// The VM (its RAM no longer under userfaultfd: every page is here).
    pub vm: Vm,
    /// Its running vCPUs.
    pub vcpus: VcpuSet,
    /// What it is.
    pub machine: MachineDescription,
    /// Digest of the pages as installed (compare with the source's as sent).
    pub digest: MemoryDigest,
}

/// How a migration whose guest stays here ended.
pub struct KeptOutcome {
    /// The report (no run-after check: the guest keeps running).
    pub report: DestinationReport,
    /// The guest, when the migration completed.
    pub guest: Option<ArrivedGuest>,
}

/// What the driver does once the core finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterMigration {
    /// Run the guest `run_after`, stop and check it (`postcopy dest`).
    CheckAndStop,
    /// Hand the running guest over ([`run_destination_kept`]).
    Keep,
}

/// Accepts a migration on `listener`, runs the guest after it, checks it,
/// and reports. Returns when the migration failed, or when the guest ran
/// `run_after` here and was checked.
pub fn run_destination(listener: TcpListener, opts: &DestinationOptions) -> DestinationOutcome {
    let (report, _) = run(Arc::new(ListenerSlot::new(listener)), opts, None, AfterMigration::CheckAndStop);
    DestinationOutcome { report }
}

/// Accepts a migration on the listener in `listener` (which the VMM may
/// close or replace meanwhile) with a VMM watching the core; once it
/// completed, hands the running guest over instead of checking and
/// stopping it (`opts.run_after` and `opts.dump_memory` are not used).
pub fn run_destination_kept(
    listener: Arc<ListenerSlot>,
    opts: &DestinationOptions,
    watch: Option<Arc<dyn Watch<Destination>>>,
) -> KeptOutcome {
    let (report, guest) = run(listener, opts, watch, AfterMigration::Keep);
    KeptOutcome { report, guest }
}

fn run(
    listener: Arc<ListenerSlot>,
    opts: &DestinationOptions,
    watch: Option<Arc<dyn Watch<Destination>>>,
    after: AfterMigration,
) -> (DestinationReport, Option<ArrivedGuest>) {
    let histogram = match Histogram::new_with_bounds(1, 3_600_000_000_000, 3) {
        Ok(h) => h,
        Err(e) => {
            let error = error_chain(&DestinationError::Histogram(e));
            return (DestinationReport { error: Some(error), ..Default::default() }, None);
        }
    };
    let mut driver = DestinationDriver {
        shell: Shell::new(
            Destination::new(opts.config.clone(), opts.tuning.page_bytes() as u32),
            opts.tuning.clone(),
            watch,
        ),
        opts,
        listener,
        acceptor: Acceptor::new(opts.security.clone(), opts.config.handshake_timeout),
        source_identity: SourceIdentity::default(),
        preparing: AtomicBool::new(false),
        machine: OnceLock::new(),
        vcpus: Mutex::new(None),
        running: Mutex::new(None),
        vcpu_tids: OnceLock::new(),
        finished: Mutex::new(None),
        finished_flag: AtomicBool::new(false),
        finished_bell: Doorbell::new(),
        return_bell: Doorbell::new(),
        fatal: Mutex::new(None),
        latency: Mutex::new(histogram),
        timeline: Timeline::default(),
        faults_read: AtomicU64::new(0),
        install_counters: InstallCounters::default(),
        vcpu_hold: Mutex::default(),
        fallback_log: Mutex::default(),
        copy_on_write: Mutex::new(None),
        checkpoint_buffers: opts.checkpoint_memory.clone(),
        parts_in_flight: Default::default(),
        part_hashes: Default::default(),
        staged_parts: Mutex::new(Default::default()),
    };
    let mut report = DestinationReport::default();
    std::thread::scope(|s| {
        let d = &driver;
        spawn(s, "dst-accept", move || d.accept_loop(s));
        spawn(s, "dst-timer", move || d.timer_loop(s));
        if opts.progress_bar {
            spawn(s, "dst-progress", move || d.progress_loop());
        }
        if opts.config.fallback.is_some() {
            spawn(s, "dst-return", move || d.return_writer_loop(s));
        }
        while !d.finished_flag.load(Ordering::SeqCst) {
            d.finished_bell.wait_timeout(Duration::from_millis(100));
        }
        // Every page is placed (allocated), or the migration failed: the
        // population has nothing left to do for it.
        let population = opts.population.as_ref().map(|p| p.stop());
        report = match after {
            AfterMigration::CheckAndStop => d.verify_and_report(),
            AfterMigration::Keep => d.report_kept(),
        };
        report.population = population;
        d.stop_all();
        d.return_bell.ring();
    });
    tracing::info!(ok = report.ok, error = report.error.as_deref(), "destination done");
    let running = lock(&driver.running).take();
    let machine = driver.machine.take();
    match (after, running, machine) {
        (AfterMigration::Keep, Some(vcpus), Some(m)) if report.ok => {
            // Every page is here: nothing more to serve.
            if let Err(e) = m.uffd.unregister_all() {
                tracing::warn!(e = error_chain(&e), "unregistering guest RAM from userfaultfd");
            }
            let guest = ArrivedGuest { vm: m.vm, vcpus, machine: m.desc, digest: report.digest };
            (report, Some(guest))
        }
        (_, running, _) => {
            if let Some(vcpus) = running {
                if let Err(e) = vcpus.stop() {
                    tracing::warn!(e = error_chain(&e), "stopping the vCPUs");
                }
            }
            (report, None)
        }
    }
}

impl SideDriver for DestinationDriver<'_> {
    type Core = Destination;
    type Op = DestinationOp;
    const SIDE: &'static str = "destination";
    const TIMER_THREAD: &'static str = "dst-timer";
    const FAREWELL_THREAD: &'static str = "dst-farewell";
    const FAULT_PATH_CHANNEL: Channel = Channel::Return;

    fn shell(&self) -> &Shell<Destination> {
        &self.shell
    }

    fn to_op(&self, l: &mut LockedCore<Destination>, action: DestinationAction) -> Option<DestinationOp> {
        Some(match action {
            DestinationAction::PrepareMemory(_) => {
                self.preparing.store(true, Ordering::Relaxed);
                DestinationOp::Prepare(l.core.machine_description().cloned().unwrap_or_default())
            }
            DestinationAction::InstallPage { page, data, overwrite } => {
                DestinationOp::Install { page, data, overwrite }
            }
            DestinationAction::PlacePagePart { page, offset, data } => {
                // Counted under the core lock: the page's install waits for it.
                self.parts_in_flight.handed_out(page.0);
                DestinationOp::PlacePart { page, offset, data }
            }
            DestinationAction::InstallPlacedPage { page } => DestinationOp::InstallPlaced { page },
            DestinationAction::DiscardPages { first, count } => DestinationOp::Discard { first, count },
            DestinationAction::LoadDeviceState(state) => DestinationOp::LoadDeviceState(state),
            DestinationAction::ResumeVcpus => DestinationOp::ResumeVcpus,
            DestinationAction::Wake(page) => DestinationOp::Wake(page),
            DestinationAction::Close(channel) => DestinationOp::Close(l.close(channel)?),
            DestinationAction::Farewell { channel, bytes } => DestinationOp::Close(l.farewell(channel, bytes)?),
            DestinationAction::PromoteConnection(id) => DestinationOp::Close(l.promote(id)?),
            DestinationAction::CloseConnection(id) => DestinationOp::Close(l.close_provisional(id)?),
            DestinationAction::Notice(notice) => DestinationOp::Notice(notice),
            DestinationAction::Finished(finished) => DestinationOp::Finished(finished),
            DestinationAction::FenceVcpus => DestinationOp::Fence,
            DestinationAction::TakeCheckpoint { seq } => DestinationOp::TakeCheckpoint(seq),
            DestinationAction::DiscardGuest => DestinationOp::DiscardGuest,
        })
    }

    fn execute<'s>(&'s self, s: &'s Scope<'s, '_>, ops: Vec<DestinationOp>) {
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            match op {
                DestinationOp::Prepare(machine) => self.prepare(s, &machine),
                DestinationOp::Install { page, data: PageData::Bytes(bytes), overwrite: false }
                    if self.batchable(page) =>
                {
                    let pages = self.install_batch(s, page, bytes, &mut ops);
                    self.install_counters.in_flight.done(pages);
                }
                DestinationOp::Install { page, data, overwrite } => {
                    self.install(s, page, data, overwrite);
                    self.install_counters.in_flight.done(1);
                }
                DestinationOp::PlacePart { page, offset, data } => self.place_part(page, offset, data),
                DestinationOp::InstallPlaced { page } => {
                    self.install_placed(s, page);
                    self.install_counters.in_flight.done(1);
                }
                DestinationOp::Discard { first, count } => self.discard(first, count),
                DestinationOp::LoadDeviceState(state) => {
                    Timeline::mark(&self.timeline.device_state_received_ns);
                    spawn(s, "dst-loader", move || self.load(s, state))
                }
                DestinationOp::ResumeVcpus => {
                    if self.timeline.start_received_ns.load(Ordering::SeqCst) == 0 {
                        Timeline::mark(&self.timeline.start_received_ns);
                    }
                    self.run_vcpus()
                }
                DestinationOp::Fence => self.fence(),
                DestinationOp::TakeCheckpoint(seq) => spawn(s, "dst-checkpoint", move || self.take_checkpoint(s, seq)),
                DestinationOp::DiscardGuest => self.discard_guest(),
                DestinationOp::Wake(page) => self.wake(page),
                DestinationOp::Close(op) => self.close_connection(s, op),
                DestinationOp::Notice(notice) => self.notice(&notice),
                DestinationOp::Finished(finished) => {
                    Timeline::mark(&self.timeline.end_ns);
                    // Only a guest that stays here needs its memory slots
                    // back without dirty logging. After a failure a kicked
                    // vCPU may still retry a missing page inside KVM_RUN,
                    // holding KVM's SRCU: a slot update would wait for it
                    // forever; the guest is abandoned instead.
                    if finished.result.is_ok() {
                        self.stop_checkpointing();
                    }
                    tracing::info!(result = ?finished.result, "the core finished");
                    *lock(&self.finished) = Some(*finished);
                    self.finished_flag.store(true, Ordering::SeqCst);
                    self.finished_bell.ring();
                }
            }
        }
        self.flush_fault_path(s);
    }

    /// The shell's drain, counting the installs it hands out (under the
    /// core lock, so that the EOC hold in [`SideDriver::poll_fault_path`]
    /// sees them): one atomic add per drain, not per page.
    fn drain(&self, l: &mut LockedCore<Destination>) -> Vec<DestinationOp> {
        // As the shell's drain: a watching VMM hears of every state change.
        self.shell.observe(l);
        let mut ops = Vec::new();
        let mut installs = 0;
        while let Some(action) = l.core.poll_action() {
            if let Some(op) = self.to_op(l, action) {
                installs +=
                    u64::from(matches!(op, DestinationOp::Install { .. } | DestinationOp::InstallPlaced { .. }));
                ops.push(op);
            }
        }
        self.install_counters.in_flight.handed_out(installs);
        ops
    }

    fn poll_fault_path(
        &self,
        l: &mut LockedCore<Destination>,
        buf: &mut Vec<u8>,
        _deferred: &mut Vec<DeferredPage>,
    ) -> Option<Arc<Connection>> {
        if self.preparing.load(Ordering::Relaxed) {
            return None;
        }
        // The EOC waits while an install may still fail: a failure must
        // reach the core (which then withdraws the EOC) before it leaves.
        // The installer's execute flushes again once its count is down.
        if l.core.eoc_queued() && self.install_counters.in_flight.any() {
            return None;
        }
        let conn = l.connection(Channel::Return).cloned();
        if conn.is_some() {
            if self.opts.config.fallback.is_none() || RETURN_WRITER.get() {
                let _ = l.core.poll_transmit(now(), Channel::Return, buf, RETURN_WRITE_BYTES);
            } else {
                // Checkpoints (tens of MiB) and the end of copy behind them
                // go out from the return writer, so that the thread that
                // flushes here, often the push's reader, never waits for
                // the source to take them.
                let _ = l.core.poll_transmit_urgent(now(), buf, RETURN_WRITE_BYTES);
                if l.core.return_bulk_pending() {
                    self.return_bell.ring();
                }
            }
        }
        conn
    }

    /// The destination sends no page contents.
    fn fill_deferred(&self, _deferred: &[DeferredPage], _buf: &mut [u8]) {}
}

thread_local! {
    /// Set in the return writer's thread ([`DestinationDriver::return_writer_loop`]).
    static RETURN_WRITER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl DestinationDriver<'_> {
    /// With fallback: the one thread that writes checkpoints and the end of
    /// copy on the return path (every thread flushes the rest after its
    /// events). Before it, the push's reader wrote whole checkpoints
    /// whenever its flush found them queued, blocked on the return path's
    /// small socket buffers while the push waited: 95 ms of a 1.28 s
    /// migration of 1 GiB (perf sched); after, none. It runs on the fault
    /// path's CPU, beside the vCPUs, as the checkpoints' copies do, away
    /// from the push's.
    fn return_writer_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        RETURN_WRITER.set(true);
        pin_self(self.shell.tuning.latency_cpu, "dst-return");
        set_policy(None, "dst-return");
        while !self.shell.is_stopping() {
            if self.return_bell.wait_timeout(Duration::from_millis(100)) {
                self.flush_fault_path(s);
            }
        }
    }

    fn accept_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        set_policy(None, "dst-accept");
        let mut polled: Option<Arc<TcpListener>> = None;
        while !self.shell.is_stopping() {
            // The VMM may have closed the listener or put another in place.
            let Some(listener) = self.listener.current() else {
                polled = None;
                std::thread::sleep(ACCEPT_POLL);
                continue;
            };
            if !polled.as_ref().is_some_and(|p| Arc::ptr_eq(p, &listener)) {
                if let Err(e) = listener.set_nonblocking(true) {
                    *lock(&self.fatal) = Some(DestinationError::Listener(e));
                    self.finish_with_fatal();
                    return;
                }
                polled = Some(listener.clone());
            }
            match crate::sys::poll_readable(&*listener, ACCEPT_POLL) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(%e, "poll on the listener");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            match listener.accept() {
                Ok((stream, peer)) => spawn(s, "dst-conn", move || self.serve_connection(s, stream, peer)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(%e, "accept"),
            }
        }
    }

    fn serve_connection<'s>(&'s self, s: &'s Scope<'s, '_>, stream: TcpStream, peer: SocketAddr) {
        let conn = match self.admit(stream, peer) {
            Ok(conn) => Arc::new(conn),
            Err(reason) => return self.refuse(peer, reason),
        };
        tracing::debug!(channel = %conn.channel, %peer, secure = conn.is_secure(), "accepted");
        self.opts.tuning.tune_socket(conn.socket(), conn.channel);
        conn.set_write_timeout(self.opts.config.peer_timeout);
        let accepted = conn.clone();
        let mut refused = None;
        self.event(s, |l, now| {
            // Again under the core lock, where the binding happens: a
            // migration bound since `admit` checked is checked here.
            if self.acceptor.is_secure() {
                if let Err(e) = self.source_identity.check(accepted.peer_identities()) {
                    refused = Some(e);
                    return;
                }
            }
            l.accept(now, accepted)
        });
        if let Some(reason) = refused {
            conn.shutdown();
            return self.refuse(peer, reason);
        }
        self.read_loop(s, conn);
    }

    /// A stranger changes nothing: its connection alone is refused (dropped
    /// by the caller) and the destination keeps waiting for its source, as
    /// the core does for bad bytes after a preamble.
    fn refuse(&self, peer: SocketAddr, reason: AdmissionError) {
        let e = DestinationError::Refused { peer, reason };
        let text = format!("refused a stranger: {}", error_chain(&e));
        tracing::warn!(side = "destination", "{text}");
        self.shell.record_notice(text);
    }

    /// The handshake (through the gate), the preamble and the proof; then,
    /// over TLS, the identity: a migration bound to a source takes
    /// connections from that source's identity only, and a return
    /// connection waits for the binding (it carries no hello to show).
    fn admit(&self, stream: TcpStream, peer: SocketAddr) -> Result<Connection, AdmissionError> {
        let (channel, transport) = self.acceptor.accept(stream, peer)?;
        if self.acceptor.is_secure() {
            let identity = &self.source_identity;
            if channel == Channel::Return && !identity.is_bound() {
                let wait = self.opts.config.handshake_timeout;
                if !identity.wait_bound(wait, || self.shell.is_stopping()) {
                    return Err(AdmissionError::Unbound(wait));
                }
            }
            identity.check(transport.peer_identities())?;
        }
        Ok(Connection::over(channel, transport))
    }

    /// Over TLS, once the core bound the migration (a main hello on `conn`):
    /// binds it to `conn`'s identity and drops the connections of any other
    /// identity that came before. Under the core lock.
    fn bind_source_identity(&self, l: &mut LockedCore<Destination>, now: Timestamp, conn: &Connection) {
        if !self.acceptor.is_secure() || self.source_identity.is_bound() || l.core.session_id().is_none() {
            return;
        }
        self.source_identity.bind(conn.peer_identities());
        let identity = &self.source_identity;
        for stranger in l.drop_connections(now, |c| identity.matches(c.peer_identities())) {
            if let Err(e) = identity.check(stranger.peer_identities()) {
                let text = format!("refused a stranger's {} connection: {}", stranger.channel, error_chain(&e));
                tracing::warn!(side = "destination", "{text}");
                self.shell.record_notice(text);
            }
            stranger.shutdown();
        }
    }

    fn read_loop<'s>(&'s self, s: &'s Scope<'s, '_>, conn: Arc<Connection>) {
        let tuning = &self.opts.tuning;
        let (max, spin, base) = match conn.channel {
            Channel::Main | Channel::Push(_) => {
                pin_self(tuning.bulk_cpu, "dst-main");
                (MAIN_READ_BYTES, Duration::ZERO, None)
            }
            Channel::Urgent => {
                pin_self(tuning.latency_cpu, "dst-urgent");
                // A requested huge page's header comes in a small read, and
                // the rest of it in one read into a kept, warm buffer
                // (framing); the core sees it whole, under one lock.
                (URGENT_READ_BYTES, tuning.spin(), tuning.rt_priority)
            }
            Channel::Return => (RETURN_READ_BYTES, Duration::ZERO, None),
        };
        set_policy(base, "dst-reader");
        // The main and urgent readers carry the switchover (device state,
        // StartGuest): boosted until the guest runs here.
        let mut boost = Boost::default();
        let boostable = conn.channel != Channel::Return;
        let mut apply_boost = |started: bool| {
            if conn.channel.push_stream().is_some() {
                boost.set_nice(tuning.rt_switchover, !started, tuning.bulk_nice, "dst-main");
            } else {
                boost.set(base, tuning.rt_switchover, boostable && !started, "dst-reader");
            }
        };
        apply_boost(lock(&self.shell.locked).core.guest_started());
        let binds = conn.channel == Channel::Main;
        let deliver = |bytes| {
            let mut started = None;
            self.event(s, |l, now| {
                if l.accepted_input(now, &conn, bytes) {
                    if binds {
                        self.bind_source_identity(l, now, &conn);
                    }
                    started = Some(l.core.guest_started());
                }
            });
            match started {
                Some(started) => {
                    apply_boost(started);
                    true
                }
                // The connection was replaced or refused: its successor's
                // reader goes on.
                None => false,
            }
        };
        // Whole frames only: a frame spanning reads (a 2 MiB page) is
        // received in place here, not copied under the core lock.
        let on_closed = || {
            self.event(s, |l, now| {
                if l.is_current(&conn) && !self.shell.is_stopping() && !l.core.state().is_terminal() {
                    let peer = conn.peer.map_or("?".to_string(), |p| p.to_string());
                    tracing::warn!("the {} connection from {peer} closed", conn.channel);
                }
                l.accepted_lost(now, &conn);
            })
        };
        // On huge pages, the first pages after the switchover land in
        // buffers touched now, not in fresh memory (module docs of framing).
        let page_bytes = tuning.frame_page_bytes() as usize;
        let aligner = if conn.channel != Channel::Return && page_bytes > PAGE_SIZE as usize {
            FrameAligner::warmed(page_bytes + WARM_BUFFER_MARGIN, WARM_BUFFERS)
        } else {
            FrameAligner::default()
        };
        read_frames_until_closed(&conn, max, spin, aligner, deliver, on_closed);
    }

    fn progress_loop(&self) {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        set_policy(None, "dst-progress");
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} pages present ({percent}%)")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("waiting for the source");
        while !self.shell.is_stopping() && !self.finished_flag.load(Ordering::SeqCst) {
            if let Some(m) = self.machine.get() {
                bar.set_length(m.installed.len());
                bar.set_position(m.installed.count());
                bar.set_message(format!("{} faults served", self.faults_read.load(Ordering::Relaxed)));
            }
            bar.tick();
            std::thread::sleep(PROGRESS_TICK);
        }
        if let Some(m) = self.machine.get() {
            bar.set_position(m.installed.count());
        }
        bar.finish_and_clear();
    }

    fn finish_with_fatal(&self) {
        self.finished_flag.store(true, Ordering::SeqCst);
        self.finished_bell.ring();
    }

    /// Ends every driver thread: connections, listener, fault thread, timer.
    /// A guest that did not complete here, or has a hole, is abandoned.
    fn stop_all(&self) {
        self.shell.stopping.store(true, Ordering::SeqCst);
        self.shell.shutdown_all();
        let running = lock(&self.running);
        let Some(m) = self.machine.get() else { return };
        if let Some(plan) = m.uffd.armed_install_fault() {
            tracing::warn!(?plan, "test-only install fault left unfired");
        }
        let hole = m.installed.first_clear().is_some();
        if running.is_none() || hole || lock(&self.finished).as_ref().is_none_or(|f| f.result.is_err()) {
            // Wake any thread still waiting for a page (a loader cut off
            // mid-way): the guest is abandoned here. Running vCPUs are
            // kicked first, so that none runs the guest on missing pages.
            let abandoned = match running.as_ref() {
                Some(vcpus) => vcpus.abandon(&m.uffd),
                None => m.uffd.unregister_all().map_err(crate::error::Error::from),
            };
            if let Err(e) = abandoned {
                tracing::warn!(e = error_chain(&e), "abandoning the guest");
            }
        }
    }
}
