//! `destination_events`: a real [`Destination`] driven by any sequence of
//! events.
//!
//! The fuzzer plays the source (structured hellos, pages, discards, device
//! state, start, end of stream, cancel... with plausible or raw fields, or
//! raw bytes, on any channel, cut anywhere), the network, the clock, the user
//! and the VMM (page faults from vCPUs and from the device-state load, the
//! load finishing or failing). A small driver keeps the guest memory (which
//! pages are present) from the core's actions and checks, after every step,
//! what the destination can check alone:
//!
//! - a page is never installed over a present one without `overwrite`, and
//!   `overwrite` (a precopy copy replacing an older one) only before the
//!   guest ran here; discards only before the guest ran;
//! - the core's present bitmap is exactly the driver's memory, and no page is
//!   both present and awaited;
//! - every action is legal for the state: memory prepared once, the device
//!   state loaded once and within its bound, the guest resumed once and only
//!   after its device state loaded, wake-ups only for present pages, a
//!   farewell only from a guest that never ran, one `Finished` that matches;
//! - `outstanding_faults() <= max_outstanding_requests`;
//! - every `poll_transmit` output decodes whole: the welcome first and
//!   truthful, requests only for awaited missing pages of the layout,
//!   ready-to-run only after the load, EOC only with every page present and
//!   the guest running, present-page reports that match memory;
//! - no panic, no allocation beyond a bound.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::time::Duration;

use postcopy_core::wire::{self, Decoder, Frame, FrameKind, PageData};
use postcopy_core::{
    Admission, Channel, Config, Destination, DestinationAction, DestinationState, EventError, MigrationError, Notice,
    PageAddress, PageNumber, RamLayout, Side, Timestamp, Waiter,
};

use crate::alloc_guard::Scope;
use crate::frames::{decode_all, encode_split, take_frames, Ctx, FrameSpec};
use crate::input::{pick_channel, In, Num, Out};

/// The session id the fuzzer's plausible hellos carry.
pub const SESSION: u64 = 0x5eed;
/// Events per input, at most.
pub const MAX_OPS: usize = 512;
/// Largest guest a fuzzed destination accepts (a 128 KiB present bitmap).
pub const MAX_GUEST_PAGES: u64 = 1 << 20;
/// Page sizes a fuzzed destination may use.
pub const PAGE_SIZES: [u32; 3] = [64, 16, 4096];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationSetup {
    /// `PAGE_SIZES[v % 3]`.
    pub page_size: u8,
    /// Bit 0 keep-alives, 1 peer timeout, 2 short start timeout,
    /// 3 finish each device-state load at once (successfully).
    pub flags: u8,
    /// `max_outstanding_requests = v % 16 + 1`.
    pub max_requests: u8,
    /// `request_batch_pages = v % 8 + 1`.
    pub batch: u8,
    /// `max_device_state_bytes = 4 v`.
    pub max_device_state: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationEvent {
    /// A connection for `[Main, Urgent, Return][ch % 3]` was accepted.
    Connected(u8),
    ConnectionLost(u8),
    /// A structured frame on `[Main, Urgent, Return][ch % 3]`, in two
    /// pieces cut at `split`.
    Frame {
        ch: u8,
        frame: FrameSpec,
        split: u16,
    },
    Bytes {
        ch: u8,
        bytes: Vec<u8>,
    },
    Transmit {
        ch: u8,
        max_bytes: u16,
    },
    /// A fault on a page (`Near(k)`: page `k` of the layout); waiter
    /// `w % 5 == 4` is the VMM, else vCPU `w % 5`.
    PageFault {
        page: Num,
        waiter: u8,
    },
    DeviceStateLoaded {
        ok: bool,
    },
    Cancel,
    /// 0: jump to the armed timer; else advance `v^2` ms.
    Timer(u8),
    /// Installing a page (`Near(k)`: page `k` of the layout) failed.
    InstallFailed {
        page: Num,
    },
    /// A new connection on `[Main, Urgent, Return][ch % 3]` from a peer
    /// that may not be the source: a structured frame (with another
    /// migration's id when `other_session`), then raw bytes.
    Stranger {
        ch: u8,
        other_session: bool,
        frame: FrameSpec,
        garbage: Vec<u8>,
    },
    /// The user pauses the migration here (`migrate-pause`).
    Pause,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationInput {
    pub setup: DestinationSetup,
    pub ops: Vec<DestinationEvent>,
}

const MAIN_FIRST: [Channel; 3] = [Channel::Main, Channel::Urgent, Channel::Return];

impl DestinationEvent {
    fn read(r: &mut In) -> DestinationEvent {
        match r.u8() % 12 {
            0 => DestinationEvent::Connected(r.u8()),
            1 => DestinationEvent::ConnectionLost(r.u8()),
            2 => DestinationEvent::Frame { ch: r.u8(), frame: FrameSpec::read(r), split: r.u16() },
            3 => DestinationEvent::Bytes { ch: r.u8(), bytes: r.bytes(255) },
            4 => DestinationEvent::Transmit { ch: r.u8(), max_bytes: r.u16() },
            5 => DestinationEvent::PageFault { page: r.num(), waiter: r.u8() },
            6 => DestinationEvent::DeviceStateLoaded { ok: r.bool() },
            7 => DestinationEvent::Cancel,
            8 => DestinationEvent::Timer(r.u8()),
            9 => DestinationEvent::InstallFailed { page: r.num() },
            10 => DestinationEvent::Stranger {
                ch: r.u8(),
                other_session: r.bool(),
                frame: FrameSpec::read(r),
                garbage: r.bytes(64),
            },
            _ => DestinationEvent::Pause,
        }
    }

    fn write(&self, o: &mut Out) {
        match self {
            DestinationEvent::Connected(ch) => {
                o.u8(0).u8(*ch);
            }
            DestinationEvent::ConnectionLost(ch) => {
                o.u8(1).u8(*ch);
            }
            DestinationEvent::Frame { ch, frame, split } => {
                o.u8(2).u8(*ch);
                frame.write(o);
                o.u16(*split);
            }
            DestinationEvent::Bytes { ch, bytes } => {
                o.u8(3).u8(*ch).bytes(bytes);
            }
            DestinationEvent::Transmit { ch, max_bytes } => {
                o.u8(4).u8(*ch).u16(*max_bytes);
            }
            DestinationEvent::PageFault { page, waiter } => {
                o.u8(5).num(*page).u8(*waiter);
            }
            DestinationEvent::DeviceStateLoaded { ok } => {
                o.u8(6).bool(*ok);
            }
            DestinationEvent::Cancel => {
                o.u8(7);
            }
            DestinationEvent::Timer(v) => {
                o.u8(8).u8(*v);
            }
            DestinationEvent::InstallFailed { page } => {
                o.u8(9).num(*page);
            }
            DestinationEvent::Stranger { ch, other_session, frame, garbage } => {
                o.u8(10).u8(*ch).bool(*other_session);
                frame.write(o);
                o.bytes(garbage);
            }
            DestinationEvent::Pause => {
                o.u8(11);
            }
        }
    }
}

impl<'a> Arbitrary<'a> for DestinationInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut r = In::new(u);
        let setup = DestinationSetup {
            page_size: r.u8(),
            flags: r.u8(),
            max_requests: r.u8(),
            batch: r.u8(),
            max_device_state: r.u8(),
        };
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < MAX_OPS {
            ops.push(DestinationEvent::read(&mut r));
        }
        Ok(DestinationInput { setup, ops })
    }
}

impl DestinationInput {
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = &self.setup;
        let mut o = Out::default();
        o.u8(s.page_size).u8(s.flags).u8(s.max_requests).u8(s.batch).u8(s.max_device_state);
        for op in &self.ops {
            op.write(&mut o);
        }
        o.0
    }
}

impl DestinationSetup {
    pub fn page_size(&self) -> u32 {
        PAGE_SIZES[self.page_size as usize % PAGE_SIZES.len()]
    }

    pub fn config(&self) -> Config {
        Config {
            keepalive_interval: (self.flags & 1 != 0).then(|| Duration::from_secs(1)),
            peer_timeout: (self.flags & 2 != 0).then(|| Duration::from_secs(3)),
            start_timeout: if self.flags & 4 != 0 { Duration::from_secs(2) } else { Duration::from_secs(60) },
            max_outstanding_requests: u32::from(self.max_requests % 16) + 1,
            request_batch_pages: u32::from(self.batch % 8) + 1,
            max_device_state_bytes: u64::from(self.max_device_state) * 4,
            max_guest_pages: MAX_GUEST_PAGES,
            handshake_timeout: Duration::from_secs(2),
            // Flag bits 3-4: the push streams it accepts.
            push_streams: 1 + (self.flags >> 3) % 3,
            ..Config::default()
        }
    }
}

/// What a run saw, for the seed tests.
#[derive(Clone, Debug, Default)]
pub struct DestinationRunLog {
    pub states: Vec<DestinationState>,
    pub errors: Vec<MigrationError>,
    pub finished: Option<Result<(), MigrationError>>,
    pub frames_sent: Vec<Frame>,
    pub pages_installed: u64,
}

struct Driver {
    core: Destination,
    config: Config,
    page_size: u32,
    now: Timestamp,
    auto_load: bool,
    layout: Option<RamLayout>,
    present: BTreeSet<u64>,
    loading: bool,
    loaded: bool,
    resumed: bool,
    /// The migration ended on a page that never installed, with the guest
    /// here (kept paused by the driver).
    ended_with_guest_here: bool,
    finished: Option<bool>,
    decoder: Decoder,
    /// A welcome went out on the current return connection (`None`: not
    /// checked on this connection).
    welcomed: Option<bool>,
    report_next_word: u64,
    report: DestinationRunLog,
}

impl Driver {
    fn total(&self) -> u64 {
        self.layout.as_ref().map_or(0, RamLayout::total_pages)
    }

    fn connected(&mut self, channel: Channel) {
        let replacing = self.core.is_connected(channel);
        self.core.handle_connected(self.now, channel);
        if channel == Channel::Return && self.core.is_connected(channel) {
            self.decoder = Decoder::new();
            // A connection that silently replaced a live one carries on where
            // the old one was (the core's documented choice): no welcome first.
            self.welcomed = if replacing { None } else { Some(false) };
        }
    }

    fn loaded(&mut self, ok: bool) {
        let before = self.core.state();
        let result = if ok { Ok(()) } else { Err("the fuzzer failed the load".to_owned()) };
        let accepted = self.core.handle_device_state_loaded(self.now, result).is_ok();
        if accepted && before == DestinationState::LoadingDevice {
            assert!(self.loading, "the core loaded a device state it never handed over");
            self.loading = false;
            self.loaded = ok;
        }
    }

    fn process(&mut self) {
        while let Some(action) = self.core.poll_action() {
            if self.finished == Some(false) {
                assert!(
                    matches!(action, DestinationAction::Close(_) | DestinationAction::CloseConnection(_)),
                    "{action:?} after failing"
                );
                continue;
            }
            match action {
                DestinationAction::PrepareMemory(layout) => {
                    assert!(self.layout.is_none(), "memory prepared twice");
                    assert_eq!(layout.page_size(), self.page_size);
                    self.layout = Some(layout);
                }
                DestinationAction::InstallPage { page, data, overwrite } => {
                    assert!(page.0 < self.total(), "install of page {} outside the layout", page.0);
                    if let PageData::Bytes(bytes) = &data {
                        assert_eq!(bytes.len(), self.page_size as usize, "page of the wrong size installed");
                    }
                    let present = self.present.contains(&page.0);
                    assert!(!present || overwrite, "page {} installed over a present page", page.0);
                    if overwrite {
                        assert!(!self.resumed, "page {} overwritten after the guest ran here", page.0);
                    }
                    self.present.insert(page.0);
                    self.report.pages_installed += 1;
                }
                DestinationAction::PlacePagePart { page, .. } => {
                    assert!(page.0 < self.total(), "part of page {} outside the layout", page.0);
                    assert!(!self.present.contains(&page.0), "part placed into present page {}", page.0);
                }
                DestinationAction::InstallPlacedPage { page } => {
                    assert!(page.0 < self.total(), "install of page {} outside the layout", page.0);
                    assert!(!self.present.contains(&page.0), "page {} installed over a present page", page.0);
                    self.present.insert(page.0);
                    self.report.pages_installed += 1;
                }
                DestinationAction::DiscardPages { first, count } => {
                    assert!(!self.resumed, "pages discarded after the guest ran here");
                    let end = first.0.checked_add(count).expect("discard range overflows");
                    assert!(end <= self.total(), "discard past the layout");
                    let doomed: Vec<u64> = self.present.range(first.0..end).copied().collect();
                    for page in doomed {
                        self.present.remove(&page);
                    }
                }
                DestinationAction::LoadDeviceState(state) => {
                    assert!(!self.loading && !self.loaded && !self.resumed, "device state loaded twice");
                    assert!(state.len() as u64 <= self.config.max_device_state_bytes, "device state over its bound");
                    self.loading = true;
                    if self.auto_load {
                        self.loaded(true);
                    }
                }
                DestinationAction::ResumeVcpus => {
                    assert!(self.loaded, "guest resumed without its device state");
                    assert!(!self.resumed, "guest resumed twice");
                    self.resumed = true;
                }
                DestinationAction::Wake(page) => {
                    assert!(self.present.contains(&page.0), "wake for missing page {}", page.0);
                }
                DestinationAction::Close(_)
                | DestinationAction::PromoteConnection(_)
                | DestinationAction::CloseConnection(_) => {}
                // This target's destination does not take fallback terms.
                action @ (DestinationAction::FenceVcpus
                | DestinationAction::TakeCheckpoint { .. }
                | DestinationAction::DiscardGuest) => panic!("{action:?} without fallback"),
                DestinationAction::Farewell { channel, bytes } => {
                    assert_eq!(channel, Channel::Return);
                    assert!(!self.resumed, "a destination that ran the guest said farewell");
                    let frames = decode_all(&bytes);
                    assert!(
                        matches!(&frames[..], [Frame::Reject { .. } | Frame::GuestDropped { .. }]),
                        "farewell: {frames:?}"
                    );
                }
                DestinationAction::Notice(notice) => match notice {
                    Notice::Paused { reason } => self.report.errors.push(reason),
                    Notice::StrangerRefused { reason, .. } => self.report.errors.push(reason),
                    Notice::Recovered { .. } | Notice::ConnectionRefused { .. } => {}
                    other => panic!("the destination does not send {other:?}"),
                },
                DestinationAction::Finished(finished) => {
                    assert!(self.finished.is_none(), "finished twice");
                    match &finished.result {
                        Ok(()) => {
                            assert_eq!(finished.guest_on, Side::Destination);
                            assert!(self.resumed, "completed without running the guest");
                            assert_eq!(self.present.len() as u64, self.total(), "completed with pages missing");
                        }
                        Err(error) if finished.guest_on == Side::Destination => {
                            // Only a page that cannot be installed ends a
                            // migration whose guest may run here.
                            assert!(
                                matches!(error, MigrationError::InstallFailed { .. }),
                                "{error} with the guest here"
                            );
                            self.ended_with_guest_here = true;
                            self.report.errors.push(error.clone());
                        }
                        Err(error) => {
                            assert_eq!(finished.guest_on, Side::Source);
                            assert!(!self.resumed, "failed after running the guest");
                            self.report.errors.push(error.clone());
                            // The driver discards what it got.
                            self.present.clear();
                        }
                    }
                    self.finished = Some(finished.result.is_ok());
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
        let outstanding = self.core.outstanding_faults();
        assert!(outstanding <= bound, "{outstanding} faults outstanding, bound {bound}");
        assert_eq!(self.core.guest_started(), self.resumed, "guest_started() vs ResumeVcpus");
        if self.resumed && !self.ended_with_guest_here {
            assert!(
                matches!(
                    state,
                    DestinationState::Running
                        | DestinationState::Paused
                        | DestinationState::Recovering
                        | DestinationState::Completed
                ),
                "guest ran here, state {state}"
            );
        }
        match self.finished {
            Some(true) => assert_eq!(state, DestinationState::Completed),
            Some(false) => assert_eq!(state, DestinationState::Failed),
            None => assert!(!state.is_terminal(), "{state} without Finished"),
        }
        if self.finished != Some(false) {
            assert_eq!(self.core.pages_present(), self.present.len() as u64, "present pages: core vs memory");
            let total = self.total();
            if total <= 4096 {
                for page in 0..total {
                    let present = self.present.contains(&page);
                    assert_eq!(self.core.is_present(PageNumber(page)), present, "page {page} presence");
                    if present {
                        assert!(!self.core.is_outstanding(PageNumber(page)), "page {page} present and awaited");
                    }
                }
            }
        }
    }

    fn transmit(&mut self, channel: Channel, max_bytes: usize, urgent_only: bool) {
        let mut out = Vec::new();
        let urgent_only = urgent_only && channel == Channel::Return;
        let frames = if urgent_only {
            self.core.poll_transmit_urgent(self.now, &mut out, max_bytes)
        } else {
            self.core.poll_transmit(self.now, channel, &mut out, max_bytes)
        };
        assert_eq!(frames == 0, out.is_empty());
        if urgent_only {
            // The KVM driver's flush polls for urgent frames until a poll
            // writes nothing (the rest of a present report may queue the
            // EOC), then rings its return writer if return_bulk_pending says
            // so: bulk frames it did not announce would wait for nobody. On
            // a copy: the rest of that flush, then a full poll shows what
            // is left.
            let mut copy = self.core.clone();
            let mut left = Vec::new();
            while copy.poll_transmit_urgent(self.now, &mut left, usize::MAX) > 0 {
                left.clear();
            }
            let announced = copy.return_bulk_pending();
            let _ = copy.poll_transmit(self.now, Channel::Return, &mut left, usize::MAX);
            let mut decoder = Decoder::new();
            decoder.push(Bytes::from(left));
            let left = take_frames(&mut decoder, &"poll_transmit after poll_transmit_urgent");
            if let Some(frame) = left.iter().find(|f| is_bulk_return_frame(f)) {
                assert!(announced, "{frame:?} left unannounced by return_bulk_pending");
            }
        }
        if channel != Channel::Return {
            assert_eq!(frames, 0, "the destination writes only the return path");
            return;
        }
        self.decoder.push(Bytes::from(out));
        let decoded = take_frames(&mut self.decoder, &"poll_transmit");
        assert_eq!(decoded.len(), frames);
        for frame in decoded {
            assert!(!(urgent_only && is_bulk_return_frame(&frame)), "{frame:?} from the urgent poll");
            self.check_sent(&frame);
            self.report.frames_sent.push(frame);
        }
    }

    fn check_sent(&mut self, frame: &Frame) {
        match (frame, self.welcomed) {
            (_, None) | (Frame::Ping, _) => {}
            (Frame::Welcome(_), Some(welcomed)) => assert!(!welcomed, "two welcomes on one connection"),
            (_, Some(welcomed)) => assert!(welcomed, "{frame:?} before the welcome"),
        }
        match frame {
            Frame::Welcome(welcome) => {
                self.welcomed = self.welcomed.map(|_| true);
                assert_eq!(welcome.epoch, self.core.epoch());
                // What it says was true when it was queued, and stays true.
                assert!(!welcome.guest_started || self.resumed);
                assert!(!welcome.device_loaded || self.loaded);
                assert_eq!(welcome.max_outstanding_requests, self.config.max_outstanding_requests);
                self.report_next_word = 0;
            }
            Frame::Request(request) => {
                let layout = self.layout.as_ref().expect("request before the layout");
                for &index in &request.indexes {
                    let page = layout
                        .page_number(PageAddress { block: request.block, index })
                        .expect("request for a page of the layout");
                    assert!(!self.present.contains(&page.0), "request for present page {}", page.0);
                    assert!(self.core.is_outstanding(page), "request for page {} nobody awaits", page.0);
                }
                assert!(request.indexes.len() <= self.config.request_batch_pages as usize);
            }
            Frame::ReadyToRun => assert!(self.loaded, "ready to run before the device state loaded"),
            Frame::Eoc => {
                assert!(self.resumed, "EOC before the guest ran here");
                assert_eq!(self.present.len() as u64, self.total(), "EOC with pages missing");
            }
            Frame::PresentPages(report) => {
                assert_eq!(report.first_word, self.report_next_word, "present report out of order");
                for (j, &word) in report.words.iter().enumerate() {
                    let base = (report.first_word + j as u64) * 64;
                    for bit in 0..64 {
                        assert_eq!(word >> bit & 1 == 1, self.present.contains(&(base + bit)), "present report");
                    }
                }
                self.report_next_word += report.words.len() as u64;
            }
            Frame::PresentEnd { present_pages } => {
                assert_eq!(self.report_next_word, self.total().div_ceil(64), "present report incomplete");
                assert_eq!(*present_pages, self.present.len() as u64);
            }
            Frame::Ping => {}
            other => panic!("the destination sent {other:?}"),
        }
    }

    fn peer_frame(&mut self, channel: Channel, spec: &FrameSpec, split: usize) {
        let resume_hello = matches!(spec, FrameSpec::Hello { resume: true, .. });
        let ctx = Ctx {
            session: SESSION,
            // A peer may have opened with the last epoch: no resume can follow.
            epoch: self.core.epoch().saturating_add(u32::from(resume_hello)),
            page_size: self.page_size,
            layout: self.core.layout(),
            next_word: 0,
            present_seen: 0,
        };
        let frame = spec.build(&ctx);
        let (head, tail) = encode_split(&frame, split);
        debug_assert!(head.len() + tail.len() <= 8 + FrameKind::Page.max_payload() as usize);
        self.core.handle_input(self.now, channel, head);
        self.core.handle_input(self.now, channel, tail);
    }

    /// A peer connects and shows `frame` then `garbage`. One that shows
    /// another migration's id once a migration is bound must change nothing:
    /// the core stays equal to what it was and asks only to close it.
    fn stranger(&mut self, channel: Channel, other_session: bool, spec: &FrameSpec, garbage: &[u8]) {
        let session = if other_session { SESSION ^ 0xdead } else { SESSION };
        let ctx = Ctx {
            session,
            epoch: self.core.epoch().saturating_add(1),
            page_size: self.page_size,
            layout: self.core.layout(),
            next_word: 0,
            present_seen: 0,
        };
        let frame = spec.build(&ctx);
        // The id it shows: a hello's own (the spec may move it off `session`,
        // possibly onto the bound one).
        let shown = match &frame {
            Frame::Hello(hello) => hello.session,
            Frame::UrgentHello(hello) => hello.session,
            _ => session,
        };
        let mut bytes = Vec::new();
        wire::encode(&frame, &mut bytes);
        bytes.extend_from_slice(garbage);
        let bytes = Bytes::from(bytes);
        // A stranger is a peer with another id than the migration bound here
        // (an earlier hello, the fuzzer's "other" id included, may have bound
        // it): one with the bound id is the source.
        let stranger =
            self.core.session_id().is_some_and(|bound| bound != shown) && self.core.state() != DestinationState::Failed;
        let before = stranger.then(|| self.core.clone());
        let admission = self.core.handle_accepted(self.now, channel);
        match admission {
            Admission::Provisional(id) => {
                self.core.handle_provisional_input(self.now, id, bytes);
                self.core.handle_provisional_lost(self.now, id);
            }
            Admission::Current => self.core.handle_input(self.now, channel, bytes),
        }
        let Some(before) = before else { return };
        if channel == Channel::Return {
            // The return channel has no identity to show (see the core's
            // `handle_accepted`): a newcomer there is admitted as the source's.
            return;
        }
        let mut after = self.core.clone();
        while let Some(action) = after.poll_action() {
            assert!(
                matches!(
                    action,
                    DestinationAction::Close(_)
                        | DestinationAction::CloseConnection(_)
                        | DestinationAction::Notice(Notice::StrangerRefused { .. })
                ),
                "a stranger on {channel} made the destination do {action:?}"
            );
        }
        if admission == Admission::Current && self.core.is_connected(channel) {
            // Its bytes did not end a frame: it is still there, unproven.
            self.core.handle_connection_lost(self.now, channel);
            after = self.core.clone();
            while after.poll_action().is_some() {}
        }
        assert!(after == before, "a stranger on {channel} changed the destination");
    }

    fn step(&mut self, op: &DestinationEvent) {
        match op {
            DestinationEvent::Stranger { ch, other_session, frame, garbage } => {
                self.stranger(pick_channel(&MAIN_FIRST, *ch), *other_session, frame, garbage)
            }
            DestinationEvent::Connected(ch) => self.connected(pick_channel(&MAIN_FIRST, *ch)),
            DestinationEvent::ConnectionLost(ch) => {
                self.core.handle_connection_lost(self.now, pick_channel(&MAIN_FIRST, *ch))
            }
            DestinationEvent::Frame { ch, frame, split } => {
                self.peer_frame(pick_channel(&MAIN_FIRST, *ch), frame, *split as usize)
            }
            DestinationEvent::Bytes { ch, bytes } => {
                self.core.handle_input(self.now, pick_channel(&MAIN_FIRST, *ch), Bytes::from(bytes.clone()))
            }
            DestinationEvent::Transmit { ch, max_bytes } => {
                // The high bit: a flush of the urgent frames only, as the
                // KVM driver's threads other than the return writer do.
                self.transmit(pick_channel(&MAIN_FIRST, ch.wrapping_add(2)), *max_bytes as usize, ch & 0x80 != 0)
            }
            DestinationEvent::PageFault { page, waiter } => {
                let page = PageNumber(page.index_below(self.total()));
                let waiter = match waiter % 5 {
                    4 => Waiter::Vmm,
                    v => Waiter::Vcpu(u32::from(v)),
                };
                let _ = self.core.handle_page_fault(self.now, page, waiter);
            }
            DestinationEvent::DeviceStateLoaded { ok } => self.loaded(*ok),
            DestinationEvent::InstallFailed { page } => {
                let page = PageNumber(page.index_below(self.total()));
                let was_present = self.core.is_present(page);
                let state = self.core.state();
                match self.core.handle_install_failed(self.now, page, "the fuzzer failed the install".into()) {
                    // The page is gone from memory (a failed migration's
                    // memory is discarded when its Finished is processed).
                    Ok(()) if was_present && state != DestinationState::Failed => {
                        assert!(self.present.remove(&page.0), "the core had page {} that memory lacked", page.0);
                        assert!(!self.core.is_present(page), "page {} still present after failing", page.0);
                        assert!(!self.core.eoc_queued(), "EOC queued with page {} missing", page.0);
                    }
                    Ok(()) => {}
                    Err(EventError::InstallFailedAfterEnd { .. }) => {
                        assert_eq!(state, DestinationState::Completed, "a late failure before the end");
                    }
                    // A raw page number may lie past the guest's RAM.
                    Err(EventError::PageOutOfRange(p)) => {
                        assert!(p >= self.total(), "page {p} refused as out of range")
                    }
                    Err(e) => assert!(matches!(state, DestinationState::Listening), "refused in {state}: {e}"),
                }
            }
            DestinationEvent::Cancel => {
                let _ = self.core.handle_cancel(self.now);
            }
            DestinationEvent::Pause => {
                let state = self.core.state();
                if self.core.handle_pause(self.now).is_ok() {
                    assert!(
                        matches!(state, DestinationState::Running | DestinationState::Recovering),
                        "paused by the user in {state}"
                    );
                    assert_eq!(self.core.state(), DestinationState::Paused);
                    for channel in Channel::EVERY {
                        assert!(!self.core.is_connected(channel), "{channel} still up after a user's pause");
                    }
                }
            }
            DestinationEvent::Timer(v) => {
                self.now = if *v == 0 {
                    self.core.poll_timeout().unwrap_or(self.now + Duration::from_millis(1)).max(self.now)
                } else {
                    self.now + Duration::from_millis(u64::from(*v) * u64::from(*v))
                };
                self.core.handle_timeout(self.now);
            }
        }
    }
}

/// Runs the target on one input.
pub fn run(input: &DestinationInput) -> DestinationRunLog {
    let scope = Scope::begin(16 << 20);
    let config = input.setup.config();
    let page_size = input.setup.page_size();
    let mut driver = Driver {
        core: Destination::new(config.clone(), page_size),
        config,
        page_size,
        now: Timestamp::ZERO,
        auto_load: input.setup.flags & 8 != 0,
        layout: None,
        present: BTreeSet::new(),
        loading: false,
        loaded: false,
        resumed: false,
        ended_with_guest_here: false,
        finished: None,
        decoder: Decoder::new(),
        welcomed: Some(false),
        report_next_word: 0,
        report: DestinationRunLog::default(),
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

/// The return path's frames that only the full poll sends (checkpoints and
/// the end of copy behind them).
fn is_bulk_return_frame(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::CheckpointBegin(_)
            | Frame::CheckpointPage { .. }
            | Frame::CheckpointDevice { .. }
            | Frame::CheckpointEnd { .. }
            | Frame::Eoc
    )
}
