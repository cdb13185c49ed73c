//! The long-running VMM (`postcopy run`) driven over QMP as an orchestrator
//! drives QEMU, with the qmp crate's client: a migration watched through
//! `query-migrate` and events, a cancel before the switchover, and a guest
//! migrated back and forth between two processes, each hop verified.

mod common;
mod vmm;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{binary, kvm_or_skip, serial, temp_dir};
use postcopy_qmp::{
    Command as Qmp, MigrateArgs, MigrateIncomingArgs, MigrationCapability, MigrationCapabilityStatus,
    MigrationParameters, MigrationStatus, RunState,
};
use serde_json::Value;
use vmm::{assert_hop_verified, free_port, read, sent_digest, uri, Vmm, MIGRATION_TIMEOUT};

/// Precopy rounds that do not end by themselves within a test.
const ENDLESS_ROUNDS: u64 = 100_000_000;

/// Rank of a status in a migration's life, to check events come in order.
fn rank(status: MigrationStatus) -> u32 {
    match status {
        MigrationStatus::Setup => 0,
        MigrationStatus::Active => 1,
        MigrationStatus::PostcopyActive => 2,
        MigrationStatus::Completed => 3,
        other => panic!("unexpected status {other}"),
    }
}

#[test]
fn query_migrate_advances_and_events_arrive_in_order() {
    if !kvm_or_skip("query_migrate_advances_and_events_arrive_in_order") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-progress");
    let port = free_port();
    let mut a = Vmm::start(&dir, "a", &["--mem", "256M", "--vcpus", "1"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", &uri(port)]);
    assert_eq!(a.run_state(), RunState::Running);
    assert_eq!(b.run_state(), RunState::Inmigrate);
    assert_eq!(a.status(), None, "no migration yet: query-migrate is {{}}");
    a.enable_events();
    a.migrate(uri(port));
    let mut remaining = Vec::new();
    let t0 = Instant::now();
    let end = loop {
        let info = a.qmp.query_migrate().expect("query-migrate");
        let status = info.status.expect("a migration has a status");
        if let Some(ram) = &info.ram {
            assert_eq!(ram.total, 256 << 20);
            remaining.push(ram.remaining);
        }
        if !status.is_running() {
            break status;
        }
        assert!(t0.elapsed() < MIGRATION_TIMEOUT, "no end; {}", read(&a.stderr));
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(end, MigrationStatus::Completed, "{}", read(&a.stderr));
    // Remaining falls: never up, from more than half the RAM to nothing.
    assert!(remaining.windows(2).all(|w| w[1] <= w[0]), "remaining went up: {remaining:?}");
    assert_eq!(remaining.last(), Some(&0));
    let distinct = remaining.iter().collect::<std::collections::BTreeSet<_>>().len();
    assert!(distinct >= 3, "query-migrate did not show the migration advance: {remaining:?}");
    let events = a.migration_events();
    assert_eq!(events.first(), Some(&MigrationStatus::Setup), "{events:?}");
    assert_eq!(events.last(), Some(&MigrationStatus::Completed), "{events:?}");
    assert!(events.contains(&MigrationStatus::PostcopyActive), "{events:?}");
    assert!(events.windows(2).all(|w| rank(w[0]) < rank(w[1])), "events out of order: {events:?}");
    assert_eq!(b.wait_ended(), MigrationStatus::Completed);
    assert_eq!(a.run_state(), RunState::Postmigrate);
    assert_eq!(b.run_state(), RunState::Running);
    let info = a.qmp.query_migrate().expect("query-migrate");
    assert!(info.total_time.is_some_and(|t| t > 0) && info.downtime.is_some(), "{info:?}");
    assert_hop_verified(&mut a, &mut b, 1);
    a.quit();
    b.quit();
}

#[test]
fn migrate_cancel_before_the_switchover_keeps_the_guest_on_the_source() {
    if !kvm_or_skip("migrate_cancel_before_the_switchover_keeps_the_guest_on_the_source") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-cancel");
    let port = free_port();
    let mut a = Vmm::start(&dir, "a", &["--mem", "128M", "--vcpus", "1"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", "defer"]);
    b.listen(uri(port));
    a.enable_events();
    // Precopy rounds until cancelled (a round of a guest that barely runs
    // takes tens of microseconds): the switchover does not come first.
    a.precopy_rounds(ENDLESS_ROUNDS);
    a.migrate(uri(port));
    let t0 = Instant::now();
    while a.status() != Some(MigrationStatus::Active) {
        assert!(t0.elapsed() < MIGRATION_TIMEOUT, "precopy never became active; {}", read(&a.stderr));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(a.run_state(), RunState::Running, "precopy runs the guest");
    a.execute(Qmp::MigrateCancel);
    assert_eq!(a.wait_ended(), MigrationStatus::Cancelled, "{}", read(&a.stderr));
    let events = a.migration_events();
    assert_eq!(events.first(), Some(&MigrationStatus::Setup), "{events:?}");
    assert!(events.ends_with(&[MigrationStatus::Cancelling, MigrationStatus::Cancelled]), "{events:?}");
    assert_eq!(a.run_state(), RunState::Running, "the guest keeps running on the source");
    assert_eq!(b.wait_ended(), MigrationStatus::Failed);
    assert_eq!(b.run_state(), RunState::Inmigrate);
    // The guest still runs and is intact here, and can still leave.
    let report = a.verify();
    assert_eq!(report["ok"], true, "{report:#}");
    let port = free_port();
    b.listen(uri(port));
    a.precopy_rounds(0);
    a.migrate(uri(port));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    assert_hop_verified(&mut a, &mut b, 1);
    a.quit();
    b.quit();
}

#[test]
fn ping_pong_ten_hops_over_three_processes_every_hop_verified() {
    if !kvm_or_skip("ping_pong_ten_hops_over_three_processes_every_hop_verified") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-ping-pong");
    let mut vmms = [
        Vmm::start(&dir, "a", &["--mem", "64M", "--vcpus", "2"]),
        Vmm::start(&dir, "b", &["--incoming", "defer"]),
        Vmm::start(&dir, "c", &["--incoming", "defer", "--prealloc", "64M"]),
    ];
    // A process waiting for its guest cannot migrate it (as QEMU refuses).
    let refused = vmms[1].qmp.execute(&Qmp::Migrate(MigrateArgs { uri: uri(free_port()), resume: false }));
    let error = refused.expect_err("migrate before the guest arrived");
    assert_eq!(error.qmp_error().map(|e| e.desc.as_str()), Some("Guest is waiting for an incoming migration"));
    // A <-> B back and forth, then a chain over all three; even hops are
    // hybrid (two precopy rounds), odd ones pure postcopy; hop 5's
    // connections are cut during postcopy and recovered.
    let route = [0, 1, 0, 1, 2, 0, 2, 1, 0, 1, 0];
    let cut_hop = 5;
    for (hop, pair) in route.windows(2).enumerate().map(|(i, w)| (i + 1, (w[0], w[1]))) {
        let (from, to) = pair;
        let rounds = if hop % 2 == 0 { 2 } else { 0 };
        let port = free_port();
        let relay = (hop == cut_hop).then(|| {
            // 64 MiB of pages: cut after 24 MiB, well past the switchover.
            let relay = common::Relay::start(24 << 20);
            relay.set_target(format!("127.0.0.1:{port}").parse().expect("address"));
            relay
        });
        vmms[to].listen(uri(port));
        vmms[from].precopy_rounds(rounds);
        vmms[from].migrate(uri(relay.as_ref().map_or(port, |r| r.addr.port())));
        let (source, dest) = pick(&mut vmms, from, to);
        assert_eq!(source.wait_ended(), MigrationStatus::Completed, "hop {hop}: {}", read(&source.stderr));
        assert_eq!(dest.wait_ended(), MigrationStatus::Completed, "hop {hop}: {}", read(&dest.stderr));
        assert_eq!(source.run_state(), RunState::Postmigrate, "hop {hop}");
        assert_eq!(dest.run_state(), RunState::Running, "hop {hop}");
        let info = source.qmp.query_migrate().expect("query-migrate");
        assert_eq!(info.ram.as_ref().map(|r| r.dirty_sync_count), Some(rounds), "hop {hop}: precopy rounds");
        let recoveries = info.x_postcopy.and_then(|x| x.recoveries).unwrap_or(0);
        if let Some(relay) = &relay {
            assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst), "hop {hop}: the relay never cut");
            assert!(recoveries >= 1, "hop {hop}: no recovery after the cut");
        } else {
            assert_eq!(recoveries, 0, "hop {hop}");
        }
        assert_hop_verified(source, dest, hop);
    }
    for vmm in vmms {
        vmm.quit();
    }
}

/// Two distinct elements of `vmms`, mutably.
fn pick(vmms: &mut [Vmm], a: usize, b: usize) -> (&mut Vmm, &mut Vmm) {
    assert_ne!(a, b, "a hop goes between two processes");
    if a < b {
        let (low, high) = vmms.split_at_mut(b);
        (&mut low[a], &mut high[0])
    } else {
        let (low, high) = vmms.split_at_mut(a);
        (&mut high[0], &mut low[b])
    }
}

#[test]
fn a_damaged_page_fails_the_hops_verification() {
    if !kvm_or_skip("a_damaged_page_fails_the_hops_verification") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-damage");
    let port = free_port();
    let mut a = Vmm::start(&dir, "a", &["--mem", "64M", "--vcpus", "1"]);
    let damage = [("POSTCOPY_TEST_DAMAGE", "corrupt:3000")];
    let mut b = Vmm::start_with_env(&dir, "b", &["--incoming", &uri(port)], &damage);
    a.migrate(uri(port));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    let sent = sent_digest(&mut a);
    let report = b.verify();
    assert_ne!(report["arrived-digest"]["digest"], Value::String(sent), "the digests missed it: {report:#}");
    assert_eq!(report["ok"], false, "the pattern check missed it: {report:#}");
    let pattern = &report["pattern"];
    let found = pattern["bad_pages"].as_u64().unwrap_or(0) + pattern["guest_reported_errors"].as_u64().unwrap_or(0);
    assert!(found >= 1, "{report:#}");
}

/// `postcopy ctl --qmp PATH ARGS...`, to its end.
fn ctl(socket: &Path, args: &[&str]) -> common::Finished {
    let child = Command::new(binary())
        .arg("ctl")
        .arg("--qmp")
        .arg(socket)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start postcopy ctl");
    common::collect(child, MIGRATION_TIMEOUT)
}

#[test]
fn ctl_sends_commands_and_watches_a_migration() {
    if !kvm_or_skip("ctl_sends_commands_and_watches_a_migration") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-ctl");
    let port = free_port();
    let a = Vmm::start(&dir, "a", &["--mem", "64M", "--vcpus", "1"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", &uri(port)]);
    let (a_socket, b_socket) = (dir.join("a.sock"), dir.join("b.sock"));
    let status = ctl(&b_socket, &["query-status"]);
    assert!(status.success, "{}", status.stderr);
    let reply: Value = serde_json::from_str(&status.stdout).expect("pretty JSON");
    assert_eq!(reply["status"], "inmigrate");
    let unknown = ctl(&a_socket, &["migrate-now"]);
    assert_eq!(unknown.code, Some(1));
    assert!(unknown.stderr.contains("CommandNotFound"), "{}", unknown.stderr);
    let bad = ctl(&a_socket, &["migrate", "[1]"]);
    assert!(!bad.success && bad.stderr.contains("not a JSON object"), "{}", bad.stderr);
    let events = r#"{"capabilities": [{"capability": "events", "state": true}]}"#;
    assert!(ctl(&a_socket, &["migrate-set-capabilities", events]).success);
    let migrate = ctl(&a_socket, &["migrate", &format!(r#"{{"uri": "{}"}}"#, uri(port))]);
    assert!(migrate.success, "{}", migrate.stderr);
    let watch = ctl(&a_socket, &["watch"]);
    assert!(watch.success, "{}", watch.stderr);
    assert!(watch.stdout.contains(r#"event MIGRATION {"status":"completed"}"#), "{}", watch.stdout);
    let last = watch.stdout.rsplit('\r').next().unwrap_or_default();
    assert!(last.contains("completed") && last.contains("100.0%"), "{last:?}");
    assert_eq!(b.wait_ended(), MigrationStatus::Completed);
    assert_eq!(b.run_state(), RunState::Running);
    drop(a);
}

#[test]
fn demo_runs_two_vmm_processes_over_qmp() {
    if !kvm_or_skip("demo_runs_two_vmm_processes_over_qmp") {
        return;
    }
    let _one = serial();
    let child = Command::new(binary())
        .args(["demo", "--mem", "64M", "--vcpus", "1", "--mode", "hybrid", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start postcopy demo");
    let out = common::collect(child, MIGRATION_TIMEOUT);
    assert!(out.success, "{}", out.stderr);
    let report: Value = serde_json::from_str(&out.stdout[out.stdout.find('{').expect("JSON")..]).expect("report");
    assert_eq!(report["integrity_ok"], true, "{report:#}");
    assert_eq!(report["digests_match"], true);
    assert_eq!(report["source"]["mode"], "hybrid");
    assert_eq!(report["source"]["stats"]["precopy_rounds"], 2);
    assert!(report["destination"]["pattern"]["pages_checked"].as_u64().unwrap_or(0) > 0, "{report:#}");
}

#[test]
fn migrate_start_postcopy_ends_the_precopy_rounds() {
    if !kvm_or_skip("migrate_start_postcopy_ends_the_precopy_rounds") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-start-postcopy");
    let port = free_port();
    let mut a = Vmm::start(&dir, "a", &["--mem", "128M", "--vcpus", "1"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", &uri(port)]);
    a.enable_events();
    // Without the switch, these rounds would take minutes.
    a.precopy_rounds(ENDLESS_ROUNDS);
    a.migrate(uri(port));
    let t0 = Instant::now();
    while a.qmp.query_migrate().expect("query-migrate").ram.is_none_or(|r| r.dirty_sync_count < 2) {
        assert!(t0.elapsed() < MIGRATION_TIMEOUT, "no precopy round; {}", read(&a.stderr));
        std::thread::sleep(Duration::from_millis(5));
    }
    a.execute(Qmp::MigrateStartPostcopy);
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    let rounds = a.qmp.query_migrate().expect("query-migrate").ram.map_or(0, |r| r.dirty_sync_count);
    assert!((2..ENDLESS_ROUNDS).contains(&rounds), "the switch did not end the rounds: {rounds}");
    let events = a.migration_events();
    let expected =
        [MigrationStatus::Setup, MigrationStatus::Active, MigrationStatus::PostcopyActive, MigrationStatus::Completed];
    assert_eq!(events, expected, "{events:?}");
    assert_hop_verified(&mut a, &mut b, 1);
}

#[test]
fn qemu_qmp_library_drives_a_real_migration() {
    const INSTALL: &str = "python3 -m pip install qemu.qmp (add --break-system-packages on a system Python)";
    if !kvm_or_skip("qemu_qmp_library_drives_a_real_migration") {
        return;
    }
    let probe = Command::new("python3").args(["-c", "import qemu.qmp"]).stderr(Stdio::null()).status();
    if !probe.is_ok_and(|s| s.success()) {
        let required = std::env::var("POSTCOPY_REQUIRE_QEMU_QMP").is_ok_and(|v| v == "1");
        assert!(!required, "POSTCOPY_REQUIRE_QEMU_QMP=1 but python3 cannot import qemu.qmp; {INSTALL}");
        eprintln!("SKIPPED qemu_qmp_library_drives_a_real_migration: no qemu.qmp; {INSTALL}");
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-qemu-qmp");
    let port = free_port();
    let a = Vmm::start(&dir, "a", &["--mem", "64M", "--vcpus", "2"]);
    let b = Vmm::start(&dir, "b", &["--incoming", &uri(port)]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qemu_qmp_vmm.py");
    let child = Command::new("python3")
        .arg(script)
        .arg(dir.join("a.sock"))
        .arg(dir.join("b.sock"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let out = common::collect(child, MIGRATION_TIMEOUT);
    println!("{}", out.stdout);
    assert!(out.success, "{script} failed:\n{}\n{}\n{}", out.stdout, out.stderr, read(&a.stderr));
    assert!(out.stdout.contains("checks passed"), "{}", out.stdout);
    for mut vmm in [a, b] {
        let t0 = Instant::now();
        while !matches!(vmm.child.try_wait(), Ok(Some(_))) {
            assert!(t0.elapsed() < Duration::from_secs(10), "{} did not exit after quit", vmm.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn stop_and_cont_pause_and_resume_the_guest_with_events() {
    if !kvm_or_skip("stop_and_cont_pause_and_resume_the_guest_with_events") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-stop-cont");
    let mut a = Vmm::start(&dir, "a", &["--mem", "64M", "--vcpus", "2"]);
    a.execute(Qmp::Stop);
    assert_eq!(a.qmp.wait_event("STOP", Duration::from_secs(5)).map(|e| e.name).ok().as_deref(), Some("STOP"));
    assert_eq!(
        a.qmp.query_status().expect("query-status"),
        postcopy_qmp::StatusInfo { running: false, status: RunState::Paused }
    );
    // A paused guest checks out and stays paused: its passes do not advance.
    let passes = |vmm: &mut Vmm| vmm.verify()["pattern"]["passes_after"].as_u64().expect("passes");
    let before = passes(&mut a);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(passes(&mut a), before, "the check resumed a paused guest");
    let refused = a.qmp.execute(&Qmp::Migrate(MigrateArgs { uri: uri(free_port()), resume: false }));
    let error = refused.expect_err("migrate while paused");
    assert!(error.qmp_error().is_some_and(|e| e.desc.contains("'cont' first")), "{error}");
    a.execute(Qmp::Cont);
    assert!(a.qmp.wait_event("RESUME", Duration::from_secs(5)).is_ok());
    assert_eq!(a.run_state(), RunState::Running);
    std::thread::sleep(Duration::from_millis(500));
    assert!(passes(&mut a) > before, "cont did not resume the guest");
    assert_eq!(a.verify()["ok"], true);
    a.quit();
}

/// Turns `capability` on or off.
fn set_capability(vmm: &mut Vmm, capability: MigrationCapability, state: bool) {
    vmm.execute(Qmp::MigrateSetCapabilities { capabilities: vec![MigrationCapabilityStatus { capability, state }] });
}

/// Polls until the migration's status is `status`.
fn wait_status(vmm: &mut Vmm, status: MigrationStatus) {
    let t0 = Instant::now();
    while vmm.status() != Some(status) {
        assert!(t0.elapsed() < MIGRATION_TIMEOUT, "{}: never {status}; {}", vmm.name, read(&vmm.stderr));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The description of the error `command` gets.
fn refusal(vmm: &mut Vmm, command: Qmp) -> String {
    let error = vmm.qmp.execute(&command).expect_err("the command is refused");
    error.qmp_error().map(|e| e.desc.clone()).unwrap_or_else(|| panic!("not a QMP error: {error}"))
}

fn resume_to(port: u16) -> Qmp {
    Qmp::Migrate(MigrateArgs { uri: uri(port), resume: true })
}

const PAUSE_OUTSIDE_POSTCOPY: &str =
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state";
const RECOVER_NOT_PAUSED: &str = "Migrate recover can only be run when postcopy is paused.";
const NO_PAUSED_MIGRATION: &str = "Cannot resume if there is no paused migration";

#[test]
fn manual_recovery_pauses_and_resumes_to_a_new_address() {
    if !kvm_or_skip("manual_recovery_pauses_and_resumes_to_a_new_address") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-manual-recovery");
    let (first_port, new_port) = (free_port(), free_port());
    let mut a = Vmm::start(&dir, "a", &["--mem", "256M", "--vcpus", "2"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", "defer"]);
    for vmm in [&mut a, &mut b] {
        set_capability(vmm, MigrationCapability::XPostcopyAutoRecover, false);
        vmm.enable_events();
    }
    b.listen(uri(first_port));
    // A slow link: the migration is still in postcopy when it is paused.
    let relay = common::Relay::start_throttled(16 << 20);
    relay.set_target(format!("127.0.0.1:{first_port}").parse().expect("address"));
    a.migrate(uri(relay.addr.port()));
    wait_status(&mut a, MigrationStatus::PostcopyActive);
    a.execute(Qmp::MigratePause);
    wait_status(&mut a, MigrationStatus::PostcopyPaused);
    wait_status(&mut b, MigrationStatus::PostcopyPaused);
    // Nothing happens by itself: both wait, and the destination's first
    // address no longer listens.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.status(), Some(MigrationStatus::PostcopyPaused), "{}", read(&a.stderr));
    assert_eq!(b.status(), Some(MigrationStatus::PostcopyPaused), "{}", read(&b.stderr));
    assert!(std::net::TcpStream::connect(("127.0.0.1", first_port)).is_err(), "the paused destination listens");
    assert_eq!(a.run_state(), RunState::FinishMigrate, "the guest never runs on the source again");
    assert_eq!(b.run_state(), RunState::Running, "the guest runs on the destination where its pages are");
    // The destination listens on a new address; the source resumes there.
    b.execute(Qmp::MigrateRecover { uri: uri(new_port) });
    let again = refusal(&mut b, Qmp::MigrateRecover { uri: uri(free_port()) });
    assert_eq!(again, "Migrate recovery is triggered already");
    a.execute(resume_to(new_port));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    let info = a.qmp.query_migrate().expect("query-migrate");
    assert!(info.x_postcopy.and_then(|x| x.recoveries).is_some_and(|r| r >= 1), "no recovery counted");
    let events = a.migration_events();
    let paused_at = events.iter().position(|&s| s == MigrationStatus::PostcopyPaused).expect("paused event");
    assert_eq!(
        &events[paused_at..],
        [
            MigrationStatus::PostcopyPaused,
            MigrationStatus::PostcopyRecover,
            MigrationStatus::PostcopyActive,
            MigrationStatus::Completed
        ],
        "{events:?}"
    );
    let b_events = b.migration_events();
    assert!(b_events.contains(&MigrationStatus::PostcopyRecover), "{b_events:?}");
    assert_hop_verified(&mut a, &mut b, 1);
    a.quit();
    b.quit();
}

#[test]
fn pause_resume_and_recover_refused_in_the_wrong_state_and_a_held_pause_resumes() {
    if !kvm_or_skip("pause_resume_and_recover_refused_in_the_wrong_state_and_a_held_pause_resumes") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-pause-states");
    let port = free_port();
    let mut a = Vmm::start(&dir, "a", &["--mem", "256M", "--vcpus", "1"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", &uri(port)]);
    // No migration yet: QEMU's errors.
    assert_eq!(refusal(&mut a, Qmp::MigratePause), PAUSE_OUTSIDE_POSTCOPY);
    assert_eq!(refusal(&mut a, resume_to(port)), NO_PAUSED_MIGRATION);
    assert_eq!(refusal(&mut b, Qmp::MigrateRecover { uri: uri(free_port()) }), RECOVER_NOT_PAUSED);
    // Automatic recovery stays on: a user's pause still holds the
    // migration until the user resumes it.
    let relay = common::Relay::start_throttled(16 << 20);
    relay.set_target(format!("127.0.0.1:{port}").parse().expect("address"));
    a.migrate(uri(relay.addr.port()));
    wait_status(&mut a, MigrationStatus::PostcopyActive);
    wait_status(&mut b, MigrationStatus::PostcopyActive);
    assert_eq!(refusal(&mut a, resume_to(port)), NO_PAUSED_MIGRATION);
    assert_eq!(refusal(&mut b, Qmp::MigrateRecover { uri: uri(free_port()) }), RECOVER_NOT_PAUSED);
    a.execute(Qmp::MigratePause);
    wait_status(&mut a, MigrationStatus::PostcopyPaused);
    wait_status(&mut b, MigrationStatus::PostcopyPaused);
    assert_eq!(refusal(&mut a, Qmp::MigratePause), PAUSE_OUTSIDE_POSTCOPY, "paused already");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(a.status(), Some(MigrationStatus::PostcopyPaused), "a user's pause holds: {}", read(&a.stderr));
    // The destination recovers automatically: it still listens where it
    // did; the source resumes there, past the slow link.
    a.execute(resume_to(port));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    assert_eq!(refusal(&mut a, Qmp::MigratePause), PAUSE_OUTSIDE_POSTCOPY, "completed");
    assert_eq!(refusal(&mut b, Qmp::MigrateRecover { uri: uri(free_port()) }), RECOVER_NOT_PAUSED);
    assert_hop_verified(&mut a, &mut b, 1);
    a.quit();
    b.quit();
}

/// The MIGRATION_PASS numbers received so far, in order.
fn pass_events(vmm: &mut Vmm) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(event) = vmm.qmp.next_event(Some(Duration::ZERO)).expect("events") {
        if let Some(postcopy_qmp::Event::MigrationPass { pass }) = event.event() {
            out.push(pass);
        }
    }
    out
}

#[test]
fn migration_pass_events_and_postcopy_blocktime_fields() {
    if !kvm_or_skip("migration_pass_events_and_postcopy_blocktime_fields") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-blocktime");
    let port = free_port();
    let mut a = Vmm::start(&dir, "a", &["--mem", "128M", "--vcpus", "2"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", &uri(port)]);
    // Hop 1, hybrid with two rounds: one MIGRATION_PASS per pass over RAM.
    a.enable_events();
    a.precopy_rounds(2);
    a.migrate(uri(port));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    assert_eq!(pass_events(&mut a), [1, 2]);
    assert_hop_verified(&mut a, &mut b, 1);
    // Without the capability, no blocktime field.
    let info = b.qmp.query_migrate().expect("query-migrate");
    assert!(info.postcopy_latency.is_none() && info.postcopy_latency_dist.is_none(), "{info:?}");
    assert!(info.postcopy_blocktime.is_none() && info.postcopy_vcpu_blocktime.is_none(), "{info:?}");
    // Hop 2, pure postcopy to A with the capability: the fields appear and agree.
    set_capability(&mut a, MigrationCapability::PostcopyBlocktime, true);
    let port = free_port();
    a.listen(uri(port));
    b.enable_events();
    b.migrate(uri(port));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(pass_events(&mut b), Vec::<u64>::new(), "pure postcopy makes no pass over RAM while the guest runs");
    assert_hop_verified(&mut b, &mut a, 2);
    let info = a.qmp.query_migrate().expect("query-migrate");
    let report = a.verify();
    let faults = report["last-incoming"]["fault_latency"]["count"].as_u64().expect("fault count");
    assert!(faults > 0, "no remote fault to measure: {report:#}");
    let dist = info.postcopy_latency_dist.clone().expect("postcopy-latency-dist");
    assert_eq!(dist.len(), 24);
    assert_eq!(dist.iter().sum::<u64>(), faults, "one bucket entry per remote fault: {dist:?}");
    let latency_ns = info.postcopy_latency.expect("postcopy-latency");
    let mean_us = report["last-incoming"]["fault_latency"]["mean_us"].as_f64().expect("mean");
    assert!(
        (latency_ns as f64 / 1000.0 - mean_us).abs() <= mean_us * 0.02 + 1.0,
        "postcopy-latency {latency_ns} ns vs the driver's mean {mean_us} us"
    );
    let vcpu = info.postcopy_vcpu_blocktime.clone().expect("postcopy-vcpu-blocktime (userfaultfd thread ids)");
    assert_eq!(vcpu.len(), 2, "{info:?}");
    let all = info.postcopy_blocktime.expect("postcopy-blocktime");
    // Every vCPU blocked at once is at most each one's blocked time (ms, rounded down).
    assert!(vcpu.iter().all(|&v| all <= v + 1), "blocktime {all} ms vs per vCPU {vcpu:?}");
    assert!(all <= vcpu.iter().sum::<u32>() + 1);
    println!("blocktime fields: {all} ms, per vCPU {vcpu:?} ms, latency {latency_ns} ns, {faults} faults, {dist:?}");
    let vcpu_latency = info.postcopy_vcpu_latency.clone().expect("postcopy-vcpu-latency");
    assert_eq!(vcpu_latency.len(), 2);
    assert!(vcpu_latency.iter().any(|&ns| ns > 0), "{vcpu_latency:?}");
    a.quit();
    b.quit();
}

#[test]
fn dump_memory_at_quit_and_exit_on_error() {
    if !kvm_or_skip("dump_memory_at_quit_and_exit_on_error") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-dump-exit");
    let (dump_a, dump_b) = (dir.join("a.mem"), dir.join("b.mem"));
    let port = free_port();
    let a_args = ["--mem", "64M", "--vcpus", "1", "--dump-memory", dump_a.to_str().expect("path")];
    let mut a = Vmm::start(&dir, "a", &a_args);
    let mut b = Vmm::start(&dir, "b", &["--incoming", "defer", "--dump-memory", dump_b.to_str().expect("path")]);
    b.listen(uri(port));
    a.migrate(uri(port));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(b.wait_ended(), MigrationStatus::Completed, "{}", read(&b.stderr));
    assert_hop_verified(&mut a, &mut b, 1);
    // The guest left A: nothing to dump there. B writes the arrived guest's RAM.
    a.quit();
    assert!(!dump_a.exists(), "a process whose guest left dumped memory");
    b.quit();
    let memory = std::fs::read(&dump_b).expect("the dump");
    assert_eq!(memory.len(), 64 << 20);
    let zero_pages = memory.chunks(4096).filter(|p| p.iter().all(|&x| x == 0)).count();
    assert!(zero_pages < memory.len() / 4096 / 2, "the pattern guest's memory is mostly zeros: {zero_pages} pages");
    // exit-on-error: a failed incoming migration ends the process, with a failure status.
    let mut c = Vmm::start(&dir, "c", &["--mem", "64M", "--vcpus", "1"]);
    let mut d = Vmm::start(&dir, "d", &["--incoming", "defer"]);
    let port = free_port();
    d.execute(Qmp::MigrateIncoming(MigrateIncomingArgs { uri: uri(port), exit_on_error: Some(true) }));
    c.precopy_rounds(ENDLESS_ROUNDS);
    c.migrate(uri(port));
    wait_status(&mut c, MigrationStatus::Active);
    c.execute(Qmp::MigrateCancel);
    assert_eq!(c.wait_ended(), MigrationStatus::Cancelled);
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = d.child.try_wait() {
            break status;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "d did not exit; {}", read(&d.stderr));
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success(), "exit-on-error exits with a failure status");
    assert!(read(&d.stderr).contains("exit-on-error"), "{}", read(&d.stderr));
    assert_eq!(c.run_state(), RunState::Running, "the guest keeps running on the source");
    c.quit();
}

/// The state of `capability` in a `query-migrate-capabilities` reply.
fn capability_state(caps: &Value, capability: &str) -> bool {
    let listed = caps.as_array().expect("a list of capabilities");
    let entry = listed.iter().find(|c| c["capability"] == capability);
    entry.and_then(|c| c["state"].as_bool()).unwrap_or_else(|| panic!("{capability} not listed: {caps}"))
}

/// The command line's migration choices are where QMP starts from (as
/// QEMU's `-global migration.*`): `--no-urgent`, `--no-prepaging` and
/// `--max-postcopy-bandwidth` show in the capabilities and parameters that
/// the next migration uses (they were ignored: every `run` started from the
/// built-in defaults), and `max-postcopy-bandwidth` can be set over QMP.
#[test]
fn command_line_migration_settings_are_the_qmp_starting_values() {
    if !kvm_or_skip("command_line_migration_settings_are_the_qmp_starting_values") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-command-line");
    // Deferred: capabilities cannot change while an incoming migration waits.
    let mut plain = Vmm::start(&dir, "plain", &["--incoming", "defer"]);
    let mut chosen = Vmm::start(
        &dir,
        "chosen",
        &["--incoming", &uri(free_port()), "--no-urgent", "--no-prepaging", "--max-postcopy-bandwidth", "1M"],
    );
    let (plain_caps, chosen_caps) =
        (plain.execute(Qmp::QueryMigrateCapabilities), chosen.execute(Qmp::QueryMigrateCapabilities));
    for capability in ["postcopy-preempt", "x-postcopy-prepaging"] {
        assert!(capability_state(&plain_caps, capability), "{capability} off by default: {plain_caps}");
        assert!(!capability_state(&chosen_caps, capability), "{capability} on despite the command line: {chosen_caps}");
    }
    assert!(capability_state(&chosen_caps, "postcopy-ram"));
    let bandwidth = |vmm: &mut Vmm| vmm.execute(Qmp::QueryMigrateParameters)["max-postcopy-bandwidth"].as_u64();
    assert_eq!(bandwidth(&mut plain), Some(0));
    assert_eq!(bandwidth(&mut chosen), Some(1 << 20));
    // QMP changes them from there; precopy's rate cannot be limited.
    plain.set_parameters(MigrationParameters { max_postcopy_bandwidth: Some(5000), ..Default::default() });
    set_capability(&mut plain, MigrationCapability::XPostcopyPrepaging, false);
    assert_eq!(bandwidth(&mut plain), Some(5000));
    assert!(!capability_state(&plain.execute(Qmp::QueryMigrateCapabilities), "x-postcopy-prepaging"));
    let refused = refusal(
        &mut plain,
        Qmp::MigrateSetParameters(MigrationParameters { max_bandwidth: Some(1), ..Default::default() }),
    );
    assert!(refused.contains("max-bandwidth"), "{refused}");
}

/// Fallback's checkpoint memory is reserved when fallback is turned on: at
/// start from the command line, and when `migrate-set-capabilities` turns
/// it on, in the background.
#[test]
fn checkpoint_memory_is_reserved_when_fallback_is_turned_on() {
    if !kvm_or_skip("checkpoint_memory_is_reserved_when_fallback_is_turned_on") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-checkpoint-memory");
    let info = [("POSTCOPY_LOG", "info")];
    let reserved = |vmm: &Vmm| vmm.stderr_text().lines().filter(|l| l.contains("checkpoint memory reserved")).count();
    let mut later = Vmm::start_with_env(&dir, "later", &["--incoming", "defer", "--prealloc", "64M"], &info);
    let at_start = Vmm::start_with_env(
        &dir,
        "at-start",
        &["--incoming", "defer", "--fallback", "checkpoint", "--checkpoint-reserve", "16M"],
        &info,
    );
    // Reserved before the VMM serves QMP; the explicit size counts.
    assert_eq!(reserved(&at_start), 1, "{}", at_start.stderr_text());
    assert!(at_start.stderr_text().contains("mib=16"), "{}", at_start.stderr_text());
    assert_eq!(reserved(&later), 0, "reserved with fallback off: {}", later.stderr_text());
    later.set_capability(MigrationCapability::XPostcopyFallback, true);
    let t0 = Instant::now();
    while reserved(&later) == 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Half of `--prealloc`, once: turning it on again keeps what is there.
    assert_eq!(reserved(&later), 1, "{}", later.stderr_text());
    assert!(later.stderr_text().contains("mib=32"), "{}", later.stderr_text());
    later.set_capability(MigrationCapability::XPostcopyFallback, false);
    later.set_capability(MigrationCapability::XPostcopyFallback, true);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(reserved(&later), 1, "{}", later.stderr_text());
    later.quit();
    at_start.quit();
}

/// The pattern passes the guest in `vmm` completed, from `x-postcopy-verify`
/// (which also checks its memory against where its vCPUs stand).
fn verified_passes(vmm: &mut Vmm) -> u64 {
    let report = vmm.verify();
    assert_eq!(report["ok"], true, "{}: {report:#}", vmm.name);
    report["pattern"]["passes_after"].as_u64().unwrap_or_else(|| panic!("{}: no passes: {report:#}", vmm.name))
}

/// Fallback as an orchestrator sees it: with `x-postcopy-fallback` on both
/// sides (the source's command line, the destination's QMP), the source's
/// `query-migrate` counts the checkpoints it committed while postcopy runs;
/// once the destination process is killed (SIGKILL) it ends `failed`,
/// naming the checkpoint the guest restarted from, and the guest runs on
/// there (its passes advance, its memory checks out) and can leave again.
#[test]
fn a_killed_destination_leaves_the_guest_running_on_the_source_from_the_checkpoint_query_migrate_names() {
    if !kvm_or_skip(
        "a_killed_destination_leaves_the_guest_running_on_the_source_from_the_checkpoint_query_migrate_names",
    ) {
        return;
    }
    let _one = serial();
    let dir = temp_dir("qmp-fallback-kill");
    let port = free_port();
    // A short lease (the source's counts): the takeover comes about 0.6 s
    // after the destination's last word. The command line's lease is the
    // starting value, which QMP replaces; the destination follows the
    // source's lease (its own would be the default, 1 s) and takes a
    // checkpoint every 50 ms, set over QMP only.
    let mut a =
        Vmm::start(&dir, "a", &["--mem", "128M", "--vcpus", "1", "--fallback", "checkpoint", "--lease-ms", "900"]);
    let mut b = Vmm::start(&dir, "b", &["--incoming", "defer"]);
    let caps = b.execute(Qmp::QueryMigrateCapabilities);
    assert!(!capability_state(&caps, "x-postcopy-fallback"), "fallback on by default: {caps}");
    assert!(capability_state(&a.execute(Qmp::QueryMigrateCapabilities), "x-postcopy-fallback"));
    set_capability(&mut b, MigrationCapability::XPostcopyFallback, true);
    assert_eq!(a.execute(Qmp::QueryMigrateParameters)["x-fallback-lease-ms"].as_u64(), Some(900));
    a.set_parameters(MigrationParameters { x_fallback_lease_ms: Some(600), ..Default::default() });
    b.set_parameters(MigrationParameters { x_checkpoint_interval_ms: Some(50), ..Default::default() });
    b.listen(uri(port));
    // The push held (requested pages never are), so that postcopy lasts
    // seconds: the kill lands in it, after a checkpoint was committed.
    a.set_parameters(MigrationParameters { max_postcopy_bandwidth: Some(16 << 20), ..Default::default() });
    a.migrate(uri(port));
    let t0 = Instant::now();
    let committed = loop {
        let info = a.qmp.query_migrate().expect("query-migrate");
        let x = info.x_postcopy.unwrap_or_default();
        // Live: the bytes committed show while it runs, not only at the end.
        let bytes = x.checkpoint_bytes.unwrap_or(0);
        match (info.status, x.checkpoints_committed) {
            (Some(MigrationStatus::PostcopyActive), Some(n)) if n >= 1 && bytes > 0 => {
                assert_eq!(x.restarted_from_checkpoint, None, "no takeover yet");
                assert_eq!(x.checkpoints_discarded, Some(0), "{x:?}");
                break n;
            }
            (Some(status), _) if !status.is_running() => {
                panic!("the migration ended {status} before a checkpoint was committed: {}", read(&a.stderr))
            }
            _ => {}
        }
        assert!(t0.elapsed() < MIGRATION_TIMEOUT, "no checkpoint committed; {}", read(&a.stderr));
        std::thread::sleep(Duration::from_millis(5));
    };
    let committed_after_ms = t0.elapsed().as_millis();
    // The destination counts what it took: at least what was committed.
    let t1 = Instant::now();
    let on_b = loop {
        let x = b.qmp.query_migrate().expect("query-migrate").x_postcopy.unwrap_or_default();
        if x.checkpoints_taken >= Some(committed) {
            break x;
        }
        assert!(t1.elapsed() < Duration::from_secs(5), "the destination shows no checkpoint; {}", read(&b.stderr));
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!((on_b.lease_ms, on_b.checkpoint_interval_ms), (Some(600), Some(50)), "{on_b:?}");
    let on_a = a.qmp.query_migrate().expect("query-migrate").x_postcopy.unwrap_or_default();
    assert_eq!((on_a.lease_ms, on_a.checkpoint_interval_ms), (Some(600), None), "{on_a:?}");
    assert_eq!(a.status(), Some(MigrationStatus::PostcopyActive), "the kill must land in postcopy");
    b.child.kill().expect("SIGKILL the destination");
    let _ = b.child.wait();
    let killed = Instant::now();
    assert_eq!(a.wait_ended(), MigrationStatus::Failed, "{}", read(&a.stderr));
    let ended_after_ms = killed.elapsed().as_millis();
    let info = a.qmp.query_migrate().expect("query-migrate");
    let x = info.x_postcopy.clone().expect("x-postcopy");
    let final_committed = x.checkpoints_committed.expect("checkpoints-committed at the end");
    let restarted = x.restarted_from_checkpoint.unwrap_or_else(|| panic!("no restarted-from-checkpoint: {info:?}"));
    println!(
        "checkpoint {committed} committed {committed_after_ms} ms after migrate; {final_committed} in all \
         ({} bytes, {} discarded); restarted from {restarted}; failed {ended_after_ms} ms after the kill",
        x.checkpoint_bytes.unwrap_or(0),
        x.checkpoints_discarded.unwrap_or(0)
    );
    assert!(final_committed >= committed, "{info:?}");
    // From the last committed one, which is at least the one seen live.
    assert!((committed..=final_committed).contains(&restarted), "{info:?}");
    assert_eq!(restarted, final_committed, "not the last committed checkpoint: {info:?}");
    assert!(x.checkpoint_bytes.is_some_and(|b| b > 0) && x.checkpoints_discarded.is_some(), "{info:?}");
    assert_eq!(x.lease_ms, Some(600), "the lease in force, kept at the end: {info:?}");
    let error = info.error_desc.clone().unwrap_or_default();
    assert!(error.contains(&format!("took the guest back from checkpoint {restarted}")), "{error}");
    assert_eq!(a.run_state(), RunState::Running);
    // It runs: its passes advance, its memory matches its registers.
    let before = verified_passes(&mut a);
    std::thread::sleep(Duration::from_millis(500));
    let after = verified_passes(&mut a);
    assert!(after > before, "the guest does not run after the takeover: {before} then {after} passes");
    // And it can leave again, to a process with fallback on, verified.
    let port = free_port();
    let mut c = Vmm::start(&dir, "c", &["--incoming", &uri(port), "--fallback", "checkpoint"]);
    a.set_parameters(MigrationParameters { max_postcopy_bandwidth: Some(0), ..Default::default() });
    a.migrate(uri(port));
    assert_eq!(a.wait_ended(), MigrationStatus::Completed, "{}", read(&a.stderr));
    assert_eq!(c.wait_ended(), MigrationStatus::Completed, "{}", read(&c.stderr));
    assert_hop_verified(&mut a, &mut c, 2);
    let x = a.qmp.query_migrate().expect("query-migrate").x_postcopy.expect("x-postcopy");
    assert!(x.checkpoints_committed.is_some() && x.restarted_from_checkpoint.is_none(), "{x:?}");
    let x = c.qmp.query_migrate().expect("query-migrate").x_postcopy.expect("x-postcopy");
    assert!(x.checkpoints_taken.is_some(), "{x:?}");
    a.quit();
    c.quit();
}
