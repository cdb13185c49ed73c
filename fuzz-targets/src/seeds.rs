//! The checked-in seed corpus, built from code so that each seed says what it
//! is for and a test proves it still does that (`tests/seeds.rs`; set
//! `POSTCOPY_WRITE_SEEDS=1` to rewrite `fuzz/corpus/<target>/seed-*`).
//!
//! - Whole migrations: the frames of a real [`Pair`] run (pure postcopy
//!   with faults, and hybrid with writes between rounds), recorded byte for
//!   byte per channel; replayed as raw bytes into `wire_decode`, and as
//!   events into each core alone (the other side's bytes as they arrived,
//!   this side's transmissions at the same points).
//! - One seed per error class: unknown frame type, oversized length,
//!   truncated, trailing bytes, reserved bits, bad magic, wrong version,
//!   malformed field, page out of range, block out of range, frame in the
//!   wrong state, request after the end, too many requests, and more (page
//!   size, session, guest too large, device state too large, page length).
//! - Recovery after a lost connection, and adversarial pair runs (split
//!   frames, losses, a partition).
//! - QMP: a whole session (negotiation, a migration switched to postcopy,
//!   paused, resumed, quit), and one seed per kind of bad input (before
//!   negotiation, not JSON, not an object, bad members, bad arguments,
//!   unknown command, wrong state, too long) and ids of every JSON type.

use bytes::Bytes;
use postcopy_core::testkit::{Pair, PairConfig};
use postcopy_core::wire::{self, Frame, FrameKind, MAGIC, PROTOCOL_VERSION};
use postcopy_core::{Channel, Config, MigrationError, PageNumber, ProtocolError, WireError};

use crate::destination_events::{self as dst, DestinationEvent, DestinationInput, DestinationSetup};
use crate::frames::{FrameSpec, PageSpec, WordSpec};
use crate::input::Num;
use crate::pair::{PairInput, PairOp, PairOutcome, PairSetup};
use crate::qmp_session::{self, QmpInput};
use crate::source_events::{self as src, SourceEvent, SourceInput, SourceSetup};
use crate::wire_decode::{self, WireInput};

/// One seed: where it goes, what it is, and a check that it still is.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
    pub check: Box<dyn Fn()>,
}

/// What happened in a recorded run, in order.
#[derive(Clone, Debug)]
enum Event {
    /// The writer of the channel transmitted (budget [`RECORD_BUDGET`]).
    Transmit(Channel),
    /// These bytes arrived on the channel.
    Deliver(Channel, Bytes),
    /// A destination vCPU faulted on this page.
    Fault(u64),
    /// The source's guest wrote this page.
    Write(u64),
}

const RECORD_BUDGET: usize = 4096;
const RECORD_PAGES: u64 = 12;
/// The testkit's device state (`PairConfig::new`).
const DEVICE_STATE_LEN: u8 = 26;

/// A fair, loss-free run of a real pair, recorded.
fn record(hybrid: bool) -> (Vec<Event>, [Vec<u8>; 3]) {
    let base = if hybrid { Config::hybrid(1) } else { Config::postcopy() };
    let config = Config { keepalive_interval: None, peer_timeout: None, request_batch_pages: 2, ..base };
    let mut pair = Pair::new(PairConfig::new(config, RECORD_PAGES));
    let mut events = Vec::new();
    let mut streams: [Vec<u8>; 3] = Default::default();
    for page in [1, 4, 5, 9] {
        pair.guest_access(0, PageNumber(page), true);
        events.push(Event::Write(page));
    }
    let mut faulted = false;
    for _ in 0..500 {
        if pair.finished() {
            break;
        }
        if hybrid && pair.src.running && pair.src.core.pages_sent() == RECORD_PAGES {
            // Dirty a page sent in precopy: it goes stale and is discarded.
            pair.guest_access(0, PageNumber(4), true);
            events.push(Event::Write(4));
        }
        if pair.dst.running && !faulted {
            faulted = true;
            for page in [7, 8, 10] {
                if !pair.dst.is_present(PageNumber(page)) {
                    pair.guest_access(u32::from(page == 10), PageNumber(page), false);
                    if pair.dst.core.is_outstanding(PageNumber(page)) {
                        events.push(Event::Fault(page));
                    }
                }
            }
        }
        for channel in [Channel::Return, Channel::Urgent, Channel::Main] {
            if pair.transmit(channel, RECORD_BUDGET) {
                events.push(Event::Transmit(channel));
            }
            while let Some(front) = pair.pipes[channel.index()].in_flight.front().cloned() {
                pair.deliver(channel, usize::MAX);
                streams[channel.index()].extend_from_slice(&front);
                events.push(Event::Deliver(channel, front));
            }
        }
    }
    assert!(pair.completed(), "the recorded run completes");
    assert!(faulted, "the recorded run has remote faults");
    (events, streams)
}

fn wire_seed(name: &str, chunks: Vec<u16>, stream: Vec<u8>, check: impl Fn(&wire_decode::Decoded) + 'static) -> Seed {
    let input = WireInput { chunks, stream };
    let bytes = input.to_bytes();
    Seed {
        target: "wire_decode",
        name: name.to_owned(),
        bytes,
        check: Box::new(move || check(&wire_decode::run(&input))),
    }
}

fn header(kind: u8, flags: u8, len: u32) -> Vec<u8> {
    let mut out = vec![kind, flags, 0, 0];
    out.extend_from_slice(&len.to_be_bytes());
    out
}

fn welcome_payload(magic: u32, version: u16) -> Vec<u8> {
    let mut out = header(FrameKind::Welcome.code(), 0, 24);
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&[0; 18]);
    out
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode(frame, &mut out);
    out
}

/// A raw byte string of one error class: its name, the bytes, and a test
/// for the error it must give.
type BadBytes = (&'static str, Vec<u8>, fn(&WireError) -> bool);

fn bad_bytes() -> Vec<BadBytes> {
    let mut truncated = header(FrameKind::Welcome.code(), 0, 4);
    truncated.extend_from_slice(&MAGIC.to_be_bytes());
    let mut trailing = header(FrameKind::Request.code(), 0, 12);
    trailing.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 0, 0, 5, 0xee, 0xee]);
    let mut malformed = header(FrameKind::Request.code(), 0, 6);
    malformed.extend_from_slice(&[0; 6]);
    vec![
        ("unknown-frame-type", header(0x7f, 0, 0), |e| matches!(e, WireError::UnknownFrameType(0x7f))),
        ("oversized-length", header(FrameKind::Page.code(), 0, u32::MAX), |e| {
            matches!(e, WireError::FrameTooLarge { kind: FrameKind::Page, .. })
        }),
        ("truncated", truncated, |e| matches!(e, WireError::Truncated { kind: FrameKind::Welcome })),
        ("trailing-bytes", trailing, |e| matches!(e, WireError::TrailingBytes { kind: FrameKind::Request, extra: 2 })),
        (
            "reserved-bits",
            header(FrameKind::Ping.code(), 0, 0)
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 2 { 1 } else { b })
                .collect(),
            |e| matches!(e, WireError::ReservedBits { kind: FrameKind::Ping }),
        ),
        ("reserved-flags", header(FrameKind::Eoc.code(), 0x80, 0), |e| {
            matches!(e, WireError::ReservedBits { kind: FrameKind::Eoc })
        }),
        ("bad-magic", welcome_payload(0xdead_beef, PROTOCOL_VERSION), |e| {
            matches!(e, WireError::BadMagic(0xdead_beef))
        }),
        ("wrong-version", welcome_payload(MAGIC, PROTOCOL_VERSION + 1), |e| {
            matches!(e, WireError::UnsupportedVersion { .. })
        }),
        ("malformed-field", malformed, |e| matches!(e, WireError::Malformed { kind: FrameKind::Request, .. })),
    ]
}

fn wire_seeds(streams: &[Vec<u8>; 3], hybrid_streams: &[Vec<u8>; 3]) -> Vec<Seed> {
    let mut seeds = Vec::new();
    for channel in Channel::ALL {
        for (label, s) in [("postcopy", streams), ("hybrid", hybrid_streams)] {
            let stream = s[channel.index()].clone();
            let count = stream.len();
            let check = move |d: &wire_decode::Decoded| {
                assert_eq!(d.error, None);
                assert!(!d.partial && d.frames.len() > 1, "{count} bytes of whole frames");
            };
            seeds.push(wire_seed(&format!("seed-transcript-{label}-{channel}"), vec![], stream.clone(), check));
        }
    }
    let main = streams[Channel::Main.index()].clone();
    seeds.push(wire_seed("seed-transcript-postcopy-main-chunked", vec![1, 7, 300, 0], main, |d| {
        assert_eq!(d.error, None);
    }));
    let mut preamble = Vec::new();
    wire::encode_preamble(&mut preamble, Channel::Urgent);
    preamble.extend(encoded(&Frame::Ping));
    seeds.push(wire_seed("seed-preamble-then-ping", vec![], preamble, |d| {
        // The preamble is not a frame: its magic byte is no frame type.
        assert!(matches!(d.error, Some(WireError::UnknownFrameType(_))));
    }));
    let mut partial = encoded(&Frame::Eoc);
    partial.extend(&encoded(&Frame::PresentEnd { present_pages: 3 })[..10]);
    seeds.push(wire_seed("seed-partial-frame", vec![3], partial, |d| {
        assert_eq!((d.frames.len(), d.error.clone(), d.partial), (1, None, true));
    }));
    for (name, bytes, expect) in bad_bytes() {
        let mut stream = encoded(&Frame::Ping);
        stream.extend(bytes);
        seeds.push(wire_seed(&format!("seed-error-{name}"), vec![5], stream, move |d| {
            let error = d.error.as_ref().expect("an error");
            assert!(expect(error), "{error:?}");
        }));
    }
    seeds
}

/// Raw bytes as ops of at most 255 bytes each.
fn byte_ops<T>(bytes: &[u8], mut op: impl FnMut(Vec<u8>) -> T) -> Vec<T> {
    bytes.chunks(255).map(|c| op(c.to_vec())).collect()
}

fn source_setup(mode: u8, flags: u8) -> SourceSetup {
    SourceSetup {
        mode,
        flags,
        max_requests: 15,
        batch: 1,
        chunk: 63,
        device_state_len: DEVICE_STATE_LEN,
        blocks: vec![RECORD_PAGES as u8 - 1],
    }
}

/// Flags: urgent channel, prepaging, connects, stops and syncs answered at once.
const SOURCE_AUTO: u8 = 0x1 | 0x2 | 0x10 | 0x20 | 0x40;

fn source_seed(name: &str, input: SourceInput, check: impl Fn(&src::SourceRunLog) + 'static) -> Seed {
    Seed {
        target: "source_events",
        name: name.to_owned(),
        bytes: input.to_bytes(),
        check: Box::new(move || check(&src::run(&input))),
    }
}

fn source_error(name: &str, ops: Vec<SourceEvent>, expect: fn(&MigrationError) -> bool) -> Seed {
    let input = SourceInput { setup: source_setup(0, SOURCE_AUTO), ops };
    source_seed(&format!("seed-error-{name}"), input, move |report| {
        assert!(report.errors.iter().any(expect), "expected error not reported: {:?}", report.errors);
    })
}

fn frame_op(frame: FrameSpec) -> SourceEvent {
    SourceEvent::Frame { ch: 0, frame, split: 3 }
}

fn welcome(max: u8) -> FrameSpec {
    FrameSpec::Welcome {
        session: Num::Near(0),
        epoch: Num::Near(0),
        started: false,
        loaded: false,
        max_requests: Num::Near(max),
    }
}

fn request(indexes: Vec<Num>) -> FrameSpec {
    FrameSpec::Request { block: Num::Near(0), indexes }
}

fn transmit(ch: Channel) -> SourceEvent {
    SourceEvent::Transmit { ch: ch.index() as u8, max_bytes: RECORD_BUDGET as u16 }
}

/// Start, connect, hello, welcome, stop; the source is in SWITCHOVER.
fn source_to_switchover(max: u8) -> Vec<SourceEvent> {
    vec![SourceEvent::Start, transmit(Channel::Main), transmit(Channel::Urgent), frame_op(welcome(max))]
}

/// ... and past StartGuest: ACTIVE.
fn source_to_active() -> Vec<SourceEvent> {
    let mut ops = source_to_switchover(15);
    ops.extend([transmit(Channel::Main), frame_op(FrameSpec::ReadyToRun), transmit(Channel::Urgent)]);
    ops
}

fn source_from_events(events: &[Event]) -> Vec<SourceEvent> {
    let mut ops = vec![SourceEvent::Start];
    for event in events {
        match event {
            Event::Transmit(ch) if ch.is_from_source() => ops.push(transmit(*ch)),
            Event::Deliver(Channel::Return, bytes) => {
                ops.extend(byte_ops(bytes, |bytes| SourceEvent::Bytes { ch: 0, bytes }))
            }
            Event::Write(page) => ops.push(SourceEvent::GuestWrite(Num::Near(*page as u8))),
            _ => {}
        }
    }
    ops
}

fn source_seeds(events: &[Event], hybrid_events: &[Event]) -> Vec<Seed> {
    let completed = |r: &src::SourceRunLog| assert_eq!(r.finished, Some(Ok(())), "states {:?}", r.states);
    let mut seeds = vec![
        source_seed(
            "seed-transcript-postcopy",
            SourceInput { setup: source_setup(0, SOURCE_AUTO), ops: source_from_events(events) },
            completed,
        ),
        source_seed(
            "seed-transcript-hybrid",
            SourceInput { setup: source_setup(2, SOURCE_AUTO), ops: source_from_events(hybrid_events) },
            completed,
        ),
    ];
    // A structured migration, then a loss and a recovery.
    let mut ops = source_to_active();
    ops.extend([
        frame_op(request(vec![Num::Near(3), Num::Near(5)])),
        transmit(Channel::Urgent),
        transmit(Channel::Main),
        SourceEvent::ConnectionLost(0),
        SourceEvent::Timer(0),
    ]);
    ops.extend(reconnected_to_completion());
    seeds.push(source_seed("seed-recovery", SourceInput { setup: source_setup(0, SOURCE_AUTO), ops }, move |r| {
        assert!(r.states.contains(&postcopy_core::SourceState::Recovering), "{:?}", r.states);
        completed(r);
    }));
    // Manual recovery: the user pauses; nothing happens until the user resumes.
    let mut ops = source_to_active();
    ops.extend([
        frame_op(request(vec![Num::Near(3)])),
        transmit(Channel::Urgent),
        transmit(Channel::Main),
        SourceEvent::Pause,
        SourceEvent::Timer(0),
        SourceEvent::Timer(40),
        SourceEvent::Resume,
    ]);
    ops.extend(reconnected_to_completion());
    let setup = source_setup(0, SOURCE_AUTO | 0x80);
    seeds.push(source_seed("seed-manual-recovery", SourceInput { setup, ops }, move |r| {
        let paused = r.errors.iter().any(|e| matches!(e, MigrationError::PausedByUser));
        assert!(paused, "{:?}", r.errors);
        assert!(r.states.contains(&postcopy_core::SourceState::Recovering), "{:?}", r.states);
        completed(r);
    }));

    // Error classes, as the source meets them.
    for (name, bytes, expect) in bad_bytes() {
        let mut ops = vec![SourceEvent::Start];
        ops.push(SourceEvent::Bytes { ch: 0, bytes });
        let input = SourceInput { setup: source_setup(0, SOURCE_AUTO), ops };
        seeds.push(source_seed(&format!("seed-error-{name}"), input, move |r| {
            let found = r
                .errors
                .iter()
                .any(|e| matches!(e, MigrationError::Protocol(ProtocolError::Wire { error, .. }) if expect(error)));
            assert!(found, "{:?}", r.errors);
        }));
    }
    let mut ops = source_to_switchover(15);
    ops.push(frame_op(FrameSpec::Request { block: Num::Raw(9), indexes: vec![Num::Near(0)] }));
    seeds.push(source_error("block-out-of-range", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::BlockOutOfRange { block: 9 }))
    }));
    let mut ops = source_to_switchover(15);
    ops.push(frame_op(request(vec![Num::Raw(1000)])));
    seeds.push(source_error("page-out-of-range", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::PageOutOfRange { index: 1000, .. }))
    }));
    let ops = vec![SourceEvent::Start, frame_op(FrameSpec::Eoc)];
    seeds.push(source_error("frame-in-wrong-state", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::UnexpectedFrame { kind: FrameKind::Eoc, .. }))
    }));
    let mut ops = source_to_active();
    // Every page, one frame at a time, stopping short of the end of stream.
    ops.extend((0..RECORD_PAGES).map(|_| SourceEvent::Transmit { ch: 0, max_bytes: 1 }));
    ops.extend([frame_op(FrameSpec::Eoc), frame_op(request(vec![Num::Near(2)]))]);
    seeds.push(source_error("request-after-end", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::RequestAfterEnd))
    }));
    let mut ops = source_to_switchover(2);
    ops.push(frame_op(request(vec![Num::Near(1), Num::Near(2), Num::Near(3)])));
    seeds.push(source_error("too-many-requests", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::TooManyRequests { limit: 2 }))
    }));
    let ops = vec![
        SourceEvent::Start,
        frame_op(FrameSpec::Welcome {
            session: Num::Raw(1),
            epoch: Num::Near(0),
            started: false,
            loaded: false,
            max_requests: Num::Near(4),
        }),
    ];
    seeds.push(source_error("session-mismatch", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::SessionMismatch { .. }))
    }));
    let mut ops = source_to_switchover(15);
    ops.push(frame_op(FrameSpec::Reject(b"no room".to_vec())));
    seeds.push(source_error("rejected", ops, |e| matches!(e, MigrationError::Protocol(ProtocolError::Rejected(_)))));
    seeds
}

fn destination_setup(flags: u8) -> DestinationSetup {
    DestinationSetup { page_size: 0, flags, max_requests: 15, batch: 1, max_device_state: 8 }
}

/// Flags: device-state loads finish at once.
const DESTINATION_AUTO: u8 = 0x8;

fn destination_seed(name: &str, input: DestinationInput, check: impl Fn(&dst::DestinationRunLog) + 'static) -> Seed {
    Seed {
        target: "destination_events",
        name: name.to_owned(),
        bytes: input.to_bytes(),
        check: Box::new(move || check(&dst::run(&input))),
    }
}

fn destination_error(name: &str, ops: Vec<DestinationEvent>, expect: fn(&MigrationError) -> bool) -> Seed {
    let input = DestinationInput { setup: destination_setup(DESTINATION_AUTO), ops };
    destination_seed(&format!("seed-error-{name}"), input, move |report| {
        assert!(report.errors.iter().any(expect), "expected error not reported: {:?}", report.errors);
    })
}

fn connect_all() -> Vec<DestinationEvent> {
    (0..3).map(DestinationEvent::Connected).collect()
}

fn on(ch: Channel, frame: FrameSpec) -> DestinationEvent {
    let ch = match ch {
        Channel::Main => 0,
        Channel::Urgent => 1,
        Channel::Return => 2,
        Channel::Push(stream) => 0xf0 + (stream.number() - 1) % 3,
    };
    DestinationEvent::Frame { ch, frame, split: 5 }
}

fn hello(resume: bool, hybrid: bool, blocks: Vec<(u8, Num)>) -> FrameSpec {
    FrameSpec::Hello {
        resume,
        urgent: true,
        session: Num::Near(0),
        epoch: Num::Near(0),
        page_size: Num::Near(0),
        hybrid,
        rounds: u8::from(hybrid),
        blocks,
        machine: b"2 vcpus, q35".to_vec(),
        push: 0,
    }
}

fn page(index: u8, kind: u8) -> FrameSpec {
    FrameSpec::Page { block: Num::Near(0), index: Num::Near(index), kind, data: PageSpec::Fill(index + 1) }
}

const RETURN_TRANSMIT: DestinationEvent = DestinationEvent::Transmit { ch: 0, max_bytes: RECORD_BUDGET as u16 };

/// Connected, hello, device state loaded: AWAITING_START.
fn destination_to_awaiting_start() -> Vec<DestinationEvent> {
    let mut ops = connect_all();
    ops.extend([
        on(Channel::Main, hello(false, false, vec![(0, Num::Near(11))])),
        on(Channel::Urgent, FrameSpec::UrgentHello { session: Num::Near(0), epoch: Num::Near(0) }),
        RETURN_TRANSMIT,
        on(Channel::Main, FrameSpec::DeviceState { last: true, len: 20 }),
        RETURN_TRANSMIT,
    ]);
    ops
}

fn destination_from_events(events: &[Event]) -> Vec<DestinationEvent> {
    let mut ops = connect_all();
    for event in events {
        match event {
            Event::Transmit(Channel::Return) => ops.push(RETURN_TRANSMIT),
            Event::Deliver(ch, bytes) if ch.is_from_source() => {
                let ch = if *ch == Channel::Main { 0 } else { 1 };
                ops.extend(byte_ops(bytes, |bytes| DestinationEvent::Bytes { ch, bytes }));
            }
            Event::Fault(page) => ops.push(DestinationEvent::PageFault { page: Num::Near(*page as u8), waiter: 0 }),
            _ => {}
        }
    }
    ops
}

fn destination_seeds(events: &[Event], hybrid_events: &[Event]) -> Vec<Seed> {
    let completed =
        |r: &dst::DestinationRunLog| assert_eq!(r.finished, Some(Ok(())), "states {:?} {:?}", r.states, r.errors);
    let mut seeds = vec![
        destination_seed(
            "seed-transcript-postcopy",
            DestinationInput { setup: destination_setup(DESTINATION_AUTO), ops: destination_from_events(events) },
            completed,
        ),
        destination_seed(
            "seed-transcript-hybrid",
            DestinationInput {
                setup: destination_setup(DESTINATION_AUTO),
                ops: destination_from_events(hybrid_events),
            },
            completed,
        ),
    ];
    // Structured, with a loss and a recovery while running.
    let mut ops = destination_to_awaiting_start();
    ops.extend([
        on(Channel::Urgent, FrameSpec::StartGuest),
        DestinationEvent::PageFault { page: Num::Near(6), waiter: 1 },
        DestinationEvent::PageFault { page: Num::Near(2), waiter: 4 },
        RETURN_TRANSMIT,
        on(Channel::Urgent, page(6, 2)),
        DestinationEvent::ConnectionLost(1),
        DestinationEvent::Timer(30),
    ]);
    ops.extend(connect_all());
    ops.extend([
        on(Channel::Main, hello(true, false, vec![(0, Num::Near(11))])),
        on(Channel::Urgent, FrameSpec::UrgentHello { session: Num::Near(0), epoch: Num::Near(0) }),
        RETURN_TRANSMIT,
    ]);
    ops.extend((0..12).filter(|&p| p != 6).map(|p| on(Channel::Main, page(p, 1))));
    ops.push(RETURN_TRANSMIT);
    seeds.push(destination_seed(
        "seed-recovery",
        DestinationInput { setup: destination_setup(DESTINATION_AUTO), ops },
        move |r| {
            assert!(r.states.contains(&postcopy_core::DestinationState::Recovering), "{:?}", r.states);
            completed(r);
        },
    ));
    // A page that failed to install: paused, recovered, the page sent again.
    let mut ops = destination_to_awaiting_start();
    ops.extend([
        on(Channel::Urgent, FrameSpec::StartGuest),
        DestinationEvent::PageFault { page: Num::Near(6), waiter: 1 },
        RETURN_TRANSMIT,
        on(Channel::Urgent, page(6, 2)),
        DestinationEvent::InstallFailed { page: Num::Near(6) },
        DestinationEvent::Timer(30),
    ]);
    ops.extend(connect_all());
    ops.extend([
        on(Channel::Main, hello(true, false, vec![(0, Num::Near(11))])),
        on(Channel::Urgent, FrameSpec::UrgentHello { session: Num::Near(0), epoch: Num::Near(0) }),
        RETURN_TRANSMIT,
    ]);
    ops.extend((0..12).map(|p| on(Channel::Main, page(p, 1))));
    ops.push(RETURN_TRANSMIT);
    seeds.push(destination_seed(
        "seed-install-failed",
        DestinationInput { setup: destination_setup(DESTINATION_AUTO), ops },
        move |r| {
            assert!(r.states.contains(&postcopy_core::DestinationState::Recovering), "{:?}", r.states);
            assert!(
                r.errors.iter().any(|e| matches!(e, postcopy_core::MigrationError::InstallFailed { page: 6, .. })),
                "{:?}",
                r.errors
            );
            completed(r);
        },
    ));
    // Hybrid: precopy pages, a stale discard, overwrites before the start.
    let mut ops = connect_all();
    ops.extend([
        on(Channel::Main, hello(false, true, vec![(0, Num::Near(3)), (1, Num::Near(3))])),
        on(Channel::Urgent, FrameSpec::UrgentHello { session: Num::Near(0), epoch: Num::Near(0) }),
        RETURN_TRANSMIT,
        on(Channel::Main, page(0, 0)),
        on(Channel::Main, page(1, 0)),
        on(Channel::Main, page(1, 0)),
        on(Channel::Main, FrameSpec::Discard { block: Num::Near(0), ranges: vec![(Num::Near(1), Num::Near(0))] }),
        on(Channel::Main, FrameSpec::DeviceState { last: false, len: 10 }),
        on(Channel::Main, FrameSpec::DeviceState { last: true, len: 10 }),
        RETURN_TRANSMIT,
        on(Channel::Main, FrameSpec::StartGuest),
        on(Channel::Main, FrameSpec::EndOfStream),
    ]);
    seeds.push(destination_seed(
        "seed-hybrid-discard",
        DestinationInput { setup: destination_setup(DESTINATION_AUTO), ops },
        |r| assert!(r.pages_installed >= 3 && r.errors.is_empty(), "{r:?}"),
    ));

    // Error classes, as the destination meets them.
    for (name, bytes, expect) in bad_bytes() {
        let mut ops = connect_all();
        ops.push(DestinationEvent::Bytes { ch: 0, bytes });
        let input = DestinationInput { setup: destination_setup(DESTINATION_AUTO), ops };
        seeds.push(destination_seed(&format!("seed-error-{name}"), input, move |r| {
            let found = r
                .errors
                .iter()
                .any(|e| matches!(e, MigrationError::Protocol(ProtocolError::Wire { error, .. }) if expect(error)));
            assert!(found, "{:?}", r.errors);
        }));
    }
    let running = || {
        let mut ops = destination_to_awaiting_start();
        ops.push(on(Channel::Urgent, FrameSpec::StartGuest));
        ops
    };
    // Strangers beside a running migration: another migration's resume
    // hello on the main channel, then its urgent hello; each refused alone.
    let mut ops = running();
    for ch in [0, 1] {
        let frame = if ch == 0 {
            hello(true, false, vec![(0, Num::Near(3))])
        } else {
            FrameSpec::UrgentHello { session: Num::Near(0), epoch: Num::Near(1) }
        };
        ops.push(DestinationEvent::Stranger { ch, other_session: true, frame, garbage: vec![0x7f; 9] });
    }
    seeds.push(destination_error("stranger-other-session", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::SessionMismatch { .. }))
    }));
    let mut ops = running();
    ops.push(on(
        Channel::Main,
        FrameSpec::Page { block: Num::Raw(9), index: Num::Near(0), kind: 1, data: PageSpec::Zero },
    ));
    seeds.push(destination_error("block-out-of-range", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::BlockOutOfRange { block: 9 }))
    }));
    let mut ops = running();
    ops.push(on(
        Channel::Main,
        FrameSpec::Page { block: Num::Near(0), index: Num::Raw(99), kind: 1, data: PageSpec::Zero },
    ));
    seeds.push(destination_error("page-out-of-range", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::PageOutOfRange { index: 99, .. }))
    }));
    let mut ops = running();
    ops.push(on(
        Channel::Urgent,
        FrameSpec::Page { block: Num::Near(0), index: Num::Near(1), kind: 2, data: PageSpec::Length(3) },
    ));
    seeds.push(destination_error("page-length", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::PageLength { got: 3, .. }))
    }));
    let mut ops = connect_all();
    ops.extend([
        on(Channel::Main, hello(false, false, vec![(0, Num::Near(3))])),
        on(Channel::Main, FrameSpec::StartGuest),
    ]);
    seeds.push(destination_error("frame-in-wrong-state", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::UnexpectedFrame { kind: FrameKind::StartGuest, .. }))
    }));
    let mut ops = connect_all();
    ops.push(on(
        Channel::Main,
        FrameSpec::Hello {
            resume: false,
            urgent: false,
            session: Num::Near(0),
            epoch: Num::Near(0),
            page_size: Num::Raw(4096),
            hybrid: false,
            rounds: 0,
            blocks: vec![(0, Num::Near(3))],
            machine: Vec::new(),
            push: 0,
        },
    ));
    seeds.push(destination_error("page-size-mismatch", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::PageSizeMismatch { theirs: 4096, .. }))
    }));
    // The second block has pages four times the destination's (a huge-page
    // block where the destination backs RAM with small pages).
    let mut ops = connect_all();
    ops.push(on(Channel::Main, hello(false, false, vec![(0, Num::Near(3)), (0x81, Num::Near(2))])));
    seeds.push(destination_error("block-page-size-mismatch", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::BlockPageSizeMismatch { .. }))
    }));
    let mut ops = connect_all();
    ops.push(on(Channel::Main, hello(false, false, vec![(0, Num::Raw(1 << 30))])));
    seeds.push(destination_error("guest-too-large", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::GuestTooLarge { .. }))
    }));
    let mut ops = connect_all();
    ops.push(on(Channel::Main, hello(false, false, vec![(0, Num::Near(3)), (0, Num::Near(3))])));
    seeds.push(destination_error("duplicate-block-name", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::BadLayout(_)))
    }));
    let mut ops = connect_all();
    ops.push(on(Channel::Main, hello(true, false, vec![(0, Num::Near(3))])));
    seeds.push(destination_error("resume-of-unknown-session", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::NothingToResume { .. }))
    }));
    let mut ops = connect_all();
    ops.extend([
        on(Channel::Main, hello(false, false, vec![(0, Num::Near(3))])),
        on(Channel::Main, FrameSpec::DeviceState { last: true, len: 200 }),
    ]);
    seeds.push(destination_error("device-state-too-large", ops, |e| {
        matches!(e, MigrationError::Protocol(ProtocolError::DeviceStateTooLarge { limit: 32 }))
    }));
    let mut ops = connect_all();
    ops.extend([
        on(Channel::Main, hello(false, false, vec![(0, Num::Near(3))])),
        on(Channel::Main, FrameSpec::Cancel(b"operator said so".to_vec())),
    ]);
    seeds.push(destination_error("cancelled-by-source", ops, |e| matches!(e, MigrationError::CancelledByPeer(_))));
    seeds
}

fn pair_seed(name: &str, setup: PairSetup, ops: Vec<PairOp>, expect: PairOutcome) -> Seed {
    let input = PairInput { setup, ops };
    Seed {
        target: "pair",
        name: name.to_owned(),
        bytes: input.to_bytes(),
        check: Box::new(move || assert_eq!(crate::pair::run(&input), expect)),
    }
}

fn pair_setup(mode: u8, flags: u8) -> PairSetup {
    PairSetup {
        mode,
        flags,
        batch: 2,
        spare_requests: 4,
        vcpus: 1,
        device_state_len: 40,
        chunk: 15,
        device_pages: vec![Num::Near(2)],
        blocks: vec![9, 5],
    }
}

fn pair_seeds() -> Vec<Seed> {
    use PairOp::*;
    let main = Channel::Main.index() as u8;
    let ret = Channel::Return.index() as u8;
    let urgent = Channel::Urgent.index() as u8;
    let write = |page| Access { vcpu: 0, page: Num::Near(page), write: true };
    let read = |vcpu, page| Access { vcpu, page: Num::Near(page), write: false };
    let mut seeds = vec![pair_seed(
        "seed-postcopy-faults",
        pair_setup(0, 0x3),
        vec![write(1), write(7), Rounds(2), read(0, 3), read(1, 12), Rounds(1), write(3), Rounds(15)],
        PairOutcome::Completed,
    )];
    seeds.push(pair_seed(
        "seed-hybrid-writes",
        pair_setup(3, 0x1),
        vec![write(1), Rounds(1), write(2), write(1), Rounds(1), SwitchToPostcopy, Rounds(2), write(4), Rounds(15)],
        PairOutcome::Completed,
    ));
    seeds.push(pair_seed(
        "seed-split-frames",
        pair_setup(0, 0x1),
        vec![
            Transmit { ch: main, max_bytes: 0 },
            Deliver { ch: main, max_bytes: 3 },
            Deliver { ch: main, max_bytes: 5 },
            Deliver { ch: main, max_bytes: 0 },
            Transmit { ch: ret, max_bytes: 0 },
            Deliver { ch: ret, max_bytes: 1 },
            Deliver { ch: ret, max_bytes: 100 },
            Transmit { ch: main, max_bytes: 200 },
            Deliver { ch: main, max_bytes: 17 },
            Transmit { ch: urgent, max_bytes: 0 },
            Deliver { ch: urgent, max_bytes: 2 },
            Rounds(15),
        ],
        PairOutcome::Completed,
    ));
    seeds.push(pair_seed(
        "seed-lost-after-start",
        pair_setup(0, 0x1 | 0x4 | 0x8),
        vec![Rounds(2), read(0, 10), Transmit { ch: ret, max_bytes: 0 }, Lose(urgent), FireTimer, write(5), Rounds(15)],
        PairOutcome::Completed,
    ));
    seeds.push(pair_seed(
        "seed-partition-during-recovery",
        pair_setup(0, 0x1 | 0x10 | 0x40),
        vec![
            Rounds(2),
            Lose(main),
            Partition(true),
            FireTimer,
            FireTimer,
            FireTimer,
            FireTimer,
            Partition(false),
            FireTimer,
            Lose(ret),
            Rounds(15),
        ],
        PairOutcome::Completed,
    ));
    seeds.push(pair_seed(
        "seed-lost-before-start",
        pair_setup(0, 0x1),
        vec![Transmit { ch: main, max_bytes: 0 }, Lose(main), Rounds(3)],
        PairOutcome::FailedBeforeStart,
    ));
    seeds
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let (events, streams) = record(false);
    let (hybrid_events, hybrid_streams) = record(true);
    let mut seeds = wire_seeds(&streams, &hybrid_streams);
    seeds.extend(source_seeds(&events, &hybrid_events));
    seeds.extend(destination_seeds(&events, &hybrid_events));
    seeds.extend(pair_seeds());
    seeds.extend(qmp_seeds());
    seeds
}

fn qmp_seed(
    name: &str,
    negotiate_first: bool,
    chunks: Vec<u16>,
    stream: &[u8],
    check: impl Fn(&qmp_session::QmpRunLog) + 'static,
) -> Seed {
    let input = QmpInput { negotiate_first, advance: true, chunks, stream: stream.to_vec() };
    Seed {
        target: "qmp_session",
        name: name.to_owned(),
        bytes: input.to_bytes(),
        check: Box::new(move || check(&qmp_session::run(&input))),
    }
}

/// The descriptions of the error replies, in order.
fn qmp_errors(outcome: &qmp_session::QmpRunLog) -> Vec<String> {
    outcome.replies.iter().filter_map(|r| r["error"]["desc"].as_str().map(str::to_owned)).collect()
}

fn qmp_seeds() -> Vec<Seed> {
    use postcopy_qmp::{Event, MigrationStatus};
    let session = concat!(
        "{\"execute\":\"qmp_capabilities\"}\r\n",
        "{\"execute\":\"query-status\",\"id\":\"s\"}\n",
        "{\"execute\":\"query-version\"}{\"execute\":\"query-commands\"}\n",
        "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[",
        "{\"capability\":\"postcopy-ram\",\"state\":true},{\"capability\":\"events\",\"state\":true}]}}\n",
        "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":1000,\"downtime-limit\":300}}\n",
        "{\"execute\":\"query-migrate-parameters\"}\n{\"execute\":\"query-migrate-capabilities\"}\n",
        "{\"execute\":\"stop\"}\n{\"execute\":\"cont\"}\n",
        "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:4444\"},\"id\":1}\n",
        "{\"execute\":\"query-migrate\"}\n",
        "{\"execute\":\"migrate-start-postcopy\"}\n",
        "{\"execute\":\"migrate-pause\"}\n",
        "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:5555\",\"resume\":true}}\n",
        "{\"execute\":\"query-migrate\"}\n",
        "{\"execute\":\"quit\",\"id\":\"q\"}\n",
    );
    let long = format!("{{\"execute\":\"stop\",\"id\":\"{}\"}}\n{{\"execute\":\"query-status\"}}\n", "x".repeat(5000));
    vec![
        qmp_seed("seed-qmp-session", false, vec![7, 0], session.as_bytes(), |o| {
            assert_eq!(qmp_errors(o), Vec::<String>::new(), "a clean session");
            assert_eq!(o.executed, 14);
            assert!(o.events.contains(&Event::Migration { status: MigrationStatus::PostcopyActive }));
            assert!(o.events.contains(&Event::Migration { status: MigrationStatus::PostcopyRecover }));
        }),
        qmp_seed("seed-qmp-before-negotiation", false, vec![], b"{\"execute\":\"query-status\",\"id\":1}\n", |o| {
            assert_eq!(o.replies[0]["error"]["class"], "CommandNotFound");
            assert_eq!(o.executed, 0);
        }),
        qmp_seed("seed-qmp-not-json", true, vec![3, 1], b"hello\n{\"execute\": }\n\"open\n\xff\n", |o| {
            let errors = qmp_errors(o);
            assert_eq!(errors.len(), 4);
            assert!(errors.iter().all(|e| e.starts_with("JSON parse error, ")), "{errors:?}");
        }),
        qmp_seed("seed-qmp-not-an-object", true, vec![], b"[1]\n42\n\"s\"\n", |o| {
            assert_eq!(qmp_errors(o), vec!["QMP input must be a JSON object"; 3]);
        }),
        qmp_seed(
            "seed-qmp-bad-members",
            true,
            vec![],
            concat!(
                "{\"execute\":1,\"id\":1}\n{\"execute\":\"stop\",\"arguments\":[]}\n",
                "{\"exec-oob\":\"migrate-pause\"}\n{\"id\":2}\n{\"execute\":\"stop\",\"x\":0}\n",
            )
            .as_bytes(),
            |o| {
                assert_eq!(
                    qmp_errors(o),
                    [
                        "QMP input member 'execute' must be a string",
                        "QMP input member 'arguments' must be an object",
                        "QMP input member 'exec-oob' is unexpected",
                        "QMP input lacks member 'execute'",
                        "QMP input member 'x' is unexpected",
                    ]
                );
            },
        ),
        qmp_seed(
            "seed-qmp-bad-arguments",
            true,
            vec![],
            concat!(
                "{\"execute\":\"migrate\",\"arguments\":{\"uri\":5}}\n",
                "{\"execute\":\"migrate-recover\",\"arguments\":{}}\n",
                "{\"execute\":\"stop\",\"arguments\":{\"now\":true}}\n",
                "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\"turbo\",\"state\":true}]}}\n",
                "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":-1}}\n",
                "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n",
            )
            .as_bytes(),
            |o| {
                assert_eq!(
                    qmp_errors(o),
                    [
                        "Invalid parameter type for 'uri', expected: string",
                        "Parameter 'uri' is missing",
                        "Parameter 'now' is unexpected",
                        "Parameter 'capability' does not accept value 'turbo'",
                        "Parameter 'max-bandwidth' expects uint64",
                        "Capabilities negotiation is already complete, command ignored",
                    ]
                );
            },
        ),
        qmp_seed("seed-qmp-unknown-command", true, vec![], b"{\"execute\":\"system_reset\",\"id\":[1]}\n", |o| {
            assert_eq!(o.replies[0]["error"]["class"], "CommandNotFound");
            assert_eq!(o.replies[0]["id"], serde_json::json!([1]));
        }),
        qmp_seed(
            "seed-qmp-wrong-state",
            true,
            vec![],
            concat!(
                "{\"execute\":\"migrate-pause\"}\n{\"execute\":\"migrate-recover\",\"arguments\":{\"uri\":\"tcp:h:1\"}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:h:1\",\"resume\":true}}\n",
                "{\"execute\":\"migrate-start-postcopy\"}\n{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"tcp:h:1\"}}\n",
                "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:/x\"}}\n",
            )
            .as_bytes(),
            |o| {
                let errors = qmp_errors(o);
                assert_eq!(errors.len(), 6, "{errors:?}");
                assert!(o.replies.iter().all(|r| r["error"]["class"] == "GenericError"));
            },
        ),
        qmp_seed(
            "seed-qmp-ids",
            true,
            vec![],
            concat!(
                "{\"execute\":\"query-status\",\"id\":\"a\"}{\"execute\":\"query-status\",\"id\":-1.5}",
                "{\"execute\":\"query-status\",\"id\":{\"k\":[null]}}{\"execute\":\"query-status\",\"id\":null}\n",
            )
            .as_bytes(),
            |o| {
                let ids: Vec<_> = o.replies.iter().map(|r| r["id"].clone()).collect();
                assert_eq!(ids, [serde_json::json!("a"), serde_json::json!(-1.5), serde_json::json!({"k": [null]}), serde_json::Value::Null]);
            },
        ),
        qmp_seed("seed-qmp-too-long", true, vec![1000], long.as_bytes(), |o| {
            assert!(qmp_errors(o)[0].starts_with("JSON token size limit exceeded"));
            assert_eq!(o.replies.len(), 2);
            assert!(o.replies[1].get("return").is_some(), "the session goes on");
        }),
    ]
}

/// A paused source's reconnection to a destination that kept the guest
/// running, its report of present pages, then the end: the tail both
/// recovery seeds share.
fn reconnected_to_completion() -> Vec<SourceEvent> {
    let mut ops = vec![
        transmit(Channel::Main),
        transmit(Channel::Urgent),
        frame_op(FrameSpec::Welcome {
            session: Num::Near(0),
            epoch: Num::Near(0),
            started: true,
            loaded: true,
            max_requests: Num::Near(15),
        }),
        frame_op(FrameSpec::PresentPages { first_word: Num::Near(0), words: vec![WordSpec::Masked(0b1010_1010)] }),
        frame_op(FrameSpec::PresentEnd { count: Num::Near(0) }),
    ];
    ops.extend((0..4).map(|_| transmit(Channel::Main)));
    ops.push(frame_op(FrameSpec::Eoc));
    ops.push(transmit(Channel::Main));
    ops
}
