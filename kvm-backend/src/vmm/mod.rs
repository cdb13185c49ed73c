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

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postcopy_core::{Config, Destination, Mode, Source, Timestamp};
use postcopy_qmp::command::parse_tcp_uri;
use postcopy_qmp::{
    Event, EventSink, MigrateArgs, MigrateIncomingArgs, MigrationCapability, MigrationCapabilityStatus, MigrationInfo,
    MigrationParameters, MigrationStats, MigrationStatus, QmpError, RunState, ShutdownCause, StatusInfo, XPostcopyInfo,
};
use serde_json::{json, Value};

use crate::devices::{lock, SerialOutput};
use crate::driver::report::{DestinationReport, SourceReport};
use crate::driver::watch::{UserRequest, Watch};
use crate::driver::{self, error_chain, Damage, DestinationOptions, SourceOptions, Tuning};
use crate::layout::MemoryMap;
use crate::memory::{GuestRam, MemoryError};
pub use guest::{BootError, GuestSpec, LiveGuest};

/// The capabilities this VMM can turn on, and their defaults (QEMU's
/// defaults are all off; ours are what the engine does).
const CAPABILITY_DEFAULTS: [(MigrationCapability, bool); 6] = [
    (MigrationCapability::Events, false),
    (MigrationCapability::PostcopyRam, true),
    (MigrationCapability::PostcopyBlocktime, false),
    (MigrationCapability::PostcopyPreempt, true),
    (MigrationCapability::XPostcopyPrepaging, true),
    (MigrationCapability::XPostcopyAutoRecover, true),
];

/// How far back the guest's progress before a migration is measured.
const PROGRESS_WINDOW_NS: u64 = 300_000_000;

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
    /// MIGRATION events (the `events` capability when it started).
    events: bool,
    cancel_requested: AtomicBool,
    request: Mutex<Option<UserRequest>>,
    snapshot: Mutex<Snapshot>,
}

impl Job {
    fn new(direction: Direction, events: bool) -> Job {
        Job {
            direction,
            started: Instant::now(),
            events,
            cancel_requested: AtomicBool::new(false),
            request: Mutex::new(None),
            snapshot: Mutex::new(Snapshot { status: Some(MigrationStatus::Setup), ..Default::default() }),
        }
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
}

struct Shared {
    config: VmmConfig,
    state: Mutex<State>,
    quit_signal: Condvar,
    events: Arc<dyn EventSink>,
}

/// The VMM; share it (`Arc`) with the QMP server.
pub struct KvmVmm {
    shared: Arc<Shared>,
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
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Changes the guest's run state, with QEMU's STOP / RESUME events.
    fn set_run_state(&self, state: &mut State, run_state: RunState) {
        let was_running = state.run_state == RunState::Running;
        state.run_state = run_state;
        let running = run_state == RunState::Running;
        if was_running && !running {
            self.events.emit(Event::Stop);
        } else if running && !was_running {
            self.events.emit(Event::Resume);
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
        if let Some(batch) = p.x_request_batch_pages {
            config.request_batch_pages = batch.clamp(1, u64::from(u32::MAX)) as u32;
        }
        if let Some(ms) = p.x_peer_timeout_ms {
            config.peer_timeout = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(ms) = p.x_reconnect_delay_max_ms {
            config.reconnect_delay_max = Duration::from_millis(ms).max(config.reconnect_delay_min);
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
        eprintln!("postcopy run: waiting for a migration on {local}");
        let job = Arc::new(Job::new(Direction::Incoming, Shared::capability(state, MigrationCapability::Events)));
        let opts = DestinationOptions {
            config: self.core_config(state),
            tuning: self.config.tuning.clone(),
            serial: self.config.serial.clone(),
            run_after: Duration::ZERO,
            dump_memory: None,
            damage: self.config.damage,
            progress_bar: false,
            preallocated: None,
        };
        state.incoming = Incoming::Started;
        state.job = Some(job.clone());
        if job.events {
            self.events.emit(Event::Migration { status: MigrationStatus::Setup });
        }
        let shared = self.clone();
        std::thread::Builder::new()
            .name("vmm-incoming".into())
            .spawn(move || shared.receive(listener, opts, job))
            .map_err(|e| QmpError::generic(format!("cannot start the incoming migration's thread: {e}")))?;
        Ok(())
    }

    /// The incoming migration's thread.
    fn receive(self: Arc<Self>, listener: TcpListener, mut opts: DestinationOptions, job: Arc<Job>) {
        if let Some(bytes) = self.config.prealloc_bytes {
            let huge = self.config.tuning.hugepages;
            match MemoryMap::pc(bytes).map_err(MemoryError::from).and_then(|m| GuestRam::new_preallocated_with(m, huge))
            {
                Ok(ram) => opts.preallocated = Some(Arc::new(ram)),
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
                verified: None,
                eta_ms: None,
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
        }
    }

    /// The outgoing migration's thread.
    fn send(self: Arc<Self>, guest: Arc<LiveGuest>, opts: SourceOptions, job: Arc<Job>) {
        let watch: Arc<dyn Watch<Source>> = Arc::new(SourceWatch { shared: self.clone(), job: job.clone() });
        let guest_stats = guest.vm.devices().stats().clone();
        let t_start = crate::sys::monotonic_ns();
        let progress_before = guest_stats.pages_rate(t_start.saturating_sub(PROGRESS_WINDOW_NS), t_start);
        let passes_before: u64 = guest_stats.snapshot().reports.iter().sum();
        let session = driver::new_session_id();
        let result = driver::run_source_watched(&guest.vm, &guest.vcpus, &guest.machine, session, &opts, Some(watch));
        let cancelled = job.cancel_requested.load(Ordering::SeqCst);
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
                let digest = outcome.digests.fold();
                let mode = if opts.config.mode.precopy_rounds() > 0 { "hybrid" } else { "postcopy" };
                snapshot.source_report = Some(SourceReport {
                    ok: finished.result.is_ok(),
                    error: finished.result.as_ref().err().map(|e| error_chain(e)),
                    guest_on: format!("{:?}", finished.guest_on).to_lowercase(),
                    mem_bytes: guest.machine.ram.total_bytes(),
                    vcpus: guest.machine.vcpus,
                    mode: mode.into(),
                    stats: stats.clone(),
                    start_ns: outcome.start_ns,
                    stop_ns: outcome.stop_ns,
                    end_ns: outcome.end_ns,
                    stop_capture_us: outcome.stop_capture_us,
                    pause_us: outcome.pause_us,
                    digest,
                    progress_before_pages_per_s: progress_before,
                    passes_before,
                    progress_after_failure_pages_per_s: None,
                    notices: outcome.notices.clone(),
                });
                snapshot.x = XPostcopyInfo {
                    pages_precopy: Some(stats.pages_sent.precopy),
                    pages_background: Some(stats.pages_sent.background),
                    pages_requested: Some(stats.pages_sent.requested),
                    recoveries: Some(u64::from(stats.recoveries)),
                    memory_digest: finished.result.is_ok().then(|| format!("{:016x}", digest.digest)),
                    ..Default::default()
                };
                match &finished.result {
                    Ok(()) => (MigrationStatus::Completed, None),
                    Err(e) => {
                        let status = if cancelled { MigrationStatus::Cancelled } else { MigrationStatus::Failed };
                        (status, Some(error_chain(e)))
                    }
                }
            }
            Err(e) => (MigrationStatus::Failed, Some(error_chain(e))),
        };
        lock(&job.snapshot).error = error.clone();
        let mut state = self.lock();
        if status == MigrationStatus::Completed {
            // The guest lives on the destination: its vCPU threads here end
            // with the last reference.
            state.guest = None;
            state.incoming = Incoming::Deferred;
            self.set_run_state(&mut state, RunState::Postmigrate);
            eprintln!("postcopy run: the migration completed; the guest runs on the destination");
        } else {
            self.set_run_state(&mut state, RunState::Running);
            eprintln!("postcopy run: the migration ended ({status}); the guest keeps running here");
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
}

impl Watch<Source> for SourceWatch {
    fn state_changed(&self, core: &Source, _now: Timestamp) {
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
        // The migration's thread publishes the end, once the guest is
        // where it will stay.
        if !state.is_terminal() {
            self.shared.set_status(&self.job, status);
            let mut vmm = self.shared.lock();
            self.shared.set_run_state(&mut vmm, status::source_run_state(state));
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
        }
    }

    fn take_request(&self) -> Option<UserRequest> {
        lock(&self.job.request).take()
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
        if !state.is_terminal() {
            self.shared.set_status(&self.job, status::destination_status(state));
        }
        if core.guest_started() {
            let mut vmm = self.shared.lock();
            self.shared.set_run_state(&mut vmm, status::destination_run_state(true));
        }
    }

    fn sample(&self, core: &Destination, _now: Timestamp) {
        let Some(total_pages) = core.layout().map(|l| l.total_pages()) else { return };
        let ram = status::destination_ram(core.pages_present(), total_pages);
        if let Ok(mut snapshot) = self.job.snapshot.try_lock() {
            snapshot.ram = Some(ram);
        }
    }

    fn take_request(&self) -> Option<UserRequest> {
        lock(&self.job.request).take()
    }
}

impl KvmVmm {
    fn new(config: VmmConfig, events: Arc<dyn EventSink>, run_state: RunState, incoming: Incoming) -> KvmVmm {
        let capabilities = MigrationCapability::ALL
            .iter()
            .map(|&c| (c, CAPABILITY_DEFAULTS.iter().any(|&(d, on)| d == c && on)))
            .collect();
        let parameters = MigrationParameters {
            max_bandwidth: Some(0),
            max_postcopy_bandwidth: Some(0),
            downtime_limit: Some(300),
            x_precopy_rounds: Some(0),
            x_request_batch_pages: Some(u64::from(config.base.request_batch_pages)),
            x_peer_timeout_ms: Some(config.base.peer_timeout.map_or(0, |t| t.as_millis() as u64)),
            x_reconnect_delay_max_ms: Some(config.base.reconnect_delay_max.as_millis() as u64),
        };
        let state = State { run_state, guest: None, incoming, capabilities, parameters, job: None, quit: false };
        KvmVmm { shared: Arc::new(Shared { config, state: Mutex::new(state), quit_signal: Condvar::new(), events }) }
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

    /// Blocks until `quit` was executed.
    pub fn wait_for_quit(&self) {
        let mut state = self.shared.lock();
        while !state.quit {
            state = self.shared.quit_signal.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn running_job(state: &State) -> Option<&Arc<Job>> {
        state.job.as_ref().filter(|j| j.is_running())
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
            if !c.state && c.capability == MigrationCapability::XPostcopyAutoRecover {
                return Err(QmpError::generic(
                    "x-postcopy-auto-recover cannot be turned off: this VMM recovers lost connections itself",
                ));
            }
        }
        for c in capabilities {
            state.capabilities.insert(c.capability, c.state);
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
        for (name, value) in
            [("max-bandwidth", parameters.max_bandwidth), ("max-postcopy-bandwidth", parameters.max_postcopy_bandwidth)]
        {
            if value.is_some_and(|v| v != 0) {
                return Err(QmpError::invalid_parameter_value(name, "0 (this VMM does not limit bandwidth)"));
            }
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
        let mut state = self.shared.lock();
        state.parameters = state.parameters.merged(parameters);
        Ok(())
    }

    fn query_migrate_parameters(&self) -> Result<MigrationParameters, QmpError> {
        Ok(self.shared.lock().parameters.clone())
    }

    fn migrate(&self, args: &MigrateArgs) -> Result<(), QmpError> {
        let addr = resolve(&args.uri)?;
        let mut state = self.shared.lock();
        if args.resume {
            // Lost connections are recovered without an operator: a
            // migration is never left paused.
            return Err(QmpError::no_paused_migration());
        }
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
        let job = Arc::new(Job::new(Direction::Outgoing, Shared::capability(&state, MigrationCapability::Events)));
        let opts = SourceOptions {
            connect: addr,
            config: self.shared.core_config(&state),
            tuning: self.shared.config.tuning.clone(),
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
        Err(QmpError::generic(
            "migrate-pause is not supported: this VMM recovers a lost connection during postcopy by itself",
        ))
    }

    fn migrate_recover(&self, _uri: &str) -> Result<(), QmpError> {
        Err(QmpError::recover_not_paused())
    }

    fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        let job = self.shared.lock().job.clone();
        let Some(job) = job else { return Ok(MigrationInfo::default()) };
        let snapshot = lock(&job.snapshot);
        let status = snapshot.status;
        let ended = status.is_some_and(|s| !s.is_running());
        let live_ms = job.started.elapsed().as_millis() as u64;
        Ok(MigrationInfo {
            status,
            ram: snapshot.ram.clone(),
            total_time: Some(if ended { snapshot.total_time_ms.unwrap_or(live_ms) } else { live_ms }),
            setup_time: snapshot.setup_time_ms,
            downtime: if status == Some(MigrationStatus::Completed) { snapshot.downtime_ms } else { None },
            error_desc: snapshot.error.clone().filter(|_| ended),
            x_postcopy: Some(snapshot.x.clone()),
            ..Default::default()
        })
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
