//! Every state transition of the source, and every error it reports, driven
//! frame by frame through the public API.

use bytes::Bytes;
use postcopy_core::wire::{self, Decoder, Frame, PageData, PageKind, PresentPages, Request, Welcome};
use postcopy_core::{
    Channel, Config, DeferredPage, EventError, GuestMemory, MigrationError, Notice, PageAddress, PageNumber,
    ProtocolError, RamLayout, Source, SourceAction, SourceState, Timestamp,
};
use std::time::Duration;

const PAGES: u64 = 100;
const SESSION: u64 = 42;

/// Page `p` holds the byte `p + 1` everywhere (so no page is zero), except
/// pages listed as zero.
struct Guest {
    zero: Vec<u64>,
}

impl GuestMemory for Guest {
    fn read_page(&self, page: PageNumber, out: &mut [u8]) {
        let byte = if self.zero.contains(&page.0) { 0 } else { (page.0 % 250) as u8 + 1 };
        out.fill(byte);
    }
}

struct Harness {
    src: Source,
    now: Timestamp,
    guest: Guest,
    actions: Vec<SourceAction>,
}

impl Harness {
    fn new(config: Config) -> Self {
        let layout = RamLayout::single("ram", 64, PAGES).unwrap();
        let mut h = Harness {
            src: Source::new(config, layout, SESSION),
            now: Timestamp(0),
            guest: Guest { zero: vec![] },
            actions: vec![],
        };
        h.src.handle_start(h.now).unwrap();
        h.drain();
        h
    }

    fn drain(&mut self) -> Vec<SourceAction> {
        let mut new = Vec::new();
        while let Some(action) = self.src.poll_action() {
            new.push(action);
        }
        self.actions.extend(new.iter().cloned());
        new
    }

    /// Moves the clock to the armed timer and fires it.
    fn fire_timer(&mut self) {
        self.now = self.src.poll_timeout().expect("a timer is armed");
        self.src.handle_timeout(self.now);
        self.drain();
    }

    fn connect_all(&mut self) {
        for channel in Channel::ALL {
            self.src.handle_connected(self.now, channel);
        }
        self.drain();
    }

    /// Every frame the source writes on `channel` now.
    fn frames(&mut self, channel: Channel) -> Vec<Frame> {
        let mut out = Vec::new();
        while self.src.poll_transmit(self.now, channel, &mut out, usize::MAX, &self.guest) > 0 {}
        let mut decoder = Decoder::new();
        decoder.push(Bytes::from(out));
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame().unwrap() {
            frames.push(frame);
        }
        self.drain();
        frames
    }

    fn one_frame(&mut self, channel: Channel) -> Option<Frame> {
        let mut out = Vec::new();
        let _ = self.src.poll_transmit(self.now, channel, &mut out, 0, &self.guest);
        let mut decoder = Decoder::new();
        decoder.push(Bytes::from(out));
        let frame = decoder.next_frame().unwrap();
        self.drain();
        frame
    }

    fn receive(&mut self, frame: Frame) {
        let mut bytes = Vec::new();
        wire::encode(&frame, &mut bytes);
        self.src.handle_input(self.now, Channel::Return, Bytes::from(bytes));
        self.drain();
    }

    fn welcome(&mut self) {
        let epoch = self.src.epoch();
        self.receive(Frame::Welcome(Welcome {
            session: SESSION,
            epoch,
            guest_started: false,
            device_loaded: false,
            max_outstanding_requests: 8,
        }));
    }

    fn has(&self, action: &SourceAction) -> bool {
        self.actions.contains(action)
    }

    fn finished_error(&self) -> Option<MigrationError> {
        self.actions.iter().find_map(|a| match a {
            SourceAction::Finished(f) => f.result.clone().err(),
            _ => None,
        })
    }

    /// The frames of the farewell written on the main channel, if any.
    fn farewell_frames(&self) -> Option<Vec<Frame>> {
        let bytes = self.actions.iter().find_map(|a| match a {
            SourceAction::Farewell { channel: Channel::Main, bytes } => Some(bytes.clone()),
            _ => None,
        })?;
        let mut decoder = Decoder::new();
        decoder.push(bytes);
        let mut frames = Vec::new();
        while let Ok(Some(frame)) = decoder.next_frame() {
            frames.push(frame);
        }
        Some(frames)
    }

    fn completed(&self) -> bool {
        self.actions.iter().any(|a| matches!(a, SourceAction::Finished(f) if f.result.is_ok()))
    }

    /// Connect, handshake, stop: the source ends in SWITCHOVER with the
    /// device state written.
    fn to_switchover(config: Config) -> Self {
        let mut h = Harness::new(config);
        h.connect_all();
        h.welcome();
        assert!(h.has(&SourceAction::StopVcpus));
        h.src.handle_vcpus_stopped(h.now, Bytes::from_static(b"device")).unwrap();
        h.drain();
        assert_eq!(h.src.state(), SourceState::Switchover);
        let frames = h.frames(Channel::Main);
        assert!(frames.iter().any(|f| matches!(f, Frame::DeviceState { last: true, .. })));
        let urgent = h.frames(Channel::Urgent);
        assert!(urgent.iter().all(|f| matches!(f, Frame::UrgentHello(_))), "{urgent:?}");
        h
    }

    /// Past StartGuest: ACTIVE.
    fn to_active(config: Config) -> Self {
        let mut h = Harness::to_switchover(config);
        h.receive(Frame::ReadyToRun);
        let channel = if h.src.config().urgent_channel { Channel::Urgent } else { Channel::Main };
        assert_eq!(h.one_frame(channel), Some(Frame::StartGuest));
        assert_eq!(h.src.state(), SourceState::Active);
        h
    }

    fn request(&mut self, indexes: &[u32]) {
        self.receive(Frame::Request(Request { block: 0, indexes: indexes.to_vec() }));
    }
}

fn quiet() -> Config {
    Config { keepalive_interval: None, peer_timeout: None, ..Config::postcopy() }
}

fn page_of(frame: &Frame) -> Option<(u32, PageKind)> {
    match frame {
        Frame::Page(p) => Some((p.address.index, p.kind)),
        _ => None,
    }
}

#[test]
fn start_asks_for_every_channel_and_handshakes() {
    let mut h = Harness::new(quiet());
    for channel in Channel::ALL {
        assert!(h.has(&SourceAction::Connect(channel)));
    }
    assert_eq!(h.src.state(), SourceState::Connecting);
    h.src.handle_connected(h.now, Channel::Main);
    h.src.handle_connected(h.now, Channel::Urgent);
    assert_eq!(h.src.state(), SourceState::Connecting, "waits for every channel");
    h.src.handle_connected(h.now, Channel::Return);
    assert_eq!(h.src.state(), SourceState::Handshake);
    let main = h.frames(Channel::Main);
    assert!(
        matches!(&main[0], Frame::Hello(hello) if hello.session == SESSION && !hello.resume && hello.blocks.len() == 1)
    );
    assert!(matches!(h.frames(Channel::Urgent)[0], Frame::UrgentHello(_)));
    assert_eq!(h.src.handle_start(h.now), Err(EventError::WrongState { event: "start", state: "HANDSHAKE".into() }));
}

#[test]
fn the_hello_carries_the_machine_description() {
    let layout = RamLayout::single("ram", 64, PAGES).unwrap();
    let mut src = Source::new(quiet(), layout, SESSION);
    assert_eq!(
        src.set_machine_description(Bytes::from(vec![0; wire::MAX_MACHINE_LEN + 1])),
        Err(EventError::MachineDescriptionTooLong { len: wire::MAX_MACHINE_LEN + 1, max: wire::MAX_MACHINE_LEN })
    );
    src.set_machine_description(Bytes::from_static(b"vcpus=4 irqchip")).unwrap();
    let mut h = Harness { src, now: Timestamp(0), guest: Guest { zero: vec![] }, actions: vec![] };
    h.src.handle_start(h.now).unwrap();
    h.connect_all();
    let main = h.frames(Channel::Main);
    assert!(matches!(&main[0], Frame::Hello(hello) if hello.machine == Bytes::from_static(b"vcpus=4 irqchip")));
}

#[test]
fn without_urgent_channel_two_connections_suffice() {
    let mut h = Harness::new(Config { urgent_channel: false, ..quiet() });
    assert!(!h.has(&SourceAction::Connect(Channel::Urgent)));
    h.src.handle_connected(h.now, Channel::Main);
    h.src.handle_connected(h.now, Channel::Return);
    assert_eq!(h.src.state(), SourceState::Handshake);
    // An unasked-for connection is refused.
    h.src.handle_connected(h.now, Channel::Urgent);
    h.drain();
    assert!(h.has(&SourceAction::Close(Channel::Urgent)));
}

#[test]
fn handshake_timeout_fails_with_the_guest_on_the_source() {
    let mut h = Harness::new(quiet());
    h.connect_all();
    let deadline = h.src.poll_timeout().expect("a handshake deadline");
    h.now = deadline;
    h.src.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Failed);
    assert!(matches!(h.finished_error(), Some(MigrationError::HandshakeTimeout { .. })));
    assert!(!h.has(&SourceAction::ResumeVcpus), "the guest never stopped");
}

#[test]
fn failed_connect_fails_before_switchover() {
    let mut h = Harness::new(quiet());
    h.src.handle_connect_failed(h.now, Channel::Return);
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::ConnectFailed { channel: Channel::Return }));
}

#[test]
fn welcome_checks_session_and_epoch() {
    let mut h = Harness::new(quiet());
    h.connect_all();
    h.receive(Frame::Welcome(Welcome {
        session: 7,
        epoch: 0,
        guest_started: false,
        device_loaded: false,
        max_outstanding_requests: 1,
    }));
    assert_eq!(
        h.finished_error(),
        Some(MigrationError::Protocol(ProtocolError::SessionMismatch { expected: SESSION, got: 7 }))
    );
    let mut h = Harness::new(quiet());
    h.connect_all();
    h.receive(Frame::Welcome(Welcome {
        session: SESSION,
        epoch: 3,
        guest_started: false,
        device_loaded: false,
        max_outstanding_requests: 1,
    }));
    assert_eq!(
        h.finished_error(),
        Some(MigrationError::Protocol(ProtocolError::EpochMismatch { expected: 0, got: 3 }))
    );
}

#[test]
fn reject_fails_and_cancels() {
    let mut h = Harness::new(quiet());
    h.connect_all();
    h.receive(Frame::Reject { reason: "page size".into() });
    assert_eq!(h.finished_error(), Some(MigrationError::Protocol(ProtocolError::Rejected("page size".into()))));
    assert!(h.actions.iter().any(|a| matches!(a, SourceAction::Farewell { channel: Channel::Main, .. })));
}

#[test]
fn pure_postcopy_stops_after_the_handshake_and_sends_device_state() {
    let mut h = Harness::new(quiet());
    h.connect_all();
    h.welcome();
    assert_eq!(h.src.state(), SourceState::Stopping);
    assert_eq!(
        h.src.handle_dirty_sync_complete(h.now),
        Err(EventError::WrongState { event: "dirty sync complete", state: "STOPPING".into() })
    );
    let state = Bytes::from(vec![9u8; 150_000]);
    h.src.handle_vcpus_stopped(h.now, state.clone()).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Switchover);
    let frames = h.frames(Channel::Main);
    let mut collected = Vec::new();
    for frame in &frames {
        match frame {
            Frame::DeviceState { chunk, .. } => collected.extend_from_slice(chunk),
            Frame::Page(_) => panic!("no background pages before StartGuest"),
            _ => {}
        }
    }
    assert_eq!(collected, state);
    assert!(matches!(frames.last(), Some(Frame::DeviceState { last: true, .. })));
    assert_eq!(frames.iter().filter(|f| matches!(f, Frame::DeviceState { .. })).count(), 3, "64 KiB chunks");
}

#[test]
fn device_state_too_large_gives_the_guest_back() {
    let mut h = Harness::new(Config { max_device_state_bytes: 10, ..quiet() });
    h.connect_all();
    h.welcome();
    h.src.handle_vcpus_stopped(h.now, Bytes::from(vec![0u8; 11])).unwrap();
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::Protocol(ProtocolError::DeviceStateTooLarge { limit: 10 })));
    assert!(h.has(&SourceAction::ResumeVcpus));
}

#[test]
fn hybrid_rounds_resend_dirty_pages_and_discard_stale_ones() {
    let mut h = Harness::new(Config { mode: postcopy_core::Mode::Hybrid { precopy_rounds: 2 }, ..quiet() });
    h.connect_all();
    h.welcome();
    assert_eq!(h.src.state(), SourceState::Precopy);
    let round1 = h.frames(Channel::Main);
    assert_eq!(round1.iter().filter_map(page_of).count(), PAGES as usize);
    assert!(round1.iter().filter_map(page_of).all(|(_, kind)| kind == PageKind::Precopy));
    assert_eq!(h.src.state(), SourceState::DirtySync);
    assert!(h.has(&SourceAction::SyncDirtyLog));
    // Pages 3 and 64 were written during round 1.
    h.src.handle_dirty_bitmap(h.now, 0, &[1 << 3, 1]).unwrap();
    assert_eq!(h.src.handle_dirty_bitmap(h.now, 3, &[1]), Err(EventError::PageOutOfRange(3)));
    assert_eq!(h.src.handle_dirty_bitmap(h.now, 64, &[1 << 40]), Err(EventError::PageOutOfRange(104)));
    h.src.handle_dirty_sync_complete(h.now).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Precopy);
    let round2: Vec<u32> = h.frames(Channel::Main).iter().filter_map(page_of).map(|(i, _)| i).collect();
    assert_eq!(round2, vec![3, 64]);
    // Page 5 dirtied during round 2: after the last round the guest stops.
    h.src.handle_dirty_pages(h.now, [PageNumber(5)]).unwrap();
    h.src.handle_dirty_sync_complete(h.now).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Stopping);
    h.src.handle_vcpus_stopped(h.now, Bytes::new()).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::FinalSync);
    // Pages 3 and 6 dirtied after their last copy: both stale now.
    h.src.handle_dirty_pages(h.now, [PageNumber(3), PageNumber(6)]).unwrap();
    h.src.handle_dirty_sync_complete(h.now).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Switchover);
    let frames = h.frames(Channel::Main);
    let Frame::Discard(discard) = &frames[0] else { panic!("discards first: {frames:?}") };
    assert_eq!(discard.ranges, vec![(3, 1), (5, 2)]);
    assert!(matches!(frames[1], Frame::DeviceState { last: true, .. }));
    assert_eq!(h.src.stats(h.now).stale_pages_discarded, 3);
    assert_eq!(h.src.stats(h.now).precopy_rounds, 2);
}

#[test]
fn switch_to_postcopy_stops_precopy_early() {
    let mut h = Harness::new(Config { mode: postcopy_core::Mode::Hybrid { precopy_rounds: 5 }, ..quiet() });
    h.connect_all();
    h.welcome();
    let _ = h.one_frame(Channel::Main);
    h.src.handle_switch_to_postcopy(h.now).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Stopping);
    assert!(h.has(&SourceAction::StopVcpus));
    assert!(h.src.handle_switch_to_postcopy(h.now).is_err());
}

#[test]
fn requested_pages_go_first_on_the_urgent_channel() {
    let mut h = Harness::to_switchover(quiet());
    // Faults while the device state loads are served before StartGuest.
    h.request(&[10, 11]);
    let urgent = h.frames(Channel::Urgent);
    assert_eq!(
        urgent.iter().filter_map(page_of).collect::<Vec<_>>(),
        vec![(10, PageKind::Requested), (11, PageKind::Requested)]
    );
    assert!(h.frames(Channel::Main).is_empty(), "no bulk pages before StartGuest");
    h.receive(Frame::ReadyToRun);
    assert_eq!(h.frames(Channel::Urgent), vec![Frame::StartGuest]);
    assert_eq!(h.src.state(), SourceState::Active);
    // Background resumes after the last request (pre-paging) and skips sent pages.
    let first = h.one_frame(Channel::Main).and_then(|f| page_of(&f));
    assert_eq!(first, Some((12, PageKind::Background)));
    // A request for a page already sent is answered by that copy.
    h.request(&[12, 50]);
    assert_eq!(
        h.frames(Channel::Urgent).iter().filter_map(page_of).collect::<Vec<_>>(),
        vec![(50, PageKind::Requested)]
    );
    let stats = h.src.stats(h.now);
    assert_eq!(stats.requests_for_sent_pages, 1);
    assert_eq!(h.src.urgent_queue_len(), 0);
}

#[test]
fn without_urgent_channel_requests_jump_the_bulk_queue_on_main() {
    let mut h = Harness::to_active(Config { urgent_channel: false, prepaging: false, ..quiet() });
    assert_eq!(h.one_frame(Channel::Main).and_then(|f| page_of(&f)), Some((0, PageKind::Background)));
    h.request(&[90]);
    assert_eq!(h.one_frame(Channel::Main).and_then(|f| page_of(&f)), Some((90, PageKind::Requested)));
    assert_eq!(h.one_frame(Channel::Main).and_then(|f| page_of(&f)), Some((1, PageKind::Background)), "no pre-paging");
}

#[test]
fn zero_pages_are_flagged() {
    let mut h = Harness::to_active(quiet());
    h.guest.zero = vec![0, 1];
    let frames = h.frames(Channel::Main);
    let zero = frames.iter().filter(|f| matches!(f, Frame::Page(p) if p.data == PageData::Zero)).count();
    assert_eq!(zero, 2);
    assert_eq!(h.src.stats(h.now).pages_sent.zero, 2);
}

#[test]
fn deferred_payloads_once_filled_are_the_copied_frames() {
    let guest = Guest { zero: vec![3, 4, 40, 99] };
    let mut copied = Harness::to_active(quiet());
    let mut deferred = Harness::to_active(quiet());
    copied.guest.zero = guest.zero.clone();
    deferred.guest.zero = guest.zero.clone();
    copied.request(&[70, 4]);
    deferred.request(&[70, 4]);
    for channel in [Channel::Urgent, Channel::Main] {
        loop {
            let (mut a, mut b, mut holes) = (Vec::new(), Vec::new(), Vec::new());
            let n = copied.src.poll_transmit(copied.now, channel, &mut a, 8 * 1024, &copied.guest);
            let m = deferred.src.poll_transmit_deferred(deferred.now, channel, &mut b, 8 * 1024, &guest, &mut holes);
            assert_eq!(n, m);
            if n == 0 {
                break;
            }
            assert_eq!(a.len(), b.len(), "payloads are reserved in place");
            assert!(holes.iter().all(|h| !guest.zero.contains(&h.page.0)), "zero pages need no payload");
            assert!(holes.iter().all(|h| b[h.offset..h.offset + 64].iter().all(|&x| x == 0)), "left unread");
            DeferredPage::fill_all(&holes, &mut b, &guest);
            assert_eq!(a, b);
        }
    }
    assert_eq!(copied.src.state(), SourceState::AllPagesSent);
    assert_eq!(copied.src.stats(copied.now), deferred.src.stats(deferred.now));
    assert_eq!(deferred.src.stats(deferred.now).pages_sent.zero, 4);
}

#[test]
fn every_page_sent_then_eoc_completes() {
    let mut h = Harness::to_active(quiet());
    let frames = h.frames(Channel::Main);
    assert_eq!(frames.iter().filter_map(page_of).count(), PAGES as usize);
    assert_eq!(frames.last(), Some(&Frame::EndOfStream));
    assert_eq!(h.src.state(), SourceState::AllPagesSent);
    // Requests in flight when the last page left are harmless.
    h.request(&[1]);
    assert_eq!(h.src.state(), SourceState::AllPagesSent);
    h.receive(Frame::Eoc);
    assert_eq!(h.src.state(), SourceState::Completed);
    assert!(h.completed());
    assert_eq!(h.src.stats(h.now).pages_sent.total(), PAGES, "each page crosses once");
}

#[test]
fn eoc_before_end_of_stream_goes_through_eoc_received() {
    let mut h = Harness::to_active(quiet());
    for _ in 0..PAGES {
        let _ = h.one_frame(Channel::Main);
    }
    h.receive(Frame::Eoc);
    assert_eq!(h.src.state(), SourceState::EocReceived);
    h.request(&[1]);
    // A request after EOC is an error; the source pauses rather than lose anything.
    assert_eq!(h.src.state(), SourceState::ErrorReceive);
    assert!(h.has(&SourceAction::Notice(Notice::Paused {
        reason: MigrationError::Protocol(ProtocolError::RequestAfterEnd)
    })));
}

#[test]
fn eoc_received_then_end_of_stream_completes() {
    let mut h = Harness::to_active(quiet());
    for _ in 0..PAGES {
        let _ = h.one_frame(Channel::Main);
    }
    h.receive(Frame::Eoc);
    assert_eq!(h.src.state(), SourceState::EocReceived);
    assert_eq!(h.frames(Channel::Main), vec![Frame::EndOfStream]);
    assert_eq!(h.src.state(), SourceState::Completed);
}

#[test]
fn lost_connection_before_start_gives_the_guest_back() {
    let mut h = Harness::to_switchover(quiet());
    h.receive(Frame::ReadyToRun);
    // StartGuest is queued but not written: withdrawing it is still safe.
    h.actions.clear();
    h.src.handle_connection_lost(h.now, Channel::Urgent);
    h.drain();
    assert!(h.has(&SourceAction::ResumeVcpus));
    // The cancel goes out on the main channel, but the loss may have cut that
    // too: the source comes back once to make sure the destination heard it.
    let farewell = h.farewell_frames().expect("a cancel on the main channel");
    assert!(matches!(&farewell[..], [Frame::Cancel { .. }]), "{farewell:?}");
    assert_eq!(h.src.state(), SourceState::Withdrawing);
    h.now = h.src.poll_timeout().unwrap();
    h.src.handle_timeout(h.now);
    h.src.handle_connected(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Failed);
    assert_eq!(h.finished_error(), Some(MigrationError::ConnectionLost { channel: Channel::Urgent }));
    assert_eq!(h.actions.iter().filter(|a| **a == SourceAction::ResumeVcpus).count(), 1);
}

#[test]
fn cancel_before_start_with_every_connection_up_fails_at_once() {
    let mut h = Harness::to_switchover(quiet());
    h.receive(Frame::ReadyToRun);
    h.actions.clear();
    // The cancel travels in order on a live main connection: no need to
    // come back and repeat it.
    h.src.handle_cancel(h.now).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Failed);
    assert!(h.has(&SourceAction::ResumeVcpus));
    assert_eq!(h.finished_error(), Some(MigrationError::Cancelled));
}

#[test]
fn guest_dropped_before_start_gives_the_guest_back() {
    let mut h = Harness::to_switchover(quiet());
    h.receive(Frame::GuestDropped { reason: "bad device state".into() });
    assert!(h.has(&SourceAction::ResumeVcpus));
    assert_eq!(h.finished_error(), Some(MigrationError::DestinationDropped("bad device state".into())));
}

#[test]
fn cancel_is_allowed_until_start() {
    let mut h = Harness::to_switchover(quiet());
    h.src.handle_cancel(h.now).unwrap();
    h.drain();
    assert!(h.has(&SourceAction::ResumeVcpus));
    assert_eq!(h.finished_error(), Some(MigrationError::Cancelled));
    let mut h = Harness::to_active(quiet());
    assert!(h.src.handle_cancel(h.now).is_err());
}

#[test]
fn lost_connection_after_start_pauses_and_recovers() {
    let mut h = Harness::to_active(quiet());
    // Pages 0..10 leave; then the connection drops.
    for _ in 0..10 {
        let _ = h.one_frame(Channel::Main);
    }
    h.request(&[60]);
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Paused);
    assert!(!h.has(&SourceAction::ResumeVcpus), "never runs the guest again");
    assert!(h.has(&SourceAction::Close(Channel::Return)));
    assert!(h.has(&SourceAction::Close(Channel::Urgent)));
    assert!(h.actions.iter().any(|a| matches!(a, SourceAction::Notice(Notice::Paused { .. }))));
    assert_eq!(h.src.urgent_queue_len(), 0, "the destination asks again after recovery");
    // The retry timer reconnects.
    h.now = h.src.poll_timeout().unwrap();
    h.actions.clear();
    h.src.handle_timeout(h.now);
    h.drain();
    assert!(h.has(&SourceAction::Connect(Channel::Main)));
    assert!(h.has(&SourceAction::Notice(Notice::RecoveryAttempt { attempt: 1 })));
    h.connect_all();
    assert_eq!(h.src.state(), SourceState::Recovering);
    let hello = h.frames(Channel::Main);
    assert!(matches!(&hello[0], Frame::Hello(hello) if hello.resume && hello.epoch == 1));
    // The destination has pages 0..5 only: 5..10 were lost in flight.
    h.receive(Frame::Welcome(Welcome {
        session: SESSION,
        epoch: 1,
        guest_started: true,
        device_loaded: true,
        max_outstanding_requests: 8,
    }));
    h.receive(Frame::PresentPages(PresentPages { first_word: 0, words: vec![0b11111, 0] }));
    assert_eq!(h.src.state(), SourceState::Recovering);
    h.receive(Frame::PresentEnd { present_pages: 5 });
    assert_eq!(h.src.state(), SourceState::Active);
    assert!(h.has(&SourceAction::Notice(Notice::Recovered { epoch: 1 })));
    let pages: Vec<u32> = h.frames(Channel::Main).iter().filter_map(page_of).map(|(i, _)| i).collect();
    assert_eq!(pages.len(), PAGES as usize - 5);
    let stats = h.src.stats(h.now);
    assert_eq!(stats.pages_sent.resent, 5);
    assert_eq!(stats.recoveries, 1);
}

#[test]
fn recovery_resends_start_guest_when_the_destination_never_got_it() {
    let mut h = Harness::to_active(quiet());
    h.src.handle_connection_lost(h.now, Channel::Urgent);
    h.drain();
    h.fire_timer();
    h.connect_all();
    let _ = h.frames(Channel::Main);
    h.receive(Frame::Welcome(Welcome {
        session: SESSION,
        epoch: 1,
        guest_started: false,
        device_loaded: true,
        max_outstanding_requests: 8,
    }));
    h.receive(Frame::PresentPages(PresentPages { first_word: 0, words: vec![0, 0] }));
    h.receive(Frame::PresentEnd { present_pages: 0 });
    assert!(h.frames(Channel::Urgent).contains(&Frame::StartGuest));
}

#[test]
fn recovery_can_fail_and_be_retried() {
    let mut h = Harness::to_active(quiet());
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    for attempt in 1..=3 {
        h.fire_timer();
        assert!(h.has(&SourceAction::Notice(Notice::RecoveryAttempt { attempt })));
        h.src.handle_connect_failed(h.now, Channel::Return);
        h.drain();
        assert_eq!(h.src.state(), SourceState::Paused);
    }
    // Each wait is bounded and reported; the back-off grows.
    let failures =
        h.actions.iter().filter(|a| matches!(a, SourceAction::Notice(Notice::RecoveryFailed { .. }))).count();
    assert_eq!(failures, 3);
    // An attempt that connects but whose handshake stalls times out.
    h.fire_timer();
    h.connect_all();
    assert_eq!(h.src.state(), SourceState::Recovering);
    h.fire_timer();
    assert_eq!(h.src.state(), SourceState::Paused);
}

#[test]
fn bad_present_reports_are_rejected() {
    for (frames, what) in [
        (vec![Frame::PresentPages(PresentPages { first_word: 1, words: vec![0] })], "gap"),
        (vec![Frame::PresentPages(PresentPages { first_word: 0, words: vec![0, 0, 0] })], "too long"),
        (vec![Frame::PresentPages(PresentPages { first_word: 0, words: vec![0, !0] })], "past the end"),
        (vec![Frame::PresentEnd { present_pages: 0 }], "short"),
        (
            vec![
                Frame::PresentPages(PresentPages { first_word: 0, words: vec![1, 0] }),
                Frame::PresentEnd { present_pages: 2 },
            ],
            "count",
        ),
    ] {
        let mut h = Harness::to_active(quiet());
        h.src.handle_connection_lost(h.now, Channel::Main);
        h.drain();
        h.fire_timer();
        h.connect_all();
        h.receive(Frame::Welcome(Welcome {
            session: SESSION,
            epoch: 1,
            guest_started: true,
            device_loaded: true,
            max_outstanding_requests: 8,
        }));
        h.actions.clear();
        for frame in frames {
            h.receive(frame);
        }
        assert_eq!(h.src.state(), SourceState::ErrorReceive, "{what}");
        assert!(
            h.actions.iter().any(|a| matches!(
                a,
                SourceAction::Notice(Notice::Paused {
                    reason: MigrationError::Protocol(ProtocolError::BadPresentReport(_))
                })
            )),
            "{what}: {:?}",
            h.actions
        );
    }
}

#[test]
fn bad_requests_after_start_pause_with_typed_errors() {
    let cases: Vec<(Frame, ProtocolError)> = vec![
        (Frame::Request(Request { block: 3, indexes: vec![0] }), ProtocolError::BlockOutOfRange { block: 3 }),
        (
            Frame::Request(Request { block: 0, indexes: vec![PAGES as u32] }),
            ProtocolError::PageOutOfRange { block: 0, index: PAGES as u32 },
        ),
        (
            Frame::Request(Request { block: 0, indexes: (20..29).collect() }),
            ProtocolError::TooManyRequests { limit: 8 },
        ),
        (
            Frame::Hello(wire::Hello {
                resume: false,
                urgent_channel: false,
                session: 1,
                epoch: 0,
                page_size: 64,
                mode: wire::WireMode::Postcopy,
                precopy_rounds: 0,
                blocks: vec![postcopy_core::RamBlock { name: "ram".into(), page_count: 1, page_size: 64 }],
                machine: bytes::Bytes::new(),
                push_streams: 1,
            }),
            ProtocolError::UnexpectedFrame {
                channel: Channel::Return,
                kind: wire::FrameKind::Hello,
                state: "ACTIVE".into(),
            },
        ),
    ];
    for (frame, expected) in cases {
        let mut h = Harness::to_active(quiet());
        h.receive(frame);
        assert_eq!(h.src.state(), SourceState::ErrorReceive);
        assert!(
            h.has(&SourceAction::Notice(Notice::Paused { reason: MigrationError::Protocol(expected.clone()) })),
            "{expected:?}: {:?}",
            h.actions
        );
        assert!(!h.has(&SourceAction::ResumeVcpus));
    }
}

#[test]
fn undecodable_bytes_before_switchover_fail_with_a_wire_error() {
    let mut h = Harness::new(quiet());
    h.connect_all();
    h.src.handle_input(h.now, Channel::Return, Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 0]));
    h.drain();
    assert!(matches!(
        h.finished_error(),
        Some(MigrationError::Protocol(ProtocolError::Wire {
            channel: Channel::Return,
            error: postcopy_core::WireError::UnknownFrameType(0x7f)
        }))
    ));
}

#[test]
fn request_before_switchover_is_unexpected() {
    let mut h = Harness::new(Config { mode: postcopy_core::Mode::Hybrid { precopy_rounds: 1 }, ..quiet() });
    h.connect_all();
    h.welcome();
    h.request(&[1]);
    assert!(matches!(
        h.finished_error(),
        Some(MigrationError::Protocol(ProtocolError::UnexpectedFrame { kind: wire::FrameKind::Request, .. }))
    ));
    assert!(!h.has(&SourceAction::ResumeVcpus), "the guest never stopped");
}

#[test]
fn keepalive_and_peer_timeout() {
    let config = Config {
        keepalive_interval: Some(Duration::from_millis(100)),
        peer_timeout: Some(Duration::from_millis(500)),
        ..Config::postcopy()
    };
    let mut h = Harness::to_active(config);
    let _ = h.frames(Channel::Main);
    assert_eq!(h.src.state(), SourceState::AllPagesSent);
    h.now = Timestamp(150_000_000);
    h.src.handle_timeout(h.now);
    assert_eq!(h.frames(Channel::Main), vec![Frame::Ping]);
    h.receive(Frame::Ping);
    h.now = Timestamp(600_000_000);
    h.src.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.src.state(), SourceState::AllPagesSent, "the peer spoke at 150 ms");
    h.now = Timestamp(700_000_000);
    h.src.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Paused);
    assert!(h.has(&SourceAction::Notice(Notice::Paused { reason: MigrationError::PeerTimeout { timeout_ms: 500 } })));
}

#[test]
fn ready_to_run_before_the_device_state_is_sent_is_unexpected() {
    let mut h = Harness::new(quiet());
    h.connect_all();
    h.welcome();
    h.src.handle_vcpus_stopped(h.now, Bytes::from_static(b"x")).unwrap();
    h.drain();
    h.receive(Frame::ReadyToRun);
    assert!(h.has(&SourceAction::ResumeVcpus));
    assert!(matches!(
        h.finished_error(),
        Some(MigrationError::Protocol(ProtocolError::UnexpectedFrame { kind: wire::FrameKind::ReadyToRun, .. }))
    ));
}

#[test]
fn wrong_events_are_refused() {
    let mut h = Harness::new(quiet());
    assert!(matches!(h.src.handle_vcpus_stopped(h.now, Bytes::new()), Err(EventError::WrongState { .. })));
    assert!(matches!(h.src.handle_dirty_pages(h.now, [PageNumber(1)]), Err(EventError::WrongState { .. })));
    let layout = RamLayout::single("ram", 64, PAGES).unwrap();
    assert_eq!(layout.address(PageNumber(5)), Some(PageAddress { block: 0, index: 5 }));
}

#[test]
fn lost_main_before_start_takes_the_guest_back_then_tells_the_destination() {
    let mut h = Harness::to_switchover(quiet());
    h.receive(Frame::ReadyToRun);
    h.actions.clear();
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    // The guest runs here again at once; StartGuest never left.
    assert!(h.has(&SourceAction::ResumeVcpus));
    assert_eq!(h.src.state(), SourceState::Withdrawing);
    assert!(!h.src.state().after_start());
    assert!(h.finished_error().is_none(), "not over until the destination is told");
    // A first attempt fails; the second connects the main channel only.
    h.fire_timer();
    assert!(h.has(&SourceAction::Connect(Channel::Main)));
    assert!(!h.has(&SourceAction::Connect(Channel::Return)));
    h.src.handle_connect_failed(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Withdrawing);
    h.fire_timer();
    h.src.handle_connected(h.now, Channel::Main);
    h.drain();
    let farewell = h.farewell_frames().expect("a hello and a cancel");
    assert!(
        matches!(&farewell[..], [Frame::Hello(hello), Frame::Cancel { .. }] if hello.resume && hello.epoch == 2),
        "{farewell:?}"
    );
    assert_eq!(h.src.state(), SourceState::Failed);
    assert_eq!(h.finished_error(), Some(MigrationError::ConnectionLost { channel: Channel::Main }));
    assert_eq!(h.actions.iter().filter(|a| **a == SourceAction::ResumeVcpus).count(), 1);
}

#[test]
fn withdrawing_ends_at_once_when_nothing_listens() {
    let mut h = Harness::to_switchover(quiet());
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Withdrawing);
    h.fire_timer();
    h.src.handle_connect_refused(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Failed, "no destination listens: none waits");
    assert_eq!(h.finished_error(), Some(MigrationError::ConnectionLost { channel: Channel::Main }));
    assert_eq!(h.actions.iter().filter(|a| **a == SourceAction::ResumeVcpus).count(), 1);
    assert_eq!(h.src.poll_timeout(), None);
    // After the start a refusal is one more failed attempt: the guest may
    // run over there, and a restarted destination may come back.
    let mut h = Harness::to_active(quiet());
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    h.fire_timer();
    h.src.handle_connect_refused(h.now, Channel::Main);
    h.drain();
    assert!(h.src.state().after_start() && !h.src.state().is_terminal(), "{}", h.src.state());
    assert!(h.src.poll_timeout().is_some(), "it tries again");
    // Before the device state left, a refusal fails the migration as before.
    let mut h = Harness::new(quiet());
    h.src.handle_connect_refused(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::ConnectFailed { channel: Channel::Main }));
}

#[test]
fn withdrawing_gives_up_after_its_attempts() {
    let mut h = Harness::to_switchover(Config { withdraw_attempts: 2, ..quiet() });
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    for _ in 0..2 {
        h.fire_timer();
        h.src.handle_connect_failed(h.now, Channel::Main);
        h.drain();
    }
    assert_eq!(h.src.state(), SourceState::Failed);
    assert_eq!(h.finished_error(), Some(MigrationError::ConnectionLost { channel: Channel::Main }));
    // The user may stop the attempts: the migration ends at once.
    let mut h = Harness::to_switchover(quiet());
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    h.src.handle_cancel(h.now).unwrap();
    h.drain();
    assert_eq!(h.finished_error(), Some(MigrationError::Cancelled));
    assert_eq!(h.actions.iter().filter(|a| **a == SourceAction::ResumeVcpus).count(), 1);
}

/// Resumes as a destination that has pages 0..5 would: welcome, report.
fn recover_with_five_present(h: &mut Harness) {
    let epoch = h.src.epoch();
    let _ = h.frames(Channel::Main);
    h.receive(Frame::Welcome(Welcome {
        session: SESSION,
        epoch,
        guest_started: true,
        device_loaded: true,
        max_outstanding_requests: 8,
    }));
    h.receive(Frame::PresentPages(PresentPages { first_word: 0, words: vec![0b11111, 0] }));
    h.receive(Frame::PresentEnd { present_pages: 5 });
}

#[test]
fn manual_recovery_waits_for_the_user_after_a_loss() {
    let mut h = Harness::to_active(Config { auto_reconnect: false, ..quiet() });
    for _ in 0..5 {
        let _ = h.one_frame(Channel::Main);
    }
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert_eq!(h.src.state(), SourceState::Paused);
    assert_eq!(h.src.poll_timeout(), None, "no reconnection timer: the user decides");
    // However long it waits, nothing happens by itself.
    h.actions.clear();
    h.now = h.now + Duration::from_secs(3600);
    h.src.handle_timeout(h.now);
    h.drain();
    assert!(h.actions.is_empty(), "{:?}", h.actions);
    // The user resumes: one attempt, at once; refused (nothing listens yet).
    h.src.handle_resume(h.now).unwrap();
    h.drain();
    assert!(h.has(&SourceAction::Connect(Channel::Main)));
    assert!(h.has(&SourceAction::Notice(Notice::RecoveryAttempt { attempt: 1 })));
    assert!(h.src.handle_resume(h.now).is_err(), "an attempt is under way");
    for channel in Channel::ALL {
        h.src.handle_connect_refused(h.now, channel);
    }
    h.drain();
    assert_eq!(h.src.state(), SourceState::Paused, "a refusal never ends a manual recovery");
    assert_eq!(h.src.poll_timeout(), None);
    assert!(h.finished_error().is_none());
    // Resumed again (to the address the destination now listens on): recovers.
    h.src.handle_resume(h.now).unwrap();
    h.drain();
    h.connect_all();
    assert_eq!(h.src.state(), SourceState::Recovering);
    assert_eq!(h.src.epoch(), 2);
    recover_with_five_present(&mut h);
    assert_eq!(h.src.state(), SourceState::Active);
    assert!(h.has(&SourceAction::Notice(Notice::Recovered { epoch: 2 })));
}

#[test]
fn a_user_pause_holds_the_migration_until_resumed_even_with_automatic_recovery() {
    let mut h = Harness::to_active(quiet());
    assert!(h.src.config().auto_reconnect);
    for _ in 0..5 {
        let _ = h.one_frame(Channel::Main);
    }
    h.actions.clear();
    h.src.handle_pause(h.now).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Paused);
    assert!(h.src.is_held());
    for channel in Channel::ALL {
        assert!(h.has(&SourceAction::Close(channel)), "{channel} closed");
    }
    assert!(h.has(&SourceAction::Notice(Notice::Paused { reason: MigrationError::PausedByUser })));
    assert!(!h.has(&SourceAction::ResumeVcpus), "never runs the guest again");
    assert_eq!(h.src.poll_timeout(), None, "held: no automatic attempt");
    assert!(h.src.handle_pause(h.now).is_err(), "paused already (QEMU: only in postcopy-active or -recover)");
    h.src.handle_resume(h.now).unwrap();
    h.drain();
    assert!(!h.src.is_held());
    h.connect_all();
    // A pause during the recovery holds it again.
    assert_eq!(h.src.state(), SourceState::Recovering);
    h.src.handle_pause(h.now).unwrap();
    h.drain();
    assert_eq!(h.src.state(), SourceState::Paused);
    assert_eq!(h.src.poll_timeout(), None);
    h.src.handle_resume(h.now).unwrap();
    h.drain();
    h.connect_all();
    recover_with_five_present(&mut h);
    assert_eq!(h.src.state(), SourceState::Active);
    // Automatic again after the user's resume: a loss reconnects by itself.
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    assert!(h.src.poll_timeout().is_some(), "the retry timer is armed");
}

#[test]
fn pause_and_resume_are_refused_outside_postcopy() {
    let mut h = Harness::to_switchover(quiet());
    assert!(h.src.handle_pause(h.now).is_err(), "before StartGuest the guest is still the source's");
    assert!(h.src.handle_resume(h.now).is_err());
    assert_eq!(h.src.state(), SourceState::Switchover);
    let mut h = Harness::to_active(quiet());
    assert!(matches!(h.src.handle_resume(h.now), Err(EventError::WrongState { event: "resume", .. })));
    // Resuming between two automatic attempts starts the next one now.
    h.src.handle_connection_lost(h.now, Channel::Main);
    h.drain();
    let timer = h.src.poll_timeout().expect("retry timer");
    assert!(timer > h.now);
    h.actions.clear();
    h.src.handle_resume(h.now).unwrap();
    h.drain();
    assert!(h.has(&SourceAction::Connect(Channel::Return)));
    assert_eq!(h.src.epoch(), 1);
}
