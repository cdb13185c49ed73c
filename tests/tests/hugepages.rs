//! Real migrations of guests on 2 MiB huge pages (`--hugepages 2M` on both
//! sides): pure postcopy with one and several vCPUs, hybrid, a connection
//! lost during postcopy and recovered, each verified by the page digests
//! and the guest's pattern over all memory; and sides with different page
//! sizes, refused before the switchover with the guest left running on the
//! source. The same on 1 GiB pages (`--hugepages 1G`): a 1 GiB guest, whose
//! RAM is one page crossing in 512 parts of 2 MiB, in postcopy and through
//! a lost connection, and 1 GiB against 2 MiB pages refused. Each test
//! skips (or fails under `POSTCOPY_REQUIRE_KVM=1`) when the huge pages it
//! needs are not free: scripts/test reserves them.

mod common;

use std::time::Duration;

use common::*;

/// 2 MiB pages in `mib` MiB.
fn huge_pages(mib: u64) -> u64 {
    mib / 2
}

/// Free 2 MiB pages a migration of `mib` MiB needs: both sides' RAM.
fn needed(mib: u64) -> u64 {
    2 * huge_pages(mib)
}

#[test]
fn huge_postcopy_one_vcpu() {
    let test = "huge_postcopy_one_vcpu";
    if !huge_pages_or_skip(test, needed(64)) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    let run = migrate(
        &dir,
        &["--mem", "64M", "--vcpus", "1", "--hugepages", "2M"],
        &["--prealloc", "64M", "--hugepages", "2M"],
        &[],
        None,
    );
    run.assert_verified();
    let r = run.report.expect("report");
    assert!(r.destination.preallocated);
    // Every page crosses once, and a page is a whole 2 MiB page.
    assert_eq!(r.source.stats.pages_sent.total(), huge_pages(64), "{:?}", r.source.stats.pages_sent);
    let bytes = r.source.stats.page_bytes_sent.total();
    assert!(bytes >= (huge_pages(64) - r.source.stats.pages_sent.zero) * (2 << 20), "{bytes} bytes of pages");
    assert!(r.destination.stats.remote_faults > 0, "the guest never faulted");
    assert_eq!(r.destination.pages_installed, huge_pages(64));
}

#[test]
fn huge_postcopy_three_vcpus() {
    let test = "huge_postcopy_three_vcpus";
    if !huge_pages_or_skip(test, needed(96)) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    // No --prealloc: the destination allocates its huge pages from the
    // hello, before it answers.
    let run = migrate(&dir, &["--mem", "96M", "--vcpus", "3", "--hugepages", "2M"], &["--hugepages", "2M"], &[], None);
    run.assert_verified();
    let r = run.report.expect("report");
    assert_eq!(r.source.vcpus, 3);
    assert_eq!(r.source.stats.pages_sent.total(), huge_pages(96));
    assert!(r.destination.stats.vcpu_blocked_ns.iter().filter(|&&ns| ns > 0).count() >= 2, "{:?}", r.destination.stats);
}

#[test]
fn huge_hybrid_two_vcpus() {
    let test = "huge_hybrid_two_vcpus";
    if !huge_pages_or_skip(test, needed(64)) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    let source_args =
        ["--mem", "64M", "--vcpus", "2", "--mode", "hybrid", "--precopy-rounds", "2", "--hugepages", "2M"];
    let run = migrate(&dir, &source_args, &["--prealloc", "64M", "--hugepages", "2M"], &[], None);
    run.assert_verified();
    let r = run.report.expect("report");
    assert_eq!(r.source.mode, "hybrid");
    assert!(r.source.stats.pages_sent.precopy >= huge_pages(64), "a whole precopy round");
    // The guest writes its whole share every pass: a 2 MiB page with any
    // 4 KiB page written after it was sent is stale, dropped and sent again.
    assert!(r.source.stats.stale_pages_discarded > 0);
    assert!(r.destination.stats.stale_pages_discarded > 0);
}

/// Pages pushed in parts of 128 KiB (`--page-part`), the main channel cut
/// in the middle of a part: the page cut off is sent again after the
/// recovery, and every page is verified.
#[test]
fn huge_pages_in_parts_recover_from_a_cut_in_a_part() {
    let test = "huge_pages_in_parts_recover_from_a_cut_in_a_part";
    if !huge_pages_or_skip(test, needed(128)) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    let relay = Relay::start((24 << 20) + (64 << 10));
    let run = migrate(
        &dir,
        &["--mem", "128M", "--vcpus", "2", "--hugepages", "2M", "--page-part", "128K"],
        &["--prealloc", "128M", "--hugepages", "2M"],
        &[],
        Some(&relay),
    );
    run.assert_verified();
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst), "the relay never cut");
    let r = run.report.expect("report");
    let parts = r.source.stats.page_parts_sent;
    assert!(parts > 0, "no page went in parts");
    assert!(r.destination.stats.page_parts_received > 0, "no part arrived");
    assert!(r.source.stats.recoveries >= 1, "{:?}", r.source.notices);
    assert!(r.source.stats.pages_sent.resent >= 1, "{:?}", r.source.stats.pages_sent);
}

#[test]
fn huge_lost_connection_during_postcopy_recovers() {
    let test = "huge_lost_connection_during_postcopy_recovers";
    if !huge_pages_or_skip(test, needed(128)) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    // 64 pages of 2 MiB; the main channel is cut after 24 MiB, after the
    // switchover and in the middle of a huge page's frame.
    let relay = Relay::start((24 << 20) + (1 << 20));
    let run = migrate(
        &dir,
        &["--mem", "128M", "--vcpus", "2", "--hugepages", "2M"],
        &["--prealloc", "128M", "--hugepages", "2M"],
        &[],
        Some(&relay),
    );
    run.assert_verified();
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst), "the relay never cut");
    let r = run.report.expect("report");
    assert!(r.source.stats.recoveries >= 1, "{:?}", r.source.notices);
    assert!(r.destination.stats.recoveries >= 1);
    // The page cut in half never became visible: it was sent again whole.
    assert!(r.source.stats.pages_sent.resent >= 1, "{:?}", r.source.stats.pages_sent);
}

/// A source on 2 MiB pages and a destination on 4 KiB pages (or the other
/// way round) cannot migrate: the destination refuses the hello with the
/// reason, the source gives up before it stops the guest, which keeps
/// running there.
fn mismatch(test: &str, source_huge: bool) {
    if !huge_pages_or_skip(test, huge_pages(32)) {
        return;
    }
    let huge: &[&str] = &["--hugepages", "2M"];
    let (source_args, dest_args) = if source_huge { (huge, &[][..]) } else { (&[][..], huge) };
    refused_for_page_sizes(test, "32M", source_args, dest_args, "2097152", "4096");
}

/// A source with `source_args` and a destination with `dest_args` (their
/// page sizes) are refused: the source's error names both page sizes,
/// `a` and `b`, and its guest keeps running there.
fn refused_for_page_sizes(test: &str, mem: &str, source_args: &[&str], dest_args: &[&str], a: &str, b: &str) {
    let _one = serial();
    let dir = temp_dir(test);
    let source_args: Vec<&str> = [&["--mem", mem, "--vcpus", "1"][..], source_args].concat();
    let dest = start_dest(&dir, dest_args, &[]);
    let source = collect(start_source(dest.addr, &source_args), Duration::from_secs(60));
    // A destination that refused a hello keeps listening for the real source.
    let _ = collect(dest.child, Duration::from_secs(1));
    assert!(!source.success, "the migration must fail: {}", source.stderr);
    let report: postcopy_kvm::driver::report::SourceReport =
        serde_json::from_str(source.json_line().expect("source JSON")).expect("source report");
    let error = report.error.clone().unwrap_or_default();
    eprintln!("source error: {error}");
    assert!(error.contains("page size mismatch"), "{error}");
    assert!(error.contains(a) && error.contains(b), "{error}");
    assert_eq!(report.guest_on, "source");
    assert_eq!(report.stop_ns, 0, "the guest was never stopped");
    assert!(report.progress_after_failure_pages_per_s.is_some_and(|r| r > 0.0), "the guest runs on the source");
    assert_eq!(report.stats.pages_sent.total(), 0);
}

#[test]
fn huge_source_to_small_destination_is_refused() {
    mismatch("huge_source_to_small_destination_is_refused", true);
}

#[test]
fn small_source_to_huge_destination_is_refused() {
    mismatch("small_source_to_huge_destination_is_refused", false);
}

/// Free 1 GiB pages a migration of a 1 GiB guest needs: one a side.
const GIB_PAGES: u64 = 2;

/// A 1 GiB guest on 1 GiB pages: its RAM (code, page tables and pattern
/// alike) is one page, which crosses in 512 parts of 2 MiB; the guest's
/// first fault takes the parts the push has not sent to the urgent channel.
/// Verified by the digests and the pattern over all memory.
#[test]
fn gib_postcopy() {
    let test = "gib_postcopy";
    if !huge_pages_of_size_or_skip(test, postcopy_kvm::HugePageSize::Size1G, GIB_PAGES) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    let run = migrate(
        &dir,
        &["--mem", "1G", "--vcpus", "2", "--hugepages", "1G"],
        &["--prealloc", "1G", "--hugepages", "1G"],
        &[],
        None,
    );
    run.assert_verified();
    let r = run.report.expect("report");
    assert!(r.destination.preallocated);
    // One page, once, in 512 parts of 2 MiB: never a frame of more.
    assert_eq!(r.source.stats.pages_sent.total(), 1, "{:?}", r.source.stats.pages_sent);
    assert_eq!(r.source.stats.page_parts_sent, 512);
    assert_eq!(r.destination.stats.page_parts_received, 512);
    assert!(r.source.stats.page_bytes_sent.total() >= 1 << 30);
    assert!(r.destination.stats.remote_faults > 0, "the guest never faulted");
    assert_eq!(r.destination.pages_installed, 1);
}

/// As [`gib_postcopy`], with every connection cut while the main channel
/// carries the page's first part: the page cut off is never visible, it
/// crosses again after the recovery, and the guest is verified.
#[test]
fn gib_lost_connection_recovers() {
    let test = "gib_lost_connection_recovers";
    if !huge_pages_of_size_or_skip(test, postcopy_kvm::HugePageSize::Size1G, GIB_PAGES) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    let relay = Relay::start(1 << 20);
    let run = migrate(
        &dir,
        &["--mem", "1G", "--vcpus", "1", "--hugepages", "1G"],
        &["--prealloc", "1G", "--hugepages", "1G"],
        &[],
        Some(&relay),
    );
    run.assert_verified();
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst), "the relay never cut");
    let r = run.report.expect("report");
    assert!(r.source.stats.recoveries >= 1, "{:?}", r.source.notices);
    assert!(r.destination.stats.recoveries >= 1);
    assert!(r.source.stats.pages_sent.resent >= 1, "{:?}", r.source.stats.pages_sent);
    assert_eq!(r.destination.pages_installed, 1);
}

/// A source on 1 GiB pages and a destination on 2 MiB pages are refused
/// before the switchover, the guest left running on the source.
#[test]
fn gib_source_to_2m_destination_is_refused() {
    let test = "gib_source_to_2m_destination_is_refused";
    if !huge_pages_of_size_or_skip(test, postcopy_kvm::HugePageSize::Size1G, 1) {
        return;
    }
    let source_args: &[&str] = &["--hugepages", "1G"];
    refused_for_page_sizes(test, "1G", source_args, &["--hugepages", "2M"], "1073741824", "2097152");
}
