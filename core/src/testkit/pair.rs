//! Both hosts over in-memory links with a fake clock: every step is one
//! decision (transmit, deliver, lose, guest access, timer), so tests, the
//! property tests and the model checker can choose the interleaving.

use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::hash::{Hash, Hasher};

use super::hosts::{DestHost, SourceHost};
use super::oracle::{Oracle, Violation};
use crate::admission::Admission;
use crate::channel::Channel;
use crate::config::{Config, Mode};
use crate::destination::DestinationAction;
use crate::destination::{DestinationState, Waiter};
use crate::layout::{PageNumber, RamBlock, RamLayout};
use crate::outcome::Notice;
use crate::time::Timestamp;
use crate::wire::{self, Decoder, Frame, Hello, UrgentHello, WireMode};

/// What a pair is made of.
#[derive(Clone, Debug)]
pub struct PairConfig {
    pub config: Config,
    pub layout: RamLayout,
    pub session: u64,
    pub vcpus: u32,
    pub device_state: Bytes,
    /// Pages the destination's device-state load touches.
    pub device_pages: Vec<PageNumber>,
}

impl PairConfig {
    /// Page size of [`PairConfig::with_huge_pages`]'s block: 4 pages of the
    /// others, so that a page made of parts of two versions shows.
    pub const HUGE_PAGE_SIZE: u32 = 256;

    /// `pages` pages of 64 bytes, one vCPU, a small device state.
    pub fn new(config: Config, pages: u64) -> Self {
        let layout = RamLayout::single("ram", 64, pages).expect("a valid test layout");
        Self {
            config,
            layout,
            session: 0x5eed,
            vcpus: 1,
            device_state: Bytes::from_static(b"vcpu registers and devices"),
            device_pages: Vec::new(),
        }
    }

    /// `pages` pages of 64 bytes in a block "ram", then `huge_pages` pages
    /// of [`PairConfig::HUGE_PAGE_SIZE`] bytes in a block "huge" (the
    /// harness's huge pages). The huge pages are pushed in two parts each
    /// (as 2 MiB pages in parts with `--page-part`), so that a request can
    /// meet a page half pushed; set `config.page_part_bytes` to 0 after for
    /// whole pages.
    pub fn with_huge_pages(mut config: Config, pages: u64, huge_pages: u64) -> Self {
        config.page_part_bytes = Self::HUGE_PAGE_SIZE / 2;
        let mut cfg = Self::new(config, pages);
        let blocks = vec![
            RamBlock { name: "ram".into(), page_count: pages, page_size: 64 },
            RamBlock { name: "huge".into(), page_count: huge_pages, page_size: Self::HUGE_PAGE_SIZE },
        ];
        cfg.layout = RamLayout::new(64, blocks).expect("a valid test layout");
        cfg
    }
}

/// How a healed run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Both sides completed; every page on the destination is the newest.
    Completed,
    /// The destination completed and runs the guest; the source lost the
    /// Eoc and, every attempt refused once the destination had exited, left
    /// the guest to it (`MigrationError::DestinationGone`).
    CompletedSourceGaveUp,
    /// The migration was abandoned before the destination could run the
    /// guest (a loss or an error before StartGuest): the guest runs on the
    /// source with its newest content, the destination dropped its copy or,
    /// if its ReadyToRun had left, waits paused for a source that will not
    /// come back (it cannot tell that from a source past StartGuest).
    AbandonedOnSource,
    /// Fallback: the destination was lost (crashed, or silent past its
    /// lease) and the source took the guest back from the last committed
    /// checkpoint; the destination crashed, dropped its copy, or waits
    /// fenced (its vCPUs stopped), or never started the guest, for a source
    /// that will not come back.
    TookOver,
}

/// One channel's connection: bytes in flight, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Pipe {
    pub up: bool,
    pub in_flight: VecDeque<Bytes>,
    /// The writer closed after a farewell: deliver what is in flight, then
    /// report the connection lost.
    pub closing: bool,
    /// What this connection has carried, for the frame-order checks.
    pub order: FrameOrder,
}

/// Where one connection is in the frame order the protocol allows. The
/// same rules as the fuzz harnesses': every connection opens with its
/// hello (main, urgent) or the welcome (return), once; a present report
/// follows the welcome whole and in order, nothing inside it; nothing
/// follows an Eoc but keep-alives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrameOrder {
    /// The opening frame (hello, urgent hello, welcome) went out.
    opened: bool,
    /// A present report is under way: the next word it must carry.
    report_next_word: Option<u64>,
    /// The Eoc went out (return path).
    ended: bool,
}

impl FrameOrder {
    /// Checks `frame`, written next on a `channel` connection.
    pub fn check(&mut self, channel: Channel, frame: &Frame) -> Result<(), String> {
        let opening = match channel {
            Channel::Main => matches!(frame, Frame::Hello(_)),
            Channel::Urgent | Channel::Push(_) => matches!(frame, Frame::UrgentHello(_)),
            Channel::Return => matches!(frame, Frame::Welcome(_)),
        };
        if opening {
            if self.opened {
                return Err(format!("a second {} on one connection", frame.kind()));
            }
            self.opened = true;
            return Ok(());
        }
        // Keep-alives may go out on a return path before its welcome (the
        // source ignores them), never before a hello.
        if matches!(frame, Frame::Ping) && (self.opened || channel == Channel::Return) {
            return Ok(());
        }
        if !self.opened {
            return Err(format!("{} before the connection's opening frame", frame.kind()));
        }
        // With fallback the destination keeps its lease after the Eoc
        // until the source releases the guest.
        if self.ended && !matches!(frame, Frame::LeaseRequest { .. } | Frame::ReleaseAck) {
            return Err(format!("{} after the Eoc", frame.kind()));
        }
        match (frame, self.report_next_word) {
            (Frame::PresentPages(report), next) => {
                let expected = next.unwrap_or(0);
                if report.first_word != expected {
                    return Err(format!("present report word {} where {expected} was due", report.first_word));
                }
                self.report_next_word = Some(expected + report.words.len() as u64);
            }
            (Frame::PresentEnd { .. }, Some(_)) => self.report_next_word = None,
            (Frame::PresentEnd { .. }, None) => return Err("PresentEnd without a present report".into()),
            (_, Some(_)) => return Err(format!("{} inside a present report", frame.kind())),
            (Frame::Eoc, None) => self.ended = true,
            (_, None) => {}
        }
        Ok(())
    }
}

impl Pipe {
    pub fn bytes_in_flight(&self) -> usize {
        self.in_flight.iter().map(Bytes::len).sum()
    }
}

/// A source and a destination joined by a pipe per channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pair {
    pub now: Timestamp,
    pub src: SourceHost,
    pub dst: DestHost,
    pub pipes: [Pipe; Channel::COUNT],
    pub oracle: Oracle,
    /// A destination vCPU's access waiting for its page: `(page, write)`.
    pub blocked: Vec<Option<(PageNumber, bool)>>,
    /// Whether connection attempts succeed (false: a partition).
    pub connect_allowed: bool,
    /// Whether any connection was lost (invariant 4 allows re-sends then).
    pub any_loss: bool,
    /// Page frames written to the wire, per page (read from the bytes, so
    /// it is part of the pair's identity, unlike the cores' statistics).
    pub page_crossings: Vec<u32>,
    /// Per page pushed in parts, a bit for each part written (a part
    /// written twice counts as a second crossing of its page).
    pub part_crossings: BTreeMap<u64, u64>,
    /// The destination process finished and exited: nothing listens any
    /// more, connection attempts are refused.
    pub dst_gone: bool,
    /// The destination process crashed (fallback): its core does nothing
    /// more, its guest is gone.
    pub dst_crashed: bool,
    /// The destination's clock runs slower than the source's (the pair's)
    /// by this many parts per million: the worst case a fallback drift
    /// bound allows for the lease (its lapse comes as late as it may).
    pub dst_slow_ppm: u32,
    /// Fallback: the guest's image (newest version of every page) at each
    /// instant the source may restart it from: checkpoint 0 is the stop,
    /// then each checkpoint taken and not yet superseded by a commit.
    pub images: Vec<(u64, Vec<u64>)>,
    pub violations: Vec<Violation>,
}

impl Pair {
    /// Builds both hosts and starts the migration.
    pub fn new(cfg: PairConfig) -> Self {
        let pages = cfg.layout.total_pages();
        let page_size = cfg.layout.page_size();
        let layout_blocks = cfg.layout.blocks().to_vec();
        let src = SourceHost::new(cfg.config.clone(), cfg.layout, cfg.session, cfg.device_state.clone());
        let mut dst = DestHost::new(cfg.config, page_size, cfg.device_state, cfg.device_pages);
        // The destination backs each block with the source's page size.
        for block in layout_blocks.iter().filter(|b| b.page_size != page_size) {
            dst.core.expect_block_page_size(&block.name, block.page_size);
        }
        let mut pair = Pair {
            now: Timestamp::ZERO,
            src,
            dst,
            pipes: Default::default(),
            oracle: Oracle::new(pages),
            blocked: vec![None; cfg.vcpus as usize],
            connect_allowed: true,
            any_loss: false,
            page_crossings: vec![0; pages as usize],
            part_crossings: BTreeMap::new(),
            dst_gone: false,
            dst_crashed: false,
            dst_slow_ppm: 0,
            images: Vec::new(),
            violations: Vec::new(),
        };
        if let Err(error) = pair.src.core.handle_start(pair.now) {
            pair.violations.push(Violation::DriverEvent { error: error.to_string() });
        }
        pair.settle();
        pair
    }

    pub fn pages(&self) -> u64 {
        self.oracle.pages()
    }

    /// Whether both sides finished.
    pub fn finished(&self) -> bool {
        self.src.finished_ok.is_some() && self.dst.finished_ok.is_some()
    }

    /// Whether both sides completed.
    pub fn completed(&self) -> bool {
        self.src.finished_ok == Some(true) && self.dst.finished_ok == Some(true)
    }

    /// Carries out actions and link requests until nothing is pending.
    pub fn settle(&mut self) {
        loop {
            self.src.process(self.now);
            if !self.dst_crashed {
                self.dst.process(self.dst_now());
            }
            self.record_fallback_images();
            self.retry_blocked();
            let src_links = std::mem::take(&mut self.src.links);
            let dst_links = std::mem::take(&mut self.dst.links);
            if src_links.connect.is_empty() && src_links.close.is_empty() && dst_links.close.is_empty() {
                break;
            }
            for (channel, farewell) in src_links.close.into_iter().chain(dst_links.close) {
                self.close(channel, farewell);
            }
            for channel in src_links.connect {
                self.connect(channel);
            }
        }
        self.collect_violations();
    }

    /// The destination's clock: the pair's, slowed by `dst_slow_ppm`.
    pub fn dst_now(&self) -> Timestamp {
        let ppm = u128::from(self.dst_slow_ppm);
        Timestamp((u128::from(self.now.0) * 1_000_000 / (1_000_000 + ppm)) as u64)
    }

    /// When the pair's clock shows the destination's `at`.
    fn dst_deadline(&self, at: Timestamp) -> Timestamp {
        let ppm = u128::from(self.dst_slow_ppm);
        let real = (u128::from(at.0) * (1_000_000 + ppm)).div_ceil(1_000_000);
        Timestamp(u64::try_from(real).unwrap_or(u64::MAX))
    }

    /// Fallback bookkeeping after the hosts acted: the guest's image at a
    /// stop or a checkpoint, and a takeover checked against the image of
    /// the checkpoint it restarts from (invariant 7), after which the
    /// guest's history is that image's.
    fn record_fallback_images(&mut self) {
        if std::mem::take(&mut self.src.stopped_now) && self.src.core.config().fallback.is_some() {
            self.images = vec![(0, self.oracle.image())];
        }
        for seq in std::mem::take(&mut self.dst.checkpoints_taken) {
            self.images.push((seq, self.oracle.image()));
        }
        let committed = self.src.core.committed_checkpoint();
        self.images.retain(|(seq, _)| *seq >= committed);
        let Some((checkpoint, device_state)) = self.src.took_over_now.take() else { return };
        let expected_device = if checkpoint == 0 {
            self.src.device_state.clone()
        } else {
            super::hosts::checkpoint_device_state(checkpoint)
        };
        if device_state != expected_device {
            self.violations.push(Violation::RollbackDeviceState { checkpoint });
        }
        let Some(image) = self.images.iter().find(|(seq, _)| *seq == checkpoint).map(|(_, image)| image.clone()) else {
            self.violations.push(Violation::RollbackDeviceState { checkpoint });
            return;
        };
        for (page, (&found, &expected)) in self.src.guest.versions.iter().zip(&image).enumerate() {
            if found != expected {
                self.violations.push(Violation::RollbackMismatch { checkpoint, page: page as u64, expected, found });
                break;
            }
        }
        self.oracle.roll_back(&image);
    }

    /// The destination process crashes (kill -9, power): its guest and
    /// core are gone, its connections reset, nothing listens any more.
    /// Returns whether it was alive.
    pub fn crash_destination(&mut self) -> bool {
        if self.dst_crashed {
            return false;
        }
        self.dst_crashed = true;
        self.dst_gone = true;
        self.dst.running = false;
        for channel in Channel::ALL {
            let pipe = &mut self.pipes[channel.index()];
            if pipe.up {
                self.any_loss |= !pipe.in_flight.is_empty();
                *pipe = Pipe::default();
                self.src.core.handle_connection_lost(self.now, channel);
            }
        }
        self.settle();
        true
    }

    fn connect(&mut self, channel: Channel) {
        if self.dst_gone {
            self.src.core.handle_connect_refused(self.now, channel);
            return;
        }
        if !self.connect_allowed {
            self.src.core.handle_connect_failed(self.now, channel);
            return;
        }
        let dst_now = self.dst_now();
        let pipe = &mut self.pipes[channel.index()];
        if pipe.up {
            // A new connection replaces the old one: the old one is gone.
            self.any_loss |= !pipe.in_flight.is_empty();
            pipe.in_flight.clear();
            pipe.closing = false;
            self.dst.core.handle_connection_lost(dst_now, channel);
        }
        *pipe = Pipe { up: true, ..Pipe::default() };
        self.src.core.handle_connected(self.now, channel);
        self.dst.core.handle_connected(self.dst_now(), channel);
    }

    fn close(&mut self, channel: Channel, farewell: Option<Bytes>) {
        let pipe = &mut self.pipes[channel.index()];
        if !pipe.up {
            return;
        }
        match farewell {
            Some(bytes) if !pipe.closing => {
                pipe.in_flight.push_back(bytes);
                pipe.closing = true;
            }
            _ => self.drop_pipe(channel),
        }
    }

    /// The connection is gone for both sides, with whatever was in flight.
    fn drop_pipe(&mut self, channel: Channel) {
        let pipe = &mut self.pipes[channel.index()];
        // Bytes still in flight are lost with the connection, whoever closed
        // it (a core timing out closes it too): re-sends are allowed then.
        self.any_loss |= !pipe.in_flight.is_empty();
        pipe.up = false;
        pipe.closing = false;
        pipe.in_flight.clear();
        self.src.core.handle_connection_lost(self.now, channel);
        self.dst.core.handle_connection_lost(self.dst_now(), channel);
    }

    /// The destination, finished, exits: its connections close with it and
    /// nothing listens from now on. Returns whether it had finished.
    pub fn destination_exits(&mut self) -> bool {
        if self.dst.finished_ok.is_none() || self.dst_gone {
            return false;
        }
        self.dst_gone = true;
        for channel in Channel::EVERY {
            if self.pipes[channel.index()].up {
                self.drop_pipe(channel);
            }
        }
        self.settle();
        true
    }

    /// The writer of `channel` appends up to `max_bytes` (at least one
    /// frame). Returns whether anything was written.
    pub fn transmit(&mut self, channel: Channel, max_bytes: usize) -> bool {
        let pipe = &self.pipes[channel.index()];
        if !pipe.up || pipe.closing {
            return false;
        }
        let mut out = Vec::new();
        let frames = if channel.is_from_source() {
            self.src.core.poll_transmit(self.now, channel, &mut out, max_bytes, &self.src.guest)
        } else {
            self.dst.core.poll_transmit(self.dst_now(), channel, &mut out, max_bytes)
        };
        self.src.observe();
        if frames == 0 {
            self.settle();
            return false;
        }
        let out = Bytes::from(out);
        if channel.is_from_source() {
            self.count_crossings(&out);
        }
        self.check_frame_order(channel, &out);
        self.pipes[channel.index()].in_flight.push_back(out);
        self.settle();
        true
    }

    /// Checks the frames in `bytes`, written on `channel`'s connection, against
    /// the order the protocol allows.
    fn check_frame_order(&mut self, channel: Channel, bytes: &Bytes) {
        let mut decoder = Decoder::new();
        decoder.push(bytes.clone());
        while let Ok(Some(frame)) = decoder.next_frame() {
            if let Err(detail) = self.pipes[channel.index()].order.check(channel, &frame) {
                self.violations.push(Violation::FrameOrder { channel, detail });
                return;
            }
        }
    }

    /// Counts the page frames in `bytes` (whole frames written by the
    /// source): a page frame is a crossing of its page, and so are the
    /// first part of a page pushed in parts and any part written again.
    fn count_crossings(&mut self, bytes: &Bytes) {
        let mut decoder = Decoder::new();
        decoder.push(bytes.clone());
        while let Ok(Some(frame)) = decoder.next_frame() {
            let (address, crossed) = match frame {
                Frame::Page(page) => (page.address, true),
                Frame::PagePart(part) => {
                    let number = self.src.core.layout().page_number(part.address);
                    let bit = 1u64.checked_shl(part.offset / part.data.len().max(1) as u32).unwrap_or(0);
                    let mask = self.part_crossings.entry(number.map_or(u64::MAX, |n| n.0)).or_default();
                    let crossed = *mask == 0 || *mask & bit != 0 || bit == 0;
                    *mask |= bit;
                    (part.address, crossed)
                }
                _ => continue,
            };
            let number = self.src.core.layout().page_number(address);
            match number.and_then(|n| self.page_crossings.get_mut(n.0 as usize)) {
                Some(count) => *count += u32::from(crossed),
                None => self.violations.push(Violation::CorruptPage { page: u64::from(address.index) }),
            }
        }
    }

    /// Delivers up to `max_bytes` of what is in flight on `channel` (the
    /// oldest bytes first). Returns whether anything was delivered.
    pub fn deliver(&mut self, channel: Channel, max_bytes: usize) -> bool {
        let pipe = &mut self.pipes[channel.index()];
        let Some(front) = pipe.in_flight.front_mut() else {
            return false;
        };
        let bytes = if front.len() > max_bytes.max(1) {
            front.split_to(max_bytes.max(1))
        } else {
            pipe.in_flight.pop_front().unwrap_or_default()
        };
        if channel.is_from_source() {
            self.dst.core.handle_input(self.dst_now(), channel, bytes);
        } else {
            self.src.core.handle_input(self.now, channel, bytes);
        }
        let pipe = &self.pipes[channel.index()];
        if pipe.closing && pipe.in_flight.is_empty() {
            self.drop_pipe(channel);
        }
        self.settle();
        true
    }

    /// The network loses `channel`'s connection and what is in flight on it.
    /// A peer of another migration connects to the destination on
    /// `channel`, shows its own hello (or `garbage`), and goes. The
    /// destination must end exactly as it was, having asked only to close
    /// that connection; anything else is a
    /// [`Violation::StrangerChangedState`]. The source sees nothing of it.
    pub fn stranger(&mut self, channel: Channel, garbage: bool) {
        let session = self.src.core.session() ^ 1;
        let frame = match channel {
            _ if garbage => None,
            Channel::Main => Some(Frame::Hello(Hello {
                resume: true,
                urgent_channel: false,
                session,
                epoch: self.dst.core.epoch().saturating_add(1),
                page_size: self.src.core.layout().page_size(),
                mode: WireMode::Postcopy,
                precopy_rounds: 0,
                blocks: self.src.core.layout().blocks().to_vec(),
                machine: Bytes::new(),
                push_streams: 1,
            })),
            _ => Some(Frame::UrgentHello(UrgentHello { session, epoch: self.dst.core.epoch() })),
        };
        let mut bytes = Vec::new();
        match frame {
            Some(frame) => wire::encode(&frame, &mut bytes),
            None => bytes.extend_from_slice(&[0x7f; 12]),
        }
        let before = self.dst.core.clone();
        let admission = self.dst.core.handle_accepted(self.dst_now(), channel);
        match admission {
            Admission::Provisional(id) => {
                self.dst.core.handle_provisional_input(self.dst_now(), id, Bytes::from(bytes));
                self.dst.core.handle_provisional_lost(self.dst_now(), id);
            }
            Admission::Current => {
                self.dst.core.handle_input(self.dst_now(), channel, Bytes::from(bytes));
                self.dst.core.handle_connection_lost(self.dst_now(), channel);
            }
        }
        let mut only_refused = true;
        while let Some(action) = self.dst.core.poll_action() {
            only_refused &= match action {
                DestinationAction::Close(c) => c == channel && admission == Admission::Current,
                DestinationAction::CloseConnection(_) => true,
                DestinationAction::Notice(Notice::StrangerRefused { .. }) => true,
                _ => false,
            };
        }
        if !only_refused || self.dst.core != before {
            self.violations.push(Violation::StrangerChangedState { channel });
        }
    }

    pub fn lose(&mut self, channel: Channel) -> bool {
        if !self.pipes[channel.index()].up {
            return false;
        }
        self.any_loss = true;
        self.drop_pipe(channel);
        self.settle();
        true
    }

    /// A vCPU of whichever side runs the guest touches `page`.
    pub fn guest_access(&mut self, vcpu: u32, page: PageNumber, write: bool) {
        if self.src.running {
            let current = self.src.guest.versions[page.0 as usize];
            if write {
                let version = self.oracle.write(page);
                self.src.guest.write(page, version);
            } else if current != self.oracle.latest(page) {
                self.violations.push(Violation::SourceStaleRead {
                    page: page.0,
                    expected: self.oracle.latest(page),
                    found: current,
                });
            }
        }
        if self.dst.running && self.blocked.get(vcpu as usize).is_some_and(|b| b.is_none()) {
            if self.dst.is_present(page) {
                self.dst_access(page, write);
            } else {
                self.blocked[vcpu as usize] = Some((page, write));
                if let Err(error) = self.dst.core.handle_page_fault(self.dst_now(), page, Waiter::Vcpu(vcpu)) {
                    self.violations.push(Violation::DriverEvent { error: error.to_string() });
                }
            }
        }
        self.settle();
    }

    fn dst_access(&mut self, page: PageNumber, write: bool) {
        if write {
            let version = self.oracle.write(page);
            self.dst.memory[page.0 as usize] = Some(version);
            if self.dst.dirty.len() > page.0 {
                self.dst.dirty.set(page.0);
            }
        } else {
            let found = self.dst.memory[page.0 as usize];
            let expected = self.oracle.latest(page);
            if found != Some(expected) {
                self.violations.push(Violation::StaleRead { page: page.0, expected, found });
            }
        }
    }

    /// Completes blocked accesses whose pages arrived.
    fn retry_blocked(&mut self) {
        if !self.dst.running {
            return;
        }
        for vcpu in 0..self.blocked.len() {
            if let Some((page, write)) = self.blocked[vcpu] {
                if self.dst.is_present(page) {
                    self.blocked[vcpu] = None;
                    self.dst_access(page, write);
                }
            }
        }
    }

    /// Advances the clock to the earliest armed timer and fires it.
    /// Returns whether a timer was armed.
    pub fn fire_timer(&mut self) -> bool {
        let dst_timeout =
            if self.dst_crashed { None } else { self.dst.core.poll_timeout().map(|at| self.dst_deadline(at)) };
        let next = match (self.src.core.poll_timeout(), dst_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(deadline) = next else { return false };
        self.now = self.now.max(deadline);
        self.src.core.handle_timeout(self.now);
        if !self.dst_crashed {
            self.dst.core.handle_timeout(self.dst_now());
        }
        self.settle();
        true
    }

    /// Checks the invariants that must hold at every step.
    pub fn check(&mut self) {
        if self.src.running && self.dst.running {
            self.violations.push(Violation::TwoRunners);
        }
        let pages = self.pages();
        if self.src.core.config().mode == Mode::Postcopy
            && !self.any_loss
            && self.page_crossings.iter().any(|&count| count > 1)
        {
            let sent = self.page_crossings.iter().map(|&count| u64::from(count)).sum();
            self.violations.push(Violation::PageSentTwice { sent, pages });
        }
        let limit = u64::from(self.src.core.config().max_outstanding_requests);
        let queued = self.src.core.urgent_queue_len() as u64;
        if queued > limit {
            self.violations.push(Violation::QueueOverBound {
                queue: "source urgent queue".into(),
                len: queued,
                bound: limit,
            });
        }
        let faults = self.dst.core.outstanding_faults() as u64;
        if faults > limit {
            self.violations.push(Violation::QueueOverBound {
                queue: "destination faults".into(),
                len: faults,
                bound: limit,
            });
        }
        // After a takeover the guest's history is the source's (rolled
        // back): a completed destination's copy is not the guest any more.
        if self.dst.core.state() == DestinationState::Completed && !self.src.core.took_over() {
            self.check_destination_memory();
        }
        self.collect_violations();
    }

    /// Every page present with the newest version (at completion).
    pub fn check_destination_memory(&mut self) {
        for page in 0..self.pages() {
            let expected = self.oracle.latest(PageNumber(page));
            let found = self.dst.memory.get(page as usize).copied().flatten();
            if found != Some(expected) {
                self.violations.push(Violation::WrongPageAtEnd { page, expected, found });
                return;
            }
        }
    }

    fn collect_violations(&mut self) {
        self.violations.append(&mut self.src.violations);
        self.violations.append(&mut self.dst.violations);
    }

    /// Runs fairly (every channel drained in turn, timers fired when idle, no
    /// new faults or losses) until both sides finish, for at most `max_steps`.
    /// Then checks that both completed with every page in place.
    pub fn run_to_completion(&mut self, max_steps: usize) -> Result<Outcome, Violation> {
        self.connect_allowed = true;
        for _ in 0..max_steps {
            if self.finished() {
                break;
            }
            // A step that moves no bytes may still move a core (a precopy
            // round over pages all sent ends with a dirty-log sync only).
            let before = self.cores_hash();
            let mut progress = false;
            for channel in Channel::EVERY {
                progress |= self.transmit(channel, 1 << 16);
                while self.deliver(channel, usize::MAX) {
                    progress = true;
                }
            }
            progress |= self.cores_hash() != before;
            self.check();
            if let Some(violation) = self.violations.first() {
                return Err(violation.clone());
            }
            if !progress && !self.fire_timer() {
                break;
            }
        }
        self.check_outcome()
    }

    fn cores_hash(&self) -> u64 {
        let mut hasher = std::hash::DefaultHasher::new();
        self.src.core.hash(&mut hasher);
        self.dst.core.hash(&mut hasher);
        hasher.finish()
    }

    /// Fallback: the source took the guest back. It runs it, with the
    /// content of the guest's history (rolled back to the checkpoint); the
    /// destination runs nothing.
    fn check_took_over(&mut self) -> Result<Outcome, Violation> {
        let src_done = self.src.finished.0.as_ref().is_some_and(|f| {
            f.guest_on == crate::outcome::Side::Source
                && matches!(f.result, Err(crate::error::MigrationError::TookOver { .. }))
        });
        let dst_out = self.dst_crashed
            || self.dst.finished.0.as_ref().is_some_and(|f| {
                matches!(f.result, Err(crate::error::MigrationError::Superseded)) && f.guest_on == crate::outcome::Side::Source
            })
            || (self.dst.core.is_fenced() && !self.dst.running)
            // Its StartGuest was cut off: it never ran the guest, and only
            // a source that grants (this one never will again) could start it.
            || !self.dst.core.guest_started();
        if !src_done || !self.src.running || self.dst.running || !dst_out {
            return Err(Violation::NoProgress {
                detail: format!(
                    "after a takeover: source {} (running {}), destination {} (running {}, fenced {})",
                    self.src.core.state(),
                    self.src.running,
                    self.dst.core.state(),
                    self.dst.running,
                    self.dst.core.is_fenced()
                ),
            });
        }
        for page in 0..self.pages() {
            let expected = self.oracle.latest(PageNumber(page));
            let found = self.src.guest.versions[page as usize];
            if found != expected {
                return Err(Violation::SourceStaleRead { page, expected, found });
            }
        }
        Ok(Outcome::TookOver)
    }

    /// After a healed run: both completed with every page newest, or both
    /// gave up before the destination ran the guest; and no violation.
    pub fn check_outcome(&mut self) -> Result<Outcome, Violation> {
        self.check();
        if let Some(violation) = self.violations.first() {
            return Err(violation.clone());
        }
        let failure = |side: &str, error: String| Violation::MigrationFailed { side: side.into(), error };
        if self.src.core.took_over() {
            return self.check_took_over();
        }
        match (self.src.finished_ok, self.dst.finished_ok) {
            (Some(true), Some(true)) => {
                self.check_destination_memory();
                self.violations.first().cloned().map_or(Ok(Outcome::Completed), Err)
            }
            (Some(false), Some(true))
                if self.dst_gone
                    && !self.src.running
                    && self.src.finished.0.as_ref().is_some_and(|f| {
                        f.guest_on == crate::outcome::Side::Destination
                            && matches!(f.result, Err(crate::error::MigrationError::DestinationGone { .. }))
                    }) =>
            {
                self.check_destination_memory();
                self.violations.first().cloned().map_or(Ok(Outcome::CompletedSourceGaveUp), Err)
            }
            (Some(false), dst)
                if !self.src.past_start
                    && self.src.running
                    && !self.dst.running
                    && (dst == Some(false)
                        || matches!(self.dst.core.state(), DestinationState::Paused | DestinationState::Listening)) =>
            {
                for page in 0..self.pages() {
                    let expected = self.oracle.latest(PageNumber(page));
                    let found = self.src.guest.versions[page as usize];
                    if found != expected {
                        return Err(Violation::SourceStaleRead { page, expected, found });
                    }
                }
                Ok(Outcome::AbandonedOnSource)
            }
            (Some(false), _) => {
                let error = self.src.finished.0.as_ref().map(|f| format!("{:?}", f.result)).unwrap_or_default();
                Err(failure("source", error))
            }
            (_, Some(false)) => {
                let error = self.dst.finished.0.as_ref().map(|f| format!("{:?}", f.result)).unwrap_or_default();
                Err(failure("destination", error))
            }
            (src, dst) => Err(Violation::NoProgress {
                detail: format!(
                    "source {} ({src:?}), destination {} ({dst:?})",
                    self.src.core.state(),
                    self.dst.core.state()
                ),
            }),
        }
    }
}
