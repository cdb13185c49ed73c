//! Every state transition of the destination, and every error it reports,
//! driven frame by frame through the public API.

use bytes::Bytes;
use postcopy_core::wire::{
    self, Decoder, Discard, Frame, Hello, PageData, PageFrame, PageKind, PresentPages, Request, UrgentHello, Welcome,
    WireMode,
};
use postcopy_core::{
    Channel, Config, Destination, DestinationAction, DestinationState, EventError, MigrationError, Notice, PageAddress,
    PageNumber, ProtocolError, RamBlock, Timestamp, Waiter, WireError,
};
use std::time::Duration;

const PAGES: u64 = 100;
const SESSION: u64 = 42;
const PAGE_SIZE: u32 = 64;

struct Harness {
    dst: Destination,
    now: Timestamp,
    actions: Vec<DestinationAction>,
}

fn quiet() -> Config {
    Config { keepalive_interval: None, peer_timeout: None, ..Config::postcopy() }
}

fn hello(mode: WireMode, resume: bool, epoch: u32) -> Frame {
    Frame::Hello(Hello {
        resume,
        urgent_channel: true,
        session: SESSION,
        epoch,
        page_size: PAGE_SIZE,
        mode,
        precopy_rounds: 1,
        blocks: vec![
            RamBlock { name: "low".into(), page_count: 60, page_size: PAGE_SIZE },
            RamBlock { name: "high".into(), page_count: PAGES - 60, page_size: PAGE_SIZE },
        ],
        machine: Bytes::from_static(b"vcpus=2"),
        push_streams: 1,
    })
}

fn page(block: u32, index: u32, kind: PageKind) -> Frame {
    Frame::Page(PageFrame {
        address: PageAddress { block, index },
        kind,
        data: PageData::Bytes(Bytes::from(vec![index as u8 + 1; PAGE_SIZE as usize])),
    })
}

impl Harness {
    fn new(config: Config) -> Self {
        Harness { dst: Destination::new(config, PAGE_SIZE), now: Timestamp(0), actions: vec![] }
    }

    fn drain(&mut self) {
        while let Some(action) = self.dst.poll_action() {
            self.actions.push(action);
        }
    }

    fn connect(&mut self, channel: Channel) {
        self.dst.handle_connected(self.now, channel);
        self.drain();
    }

    fn receive(&mut self, channel: Channel, frame: Frame) {
        let mut bytes = Vec::new();
        wire::encode(&frame, &mut bytes);
        self.dst.handle_input(self.now, channel, Bytes::from(bytes));
        self.drain();
    }

    fn returned(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while self.dst.poll_transmit(self.now, Channel::Return, &mut out, usize::MAX) > 0 {}
        let mut decoder = Decoder::new();
        decoder.push(Bytes::from(out));
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame().unwrap() {
            frames.push(frame);
        }
        self.drain();
        frames
    }

    fn has(&self, action: &DestinationAction) -> bool {
        self.actions.contains(action)
    }

    fn finished_error(&self) -> Option<MigrationError> {
        self.actions.iter().find_map(|a| match a {
            DestinationAction::Finished(f) => f.result.clone().err(),
            _ => None,
        })
    }

    fn installed(&self) -> Vec<(u64, bool)> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                DestinationAction::InstallPage { page, overwrite, .. } => Some((page.0, *overwrite)),
                _ => None,
            })
            .collect()
    }

    fn paused_reason(&self) -> Option<MigrationError> {
        self.actions.iter().find_map(|a| match a {
            DestinationAction::Notice(Notice::Paused { reason }) => Some(reason.clone()),
            _ => None,
        })
    }

    /// All channels connected, hello accepted, welcome written.
    fn handshaken(config: Config, mode: WireMode) -> Self {
        let mut h = Harness::new(config);
        for channel in Channel::ALL {
            h.connect(channel);
        }
        h.receive(Channel::Main, hello(mode, false, 0));
        h.receive(Channel::Urgent, Frame::UrgentHello(UrgentHello { session: SESSION, epoch: 0 }));
        assert_eq!(h.dst.state(), DestinationState::Precopy);
        assert!(matches!(h.returned()[..], [Frame::Welcome(_)]));
        h
    }

    /// Device state received and loaded: AWAITING_START, ReadyToRun written.
    fn awaiting_start(config: Config) -> Self {
        let mut h = Harness::handshaken(config, WireMode::Postcopy);
        h.receive(Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::from_static(b"dev") });
        assert_eq!(h.dst.state(), DestinationState::LoadingDevice);
        h.dst.handle_device_state_loaded(h.now, Ok(())).unwrap();
        h.drain();
        assert_eq!(h.returned(), vec![Frame::ReadyToRun]);
        assert_eq!(h.dst.state(), DestinationState::AwaitingStart);
        h
    }

    fn running(config: Config) -> Self {
        let mut h = Harness::awaiting_start(config);
        h.receive(Channel::Urgent, Frame::StartGuest);
        assert_eq!(h.dst.state(), DestinationState::Running);
        assert!(h.has(&DestinationAction::ResumeVcpus));
        h
    }
}

#[test]
fn channels_may_connect_in_any_order() {
    let mut h = Harness::new(quiet());
    // Urgent first, then main with its hello, then the return path.
    h.connect(Channel::Urgent);
    h.receive(Channel::Urgent, Frame::UrgentHello(UrgentHello { session: SESSION, epoch: 0 }));
    h.connect(Channel::Main);
    h.receive(Channel::Main, hello(WireMode::Postcopy, false, 0));
    assert_eq!(h.dst.state(), DestinationState::Precopy);
    assert!(h.returned().is_empty(), "no return path yet");
    h.connect(Channel::Return);
    let frames = h.returned();
    assert!(matches!(&frames[..], [Frame::Welcome(w)] if w.session == SESSION && !w.guest_started));
    assert!(matches!(&h.actions[0], DestinationAction::PrepareMemory(layout) if layout.total_pages() == PAGES));
    assert_eq!(h.dst.machine_description(), Some(&Bytes::from_static(b"vcpus=2")));
    assert!(h.dst.is_connected(Channel::Urgent));
}

#[test]
fn urgent_hello_of_another_session_is_closed() {
    let mut h = Harness::handshaken(quiet(), WireMode::Postcopy);
    h.connect(Channel::Urgent);
    h.receive(Channel::Urgent, Frame::UrgentHello(UrgentHello { session: 9, epoch: 0 }));
    assert!(h.has(&DestinationAction::Close(Channel::Urgent)));
    assert_eq!(h.dst.state(), DestinationState::Precopy);
}

#[test]
fn handshake_errors_refuse_the_connection_and_keep_listening() {
    let bad_size = Frame::Hello(Hello {
        resume: false,
        urgent_channel: false,
        session: 1,
        epoch: 0,
        page_size: 4096,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: vec![RamBlock { name: "ram".into(), page_count: 1, page_size: PAGE_SIZE }],
        machine: bytes::Bytes::new(),
        push_streams: 1,
    });
    let bad_layout = Frame::Hello(Hello {
        resume: false,
        urgent_channel: false,
        session: 1,
        epoch: 0,
        page_size: PAGE_SIZE,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: vec![RamBlock { name: "ram".into(), page_count: 0, page_size: PAGE_SIZE }],
        machine: bytes::Bytes::new(),
        push_streams: 1,
    });
    let cases = [
        (bad_size, MigrationError::Protocol(ProtocolError::PageSizeMismatch { ours: PAGE_SIZE, theirs: 4096 })),
        (
            bad_layout,
            MigrationError::Protocol(ProtocolError::BadLayout(postcopy_core::LayoutError::BadBlockSize {
                name: "ram".into(),
                pages: 0,
            })),
        ),
        (
            hello(WireMode::Postcopy, true, 1),
            MigrationError::Protocol(ProtocolError::NothingToResume { session: SESSION }),
        ),
        (
            page(0, 0, PageKind::Background),
            MigrationError::Protocol(ProtocolError::UnexpectedFrame {
                channel: Channel::Main,
                kind: wire::FrameKind::Page,
                state: "LISTENING".into(),
            }),
        ),
    ];
    for (frame, expected) in cases {
        // A connection that has not shown a migration's identity is refused
        // alone: the destination keeps listening for its real source.
        let mut h = Harness::new(quiet());
        h.connect(Channel::Return);
        h.connect(Channel::Main);
        h.receive(Channel::Main, frame);
        assert_eq!(h.dst.state(), DestinationState::Listening);
        assert_eq!(h.finished_error(), None);
        let mismatch = matches!(expected, MigrationError::Protocol(ProtocolError::PageSizeMismatch { .. }));
        // A page size mismatch leaves the main connection to its source,
        // which closes it once it has read why.
        assert_eq!(h.has(&DestinationAction::Close(Channel::Main)), !mismatch);
        assert!(h.has(&DestinationAction::Notice(Notice::StrangerRefused {
            channel: Channel::Main,
            reason: expected.clone()
        })));
        assert!(!h.dst.is_connected(Channel::Main));
        let told = h.actions.iter().any(|a| matches!(a, DestinationAction::Farewell { channel: Channel::Return, .. }));
        if mismatch {
            // A fresh hello with other page sizes is most likely the real
            // source, configured differently: it reads why, in a Reject on
            // the return connection, which closes.
            let Some(DestinationAction::Farewell { bytes, .. }) =
                h.actions.iter().find(|a| matches!(a, DestinationAction::Farewell { .. }))
            else {
                panic!("no farewell for a page size mismatch")
            };
            let mut decoder = wire::Decoder::new();
            decoder.push(bytes.clone());
            let Ok(Some(Frame::Reject { reason })) = decoder.next_frame() else { panic!("not a Reject") };
            assert!(reason.contains("page size mismatch"), "{reason}");
            assert!(!h.dst.is_connected(Channel::Return));
            h.connect(Channel::Return);
        } else {
            assert!(!told, "a stranger hears nothing");
            assert!(h.dst.is_connected(Channel::Return), "the other channels stay");
        }
        // The real source still gets through.
        h.connect(Channel::Main);
        h.receive(Channel::Main, hello(WireMode::Postcopy, false, 0));
        assert_eq!(h.dst.state(), DestinationState::Precopy);
    }
}

/// A source whose hello arrives before its return connection still hears
/// why its page sizes were refused: the reason waits for the next return
/// connection, unless another main connection comes first.
#[test]
fn a_page_size_refusal_waits_for_the_return_connection() {
    let mut other = hello(WireMode::Postcopy, false, 0);
    if let Frame::Hello(h) = &mut other {
        h.page_size = 2 << 20;
        for b in &mut h.blocks {
            b.page_size = 2 << 20;
        }
    }
    let farewell = |h: &Harness| {
        h.actions.iter().any(|a| matches!(a, DestinationAction::Farewell { channel: Channel::Return, .. }))
    };
    let mut h = Harness::new(quiet());
    h.connect(Channel::Main);
    h.receive(Channel::Main, other.clone());
    assert!(!farewell(&h));
    h.connect(Channel::Return);
    assert!(farewell(&h), "the late return connection hears the reason");
    assert_eq!(h.dst.state(), DestinationState::Listening);
    // Another main connection first: a new attempt, told nothing.
    let mut h = Harness::new(quiet());
    h.connect(Channel::Main);
    h.receive(Channel::Main, other);
    h.connect(Channel::Main);
    h.connect(Channel::Return);
    assert!(!farewell(&h));
    h.receive(Channel::Main, hello(WireMode::Postcopy, false, 0));
    assert_eq!(h.dst.state(), DestinationState::Precopy, "a matching source binds the migration");
}

#[test]
fn wrong_version_is_a_typed_error() {
    let mut h = Harness::new(quiet());
    h.connect(Channel::Main);
    let mut bytes = Vec::new();
    wire::encode(&hello(WireMode::Postcopy, false, 0), &mut bytes);
    bytes[8 + 5] = 2;
    h.dst.handle_input(h.now, Channel::Main, Bytes::from(bytes));
    h.drain();
    let reason = MigrationError::Protocol(ProtocolError::Wire {
        channel: Channel::Main,
        error: WireError::UnsupportedVersion { got: 2, supported: wire::PROTOCOL_VERSION },
    });
    assert!(h.has(&DestinationAction::Notice(Notice::StrangerRefused { channel: Channel::Main, reason })));
    assert_eq!(h.dst.state(), DestinationState::Listening);
}

#[test]
fn hybrid_precopy_pages_overwrite_and_stale_ones_are_discarded() {
    let mut h = Harness::handshaken(quiet(), WireMode::Hybrid);
    h.receive(Channel::Main, page(0, 3, PageKind::Precopy));
    h.receive(Channel::Main, page(0, 3, PageKind::Precopy));
    h.receive(Channel::Main, page(1, 0, PageKind::Precopy));
    assert_eq!(h.installed(), vec![(3, false), (3, true), (60, false)]);
    h.receive(Channel::Main, Frame::Discard(Discard { block: 0, ranges: vec![(2, 2)] }));
    assert!(h.has(&DestinationAction::DiscardPages { first: PageNumber(2), count: 2 }));
    assert!(!h.dst.is_present(PageNumber(3)));
    assert!(h.dst.is_present(PageNumber(60)));
    assert_eq!(h.dst.stats(h.now).stale_pages_discarded, 1);
    // Out-of-range discards are refused before anything is dropped.
    h.receive(Channel::Main, Frame::Discard(Discard { block: 1, ranges: vec![(0, 1), (39, 2)] }));
    assert_eq!(
        h.finished_error(),
        Some(MigrationError::Protocol(ProtocolError::PageOutOfRange { block: 1, index: 40 }))
    );
}

#[test]
fn precopy_pages_are_refused_in_pure_postcopy() {
    let mut h = Harness::handshaken(quiet(), WireMode::Postcopy);
    h.receive(Channel::Main, page(0, 1, PageKind::Precopy));
    assert!(matches!(
        h.finished_error(),
        Some(MigrationError::Protocol(ProtocolError::UnexpectedFrame { kind: wire::FrameKind::Page, .. }))
    ));
}

#[test]
fn device_state_is_assembled_bounded_and_faults_served_while_loading() {
    let mut h = Harness::handshaken(Config { max_device_state_bytes: 6, ..quiet() }, WireMode::Postcopy);
    h.receive(Channel::Main, Frame::DeviceState { last: false, chunk: Bytes::from_static(b"abc") });
    assert_eq!(h.dst.state(), DestinationState::Precopy);
    assert!(matches!(h.dst.handle_page_fault(h.now, PageNumber(1), Waiter::Vmm), Err(EventError::WrongState { .. })));
    h.receive(Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::from_static(b"def") });
    assert!(h.has(&DestinationAction::LoadDeviceState(Bytes::from_static(b"abcdef"))));
    // Loading touches pages 5 and 61 (two blocks): requests go out before ReadyToRun.
    h.dst.handle_page_fault(h.now, PageNumber(5), Waiter::Vmm).unwrap();
    h.dst.handle_page_fault(h.now, PageNumber(61), Waiter::Vmm).unwrap();
    h.dst.handle_page_fault(h.now, PageNumber(5), Waiter::Vmm).unwrap();
    assert_eq!(
        h.returned(),
        vec![
            Frame::Request(Request { block: 0, indexes: vec![5] }),
            Frame::Request(Request { block: 1, indexes: vec![1] }),
        ]
    );
    h.receive(Channel::Urgent, page(0, 5, PageKind::Requested));
    h.receive(Channel::Urgent, page(1, 1, PageKind::Requested));
    assert_eq!(h.dst.outstanding_faults(), 0);
    h.dst.handle_device_state_loaded(h.now, Ok(())).unwrap();
    h.drain();
    assert_eq!(h.returned(), vec![Frame::ReadyToRun]);

    let mut h = Harness::handshaken(Config { max_device_state_bytes: 6, ..quiet() }, WireMode::Postcopy);
    h.receive(Channel::Main, Frame::DeviceState { last: false, chunk: Bytes::from_static(b"1234567") });
    assert_eq!(h.finished_error(), Some(MigrationError::Protocol(ProtocolError::DeviceStateTooLarge { limit: 6 })));
}

#[test]
fn a_device_state_that_fails_to_load_drops_the_guest() {
    let mut h = Harness::handshaken(quiet(), WireMode::Postcopy);
    h.receive(Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::new() });
    h.dst.handle_device_state_loaded(h.now, Err("bad lapic".into())).unwrap();
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::DeviceStateLoad("bad lapic".into())));
    assert!(h.actions.iter().any(|a| matches!(a, DestinationAction::Farewell { channel: Channel::Return, .. })));
    assert!(!h.has(&DestinationAction::ResumeVcpus));
}

#[test]
fn faults_batch_per_block_and_resolve_with_latency() {
    let mut h = Harness::running(Config { request_batch_pages: 2, ..quiet() });
    for (p, vcpu) in [(1, 0), (2, 1), (3, 0), (70, 1), (4, 0)] {
        h.dst.handle_page_fault(h.now, PageNumber(p), Waiter::Vcpu(vcpu)).unwrap();
    }
    assert_eq!(
        h.returned(),
        vec![
            Frame::Request(Request { block: 0, indexes: vec![1, 2] }),
            Frame::Request(Request { block: 0, indexes: vec![3] }),
            Frame::Request(Request { block: 1, indexes: vec![10] }),
            Frame::Request(Request { block: 0, indexes: vec![4] }),
        ]
    );
    h.now = Timestamp(250_000);
    h.receive(Channel::Urgent, page(0, 1, PageKind::Requested));
    let stats = h.dst.stats(h.now);
    assert_eq!(stats.remote_faults, 5);
    assert_eq!(stats.fault_latency.count, 1);
    assert!((stats.fault_latency.p50_us - 250.0).abs() < 1.0, "{:?}", stats.fault_latency);
    assert_eq!(stats.vcpu_blocked_ns, vec![250_000]);
    // A late duplicate never replaces the present page.
    h.receive(Channel::Main, page(0, 1, PageKind::Background));
    assert_eq!(h.installed(), vec![(1, false)]);
    assert_eq!(h.dst.stats(h.now).duplicate_pages, 1);
    // A fault on a present page only wakes its waiters.
    h.dst.handle_page_fault(h.now, PageNumber(1), Waiter::Vcpu(0)).unwrap();
    h.drain();
    assert!(h.has(&DestinationAction::Wake(PageNumber(1))));
    assert_eq!(h.dst.handle_page_fault(h.now, PageNumber(PAGES), Waiter::Vmm), Err(EventError::PageOutOfRange(PAGES)));
}

#[test]
fn too_many_faults_are_refused() {
    let mut h = Harness::running(Config { max_outstanding_requests: 2, ..quiet() });
    h.dst.handle_page_fault(h.now, PageNumber(1), Waiter::Vcpu(0)).unwrap();
    h.dst.handle_page_fault(h.now, PageNumber(2), Waiter::Vcpu(1)).unwrap();
    assert_eq!(
        h.dst.handle_page_fault(h.now, PageNumber(3), Waiter::Vcpu(2)),
        Err(EventError::TooManyFaults { limit: 2 })
    );
}

#[test]
fn bad_pages_pause_with_typed_errors() {
    let cases = [
        (page(2, 0, PageKind::Background), ProtocolError::BlockOutOfRange { block: 2 }),
        (page(0, 60, PageKind::Background), ProtocolError::PageOutOfRange { block: 0, index: 60 }),
        (
            Frame::Page(PageFrame {
                address: PageAddress { block: 0, index: 1 },
                kind: PageKind::Background,
                data: PageData::Bytes(Bytes::from_static(b"short")),
            }),
            ProtocolError::PageLength { expected: PAGE_SIZE, got: 5 },
        ),
        (
            Frame::ReadyToRun,
            ProtocolError::UnexpectedFrame {
                channel: Channel::Main,
                kind: wire::FrameKind::ReadyToRun,
                state: "RUNNING".into(),
            },
        ),
        (
            Frame::Cancel { reason: "late".into() },
            ProtocolError::UnexpectedFrame {
                channel: Channel::Main,
                kind: wire::FrameKind::Cancel,
                state: "RUNNING".into(),
            },
        ),
    ];
    for (frame, expected) in cases {
        let mut h = Harness::running(quiet());
        h.receive(Channel::Main, frame);
        assert_eq!(h.dst.state(), DestinationState::Paused, "{expected:?}");
        assert_eq!(h.paused_reason(), Some(MigrationError::Protocol(expected)));
        assert!(h.finished_error().is_none(), "memory is kept");
    }
}

#[test]
fn every_page_present_sends_eoc_and_completes() {
    let mut h = Harness::running(quiet());
    for p in 0..PAGES {
        let (block, index) = if p < 60 { (0, p as u32) } else { (1, (p - 60) as u32) };
        if p % 2 == 0 {
            h.receive(Channel::Main, page(block, index, PageKind::Background));
        } else {
            h.receive(
                Channel::Main,
                Frame::Page(PageFrame {
                    address: PageAddress { block, index },
                    kind: PageKind::Background,
                    data: PageData::Zero,
                }),
            );
        }
    }
    assert_eq!(h.dst.state(), DestinationState::Running, "EOC not written yet");
    assert_eq!(h.returned(), vec![Frame::Eoc]);
    assert_eq!(h.dst.state(), DestinationState::Completed);
    let stats = h.dst.stats(h.now);
    assert_eq!(stats.pages_received.background, PAGES);
    assert_eq!(stats.pages_received.zero, PAGES / 2);
    // The end of stream arriving after completion is fine.
    h.receive(Channel::Main, Frame::EndOfStream);
    assert_eq!(h.dst.state(), DestinationState::Completed);
}

#[test]
fn cancel_from_the_source_before_start_drops_the_guest() {
    let mut h = Harness::awaiting_start(quiet());
    h.receive(Channel::Main, Frame::Cancel { reason: "user".into() });
    assert_eq!(h.finished_error(), Some(MigrationError::CancelledByPeer("user".into())));
    assert!(!h.has(&DestinationAction::ResumeVcpus));
}

#[test]
fn user_cancel_only_before_the_device_state_is_loaded() {
    let mut h = Harness::handshaken(quiet(), WireMode::Postcopy);
    h.receive(Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::new() });
    h.dst.handle_cancel(h.now).unwrap();
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::Cancelled));
    // Once ReadyToRun is out, StartGuest may be on its way: only the source may cancel.
    let mut h = Harness::awaiting_start(quiet());
    assert!(h.dst.handle_cancel(h.now).is_err());
    let mut h = Harness::running(quiet());
    assert!(h.dst.handle_cancel(h.now).is_err());
}

#[test]
fn losses_before_the_device_state_loads_drop_the_guest() {
    let mut h = Harness::handshaken(quiet(), WireMode::Hybrid);
    h.dst.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::ConnectionLost { channel: Channel::Main }));
    let mut h = Harness::handshaken(quiet(), WireMode::Postcopy);
    h.receive(Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::new() });
    h.dst.handle_connection_lost(h.now, Channel::Urgent);
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Failed);
    // The load finishing later changes nothing.
    h.dst.handle_device_state_loaded(h.now, Ok(())).unwrap();
    h.drain();
    assert!(!h.has(&DestinationAction::ResumeVcpus));
}

#[test]
fn lost_before_ready_to_run_left_waits_then_drops() {
    let mut h = Harness::handshaken(Config { start_timeout: Duration::from_secs(5), ..quiet() }, WireMode::Postcopy);
    h.receive(Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::from_static(b"dev") });
    h.dst.handle_device_state_loaded(h.now, Ok(())).unwrap();
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::AwaitingStart);
    // ReadyToRun is queued, not transmitted: the source cannot have started.
    h.dst.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Paused);
    assert_eq!(h.dst.poll_timeout(), Some(Timestamp(5_000_000_000)));
    h.now = Timestamp(5_000_000_000);
    h.dst.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::StartTimeout { timeout_ms: 5000 }));
    assert!(!h.has(&DestinationAction::ResumeVcpus));
}

#[test]
fn lost_after_ready_to_run_left_waits_for_the_source() {
    let mut h = Harness::awaiting_start(Config { start_timeout: Duration::from_secs(5), ..quiet() });
    h.dst.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Paused);
    // The source may have transmitted StartGuest: no deadline to drop the guest.
    assert_eq!(h.dst.poll_timeout(), None);
    h.now = Timestamp(3_600_000_000_000);
    h.dst.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Paused);
    assert_eq!(h.finished_error(), None);
}

#[test]
fn lost_after_start_pauses_and_recovers_with_a_report() {
    let mut h = Harness::running(quiet());
    h.receive(Channel::Main, page(0, 0, PageKind::Background));
    h.receive(Channel::Main, page(0, 2, PageKind::Background));
    h.dst.handle_page_fault(h.now, PageNumber(7), Waiter::Vcpu(0)).unwrap();
    let _ = h.returned();
    h.dst.handle_connection_lost(h.now, Channel::Return);
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Paused);
    assert!(h.has(&DestinationAction::Close(Channel::Main)));
    assert!(h.has(&DestinationAction::Close(Channel::Urgent)));
    // Faults keep coming while paused; vCPUs with present pages keep running.
    h.dst.handle_page_fault(h.now, PageNumber(8), Waiter::Vcpu(1)).unwrap();
    h.dst.handle_page_fault(h.now, PageNumber(0), Waiter::Vcpu(2)).unwrap();
    h.drain();
    assert!(h.has(&DestinationAction::Wake(PageNumber(0))));
    // Stale reconnections are refused: same epoch.
    for channel in Channel::ALL {
        h.connect(channel);
    }
    h.receive(Channel::Main, hello(WireMode::Postcopy, true, 0));
    assert!(h.has(&DestinationAction::Close(Channel::Main)));
    assert_eq!(h.dst.state(), DestinationState::Paused);
    // A proper resume.
    for channel in Channel::ALL {
        h.connect(channel);
    }
    h.receive(Channel::Urgent, Frame::UrgentHello(UrgentHello { session: SESSION, epoch: 1 }));
    h.receive(Channel::Main, hello(WireMode::Postcopy, true, 1));
    assert_eq!(h.dst.state(), DestinationState::Recovering);
    let frames = h.returned();
    assert!(matches!(&frames[0], Frame::Welcome(w) if w.epoch == 1 && w.guest_started && w.device_loaded));
    assert_eq!(frames[1], Frame::PresentPages(PresentPages { first_word: 0, words: vec![0b101, 0] }));
    assert_eq!(frames[2], Frame::PresentEnd { present_pages: 2 });
    assert_eq!(frames[3], Frame::Request(Request { block: 0, indexes: vec![7, 8] }));
    assert_eq!(h.dst.state(), DestinationState::Running);
    assert!(h.has(&DestinationAction::Notice(Notice::Recovered { epoch: 1 })));
}

#[test]
fn resume_checks_session_epoch_and_layout() {
    let mut h = Harness::running(quiet());
    h.dst.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    let other_layout = Frame::Hello(Hello {
        resume: true,
        urgent_channel: true,
        session: SESSION,
        epoch: 1,
        page_size: PAGE_SIZE,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: vec![RamBlock { name: "ram".into(), page_count: PAGES, page_size: PAGE_SIZE }],
        machine: bytes::Bytes::new(),
        push_streams: 1,
    });
    let other_session = Frame::Hello(Hello {
        resume: true,
        urgent_channel: true,
        session: 7,
        epoch: 1,
        page_size: PAGE_SIZE,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: vec![RamBlock { name: "ram".into(), page_count: PAGES, page_size: PAGE_SIZE }],
        machine: bytes::Bytes::new(),
        push_streams: 1,
    });
    let cases = [
        (other_layout, ProtocolError::LayoutChanged),
        (other_session, ProtocolError::SessionMismatch { expected: SESSION, got: 7 }),
        (hello(WireMode::Postcopy, true, 0), ProtocolError::EpochMismatch { expected: 1, got: 0 }),
    ];
    for (frame, error) in cases {
        h.actions.clear();
        h.connect(Channel::Main);
        h.receive(Channel::Main, frame);
        assert!(h.has(&DestinationAction::Close(Channel::Main)));
        let reason = MigrationError::Protocol(error);
        assert!(h.has(&DestinationAction::Notice(Notice::StrangerRefused { channel: Channel::Main, reason })));
        assert_eq!(h.dst.state(), DestinationState::Paused);
    }
}

#[test]
fn completed_destination_still_answers_a_resume() {
    let mut h = Harness::running(quiet());
    for p in 0..60 {
        h.receive(Channel::Main, page(0, p, PageKind::Background));
    }
    for p in 0..40 {
        h.receive(Channel::Main, page(1, p, PageKind::Background));
    }
    assert_eq!(h.returned(), vec![Frame::Eoc]);
    assert_eq!(h.dst.state(), DestinationState::Completed);
    // The source lost the Eoc with the connection and comes back.
    for channel in Channel::ALL {
        h.connect(channel);
    }
    h.receive(Channel::Main, hello(WireMode::Postcopy, true, 1));
    let frames = h.returned();
    assert!(matches!(frames[0], Frame::Welcome(_)));
    assert_eq!(frames.last(), Some(&Frame::Eoc));
    assert!(frames.contains(&Frame::PresentEnd { present_pages: PAGES }));
}

#[test]
fn peer_timeout_pauses_and_keepalive_pings() {
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(100)),
        peer_timeout: Some(Duration::from_secs(1)),
        ..Config::postcopy()
    };
    let mut h = Harness::running(config);
    h.now = Timestamp(200_000_000);
    h.dst.handle_timeout(h.now);
    assert_eq!(h.returned(), vec![Frame::Ping]);
    h.now = Timestamp(1_000_000_001);
    h.dst.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Paused);
    assert_eq!(h.paused_reason(), Some(MigrationError::PeerTimeout { timeout_ms: 1000 }));
}

#[test]
fn handshake_timeout_refuses_silent_peers_and_keeps_listening() {
    let mut h = Harness::new(quiet());
    assert_eq!(h.dst.poll_timeout(), None, "no bound before anyone connects");
    h.connect(Channel::Main);
    h.now = h.dst.poll_timeout().unwrap();
    h.dst.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.finished_error(), None);
    assert!(h.has(&DestinationAction::Close(Channel::Main)));
    assert!(h.actions.iter().any(|a| matches!(
        a,
        DestinationAction::Notice(Notice::StrangerRefused {
            channel: Channel::Main,
            reason: MigrationError::HandshakeTimeout { .. }
        })
    )));
    assert_eq!(h.dst.state(), DestinationState::Listening);
    assert_eq!(h.dst.poll_timeout(), None, "nothing left to time");
}

#[test]
fn a_session_opened_at_the_last_epoch_refuses_every_resume_without_overflow() {
    let mut h = Harness::new(quiet());
    for channel in Channel::ALL {
        h.connect(channel);
    }
    h.receive(Channel::Main, hello(WireMode::Postcopy, false, u32::MAX));
    h.receive(Channel::Urgent, Frame::UrgentHello(UrgentHello { session: SESSION, epoch: u32::MAX }));
    h.receive(Channel::Main, Frame::DeviceState { last: true, chunk: Bytes::from_static(b"dev") });
    h.dst.handle_device_state_loaded(h.now, Ok(())).unwrap();
    h.receive(Channel::Urgent, Frame::StartGuest);
    assert_eq!(h.dst.state(), DestinationState::Running);
    h.dst.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Paused);
    h.actions.clear();
    h.connect(Channel::Main);
    h.receive(Channel::Main, hello(WireMode::Postcopy, true, u32::MAX));
    let reason = MigrationError::Protocol(ProtocolError::EpochMismatch { expected: u32::MAX, got: u32::MAX });
    assert!(h.has(&DestinationAction::Notice(Notice::StrangerRefused { channel: Channel::Main, reason })));
    assert_eq!(h.dst.state(), DestinationState::Paused);
}

/// Every page of the layout as a background frame.
fn all_pages(h: &mut Harness) {
    for p in 0..PAGES {
        let (block, index) = if p < 60 { (0, p as u32) } else { (1, (p - 60) as u32) };
        h.receive(Channel::Main, page(block, index, PageKind::Background));
    }
}

/// Reconnects every channel with a resume hello of `epoch`.
fn resume(h: &mut Harness, epoch: u32) -> Vec<Frame> {
    for channel in Channel::ALL {
        h.connect(channel);
    }
    h.receive(Channel::Urgent, Frame::UrgentHello(UrgentHello { session: SESSION, epoch }));
    h.receive(Channel::Main, hello(WireMode::Postcopy, true, epoch));
    h.returned()
}

/// A page whose install failed is missing again: the queued EOC is
/// withdrawn, the destination pauses, and the recovery's report asks the
/// source for the page again; once it is installed the EOC goes out.
#[test]
fn a_failed_install_withdraws_the_eoc_and_recovers_the_page() {
    let mut h = Harness::running(quiet());
    all_pages(&mut h);
    assert!(h.dst.eoc_queued(), "every page present");
    h.dst.handle_install_failed(h.now, PageNumber(3), "ENOMEM".into()).unwrap();
    h.drain();
    assert!(!h.dst.eoc_queued(), "the EOC waits for the page");
    assert!(!h.dst.is_present(PageNumber(3)));
    assert_eq!(h.dst.state(), DestinationState::Paused);
    assert!(matches!(h.paused_reason(), Some(MigrationError::InstallFailed { page: 3, .. })));
    assert!(h.has(&DestinationAction::Close(Channel::Main)));
    // A vCPU touching it meanwhile waits (no wake: it is missing).
    h.actions.clear();
    h.dst.handle_page_fault(h.now, PageNumber(3), Waiter::Vcpu(0)).unwrap();
    h.drain();
    assert!(!h.has(&DestinationAction::Wake(PageNumber(3))));
    let frames = resume(&mut h, 1);
    assert!(!frames.contains(&Frame::Eoc), "no EOC while page 3 is missing: {frames:?}");
    let report = frames.iter().find_map(|f| match f {
        Frame::PresentPages(p) => Some(p.words[0]),
        _ => None,
    });
    assert_eq!(report, Some(!(1u64 << 3)), "the report lacks page 3, so the source resends it");
    assert!(frames.contains(&Frame::Request(Request { block: 0, indexes: vec![3] })));
    h.receive(Channel::Urgent, page(0, 3, PageKind::Requested));
    assert_eq!(h.installed().last(), Some(&(3, false)));
    assert_eq!(h.returned(), vec![Frame::Eoc]);
    assert_eq!(h.dst.state(), DestinationState::Completed);
    assert_eq!(h.finished_error(), None);
}

/// Before the device state is loaded the source still has the guest: a
/// failed install fails the migration, telling the source why.
#[test]
fn a_failed_install_before_the_device_state_drops_the_guest() {
    let mut h = Harness::handshaken(quiet(), WireMode::Hybrid);
    h.receive(Channel::Main, page(0, 5, PageKind::Precopy));
    h.dst.handle_install_failed(h.now, PageNumber(5), "EFAULT".into()).unwrap();
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Failed);
    assert!(matches!(h.finished_error(), Some(MigrationError::InstallFailed { page: 5, .. })));
    assert!(h.actions.iter().any(|a| matches!(a, DestinationAction::Farewell { channel: Channel::Return, .. })));
    // Later reports change nothing.
    h.dst.handle_install_failed(h.now, PageNumber(5), "again".into()).unwrap();
}

/// A page that keeps failing once the guest runs here cannot be survived:
/// the migration ends with a typed error and the guest stays here (the
/// driver keeps it paused); no EOC ever leaves.
#[test]
fn a_page_that_keeps_failing_ends_the_migration_with_the_guest_here() {
    let mut h = Harness::running(quiet());
    all_pages(&mut h);
    for attempt in 1..=postcopy_core::destination::MAX_INSTALL_FAILURES {
        h.dst.handle_install_failed(h.now, PageNumber(61), format!("ENOMEM #{attempt}")).unwrap();
        h.drain();
        if attempt < postcopy_core::destination::MAX_INSTALL_FAILURES {
            assert_eq!(h.dst.state(), DestinationState::Paused, "attempt {attempt}");
            let frames = resume(&mut h, attempt);
            assert!(!frames.contains(&Frame::Eoc));
            h.receive(Channel::Main, page(1, 1, PageKind::Background));
        }
    }
    assert_eq!(h.dst.state(), DestinationState::Failed);
    let finished = h.actions.iter().find_map(|a| match a {
        DestinationAction::Finished(f) => Some(f.clone()),
        _ => None,
    });
    let finished = finished.expect("finished");
    assert!(matches!(finished.result, Err(MigrationError::InstallFailed { page: 61, .. })), "{finished:?}");
    assert_eq!(finished.guest_on, postcopy_core::Side::Destination);
    assert!(h.returned().is_empty(), "nothing leaves a failed destination");
}

/// Failures the core cannot act on are typed errors of the event.
#[test]
fn install_failures_out_of_place_are_event_errors() {
    let mut h = Harness::new(quiet());
    assert!(matches!(
        h.dst.handle_install_failed(h.now, PageNumber(0), "x".into()),
        Err(EventError::WrongState { .. })
    ));
    let mut h = Harness::running(quiet());
    assert_eq!(
        h.dst.handle_install_failed(h.now, PageNumber(PAGES), "x".into()),
        Err(EventError::PageOutOfRange(PAGES))
    );
    // A page not present (never arrived, or discarded): nothing lost.
    h.dst.handle_install_failed(h.now, PageNumber(9), "x".into()).unwrap();
    assert_eq!(h.dst.state(), DestinationState::Running);
    all_pages(&mut h);
    assert_eq!(h.returned(), vec![Frame::Eoc]);
    assert_eq!(
        h.dst.handle_install_failed(h.now, PageNumber(4), "late".into()),
        Err(EventError::InstallFailedAfterEnd { page: 4 })
    );
}

// ----- strangers: connections that have not shown this migration's id -----

fn encoded(frame: &Frame) -> Bytes {
    let mut bytes = Vec::new();
    wire::encode(frame, &mut bytes);
    Bytes::from(bytes)
}

fn other_session_hello() -> Frame {
    let Frame::Hello(mut hello) = hello(WireMode::Postcopy, true, 1) else { unreachable!() };
    hello.session = 7;
    Frame::Hello(hello)
}

impl Harness {
    fn accept_provisional(&mut self, channel: Channel) -> postcopy_core::ConnectionId {
        match self.dst.handle_accepted(self.now, channel) {
            postcopy_core::Admission::Provisional(id) => id,
            other => panic!("a live {channel} connection makes a newcomer provisional, got {other:?}"),
        }
    }

    fn provisional_input(&mut self, id: postcopy_core::ConnectionId, bytes: Bytes) {
        self.dst.handle_provisional_input(self.now, id, bytes);
        self.drain();
    }
}

#[test]
fn a_stranger_beside_a_live_postcopy_connection_changes_nothing() {
    let urgent_hello = |session| Frame::UrgentHello(UrgentHello { session, epoch: 1 });
    let cases: Vec<(Channel, Bytes, ProtocolError)> = vec![
        (
            Channel::Main,
            Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            ProtocolError::Wire { channel: Channel::Main, error: WireError::UnknownFrameType(0x7f) },
        ),
        (Channel::Main, encoded(&other_session_hello()), ProtocolError::SessionMismatch { expected: SESSION, got: 7 }),
        (
            Channel::Main,
            encoded(&hello(WireMode::Postcopy, false, 0)),
            ProtocolError::EpochMismatch { expected: 1, got: 0 },
        ),
        (
            Channel::Main,
            encoded(&page(0, 3, PageKind::Requested)),
            ProtocolError::UnexpectedFrame {
                channel: Channel::Main,
                kind: wire::FrameKind::Page,
                state: "RUNNING".into(),
            },
        ),
        (Channel::Urgent, encoded(&urgent_hello(7)), ProtocolError::SessionMismatch { expected: SESSION, got: 7 }),
        (
            Channel::Urgent,
            encoded(&Frame::UrgentHello(UrgentHello { session: SESSION, epoch: 0 })),
            ProtocolError::EpochMismatch { expected: 1, got: 0 },
        ),
    ];
    for (channel, bytes, error) in cases {
        let mut h = Harness::running(quiet());
        h.actions.clear();
        let before = h.dst.clone();
        let id = h.accept_provisional(channel);
        assert_eq!(h.dst.provisional_connections().collect::<Vec<_>>(), vec![(id, channel)]);
        h.provisional_input(id, bytes);
        assert_eq!(
            h.actions,
            vec![
                DestinationAction::CloseConnection(id),
                DestinationAction::Notice(Notice::StrangerRefused { channel, reason: error.into() }),
            ]
        );
        assert_eq!(h.dst, before, "a refused stranger leaves the destination as it was");
        // The live connection still carries the migration.
        h.receive(Channel::Main, page(0, 5, PageKind::Background));
        assert_eq!(h.installed(), vec![(5, false)]);
        assert_eq!(h.dst.state(), DestinationState::Running);
    }
}

#[test]
fn a_silent_or_vanished_stranger_changes_nothing() {
    let mut h = Harness::running(quiet());
    let before = h.dst.clone();
    let id = h.accept_provisional(Channel::Main);
    // Half a hello, then it goes away.
    h.provisional_input(id, encoded(&hello(WireMode::Postcopy, true, 1)).slice(..10));
    h.dst.handle_provisional_lost(h.now, id);
    assert_eq!(h.dst, before);
    assert_eq!(h.dst.provisional_connections().count(), 0);
}

#[test]
fn provisional_connections_are_bounded_per_channel() {
    let mut h = Harness::running(quiet());
    h.actions.clear();
    let ids: Vec<_> =
        (0..=postcopy_core::MAX_PROVISIONAL_PER_CHANNEL).map(|_| h.accept_provisional(Channel::Main)).collect();
    h.drain();
    let limit = postcopy_core::MAX_PROVISIONAL_PER_CHANNEL;
    let reason = MigrationError::Protocol(ProtocolError::TooManyProvisional { channel: Channel::Main, limit });
    assert_eq!(
        h.actions,
        vec![
            DestinationAction::CloseConnection(ids[0]),
            DestinationAction::Notice(Notice::StrangerRefused { channel: Channel::Main, reason }),
        ]
    );
    let kept: Vec<_> = h.dst.provisional_connections().map(|(id, _)| id).collect();
    assert_eq!(kept, ids[1..].to_vec());
    // Another channel has its own allowance.
    let urgent = h.accept_provisional(Channel::Urgent);
    assert_eq!(h.dst.provisional_connections().count(), limit + 1);
    assert!(h.dst.provisional_connections().any(|(id, _)| id == urgent));
}

#[test]
fn a_real_reconnection_on_a_provisional_connection_recovers() {
    let mut h = Harness::running(quiet());
    h.actions.clear();
    // The source lost its connections and reconnects before this side
    // noticed: the old ones are still up here.
    let main = h.accept_provisional(Channel::Main);
    let urgent = h.accept_provisional(Channel::Urgent);
    h.provisional_input(main, encoded(&hello(WireMode::Postcopy, true, 1)));
    assert!(h.has(&DestinationAction::PromoteConnection(main)));
    let close_old = h.actions.iter().position(|a| *a == DestinationAction::Close(Channel::Main));
    let promote = h.actions.iter().position(|a| *a == DestinationAction::PromoteConnection(main));
    assert!(close_old.is_some() && close_old < promote, "the old connection closes before the new one takes over");
    assert_eq!(h.paused_reason(), Some(MigrationError::ConnectionLost { channel: Channel::Main }));
    assert_eq!(h.dst.state(), DestinationState::Recovering);
    h.provisional_input(urgent, encoded(&Frame::UrgentHello(UrgentHello { session: SESSION, epoch: 1 })));
    assert!(h.has(&DestinationAction::PromoteConnection(urgent)));
    // The paused destination closed the old return connection: the new one is current.
    assert_eq!(h.dst.handle_accepted(h.now, Channel::Return), postcopy_core::Admission::Current);
    let frames = h.returned();
    assert!(matches!(frames[0], Frame::Welcome(Welcome { epoch: 1, .. })), "{frames:?}");
    assert!(frames.iter().any(|f| matches!(f, Frame::PresentEnd { .. })));
    assert_eq!(h.dst.state(), DestinationState::Running);
    assert!(h.has(&DestinationAction::Notice(Notice::Recovered { epoch: 1 })));
    // Pages flow on the promoted connections.
    h.actions.clear();
    h.receive(Channel::Urgent, page(0, 9, PageKind::Requested));
    assert_eq!(h.installed(), vec![(9, false)]);
}

#[test]
fn a_stranger_before_any_migration_is_refused_and_the_source_still_binds() {
    let mut h = Harness::new(quiet());
    // A stranger holds the main slot first, silently.
    h.connect(Channel::Main);
    h.connect(Channel::Return);
    // The real source's main connection arrives beside it and authenticates
    // with the first fresh hello.
    let main = h.accept_provisional(Channel::Main);
    h.provisional_input(main, encoded(&hello(WireMode::Postcopy, false, 0)));
    assert!(h.has(&DestinationAction::Close(Channel::Main)));
    assert!(h.has(&DestinationAction::PromoteConnection(main)));
    assert_eq!(h.dst.state(), DestinationState::Precopy);
    // Now bound: another fresh hello beside it is a stranger.
    h.actions.clear();
    let before = h.dst.clone();
    let late = h.accept_provisional(Channel::Main);
    h.provisional_input(late, encoded(&hello(WireMode::Postcopy, false, 0)));
    assert!(h.has(&DestinationAction::CloseConnection(late)));
    assert_eq!(h.dst, before);
}

#[test]
fn a_user_pause_closes_the_connections_and_a_resume_recovers() {
    let mut h = Harness::awaiting_start(quiet());
    assert!(h.dst.handle_pause(h.now).is_err(), "not in postcopy yet");
    h.receive(Channel::Urgent, Frame::StartGuest);
    h.receive(Channel::Main, page(0, 0, PageKind::Background));
    h.dst.handle_pause(h.now).unwrap();
    h.drain();
    assert_eq!(h.dst.state(), DestinationState::Paused);
    for channel in Channel::ALL {
        assert!(h.has(&DestinationAction::Close(channel)), "{channel} closed");
    }
    assert_eq!(h.paused_reason(), Some(MigrationError::PausedByUser));
    assert!(h.dst.handle_pause(h.now).is_err(), "paused already");
    let frames = resume(&mut h, 1);
    assert!(matches!(&frames[0], Frame::Welcome(w) if w.epoch == 1 && w.guest_started));
    assert_eq!(h.dst.state(), DestinationState::Running);
}
