//! Two hosts on one machine: the source's and the destination's `postcopy
//! run` processes in two network namespaces joined by a veth pair, each
//! with its own address, driven over QMP from here. A plain migration
//! across the link, a link cut during postcopy (longer than the peer
//! timeout) that the migration recovers from by itself, and one migration
//! over a link shaped to 1 Gbit/s.

mod common;
mod hosts;
mod vmm;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, serial, temp_dir};
use hosts::TwoHosts;
use postcopy_qmp::{MigrationCapability, MigrationParameters, MigrationStatus, RunState};
use vmm::{assert_hop_verified, read, Vmm, MIGRATION_TIMEOUT};

/// The destination's port: each namespace has its own, so any will do.
const PORT: u16 = 4444;

/// A test's two hosts, held while it runs one test at a time. Fields drop
/// in order: the namespaces go before the next test may start.
struct Exclusive {
    hosts: TwoHosts,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for Exclusive {
    type Target = TwoHosts;
    fn deref(&self) -> &TwoHosts {
        &self.hosts
    }
}

/// KVM and the two hosts for test `name`, or None after printing why the
/// test is skipped.
fn hosts_or_skip(name: &str) -> Option<Exclusive> {
    if !kvm_or_skip(name) {
        return None;
    }
    let one = serial();
    TwoHosts::create_or_skip(name).map(|hosts| Exclusive { hosts, _one: one })
}

/// Starts the source (with its guest) and the destination in their
/// namespaces, runs `setup` on both, then has the destination listen on
/// its own address.
fn start_pair(hosts: &TwoHosts, dir: &std::path::Path, mem: &str, setup: impl Fn(&mut Vmm)) -> (Vmm, Vmm) {
    let mut source = Vmm::start_in(dir, "source", Some(&hosts.source.netns), &["--mem", mem, "--vcpus", "2"], &[]);
    let mut dest = Vmm::start_in(dir, "dest", Some(&hosts.dest.netns), &["--incoming", "defer"], &[]);
    setup(&mut source);
    setup(&mut dest);
    dest.listen(hosts.dest.uri(PORT));
    (source, dest)
}

/// Polls the source until postcopy is on and a tenth of the RAM crossed.
fn wait_for_postcopy_with_a_tenth_crossed(source: &mut Vmm) {
    let t0 = Instant::now();
    loop {
        let info = source.qmp.query_migrate().expect("query-migrate");
        let status = info.status.expect("a status");
        assert!(status.is_running(), "ended before the cut: {status}; {}", source.stderr_text());
        let ram = info.ram.unwrap_or_default();
        if status == MigrationStatus::PostcopyActive && ram.total > 0 && ram.remaining < ram.total * 9 / 10 {
            eprintln!("cut at {} of {} bytes remaining", ram.remaining, ram.total);
            return;
        }
        assert!(t0.elapsed() < MIGRATION_TIMEOUT, "postcopy never started; {}", source.stderr_text());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_migration_crosses_the_veth_between_two_namespaces() {
    let Some(hosts) = hosts_or_skip("a_migration_crosses_the_veth_between_two_namespaces") else {
        return;
    };
    let dir = temp_dir("two-hosts-plain");
    let (mut source, mut dest) = start_pair(&hosts, &dir, "128M", |_| {});
    assert_eq!(dest.qmp.query_status().expect("query-status").status, RunState::Inmigrate);
    let sent_before = hosts.source.tx_bytes();
    source.migrate(hosts.dest.uri(PORT));
    assert_eq!(source.wait_ended(), MigrationStatus::Completed, "{}", source.stderr_text());
    assert_eq!(dest.wait_ended(), MigrationStatus::Completed, "{}", dest.stderr_text());
    assert_eq!(dest.qmp.query_status().expect("query-status").status, RunState::Running);
    let info = source.qmp.query_migrate().expect("query-migrate");
    let transferred = info.ram.as_ref().map_or(0, |r| r.transferred);
    let crossed = hosts.source.tx_bytes() - sent_before;
    eprintln!("transferred {transferred} bytes; the source's veth sent {crossed} bytes");
    assert!(transferred > 0 && crossed >= transferred, "the pages did not cross the veth: {crossed} < {transferred}");
    assert_hop_verified(&mut source, &mut dest, 1);
    source.quit();
    dest.quit();
}

#[test]
fn a_link_cut_during_postcopy_is_recovered_automatically() {
    let Some(hosts) = hosts_or_skip("a_link_cut_during_postcopy_is_recovered_automatically") else {
        return;
    };
    let dir = temp_dir("two-hosts-cut");
    // A slow link (this VMM has no bandwidth limit of its own): the push
    // of 256 MiB takes seconds, so the cut lands in postcopy.
    hosts.source.shape("200mbit", "64kb");
    let peer_timeout_ms = 1_000;
    let parameters = MigrationParameters {
        x_peer_timeout_ms: Some(peer_timeout_ms),
        x_reconnect_delay_max_ms: Some(200),
        ..Default::default()
    };
    let (mut source, mut dest) = start_pair(&hosts, &dir, "256M", |vmm| {
        vmm.enable_events();
        vmm.set_parameters(parameters.clone());
    });
    source.migrate(hosts.dest.uri(PORT));
    // Cut once postcopy is on and a tenth of the RAM has crossed.
    wait_for_postcopy_with_a_tenth_crossed(&mut source);
    hosts.source.set_link(false);
    // Down for three peer timeouts: both sides notice and pause.
    let (mut seen_source, mut seen_dest) = (BTreeSet::new(), BTreeSet::new());
    let cut = Instant::now();
    while cut.elapsed() < Duration::from_millis(3 * peer_timeout_ms) {
        seen_source.insert(source.status().expect("a status").to_string());
        seen_dest.insert(dest.status().expect("a status").to_string());
        std::thread::sleep(Duration::from_millis(20));
    }
    hosts.source.set_link(true);
    let paused = MigrationStatus::PostcopyPaused.to_string();
    assert!(seen_source.contains(&paused), "source during the cut: {seen_source:?}; {}", source.stderr_text());
    assert!(seen_dest.contains(&paused), "destination during the cut: {seen_dest:?}; {}", dest.stderr_text());
    assert_eq!(source.wait_ended(), MigrationStatus::Completed, "{}", source.stderr_text());
    assert_eq!(dest.wait_ended(), MigrationStatus::Completed, "{}", dest.stderr_text());
    let (source_events, dest_events) = (source.migration_events(), dest.migration_events());
    eprintln!("source events {source_events:?}\ndestination events {dest_events:?}");
    // The source's RECOVERING spans a round trip (hello, then the report),
    // so its event is always seen. The destination's may not be: the event
    // that takes the resume hello can also write the whole present-page
    // report and leave RECOVERING, and an event is sent per state change
    // seen after a core event. There, postcopy-active must follow the pause.
    for (events, recover_seen) in [(&source_events, true), (&dest_events, false)] {
        let at = |s: MigrationStatus| events.iter().position(|&e| e == s);
        let paused = at(MigrationStatus::PostcopyPaused);
        let after_pause = if recover_seen {
            at(MigrationStatus::PostcopyRecover)
        } else {
            paused.and_then(|p| events[p..].iter().position(|&e| e == MigrationStatus::PostcopyActive).map(|i| p + i))
        };
        assert!(paused.is_some() && after_pause > paused, "no pause then recovery: {events:?}");
        assert_eq!(events.last(), Some(&MigrationStatus::Completed), "{events:?}");
    }
    for vmm in [&mut source, &mut dest] {
        let info = vmm.qmp.query_migrate().expect("query-migrate");
        let recoveries = info.x_postcopy.and_then(|x| x.recoveries).unwrap_or(0);
        assert!(recoveries >= 1, "{}: no recovery counted; {}", vmm.name, read(&vmm.stderr));
    }
    assert_hop_verified(&mut source, &mut dest, 1);
    source.quit();
    dest.quit();
}

#[test]
fn a_migration_over_a_1_gbit_link_takes_at_least_its_bytes_over_the_rate() {
    let Some(hosts) = hosts_or_skip("a_migration_over_a_1_gbit_link_takes_at_least_its_bytes_over_the_rate") else {
        return;
    };
    let dir = temp_dir("two-hosts-1gbit");
    let (mut a, mut b) = start_pair(&hosts, &dir, "512M", |_| {});
    // Unshaped first: the veth alone beats 1 Gbit/s, so the floor below
    // measures the shaper, not the machine.
    a.migrate(hosts.dest.uri(PORT));
    let unshaped = finish_and_time(&mut a, &mut b);
    assert!(unshaped.total_ms < unshaped.floor_ms, "the unshaped veth is no faster than 1 Gbit/s: {unshaped:?}");
    // Back over the link shaped to 1 Gbit/s where the guest now leaves.
    hosts.dest.shape("1gbit", "256kb");
    a.listen(hosts.source.uri(PORT));
    b.migrate(hosts.source.uri(PORT));
    let shaped = finish_and_time(&mut b, &mut a);
    // Loose: the bucket's burst and timer slack let a little more through;
    // a loaded machine may be slower than the link, but not by much.
    assert!(shaped.total_ms >= 0.9 * shaped.floor_ms, "faster than the link: {shaped:?}");
    assert!(shaped.total_ms <= 3.0 * shaped.floor_ms + 2_000.0, "far slower than the link: {shaped:?}");
    a.quit();
    b.quit();
}

/// A finished migration's total time and the least time its pages with
/// contents need at 1 Gbit/s.
#[derive(Debug)]
struct Timed {
    total_ms: f64,
    floor_ms: f64,
}

/// Waits for the migration from `source` to `dest` to complete, checks
/// the guest arrived intact and returns its timing.
fn finish_and_time(source: &mut Vmm, dest: &mut Vmm) -> Timed {
    const RATE_BITS_PER_S: f64 = 1e9;
    assert_eq!(source.wait_ended(), MigrationStatus::Completed, "{}", source.stderr_text());
    assert_eq!(dest.wait_ended(), MigrationStatus::Completed, "{}", dest.stderr_text());
    let info = source.qmp.query_migrate().expect("query-migrate");
    let ram = info.ram.clone().expect("ram statistics");
    let total_ms = info.total_time.expect("total-time") as f64;
    // The pages with contents cross the link; zero pages go as markers.
    assert!(ram.normal_bytes >= ram.total / 4, "too few pages with contents for a meaningful floor: {ram:?}");
    let floor_ms = ram.normal_bytes as f64 * 8.0 / RATE_BITS_PER_S * 1e3;
    eprintln!(
        "{} -> {}: {} MiB RAM, {} MiB with contents, total-time {total_ms} ms (1 Gbit/s floor {floor_ms:.0} ms), \
         query-migrate mbps {:.0}",
        source.name,
        dest.name,
        ram.total >> 20,
        ram.normal_bytes >> 20,
        ram.mbps
    );
    assert_hop_verified(source, dest, 1);
    Timed { total_ms, floor_ms }
}

#[test]
fn the_namespaces_and_the_veth_are_removed_even_when_a_test_fails() {
    let names = std::sync::Mutex::new(None);
    let failed = std::panic::catch_unwind(|| {
        let Some(hosts) = TwoHosts::create_or_skip("the_namespaces_and_the_veth_are_removed_even_when_a_test_fails")
        else {
            return;
        };
        *names.lock().unwrap_or_else(|e| e.into_inner()) = Some((hosts.source.clone(), hosts.dest.clone()));
        let listed = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
        assert!(String::from_utf8_lossy(&listed.stdout).contains(&hosts.source.netns));
        hosts.source.ip(&["link", "show", "dev", &hosts.source.dev]).expect("the veth end is in its namespace");
        panic!("a failing test");
    });
    let Some((source, dest)) = names.into_inner().unwrap_or_else(|e| e.into_inner()) else {
        return; // skipped
    };
    assert!(failed.is_err(), "the test body should have panicked");
    let listed = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for host in [&source, &dest] {
        assert!(!listed.contains(&host.netns), "{} left behind: {listed}", host.netns);
        let link = std::process::Command::new("ip").args(["link", "show", "dev", &host.dev]).output().expect("ip link");
        assert!(!link.status.success(), "{} left behind in this namespace", host.dev);
    }
}

/// Fallback (docs/fallback.md) across a partition: the link goes down in
/// postcopy for longer than the lease. The destination fences its guest
/// when its lease lapses; the source takes the guest back from the last
/// checkpoint after the lease surely lapsed; once the link is back, the
/// destination learns it was superseded and drops its copy. Exactly one
/// side runs the guest afterwards: the source.
#[test]
fn a_partition_longer_than_the_lease_leaves_the_guest_running_on_the_source_alone() {
    let name = "a_partition_longer_than_the_lease_leaves_the_guest_running_on_the_source_alone";
    let Some(hosts) = hosts_or_skip(name) else {
        return;
    };
    let dir = temp_dir("two-hosts-fallback");
    hosts.source.shape("200mbit", "64kb");
    let (mut source, mut dest) = start_pair(&hosts, &dir, "256M", |vmm| {
        vmm.enable_events();
        vmm.set_capability(MigrationCapability::XPostcopyFallback, true);
        vmm.set_parameters(MigrationParameters { x_reconnect_delay_max_ms: Some(200), ..Default::default() });
    });
    source.migrate(hosts.dest.uri(PORT));
    wait_for_postcopy_with_a_tenth_crossed(&mut source);
    hosts.source.set_link(false);
    // The default lease is 1 s; the source takes over about 1.02 s after
    // the destination's last word, while its reconnections still try.
    std::thread::sleep(Duration::from_millis(1_600));
    hosts.source.set_link(true);
    assert_eq!(source.wait_ended(), MigrationStatus::Failed, "{}", source.stderr_text());
    assert_eq!(dest.wait_ended(), MigrationStatus::Failed, "{}", dest.stderr_text());
    let (source_log, dest_log) = (source.stderr_text(), dest.stderr_text());
    let ctx = || format!("--- source ---\n{source_log}\n--- destination ---\n{dest_log}");
    assert!(source_log.contains("the guest runs here again, from checkpoint"), "no takeover\n{}", ctx());
    assert!(dest_log.contains("the lease lapsed: vCPUs fenced"), "the destination never fenced\n{}", ctx());
    assert!(dest_log.contains("this copy is dropped and never runs again"), "not superseded\n{}", ctx());
    // Exactly one runs it: the source.
    assert_eq!(source.run_state(), RunState::Running, "{}", ctx());
    assert_ne!(dest.run_state(), RunState::Running, "{}", ctx());
    source.quit();
    dest.quit();
}

/// A cut shorter than the lease, with fallback on, is an ordinary recovery:
/// both sides pause and resume, the destination keeps its lease (never
/// fenced), the source never takes over, nothing is rolled back, and the
/// migration completes verified with checkpoints committed.
#[test]
fn a_cut_shorter_than_the_lease_is_an_ordinary_recovery_with_fallback_on() {
    let name = "a_cut_shorter_than_the_lease_is_an_ordinary_recovery_with_fallback_on";
    let Some(hosts) = hosts_or_skip(name) else {
        return;
    };
    let dir = temp_dir("two-hosts-fallback-short-cut");
    hosts.source.shape("200mbit", "64kb");
    // The lease is 1 s (run's default); a loss is noticed after 150 ms of
    // silence and reconnections are tried every 100 ms at most.
    let parameters =
        MigrationParameters { x_peer_timeout_ms: Some(150), x_reconnect_delay_max_ms: Some(100), ..Default::default() };
    let (mut source, mut dest) = start_pair(&hosts, &dir, "256M", |vmm| {
        vmm.enable_events();
        vmm.set_capability(MigrationCapability::XPostcopyFallback, true);
        vmm.set_parameters(parameters.clone());
    });
    source.migrate(hosts.dest.uri(PORT));
    wait_for_postcopy_with_a_tenth_crossed(&mut source);
    hosts.source.set_link(false);
    std::thread::sleep(Duration::from_millis(300));
    hosts.source.set_link(true);
    assert_eq!(source.wait_ended(), MigrationStatus::Completed, "{}", source.stderr_text());
    assert_eq!(dest.wait_ended(), MigrationStatus::Completed, "{}", dest.stderr_text());
    let (source_log, dest_log) = (source.stderr_text(), dest.stderr_text());
    let ctx = || format!("--- source ---\n{source_log}\n--- destination ---\n{dest_log}");
    assert!(!source_log.contains("the guest runs here again"), "a takeover\n{}", ctx());
    assert!(!dest_log.contains("the lease lapsed"), "the destination fenced\n{}", ctx());
    let x = |vmm: &mut Vmm| vmm.qmp.query_migrate().expect("query-migrate").x_postcopy.expect("x-postcopy");
    let (sx, dx) = (x(&mut source), x(&mut dest));
    assert!(sx.recoveries.unwrap_or(0) >= 1 && dx.recoveries.unwrap_or(0) >= 1, "no recovery\n{}", ctx());
    assert!(sx.checkpoints_committed.unwrap_or(0) >= 1, "no checkpoint committed: {sx:?}");
    assert_eq!(sx.restarted_from_checkpoint, None, "rolled back: {sx:?}");
    assert_eq!(dest.run_state(), RunState::Running, "{}", ctx());
    assert_hop_verified(&mut source, &mut dest, 1);
    source.quit();
    dest.quit();
}
