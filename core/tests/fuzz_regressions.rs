//! Bugs the fuzzers found (fuzz/ and fuzz-targets/), each pinned by a
//! direct test; the fuzz input that found it stays in fuzz/artifacts/.

use bytes::Bytes;
use postcopy_core::testkit::{Outcome, Pair, PairConfig};
use postcopy_core::wire::{Decoder, Frame, Hello, PageData, PageFrame, PageKind, Request, Welcome, WireMode};
use postcopy_core::{
    Channel, Config, Destination, DestinationAction, DestinationState, GuestMemory, PageAddress, PageNumber,
    ProtocolError, RamBlock, RamLayout, Source, SourceState, Timestamp,
};
use std::time::Duration;

struct ZeroGuest;

impl GuestMemory for ZeroGuest {
    fn read_page(&self, _: PageNumber, out: &mut [u8]) {
        out.fill(0);
    }
}

fn frames_on(src: &mut Source, now: Timestamp, channel: Channel) -> Vec<Frame> {
    let mut out = Vec::new();
    while src.poll_transmit(now, channel, &mut out, usize::MAX, &ZeroGuest) > 0 {}
    let mut decoder = Decoder::new();
    decoder.push(Bytes::from(out));
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        frames.push(frame);
    }
    frames
}

/// fuzz/artifacts/source_events/keepalive-before-hello: the main channel
/// connected first and idled past the keep-alive interval while the others
/// were still connecting; the source queued a Ping ahead of its Hello, and a
/// destination refuses anything before the hello.
#[test]
fn no_keepalive_before_the_hello() {
    let config = Config { keepalive_interval: Some(Duration::from_secs(1)), ..Config::postcopy() };
    let mut src = Source::new(config, RamLayout::single("ram", 64, 4).unwrap(), 7);
    let mut now = Timestamp::ZERO;
    src.handle_start(now).unwrap();
    src.handle_connected(now, Channel::Main);
    // Nothing to keep alive until the hello is out: no timer for it either.
    assert_eq!(src.poll_timeout(), Some(now + Duration::from_secs(10)), "only the handshake deadline");
    now = now + Duration::from_millis(1500);
    src.handle_timeout(now);
    src.handle_connected(now, Channel::Return);
    src.handle_connected(now, Channel::Urgent);
    let frames = frames_on(&mut src, now, Channel::Main);
    assert!(matches!(frames.first(), Some(Frame::Hello(_))), "main opens with its hello: {frames:?}");
}

/// fuzz/artifacts/destination_events/huge-layout: a hello announcing a guest
/// of up to 2^40 pages made the destination allocate its present bitmap
/// (up to 128 GiB) before anything else. The destination now refuses a guest
/// larger than `Config::max_guest_pages`.
#[test]
fn destination_refuses_a_guest_larger_than_its_bound() {
    let mut dst = Destination::new(Config::postcopy(), 4096);
    let now = Timestamp::ZERO;
    dst.handle_connected(now, Channel::Main);
    let blocks = (0..256).map(|i| RamBlock { name: format!("b{i}"), page_count: 1 << 32, page_size: 4096 }).collect();
    let hello = Hello {
        resume: false,
        urgent_channel: false,
        session: 1,
        epoch: 0,
        page_size: 4096,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks,
        machine: Bytes::new(),
        push_streams: 1,
    };
    let error = dst.handle_frame(now, Channel::Main, Frame::Hello(hello)).unwrap_err();
    assert_eq!(error, ProtocolError::GuestTooLarge { pages: 1 << 40, limit: Config::postcopy().max_guest_pages });
    assert_eq!(dst.layout(), None);
    while let Some(action) = dst.poll_action() {
        assert!(!matches!(action, DestinationAction::PrepareMemory(_)), "no memory for a refused guest");
    }
}

/// fuzz/artifacts/pair/precopy-round-without-bytes: in hybrid mode without
/// timers, a precopy round over pages all sent ends with a dirty-log sync and
/// no frame; the testkit's `run_to_completion` took that for no progress and
/// gave up in PRECOPY.
#[test]
fn pair_counts_a_round_without_bytes_as_progress() {
    let config = Config { keepalive_interval: None, peer_timeout: None, ..Config::hybrid(3) };
    let mut pair = Pair::new(PairConfig::new(config, 16));
    assert_eq!(pair.run_to_completion(1_000), Ok(Outcome::Completed));
}

/// fuzz/artifacts/pair/start-timeout-after-start-guest: the connection was
/// lost with StartGuest in flight; the source, past its point of no return,
/// paused and retried, while the destination dropped the guest when its
/// `start_timeout` ran out before the source got back: nobody ran the guest
/// any more. A destination whose ReadyToRun has left now waits for the
/// source however long.
#[test]
fn destination_keeps_the_guest_once_ready_to_run_left() {
    let config = Config {
        urgent_channel: false,
        start_timeout: Duration::from_secs(2),
        reconnect_delay_min: Duration::from_millis(200),
        reconnect_delay_max: Duration::from_secs(2),
        ..Config::postcopy()
    };
    let mut pair = Pair::new(PairConfig::new(config, 4));
    pair.guest_access(0, PageNumber(1), true);
    // Handshake, device state, ReadyToRun.
    for channel in [Channel::Main, Channel::Return, Channel::Main, Channel::Return] {
        assert!(pair.transmit(channel, 0));
        assert!(pair.deliver(channel, usize::MAX));
    }
    assert_eq!(pair.dst.core.state(), DestinationState::AwaitingStart);
    // StartGuest leaves the source and is lost with the main connection.
    while pair.src.core.state() != SourceState::Active {
        assert!(pair.transmit(Channel::Main, 0), "the source should transmit StartGuest");
    }
    pair.lose(Channel::Main);
    assert_eq!(pair.src.core.state(), SourceState::Paused);
    assert_eq!(pair.dst.core.state(), DestinationState::Paused);
    // A partition outlasts the destination's start timeout.
    pair.connect_allowed = false;
    while pair.now < Timestamp::ZERO + Duration::from_secs(30) {
        assert!(pair.fire_timer());
    }
    assert_eq!(pair.dst.core.state(), DestinationState::Paused, "the destination keeps the guest");
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::Completed));
}

/// fuzz/artifacts/source_events/queue-over-own-bound: the source bounded its
/// queue of requested pages by the destination's announced
/// `max_outstanding_requests` only, so a destination announcing a large
/// bound made the source queue up to one entry per guest page, past its own
/// configured bound. The source now caps at the smaller of the two.
#[test]
fn source_caps_requests_at_its_own_bound() {
    let config =
        Config { max_outstanding_requests: 2, keepalive_interval: None, peer_timeout: None, ..Config::postcopy() };
    let mut src = Source::new(config, RamLayout::single("ram", 64, 16).unwrap(), 7);
    let now = Timestamp::ZERO;
    src.handle_start(now).unwrap();
    for channel in Channel::ALL {
        src.handle_connected(now, channel);
    }
    let welcome =
        Welcome { session: 7, epoch: 0, guest_started: false, device_loaded: false, max_outstanding_requests: 1000 };
    src.handle_frame(now, Channel::Return, Frame::Welcome(welcome)).unwrap();
    src.handle_vcpus_stopped(now, Bytes::from_static(b"dev")).unwrap();
    assert_eq!(src.state(), SourceState::Switchover);
    let request = Request { block: 0, indexes: vec![3, 4, 5, 6] };
    let error = src.handle_frame(now, Channel::Return, Frame::Request(request)).unwrap_err();
    assert_eq!(error, ProtocolError::TooManyRequests { limit: 2 });
    assert!(src.urgent_queue_len() <= 2);
}

fn returned(dst: &mut Destination, now: Timestamp) -> Vec<Frame> {
    let mut out = Vec::new();
    while dst.poll_transmit(now, Channel::Return, &mut out, usize::MAX) > 0 {}
    let mut decoder = Decoder::new();
    decoder.push(Bytes::from(out));
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        frames.push(frame);
    }
    frames
}

fn small_hello() -> Frame {
    Frame::Hello(Hello {
        resume: false,
        urgent_channel: false,
        session: 7,
        epoch: 0,
        page_size: 64,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: vec![RamBlock { name: "ram".into(), page_count: 4, page_size: 64 }],
        machine: Bytes::new(),
        push_streams: 1,
    })
}

/// fuzz/artifacts/destination_events/ready-to-run-before-welcome: the return
/// path connected after the device state had loaded; the welcome was queued
/// behind the ReadyToRun, so the connection did not open with its welcome.
#[test]
fn the_return_path_opens_with_the_welcome() {
    let mut dst = Destination::new(Config { keepalive_interval: None, peer_timeout: None, ..Config::postcopy() }, 64);
    let now = Timestamp::ZERO;
    dst.handle_connected(now, Channel::Main);
    dst.handle_frame(now, Channel::Main, small_hello()).unwrap();
    dst.handle_frame(now, Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::from_static(b"dev") }).unwrap();
    dst.handle_device_state_loaded(now, Ok(())).unwrap();
    assert_eq!(dst.state(), DestinationState::AwaitingStart);
    dst.handle_connected(now, Channel::Return);
    let frames = returned(&mut dst, now);
    assert!(matches!(&frames[..], [Frame::Welcome(_), Frame::ReadyToRun]), "{frames:?}");
}

/// fuzz/artifacts/source_events/premature-eoc: a destination declared the
/// end of copy while most pages had never been sent; the source answered
/// with its end of stream and completed, giving up a guest whose pages the
/// destination cannot have. An EOC with pages unsent is now a protocol
/// error (after StartGuest: a pause, and the recovery's report tells what
/// the destination really has).
#[test]
fn source_refuses_an_eoc_with_pages_unsent() {
    let config = Config { keepalive_interval: None, peer_timeout: None, urgent_channel: false, ..Config::postcopy() };
    let mut src = Source::new(config, RamLayout::single("ram", 64, 16).unwrap(), 7);
    let now = Timestamp::ZERO;
    src.handle_start(now).unwrap();
    for channel in [Channel::Main, Channel::Return] {
        src.handle_connected(now, channel);
    }
    let welcome =
        Welcome { session: 7, epoch: 0, guest_started: false, device_loaded: false, max_outstanding_requests: 8 };
    src.handle_frame(now, Channel::Return, Frame::Welcome(welcome)).unwrap();
    src.handle_vcpus_stopped(now, Bytes::from_static(b"dev")).unwrap();
    let _ = frames_on(&mut src, now, Channel::Main);
    src.handle_frame(now, Channel::Return, Frame::ReadyToRun).unwrap();
    let mut out = Vec::new();
    while src.state() != SourceState::Active {
        assert!(src.poll_transmit(now, Channel::Main, &mut out, 0, &ZeroGuest) > 0);
    }
    assert!(src.pages_sent() < 16);
    let error = src.handle_frame(now, Channel::Return, Frame::Eoc).unwrap_err();
    assert!(matches!(error, ProtocolError::PrematureEoc { .. }), "{error:?}");
    assert_eq!(src.state(), SourceState::Active);
}

/// fuzz/artifacts/pair/peer-timeout-loses-pages-in-flight: every page was in
/// flight when the source's peer timeout closed the connections; the
/// recovery re-sent them, and the testkit took that for invariant 4 broken
/// (it counted only losses it injected itself as losses).
#[test]
fn pages_lost_to_a_timeout_may_cross_again() {
    let config = Config { urgent_channel: false, peer_timeout: Some(Duration::from_secs(3)), ..Config::postcopy() };
    let mut pair = Pair::new(PairConfig::new(config, 8));
    for channel in [Channel::Main, Channel::Return, Channel::Main, Channel::Return] {
        assert!(pair.transmit(channel, 0));
        assert!(pair.deliver(channel, usize::MAX));
    }
    // StartGuest and every page leave the source; none arrives.
    assert!(pair.transmit(Channel::Main, 1 << 16));
    assert_eq!(pair.src.core.pages_sent(), 8);
    while pair.src.core.state() != SourceState::Paused {
        assert!(pair.fire_timer());
    }
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::Completed));
}

/// fuzz/artifacts/source_events/bad-bytes-while-reconnecting: during a
/// reconnection attempt (PAUSED, the return path already up, the others
/// still connecting) undecodable bytes on the return path were ignored
/// without closing it, and `handle_input` looped forever on the failed
/// decoder. The attempt now fails: its connections close, a retry follows.
#[test]
fn bad_bytes_while_reconnecting_end_the_attempt() {
    let config = Config { keepalive_interval: None, peer_timeout: None, urgent_channel: false, ..Config::postcopy() };
    let mut src = Source::new(config, RamLayout::single("ram", 64, 4).unwrap(), 7);
    let mut now = Timestamp::ZERO;
    src.handle_start(now).unwrap();
    for channel in [Channel::Main, Channel::Return] {
        src.handle_connected(now, channel);
    }
    let welcome =
        Welcome { session: 7, epoch: 0, guest_started: false, device_loaded: false, max_outstanding_requests: 8 };
    src.handle_frame(now, Channel::Return, Frame::Welcome(welcome)).unwrap();
    src.handle_vcpus_stopped(now, Bytes::from_static(b"dev")).unwrap();
    let _ = frames_on(&mut src, now, Channel::Main);
    src.handle_frame(now, Channel::Return, Frame::ReadyToRun).unwrap();
    let _ = frames_on(&mut src, now, Channel::Main);
    assert!(src.state().after_start());
    src.handle_connection_lost(now, Channel::Main);
    assert_eq!(src.state(), SourceState::Paused);
    now = src.poll_timeout().unwrap();
    src.handle_timeout(now);
    while src.poll_action().is_some() {}
    src.handle_connected(now, Channel::Return);
    assert!(src.is_connected(Channel::Return));
    src.handle_input(now, Channel::Return, Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 0]));
    assert!(!src.is_connected(Channel::Return), "the attempt's connections close");
    assert!(src.poll_timeout().is_some(), "another attempt follows");
}

/// fuzz/artifacts/destination_events/second-welcome-on-old-return-path: a
/// completed destination kept the return connection that carried its EOC;
/// the resume hello of a source that lost the EOC was answered on that old
/// connection, which the source no longer reads (and its new return
/// connection then got no welcome at all). A return connection carries one
/// welcome: a later hello closes it and is answered on the next one.
#[test]
fn a_resume_hello_is_answered_on_a_new_return_connection() {
    let config = Config { keepalive_interval: None, peer_timeout: None, ..Config::postcopy() };
    let mut dst = Destination::new(config, 64);
    let now = Timestamp::ZERO;
    dst.handle_connected(now, Channel::Main);
    dst.handle_connected(now, Channel::Return);
    dst.handle_frame(now, Channel::Main, small_hello()).unwrap();
    dst.handle_frame(now, Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::from_static(b"dev") }).unwrap();
    dst.handle_device_state_loaded(now, Ok(())).unwrap();
    dst.handle_frame(now, Channel::Main, Frame::StartGuest).unwrap();
    for index in 0..4 {
        let page = PageFrame {
            address: PageAddress { block: 0, index },
            kind: PageKind::Background,
            data: PageData::Bytes(Bytes::from(vec![1; 64])),
        };
        dst.handle_frame(now, Channel::Main, Frame::Page(page)).unwrap();
    }
    let frames = returned(&mut dst, now);
    assert!(matches!(frames.last(), Some(Frame::Eoc)), "{frames:?}");
    assert_eq!(dst.state(), DestinationState::Completed);
    // The source lost the EOC and comes back; its new main connection
    // arrives first, the old return connection still looks up here.
    dst.handle_connected(now, Channel::Main);
    let Frame::Hello(mut hello) = small_hello() else { unreachable!() };
    hello.resume = true;
    hello.epoch = 1;
    dst.handle_frame(now, Channel::Main, Frame::Hello(hello)).unwrap();
    assert!(!dst.is_connected(Channel::Return), "the old return connection closes");
    dst.handle_connected(now, Channel::Return);
    let frames = returned(&mut dst, now);
    assert!(matches!(frames.first(), Some(Frame::Welcome(w)) if w.epoch == 1), "{frames:?}");
}

/// fuzz/artifacts/destination_events/report-after-refused-connection: a
/// completed destination answering a resume hello had sent the welcome, not
/// yet the present-page report, when bad bytes made it refuse the return
/// connection; the rest of the report then went out first on the next
/// return connection, before any welcome. Refusing a connection now cuts
/// the answer queued for it, as a loss does.
#[test]
fn a_refused_connection_cuts_the_recovery_answer() {
    let config = Config { keepalive_interval: None, peer_timeout: None, ..Config::postcopy() };
    let mut dst = Destination::new(config, 64);
    let now = Timestamp::ZERO;
    dst.handle_connected(now, Channel::Main);
    dst.handle_connected(now, Channel::Return);
    dst.handle_frame(now, Channel::Main, small_hello()).unwrap();
    dst.handle_frame(now, Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::from_static(b"dev") }).unwrap();
    dst.handle_device_state_loaded(now, Ok(())).unwrap();
    dst.handle_frame(now, Channel::Main, Frame::StartGuest).unwrap();
    for index in 0..4 {
        let page = PageFrame {
            address: PageAddress { block: 0, index },
            kind: PageKind::Background,
            data: PageData::Bytes(Bytes::from(vec![1; 64])),
        };
        dst.handle_frame(now, Channel::Main, Frame::Page(page)).unwrap();
    }
    let _ = returned(&mut dst, now);
    assert_eq!(dst.state(), DestinationState::Completed);
    // A resume hello on fresh connections; only the welcome leaves.
    dst.handle_connected(now, Channel::Main);
    dst.handle_connected(now, Channel::Return);
    let Frame::Hello(mut hello) = small_hello() else { unreachable!() };
    hello.resume = true;
    hello.epoch = 1;
    dst.handle_frame(now, Channel::Main, Frame::Hello(hello)).unwrap();
    let mut out = Vec::new();
    assert_eq!(dst.poll_transmit(now, Channel::Return, &mut out, 1), 1);
    // Bad bytes on the return connection: refused.
    dst.handle_input(now, Channel::Return, Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 0]));
    assert!(!dst.is_connected(Channel::Return));
    dst.handle_connected(now, Channel::Return);
    let frames = returned(&mut dst, now);
    assert!(frames.is_empty(), "nothing of the cut answer on the new connection: {frames:?}");
}
