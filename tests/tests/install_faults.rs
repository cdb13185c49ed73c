//! Installs that fail on the destination (the test-only
//! `POSTCOPY_TEST_INSTALL_FAULT` switch): a page the kernel refuses comes
//! back through a recovery, `EAGAIN` and a fill cut short are retried, a
//! failed wake-up is repeated; each migration completes verified. A page
//! that never installs ends the migration with a typed error, the guest
//! paused, and nothing hangs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use postcopy_kvm::driver::install_faults::INSTALL_FAULT_ENV;

/// Page 300 (at 1.17 MiB) is in vCPU 0's share, written in every pass.
fn faulted(name: &str, fault: &str, dest_args: &[&str]) -> Run {
    let dir = temp_dir(name);
    let run = migrate(&dir, &["--mem", "32M", "--vcpus", "1"], dest_args, &[(INSTALL_FAULT_ENV, fault)], None);
    assert!(run.dest.stderr.contains("test-only install fault armed"), "{}", run.dest.stderr);
    assert!(!run.dest.stderr.contains("left unfired"), "{}", run.dest.stderr);
    run.assert_verified();
    run
}

#[test]
fn a_refused_install_comes_back_through_a_recovery() {
    if !kvm_or_skip("a_refused_install_comes_back_through_a_recovery") {
        return;
    }
    let _one = serial();
    for (name, dest_args) in [("refused_anonymous", &[][..]), ("refused_prealloc", &["--prealloc", "32M"][..])] {
        // Twice: a run that fails goes again page by page before the core hears of it.
        let run = faulted(name, "fail:300:2", dest_args);
        let r = run.report.expect("report");
        assert!(run.dest.stderr.contains("page 300 could not be installed"), "{}", run.dest.stderr);
        assert!(r.destination.notices.iter().any(|n| n.contains("page 300 could not be installed")), "{r:?}");
        assert!(r.destination.stats.recoveries >= 1, "{name}: the page came back without a recovery?");
        assert!(r.source.stats.recoveries >= 1);
    }
}

#[test]
fn eagain_is_retried_by_the_installer() {
    if !kvm_or_skip("eagain_is_retried_by_the_installer") {
        return;
    }
    let _one = serial();
    let run = faulted("eagain", "again:300", &[]);
    assert!(
        run.dest.stderr.contains("page 300 failed to install (the address space is changing"),
        "{}",
        run.dest.stderr
    );
    let r = run.report.expect("report");
    assert_eq!(r.destination.stats.recoveries, 0, "a transient failure needs no recovery");
}

#[test]
fn a_fill_cut_short_and_a_failed_wake_are_handled() {
    if !kvm_or_skip("a_fill_cut_short_and_a_failed_wake_are_handled") {
        return;
    }
    let _one = serial();
    for (name, fault, dest_args) in [
        ("partial_anonymous", "partial:300", &[][..]),
        ("partial_prealloc", "partial:300", &["--prealloc", "32M"][..]),
        ("wake", "wake:300", &[][..]),
    ] {
        let run = faulted(name, fault, dest_args);
        assert_eq!(run.report.expect("report").destination.stats.recoveries, 0, "{name}");
    }
}

/// A page refused every time: the destination gives up after a few
/// recoveries with a typed error and exits, its guest paused; the source,
/// past its point of no return, keeps waiting for a destination (killed
/// here).
#[test]
fn a_page_that_never_installs_ends_the_migration_without_a_hang() {
    if !kvm_or_skip("a_page_that_never_installs_ends_the_migration_without_a_hang") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("never_installs");
    let dest = start_dest(&dir, &[], &[(INSTALL_FAULT_ENV, "fail:300:1000")]);
    let source = start_source(dest.addr, &["--mem", "32M", "--vcpus", "1"]);
    let t0 = Instant::now();
    let dest = collect(dest.child, Duration::from_secs(60));
    let source = collect(source, Duration::from_millis(100));
    assert!(dest.code.is_some(), "the destination hung:\n{}", dest.stderr);
    assert!(!dest.success, "the destination reports failure");
    assert!(t0.elapsed() < Duration::from_secs(50));
    let report: postcopy_kvm::driver::report::DestinationReport =
        serde_json::from_str(dest.json_line().expect("destination JSON")).expect("report");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("page 300 could not be installed"), "{error}\n{}", dest.stderr);
    assert!(!report.ok);
    assert!(report.pattern.is_none(), "memory with a hole was read for verification");
    eprintln!("destination: {error}; source stderr:\n{}", source.stderr);
}
