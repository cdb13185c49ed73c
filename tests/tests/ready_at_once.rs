//! A destination ready at once (issue 17): `dest --prealloc` listens before
//! its RAM is populated and populates it in the background; a migration
//! accepted meanwhile has guest accesses on pages not allocated yet
//! (missing faults), and must still arrive whole.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Starts a source that boots its guest, writes `ready` once the guest is
/// ready to migrate, then waits for `dest_addr` (a destination's ready file).
fn start_waiting_source(dir: &Path, extra: &[&str]) -> Child {
    Command::new(binary())
        .args(["source", "--json", "--run-before-ms", "100", "--connect-file"])
        .arg(dir.join("dest.addr"))
        .arg("--ready-file")
        .arg(dir.join("source.ready"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source")
}

/// Starts `postcopy dest` with `extra` and returns it with the time it took
/// to write its address (to listen).
fn start_dest_timed(dir: &Path, extra: &[&str]) -> (Child, Duration) {
    let ready = dir.join("dest.addr");
    let _ = std::fs::remove_file(&ready);
    let t0 = Instant::now();
    let mut child = Command::new(binary())
        .args(["dest", "--listen", "127.0.0.1:0", "--json", "--run-after-ms", "300", "--ready-file"])
        .arg(&ready)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination");
    loop {
        if std::fs::metadata(&ready).is_ok() {
            return (child, t0.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = collect(child, Duration::from_secs(1));
            panic!("destination exited early ({status}): {}", out.stderr);
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "destination did not listen");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The source's guest is ready before the destination starts; the source
/// connects the moment it listens, so the migration runs while the
/// destination's RAM is still being populated. Two vCPUs walk their own
/// halves of RAM without pre-paging: the second one faults at once in the
/// upper half, which the population (in layout order) reaches last. Every
/// page must arrive (digests, the guest's pattern), zero pages included.
#[test]
fn a_migration_accepted_before_the_ram_is_populated_arrives_whole() {
    if !kvm_or_skip("a_migration_accepted_before_the_ram_is_populated_arrives_whole") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("a_migration_accepted_before_the_ram_is_populated_arrives_whole");
    let _ = std::fs::remove_file(dir.join("source.ready"));
    let source = start_waiting_source(&dir, &["--mem", "512M", "--vcpus", "2", "--no-prepaging"]);
    let t0 = Instant::now();
    while std::fs::metadata(dir.join("source.ready")).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the source's guest was never ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (dest, listening) = start_dest_timed(&dir, &["--prealloc", "512M"]);
    let source = collect(source, Duration::from_secs(180));
    let dest = collect(dest, Duration::from_secs(60));
    let run = Run::of(source, dest);
    run.assert_verified();
    let r = run.report.expect("report");
    eprintln!("listening after {listening:?}; population {:?}", r.destination.population);
    assert!(r.destination.preallocated);
    let population = r.destination.population.expect("a background population");
    assert!(population.error.is_none(), "{population:?}");
    assert!(
        population.faults_ahead > 0,
        "no guest fault landed on a page the population had not reached: the test did not test it ({population:?})"
    );
    assert!(r.source.stats.pages_sent.zero > 0, "no zero page crossed");
    assert!(r.destination.stats.remote_faults > 0);
}

/// The destination listens long before populating its RAM would have
/// ended: 2 GiB take seconds to allocate here (0.3-3 s per GiB), listening
/// a few milliseconds. A coarse ratio against the same destination told to
/// populate first, so that a loaded machine slows both.
#[test]
fn a_destination_listens_before_populating_its_ram() {
    if !kvm_or_skip("a_destination_listens_before_populating_its_ram") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("a_destination_listens_before_populating_its_ram");
    // One at a time: each holds 2 GiB once populated.
    let (mut before, populated_first) = start_dest_timed(&dir, &["--prealloc", "2G", "--prealloc-before-listening"]);
    let _ = before.kill();
    let _ = before.wait();
    let (mut dest, at_once) = start_dest_timed(&dir, &["--prealloc", "2G"]);
    let _ = dest.kill();
    let _ = dest.wait();
    eprintln!("listening: {at_once:?} populating in the background, {populated_first:?} populating first");
    assert!(
        at_once * 4 < populated_first,
        "listening took {at_once:?}, against {populated_first:?} when populating first"
    );
    assert!(at_once < Duration::from_secs(1), "listening took {at_once:?}");
}
