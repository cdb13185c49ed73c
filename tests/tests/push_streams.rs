//! Real KVM migrations with the background push spread over two
//! connections (`--push-streams 2` on both sides), verified by the page
//! digests of both sides and the guest's pattern over all memory; one with
//! every connection cut in postcopy and recovered on two streams again; and
//! a source asking for more streams than the destination accepts, refused
//! before the switchover with the guest left running on the source.

mod common;

use std::time::Duration;

use common::*;

/// Preamble code of push stream 1 (main 0, return 1, urgent 2).
const PUSH_STREAM_1: u8 = 3;

#[test]
fn two_push_streams_migrate_every_page_verified() {
    let test = "two_push_streams_migrate_every_page_verified";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    // A relay that never cuts, to see which connections were opened.
    let relay = Relay::start(u64::MAX);
    let run = migrate(
        &dir,
        &["--mem", "128M", "--vcpus", "2", "--push-streams", "2"],
        &["--prealloc", "128M", "--push-streams", "2"],
        &[],
        Some(&relay),
    );
    run.assert_verified();
    let order = relay.order.lock().unwrap().clone();
    assert_eq!(order.iter().filter(|&&code| code == PUSH_STREAM_1).count(), 1, "channels opened: {order:?}");
    assert!(!order.contains(&(PUSH_STREAM_1 + 1)), "a third push stream was opened: {order:?}");
    let r = run.report.expect("report");
    assert_eq!(r.source.stats.pages_sent.total(), 128 << 8, "each page crosses once on either stream");
    assert_eq!(r.source.stats.pages_sent.resent, 0);
}

#[test]
fn two_push_streams_recover_from_a_cut_in_postcopy() {
    let test = "two_push_streams_recover_from_a_cut_in_postcopy";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    // Every connection is cut once the main channel carried 24 MiB (about
    // half the push on two streams of a 128 MiB guest).
    let relay = Relay::start(24 << 20);
    let run = migrate(
        &dir,
        &["--mem", "128M", "--vcpus", "2", "--push-streams", "2"],
        &["--prealloc", "128M", "--push-streams", "2"],
        &[],
        Some(&relay),
    );
    run.assert_verified();
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst), "the relay never cut");
    let order = relay.order.lock().unwrap().clone();
    assert!(
        order.iter().filter(|&&code| code == PUSH_STREAM_1).count() >= 2,
        "push stream 1 reconnected after the cut: {order:?}"
    );
    let r = run.report.expect("report");
    assert!(r.source.stats.recoveries >= 1, "{:?}", r.source.notices);
    assert!(r.destination.stats.recoveries >= 1);
}

#[test]
fn more_push_streams_than_the_destination_accepts_are_refused_before_the_switchover() {
    let test = "more_push_streams_than_the_destination_accepts_are_refused_before_the_switchover";
    if !kvm_or_skip(test) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    let dest = start_dest(&dir, &[], &[]);
    let source = collect(
        start_source(dest.addr, &["--mem", "32M", "--vcpus", "1", "--push-streams", "2"]),
        Duration::from_secs(60),
    );
    // A destination that refused a hello keeps listening for the real source.
    let _ = collect(dest.child, Duration::from_secs(1));
    assert!(!source.success, "the migration must fail: {}", source.stderr);
    let report: postcopy_kvm::driver::report::SourceReport =
        serde_json::from_str(source.json_line().expect("source JSON")).expect("source report");
    let error = report.error.clone().unwrap_or_default();
    assert!(error.contains("asks for 2 push streams") && error.contains("at most 1"), "{error}");
    assert_eq!(report.guest_on, "source");
    assert_eq!(report.stop_ns, 0, "the guest was never stopped");
    assert_eq!(report.stats.pages_sent.total(), 0);
}
