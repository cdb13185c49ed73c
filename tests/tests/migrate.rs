//! Real migrations between two `postcopy` processes: pure postcopy and
//! hybrid, one and several vCPUs, a boot sector, a lost connection during
//! postcopy followed by recovery, and damaged pages that the integrity
//! checks must catch.

mod common;

use common::*;
use postcopy_kvm::driver::DAMAGE_ENV;

#[test]
fn postcopy_one_vcpu() {
    if !kvm_or_skip("postcopy_one_vcpu") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("postcopy_one_vcpu");
    let run = migrate(&dir, &["--mem", "64M", "--vcpus", "1"], &[], &[], None);
    run.assert_verified();
    let r = run.report.expect("report");
    assert_eq!(r.source.mode, "postcopy");
    assert_eq!(r.source.stats.pages_sent.precopy, 0);
    let pages = 64 << 8;
    assert_eq!(r.source.stats.pages_sent.total(), pages, "each page crosses once in pure postcopy");
    assert!(r.destination.stats.remote_faults > 0, "the guest never faulted");
    assert!(r.destination.fault_latency.count > 0);
    assert!(!r.destination.preallocated, "RAM allocated as pages arrive");
    // Placing the pages took time, within the migration (two installer
    // threads: the main and urgent readers).
    let placing_ms = r.destination.install_busy_ns as f64 / 1e6;
    assert!(placing_ms > 0.0 && placing_ms < 2.0 * r.total_ms, "placing pages: {placing_ms} ms of {} ms", r.total_ms);
    assert!(r.downtime_ms > 0.0);
}

#[test]
fn postcopy_three_vcpus() {
    if !kvm_or_skip("postcopy_three_vcpus") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("postcopy_three_vcpus");
    let run = migrate(&dir, &["--mem", "96M", "--vcpus", "3"], &["--prealloc", "96M"], &[], None);
    run.assert_verified();
    let r = run.report.expect("report");
    assert!(r.destination.preallocated);
    assert_eq!(r.source.vcpus, 3);
    assert!(r.destination.stats.vcpu_blocked_ns.iter().filter(|&&ns| ns > 0).count() >= 2, "{:?}", r.destination.stats);
}

#[test]
fn hybrid_two_vcpus() {
    if !kvm_or_skip("hybrid_two_vcpus") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("hybrid_two_vcpus");
    // Preallocated RAM: stale precopy pages are unmapped from the guest
    // and overwritten before they are mapped again.
    let source_args = ["--mem", "64M", "--vcpus", "2", "--mode", "hybrid", "--precopy-rounds", "2"];
    let run = migrate(&dir, &source_args, &["--prealloc", "64M"], &[], None);
    run.assert_verified();
    let r = run.report.expect("report");
    assert!(r.destination.preallocated);
    assert_eq!(r.source.mode, "hybrid");
    assert!(r.source.stats.pages_sent.precopy >= 64 << 8, "a whole precopy round");
    assert_eq!(r.source.stats.precopy_rounds, 2);
    // The guest writes its whole share every pass: pages sent in precopy
    // were dirtied again and declared stale.
    assert!(r.source.stats.stale_pages_discarded > 0);
}

#[test]
fn boot_sector_guest() {
    if !kvm_or_skip("boot_sector_guest") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("boot_sector_guest");
    let image = dir.join("boot.img");
    std::fs::write(&image, postcopy_kvm::BootSector::test_image().bytes()).expect("image");
    let serial_out = dir.join("serial.txt");
    let dump = dir.join("memory.bin");
    let image_arg = image.to_string_lossy().into_owned();
    let serial_arg = serial_out.to_string_lossy().into_owned();
    let dump_arg = dump.to_string_lossy().into_owned();
    let run = migrate(
        &dir,
        &["--mem", "16M", "--vcpus", "1", "--guest-image", &image_arg, "--serial", &serial_arg],
        &["--dump-memory", &dump_arg],
        &[],
        None,
    );
    run.assert_verified();
    let r = run.report.expect("report");
    assert!(r.destination.pattern.is_none());
    // The sector printed over serial in real mode and again in protected mode.
    let text = std::fs::read_to_string(&serial_out).expect("serial output");
    assert_eq!(text, postcopy_kvm::guest::programs::TEST_BOOT_EXPECTED_SERIAL);
    // The destination's memory holds what the sector wrote in protected mode.
    let memory = std::fs::read(&dump).expect("memory dump");
    assert_eq!(memory.len(), 16 << 20);
    let at = postcopy_kvm::guest::abi::TEST_BOOT_MARKER_ADDR as usize;
    let marker = u32::from_le_bytes(memory[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!(marker, postcopy_kvm::guest::abi::TEST_BOOT_MARKER);
    // The sector's code arrived intact (its GDT, further on, has the
    // accessed bits the CPU set).
    assert_eq!(&memory[0x7c00..0x7c60], &postcopy_kvm::BootSector::test_image().bytes()[..0x60]);
}

#[test]
fn lost_connection_during_postcopy_recovers() {
    if !kvm_or_skip("lost_connection_during_postcopy_recovers") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("lost_connection_during_postcopy_recovers");
    // 128 MiB of pages; the main channel is cut after 24 MiB, well after
    // the switchover (the device state is a few KiB) and before the end.
    let relay = Relay::start(24 << 20);
    let run = migrate(&dir, &["--mem", "128M", "--vcpus", "2"], &["--prealloc", "128M"], &[], Some(&relay));
    run.assert_verified();
    assert!(run.report.as_ref().is_some_and(|r| r.destination.preallocated));
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst), "the relay never cut");
    let r = run.report.expect("report");
    assert!(r.source.stats.recoveries >= 1, "{:?}", r.source.notices);
    assert!(r.destination.stats.recoveries >= 1);
    assert!(r.source.notices.iter().any(|n| n.starts_with("paused")), "{:?}", r.source.notices);
    assert!(r.destination.notices.iter().any(|n| n.starts_with("paused")));
    assert!(r.source.stats.phases.paused_ns > 0);
}

#[test]
fn main_channel_connects_last() {
    if !kvm_or_skip("main_channel_connects_last") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("main_channel_connects_last");
    // The relay holds the main connection back: the return and urgent
    // connections reach the destination first.
    let relay = Relay::start_with(u64::MAX, std::time::Duration::from_millis(300));
    let run = migrate(&dir, &["--mem", "32M", "--vcpus", "1"], &[], &[], Some(&relay));
    run.assert_verified();
    let order = relay.order.lock().expect("order").clone();
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(order[2], 0, "main arrived last: {order:?}");
}

/// With one page damaged on the destination, both checks must fail: the
/// digests differ, and the guest's pattern (checked over all memory, and by
/// the guest itself) is broken at that page.
/// `dest_args` choose the kind of destination RAM.
fn damaged(kind: &str, dest_args: &[&str]) {
    let dir = temp_dir(&format!("damaged_{kind}"));
    // Page 300 is at 1.17 MiB: in vCPU 0's share, written in every pass.
    let damage = format!("{kind}:300");
    let run = migrate(&dir, &["--mem", "32M", "--vcpus", "1"], dest_args, &[(DAMAGE_ENV, &damage)], None);
    let r = run.report.as_ref().unwrap_or_else(|| {
        run.dump();
        panic!("no reports")
    });
    eprintln!("{}", r.table());
    assert!(r.source.ok, "the source completed");
    assert!(r.destination.damage.is_some(), "the damage was applied");
    assert_eq!(r.destination.preallocated, !dest_args.is_empty());
    assert_ne!(r.source.digest, r.destination.digest, "the digests missed the {kind}ped page");
    assert!(!r.digests_match);
    let p = r.destination.pattern.as_ref().expect("pattern check");
    assert!(!p.ok(), "the pattern check missed the damaged page: {p:?}");
    assert!(p.bad_pages + p.guest_reported_errors >= 1);
    assert!(
        p.first_bad.iter().any(|b| b.contains("0x12c000")),
        "the damaged page (gpa 0x12c000) is named: {:?}",
        p.first_bad
    );
    assert!(!r.integrity_ok);
    assert!(!run.dest.success, "the destination exits non-zero");
}

#[test]
fn dropped_page_fails_both_checks() {
    if !kvm_or_skip("dropped_page_fails_both_checks") {
        return;
    }
    let _one = serial();
    damaged("drop", &["--prealloc", "32M"]);
}

#[test]
fn corrupted_page_fails_both_checks() {
    if !kvm_or_skip("corrupted_page_fails_both_checks") {
        return;
    }
    let _one = serial();
    damaged("corrupt", &[]);
}
