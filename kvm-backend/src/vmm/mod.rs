//! The VMM of `postcopy run`: one guest, kept running until `quit`, driven
//! over QMP ([`postcopy_qmp::Vmm`]). It migrates its guest out (`migrate`,
//! the source driver in a background thread), takes a guest in
//! (`--incoming`, `migrate-incoming`, the destination driver, which hands
//! the running guest over once the migration completed), and can do both
//! again and again: a guest that arrived can leave, a process whose guest
//! left can take one in.
//!
//! QMP costs the migration nothing on its fault path: the driver tells a
//! [`Watch`] of each change of the core's state (a few per migration) and
//! lets the timer thread sample the statistics every
//! [`crate::driver::watch::SAMPLE_INTERVAL`]; `query-migrate` reads that
//! sample and never takes the core's lock. The mapping of our states to
//! QEMU's is in [`status`].
//!
//! Lock order: the core lock (held by the driver when it calls a watch),
//! then [`KvmVmm`]'s state lock, then a migration's snapshot lock. QMP
//! commands take only the last two. `stop` and `x-postcopy-verify` hold
//! the state lock while they pause the guest (bounded by the vCPUs'
//! control timeout), which they do only while no migration runs: no
//! driver thread then calls a watch that would wait for it.

pub mod guest;
pub mod status;
pub mod tls;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postcopy_core::{
    Config, Destination, DestinationState, EventError, FallbackConfig, Mode, Source, SourceState, Timestamp,
};
use postcopy_qmp::command::parse_tcp_uri;
use postcopy_qmp::{
    Event, EventSink, MigrateArgs, MigrateIncomingArgs, MigrationCapability, MigrationCapabilityStatus, MigrationInfo,
    MigrationParameters, MigrationStats, MigrationStatus, QmpError, RunState, ShutdownCause, StatusInfo, XPostcopyInfo,
};
use serde_json::{json, Value};

use crate::devices::{lock, SerialOutput};
use crate::driver::blocktime::Blocktime;
use crate::driver::checkpoint_memory::CheckpointMemory;
use crate::driver::populate;
use crate::driver::report::{CheckpointCounters, DestinationReport, SourceReport};
use crate::driver::watch::{ListenerSlot, UserRequest, Watch};
use crate::driver::{self, error_chain, Damage, DestinationOptions, SourceOptions, Tuning};
use crate::layout::MemoryMap;
use crate::memory::MemoryError;
pub use guest::{BootError, GuestSpec, LiveGuest};

/// The capabilities this VMM can turn on, and their defaults (QEMU's
/// defaults are all off; ours are what the engine does).
const CAPABILITY_DEFAULTS: [(MigrationCapability, bool); 7] = [
    (MigrationCapability::Events, false),
    (MigrationCapability::PostcopyRam, true),
    (MigrationCapability::PostcopyBlocktime, false),
    (MigrationCapability::PostcopyPreempt, true),
    (MigrationCapability::XPostcopyPrepaging, true),
    (MigrationCapability::XPostcopyAutoRecover, true),
    // On when `run --fallback checkpoint` was given; this and the two
    // above follow `--no-urgent` and `--no-prepaging` (see `KvmVmm::new`).
    (MigrationCapability::XPostcopyFallback, false),
];

/// How far back the guest's progress before a migration is measured.
const PROGRESS_WINDOW_NS: u64 = 300_000_000;
/// How long a command waits for the migration to take its request (the
/// timer thread looks every 10 ms).
const REQUEST_WAIT: Duration = Duration::from_secs(2);
/// The fallback's lease and checkpoint interval, in milliseconds, as QMP's
/// `x-fallback-lease-ms` / `x-checkpoint-interval-ms` and the command
/// line's `--lease-ms` / `--checkpoint-interval-ms` take them: a lease of
/// 0 would fence the guest at once, and an hour is past any use.
pub const FALLBACK_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=3_600_000;

/// How the process runs its migrations.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    /// Thread placement and socket settings of every migration.
    pub tuning: Tuning,
    /// The core's settings (the mode, channels and timeouts come from the
    /// capabilities and parameters at each `migrate`).
    pub base: Config,
    /// Where an arriving guest's serial port writes.
    pub serial: SerialOutput,
    /// Allocate an arriving guest's RAM (this many bytes) before each
    /// incoming migration listens (`--prealloc`).
    pub prealloc_bytes: Option<u64>,
    /// Test-only damage to one page of every arriving guest
    /// (`POSTCOPY_TEST_DAMAGE`), to show the checks catch it.
    pub damage: Option<Damage>,
    /// Plain TCP or mutual TLS on every migration's connections.
    pub security: driver::ChannelSecurity,
    /// Fallback: the checkpoints' memory, shared by every migration of the
    /// process (reserved by `run` when its command line turns fallback on).
    pub checkpoint_memory: CheckpointMemory,
    /// Bytes of it to reserve when QMP turns fallback on (0: none ahead).
    pub checkpoint_reserve: u64,
    /// The lease and checkpoint interval of a migration with fallback on:
    /// the command line's (`--lease-ms`, `--checkpoint-interval-ms`) or
    /// their defaults, whether the command line or QMP turned fallback on.
    pub fallback_settings: FallbackConfig,
}

/// Where the process stands with respect to an incoming migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Incoming {
    /// Not waiting for one.
    No,
    /// Waiting for `migrate-incoming` (`--incoming defer`, a failed
    /// incoming migration, or a guest that left).
    Deferred,
    /// Listening or receiving.
    Started,
}

/// Which way a migration goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Outgoing,
    Incoming,
}

/// What `query-migrate` shows of one migration, updated by the driver's
/// watch and the migration's thread.
#[derive(Debug, Default)]
struct Snapshot {
    status: Option<MigrationStatus>,
    ram: Option<MigrationStats>,
    total_time_ms: Option<u64>,
    setup_time_ms: Option<u64>,
    downtime_ms: Option<u64>,
    error: Option<String>,
    x: XPostcopyInfo,
    /// The report of an incoming migration that ended, for
    /// `x-postcopy-verify`.
    destination_report: Option<DestinationReport>,
    /// The report of an outgoing migration that ended.
    source_report: Option<SourceReport>,
}

/// One migration, either way.
struct Job {
    direction: Direction,
    started: Instant,
    /// MIGRATION and MIGRATION_PASS events (the `events` capability when
    /// it started).
    events: bool,
    /// `x-postcopy-auto-recover` when it started: off, a paused
    /// destination stops listening until `migrate-recover`.
    auto_recover: bool,
    cancel_requested: AtomicBool,
    request: Mutex<Option<UserRequest>>,
    /// How the core took the last request a command waits for.
    outcome: Mutex<Option<Result<(), String>>>,
    outcome_signal: Condvar,
    /// Incoming: where it accepts connections.
    listener: Option<Arc<ListenerSlot>>,
    /// Incoming: `migrate-recover` opened a listener since the last pause.
    recover_listening: AtomicBool,
    /// Outgoing: the last MIGRATION_PASS sent.
    passes_sent: AtomicU64,
    /// Incoming, with `postcopy-blocktime`: the blocktime accounts.
    blocktime: Option<Arc<Blocktime>>,
    /// Incoming: the source's fallback terms arrived (fallback is on for
    /// this migration; the destination's own setting alone does not say).
    fallback_on: AtomicBool,
    /// Outgoing: after a fallback takeover, the guest runs here again and
    /// `query-status` / `query-migrate` say so.
    restarted: AtomicBool,
    /// Outgoing, with fallback: checkpoints committed and dropped so far.
    checkpoint_counters: Arc<CheckpointCounters>,
    snapshot: Mutex<Snapshot>,
}

impl Job {
    fn new(direction: Direction, state: &State, listener: Option<Arc<ListenerSlot>>) -> Job {
        Job {
            direction,
            started: Instant::now(),
            events: Shared::capability(state, MigrationCapability::Events),
            auto_recover: Shared::capability(state, MigrationCapability::XPostcopyAutoRecover),
            cancel_requested: AtomicBool::new(false),
            request: Mutex::new(None),
            outcome: Mutex::new(None),
            outcome_signal: Condvar::new(),
            listener,
            recover_listening: AtomicBool::new(false),
            passes_sent: AtomicU64::new(0),
            blocktime: None,
            fallback_on: AtomicBool::new(false),
            restarted: AtomicBool::new(false),
            checkpoint_counters: Arc::default(),
            snapshot: Mutex::new(Snapshot { status: Some(MigrationStatus::Setup), ..Default::default() }),
        }
    }

    /// Hands `request` to the migration and waits (bounded) for the core's
    /// answer. Called without the VMM's state lock: the driver takes it
    /// (through the watch) while it handles the request.
    fn submit(&self, request: UserRequest) -> Result<(), String> {
        let mut outcome = lock(&self.outcome);
        *outcome = None;
        *lock(&self.request) = Some(request);
        let deadline = Instant::now() + REQUEST_WAIT;
        loop {
            if let Some(result) = outcome.take() {
                return result;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                lock(&self.request).take();
                return Err("the migration did not take the request in time".into());
            }
            outcome = self.outcome_signal.wait_timeout(outcome, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// The driver's answer to the last request.
    fn handled(&self, result: &Result<(), EventError>) {
        *lock(&self.outcome) = Some(result.clone().map_err(|e| e.to_string()));
        self.outcome_signal.notify_all();
    }

    fn status(&self) -> Option<MigrationStatus> {
        lock(&self.snapshot).status
    }

    fn is_running(&self) -> bool {
        self.status().is_some_and(MigrationStatus::is_running)
    }
}

struct State {
    run_state: RunState,
    guest: Option<Arc<LiveGuest>>,
    incoming: Incoming,
    capabilities: BTreeMap<MigrationCapability, bool>,
    parameters: MigrationParameters,
    job: Option<Arc<Job>>,
    quit: bool,
    /// The current incoming migration ends the process if it fails
    /// (`migrate-incoming`'s `exit-on-error`).
    exit_on_error: bool,
    /// The process ends because an incoming migration failed.
    failed_exit: bool,
}

struct Shared {
    config: VmmConfig,
    state: Mutex<State>,
    quit_signal: Condvar,
    events: Arc<dyn EventSink>,
    /// `object-add`'s TLS objects.
    tls: tls::TlsObjects,
}

/// The VMM; share it (`Arc`) with the QMP server.
pub struct KvmVmm {
    shared: Arc<Shared>,
}

/// Why `--dump-memory` failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The guest's vCPUs did not stop.
    #[error("cannot stop the guest to dump its memory")]
    Stop(#[source] crate::error::Error),
    /// The file could not be created.
    #[error("cannot create the memory dump {}", .0.display())]
    Create(std::path::PathBuf, #[source] std::io::Error),
    /// The file could not be written.
    #[error("cannot write the memory dump {}", .0.display())]
    Write(std::path::PathBuf, #[source] MemoryError),
}

/// Why the VMM could not start.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The guest did not boot.
    #[error("cannot boot the guest")]
    Boot(#[source] BootError),
    /// The incoming migration could not start.
    #[error("cannot wait for the incoming migration: {0}")]
    Incoming(QmpError),
}

impl Shared {
    /// The security of a migration going `way`: the QMP parameters'
    /// `tls-creds` if set, the command line's otherwise.
    fn security(&self, state: &State, way: tls::Way<'_>) -> Result<driver::ChannelSecurity, QmpError> {
        let timeout = self.config.base.handshake_timeout;
        Ok(self.tls.security(&state.parameters, way, timeout)?.unwrap_or_else(|| self.config.security.clone()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Changes the guest's run state, with QEMU's STOP / RESUME events.
    fn set_run_state(&self, state: &mut State, run_state: RunState) {
        let was = std::mem::replace(&mut state.run_state, run_state);
        if let Some(event) = Event::for_run_state_change(was, run_state) {
            self.events.emit(event);
        }
    }

    /// Sets a migration's status, with a MIGRATION event when it changed.
    /// The event is queued under the snapshot's lock: a client that sees
    /// the status in `query-migrate` has the event before the reply, as
    /// with QEMU.
    fn set_status(&self, job: &Job, status: MigrationStatus) {
        let mut snapshot = lock(&job.snapshot);
        if snapshot.status != Some(status) {
            snapshot.status = Some(status);
            if job.events {
                self.events.emit(Event::Migration { status });
            }
        }
    }

    /// Fallback was turned on: reserves the checkpoints' memory in a thread
    /// of its own (touching it takes a while with the guest running; a
    /// migration started meanwhile uses what is kept then, and fresh
    /// memory past it).
    fn reserve_checkpoint_memory(&self) {
        let (memory, bytes) = (self.config.checkpoint_memory.clone(), self.config.checkpoint_reserve);
        if bytes == 0 || memory.kept_bytes() as u64 >= bytes {
            return;
        }
        let spawned = std::thread::Builder::new().name("vmm-reserve".into()).spawn(move || {
            let took = memory.reserve(usize::try_from(bytes).unwrap_or(usize::MAX));
            tracing::info!(mib = bytes >> 20, ms = took.as_millis() as u64, "checkpoint memory reserved");
        });
        if let Err(e) = spawned {
            tracing::warn!(%e, "cannot start reserving the checkpoint memory: checkpoints take fresh memory");
        }
    }

    fn capability(state: &State, capability: MigrationCapability) -> bool {
        state.capabilities.get(&capability).copied().unwrap_or(false)
    }

    /// The core's settings for the next migration.
    fn core_config(&self, state: &State) -> Config {
        let p = &state.parameters;
        let mut config = self.config.base.clone();
        let rounds = u32::try_from(p.x_precopy_rounds.unwrap_or(0)).unwrap_or(u32::MAX);
        config.mode = if rounds == 0 { Mode::Postcopy } else { Mode::Hybrid { precopy_rounds: rounds } };
        config.urgent_channel = Shared::capability(state, MigrationCapability::PostcopyPreempt);
        config.prepaging = Shared::capability(state, MigrationCapability::XPostcopyPrepaging);
        config.auto_reconnect = Shared::capability(state, MigrationCapability::XPostcopyAutoRecover);
        config.fallback = Shared::capability(state, MigrationCapability::XPostcopyFallback).then(|| {
            let mut fallback = self.config.fallback_settings.clone();
            if let Some(ms) = p.x_fallback_lease_ms {
                fallback.lease = Duration::from_millis(ms);
            }
            if let Some(ms) = p.x_checkpoint_interval_ms {
                fallback.checkpoint_interval = Duration::from_millis(ms);
            }
            fallback
        });
        if let Some(batch) = p.x_request_batch_pages {
            config.request_batch_pages = batch.clamp(1, u64::from(u32::MAX)) as u32;
        }
        if let Some(ms) = p.x_peer_timeout_ms {
            config.peer_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(ms) = p.x_reconnect_delay_max_ms {
            config.reconnect_delay_max = Duration::from_millis(ms).max(config.reconnect_delay_min);
        }
        if let Some(streams) = p.x_push_streams {
            config.push_streams = streams.clamp(1, u64::from(postcopy_core::MAX_PUSH_STREAMS)) as u8;
        }
        config
    }

    /// Starts listening for a migration on `uri` and receives it in a
    /// thread of its own.
    fn start_incoming(self: &Arc<Self>, state: &mut State, uri: &str) -> Result<(), QmpError> {
        let addr = resolve(uri)?;
        let listener =
            TcpListener::bind(addr).map_err(|e| QmpError::generic(format!("Failed to bind socket {addr}: {e}")))?;
        let local = listener.local_addr().map_err(|e| QmpError::generic(format!("socket {addr}: {e}")))?;
        let security = self.security(state, tls::Way::Incoming)?;
        eprintln!("postcopy run: waiting for a migration on {local} ({})", security.describe());
        let slot = Arc::new(ListenerSlot::new(listener));
        let mut job = Job::new(Direction::Incoming, state, Some(slot.clone()));
        job.blocktime =
            Shared::capability(state, MigrationCapability::PostcopyBlocktime).then(|| Arc::new(Blocktime::new()));
        let job = Arc::new(job);
        let opts = DestinationOptions {
            config: self.core_config(state),
            tuning: self.config.tuning.clone(),
            serial: self.config.serial.clone(),
            run_after: Duration::ZERO,
            dump_memory: None,
            damage: self.config.damage,
            progress_bar: false,
            preallocated: None,
            population: None,
            blocktime: job.blocktime.clone(),
            security,
            checkpoint_memory: self.config.checkpoint_memory.clone(),
        };
        state.incoming = Incoming::Started;
        state.job = Some(job.clone());
        if job.events {
            self.events.emit(Event::Migration { status: MigrationStatus::Setup });
        }
        let shared = self.clone();
        std::thread::Builder::new()
            .name("vmm-incoming".into())
            .spawn(move || shared.receive(slot, opts, job))
            .map_err(|e| QmpError::generic(format!("cannot start the incoming migration's thread: {e}")))?;
        Ok(())
    }

    /// The incoming migration's thread.
    fn receive(self: Arc<Self>, listener: Arc<ListenerSlot>, mut opts: DestinationOptions, job: Arc<Job>) {
        if let Some(bytes) = self.config.prealloc_bytes {
            let huge = self.config.tuning.hugepages;
            // On 4 KiB pages this returns at once and the population runs
            // in the background: the migration is accepted meanwhile.
            let cpu = self.config.tuning.bulk_cpu;
            match MemoryMap::pc(bytes)
                .map_err(MemoryError::from)
                .and_then(|m| populate::preallocate(m, huge, false, cpu))
            {
                Ok((ram, population)) => {
                    opts.preallocated = Some(ram);
                    opts.population = population;
                }
                Err(e) => tracing::warn!(e = error_chain(&e), "cannot preallocate guest RAM; allocating on arrival"),
            }
        }
        let watch: Arc<dyn Watch<Destination>> = Arc::new(DestinationWatch { shared: self.clone(), job: job.clone() });
        let outcome = driver::run_destination_kept(listener, &opts, Some(watch));
        let report = outcome.report;
        let ok = report.ok && outcome.guest.is_some();
        {
            let mut snapshot = lock(&job.snapshot);
            let phases = &report.stats.phases;
            snapshot.total_time_ms = Some(phases.total_ns / 1_000_000);
            snapshot.setup_time_ms = Some(phases.setup_ns / 1_000_000);
            snapshot.downtime_ms = Some(phases.downtime_ns / 1_000_000);
            snapshot.error = report.error.clone();
            if let (true, Some(ram)) = (ok, &mut snapshot.ram) {
                *ram =
                    status::destination_ram(ram.total / crate::layout::PAGE_SIZE, ram.total / crate::layout::PAGE_SIZE);
            }
            let latency = &report.fault_latency;
            // The fallback's timing, as the samples saw it (the report has no copy).
            let (lease_ms, checkpoint_interval_ms) = (snapshot.x.lease_ms, snapshot.x.checkpoint_interval_ms);
            snapshot.x = XPostcopyInfo {
                fault_latency_p50_us: Some(latency.p50_us),
                fault_latency_p90_us: Some(latency.p90_us),
                fault_latency_p99_us: Some(latency.p99_us),
                fault_latency_max_us: Some(latency.max_us),
                pages_precopy: Some(report.stats.pages_received.precopy),
                pages_background: Some(report.stats.pages_received.background),
                pages_requested: Some(report.stats.pages_received.requested),
                recoveries: Some(u64::from(report.stats.recoveries)),
                memory_digest: ok.then(|| format!("{:016x}", report.digest.digest)),
                checkpoints_taken: report
                    .fallback
                    .as_ref()
                    .filter(|_| job.fallback_on.load(Ordering::SeqCst))
                    .map(|f| f.checkpoints),
                lease_ms,
                checkpoint_interval_ms,
                ..Default::default()
            };
            snapshot.destination_report = Some(report);
        }
        let mut state = self.lock();
        if let Some(arrived) = outcome.guest {
            state.guest = Some(Arc::new(LiveGuest::from(arrived)));
            state.incoming = Incoming::No;
            self.set_run_state(&mut state, RunState::Running);
            self.set_status(&job, MigrationStatus::Completed);
            eprintln!("postcopy run: the migration completed; the guest runs here");
        } else {
            // Nothing arrived: wait for another migrate-incoming.
            state.incoming = Incoming::Deferred;
            self.set_run_state(&mut state, RunState::Inmigrate);
            self.set_status(&job, MigrationStatus::Failed);
            eprintln!("postcopy run: the incoming migration failed");
            if state.exit_on_error {
                eprintln!("postcopy run: exiting (exit-on-error)");
                state.quit = true;
                state.failed_exit = true;
                self.events.emit(Event::Shutdown { guest: false, reason: ShutdownCause::HostError });
                self.quit_signal.notify_all();
            }
        }
    }

    /// The outgoing migration's thread.
    fn send(self: Arc<Self>, guest: Arc<LiveGuest>, opts: SourceOptions, job: Arc<Job>) {
        let watch: Arc<dyn Watch<Source>> =
            Arc::new(SourceWatch { shared: self.clone(), job: job.clone(), guest: guest.clone() });
        let guest_stats = guest.vm.devices().stats().clone();
        let t_start = crate::sys::monotonic_ns();
        let progress_before = guest_stats.pages_rate(t_start.saturating_sub(PROGRESS_WINDOW_NS), t_start);
        let passes_before: u64 = guest_stats.snapshot().reports.iter().sum();
        let session = driver::new_session_id();
        let result = driver::run_source_watched(&guest.vm, &guest.vcpus, &guest.machine, session, &opts, Some(watch));
        let cancelled = job.cancel_requested.load(Ordering::SeqCst);
        let takeover = result.as_ref().ok().and_then(|o| o.fallback.takeover.clone());
        // A takeover whose restore failed: the migration's error, and why
        // the guest cannot run here either.
        let cannot_run = takeover
            .as_ref()
            .and_then(|t| t.error.as_deref())
            .map(|why| format!("; the guest cannot run here again: {why}"));
        let cannot_run = cannot_run.as_deref().unwrap_or_default();
        let (status, error) = match &result {
            Ok(outcome) => {
                let finished = &outcome.finished;
                let total_pages = guest.machine.ram.total_bytes() / crate::layout::PAGE_SIZE;
                let stats = &finished.stats;
                let elapsed_ms = stats.phases.total_ns / 1_000_000;
                let mut snapshot = lock(&job.snapshot);
                let sent = if finished.result.is_ok() { total_pages } else { stats.pages_sent.total() };
                snapshot.ram = Some(status::source_ram(stats, sent.min(total_pages), total_pages, elapsed_ms));
                snapshot.total_time_ms = Some(elapsed_ms);
                snapshot.setup_time_ms = Some(stats.phases.setup_ns / 1_000_000);
                snapshot.downtime_ms = Some(stats.phases.downtime_ns / 1_000_000);
                let mode = if opts.config.mode.precopy_rounds() > 0 { "hybrid" } else { "postcopy" };
                let mut report = outcome.report(driver::ReportedGuest {
                    mem_bytes: guest.machine.ram.total_bytes(),
                    vcpus: guest.machine.vcpus,
                    mode: mode.into(),
                    progress_before_pages_per_s: progress_before,
                    passes_before,
                    fallback: opts.config.fallback.is_some(),
                });
                if let Some(error) = report.error.as_mut() {
                    error.push_str(cannot_run);
                }
                let digest = report.digest;
                snapshot.source_report = Some(report);
                snapshot.x = XPostcopyInfo {
                    pages_precopy: Some(stats.pages_sent.precopy),
                    pages_background: Some(stats.pages_sent.background),
                    pages_requested: Some(stats.pages_sent.requested),
                    recoveries: Some(u64::from(stats.recoveries)),
                    memory_digest: finished.result.is_ok().then(|| format!("{:016x}", digest.digest)),
                    ..Default::default()
                };
                if let Some(fallback) = &opts.config.fallback {
                    status::fill_source_fallback(&mut snapshot.x, &outcome.fallback);
                    snapshot.x.lease_ms = Some(fallback.lease.as_millis() as u64);
                }
                match &finished.result {
                    Ok(()) => (MigrationStatus::Completed, None),
                    Err(e) => {
                        let status = if cancelled { MigrationStatus::Cancelled } else { MigrationStatus::Failed };
                        (status, Some(format!("{}{cannot_run}", error_chain(e))))
                    }
                }
            }
            Err(e) => (MigrationStatus::Failed, Some(error_chain(e))),
        };
        lock(&job.snapshot).error = error.clone();
        let mut state = self.lock();
        let run_state = status::source_end_run_state(status, takeover.as_ref());
        self.set_run_state(&mut state, run_state);
        match (run_state, &takeover) {
            (RunState::Postmigrate, _) => {
                // The guest lives on the destination: its vCPU threads here
                // end with the last reference.
                state.guest = None;
                state.incoming = Incoming::Deferred;
                eprintln!("postcopy run: the migration completed; the guest runs on the destination");
            }
            (RunState::InternalError, _) => {
                eprintln!("postcopy run: the migration ended ({status}); the guest cannot run here{cannot_run}")
            }
            (_, Some(t)) => eprintln!(
                "postcopy run: the migration ended ({status}); the destination was lost and the guest runs here \
                 again from checkpoint {}",
                t.checkpoint
            ),
            _ => eprintln!("postcopy run: the migration ended ({status}); the guest keeps running here"),
        }
        self.set_status(&job, status);
        drop(state);
        drop(guest);
    }
}

/// Resolves a `tcp:HOST:PORT` URI.
fn resolve(uri: &str) -> Result<SocketAddr, QmpError> {
    let (host, port) = parse_tcp_uri(uri)?;
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| QmpError::generic(format!("address resolution failed for {host}:{port}")))
}

/// The source's core, as QMP sees it.
struct SourceWatch {
    shared: Arc<Shared>,
    job: Arc<Job>,
    /// The guest being migrated: after a takeover, whether its vCPUs run
    /// again says whether the driver could restore it.
    guest: Arc<LiveGuest>,
}

impl Watch<Source> for SourceWatch {
    fn state_changed(&self, core: &Source, now: Timestamp) {
        let state = core.state();
        let cancelled = self.job.cancel_requested.load(Ordering::SeqCst);
        // Once cancelled, `cancelling` until the end (the core may still
        // pass through precopy states before it takes the cancel), unless
        // the guest started on the destination first: the cancel came too
        // late and the migration goes on.
        let status = if cancelled && !state.after_start() {
            MigrationStatus::Cancelling
        } else {
            status::source_status(state, false)
        };
        if state == SourceState::Precopy && self.job.events {
            // Pass N: the Nth pass over RAM (QEMU sends one per dirty sync).
            let pass = u64::from(core.stats(now).precopy_rounds) + 1;
            let sent = self.job.passes_sent.load(Ordering::SeqCst);
            for pass in sent + 1..=pass {
                self.shared.events.emit(Event::MigrationPass { pass });
            }
            self.job.passes_sent.fetch_max(pass, Ordering::SeqCst);
        }
        // The migration's thread publishes the end, once the guest is
        // where it will stay.
        if !state.is_terminal() {
            self.shared.set_status(&self.job, status);
            // After a takeover the driver restores the guest only after this
            // call, and may fail to: `sample` says running once it runs.
            if !core.took_over() {
                let mut vmm = self.shared.lock();
                self.shared.set_run_state(&mut vmm, status::source_run_state(state));
            }
        }
    }

    fn sample(&self, core: &Source, now: Timestamp) {
        let total_pages = core.layout().total_pages();
        let stats = core.stats(now);
        let elapsed_ms = self.job.started.elapsed().as_millis() as u64;
        let ram = status::source_ram(&stats, core.pages_sent(), total_pages, elapsed_ms);
        // Never wait for a QMP reader here: a sample skipped is taken next time.
        if let Ok(mut snapshot) = self.job.snapshot.try_lock() {
            snapshot.ram = Some(ram);
            snapshot.setup_time_ms = Some(stats.phases.setup_ns / 1_000_000);
            snapshot.x.pages_precopy = Some(stats.pages_sent.precopy);
            snapshot.x.pages_background = Some(stats.pages_sent.background);
            snapshot.x.pages_requested = Some(stats.pages_sent.requested);
            snapshot.x.recoveries = Some(u64::from(stats.recoveries));
            if let Some(fallback) = &core.config().fallback {
                // Sequence numbers run from 1 without gaps: the last is the count.
                snapshot.x.checkpoints_committed = Some(core.committed_checkpoint());
                snapshot.x.lease_ms = Some(fallback.lease.as_millis() as u64);
            }
        }
        // The takeover's restore resumes the parked vCPUs, or leaves them
        // parked when it failed (the end then says `internal-error`).
        let restored = || self.guest.vcpus.states().iter().any(|s| !s.is_parked());
        if core.took_over() && !self.job.restarted.load(Ordering::SeqCst) && restored() {
            let mut vmm = self.shared.lock();
            if let Ok(mut snapshot) = self.job.snapshot.try_lock() {
                snapshot.x.restarted_from_checkpoint = Some(core.committed_checkpoint());
                self.shared.set_run_state(&mut vmm, RunState::Running);
                self.job.restarted.store(true, Ordering::SeqCst);
            }
        }
    }

    fn take_request(&self) -> Option<UserRequest> {
        lock(&self.job.request).take()
    }

    fn request_handled(&self, _request: UserRequest, result: &Result<(), EventError>) {
        self.job.handled(result);
    }
}

/// The destination's core, as QMP sees it.
struct DestinationWatch {
    shared: Arc<Shared>,
    job: Arc<Job>,
}

impl Watch<Destination> for DestinationWatch {
    fn state_changed(&self, core: &Destination, _now: Timestamp) {
        let state = core.state();
        if state == DestinationState::Paused {
            // A new pause: `migrate-recover` may listen again. In manual
            // recovery nothing listens until it does, as with QEMU.
            self.job.recover_listening.store(false, Ordering::SeqCst);
            if let (false, Some(slot)) = (self.job.auto_recover, &self.job.listener) {
                slot.close();
            }
        }
        if !state.is_terminal() {
            self.shared.set_status(&self.job, status::destination_status(state));
        }
        if core.guest_started() {
            let mut vmm = self.shared.lock();
            self.shared.set_run_state(&mut vmm, status::destination_run_state(true));
        }
        if core.fallback_on() {
            self.job.fallback_on.store(true, Ordering::SeqCst);
        }
    }

    fn sample(&self, core: &Destination, _now: Timestamp) {
        let Some(total_pages) = core.layout().map(|l| l.total_pages()) else { return };
        let ram = status::destination_ram(core.pages_present(), total_pages);
        if let Ok(mut snapshot) = self.job.snapshot.try_lock() {
            snapshot.ram = Some(ram);
            if core.fallback_on() {
                self.job.fallback_on.store(true, Ordering::SeqCst);
                snapshot.x.checkpoints_taken = Some(core.checkpoints_taken());
                snapshot.x.lease_ms = core.fallback_lease().map(|d| d.as_millis() as u64);
                snapshot.x.checkpoint_interval_ms = core.checkpoint_interval().map(|d| d.as_millis() as u64);
            }
        }
    }

    fn take_request(&self) -> Option<UserRequest> {
        lock(&self.job.request).take()
    }

    fn request_handled(&self, _request: UserRequest, result: &Result<(), EventError>) {
        self.job.handled(result);
    }
}

impl KvmVmm {
    fn new(config: VmmConfig, events: Arc<dyn EventSink>, run_state: RunState, incoming: Incoming) -> KvmVmm {
        // The command line's choices are the starting values; QMP changes
        // them from there.
        let from_command_line = |c: MigrationCapability| match c {
            MigrationCapability::XPostcopyFallback => Some(config.base.fallback.is_some()),
            MigrationCapability::PostcopyPreempt => Some(config.base.urgent_channel),
            MigrationCapability::XPostcopyPrepaging => Some(config.base.prepaging),
            _ => None,
        };
        let capabilities = MigrationCapability::ALL
            .iter()
            .map(|&c| {
                let default = CAPABILITY_DEFAULTS.iter().any(|&(d, on)| d == c && on);
                (c, from_command_line(c).unwrap_or(default))
            })
            .collect();
        let parameters = MigrationParameters {
            max_bandwidth: Some(0),
            max_postcopy_bandwidth: Some(config.tuning.max_postcopy_bandwidth.unwrap_or(0)),
            downtime_limit: Some(300),
            x_precopy_rounds: Some(0),
            x_request_batch_pages: Some(u64::from(config.base.request_batch_pages)),
            x_peer_timeout_ms: Some(config.base.peer_timeout.map_or(0, |t| t.as_millis() as u64)),
            x_reconnect_delay_max_ms: Some(config.base.reconnect_delay_max.as_millis() as u64),
            x_push_streams: Some(u64::from(config.base.push_stream_count())),
            x_fallback_lease_ms: Some(config.fallback_settings.lease.as_millis() as u64),
            x_checkpoint_interval_ms: Some(config.fallback_settings.checkpoint_interval.as_millis() as u64),
            ..MigrationParameters::default()
        };
        let state = State {
            run_state,
            guest: None,
            incoming,
            capabilities,
            parameters,
            job: None,
            quit: false,
            exit_on_error: false,
            failed_exit: false,
        };
        let tls = tls::TlsObjects::default();
        KvmVmm {
            shared: Arc::new(Shared { config, state: Mutex::new(state), quit_signal: Condvar::new(), events, tls }),
        }
    }

    /// A VMM running `guest` (a migration source to be).
    pub fn with_guest(config: VmmConfig, events: Arc<dyn EventSink>, guest: LiveGuest) -> KvmVmm {
        let vmm = KvmVmm::new(config, events, RunState::Running, Incoming::No);
        vmm.shared.lock().guest = Some(Arc::new(guest));
        vmm
    }

    /// A VMM waiting for a guest: listening on `uri` at once, or (None)
    /// waiting for `migrate-incoming` (`--incoming defer`).
    pub fn incoming(config: VmmConfig, events: Arc<dyn EventSink>, uri: Option<&str>) -> Result<KvmVmm, VmmError> {
        let vmm = KvmVmm::new(config, events, RunState::Inmigrate, Incoming::Deferred);
        if let Some(uri) = uri {
            let mut state = vmm.shared.lock();
            vmm.shared.start_incoming(&mut state, uri).map_err(VmmError::Incoming)?;
        }
        Ok(vmm)
    }

    /// Writes the guest's RAM to `path` (`run --dump-memory`, at quit): its
    /// vCPUs stop first, so the image is the guest's last state. Returns
    /// whether a guest was here to dump (one that left, or one whose
    /// incoming migration did not complete, has no memory here).
    pub fn dump_memory(&self, path: &std::path::Path) -> Result<bool, DumpError> {
        let state = self.shared.lock();
        let Some(guest) = &state.guest else { return Ok(false) };
        guest.vcpus.pause().map_err(DumpError::Stop)?;
        let file = std::fs::File::create(path).map_err(|e| DumpError::Create(path.to_path_buf(), e))?;
        guest.vm.ram().dump(&mut std::io::BufWriter::new(file)).map_err(|e| DumpError::Write(path.to_path_buf(), e))?;
        Ok(true)
    }

    /// Whether the process ends because an incoming migration failed with
    /// `exit-on-error` (it then exits with a failure status).
    pub fn failed_exit(&self) -> bool {
        self.shared.lock().failed_exit
    }

    /// Blocks until `quit` was executed (or an incoming migration with
    /// `exit-on-error` failed).
    pub fn wait_for_quit(&self) {
        let mut state = self.shared.lock();
        while !state.quit {
            state = self.shared.quit_signal.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn running_job(state: &State) -> Option<&Arc<Job>> {
        state.job.as_ref().filter(|j| j.is_running())
    }

    /// `migrate {resume: true}`: a paused outgoing migration reconnects,
    /// to `addr`.
    fn resume(&self, addr: SocketAddr) -> Result<(), QmpError> {
        let job = KvmVmm::running_job(&self.shared.lock()).filter(|j| j.direction == Direction::Outgoing).cloned();
        let Some(job) = job.filter(|j| j.status() == Some(MigrationStatus::PostcopyPaused)) else {
            return Err(QmpError::no_paused_migration());
        };
        // Without the state lock: the driver takes it while it resumes.
        job.submit(UserRequest::Resume(addr))
            .map_err(|e| QmpError::generic(format!("Cannot resume the paused migration now: {e}")))
    }
}

impl postcopy_qmp::Vmm for KvmVmm {
    fn query_status(&self) -> Result<StatusInfo, QmpError> {
        let state = self.shared.lock();
        Ok(StatusInfo { running: state.run_state == RunState::Running, status: state.run_state })
    }

    fn stop(&self) -> Result<(), QmpError> {
        let mut state = self.shared.lock();
        if KvmVmm::running_job(&state).is_some() {
            return Err(QmpError::migration_active());
        }
        match (&state.guest, state.run_state) {
            (Some(guest), RunState::Running) => {
                guest.vcpus.pause().map_err(|e| QmpError::generic(format!("cannot stop: {}", error_chain(&e))))?;
                self.shared.set_run_state(&mut state, RunState::Paused);
                Ok(())
            }
            (Some(_), _) => Ok(()),
            (None, _) => Err(QmpError::generic("There is no guest running in this process")),
        }
    }

    fn cont(&self) -> Result<(), QmpError> {
        let mut state = self.shared.lock();
        match (&state.guest, state.run_state) {
            (_, RunState::Inmigrate) => Err(QmpError::guest_inmigrate()),
            (Some(guest), RunState::Paused) => {
                guest.vcpus.resume();
                self.shared.set_run_state(&mut state, RunState::Running);
                Ok(())
            }
            (Some(_), RunState::Running) => Ok(()),
            // A takeover whose restore failed left no state to run from.
            (Some(_), RunState::InternalError) => Err(QmpError::generic("Resetting the Virtual Machine is required")),
            _ => Err(QmpError::generic("The guest has migrated away; it runs on the destination")),
        }
    }

    fn quit(&self) -> Result<(), QmpError> {
        let mut state = self.shared.lock();
        state.quit = true;
        self.shared.events.emit(Event::Shutdown { guest: false, reason: ShutdownCause::HostQmpQuit });
        self.shared.quit_signal.notify_all();
        Ok(())
    }

    fn migrate_set_capabilities(&self, capabilities: &[MigrationCapabilityStatus]) -> Result<(), QmpError> {
        let mut state = self.shared.lock();
        if KvmVmm::running_job(&state).is_some() {
            return Err(QmpError::migration_active());
        }
        for c in capabilities {
            let supported = CAPABILITY_DEFAULTS.iter().any(|&(d, _)| d == c.capability);
            if c.state && !supported {
                return Err(QmpError::capability_unsupported(c.capability.as_str()));
            }
            // As `--fallback checkpoint` is refused on the command line:
            // a checkpoint carries each page whole, in one frame.
            if c.state && c.capability == MigrationCapability::XPostcopyFallback {
                if let Some(Err(e)) = self.shared.config.tuning.hugepages.map(|size| size.check_fallback(true)) {
                    return Err(QmpError::generic(format!(
                        "Migration capability '{}' does not work with this guest's RAM: {e}",
                        c.capability.as_str()
                    )));
                }
            }
        }
        let fallback_before = Shared::capability(&state, MigrationCapability::XPostcopyFallback);
        for c in capabilities {
            state.capabilities.insert(c.capability, c.state);
        }
        if !fallback_before && Shared::capability(&state, MigrationCapability::XPostcopyFallback) {
            self.shared.reserve_checkpoint_memory();
        }
        Ok(())
    }

    fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapabilityStatus>, QmpError> {
        let state = self.shared.lock();
        Ok(state
            .capabilities
            .iter()
            .map(|(&capability, &state)| MigrationCapabilityStatus { capability, state })
            .collect())
    }

    fn migrate_set_parameters(&self, parameters: &MigrationParameters) -> Result<(), QmpError> {
        // The postcopy push is paced (the driver's `max_postcopy_bandwidth`);
        // precopy rounds are not.
        if parameters.max_bandwidth.is_some_and(|v| v != 0) {
            return Err(QmpError::invalid_parameter_value(
                "max-bandwidth",
                "0 (this VMM does not limit precopy's bandwidth)",
            ));
        }
        if parameters.downtime_limit.is_some_and(|ms| ms > 2_000_000) {
            return Err(QmpError::invalid_parameter_value(
                "downtime_limit",
                "an integer in the range of 0 to 2000 seconds",
            ));
        }
        if parameters.x_precopy_rounds.is_some_and(|r| r > u64::from(u32::MAX)) {
            return Err(QmpError::invalid_parameter_value("x-precopy-rounds", "an integer from 0 to 4294967295"));
        }
        for (name, value) in [
            ("x-fallback-lease-ms", parameters.x_fallback_lease_ms),
            ("x-checkpoint-interval-ms", parameters.x_checkpoint_interval_ms),
        ] {
            if value.is_some_and(|ms| !FALLBACK_MS_RANGE.contains(&ms)) {
                let (first, last) = (FALLBACK_MS_RANGE.start(), FALLBACK_MS_RANGE.end());
                return Err(QmpError::invalid_parameter_value(
                    name,
                    &format!("an integer from {first} to {last} (milliseconds)"),
                ));
            }
        }
        let mut state = self.shared.lock();
        state.parameters = state.parameters.merged(parameters);
        Ok(())
    }

    fn query_migrate_parameters(&self) -> Result<MigrationParameters, QmpError> {
        Ok(self.shared.lock().parameters.clone())
    }

    fn migrate(&self, args: &MigrateArgs) -> Result<(), QmpError> {
        let addr = resolve(&args.uri)?;
        if args.resume {
            return self.resume(addr);
        }
        let mut state = self.shared.lock();
        // A guest on its way here (the incoming migration not COMPLETED)
        // cannot leave yet, as in QEMU.
        let guest = match (&state.guest, state.incoming) {
            (Some(guest), _) => guest.clone(),
            (None, Incoming::Started) => return Err(QmpError::guest_inmigrate()),
            (None, _) if state.run_state == RunState::Inmigrate => return Err(QmpError::guest_inmigrate()),
            (None, _) => return Err(QmpError::generic("The guest has migrated away; nothing to migrate")),
        };
        if KvmVmm::running_job(&state).is_some() {
            return Err(QmpError::migration_active());
        }
        if state.run_state == RunState::InternalError {
            return Err(QmpError::generic(
                "the guest cannot run (internal-error: a fallback takeover could not restore it); nothing to migrate",
            ));
        }
        if state.run_state != RunState::Running {
            return Err(QmpError::generic(format!(
                "the guest is {}: this VMM migrates a running guest ('cont' first)",
                state.run_state
            )));
        }
        if !Shared::capability(&state, MigrationCapability::PostcopyRam) {
            return Err(QmpError::generic(
                "this VMM migrates by postcopy only: turn the postcopy-ram capability on (x-precopy-rounds \
                 sets precopy rounds before the switch)",
            ));
        }
        let job = Arc::new(Job::new(Direction::Outgoing, &state, None));
        let opts = SourceOptions {
            connect: addr,
            config: self.shared.core_config(&state),
            tuning: Tuning {
                // The push's rate in postcopy (QEMU's parameter; 0: none).
                max_postcopy_bandwidth: state.parameters.max_postcopy_bandwidth.filter(|&b| b > 0),
                ..self.shared.config.tuning.clone()
            },
            security: self.shared.security(&state, tls::Way::Outgoing { uri: &args.uri })?,
            checkpoint_memory: self.shared.config.checkpoint_memory.clone(),
            checkpoint_counters: job.checkpoint_counters.clone(),
        };
        state.job = Some(job.clone());
        if job.events {
            self.shared.events.emit(Event::Migration { status: MigrationStatus::Setup });
        }
        let shared = self.shared.clone();
        let spawned = {
            let job = job.clone();
            std::thread::Builder::new().name("vmm-migrate".into()).spawn(move || shared.send(guest, opts, job))
        };
        if let Err(e) = spawned {
            self.shared.set_status(&job, MigrationStatus::Failed);
            return Err(QmpError::generic(format!("cannot start the migration's thread: {e}")));
        }
        Ok(())
    }

    fn migrate_incoming(&self, args: &MigrateIncomingArgs) -> Result<(), QmpError> {
        let mut state = self.shared.lock();
        match state.incoming {
            Incoming::No => return Err(QmpError::incoming_not_deferred()),
            Incoming::Started => return Err(QmpError::incoming_already_started()),
            Incoming::Deferred => {}
        }
        if KvmVmm::running_job(&state).is_some() {
            return Err(QmpError::migration_active());
        }
        self.shared.start_incoming(&mut state, &args.uri)?;
        // QEMU's `exit-on-error`; absent, this VMM waits for another
        // migrate-incoming instead of exiting (QEMU's default is to exit).
        state.exit_on_error = args.exit_on_error.unwrap_or(false);
        self.shared.set_run_state(&mut state, RunState::Inmigrate);
        Ok(())
    }

    fn migrate_start_postcopy(&self) -> Result<(), QmpError> {
        let state = self.shared.lock();
        if !Shared::capability(&state, MigrationCapability::PostcopyRam) {
            return Err(QmpError::postcopy_not_enabled());
        }
        let Some(job) = KvmVmm::running_job(&state).filter(|j| j.direction == Direction::Outgoing) else {
            return Err(QmpError::postcopy_before_migration());
        };
        match job.status() {
            Some(MigrationStatus::Setup | MigrationStatus::Active) => {
                *lock(&job.request) = Some(UserRequest::SwitchToPostcopy);
                Ok(())
            }
            // Already in postcopy: nothing to do, as in QEMU.
            _ => Ok(()),
        }
    }

    fn migrate_cancel(&self) -> Result<(), QmpError> {
        let state = self.shared.lock();
        let Some(job) = KvmVmm::running_job(&state) else { return Ok(()) };
        if job.direction == Direction::Incoming {
            return Err(QmpError::generic("migrate_cancel cancels an outgoing migration; cancel it on the source"));
        }
        match job.status() {
            Some(MigrationStatus::Setup | MigrationStatus::Active) => {
                job.cancel_requested.store(true, Ordering::SeqCst);
                *lock(&job.request) = Some(UserRequest::Cancel);
                self.shared.set_status(job, MigrationStatus::Cancelling);
                Ok(())
            }
            Some(MigrationStatus::Cancelling) => Ok(()),
            _ => Err(QmpError::generic(
                "Postcopy migration can't be cancelled: the guest runs on the destination already",
            )),
        }
    }

    fn migrate_pause(&self) -> Result<(), QmpError> {
        let job = KvmVmm::running_job(&self.shared.lock()).cloned();
        let Some(job) = job else { return Err(QmpError::pause_outside_postcopy()) };
        if !matches!(job.status(), Some(MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover)) {
            return Err(QmpError::pause_outside_postcopy());
        }
        // Without the state lock: the driver takes it while it pauses.
        job.submit(UserRequest::Pause).map_err(|e| {
            tracing::info!(e, "migrate-pause refused by the migration");
            QmpError::pause_outside_postcopy()
        })?;
        if let Some(slot) = &job.listener {
            // As QEMU: a destination paused by its user listens again only
            // after migrate-recover.
            slot.close();
        }
        Ok(())
    }

    fn migrate_recover(&self, uri: &str) -> Result<(), QmpError> {
        let addr = resolve(uri)?;
        let state = self.shared.lock();
        let job = KvmVmm::running_job(&state).filter(|j| j.direction == Direction::Incoming);
        let Some((job, slot)) = job.and_then(|j| j.listener.as_ref().map(|slot| (j, slot))) else {
            return Err(QmpError::recover_not_paused());
        };
        if job.status() != Some(MigrationStatus::PostcopyPaused) {
            return Err(QmpError::recover_not_paused());
        }
        if job.recover_listening.load(Ordering::SeqCst) {
            return Err(QmpError::generic("Migrate recovery is triggered already"));
        }
        let listener =
            TcpListener::bind(addr).map_err(|e| QmpError::generic(format!("Failed to bind socket {addr}: {e}")))?;
        let local = listener.local_addr().map_err(|e| QmpError::generic(format!("socket {addr}: {e}")))?;
        slot.replace(listener);
        job.recover_listening.store(true, Ordering::SeqCst);
        eprintln!("postcopy run: waiting for the paused migration to resume on {local}");
        Ok(())
    }

    fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        let job = self.shared.lock().job.clone();
        let Some(job) = job else { return Ok(MigrationInfo::default()) };
        let snapshot = lock(&job.snapshot);
        let status = snapshot.status;
        let ended = status.is_some_and(|s| !s.is_running());
        let live_ms = job.started.elapsed().as_millis() as u64;
        let mut info = MigrationInfo {
            status,
            ram: snapshot.ram.clone(),
            total_time: Some(if ended { snapshot.total_time_ms.unwrap_or(live_ms) } else { live_ms }),
            setup_time: snapshot.setup_time_ms,
            downtime: if status == Some(MigrationStatus::Completed) { snapshot.downtime_ms } else { None },
            error_desc: snapshot.error.clone().filter(|_| ended),
            x_postcopy: Some(snapshot.x.clone()),
            ..Default::default()
        };
        if let Some(blocktime) = &job.blocktime {
            status::fill_blocktime(&mut info, &blocktime.figures(crate::sys::monotonic_ns()));
        }
        // While it runs, the source's checkpoint bytes and discards as
        // counted (the committed count comes from the core's samples).
        if let Some(x) = info.x_postcopy.as_mut().filter(|x| !ended && x.checkpoints_committed.is_some()) {
            let record = job.checkpoint_counters.record();
            x.checkpoint_bytes = Some(record.checkpoint_bytes);
            x.checkpoints_discarded = Some(record.checkpoints_discarded);
        }
        Ok(info)
    }

    fn object_add(&self, object: &postcopy_qmp::ObjectAddArgs) -> Result<(), QmpError> {
        self.shared.tls.add(object)
    }

    fn object_del(&self, id: &str) -> Result<(), QmpError> {
        self.shared.tls.remove(id)
    }

    fn x_postcopy_verify(&self) -> Result<Value, QmpError> {
        // Held to the end: a concurrent stop or cont waits for the check.
        let state = self.shared.lock();
        if KvmVmm::running_job(&state).is_some() {
            return Err(QmpError::migration_active());
        }
        let (guest, job) = (state.guest.clone(), state.job.clone());
        let resume = state.run_state == RunState::Running;
        let (mut incoming, outgoing) = match &job {
            Some(job) => {
                let snapshot = lock(&job.snapshot);
                (snapshot.destination_report.clone(), snapshot.source_report.clone())
            }
            None => (None, None),
        };
        let Some(guest) = guest else {
            // The guest left: nothing to check here, only what was sent.
            return Ok(json!({ "ok": null, "guest": null, "last-outgoing": outgoing, "last-incoming": incoming }));
        };
        let pattern = driver::check_running_guest(&guest.vm, &guest.vcpus, &guest.machine, resume)
            .map_err(|e| QmpError::generic(format!("cannot verify the guest: {}", error_chain(&e))))?;
        let arrived = guest.arrived_digest;
        let pattern_ok = pattern.as_ref().is_none_or(|p| p.ok());
        let digest_ok = arrived.is_none_or(|d| d.missing_pages == 0);
        if let (Some(report), Some(_)) = (&mut incoming, arrived) {
            // The guest that arrived by that migration, checked now.
            let stats = guest.vm.devices().stats();
            report.progress_during_pages_per_s = stats.pages_rate(report.resume_ns, report.end_ns);
            report.progress_after_pages_per_s = stats.pages_rate(report.end_ns, crate::sys::monotonic_ns());
            report.pattern = pattern.clone();
            report.ok = report.ok && pattern_ok && digest_ok;
        }
        Ok(json!({
            "ok": pattern_ok && digest_ok,
            "guest": format!("{:?}", guest.machine.guest).to_lowercase(),
            "vcpus": guest.machine.vcpus,
            "mem-bytes": guest.machine.ram.total_bytes(),
            "pattern": pattern,
            "arrived-digest": arrived.map(|d| json!({
                "digest": format!("{:016x}", d.digest),
                "missing-pages": d.missing_pages,
            })),
            "last-incoming": incoming,
            "last-outgoing": outgoing,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hugepages::HugePageSize;
    use postcopy_qmp::Vmm as _;

    struct NoEvents;

    impl EventSink for NoEvents {
        fn emit(&self, _event: Event) {}
    }

    /// A VMM's settings for these tests: `tuning` and the fallback's.
    fn test_config(tuning: Tuning, fallback_settings: FallbackConfig) -> VmmConfig {
        VmmConfig {
            tuning,
            base: Config::default(),
            serial: SerialOutput::default(),
            prealloc_bytes: None,
            damage: None,
            security: driver::ChannelSecurity::default(),
            checkpoint_memory: CheckpointMemory::default(),
            checkpoint_reserve: 0,
            fallback_settings,
        }
    }

    /// `x-postcopy-fallback` turned on over QMP runs with the command
    /// line's lease and checkpoint interval (it took the defaults unless the
    /// command line had said `--fallback checkpoint` too).
    #[test]
    fn fallback_turned_on_over_qmp_uses_the_command_lines_settings() {
        let settings = FallbackConfig {
            lease: Duration::from_millis(600),
            checkpoint_interval: Duration::from_millis(50),
            ..FallbackConfig::default()
        };
        assert_ne!(settings, FallbackConfig::default());
        let config = test_config(Tuning::default(), settings.clone());
        let vmm = KvmVmm::incoming(config, Arc::new(NoEvents), None).expect("a deferred incoming VMM");
        let fallback = |vmm: &KvmVmm| vmm.shared.core_config(&vmm.shared.lock()).fallback;
        assert_eq!(fallback(&vmm), None, "off by default");
        let on = MigrationCapabilityStatus { capability: MigrationCapability::XPostcopyFallback, state: true };
        vmm.migrate_set_capabilities(&[on]).expect("fallback turned on");
        assert_eq!(fallback(&vmm), Some(settings));
    }

    /// `x-fallback-lease-ms` and `x-checkpoint-interval-ms` start at the
    /// command line's values, replace them for the next migration, and
    /// refuse 0 and more than an hour without changing anything.
    #[test]
    fn fallback_timing_is_set_over_qmp_from_the_command_lines_starting_values() {
        let settings = FallbackConfig { lease: Duration::from_millis(600), ..FallbackConfig::default() };
        let vmm = KvmVmm::incoming(test_config(Tuning::default(), settings), Arc::new(NoEvents), None).expect("a VMM");
        let on = MigrationCapabilityStatus { capability: MigrationCapability::XPostcopyFallback, state: true };
        vmm.migrate_set_capabilities(&[on]).expect("fallback turned on");
        let shown = vmm.query_migrate_parameters().expect("parameters");
        assert_eq!((shown.x_fallback_lease_ms, shown.x_checkpoint_interval_ms), (Some(600), Some(100)));
        let timing = |vmm: &KvmVmm| {
            let fallback = vmm.shared.core_config(&vmm.shared.lock()).fallback.expect("fallback on");
            (fallback.lease.as_millis(), fallback.checkpoint_interval.as_millis())
        };
        assert_eq!(timing(&vmm), (600, 100));
        let set = |lease, interval| MigrationParameters {
            x_fallback_lease_ms: lease,
            x_checkpoint_interval_ms: interval,
            ..MigrationParameters::default()
        };
        vmm.migrate_set_parameters(&set(Some(450), Some(25))).expect("taken");
        assert_eq!(timing(&vmm), (450, 25));
        for (bad, name) in [
            (set(Some(0), None), "x-fallback-lease-ms"),
            (set(None, Some(0)), "x-checkpoint-interval-ms"),
            (set(Some(3_600_001), Some(10)), "x-fallback-lease-ms"),
        ] {
            let refused = vmm.migrate_set_parameters(&bad).expect_err("refused");
            assert!(refused.desc.contains(name), "{}", refused.desc);
            assert_eq!(timing(&vmm), (450, 25), "a refused command changes nothing");
        }
    }

    /// On 1 GiB pages `x-postcopy-fallback` is refused, as `--fallback
    /// checkpoint` is on the command line, and nothing changes; 2 MiB
    /// pages take it.
    #[test]
    fn fallback_is_refused_over_qmp_on_1_gib_pages() {
        let config = |hugepages| test_config(Tuning { hugepages, ..Tuning::default() }, FallbackConfig::default());
        let on = MigrationCapabilityStatus { capability: MigrationCapability::XPostcopyFallback, state: true };
        let events = MigrationCapabilityStatus { capability: MigrationCapability::Events, state: true };
        let vmm = KvmVmm::incoming(config(Some(HugePageSize::Size1G)), Arc::new(NoEvents), None).expect("a VMM");
        let refused = vmm.migrate_set_capabilities(&[events, on]).expect_err("refused on 1 GiB pages");
        assert!(refused.desc.contains("x-postcopy-fallback") && refused.desc.contains("1G"), "{}", refused.desc);
        let state = vmm.shared.lock();
        assert!(!Shared::capability(&state, MigrationCapability::XPostcopyFallback));
        assert!(!Shared::capability(&state, MigrationCapability::Events), "all or nothing");
        drop(state);
        let vmm = KvmVmm::incoming(config(Some(HugePageSize::Size2M)), Arc::new(NoEvents), None).expect("a VMM");
        vmm.migrate_set_capabilities(&[on]).expect("2 MiB pages take fallback");
    }
}
