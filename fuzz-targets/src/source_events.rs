//! `source_events`: a real [`Source`] driven by any sequence of events.
//!
//! The fuzzer plays the destination (structured frames with plausible or
//! raw fields, or raw bytes, on any channel), the network (connections made,
//! refused and lost), the clock (timers, with time that only grows), the
//! user (switch to postcopy, cancel) and the VMM (vCPUs stopped with a
//! device state, dirty logs, guest writes). A small driver carries out the
//! core's actions as a real one would (optionally answering connects, stops
//! and dirty-log syncs at once, so that deep states are cheap to reach) and
//! checks, after every step, what the source can check alone:
//!
//! - the guest never runs again on the source once `StartGuest` was
//!   transmitted, and the core's `after_start()` agrees with what was sent
//!   (but for a source that left the guest to a destination gone for good:
//!   FAILED, past StartGuest, the guest stopped here);
//! - every action is legal for the state: vCPUs are stopped only while they
//!   run and before the switchover, resumed only while stopped and before
//!   `StartGuest`, connects only for the channels in use, one `Finished`
//!   whose outcome matches the state and where the guest is;
//! - `urgent_queue_len() <= max_outstanding_requests` (the source's own bound);
//! - every `poll_transmit` output decodes whole, frame by frame, on a
//!   per-connection decoder: the hello first, only the frames its channel
//!   carries, pages of the layout with the guest's current content, precopy
//!   pages only while the guest runs, requested pages only when requested,
//!   background pages and end-of-stream only after `StartGuest`, the device
//!   state exactly as given, and in pure postcopy without a loss each page
//!   at most once;
//! - no panic, no allocation beyond a bound.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use std::collections::HashSet;
use std::time::Duration;

use postcopy_core::testkit::{fill_page, SourceGuest};
use postcopy_core::wire::{Decoder, Frame, PageData, PageKind};
use postcopy_core::{
    Channel, Config, DeferredPage, MigrationError, Mode, Notice, PageNumber, RamBlock, RamLayout, Side, Source,
    SourceAction, SourceState, Timestamp,
};

use crate::alloc_guard::Scope;
use crate::frames::{decode_all, encode_split, take_frames, Ctx, FrameSpec};
use crate::input::{pick_channel, In, Num, Out};

/// The session id of every fuzzed source.
pub const SESSION: u64 = 0x5eed;
/// Page size of every fuzzed source.
pub const PAGE_SIZE: u32 = 64;
/// Events per input, at most.
pub const MAX_OPS: usize = 512;

/// How the source is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSetup {
    /// `m % 5`: 0 pure postcopy, else hybrid with `m % 5 - 1` precopy rounds.
    pub mode: u8,
    /// Bit 0 urgent channel, 1 prepaging, 2 keep-alives, 3 peer timeout,
    /// 4 answer connects at once, 5 answer StopVcpus at once, 6 answer
    /// dirty-log syncs at once, 7 manual recovery (`auto_reconnect` off).
    pub flags: u8,
    /// `max_outstanding_requests = v % 16 + 1`.
    pub max_requests: u8,
    /// `request_batch_pages = v % 8 + 1`.
    pub batch: u8,
    /// `device_state_chunk_bytes = v % 64 + 1`.
    pub chunk: u8,
    /// Length of the device state the automatic driver hands over.
    pub device_state_len: u8,
    /// Page counts (`v + 1`) of one to three blocks.
    pub blocks: Vec<u8>,
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    Start,
    Connected(u8),
    ConnectFailed(u8),
    ConnectionLost(u8),
    /// A structured frame on channel `[Return, Main, Urgent][ch % 3]`,
    /// delivered in two pieces cut at `split`.
    Frame {
        ch: u8,
        frame: FrameSpec,
        split: u16,
    },
    /// Raw bytes on a channel.
    Bytes {
        ch: u8,
        bytes: Vec<u8>,
    },
    /// `poll_transmit` on `Channel::ALL[ch % 3]` with this byte budget.
    Transmit {
        ch: u8,
        max_bytes: u16,
    },
    /// The vCPUs stopped, with a device state of this length.
    VcpusStopped {
        len: u8,
    },
    DirtyBitmap {
        first: Num,
        words: Vec<u64>,
    },
    DirtyPages(Vec<Num>),
    DirtySyncComplete,
    SwitchToPostcopy,
    Cancel,
    /// 0: jump to the armed timer; else advance `v^2` ms. Then the timeout.
    Timer(u8),
    /// The guest writes a page (only while it runs here).
    GuestWrite(Num),
    /// The user pauses the migration (`migrate-pause`).
    Pause,
    /// The user resumes a paused migration (`migrate {resume: true}`).
    Resume,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceInput {
    pub setup: SourceSetup,
    pub ops: Vec<SourceEvent>,
}

const RETURN_FIRST: [Channel; 3] = [Channel::Return, Channel::Main, Channel::Urgent];

impl SourceEvent {
    fn read(r: &mut In) -> SourceEvent {
        match r.u8() % 17 {
            0 => SourceEvent::Start,
            1 => SourceEvent::Connected(r.u8()),
            2 => SourceEvent::ConnectFailed(r.u8()),
            3 => SourceEvent::ConnectionLost(r.u8()),
            4 => SourceEvent::Frame { ch: r.u8(), frame: FrameSpec::read(r), split: r.u16() },
            5 => SourceEvent::Bytes { ch: r.u8(), bytes: r.bytes(255) },
            6 => SourceEvent::Transmit { ch: r.u8(), max_bytes: r.u16() },
            7 => SourceEvent::VcpusStopped { len: r.u8() },
            8 => SourceEvent::DirtyBitmap { first: r.num(), words: r.list(4, In::u64) },
            9 => SourceEvent::DirtyPages(r.list(8, In::num)),
            10 => SourceEvent::DirtySyncComplete,
            11 => SourceEvent::SwitchToPostcopy,
            12 => SourceEvent::Cancel,
            13 => SourceEvent::Timer(r.u8()),
            14 => SourceEvent::GuestWrite(r.num()),
            15 => SourceEvent::Pause,
            _ => SourceEvent::Resume,
        }
    }

    fn write(&self, o: &mut Out) {
        match self {
            SourceEvent::Start => {
                o.u8(0);
            }
            SourceEvent::Connected(ch) => {
                o.u8(1).u8(*ch);
            }
            SourceEvent::ConnectFailed(ch) => {
                o.u8(2).u8(*ch);
            }
            SourceEvent::ConnectionLost(ch) => {
                o.u8(3).u8(*ch);
            }
            SourceEvent::Frame { ch, frame, split } => {
                o.u8(4).u8(*ch);
                frame.write(o);
                o.u16(*split);
            }
            SourceEvent::Bytes { ch, bytes } => {
                o.u8(5).u8(*ch).bytes(bytes);
            }
            SourceEvent::Transmit { ch, max_bytes } => {
                o.u8(6).u8(*ch).u16(*max_bytes);
            }
            SourceEvent::VcpusStopped { len } => {
                o.u8(7).u8(*len);
            }
            SourceEvent::DirtyBitmap { first, words } => {
                o.u8(8).num(*first).list(words, |o, &w| {
                    o.u64(w);
                });
            }
            SourceEvent::DirtyPages(pages) => {
                o.u8(9).list(pages, |o, &p| {
                    o.num(p);
                });
            }
            SourceEvent::DirtySyncComplete => {
                o.u8(10);
            }
            SourceEvent::SwitchToPostcopy => {
                o.u8(11);
            }
            SourceEvent::Cancel => {
                o.u8(12);
            }
            SourceEvent::Timer(v) => {
                o.u8(13).u8(*v);
            }
            SourceEvent::GuestWrite(page) => {
                o.u8(14).num(*page);
            }
            SourceEvent::Pause => {
                o.u8(15);
            }
            SourceEvent::Resume => {
                o.u8(16);
            }
        }
    }
}

impl<'a> Arbitrary<'a> for SourceInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut r = In::new(u);
        let setup = SourceSetup {
            mode: r.u8(),
            flags: r.u8(),
            max_requests: r.u8(),
            batch: r.u8(),
            chunk: r.u8(),
            device_state_len: r.u8(),
            blocks: r.list(3, In::u8),
        };
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < MAX_OPS {
            ops.push(SourceEvent::read(&mut r));
        }
        Ok(SourceInput { setup, ops })
    }
}

impl SourceInput {
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = &self.setup;
        let mut o = Out::default();
        o.u8(s.mode).u8(s.flags).u8(s.max_requests).u8(s.batch).u8(s.chunk).u8(s.device_state_len);
        o.list(&s.blocks, |o, &b| {
            o.u8(b);
        });
        for op in &self.ops {
            op.write(&mut o);
        }
        o.0
    }
}

impl SourceSetup {
    pub fn config(&self) -> Config {
        let rounds = self.mode % 5;
        Config {
            mode: if rounds == 0 { Mode::Postcopy } else { Mode::Hybrid { precopy_rounds: u32::from(rounds - 1) } },
            urgent_channel: self.flags & 1 != 0,
            prepaging: self.flags & 2 != 0,
            keepalive_interval: (self.flags & 4 != 0).then(|| Duration::from_secs(1)),
            peer_timeout: (self.flags & 8 != 0).then(|| Duration::from_secs(3)),
            auto_reconnect: self.flags & 0x80 == 0,
            request_batch_pages: u32::from(self.batch % 8) + 1,
            max_outstanding_requests: u32::from(self.max_requests % 16) + 1,
            device_state_chunk_bytes: u32::from(self.chunk % 64) + 1,
            max_device_state_bytes: 200,
            handshake_timeout: Duration::from_secs(2),
            reconnect_delay_min: Duration::from_millis(20),
            reconnect_delay_max: Duration::from_millis(500),
            // Within reach of an input's refusals and timers.
            destination_gone_timeout: Duration::from_secs(3),
            // The chunk byte's top bits: push streams.
            push_streams: 1 + (self.chunk >> 6) % 3,
            ..Config::default()
        }
    }

    pub fn layout(&self) -> RamLayout {
        let blocks: Vec<RamBlock> = if self.blocks.is_empty() {
            vec![RamBlock { name: "b0".into(), page_count: 8, page_size: PAGE_SIZE }]
        } else {
            self.blocks
                .iter()
                .enumerate()
                .map(|(i, &pages)| RamBlock {
                    name: format!("b{i}"),
                    page_count: u64::from(pages) + 1,
                    page_size: PAGE_SIZE,
                })
                .collect()
        };
        RamLayout::new(PAGE_SIZE, blocks).expect("fuzz layouts are valid")
    }
}

/// What a run saw, for the seed tests.
#[derive(Clone, Debug, Default)]
pub struct SourceRunLog {
    pub states: Vec<SourceState>,
    /// Every error the source reported (pauses, failed recoveries, its end).
    pub errors: Vec<MigrationError>,
    pub finished: Option<Result<(), MigrationError>>,
    pub frames_sent: Vec<Frame>,
}

struct Driver {
    core: Source,
    guest: SourceGuest,
    config: Config,
    now: Timestamp,
    auto_connect: bool,
    auto_stop: bool,
    auto_sync: bool,
    device_state_len: usize,
    running: bool,
    past_start: bool,
    finished: bool,
    next_version: u64,
    decoders: [Decoder; Channel::COUNT],
    frames_on_conn: [usize; Channel::COUNT],
    /// Pages the peer asked for in structured requests.
    requested: HashSet<u64>,
    /// Raw bytes reached the return path: requests may be unknown to us.
    raw_return: bool,
    sends: Vec<u8>,
    any_pause: bool,
    /// The user paused the migration and has not resumed it.
    user_paused: bool,
    /// Paused with no attempt of its own to come (manual recovery, or the
    /// user's pause): a connect before the user resumes is a bug.
    awaiting_resume: bool,
    /// The source took the guest back and withdraws.
    withdrawing: bool,
    device_state: Option<Bytes>,
    device_sent: Vec<u8>,
    next_word: u64,
    present_seen: u64,
    report: SourceRunLog,
}

impl Driver {
    fn total(&self) -> u64 {
        self.core.layout().total_pages()
    }

    fn connected(&mut self, channel: Channel) {
        let was_connecting = !self.core.is_connected(channel);
        self.core.handle_connected(self.now, channel);
        if was_connecting && self.core.is_connected(channel) {
            self.decoders[channel.index()] = Decoder::new();
            self.frames_on_conn[channel.index()] = 0;
        }
    }

    fn device_state(&self, len: usize) -> Bytes {
        Bytes::from((0..len).map(|i| i as u8).collect::<Vec<u8>>())
    }

    fn vcpus_stopped(&mut self, len: usize) {
        let before = self.core.state();
        let state = self.device_state(len);
        if self.core.handle_vcpus_stopped(self.now, state.clone()).is_ok() && before == SourceState::Stopping {
            self.device_state = Some(state);
            self.device_sent.clear();
        }
    }

    fn sync_dirty_log(&mut self) {
        let dirty: Vec<PageNumber> =
            (0..self.guest.dirty.len()).filter(|&p| self.guest.dirty.get(p)).map(PageNumber).collect();
        self.guest.dirty.clear_all();
        self.core.handle_dirty_pages(self.now, dirty).expect("the dirty log was asked for");
        self.core.handle_dirty_sync_complete(self.now).expect("the dirty log was asked for");
    }

    /// Carries out every pending action, checking that each is legal.
    fn process(&mut self) {
        while let Some(action) = self.core.poll_action() {
            let state = self.core.state();
            if self.finished {
                assert!(matches!(action, SourceAction::Close(_)), "{action:?} after Finished");
                continue;
            }
            match action {
                SourceAction::Connect(channel) => {
                    assert!(self.core.channels().any(|c| c == channel), "connect for unused channel {channel}");
                    assert!(!self.awaiting_resume, "a reconnection attempt the user did not ask for");
                    if self.auto_connect {
                        self.connected(channel);
                    }
                }
                SourceAction::Close(_) => {}
                SourceAction::Farewell { channel, bytes } => {
                    assert_eq!(channel, Channel::Main, "the source's farewell goes on the main channel");
                    let frames = decode_all(&bytes);
                    // A Cancel; when withdrawing, on a new connection, after
                    // the resume hello that lets the destination take it.
                    let withdrawing = self.withdrawing;
                    assert!(
                        match &frames[..] {
                            [Frame::Cancel { .. }] => true,
                            [Frame::Hello(hello), Frame::Cancel { .. }] => withdrawing && hello.resume,
                            _ => false,
                        },
                        "a source farewell is one Cancel (after a resume hello when withdrawing): {frames:?}"
                    );
                }
                SourceAction::StopVcpus => {
                    assert!(self.running, "StopVcpus while the guest is not running here");
                    assert!(!self.past_start, "StopVcpus after StartGuest");
                    self.running = false;
                    if self.auto_stop {
                        self.vcpus_stopped(self.device_state_len);
                    }
                }
                SourceAction::ResumeVcpus => {
                    assert!(!self.past_start, "the source resumed the guest after transmitting StartGuest");
                    assert!(!self.running, "ResumeVcpus while the guest runs");
                    self.running = true;
                }
                SourceAction::SyncDirtyLog => {
                    assert!(
                        matches!(state, SourceState::DirtySync | SourceState::FinalSync | SourceState::Failed),
                        "SyncDirtyLog in {state}"
                    );
                    if self.auto_sync && state != SourceState::Failed {
                        self.sync_dirty_log();
                    }
                }
                SourceAction::Notice(notice) => match notice {
                    Notice::Paused { reason } | Notice::RecoveryFailed { reason, .. } => {
                        assert!(self.past_start, "paused before StartGuest");
                        self.any_pause = true;
                        if self.user_paused || !self.config.auto_reconnect {
                            self.awaiting_resume = true;
                        }
                        self.report.errors.push(reason);
                    }
                    Notice::RecoveryAttempt { .. } | Notice::Recovered { .. } => assert!(self.past_start),
                    Notice::Withdrawing { reason } => {
                        assert!(!self.past_start, "withdrawing after StartGuest: the guest would run twice");
                        assert!(self.running, "withdrawing without the guest running here again");
                        self.withdrawing = true;
                        self.report.errors.push(reason);
                    }
                    Notice::ConnectionRefused { .. } | Notice::StrangerRefused { .. } => {
                        panic!("the source does not refuse connections")
                    }
                    notice @ (Notice::Fenced
                    | Notice::LeaseRestored
                    | Notice::CheckpointCommitted { .. }
                    | Notice::TookOver { .. }) => panic!("{notice:?} without fallback"),
                },
                // This target's source runs without fallback.
                action @ (SourceAction::StageCheckpointPage { .. }
                | SourceAction::CommitCheckpoint { .. }
                | SourceAction::DiscardCheckpoint { .. }
                | SourceAction::TakeOver { .. }) => panic!("{action:?} without fallback"),
                SourceAction::Finished(finished) => {
                    self.finished = true;
                    match &finished.result {
                        Ok(()) => {
                            assert_eq!(state, SourceState::Completed);
                            assert_eq!(finished.guest_on, Side::Destination);
                            assert!(self.past_start, "completed without StartGuest");
                        }
                        Err(error @ MigrationError::DestinationGone { .. }) => {
                            // Paused past StartGuest, refused long enough:
                            // the guest is the destination's, stopped here.
                            assert_eq!(state, SourceState::Failed);
                            assert_eq!(finished.guest_on, Side::Destination);
                            assert!(self.past_start, "left a guest it never gave away to the destination");
                            assert!(!self.running, "left the guest to the destination while running it");
                            self.report.errors.push(error.clone());
                        }
                        Err(error) => {
                            assert_eq!(state, SourceState::Failed);
                            assert_eq!(finished.guest_on, Side::Source);
                            assert!(!self.past_start, "failed after StartGuest: the guest would be lost");
                            self.report.errors.push(error.clone());
                        }
                    }
                    self.report.finished = Some(finished.result.clone());
                }
            }
        }
    }

    fn check(&mut self) {
        let state = self.core.state();
        if self.report.states.last() != Some(&state) {
            self.report.states.push(state);
        }
        let bound = self.config.max_outstanding_requests as usize;
        assert!(
            self.core.urgent_queue_len() <= bound,
            "urgent queue holds {} pages, bound {bound}",
            self.core.urgent_queue_len()
        );
        // A source that left the guest to a destination gone for good ends
        // FAILED past StartGuest, with the guest stopped here: the state
        // alone cannot tell that from a failure before StartGuest, its
        // outcome can.
        let left_to_destination = matches!(self.report.finished, Some(Err(MigrationError::DestinationGone { .. })));
        if left_to_destination {
            assert_eq!(state, SourceState::Failed);
            assert!(self.past_start, "left a guest it never gave away to the destination");
        } else {
            assert_eq!(self.past_start, state.after_start(), "StartGuest transmitted vs state {state}");
        }
        assert_eq!(self.finished, state.is_terminal(), "Finished vs state {state}");
        if self.past_start {
            assert!(!self.running, "the guest runs on the source after StartGuest");
        }
        if state == SourceState::Failed && !left_to_destination {
            assert!(self.running, "failed with the guest stopped");
        }
        assert!(self.core.pages_sent() <= self.total());
        if state.is_terminal() {
            assert_eq!(self.core.poll_timeout(), None, "a finished source arms no timer");
        }
    }

    fn transmit(&mut self, channel: Channel, max_bytes: usize) {
        let mut out = Vec::new();
        // Odd budgets take the deferred path (pages read after the poll):
        // filled, its frames must pass every check the copying path does.
        let frames = if max_bytes % 2 == 1 {
            let mut deferred = Vec::new();
            let frames =
                self.core.poll_transmit_deferred(self.now, channel, &mut out, max_bytes, &self.guest, &mut deferred);
            DeferredPage::fill_all(&deferred, &mut out, &self.guest);
            frames
        } else {
            self.core.poll_transmit(self.now, channel, &mut out, max_bytes, &self.guest)
        };
        assert_eq!(frames == 0, out.is_empty());
        if channel == Channel::Return {
            assert_eq!(frames, 0, "the source never writes the return path");
        }
        let decoder = &mut self.decoders[channel.index()];
        decoder.push(Bytes::from(out));
        let decoded = take_frames(decoder, &format_args!("poll_transmit on {channel}"));
        assert_eq!(decoded.len(), frames, "frame count");
        for frame in decoded {
            self.check_sent(channel, &frame);
            self.frames_on_conn[channel.index()] += 1;
            self.report.frames_sent.push(frame);
        }
    }

    fn check_sent(&mut self, channel: Channel, frame: &Frame) {
        let first = self.frames_on_conn[channel.index()] == 0;
        match (channel, frame) {
            (Channel::Main, Frame::Hello(hello)) => {
                assert!(first, "hello in the middle of a connection");
                assert_eq!(hello.session, SESSION);
                assert_eq!(hello.epoch, self.core.epoch());
                assert_eq!(&hello.blocks[..], self.core.layout().blocks());
                assert_eq!(hello.push_streams, self.config.push_stream_count());
                return;
            }
            (Channel::Urgent | Channel::Push(_), Frame::UrgentHello(hello)) => {
                assert!(first, "urgent or stream hello in the middle of a connection");
                if let Some(stream) = channel.push_stream() {
                    assert!(stream < self.config.push_stream_count(), "a push stream the migration does not use");
                }
                assert_eq!((hello.session, hello.epoch), (SESSION, self.core.epoch()));
                return;
            }
            _ => assert!(!first, "{channel} connection does not open with its hello: {frame:?}"),
        }
        let hybrid = matches!(self.config.mode, Mode::Hybrid { .. });
        match (channel, frame) {
            (Channel::Main | Channel::Urgent | Channel::Push(_), Frame::Page(page)) => {
                let number = self.core.layout().page_number(page.address).expect("page of the layout");
                match page.kind {
                    PageKind::Precopy => {
                        assert!(hybrid && self.running && !self.past_start, "precopy page while the guest is stopped");
                        assert_eq!(channel, Channel::Main);
                    }
                    PageKind::Background => {
                        assert!(self.past_start, "background page before StartGuest");
                        assert!(channel.push_stream().is_some(), "background page on {channel}");
                    }
                    PageKind::Requested => {
                        assert!(matches!(channel, Channel::Main | Channel::Urgent), "requested page on {channel}");
                        assert!(!self.running, "requested page while the guest runs on the source");
                        assert!(
                            self.raw_return || self.requested.contains(&number.0),
                            "page {} sent as requested, never requested",
                            number.0
                        );
                    }
                }
                let mut expected = vec![0; PAGE_SIZE as usize];
                fill_page(&mut expected, number, self.guest.versions[number.0 as usize]);
                match &page.data {
                    PageData::Zero => assert!(expected.iter().all(|&b| b == 0), "non-zero page sent as zero"),
                    PageData::Bytes(bytes) => assert_eq!(&bytes[..], &expected[..], "page content"),
                }
                if self.config.mode == Mode::Postcopy && !self.any_pause {
                    let count = &mut self.sends[number.0 as usize];
                    *count += 1;
                    assert_eq!(*count, 1, "pure postcopy sent page {} twice without a loss", number.0);
                }
            }
            (Channel::Main, Frame::Discard(discard)) => {
                assert!(hybrid && !self.running && !self.past_start, "discard outside the switchover");
                let range = self.core.layout().block_range(discard.block).expect("discard of a real block");
                for &(first, count) in &discard.ranges {
                    assert!(count > 0 && u64::from(first) + u64::from(count) <= range.end - range.start);
                }
            }
            (Channel::Main, Frame::DeviceState { last, chunk }) => {
                assert!(!self.running && !self.past_start, "device state outside the switchover");
                self.device_sent.extend_from_slice(chunk);
                let state = self.device_state.as_ref().expect("device state sent before it was given");
                assert!(state.starts_with(&self.device_sent), "device state corrupted");
                assert_eq!(*last, self.device_sent.len() == state.len(), "last flag");
            }
            (Channel::Main | Channel::Urgent, Frame::StartGuest) => {
                assert!(!self.running, "StartGuest while the guest runs on the source");
                if !self.past_start {
                    let state = self.device_state.as_ref().expect("StartGuest before the device state");
                    assert_eq!(&self.device_sent[..], &state[..], "StartGuest before the whole device state");
                }
                self.past_start = true;
            }
            (Channel::Main, Frame::EndOfStream) => {
                assert!(self.past_start, "end of stream before StartGuest");
                assert_eq!(self.core.pages_sent(), self.total(), "end of stream with pages unsent");
            }
            (Channel::Main | Channel::Urgent, Frame::Ping) => {}
            (channel, frame) => panic!("the source sent {frame:?} on {channel}"),
        }
    }

    fn peer_frame(&mut self, channel: Channel, spec: &FrameSpec, split: usize) {
        let ctx = Ctx {
            session: SESSION,
            epoch: self.core.epoch(),
            page_size: PAGE_SIZE,
            layout: Some(self.core.layout()),
            next_word: self.next_word,
            present_seen: self.present_seen,
        };
        let frame = spec.build(&ctx);
        match &frame {
            Frame::Welcome(_) => {
                self.next_word = 0;
                self.present_seen = 0;
            }
            Frame::PresentPages(p) => {
                self.next_word = p.first_word.wrapping_add(p.words.len() as u64);
                self.present_seen += p.words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            }
            Frame::Request(r) if channel == Channel::Return => {
                for &index in &r.indexes {
                    let address = postcopy_core::PageAddress { block: r.block, index };
                    if let Some(page) = self.core.layout().page_number(address) {
                        self.requested.insert(page.0);
                    }
                }
            }
            _ => {}
        }
        let (head, tail) = encode_split(&frame, split);
        self.core.handle_input(self.now, channel, head);
        self.core.handle_input(self.now, channel, tail);
    }

    fn step(&mut self, op: &SourceEvent) {
        let total = self.total();
        match op {
            SourceEvent::Start => {
                let _ = self.core.handle_start(self.now);
            }
            SourceEvent::Connected(ch) => self.connected(pick_channel(&Channel::ALL, *ch)),
            // The high bit: refused (nothing listens) rather than failed.
            SourceEvent::ConnectFailed(ch) if *ch >= 0x80 => {
                self.core.handle_connect_refused(self.now, pick_channel(&Channel::ALL, *ch))
            }
            SourceEvent::ConnectFailed(ch) => {
                self.core.handle_connect_failed(self.now, pick_channel(&Channel::ALL, *ch))
            }
            SourceEvent::ConnectionLost(ch) => {
                self.core.handle_connection_lost(self.now, pick_channel(&Channel::ALL, *ch))
            }
            SourceEvent::Frame { ch, frame, split } => {
                self.peer_frame(pick_channel(&RETURN_FIRST, *ch), frame, *split as usize)
            }
            SourceEvent::Bytes { ch, bytes } => {
                let channel = pick_channel(&RETURN_FIRST, *ch);
                if channel == Channel::Return {
                    self.raw_return = true;
                }
                self.core.handle_input(self.now, channel, Bytes::from(bytes.clone()));
            }
            SourceEvent::Transmit { ch, max_bytes } => {
                self.transmit(pick_channel(&Channel::ALL, *ch), *max_bytes as usize)
            }
            SourceEvent::VcpusStopped { len } => self.vcpus_stopped(*len as usize),
            SourceEvent::DirtyBitmap { first, words } => {
                let first = match first {
                    Num::Near(k) => u64::from(*k) * 64,
                    Num::Raw(x) => *x,
                };
                let _ = self.core.handle_dirty_bitmap(self.now, first, words);
            }
            SourceEvent::DirtyPages(pages) => {
                let pages: Vec<PageNumber> = pages.iter().map(|p| PageNumber(p.index_below(total))).collect();
                let _ = self.core.handle_dirty_pages(self.now, pages);
            }
            SourceEvent::DirtySyncComplete => {
                let _ = self.core.handle_dirty_sync_complete(self.now);
            }
            SourceEvent::SwitchToPostcopy => {
                let _ = self.core.handle_switch_to_postcopy(self.now);
            }
            SourceEvent::Cancel => {
                let _ = self.core.handle_cancel(self.now);
            }
            SourceEvent::Timer(v) => {
                self.now = if *v == 0 {
                    self.core.poll_timeout().unwrap_or(self.now + Duration::from_millis(1)).max(self.now)
                } else {
                    self.now + Duration::from_millis(u64::from(*v) * u64::from(*v))
                };
                self.core.handle_timeout(self.now);
            }
            SourceEvent::GuestWrite(page) => {
                if self.running {
                    self.next_version += 1;
                    self.guest.write(PageNumber(page.index_below(total) % total), self.next_version);
                }
            }
            SourceEvent::Pause => {
                let state = self.core.state();
                if self.core.handle_pause(self.now).is_ok() {
                    assert!(self.past_start, "paused by the user in {state}, before StartGuest");
                    self.user_paused = true;
                    assert!(self.core.is_held());
                }
            }
            SourceEvent::Resume => {
                let state = self.core.state();
                if self.core.handle_resume(self.now).is_ok() {
                    assert!(matches!(state, SourceState::Paused | SourceState::ErrorReceive), "resumed in {state}");
                    self.user_paused = false;
                    self.awaiting_resume = false;
                }
            }
        }
    }
}

/// Runs the target on one input.
pub fn run(input: &SourceInput) -> SourceRunLog {
    let scope = Scope::begin(16 << 20);
    let config = input.setup.config();
    let layout = input.setup.layout();
    let total = layout.total_pages();
    let flags = input.setup.flags;
    let mut driver = Driver {
        core: Source::new(config.clone(), layout, SESSION),
        guest: SourceGuest::new(total),
        config,
        now: Timestamp::ZERO,
        auto_connect: flags & 0x10 != 0,
        auto_stop: flags & 0x20 != 0,
        auto_sync: flags & 0x40 != 0,
        device_state_len: input.setup.device_state_len as usize,
        running: true,
        past_start: false,
        finished: false,
        next_version: 0,
        decoders: Default::default(),
        frames_on_conn: [0; Channel::COUNT],
        requested: HashSet::new(),
        raw_return: false,
        sends: vec![0; total as usize],
        any_pause: false,
        user_paused: false,
        awaiting_resume: false,
        withdrawing: false,
        device_state: None,
        device_sent: Vec::new(),
        next_word: 0,
        present_seen: 0,
        report: SourceRunLog::default(),
    };
    driver.check();
    let trace = crate::trace::enabled();
    for op in &input.ops {
        driver.step(op);
        driver.process();
        if trace {
            eprintln!("{op:?} -> {} ({} frames out)", driver.core.state(), driver.report.frames_sent.len());
        }
        driver.check();
    }
    let usage = scope.usage();
    assert!(usage.peak_live_bytes <= 64 << 20, "{} bytes live at once", usage.peak_live_bytes);
    driver.report
}
