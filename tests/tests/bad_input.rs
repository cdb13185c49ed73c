//! Bad input: a stranger that sends a destination garbage, a wrong version,
//! a bad frame or half a hello is refused alone (its connection closed, the
//! reason logged) and the destination keeps waiting for its real source,
//! which then migrates to it; a migration that fails after its hello reports
//! a clear error and exits non-zero; a source whose destination goes away
//! before the switchover keeps its guest running.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use postcopy_core::wire::{self, Frame, Hello, WireMode};
use postcopy_core::{Channel, RamBlock};

/// How long a stranger waits for the destination to close its connection
/// (the refusal is immediate; the handshake bound is 1.5 s).
const STRANGER_LINGER: Duration = Duration::from_secs(5);

fn preamble(channel: Channel) -> Vec<u8> {
    let mut v = Vec::new();
    wire::encode_preamble(&mut v, channel);
    v
}

fn hello() -> Vec<u8> {
    fresh_hello_frame(7)
}

/// How a stranger's visit to a destination ended.
struct Visit {
    /// The destination closed the stranger's connection (it did not wait
    /// for the stranger to close it).
    closed_by_destination: bool,
    /// The real source's migration to that destination, afterwards.
    run: Run,
}

/// A stranger sends `bytes` to a fresh destination and waits up to `linger`
/// for the destination to close the connection (then closes it itself);
/// the destination must still be running; then a real source migrates to it.
fn stranger_then_source(test: &str, bytes: &[u8], linger: Duration) -> Visit {
    let _one = serial();
    let dir = temp_dir(test);
    let mut dest = start_dest(&dir, &["--handshake-timeout-ms", "1500"], &[]);
    let mut s = TcpStream::connect(dest.addr).expect("connect");
    s.write_all(bytes).expect("write");
    s.set_read_timeout(Some(linger)).expect("read timeout");
    let mut buf = [0u8; 64];
    // End of stream or a reset: the destination closed it. A timeout: not.
    let closed_by_destination = match s.read(&mut buf) {
        Ok(n) => n == 0,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    };
    drop(s);
    // Time for a destination that would give up on the stranger to do so.
    std::thread::sleep(Duration::from_millis(300));
    if let Ok(Some(status)) = dest.child.try_wait() {
        let out = collect(dest.child, Duration::from_secs(1));
        panic!("{test}: the destination ended after a stranger ({status}): {}", out.stderr);
    }
    let source = collect(start_source(dest.addr, &["--mem", "16M", "--vcpus", "1"]), Duration::from_secs(120));
    let dest = collect(dest.child, Duration::from_secs(60));
    Visit { closed_by_destination, run: Run::of(source, dest) }
}

/// The stranger was refused for `needle` (in the destination's notices and
/// on its stderr), and the real source's migration then completed, verified.
fn assert_refused_then_migrated(visit: &Visit, needle: &str) {
    let run = &visit.run;
    run.assert_verified();
    assert!(visit.closed_by_destination, "the destination closed the stranger's connection");
    let notices = run.dest_report().notices;
    assert!(
        notices.iter().any(|n| n.contains("refused a stranger") && n.contains(needle)),
        "expected a refusal for {needle:?} in {notices:?}"
    );
    assert!(run.dest.stderr.contains(needle), "the refusal is logged: {}", run.dest.stderr);
}

fn assert_failed_with(out: &Finished, needle: &str) {
    assert!(!out.success, "the destination must exit non-zero");
    assert_eq!(out.code, Some(1));
    let json: serde_json::Value = serde_json::from_str(out.json_line().expect("a report")).expect("JSON");
    assert_eq!(json["ok"], false);
    let error = json["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains(needle) || out.stderr.contains(needle), "expected {needle:?} in {error:?} / {}", out.stderr);
}

#[test]
fn garbage_instead_of_a_preamble() {
    if !kvm_or_skip("garbage_instead_of_a_preamble") {
        return;
    }
    let visit = stranger_then_source("garbage_preamble", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", STRANGER_LINGER);
    assert_refused_then_migrated(&visit, "bad preamble");
}

/// A valid preamble and then nothing: the handshake bound refuses it.
#[test]
fn a_preamble_alone_is_refused_at_the_handshake_timeout() {
    if !kvm_or_skip("a_preamble_alone_is_refused_at_the_handshake_timeout") {
        return;
    }
    let visit = stranger_then_source("preamble_alone", &preamble(Channel::Main), STRANGER_LINGER);
    assert_refused_then_migrated(&visit, "the handshake did not finish within 1500 ms");
}

#[test]
fn garbage_frame_after_the_preamble() {
    if !kvm_or_skip("garbage_frame_after_the_preamble") {
        return;
    }
    let mut bytes = preamble(Channel::Main);
    bytes.extend_from_slice(&[0x7f, 0, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
    let visit = stranger_then_source("garbage_frame", &bytes, STRANGER_LINGER);
    assert_refused_then_migrated(&visit, "unknown frame type 0x7f");
}

#[test]
fn wrong_protocol_version() {
    if !kvm_or_skip("wrong_protocol_version") {
        return;
    }
    let mut h = hello();
    // Frame header (8 bytes), then magic (4), then the version (u16 BE).
    h[12] = 0;
    h[13] = 99;
    let mut bytes = preamble(Channel::Main);
    bytes.extend_from_slice(&h);
    let visit = stranger_then_source("wrong_version", &bytes, STRANGER_LINGER);
    assert_refused_then_migrated(&visit, "protocol version 99");
}

#[test]
fn early_close_in_the_middle_of_the_hello() {
    if !kvm_or_skip("early_close_in_the_middle_of_the_hello") {
        return;
    }
    let h = hello();
    let mut bytes = preamble(Channel::Main);
    bytes.extend_from_slice(&h[..h.len() / 2]);
    // The stranger closes first: its half hello binds nothing.
    let visit = stranger_then_source("early_close", &bytes, Duration::from_millis(50));
    assert!(!visit.closed_by_destination);
    visit.run.assert_verified();
    let stderr = &visit.run.dest.stderr;
    assert!(stderr.contains("the main connection from"), "the early close is reported: {stderr}");
}

#[test]
fn early_close_after_the_hello() {
    if !kvm_or_skip("early_close_after_the_hello") {
        return;
    }
    // A whole hello: the destination builds the machine, then the source
    // vanishes before any device state: nothing ran here, fail cleanly.
    let machine = postcopy_kvm::driver::machine::MachineDescription {
        format: postcopy_kvm::driver::machine::MACHINE_FORMAT,
        vcpus: 1,
        irqchip: true,
        ram: postcopy_kvm::MemoryMap::pc(16 << 20).expect("layout"),
        guest: postcopy_kvm::driver::machine::GuestKind::Pattern,
    };
    let mut v = Vec::new();
    wire::encode(
        &Frame::Hello(Hello {
            resume: false,
            urgent_channel: false,
            session: 7,
            epoch: 0,
            page_size: 4096,
            mode: WireMode::Postcopy,
            precopy_rounds: 0,
            blocks: vec![RamBlock { name: "ram-below-4g".into(), page_count: 4096, page_size: 4096 }],
            machine: bytes::Bytes::from(machine.to_bytes()),
            push_streams: 1,
        }),
        &mut v,
    );
    let mut bytes = preamble(Channel::Main);
    bytes.extend_from_slice(&v);
    let dir = temp_dir("early_close_after_hello");
    let dest = start_dest(&dir, &["--handshake-timeout-ms", "1500"], &[]);
    let mut s = TcpStream::connect(dest.addr).expect("connect");
    s.write_all(&bytes).expect("write");
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let out = collect(dest.child, Duration::from_secs(30));
    eprintln!("early_close_after_hello: exit {:?}\n{}", out.code, out.stderr);
    assert_failed_with(&out, "connection was lost");
}

#[test]
fn source_keeps_its_guest_when_the_destination_goes_away() {
    if !kvm_or_skip("source_keeps_its_guest_when_the_destination_goes_away") {
        return;
    }
    let _one = serial();
    // A "destination" that accepts every connection and closes it at once.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            drop(s);
        }
    });
    let out = collect(
        start_source(addr, &["--mem", "32M", "--vcpus", "1", "--handshake-timeout-ms", "2000"]),
        Duration::from_secs(60),
    );
    eprintln!("{}", out.stderr);
    assert_eq!(out.code, Some(1));
    let json: serde_json::Value = serde_json::from_str(out.json_line().expect("report")).expect("JSON");
    assert_eq!(json["ok"], false);
    assert_eq!(json["guest_on"], "source");
    let after = json["progress_after_failure_pages_per_s"].as_f64().unwrap_or(0.0);
    assert!(after > 0.0, "the guest does not run on the source after the failure: {json}");
    assert!(out.stderr.contains("keeps running here"));
}

/// A destination that preallocated other RAM than the source has refuses
/// the machine with a clear error, before the switchover: the guest keeps
/// running on the source.
#[test]
fn a_destination_preallocated_for_other_ram_refuses_the_source() {
    if !kvm_or_skip("a_destination_preallocated_for_other_ram_refuses_the_source") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("prealloc_mismatch");
    let run = migrate(&dir, &["--mem", "64M", "--vcpus", "1"], &["--prealloc", "32M"], &[], None);
    eprintln!("{}\n{}", run.dest.stderr, run.source.stderr);
    assert_failed_with(&run.dest, "is not the RAM preallocated here");
    assert_eq!(run.source.code, Some(1));
    let json: serde_json::Value = serde_json::from_str(run.source.json_line().expect("report")).expect("JSON");
    assert_eq!(json["guest_on"], "source");
    assert!(json["progress_after_failure_pages_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{json}");
}

#[test]
fn source_takes_the_guest_back_when_the_connection_drops_during_precopy() {
    if !kvm_or_skip("source_takes_the_guest_back_when_the_connection_drops_during_precopy") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("drop_in_precopy");
    // The relay cuts every connection after 4 MiB of the first precopy
    // round of a 64 MiB guest, long before the switchover.
    let relay = Relay::start(4 << 20);
    let run = migrate(&dir, &["--mem", "64M", "--vcpus", "1", "--mode", "hybrid"], &[], &[], Some(&relay));
    run.dump();
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(run.source.code, Some(1));
    let s = run.source_report();
    assert_eq!(s.guest_on, "source");
    assert_eq!(s.stop_ns, 0, "the source never stopped its guest");
    assert!(s.stats.pages_sent.precopy > 0);
    assert!(s.progress_after_failure_pages_per_s.unwrap_or(0.0) > 0.0, "the guest runs on: {s:?}");
    // The destination never ran the guest: it fails cleanly.
    assert_eq!(run.dest.code, Some(1));
    let d = run.dest_report();
    assert!(!d.ok);
    assert_eq!(d.resume_ns, 0);
    assert!(d.error.unwrap_or_default().contains("connection was lost"));
}

#[test]
fn a_destination_waiting_to_run_is_told_to_drop_the_guest() {
    if !kvm_or_skip("a_destination_waiting_to_run_is_told_to_drop_the_guest") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("drop_after_ready");
    // Every connection is cut as the destination says ReadyToRun: it has
    // loaded the device state and waits for StartGuest, which never leaves.
    let relay = Relay::start_at_ready_to_run();
    let run = migrate(&dir, &["--mem", "64M", "--vcpus", "1"], &[], &[], Some(&relay));
    run.dump();
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst));
    // The source stopped its guest, took it back, and came back once to say so.
    assert_eq!(run.source.code, Some(1));
    let s = run.source_report();
    assert_eq!(s.guest_on, "source");
    assert!(s.stop_ns > 0, "the source had stopped its guest");
    assert!(s.progress_after_failure_pages_per_s.unwrap_or(0.0) > 0.0, "the guest runs on: {s:?}");
    // The destination, which would otherwise wait for ever, drops its copy.
    assert_eq!(run.dest.code, Some(1));
    let d = run.dest_report();
    assert!(!d.ok);
    assert_eq!(d.resume_ns, 0, "the destination never ran the guest");
    // Told by the cancel of the first failure, when the main connection
    // outlived the return one long enough to carry it, or else by the
    // withdrawal's ("the source took the guest back: ...").
    let error = d.error.unwrap_or_default();
    assert!(error.contains("the source cancelled the migration"), "{error}");
}

#[test]
fn a_source_withdrawing_from_a_vanished_destination_stops_at_the_first_refusal() {
    if !kvm_or_skip("a_source_withdrawing_from_a_vanished_destination_stops_at_the_first_refusal") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("withdraw_refused");
    // As above, but nothing listens any more after the cut: the source's
    // attempt to tell the destination is refused.
    let relay = Relay::start_at_ready_to_run_then_refuse();
    let dest = start_dest(&dir, &[], &[]);
    relay.set_target(dest.addr);
    let source = collect(start_source(relay.addr, &["--mem", "64M", "--vcpus", "1"]), Duration::from_secs(60));
    // Nobody can reach this destination: it waits until stopped.
    let dest = collect(dest.child, Duration::from_millis(100));
    let run = Run { source, dest, report: None };
    run.dump();
    assert!(relay.cut_done.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(run.source.code, Some(1));
    let s = run.source_report();
    assert_eq!(s.guest_on, "source");
    assert!(s.progress_after_failure_pages_per_s.unwrap_or(0.0) > 0.0, "the guest runs on: {s:?}");
    // One refused attempt ends it. Spending all eight attempts, as a
    // failed connect does, takes about 7 s of back-off.
    let withdrawing_s = (s.end_ns - s.stop_ns) as f64 / 1e9;
    assert!(withdrawing_s < 3.0, "the source withdrew for {withdrawing_s:.1} s");
}
