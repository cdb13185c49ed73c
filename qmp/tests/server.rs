//! The server over a real Unix socket, with the fake VMM: several clients,
//! events to every negotiated client, a client leaving mid-command, a huge
//! line, the client bound, a client that does not read, shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postcopy_qmp::fake::FakeVmm;
use postcopy_qmp::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "postcopy-qmp-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

struct Rig {
    vmm: Arc<FakeVmm>,
    server: Server,
}

fn rig_with(config: ServerConfig, make: impl FnOnce(Arc<dyn EventSink>) -> FakeVmm) -> Rig {
    let bus = EventBus::new();
    let vmm = Arc::new(make(Arc::new(bus.clone())));
    let server = Server::bind(socket_path(), config, vmm.clone(), bus).expect("server starts");
    Rig { vmm, server }
}

fn rig() -> Rig {
    rig_with(ServerConfig::default(), FakeVmm::running)
}

/// A raw connection: lines in, JSON out.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(rig: &Rig) -> Raw {
        let stream = UnixStream::connect(rig.server.path()).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Raw { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    fn message(&mut self) -> Value {
        let line = self.line();
        assert!(line.ends_with("\r\n"), "QEMU's line ending: {line:?}");
        serde_json::from_str(&line).unwrap()
    }
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn greeting_negotiation_and_pipelined_commands_over_the_socket() {
    let rig = rig();
    let mut raw = Raw::connect(&rig);
    let greeting = raw.message();
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    raw.send(b"{\"execute\":\"query-status\",\"id\":0}\n");
    assert_eq!(raw.message()["error"]["class"], "CommandNotFound");
    raw.send(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-status\",\"id\":\"a\"}\n{\"execute\":\"stop\",\"id\":2}\n");
    assert_eq!(raw.message(), json!({"return": {}}));
    assert_eq!(raw.message(), json!({"return": {"running": true, "status": "running"}, "id": "a"}));
    // The STOP event and the reply to stop, in either order.
    let mut got = [raw.message(), raw.message()];
    got.sort_by_key(|m| m.get("event").is_some());
    assert_eq!(got[0], json!({"return": {}, "id": 2}));
    assert_eq!(got[1]["event"], "STOP");
    assert!(got[1]["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
}

#[test]
fn events_go_to_every_negotiated_client_and_only_to_them() {
    let rig = rig();
    let mut a = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    let mut b = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    let mut waiting = Raw::connect(&rig);
    waiting.message(); // greeting, no negotiation
    a.execute(&Command::Stop).unwrap();
    assert_eq!(a.wait_event("STOP", WAIT).unwrap().event(), Some(Event::Stop));
    assert_eq!(b.wait_event("STOP", WAIT).unwrap().event(), Some(Event::Stop));
    b.execute(&Command::Cont).unwrap();
    assert_eq!(a.wait_event("RESUME", WAIT).unwrap().event(), Some(Event::Resume));
    // The client that never negotiated got nothing: its next line is the
    // reply to what it sends now.
    waiting.send(b"{\"execute\":\"qmp_capabilities\",\"id\":\"n\"}\n");
    assert_eq!(waiting.message(), json!({"return": {}, "id": "n"}));
}

#[test]
fn a_migration_seen_through_query_migrate_and_events() {
    let rig = rig();
    let mut client = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    let caps = json!({"capabilities": [{"capability": "postcopy-ram", "state": true}, {"capability": "events", "state": true}]});
    client.execute_raw("migrate-set-capabilities", caps.as_object().cloned()).unwrap();
    assert_eq!(client.query_migrate().unwrap(), MigrationInfo::default());
    let err = client.execute(&Command::MigrateStartPostcopy).unwrap_err();
    assert_eq!(err.qmp_error(), Some(&QmpError::postcopy_before_migration()));
    client.execute(&Command::Migrate(MigrateArgs { uri: "tcp:127.0.0.1:4444".into(), resume: false })).unwrap();
    assert_eq!(
        client.wait_event("MIGRATION", WAIT).unwrap().event(),
        Some(Event::Migration { status: MigrationStatus::Setup })
    );
    // A second migrate is refused while this one runs, as QEMU refuses it.
    let err = client.execute(&Command::Migrate(MigrateArgs { uri: "tcp:127.0.0.1:4444".into(), resume: false }));
    assert_eq!(err.unwrap_err().qmp_error(), Some(&QmpError::migration_active()));
    rig.vmm.advance();
    rig.vmm.advance();
    let first = client.query_migrate().unwrap();
    assert_eq!(first.status, Some(MigrationStatus::Active));
    client.execute(&Command::MigrateStartPostcopy).unwrap();
    rig.vmm.advance();
    let second = client.query_migrate().unwrap();
    assert_eq!(second.status, Some(MigrationStatus::PostcopyActive));
    assert!(second.ram.as_ref().unwrap().remaining < first.ram.as_ref().unwrap().remaining, "remaining falls");
    // Pause, recover elsewhere, resume.
    client.execute(&Command::MigratePause).unwrap();
    let err = client.execute(&Command::MigratePause).unwrap_err();
    assert_eq!(err.qmp_error(), Some(&QmpError::pause_outside_postcopy()));
    client.execute(&Command::Migrate(MigrateArgs { uri: "tcp:127.0.0.1:5555".into(), resume: true })).unwrap();
    rig.vmm.advance();
    while client.query_migrate().unwrap().status != Some(MigrationStatus::Completed) {
        rig.vmm.advance();
    }
    let statuses: Vec<MigrationStatus> = std::iter::from_fn(|| client.next_event(Some(Duration::ZERO)).unwrap())
        .filter_map(|e| match e.event() {
            Some(Event::Migration { status }) => Some(status),
            _ => None,
        })
        .collect();
    use MigrationStatus as S;
    let expected =
        [S::Active, S::PostcopyActive, S::PostcopyPaused, S::PostcopyRecover, S::PostcopyActive, S::Completed];
    assert_eq!(statuses, expected);
    assert_eq!(client.query_status().unwrap(), StatusInfo { running: false, status: RunState::Postmigrate });
    assert_eq!(rig.vmm.last_uri().as_deref(), Some("tcp:127.0.0.1:5555"));
}

#[test]
fn a_client_leaving_mid_command_affects_no_one() {
    let rig =
        rig_with(ServerConfig::default(), |sink| FakeVmm::running(sink).with_migrate_delay(Duration::from_millis(300)));
    let mut other = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    {
        let mut leaving = Raw::connect(&rig);
        leaving.message();
        leaving.send(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:1\"}}\n");
        assert_eq!(leaving.message(), json!({"return": {}}));
        // Gone while migrate runs.
    }
    let started = Instant::now();
    assert_eq!(other.query_status().unwrap().status, RunState::Running);
    assert!(started.elapsed() < Duration::from_millis(250), "the other client is not held up");
    // The command still ran to its end.
    wait_until("the migration started", || other.query_migrate().unwrap().status == Some(MigrationStatus::Setup));
    wait_until("the client is gone", || rig.server.events().client_count() == 1);
    let mut fresh = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    assert_eq!(fresh.query_migrate().unwrap().status, Some(MigrationStatus::Setup));
}

#[test]
fn a_huge_line_gets_an_error_and_the_connection_survives() {
    let rig = rig();
    let mut raw = Raw::connect(&rig);
    raw.message();
    raw.send(b"{\"execute\":\"qmp_capabilities\"}\n");
    raw.message();
    let mut huge = b"{\"execute\":\"stop\",\"id\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'y', 4 << 20));
    huge.extend(b"\"}\n{\"execute\":\"query-status\",\"id\":9}\n");
    let writer = {
        let mut w = raw.writer.try_clone().unwrap();
        std::thread::spawn(move || w.write_all(&huge).unwrap())
    };
    let error = raw.message();
    assert_eq!(error["error"]["class"], "GenericError");
    assert!(error["error"]["desc"].as_str().unwrap().starts_with("JSON token size limit exceeded"), "{error}");
    assert_eq!(raw.message(), json!({"return": {"running": true, "status": "running"}, "id": 9}));
    writer.join().unwrap();
}

#[test]
fn clients_beyond_the_bound_are_closed_at_once() {
    let rig = rig_with(ServerConfig { max_clients: 2, ..ServerConfig::default() }, FakeVmm::running);
    let first = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    let _second = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    let mut third = UnixStream::connect(rig.server.path()).unwrap();
    third.set_read_timeout(Some(WAIT)).unwrap();
    let mut bytes = Vec::new();
    assert_eq!(third.read_to_end(&mut bytes).unwrap(), 0, "closed without a greeting");
    drop(first);
    wait_until("a slot frees", || rig.server.events().client_count() == 1);
    let mut again = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    assert!(again.query_status().is_ok());
}

#[test]
fn a_client_that_does_not_read_is_dropped_and_never_blocks_events() {
    let rig = rig_with(ServerConfig { outbound_queue_messages: 256, ..ServerConfig::default() }, FakeVmm::running);
    let mut sleeper = Raw::connect(&rig);
    sleeper.message();
    sleeper.send(b"{\"execute\":\"qmp_capabilities\"}\n");
    sleeper.message();
    let mut reader = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    let mut emitting = Duration::ZERO;
    for pass in 0..20_000 {
        let started = Instant::now();
        rig.server.events().emit_at(&Event::MigrationPass { pass }, Timestamp { seconds: 1, microseconds: 0 });
        emitting += started.elapsed();
        if pass % 64 == 63 {
            // The reading client keeps up: it reads up to this event.
            loop {
                let event = reader.next_event(Some(WAIT)).unwrap().expect("the reader gets every event");
                if event.event() == Some(Event::MigrationPass { pass }) {
                    break;
                }
            }
        }
    }
    assert!(emitting < Duration::from_secs(2), "emitting never waits for a client ({emitting:?} for 20000 events)");
    println!("emit_at: {:?} per event to two clients, one of them stuck", emitting / 20_000);
    wait_until("the sleeper is dropped", || rig.server.events().client_count() == 1);
    assert!(reader.query_status().is_ok());
}

#[test]
fn quit_replies_then_shutdown_lets_everything_out_and_closes() {
    let rig = rig();
    let mut client = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    let mut watcher = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    client.execute(&Command::Quit).unwrap();
    assert!(rig.vmm.quit_requested());
    let path = rig.server.path().to_path_buf();
    rig.server.shutdown();
    assert_eq!(
        watcher.wait_event("SHUTDOWN", WAIT).unwrap().event(),
        Some(Event::Shutdown { guest: false, reason: ShutdownCause::HostQmpQuit })
    );
    assert!(matches!(watcher.next_event(Some(WAIT)), Err(ClientError::Closed { .. })));
    assert!(!path.exists(), "the socket is removed");
}

#[test]
fn a_destination_waits_for_migrate_incoming() {
    let rig = rig_with(ServerConfig::default(), FakeVmm::incoming_deferred);
    let mut client = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    assert_eq!(client.query_status().unwrap(), StatusInfo { running: false, status: RunState::Inmigrate });
    let err = client.execute(&Command::Cont).unwrap_err();
    assert_eq!(err.qmp_error(), Some(&QmpError::guest_inmigrate()));
    let incoming =
        Command::MigrateIncoming(MigrateIncomingArgs { uri: "tcp:127.0.0.1:4444".into(), exit_on_error: None });
    client.execute(&incoming).unwrap();
    assert_eq!(client.execute(&incoming).unwrap_err().qmp_error(), Some(&QmpError::incoming_already_started()));
    while client.query_migrate().unwrap().status != Some(MigrationStatus::Completed) {
        rig.vmm.advance();
    }
    assert_eq!(client.wait_event("RESUME", WAIT).unwrap().event(), Some(Event::Resume));
    assert_eq!(client.query_status().unwrap(), StatusInfo { running: true, status: RunState::Running });
    // Now it can migrate onward.
    client.execute(&Command::Migrate(MigrateArgs { uri: "tcp:127.0.0.1:4445".into(), resume: false })).unwrap();
}

#[test]
fn binding_over_a_regular_file_is_refused() {
    let path = socket_path();
    std::fs::write(&path, b"not a socket").unwrap();
    let bus = EventBus::new();
    let vmm = Arc::new(FakeVmm::running(Arc::new(bus.clone())));
    let err = Server::bind(&path, ServerConfig::default(), vmm, bus).err().expect("refused");
    assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn an_event_right_after_negotiation_reaches_the_client_and_never_precedes_the_reply() {
    let rig = rig();
    // Events all along, from another thread.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let emitter = {
        let (bus, stop) = (rig.server.events().clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                bus.emit_at(&Event::Resume, Timestamp { seconds: 1, microseconds: 0 });
                // Steady, not a flood that outruns the clients' queues.
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    for round in 0..200 {
        let mut raw = Raw::connect(&rig);
        raw.message();
        raw.send(b"{\"execute\":\"qmp_capabilities\"}\n");
        assert_eq!(raw.message(), json!({"return": {}}), "round {round}: the reply comes first");
        rig.server.events().emit_at(&Event::Stop, Timestamp { seconds: 2, microseconds: 0 });
        let deadline = Instant::now() + WAIT;
        loop {
            let message = raw.message();
            if message["event"] == "STOP" {
                break;
            }
            assert_eq!(message["event"], "RESUME", "round {round}");
            assert!(Instant::now() < deadline, "round {round}: the STOP event right after negotiation was lost");
        }
    }
    stop.store(true, Ordering::Relaxed);
    emitter.join().unwrap();
}

#[test]
fn shutdown_does_not_hang_when_the_socket_file_was_removed() {
    let rig = rig();
    let mut client = QmpClient::connect_negotiated(rig.server.path()).unwrap();
    std::fs::remove_file(rig.server.path()).unwrap();
    let started = Instant::now();
    rig.server.shutdown();
    assert!(started.elapsed() < WAIT);
    assert!(matches!(client.next_event(Some(WAIT)), Err(ClientError::Closed { .. })), "clients are closed");
}

#[test]
fn every_server_thread_runs_the_start_hook_in_itself() {
    // (the name the hook was given, the name of the thread it ran in)
    type Started = Vec<(String, Option<String>)>;
    let started: Arc<std::sync::Mutex<Started>> = Arc::default();
    let record = started.clone();
    let config = ServerConfig {
        thread_start: ThreadStart::new(move |name| {
            let own = std::thread::current().name().map(str::to_owned);
            record.lock().unwrap().push((name.to_owned(), own));
        }),
        ..ServerConfig::default()
    };
    let rig = rig_with(config, FakeVmm::running);
    let mut raw = Raw::connect(&rig);
    raw.message();
    wait_until("the accept loop and one client's reader and writer started", || started.lock().unwrap().len() == 3);
    let mut seen = started.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("qmp-accept".to_owned(), Some("qmp-accept".to_owned())),
            ("qmp-read".to_owned(), Some("qmp-read-0".to_owned())),
            ("qmp-write".to_owned(), Some("qmp-write-0".to_owned())),
        ]
    );
}
