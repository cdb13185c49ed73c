//! A simulated VMM for tests, the fuzz target and the `fake_vmm` example: no
//! guest, but QEMU's run states, migration statuses, capability and
//! parameter bookkeeping and state checks, and a migration that advances one
//! step per [`FakeVmm::advance`] call, with the events QEMU would send.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::command::{parse_tcp_uri, MigrateArgs, MigrateIncomingArgs};
use crate::error::QmpError;
use crate::types::{
    Event, MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationParameters, MigrationStats,
    MigrationStatus, RunState, ShutdownCause, StatusInfo, XPostcopyInfo,
};
use crate::vmm::{EventSink, Vmm};

/// The capabilities the fake (like the real VMM) can turn on.
pub const SUPPORTED_CAPABILITIES: [MigrationCapability; 7] = [
    MigrationCapability::Events,
    MigrationCapability::PostcopyRam,
    MigrationCapability::PostcopyBlocktime,
    MigrationCapability::PostcopyPreempt,
    MigrationCapability::XPostcopyPrepaging,
    MigrationCapability::XPostcopyAutoRecover,
    MigrationCapability::XPostcopyFallback,
];

/// The simulated guest's RAM.
pub const FAKE_RAM_BYTES: u64 = 64 << 20;
/// Bytes sent per [`FakeVmm::advance`] step.
pub const FAKE_STEP_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    /// Not a destination.
    No,
    /// Started with `--incoming defer`; waiting for `migrate-incoming`.
    Deferred,
    /// Listening or receiving.
    Started,
}

#[derive(Debug)]
struct State {
    run_state: RunState,
    migration: Option<MigrationStatus>,
    capabilities: BTreeMap<MigrationCapability, bool>,
    parameters: MigrationParameters,
    incoming: Incoming,
    remaining_bytes: u64,
    transferred_bytes: u64,
    passes: u64,
    postcopy_requests: u64,
    recoveries: u64,
    quit: bool,
    last_uri: Option<String>,
}

/// The fake VMM; cheap to share (`Arc`).
pub struct FakeVmm {
    state: Mutex<State>,
    events: Arc<dyn EventSink>,
    /// How long `migrate` takes to return (to test a client leaving
    /// mid-command).
    migrate_delay: Duration,
}

impl FakeVmm {
    /// A running guest (a migration source).
    pub fn running(events: Arc<dyn EventSink>) -> FakeVmm {
        FakeVmm::with_state(events, RunState::Running, Incoming::No)
    }

    /// A destination started with `--incoming defer`.
    pub fn incoming_deferred(events: Arc<dyn EventSink>) -> FakeVmm {
        FakeVmm::with_state(events, RunState::Inmigrate, Incoming::Deferred)
    }

    fn with_state(events: Arc<dyn EventSink>, run_state: RunState, incoming: Incoming) -> FakeVmm {
        let capabilities =
            MigrationCapability::ALL.iter().map(|&c| (c, c == MigrationCapability::XPostcopyAutoRecover)).collect();
        let parameters = MigrationParameters {
            max_bandwidth: Some(0),
            max_postcopy_bandwidth: Some(0),
            downtime_limit: Some(300),
            x_precopy_rounds: Some(0),
            x_request_batch_pages: Some(64),
            x_peer_timeout_ms: Some(10_000),
            x_reconnect_delay_max_ms: Some(1_000),
            x_push_streams: Some(1),
            x_fallback_lease_ms: Some(1000),
            x_checkpoint_interval_ms: Some(100),
            ..MigrationParameters::default()
        };
        FakeVmm {
            state: Mutex::new(State {
                run_state,
                migration: None,
                capabilities,
                parameters,
                incoming,
                remaining_bytes: FAKE_RAM_BYTES,
                transferred_bytes: 0,
                passes: 0,
                postcopy_requests: 0,
                recoveries: 0,
                quit: false,
                last_uri: None,
            }),
            events,
            migrate_delay: Duration::ZERO,
        }
    }

    pub fn with_migrate_delay(mut self, delay: Duration) -> FakeVmm {
        self.migrate_delay = delay;
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere left the state as it was at a step boundary.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `quit` was executed.
    pub fn quit_requested(&self) -> bool {
        self.lock().quit
    }

    /// The URI of the last `migrate`, `migrate-incoming` or
    /// `migrate-recover`.
    pub fn last_uri(&self) -> Option<String> {
        self.lock().last_uri.clone()
    }

    /// QEMU sends MIGRATION and MIGRATION_PASS only with the `events`
    /// capability on (off by default).
    fn migration_event(&self, state: &State, event: Event) {
        if state.capabilities.get(&MigrationCapability::Events).copied().unwrap_or(false) {
            self.events.emit(event);
        }
    }

    fn set_migration(&self, state: &mut State, status: MigrationStatus) {
        state.migration = Some(status);
        self.migration_event(state, Event::Migration { status });
    }

    fn set_run_state(&self, state: &mut State, run_state: RunState) {
        let was = std::mem::replace(&mut state.run_state, run_state);
        if let Some(event) = Event::for_run_state_change(was, run_state) {
            self.events.emit(event);
        }
    }

    /// One step of the simulated migration: setup becomes active (a pass),
    /// each step sends [`FAKE_STEP_BYTES`] (a new pass each time in
    /// precopy), and once all is sent the migration completes (the source's
    /// guest ends `postmigrate`, the destination's runs). Nothing happens in
    /// a paused or ended migration.
    pub fn advance(&self) {
        let mut state = self.lock();
        match state.migration {
            Some(MigrationStatus::Setup) => {
                if state.incoming == Incoming::No {
                    state.passes = 1;
                    self.migration_event(&state, Event::MigrationPass { pass: 1 });
                }
                self.set_migration(&mut state, MigrationStatus::Active);
            }
            Some(status @ (MigrationStatus::Active | MigrationStatus::PostcopyActive)) => {
                let step = state.remaining_bytes.min(FAKE_STEP_BYTES);
                state.remaining_bytes -= step;
                state.transferred_bytes += step;
                if status == MigrationStatus::PostcopyActive {
                    state.postcopy_requests += 1;
                } else if state.remaining_bytes > 0 && state.incoming == Incoming::No {
                    state.passes += 1;
                    let pass = state.passes;
                    self.migration_event(&state, Event::MigrationPass { pass });
                }
                if state.remaining_bytes == 0 {
                    if state.incoming == Incoming::No {
                        if status == MigrationStatus::Active {
                            self.set_run_state(&mut state, RunState::FinishMigrate);
                        }
                        state.run_state = RunState::Postmigrate;
                    } else {
                        self.set_run_state(&mut state, RunState::Running);
                    }
                    self.set_migration(&mut state, MigrationStatus::Completed);
                }
            }
            Some(MigrationStatus::PostcopyRecover) => {
                state.recoveries += 1;
                self.set_migration(&mut state, MigrationStatus::PostcopyActive);
            }
            _ => {}
        }
    }
}

impl Vmm for FakeVmm {
    fn query_status(&self) -> Result<StatusInfo, QmpError> {
        let state = self.lock();
        Ok(StatusInfo { running: state.run_state == RunState::Running, status: state.run_state })
    }

    fn stop(&self) -> Result<(), QmpError> {
        let mut state = self.lock();
        if state.run_state == RunState::Running {
            self.set_run_state(&mut state, RunState::Paused);
        }
        Ok(())
    }

    fn cont(&self) -> Result<(), QmpError> {
        let mut state = self.lock();
        match state.run_state {
            RunState::Inmigrate => Err(QmpError::guest_inmigrate()),
            RunState::Postmigrate | RunState::FinishMigrate => {
                Err(QmpError::generic("Migration is not finalized yet; the guest runs on the destination"))
            }
            RunState::Paused => {
                self.set_run_state(&mut state, RunState::Running);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn quit(&self) -> Result<(), QmpError> {
        let mut state = self.lock();
        state.quit = true;
        self.events.emit(Event::Shutdown { guest: false, reason: ShutdownCause::HostQmpQuit });
        Ok(())
    }

    fn migrate_set_capabilities(&self, capabilities: &[MigrationCapabilityStatus]) -> Result<(), QmpError> {
        let mut state = self.lock();
        if state.migration.is_some_and(MigrationStatus::is_running) {
            return Err(QmpError::migration_active());
        }
        if let Some(bad) = capabilities.iter().find(|c| c.state && !SUPPORTED_CAPABILITIES.contains(&c.capability)) {
            return Err(QmpError::capability_unsupported(bad.capability.as_str()));
        }
        for c in capabilities {
            state.capabilities.insert(c.capability, c.state);
        }
        Ok(())
    }

    fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapabilityStatus>, QmpError> {
        let state = self.lock();
        Ok(state
            .capabilities
            .iter()
            .map(|(&capability, &state)| MigrationCapabilityStatus { capability, state })
            .collect())
    }

    fn migrate_set_parameters(&self, parameters: &MigrationParameters) -> Result<(), QmpError> {
        if parameters.downtime_limit.is_some_and(|ms| ms > 2_000_000) {
            return Err(QmpError::invalid_parameter_value(
                "downtime_limit",
                "an integer in the range of 0 to 2000 seconds",
            ));
        }
        let mut state = self.lock();
        state.parameters = state.parameters.merged(parameters);
        Ok(())
    }

    fn query_migrate_parameters(&self) -> Result<MigrationParameters, QmpError> {
        Ok(self.lock().parameters.clone())
    }

    fn migrate(&self, args: &MigrateArgs) -> Result<(), QmpError> {
        std::thread::sleep(self.migrate_delay);
        parse_tcp_uri(&args.uri)?;
        let mut state = self.lock();
        if state.incoming != Incoming::No && state.migration != Some(MigrationStatus::Completed) {
            return Err(QmpError::guest_inmigrate());
        }
        if args.resume {
            if state.migration != Some(MigrationStatus::PostcopyPaused) {
                return Err(QmpError::no_paused_migration());
            }
            state.last_uri = Some(args.uri.clone());
            self.set_migration(&mut state, MigrationStatus::PostcopyRecover);
            return Ok(());
        }
        if state.migration.is_some_and(MigrationStatus::is_running) {
            return Err(QmpError::migration_active());
        }
        // A guest that arrived here migrates onward as a source.
        state.incoming = Incoming::No;
        state.last_uri = Some(args.uri.clone());
        state.remaining_bytes = FAKE_RAM_BYTES;
        state.transferred_bytes = 0;
        state.passes = 0;
        state.postcopy_requests = 0;
        self.set_migration(&mut state, MigrationStatus::Setup);
        Ok(())
    }

    fn migrate_incoming(&self, args: &MigrateIncomingArgs) -> Result<(), QmpError> {
        parse_tcp_uri(&args.uri)?;
        let mut state = self.lock();
        match state.incoming {
            Incoming::No => return Err(QmpError::incoming_not_deferred()),
            Incoming::Started => return Err(QmpError::incoming_already_started()),
            Incoming::Deferred => {}
        }
        state.incoming = Incoming::Started;
        state.last_uri = Some(args.uri.clone());
        self.set_migration(&mut state, MigrationStatus::Setup);
        Ok(())
    }

    fn migrate_start_postcopy(&self) -> Result<(), QmpError> {
        let mut state = self.lock();
        if !state.capabilities.get(&MigrationCapability::PostcopyRam).copied().unwrap_or(false) {
            return Err(QmpError::postcopy_not_enabled());
        }
        match state.migration {
            Some(MigrationStatus::Active) => {
                self.set_run_state(&mut state, RunState::FinishMigrate);
                state.run_state = RunState::Postmigrate;
                self.set_migration(&mut state, MigrationStatus::PostcopyActive);
                Ok(())
            }
            Some(MigrationStatus::Setup) => Err(QmpError::generic("Postcopy can only start once migration is active")),
            _ => Err(QmpError::postcopy_before_migration()),
        }
    }

    fn migrate_cancel(&self) -> Result<(), QmpError> {
        let mut state = self.lock();
        match state.migration {
            Some(MigrationStatus::Setup | MigrationStatus::Active) => {
                self.set_migration(&mut state, MigrationStatus::Cancelling);
                self.set_migration(&mut state, MigrationStatus::Cancelled);
                Ok(())
            }
            Some(status) if status.is_running() => {
                Err(QmpError::generic("Postcopy migration can't be cancelled; use migrate-pause"))
            }
            _ => Ok(()),
        }
    }

    fn migrate_pause(&self) -> Result<(), QmpError> {
        let mut state = self.lock();
        match state.migration {
            Some(MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover) => {
                self.set_migration(&mut state, MigrationStatus::PostcopyPaused);
                Ok(())
            }
            _ => Err(QmpError::pause_outside_postcopy()),
        }
    }

    fn migrate_recover(&self, uri: &str) -> Result<(), QmpError> {
        parse_tcp_uri(uri)?;
        let mut state = self.lock();
        if state.migration != Some(MigrationStatus::PostcopyPaused) {
            return Err(QmpError::recover_not_paused());
        }
        state.last_uri = Some(uri.to_owned());
        self.set_migration(&mut state, MigrationStatus::PostcopyRecover);
        Ok(())
    }

    fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        let state = self.lock();
        let Some(status) = state.migration else { return Ok(MigrationInfo::default()) };
        let total_time = state.passes * 100 + state.postcopy_requests * 10;
        let ram = MigrationStats {
            transferred: state.transferred_bytes,
            remaining: state.remaining_bytes,
            total: FAKE_RAM_BYTES,
            normal: state.transferred_bytes / 4096,
            normal_bytes: state.transferred_bytes,
            mbps: if total_time == 0 {
                0.0
            } else {
                (state.transferred_bytes * 8) as f64 / (total_time as f64 * 1000.0)
            },
            dirty_sync_count: state.passes,
            postcopy_requests: state.postcopy_requests,
            page_size: 4096,
            ..Default::default()
        };
        let blocktime = state.capabilities.get(&MigrationCapability::PostcopyBlocktime).copied().unwrap_or(false);
        Ok(MigrationInfo {
            status: Some(status),
            ram: Some(ram),
            total_time: Some(total_time),
            setup_time: Some(1),
            downtime: (status == MigrationStatus::Completed).then_some(5),
            expected_downtime: (status == MigrationStatus::Active).then_some(300),
            postcopy_latency_dist: blocktime.then(|| vec![0; 24]),
            x_postcopy: Some(XPostcopyInfo { recoveries: Some(state.recoveries), ..Default::default() }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Event>>);

    impl EventSink for Collect {
        fn emit(&self, event: Event) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn migrate(uri: &str, resume: bool) -> MigrateArgs {
        MigrateArgs { uri: uri.into(), resume }
    }

    fn enable(vmm: &FakeVmm, capability: MigrationCapability) {
        vmm.migrate_set_capabilities(&[MigrationCapabilityStatus { capability, state: true }]).unwrap();
    }

    #[test]
    fn migration_events_need_the_events_capability() {
        let sink = Arc::new(Collect::default());
        let vmm = FakeVmm::running(sink.clone());
        vmm.migrate(&migrate("tcp:127.0.0.1:1", false)).unwrap();
        vmm.advance();
        vmm.advance();
        assert_eq!(*sink.0.lock().unwrap(), []);
        vmm.migrate_cancel().unwrap();
        enable(&vmm, MigrationCapability::Events);
        vmm.migrate(&migrate("tcp:127.0.0.1:1", false)).unwrap();
        vmm.advance();
        assert_eq!(
            *sink.0.lock().unwrap(),
            [
                Event::Migration { status: MigrationStatus::Setup },
                Event::MigrationPass { pass: 1 },
                Event::Migration { status: MigrationStatus::Active }
            ]
        );
    }

    #[test]
    fn wrong_states_get_qemus_errors() {
        let vmm = FakeVmm::running(Arc::new(Collect::default()));
        assert_eq!(vmm.migrate_pause(), Err(QmpError::pause_outside_postcopy()));
        assert_eq!(vmm.migrate_recover("tcp:h:1"), Err(QmpError::recover_not_paused()));
        assert_eq!(vmm.migrate(&migrate("tcp:h:1", true)), Err(QmpError::no_paused_migration()));
        assert_eq!(vmm.migrate_start_postcopy(), Err(QmpError::postcopy_not_enabled()));
        enable(&vmm, MigrationCapability::PostcopyRam);
        assert_eq!(vmm.migrate_start_postcopy(), Err(QmpError::postcopy_before_migration()));
        assert_eq!(
            vmm.migrate_incoming(&MigrateIncomingArgs { uri: "tcp:h:1".into(), exit_on_error: None }),
            Err(QmpError::incoming_not_deferred())
        );
        assert_eq!(vmm.migrate(&migrate("rdma:h:1", false)), Err(QmpError::unknown_migration_protocol("rdma:h:1")));
        vmm.migrate(&migrate("tcp:h:1", false)).unwrap();
        assert_eq!(vmm.migrate(&migrate("tcp:h:1", false)), Err(QmpError::migration_active()));
        assert_eq!(
            vmm.migrate_set_capabilities(&[MigrationCapabilityStatus {
                capability: MigrationCapability::Events,
                state: true
            }]),
            Err(QmpError::migration_active())
        );
    }

    #[test]
    fn a_guest_that_arrived_can_migrate_onward_only_once_completed() {
        let vmm = FakeVmm::incoming_deferred(Arc::new(Collect::default()));
        vmm.migrate_incoming(&MigrateIncomingArgs { uri: "tcp:h:1".into(), exit_on_error: None }).unwrap();
        vmm.advance();
        vmm.advance();
        assert_eq!(vmm.migrate(&migrate("tcp:h:2", false)), Err(QmpError::guest_inmigrate()));
        while vmm.query_migrate().unwrap().status != Some(MigrationStatus::Completed) {
            vmm.advance();
        }
        assert_eq!(vmm.query_status().unwrap().status, RunState::Running);
        vmm.migrate(&migrate("tcp:h:2", false)).unwrap();
        assert_eq!(vmm.query_migrate().unwrap().status, Some(MigrationStatus::Setup));
    }
}
