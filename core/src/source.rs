//! The source side: the guest runs here at the start.
//!
//! # States
//!
//! The seed's states (`ACTIVE`, `EOC_RECEIVED`, `ALL_PAGES_SENT`,
//! `COMPLETED`, `ERROR_RECEIVE`) are kept, with what precopy, a safe
//! switchover and recovery need around them. Every arrow is an event named
//! on it.
//!
//! ```text
//!  handle_start
//!       |
//!       v
//!  Connecting --all channels connected--> Handshake --Welcome--+----------------------+
//!                                                              | hybrid               | postcopy
//!                                                              v                      |
//!              +--dirty log synced, rounds left-- DirtySync <-- Precopy               |
//!              +-----------------------------------------------^  | last round done   |
//!                                                                 | or switch command |
//!                                                                 v                   v
//!                                                   Stopping (StopVcpus issued) <-----+
//!                                                        | vcpus stopped
//!                                                        v (hybrid: FinalSync first)
//!                Switchover: stale discards + device state sent, requests served;
//!                the guest can still come back here (loss, GuestDropped, cancel)
//!                        | ReadyToRun received, StartGuest transmitted
//!                        v
//!   +-------------> ACTIVE --every page sent--> ALL_PAGES_SENT --Eoc--> COMPLETED
//!   |                  | Eoc                                               ^
//!   |                  v                                                   |
//!   |             EOC_RECEIVED --EndOfStream transmitted-------------------+
//!   |
//!   |  after StartGuest: a lost connection --> PAUSED; bad bytes --> ERROR_RECEIVE
//!   |  PAUSED / ERROR_RECEIVE --retry timer, all channels connected--> RECOVERING
//!   +-- RECOVERING: Welcome, PresentPages..., PresentEnd (lost again: PAUSED)
//!
//!  PAUSED / ERROR_RECEIVE, every attempt refused for destination_gone_timeout
//!  (the destination finished and exited) --> Failed, the guest left to the
//!  destination: never resumed here.
//!
//!  Before StartGuest is transmitted, any failure ends in Failed with the
//!  guest running on the source (ResumeVcpus if it was stopped).
//! ```
//!
//! # Driving it
//!
//! Feed events with the `handle_*` methods, then drain [`Source::poll_action`]
//! and call [`Source::poll_transmit`] for every writable channel, and arm a
//! timer for [`Source::poll_timeout`]. Time is always an argument.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;

use crate::bitmap::{Bitmap, SearchBitmap};
use crate::channel::Channel;
use crate::config::{Config, Mode};
use crate::error::{EventError, MigrationError, ProtocolError};
use crate::fallback::{Digest, FallbackConfig};
use crate::layout::{PageAddress, PageNumber, RamLayout};
use crate::link::Link;
use crate::outcome::{Finished, Notice, Side};
use crate::stats::{Observed, PhaseClock, SourceStats};
use crate::time::Timestamp;
use crate::timer::{Timer, TimerTable};
use crate::wire::{
    self, CheckpointBegin, FallbackTerms, Frame, Hello, PageData, PageKind, UrgentHello, Welcome, WireMode,
    MAX_DISCARD_RANGES,
};

/// Read access to the guest's RAM on the source.
pub trait GuestMemory {
    /// Copies page `page` into `out`, which is exactly one page of its
    /// block long.
    fn read_page(&self, page: PageNumber, out: &mut [u8]);

    /// Copies `out.len()` bytes of page `page` (`page_size` bytes long),
    /// from byte `offset` of it, into `out`: a part of a page pushed in
    /// parts. The default reads the whole page; a driver reads the part
    /// alone.
    fn read_page_part(&self, page: PageNumber, page_size: usize, offset: usize, out: &mut [u8]) {
        let mut whole = vec![0; page_size];
        self.read_page(page, &mut whole);
        if let Some(part) = whole.get(offset..offset + out.len()) {
            out.copy_from_slice(part);
        }
    }

    /// Whether page `page` (`page_size` bytes, its block's) is all zeros. Used by
    /// [`Source::poll_transmit_deferred`], which decides a frame's shape
    /// before its payload is read; the default reads the page. A driver
    /// overrides it with a check that stops at the first non-zero byte.
    fn is_zero_page(&self, page: PageNumber, page_size: usize) -> bool {
        let mut bytes = vec![0; page_size];
        self.read_page(page, &mut bytes);
        wire::is_zero_page(&bytes)
    }
}

/// A page payload that [`Source::poll_transmit_deferred`] reserved but did
/// not read: the page's bytes go at `offset` of the output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeferredPage {
    pub offset: usize,
    pub page: PageNumber,
    /// The payload's length: its block's page size, or a part's length.
    pub len: usize,
    /// Where the payload starts in the page (0 unless it is a part).
    pub page_offset: usize,
    /// The page's length: its block's page size.
    pub page_size: usize,
}

impl DeferredPage {
    /// Reads every page of `deferred` from `guest` into its room in `out`
    /// (the buffer [`Source::poll_transmit_deferred`] wrote; an entry that
    /// does not fit in `out` is skipped).
    pub fn fill_all(deferred: &[DeferredPage], out: &mut [u8], guest: &(impl GuestMemory + ?Sized)) {
        for d in deferred {
            let room = d.offset.checked_add(d.len).and_then(|end| out.get_mut(d.offset..end));
            debug_assert!(room.is_some(), "deferred page {} outside the buffer", d.page.0);
            match room {
                Some(room) if d.len == d.page_size => guest.read_page(d.page, room),
                Some(room) => guest.read_page_part(d.page, d.page_size, d.page_offset, room),
                None => {}
            }
        }
    }
}

/// Where a transmit poll writes: the frames, and either the guest pages
/// read into them at once or a list of payloads left to the caller.
struct Outbox<'a, G: ?Sized> {
    bytes: &'a mut Vec<u8>,
    guest: &'a G,
    deferred: Option<&'a mut Vec<DeferredPage>>,
}

/// Ranges per discard frame the source builds (well under the wire limit).
const DISCARD_RANGES_PER_FRAME: usize = 512;
const _: () = assert!(DISCARD_RANGES_PER_FRAME <= MAX_DISCARD_RANGES);

/// Where the source is in the migration. See the module docs for the diagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SourceState {
    Connecting,
    Handshake,
    Precopy,
    DirtySync,
    Stopping,
    FinalSync,
    Switchover,
    Active,
    EocReceived,
    AllPagesSent,
    Completed,
    ErrorReceive,
    Paused,
    Recovering,
    /// Fallback: every page is at the destination and `Released` is on its
    /// way (the source will never take the guest back once it left);
    /// waiting for the destination's `ReleaseAck`.
    Releasing,
    /// The guest runs on the source again after a loss before StartGuest
    /// (or, with fallback, after the source took it back);
    /// the source reconnects (a bounded number of times) only to tell the
    /// destination, which may be waiting after its ReadyToRun, to drop it.
    Withdrawing,
    Failed,
}

impl SourceState {
    /// Whether the destination may be running the guest (StartGuest was transmitted).
    pub fn after_start(self) -> bool {
        matches!(
            self,
            SourceState::Active
                | SourceState::EocReceived
                | SourceState::AllPagesSent
                | SourceState::Completed
                | SourceState::ErrorReceive
                | SourceState::Paused
                | SourceState::Recovering
                | SourceState::Releasing
        )
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, SourceState::Completed | SourceState::Failed)
    }
}

impl fmt::Display for SourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            SourceState::Connecting => "CONNECTING",
            SourceState::Handshake => "HANDSHAKE",
            SourceState::Precopy => "PRECOPY",
            SourceState::DirtySync => "DIRTY_SYNC",
            SourceState::Stopping => "STOPPING",
            SourceState::FinalSync => "FINAL_SYNC",
            SourceState::Switchover => "SWITCHOVER",
            SourceState::Active => "ACTIVE",
            SourceState::EocReceived => "EOC_RECEIVED",
            SourceState::AllPagesSent => "ALL_PAGES_SENT",
            SourceState::Completed => "COMPLETED",
            SourceState::ErrorReceive => "ERROR_RECEIVE",
            SourceState::Paused => "PAUSED",
            SourceState::Recovering => "RECOVERING",
            SourceState::Releasing => "RELEASING",
            SourceState::Withdrawing => "WITHDRAWING",
            SourceState::Failed => "FAILED",
        };
        f.write_str(name)
    }
}

/// What the source's driver must do.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SourceAction {
    /// Open a connection for this channel, then report
    /// [`Source::handle_connected`] or [`Source::handle_connect_failed`].
    Connect(Channel),
    /// Close this channel's connection; deliver nothing more from it.
    Close(Channel),
    /// Write `bytes` (a last frame telling the peer why), then close.
    Farewell { channel: Channel, bytes: Bytes },
    /// Stop every vCPU, then call [`Source::handle_vcpus_stopped`] with the
    /// device state.
    StopVcpus,
    /// Run the guest again on the source (the migration was abandoned before
    /// the destination could run it).
    ResumeVcpus,
    /// Read and clear the dirty log, then report it with
    /// [`Source::handle_dirty_bitmap`] and [`Source::handle_dirty_sync_complete`].
    SyncDirtyLog,
    /// Something worth telling the user.
    Notice(Notice),
    /// The migration is over; no more events are needed.
    Finished(Box<Finished<SourceStats>>),
    /// Fallback: a page of checkpoint `seq`. It belongs to the fallback
    /// image only once the checkpoint commits: stage it apart, or write it
    /// in place keeping what it overwrote (so that a discard puts that
    /// back). A page comes at most once per checkpoint, so either holds
    /// at most the guest.
    StageCheckpointPage { seq: u64, page: PageNumber, data: PageData },
    /// Fallback: checkpoint `seq` is whole: every page staged for it is
    /// now in the fallback image (the guest's memory as it was at the
    /// stop, plus the checkpoints committed before). Carry this out before
    /// any later action.
    CommitCheckpoint { seq: u64 },
    /// Fallback: checkpoint `seq` was cut off: drop what was staged (or put
    /// back what it overwrote); the fallback image is as it was.
    DiscardCheckpoint { seq: u64 },
    /// Fallback: the destination is lost. Load `device_state` and run the
    /// guest from the fallback image: the guest restarts at the instant of
    /// checkpoint `checkpoint` (0: the switchover's state, `device_state`
    /// then being the one captured at the stop).
    TakeOver { checkpoint: u64, device_state: Bytes },
}

/// Progress of reading the destination's present-page report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct RecoveryReport {
    welcome: Option<Welcome>,
    next_word: u64,
    present_seen: u64,
}

/// What the source knows of fallback (docs/fallback.md).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SourceFallback {
    config: FallbackConfig,
    /// When the last bytes from the destination arrived: the takeover wait
    /// counts from here.
    last_heard: Timestamp,
    /// The last checkpoint committed (0: none).
    committed: u64,
    /// The device state of the fallback image: captured at the stop, then
    /// each committed checkpoint's.
    image_device_state: Bytes,
    /// The checkpoint being received.
    staging: Option<Staging>,
    /// `Released` was transmitted: the destination may run the guest for
    /// good; never take it back.
    released: bool,
    /// The source took the guest back.
    took_over: bool,
    /// The epoch whose welcome was accepted: only frames of a welcomed
    /// return connection count as the destination's.
    welcomed_epoch: Option<u32>,
    /// The destination acknowledged `Released` (a release lost with a
    /// connection is sent again after the recovery).
    release_acked: bool,
}

/// A checkpoint being received: what its begin announced and what came.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Staging {
    seq: u64,
    pages: u64,
    pages_seen: u64,
    device_bytes: u32,
    device: Vec<u8>,
    digest: Digest,
}

/// Where the source is, with what only that state needs (the public
/// [`SourceState`] is its name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum State {
    Connecting,
    Handshake,
    Precopy,
    DirtySync,
    Stopping,
    /// The vCPUs are stopped; their device state waits for the last dirty log.
    FinalSync(Bytes),
    Switchover(Switchover),
    Active {
        end_of_stream_queued: bool,
    },
    EocReceived,
    AllPagesSent,
    Completed,
    ErrorReceive,
    Paused,
    Recovering(RecoveryReport),
    Releasing,
    /// Why the migration was abandoned.
    Withdrawing(MigrationError),
    Failed,
}

/// What the source sends between stopping the vCPUs and StartGuest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Switchover {
    /// Next page to examine when streaming discard frames.
    discard_cursor: u64,
    /// Device state still to send; `None` once its last chunk left.
    device_state: Option<Bytes>,
    /// The destination is ready and StartGuest is queued.
    start_queued: bool,
}

impl State {
    fn kind(&self) -> SourceState {
        match self {
            State::Connecting => SourceState::Connecting,
            State::Handshake => SourceState::Handshake,
            State::Precopy => SourceState::Precopy,
            State::DirtySync => SourceState::DirtySync,
            State::Stopping => SourceState::Stopping,
            State::FinalSync(_) => SourceState::FinalSync,
            State::Switchover(_) => SourceState::Switchover,
            State::Active { .. } => SourceState::Active,
            State::EocReceived => SourceState::EocReceived,
            State::AllPagesSent => SourceState::AllPagesSent,
            State::Completed => SourceState::Completed,
            State::ErrorReceive => SourceState::ErrorReceive,
            State::Paused => SourceState::Paused,
            State::Recovering(_) => SourceState::Recovering,
            State::Releasing => SourceState::Releasing,
            State::Withdrawing(_) => SourceState::Withdrawing,
            State::Failed => SourceState::Failed,
        }
    }
}

/// A page sent in parts (see [`Config::page_part_bytes`]): the next part
/// to send starts at byte `next`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PartPush {
    page: PageNumber,
    page_size: usize,
    part_len: usize,
    next: usize,
    /// The page was lost with a connection: its parts count as re-sent.
    resent: bool,
}

/// The source's state machine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Source {
    config: Config,
    layout: RamLayout,
    session: u64,
    epoch: u32,
    state: State,
    links: [Link; Channel::COUNT],
    /// Bit k: push stream k's connection still has its stream hello to send.
    stream_hellos_due: u8,
    /// Sent in the current phase and not known lost.
    sent: SearchBitmap,
    /// In `urgent_queue` (requested, not yet sent).
    queued: Bitmap,
    /// Sent in precopy and dirtied since: the destination's copy is stale.
    stale: Bitmap,
    /// Lost with a connection: the next copy counts as re-sent.
    lost: Bitmap,
    urgent_queue: VecDeque<PageNumber>,
    /// The page the background push is sending in parts, if any.
    pushing: Option<PartPush>,
    /// Pages requested while the push was sending their parts: the parts
    /// not yet sent go on the urgent channel (each part crosses once).
    rushing: VecDeque<PartPush>,
    /// Where the precopy scan or background push continues.
    cursor: u64,
    round: u32,
    switch_requested: bool,
    precopy_sent_any: bool,
    main_control: VecDeque<Frame>,
    urgent_control: VecDeque<Frame>,
    peer_max_requests: u32,
    attempt: u32,
    timers: TimerTable,
    actions: VecDeque<SourceAction>,
    clock: Observed<PhaseClock>,
    stats: Observed<SourceStats>,
    /// Opaque description of the machine, carried in the hello.
    machine: Bytes,
    /// Paused: since when every reconnection attempt was refused.
    refused_since: Option<Timestamp>,
    /// The user paused the migration: no reconnection attempt until
    /// [`Source::handle_resume`].
    held: bool,
    /// Fallback, when on.
    fallback: Option<SourceFallback>,
}

impl Source {
    /// A source for a guest with this RAM layout. `session` identifies the
    /// migration (random, chosen by the driver: the core has no randomness).
    pub fn new(config: Config, layout: RamLayout, session: u64) -> Self {
        let pages = layout.total_pages();
        let hybrid = matches!(config.mode, Mode::Hybrid { .. });
        let fallback = config.fallback.clone().map(|config| SourceFallback {
            config,
            last_heard: Timestamp::ZERO,
            committed: 0,
            image_device_state: Bytes::new(),
            staging: None,
            released: false,
            took_over: false,
            welcomed_epoch: None,
            release_acked: false,
        });
        let mut source = Source {
            sent: SearchBitmap::new(pages),
            queued: Bitmap::new(pages),
            stale: Bitmap::new(if hybrid { pages } else { 0 }),
            lost: Bitmap::new(0),
            config,
            layout,
            session,
            epoch: 0,
            state: State::Connecting,
            links: Default::default(),
            stream_hellos_due: 0,
            urgent_queue: VecDeque::new(),
            pushing: None,
            rushing: VecDeque::new(),
            cursor: 0,
            round: 0,
            switch_requested: false,
            precopy_sent_any: false,
            main_control: VecDeque::new(),
            urgent_control: VecDeque::new(),
            peer_max_requests: 0,
            attempt: 0,
            timers: TimerTable::default(),
            actions: VecDeque::new(),
            clock: Observed::default(),
            stats: Observed::default(),
            machine: Bytes::new(),
            refused_since: None,
            held: false,
            fallback,
        };
        source.update_bookkeeping_stat();
        source
    }

    /// Sets what the destination must build before the device state
    /// arrives (vCPU count, interrupt controller...): opaque bytes, at most
    /// [`wire::MAX_MACHINE_LEN`], sent in the hello and handed to the
    /// destination's driver with [`DestinationAction::PrepareMemory`](crate::DestinationAction).
    pub fn set_machine_description(&mut self, machine: Bytes) -> Result<(), EventError> {
        if machine.len() > wire::MAX_MACHINE_LEN {
            return Err(EventError::MachineDescriptionTooLong { len: machine.len(), max: wire::MAX_MACHINE_LEN });
        }
        self.machine = machine;
        Ok(())
    }

    // ----- getters -------------------------------------------------------

    pub fn state(&self) -> SourceState {
        self.state.kind()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The current reconnection attempt (recovery or withdrawal), counted
    /// from 1; 0 before the first.
    pub fn reconnect_attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether `page` has been sent (and not lost since).
    pub fn is_sent(&self, page: PageNumber) -> bool {
        self.sent.get(page.0)
    }

    /// Fallback: the last checkpoint committed (0: none yet, or fallback off).
    pub fn committed_checkpoint(&self) -> u64 {
        self.fallback.as_ref().map_or(0, |f| f.committed)
    }

    /// Fallback: whether `Released` left: from then on the guest is the
    /// destination's for good (as after COMPLETED without fallback).
    pub fn released(&self) -> bool {
        self.fallback.as_ref().is_some_and(|f| f.released)
    }

    /// Fallback: whether the source took the guest back.
    pub fn took_over(&self) -> bool {
        self.fallback.as_ref().is_some_and(|f| f.took_over)
    }

    pub fn pages_sent(&self) -> u64 {
        self.sent.count_ones()
    }

    /// Requested pages waiting to be sent.
    pub fn urgent_queue_len(&self) -> usize {
        self.urgent_queue.len()
    }

    /// Whether the channel's connection is up.
    pub fn is_connected(&self, channel: Channel) -> bool {
        self.links[channel.index()].up
    }

    /// Statistics so far.
    pub fn stats(&self, now: Timestamp) -> SourceStats {
        let mut stats = self.stats.0.clone();
        stats.phases = self.clock.0.times(now);
        stats
    }

    /// The channels this migration uses.
    pub fn channels(&self) -> impl Iterator<Item = Channel> + '_ {
        let withdrawing = self.state() == SourceState::Withdrawing;
        let streams = self.config.push_stream_count();
        Channel::EVERY.into_iter().filter(move |&c| match c {
            Channel::Main => true,
            // Telling the destination to drop the guest needs the main channel only.
            Channel::Return => !withdrawing,
            Channel::Urgent => self.config.urgent_channel && !withdrawing,
            Channel::Push(stream) => stream.number() < streams && !withdrawing,
        })
    }

    // ----- outputs -------------------------------------------------------

    /// The next thing the driver must do.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// When [`Source::handle_timeout`] must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    /// Appends frames for `channel` to `out` until it holds at least
    /// `max_bytes` (always at least one frame when one is ready). Returns the
    /// number of frames appended. Call it whenever the channel can take more
    /// bytes: pages are chosen as late as possible, so a slow channel applies
    /// back-pressure instead of filling a queue.
    #[must_use]
    pub fn poll_transmit(
        &mut self,
        now: Timestamp,
        channel: Channel,
        out: &mut Vec<u8>,
        max_bytes: usize,
        guest: &impl GuestMemory,
    ) -> usize {
        self.transmit(now, channel, &mut Outbox { bytes: out, guest, deferred: None }, max_bytes)
    }

    /// Like [`Source::poll_transmit`], but page payloads are not read: each
    /// non-zero page gets its bytes reserved in `out` and an entry in
    /// `deferred`, and the caller fills them in before sending `out`. This
    /// lets a driver that shares the source between threads read and hash
    /// pages without holding it; only [`GuestMemory::is_zero_page`] runs
    /// inside. The caller must fill every entry: the frames are already
    /// counted as sent.
    #[must_use]
    pub fn poll_transmit_deferred(
        &mut self,
        now: Timestamp,
        channel: Channel,
        out: &mut Vec<u8>,
        max_bytes: usize,
        guest: &impl GuestMemory,
        deferred: &mut Vec<DeferredPage>,
    ) -> usize {
        self.transmit(now, channel, &mut Outbox { bytes: out, guest, deferred: Some(deferred) }, max_bytes)
    }

    fn transmit(
        &mut self,
        now: Timestamp,
        channel: Channel,
        out: &mut Outbox<'_, impl GuestMemory + ?Sized>,
        max_bytes: usize,
    ) -> usize {
        if !self.links[channel.index()].up {
            return 0;
        }
        let mut frames = 0;
        while frames == 0 || out.bytes.len() < max_bytes {
            let written = match channel {
                Channel::Main => self.next_main_frame(now, out),
                Channel::Urgent => self.next_urgent_frame(now, out),
                Channel::Push(stream) => self.next_push_frame(stream.number(), out),
                Channel::Return => false,
            };
            if !written {
                break;
            }
            frames += 1;
            if !self.links[channel.index()].up {
                break;
            }
        }
        if frames > 0 && channel == Channel::Main && self.timers.is_armed(Timer::Keepalive) {
            self.arm_keepalive(now);
        }
        frames
    }

    // ----- events ----------------------------------------------------------

    /// Begins the migration: asks the driver to open the channels.
    pub fn handle_start(&mut self, now: Timestamp) -> Result<(), EventError> {
        if self.state() != SourceState::Connecting || self.timers.is_armed(Timer::Handshake) {
            return Err(self.wrong_state("start"));
        }
        self.clock.0.touch(now);
        self.timers.set(Timer::Handshake, now + self.config.handshake_timeout);
        self.connect_all();
        Ok(())
    }

    /// The connection for `channel` is up.
    pub fn handle_connected(&mut self, now: Timestamp, channel: Channel) {
        let link = &mut self.links[channel.index()];
        if !link.connecting {
            // Not asked for (or already given up on): refuse it.
            self.actions.push_back(SourceAction::Close(channel));
            return;
        }
        link.connected(now);
        self.refused_since = None;
        if channel == Channel::Return {
            self.heard_from_peer(now);
        }
        if !self.channels().all(|c| self.links[c.index()].up) {
            return;
        }
        let hello = self.hello();
        if self.state() == SourceState::Withdrawing {
            self.tell_destination_to_drop(now, hello);
            return;
        }
        self.main_control.push_back(Frame::Hello(hello));
        if let Some(fallback) = &self.fallback {
            let lease_ms = u32::try_from(fallback.config.lease.as_millis()).unwrap_or(u32::MAX).max(1);
            self.main_control
                .push_back(Frame::FallbackTerms(FallbackTerms { lease_ms, committed_checkpoint: fallback.committed }));
        }
        // Nothing went out on the main channel before its hello: idle since it came up.
        let main_up_since = self.links[Channel::Main.index()].connected_at;
        self.arm_keepalive(main_up_since);
        if self.config.urgent_channel {
            self.urgent_control.push_back(Frame::UrgentHello(UrgentHello { session: self.session, epoch: self.epoch }));
        }
        self.stream_hellos_due = Channel::push_streams(self.config.push_stream_count())
            .filter_map(Channel::push_stream)
            .fold(0, |due, stream| due | 1 << stream);
        match self.state() {
            SourceState::Connecting => self.state = State::Handshake,
            SourceState::Paused | SourceState::ErrorReceive => {
                self.state = State::Recovering(RecoveryReport::default())
            }
            _ => {}
        }
    }

    fn hello(&self) -> Hello {
        Hello {
            resume: self.state() != SourceState::Connecting,
            urgent_channel: self.config.urgent_channel,
            session: self.session,
            epoch: self.epoch,
            page_size: self.layout.page_size(),
            mode: match self.config.mode {
                Mode::Postcopy => WireMode::Postcopy,
                Mode::Hybrid { .. } => WireMode::Hybrid,
            },
            precopy_rounds: self.config.mode.precopy_rounds(),
            blocks: self.layout.blocks().to_vec(),
            machine: self.machine.clone(),
            push_streams: self.config.push_stream_count(),
        }
    }

    /// The connection attempt for `channel` failed.
    pub fn handle_connect_failed(&mut self, now: Timestamp, channel: Channel) {
        if !self.links[channel.index()].connecting {
            return;
        }
        self.refused_since = None;
        self.links[channel.index()].down();
        self.on_link_failure(now, MigrationError::ConnectFailed { channel });
    }

    /// Connecting for `channel` was refused: nothing listens at the
    /// destination's address. The same as [`Source::handle_connect_failed`]
    /// except while withdrawing: a destination that holds a device state
    /// keeps listening until it finishes (recoveries connect to it), so a
    /// refusal means no destination waits for this guest, and the source
    /// finishes at once instead of spending its remaining attempts. Paused
    /// (past StartGuest), it retries, saying so, until attempts were refused
    /// for `destination_gone_timeout`, then leaves the guest to the
    /// destination (see [`Config::destination_gone_timeout`]).
    pub fn handle_connect_refused(&mut self, now: Timestamp, channel: Channel) {
        if !self.links[channel.index()].connecting {
            return;
        }
        if matches!(self.state(), SourceState::Paused | SourceState::ErrorReceive) && !self.reconnects_by_itself() {
            // The user decides when to try again and when to give up.
            self.links[channel.index()].down();
            self.on_link_failure(now, MigrationError::ConnectFailed { channel });
            return;
        }
        if matches!(self.state(), SourceState::Paused | SourceState::ErrorReceive) && self.may_take_over() {
            // Fallback: a destination that refuses may have crashed; it
            // cannot have finished before `Released`. The takeover timer,
            // not the refusals, decides.
            self.links[channel.index()].down();
            self.on_link_failure(now, MigrationError::ConnectFailed { channel });
            return;
        }
        if matches!(self.state(), SourceState::Paused | SourceState::ErrorReceive) {
            self.links[channel.index()].down();
            let since = *self.refused_since.get_or_insert(now);
            let refused_ms = duration_ms(now.saturating_since(since));
            let limit_ms = duration_ms(self.config.destination_gone_timeout);
            if refused_ms >= limit_ms {
                self.leave_guest_to_destination(now, refused_ms);
            } else {
                self.on_link_failure(now, MigrationError::DestinationRefused { channel, refused_ms, limit_ms });
            }
            return;
        }
        if self.state() != SourceState::Withdrawing {
            self.handle_connect_failed(now, channel);
            return;
        }
        self.close_all_links();
        let error = self.withdraw_reason().unwrap_or(MigrationError::ConnectFailed { channel });
        self.finish_failed(now, error, false);
    }

    /// The connection for `channel` was lost (reset, closed by the peer, or
    /// unusable). Frames in flight on it are gone.
    pub fn handle_connection_lost(&mut self, now: Timestamp, channel: Channel) {
        if !self.links[channel.index()].up {
            return;
        }
        self.links[channel.index()].down();
        self.on_link_failure(now, MigrationError::ConnectionLost { channel });
    }

    /// Bytes received on `channel` (only the return path carries bytes to the
    /// source). Any chunking works; frames are decoded as they complete.
    pub fn handle_input(&mut self, now: Timestamp, channel: Channel, bytes: Bytes) {
        if channel != Channel::Return || !self.links[channel.index()].up {
            return;
        }
        self.heard_from_peer(now);
        self.links[channel.index()].decoder.push(bytes);
        loop {
            let link = &mut self.links[channel.index()];
            if !link.up {
                return;
            }
            match link.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(error) = self.handle_frame(now, channel, frame) {
                        self.on_protocol_error(now, error);
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    self.on_protocol_error(now, ProtocolError::Wire { channel, error });
                }
            }
        }
    }

    /// Handles one decoded frame from `channel` (what [`Source::handle_input`]
    /// does for each frame; exposed for drivers and checkers that move
    /// frames, not bytes).
    pub fn handle_frame(&mut self, now: Timestamp, channel: Channel, frame: Frame) -> Result<(), ProtocolError> {
        if channel != Channel::Return {
            return Err(self.unexpected(channel, &frame));
        }
        self.heard_from_peer(now);
        let welcome = matches!(frame, Frame::Welcome(_));
        let result = self.handle_return_frame(now, channel, frame);
        if result.is_ok() {
            self.heard_from_destination(now, welcome);
        }
        result
    }

    /// Fallback: a frame from this migration's destination (on a return
    /// connection whose welcome, of this session and epoch, was accepted:
    /// bytes from anyone else, a restarted destination's keep-alives
    /// included, do not count) moves the takeover deadline.
    fn heard_from_destination(&mut self, now: Timestamp, welcome: bool) {
        let epoch = self.epoch;
        let Some(fallback) = &mut self.fallback else { return };
        if welcome {
            fallback.welcomed_epoch = Some(epoch);
        }
        if fallback.welcomed_epoch != Some(epoch) {
            return;
        }
        fallback.last_heard = now;
        if self.timers.is_armed(Timer::Takeover) {
            self.arm_takeover();
        }
    }

    fn handle_return_frame(&mut self, now: Timestamp, channel: Channel, frame: Frame) -> Result<(), ProtocolError> {
        match frame {
            Frame::Ping => Ok(()),
            Frame::Welcome(welcome) => self.on_welcome(now, welcome),
            Frame::Reject { reason } => Err(ProtocolError::Rejected(reason)),
            Frame::Request(request) => self.on_request(now, channel, request),
            Frame::ReadyToRun if self.device_state_sent() => {
                if let State::Switchover(switchover) = &mut self.state {
                    if !std::mem::replace(&mut switchover.start_queued, true) {
                        self.queue_start_guest();
                    }
                }
                Ok(())
            }
            Frame::Eoc => self.on_eoc(now, channel),
            Frame::GuestDropped { reason }
                if !self.state().after_start() && self.state() != SourceState::Connecting =>
            {
                self.fail(now, MigrationError::DestinationDropped(reason));
                Ok(())
            }
            Frame::PresentPages(present) => self.on_present_pages(present),
            Frame::PresentEnd { present_pages } => self.on_present_end(now, present_pages),
            Frame::LeaseRequest { seq } if self.fallback.is_some() && self.state().after_start() => {
                self.queue_fast(Frame::LeaseGrant { seq });
                Ok(())
            }
            Frame::ReleaseAck if self.state() == SourceState::Releasing => {
                if let Some(fallback) = &mut self.fallback {
                    fallback.release_acked = true;
                }
                self.finish_completed(now);
                Ok(())
            }
            frame @ (Frame::CheckpointBegin(_)
            | Frame::CheckpointPage { .. }
            | Frame::CheckpointDevice { .. }
            | Frame::CheckpointEnd { .. }) => self.on_checkpoint_frame(channel, frame),
            frame => Err(self.unexpected(channel, &frame)),
        }
    }

    /// The vCPUs are stopped (after [`SourceAction::StopVcpus`]); `device_state`
    /// is the VMM's opaque device state, to be loaded on the destination.
    pub fn handle_vcpus_stopped(&mut self, now: Timestamp, device_state: Bytes) -> Result<(), EventError> {
        if self.state() != SourceState::Stopping {
            return Err(self.wrong_state("vcpus stopped"));
        }
        if device_state.len() as u64 > self.config.max_device_state_bytes {
            let limit = self.config.max_device_state_bytes;
            self.fail(now, ProtocolError::DeviceStateTooLarge { limit }.into());
            return Ok(());
        }
        self.stats.0.device_state_bytes = device_state.len() as u64;
        if let Some(fallback) = &mut self.fallback {
            // The fallback image until a checkpoint is committed: the
            // guest as it stopped here.
            fallback.image_device_state = device_state.clone();
        }
        if self.precopy_sent_any {
            self.state = State::FinalSync(device_state);
            self.actions.push_back(SourceAction::SyncDirtyLog);
        } else {
            self.begin_switchover(device_state);
        }
        Ok(())
    }

    /// Part of a dirty log: bit `i` of `words[j]` set means page
    /// `first_page + 64 j + i` was written since the previous sync.
    /// `first_page` must be a multiple of 64.
    pub fn handle_dirty_bitmap(&mut self, _now: Timestamp, first_page: u64, words: &[u64]) -> Result<(), EventError> {
        if !matches!(self.state(), SourceState::DirtySync | SourceState::FinalSync) {
            return Err(self.wrong_state("dirty bitmap"));
        }
        let total = self.layout.total_pages();
        if first_page % 64 != 0 || first_page > total {
            return Err(EventError::PageOutOfRange(first_page));
        }
        for (j, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = first_page + 64 * j as u64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if page >= total {
                    return Err(EventError::PageOutOfRange(page));
                }
                self.mark_dirty(page);
            }
        }
        Ok(())
    }

    /// Dirty pages listed one by one (for drivers that track writes themselves).
    pub fn handle_dirty_pages(
        &mut self,
        _now: Timestamp,
        pages: impl IntoIterator<Item = PageNumber>,
    ) -> Result<(), EventError> {
        if !matches!(self.state(), SourceState::DirtySync | SourceState::FinalSync) {
            return Err(self.wrong_state("dirty pages"));
        }
        for page in pages {
            if page.0 >= self.layout.total_pages() {
                return Err(EventError::PageOutOfRange(page.0));
            }
            self.mark_dirty(page.0);
        }
        Ok(())
    }

    /// The dirty log asked for by [`SourceAction::SyncDirtyLog`] is complete.
    pub fn handle_dirty_sync_complete(&mut self, now: Timestamp) -> Result<(), EventError> {
        match &mut self.state {
            State::DirtySync => {
                self.round += 1;
                self.stats.0.precopy_rounds = self.round;
                if self.switch_requested || self.round >= self.config.mode.precopy_rounds() {
                    self.stop_guest(now);
                } else {
                    self.state = State::Precopy;
                    self.cursor = 0;
                }
                Ok(())
            }
            State::FinalSync(device_state) => {
                let device_state = std::mem::take(device_state);
                self.begin_switchover(device_state);
                Ok(())
            }
            _ => Err(self.wrong_state("dirty sync complete")),
        }
    }

    /// The user asks to stop precopy and switch to postcopy now.
    pub fn handle_switch_to_postcopy(&mut self, now: Timestamp) -> Result<(), EventError> {
        match self.state() {
            SourceState::Handshake | SourceState::DirtySync => {
                self.switch_requested = true;
                Ok(())
            }
            SourceState::Precopy => {
                self.switch_requested = true;
                self.stop_guest(now);
                Ok(())
            }
            _ => Err(self.wrong_state("switch to postcopy")),
        }
    }

    /// The user cancels the migration. Allowed until the destination may run
    /// the guest; the guest then keeps (or resumes) running here. While
    /// withdrawing it stops the attempts to tell the destination.
    pub fn handle_cancel(&mut self, now: Timestamp) -> Result<(), EventError> {
        if self.state().after_start() || self.state().is_terminal() {
            return Err(self.wrong_state("cancel"));
        }
        self.fail(now, MigrationError::Cancelled);
        Ok(())
    }

    /// The user pauses a migration past StartGuest (QEMU's `migrate-pause`):
    /// the connections close as after a loss, every page is kept, and no
    /// reconnection attempt is made until [`Source::handle_resume`],
    /// whatever [`Config::auto_reconnect`] says. Allowed while postcopy runs
    /// or recovers (ACTIVE, EOC_RECEIVED, ALL_PAGES_SENT, ERROR_RECEIVE,
    /// RECOVERING); paused already, or before StartGuest, it is refused.
    pub fn handle_pause(&mut self, now: Timestamp) -> Result<(), EventError> {
        match self.state() {
            SourceState::Active
            | SourceState::EocReceived
            | SourceState::AllPagesSent
            | SourceState::ErrorReceive
            | SourceState::Recovering => {
                self.held = true;
                self.pause(now, MigrationError::PausedByUser, false);
                Ok(())
            }
            _ => Err(self.wrong_state("pause")),
        }
    }

    /// The user asks a paused source to reconnect now (QEMU's `migrate
    /// {resume: true}`; the driver first points its connections at the
    /// address the user gave). Allowed while PAUSED or ERROR_RECEIVE with
    /// no attempt under way: after a user's pause, in manual recovery
    /// (`auto_reconnect` off) after a loss or a failed attempt, or between
    /// two automatic attempts (the next one starts now). It lifts a user's
    /// pause; an attempt that fails leaves the source paused again.
    pub fn handle_resume(&mut self, now: Timestamp) -> Result<(), EventError> {
        let paused = matches!(self.state(), SourceState::Paused | SourceState::ErrorReceive);
        let under_way = self.channels().any(|c| self.links[c.index()].up || self.links[c.index()].connecting);
        if !paused || under_way {
            return Err(self.wrong_state("resume"));
        }
        self.held = false;
        self.refused_since = None;
        self.timers.stop(Timer::Retry);
        self.start_attempt(now);
        Ok(())
    }

    /// Whether the user paused the migration and it waits for
    /// [`Source::handle_resume`].
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// A timer armed through [`Source::poll_timeout`] expired (or any time: the
    /// core checks what is due).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let Some(timer) = self.timers.take_expired(now) else {
            return;
        };
        match timer {
            Timer::Handshake => {
                self.refused_since = None;
                let timeout_ms = self.config.handshake_timeout.as_millis() as u64;
                self.on_link_failure(now, MigrationError::HandshakeTimeout { timeout_ms });
            }
            Timer::Retry => self.start_attempt(now),
            Timer::PeerTimeout => {
                let timeout_ms = self.config.peer_timeout.unwrap_or_default().as_millis() as u64;
                self.on_link_failure(now, MigrationError::PeerTimeout { timeout_ms });
            }
            Timer::Keepalive => {
                // The next one is due an interval from now even while this
                // one waits for room: a deadline left in the past would spin
                // a driver whose socket is full.
                self.arm_keepalive(now);
                if self.main_control.is_empty() {
                    self.main_control.push_back(Frame::Ping);
                }
            }
            Timer::Takeover => self.take_over(now),
            Timer::Start | Timer::Lease | Timer::Renew | Timer::Checkpoint => {}
        }
    }

    /// A reconnection attempt (recovery or withdrawal): a new epoch, every
    /// channel connecting, bounded by the handshake timeout.
    fn start_attempt(&mut self, now: Timestamp) {
        self.epoch += 1;
        self.attempt += 1;
        if self.state() != SourceState::Withdrawing {
            self.actions.push_back(SourceAction::Notice(Notice::RecoveryAttempt { attempt: self.attempt }));
        }
        self.timers.set(Timer::Handshake, now + self.config.handshake_timeout);
        self.connect_all();
    }

    /// Paused: whether the next attempt starts by itself (after the
    /// back-off) or waits for the user's [`Source::handle_resume`].
    fn reconnects_by_itself(&self) -> bool {
        self.config.auto_reconnect && !self.held
    }

    /// Paused, between attempts: the next one after the back-off, or none
    /// until the user resumes.
    fn retry_later(&mut self, now: Timestamp) {
        if self.reconnects_by_itself() {
            self.timers.set(Timer::Retry, now + self.config.reconnect_delay(self.attempt));
        } else {
            self.timers.stop(Timer::Retry);
        }
    }

    // ----- internals: frames in --------------------------------------------

    fn on_welcome(&mut self, now: Timestamp, welcome: Welcome) -> Result<(), ProtocolError> {
        if welcome.session != self.session {
            return Err(ProtocolError::SessionMismatch { expected: self.session, got: welcome.session });
        }
        if welcome.epoch != self.epoch {
            return Err(ProtocolError::EpochMismatch { expected: self.epoch, got: welcome.epoch });
        }
        // The peer's bound, within this side's own: a peer that announces
        // more cannot make the source queue more.
        self.peer_max_requests = welcome.max_outstanding_requests.min(self.config.max_outstanding_requests);
        match &mut self.state {
            State::Handshake => {
                self.timers.stop(Timer::Handshake);
                self.clock.0.handshake_done = Some(now);
                if self.config.mode.precopy_rounds() > 0 && !self.switch_requested {
                    self.state = State::Precopy;
                } else {
                    self.stop_guest(now);
                }
                Ok(())
            }
            State::Recovering(report) if report.welcome.is_none() => {
                if !welcome.device_loaded {
                    return Err(ProtocolError::BadPresentReport(
                        "the destination has no device state to resume with".into(),
                    ));
                }
                report.welcome = Some(welcome);
                Ok(())
            }
            _ => Err(self.unexpected(Channel::Return, &Frame::Welcome(welcome))),
        }
    }

    fn on_request(&mut self, _now: Timestamp, channel: Channel, request: wire::Request) -> Result<(), ProtocolError> {
        match self.state() {
            SourceState::Switchover | SourceState::Active => {}
            SourceState::AllPagesSent => {
                // Every page is on its way; the copies in flight answer these.
                self.stats.0.requests_received += request.indexes.len() as u64;
                self.stats.0.requests_for_sent_pages += request.indexes.len() as u64;
                return Ok(());
            }
            SourceState::EocReceived | SourceState::Completed => return Err(ProtocolError::RequestAfterEnd),
            _ => return Err(self.unexpected(channel, &Frame::Request(request))),
        }
        if self.layout.block_range(request.block).is_none() {
            return Err(ProtocolError::BlockOutOfRange { block: request.block });
        }
        for &index in &request.indexes {
            let page = self
                .layout
                .page_number(PageAddress { block: request.block, index })
                .ok_or(ProtocolError::PageOutOfRange { block: request.block, index })?;
            self.stats.0.requests_received += 1;
            if self.sent.get(page.0) {
                self.stats.0.requests_for_sent_pages += 1;
                // The push is sending this page in parts: the rest goes on
                // the urgent channel, where the request is served.
                if self.config.urgent_channel && self.pushing.is_some_and(|p| p.page == page) {
                    if let Some(push) = self.pushing.take() {
                        self.stats.0.requests_for_pages_in_parts += 1;
                        self.rushing.push_back(push);
                    }
                }
                continue;
            }
            if self.queued.get(page.0) {
                continue;
            }
            if self.urgent_queue.len() >= self.peer_max_requests as usize {
                return Err(ProtocolError::TooManyRequests { limit: self.peer_max_requests });
            }
            self.queued.set(page.0);
            self.urgent_queue.push_back(page);
        }
        Ok(())
    }

    fn on_eoc(&mut self, now: Timestamp, channel: Channel) -> Result<(), ProtocolError> {
        match self.state() {
            SourceState::AllPagesSent => {
                self.complete(now);
                Ok(())
            }
            SourceState::Active if !self.sent.is_full() => {
                // The destination cannot hold pages this side never sent:
                // completing now would leave the guest without them.
                Err(ProtocolError::PrematureEoc { unsent: self.layout.total_pages() - self.sent.count_ones() })
            }
            SourceState::Active => {
                if !matches!(self.state, State::Active { end_of_stream_queued: true }) {
                    self.main_control.push_back(Frame::EndOfStream);
                }
                self.state = State::EocReceived;
                Ok(())
            }
            _ => Err(self.unexpected(channel, &Frame::Eoc)),
        }
    }

    fn on_present_pages(&mut self, present: wire::PresentPages) -> Result<(), ProtocolError> {
        let State::Recovering(report) = &self.state else {
            return Err(self.unexpected(Channel::Return, &Frame::PresentPages(present)));
        };
        if report.welcome.is_none() {
            return Err(ProtocolError::BadPresentReport("present pages before the welcome".into()));
        }
        if present.first_word != report.next_word {
            return Err(ProtocolError::BadPresentReport(format!(
                "expected word {}, got {}",
                report.next_word, present.first_word
            )));
        }
        let word_len = self.sent.word_len() as u64;
        if present.first_word + present.words.len() as u64 > word_len {
            return Err(ProtocolError::BadPresentReport("report extends past the last page".into()));
        }
        let total = self.layout.total_pages();
        if self.lost.is_empty() {
            self.lost = Bitmap::new(total);
            self.update_bookkeeping_stat();
        }
        let mut seen = 0;
        for (j, &present_word) in present.words.iter().enumerate() {
            let w = present.first_word + j as u64;
            let base = w * 64;
            let valid = if base + 64 <= total { !0 } else { (1u64 << (total - base)) - 1 };
            if present_word & !valid != 0 {
                return Err(ProtocolError::BadPresentReport("pages past the end reported present".into()));
            }
            let sent_word = self.sent.word(w as usize);
            // Sent but missing at the destination: lost in flight, send again.
            let mut missing = sent_word & !present_word;
            while missing != 0 {
                let page = base + u64::from(missing.trailing_zeros());
                missing &= missing - 1;
                self.sent.clear(page);
                self.lost.set(page);
            }
            // Present but not marked sent here: the destination has it, never resend.
            let mut extra = present_word & !sent_word;
            while extra != 0 {
                let page = base + u64::from(extra.trailing_zeros());
                extra &= extra - 1;
                self.sent.set(page);
            }
            seen += u64::from(present_word.count_ones());
        }
        if let State::Recovering(report) = &mut self.state {
            report.next_word += present.words.len() as u64;
            report.present_seen += seen;
        }
        Ok(())
    }

    fn on_present_end(&mut self, now: Timestamp, present_pages: u64) -> Result<(), ProtocolError> {
        let State::Recovering(report) = &self.state else {
            return Err(self.unexpected(Channel::Return, &Frame::PresentEnd { present_pages }));
        };
        let Some(welcome) = report.welcome else {
            return Err(ProtocolError::BadPresentReport("end of report before the welcome".into()));
        };
        if report.next_word != self.sent.word_len() as u64 || report.present_seen != present_pages {
            return Err(ProtocolError::BadPresentReport(format!(
                "report covers {} words and {} pages, expected {} words and {present_pages} pages",
                report.next_word,
                report.present_seen,
                self.sent.word_len()
            )));
        }
        self.timers.stop(Timer::Handshake);
        self.attempt = 0;
        self.stats.0.recoveries += 1;
        self.clock.0.unpause(now);
        self.actions.push_back(SourceAction::Notice(Notice::Recovered { epoch: self.epoch }));
        self.state = State::Active { end_of_stream_queued: false };
        if !welcome.guest_started {
            // StartGuest was lost with the connection: send it again. The
            // destination may have run the guest for all the source can tell
            // until now, so this stays past the point of no return.
            self.queue_start_guest();
        }
        self.check_all_sent();
        Ok(())
    }

    // ----- internals: fallback ---------------------------------------------

    /// A small control frame for the destination, on the urgent channel
    /// when it is up (so that it does not queue behind bulk pages), else
    /// on the main one.
    fn queue_fast(&mut self, frame: Frame) {
        let urgent = self.config.urgent_channel && self.links[Channel::Urgent.index()].up;
        let queue = if urgent { &mut self.urgent_control } else { &mut self.main_control };
        queue.push_back(frame);
    }

    /// Fallback is on, the destination may run the guest, and the source
    /// may still take it back (nothing released, not taken back yet).
    fn may_take_over(&self) -> bool {
        self.fallback.as_ref().is_some_and(|f| !f.released && !f.took_over) && self.state().after_start()
    }

    /// The takeover deadline: the takeover wait after the last bytes heard
    /// from the destination (counted by this side's clock). Any grant this
    /// side gave answered a request it received no later than that, sent
    /// no later still: by the deadline the lease it renewed has lapsed.
    fn arm_takeover(&mut self) {
        if !self.may_take_over() {
            return;
        }
        let Some(fallback) = &self.fallback else { return };
        let wait = if planted!(self.config, TakeoverWithoutLease) {
            fallback.config.takeover_margin
        } else {
            fallback.config.takeover_wait()
        };
        self.timers.set(Timer::Takeover, fallback.last_heard + wait);
    }

    /// The destination was silent past its lease: it cannot run the guest
    /// any more. Restart the guest here from the last committed checkpoint,
    /// then reconnect (as a withdrawal does) only to tell a destination
    /// that reappears that it was superseded.
    fn take_over(&mut self, now: Timestamp) {
        if !self.may_take_over() {
            return;
        }
        self.drop_staging();
        let Some(fallback) = &mut self.fallback else { return };
        fallback.took_over = true;
        let checkpoint = fallback.committed;
        let device_state = fallback.image_device_state.clone();
        let silent_ms = duration_ms(now.saturating_since(fallback.last_heard));
        self.close_all_links();
        while let Some(page) = self.urgent_queue.pop_front() {
            self.queued.clear(page.0);
        }
        self.main_control.clear();
        self.urgent_control.clear();
        self.timers.stop_all();
        self.clock.0.unpause(now);
        self.attempt = 0;
        let error = MigrationError::TookOver { checkpoint, silent_ms };
        self.actions.push_back(SourceAction::TakeOver { checkpoint, device_state });
        self.actions.push_back(SourceAction::Notice(Notice::TookOver { checkpoint }));
        if self.config.withdraw_attempts == 0 {
            self.finish_failed(now, error, false);
            return;
        }
        self.state = State::Withdrawing(error);
        self.timers.set(Timer::Retry, now + self.config.reconnect_delay(0));
    }

    /// A checkpoint cut off (a lost connection, bad bytes): what was
    /// staged goes; the fallback image stays at the last committed one.
    fn drop_staging(&mut self) {
        let Some(staging) = self.fallback.as_mut().and_then(|f| f.staging.take()) else { return };
        if planted!(self.config, CommitPartialCheckpoint) {
            if let Some(fallback) = &mut self.fallback {
                fallback.committed = staging.seq;
                fallback.image_device_state = Bytes::from(staging.device);
            }
            self.actions.push_back(SourceAction::CommitCheckpoint { seq: staging.seq });
            return;
        }
        self.actions.push_back(SourceAction::DiscardCheckpoint { seq: staging.seq });
    }

    fn on_checkpoint_frame(&mut self, channel: Channel, frame: Frame) -> Result<(), ProtocolError> {
        let receiving = matches!(
            self.state(),
            SourceState::Active | SourceState::EocReceived | SourceState::AllPagesSent | SourceState::Releasing
        );
        let total_pages = self.layout.total_pages();
        let max_device = self.config.max_device_state_bytes;
        let (Some(fallback), true) = (self.fallback.as_mut(), receiving) else {
            return Err(self.unexpected(channel, &frame));
        };
        let bad = |what: String| Err(ProtocolError::BadCheckpoint(what));
        match frame {
            Frame::CheckpointBegin(CheckpointBegin { seq, pages, device_bytes }) => {
                if let Some(staging) = &fallback.staging {
                    return bad(format!("checkpoint {seq} begins inside checkpoint {}", staging.seq));
                }
                if seq != fallback.committed + 1 {
                    return bad(format!("checkpoint {seq} after checkpoint {}", fallback.committed));
                }
                if pages > total_pages || u64::from(device_bytes) > max_device {
                    return bad(format!("checkpoint {seq} announces {pages} pages and {device_bytes} device bytes"));
                }
                fallback.staging = Some(Staging {
                    seq,
                    pages,
                    pages_seen: 0,
                    device_bytes,
                    device: Vec::new(),
                    digest: Digest::new(seq),
                });
                Ok(())
            }
            Frame::CheckpointPage { address, data } => {
                let Some(staging) = &mut fallback.staging else {
                    return bad("a checkpoint page outside a checkpoint".into());
                };
                let page = self
                    .layout
                    .page_number(address)
                    .ok_or(ProtocolError::PageOutOfRange { block: address.block, index: address.index })?;
                if let PageData::Bytes(bytes) = &data {
                    let expected = self.layout.page_size_of(page).unwrap_or(0);
                    if bytes.len() != expected as usize {
                        return Err(ProtocolError::PageLength { expected, got: bytes.len() });
                    }
                }
                staging.pages_seen += 1;
                if staging.pages_seen > staging.pages {
                    return bad(format!("checkpoint {} carries more than {} pages", staging.seq, staging.pages));
                }
                staging.digest.page(page, &data);
                let seq = staging.seq;
                self.actions.push_back(SourceAction::StageCheckpointPage { seq, page, data });
                Ok(())
            }
            Frame::CheckpointDevice { chunk } => {
                let Some(staging) = &mut fallback.staging else {
                    return bad("checkpoint device state outside a checkpoint".into());
                };
                if staging.device.len() + chunk.len() > staging.device_bytes as usize {
                    return bad(format!(
                        "checkpoint {} carries more than {} device bytes",
                        staging.seq, staging.device_bytes
                    ));
                }
                staging.digest.device(&chunk);
                staging.device.extend_from_slice(&chunk);
                Ok(())
            }
            Frame::CheckpointEnd { seq, digest } => {
                let Some(staging) = fallback.staging.take() else {
                    return bad(format!("end of checkpoint {seq} outside a checkpoint"));
                };
                let whole = staging.seq == seq
                    && staging.pages_seen == staging.pages
                    && staging.device.len() == staging.device_bytes as usize
                    && staging.digest.finish() == digest;
                if !whole {
                    let detail = format!(
                        "checkpoint {} ended as {seq} after {} of {} pages and {} of {} device bytes, digest {}",
                        staging.seq,
                        staging.pages_seen,
                        staging.pages,
                        staging.device.len(),
                        staging.device_bytes,
                        if staging.digest.finish() == digest { "matching" } else { "differing" }
                    );
                    // Staged pages go (pause drops nothing more: taken above).
                    self.actions.push_back(SourceAction::DiscardCheckpoint { seq: staging.seq });
                    return bad(detail);
                }
                fallback.committed = seq;
                fallback.image_device_state = Bytes::from(staging.device);
                self.actions.push_back(SourceAction::CommitCheckpoint { seq });
                self.actions.push_back(SourceAction::Notice(Notice::CheckpointCommitted { seq }));
                self.queue_fast(Frame::CheckpointAck { seq });
                Ok(())
            }
            frame => Err(self.unexpected(channel, &frame)),
        }
    }

    // ----- internals: frames out -------------------------------------------

    fn next_main_frame(&mut self, now: Timestamp, out: &mut Outbox<'_, impl GuestMemory + ?Sized>) -> bool {
        if let Some(frame) = self.main_control.pop_front() {
            wire::encode(&frame, out.bytes);
            self.after_control_sent(now, &frame);
            return true;
        }
        match self.state() {
            SourceState::Precopy => self.send_precopy_page(out),
            SourceState::Switchover => {
                if self.send_discard(out.bytes) || self.send_device_state(out.bytes) {
                    return true;
                }
                !self.config.urgent_channel && self.send_requested_page(out)
            }
            SourceState::Active => {
                if !self.config.urgent_channel && self.send_requested_page(out) {
                    return true;
                }
                self.send_background_page(out)
            }
            _ => false,
        }
    }

    fn next_urgent_frame(&mut self, now: Timestamp, out: &mut Outbox<'_, impl GuestMemory + ?Sized>) -> bool {
        if let Some(frame) = self.urgent_control.pop_front() {
            wire::encode(&frame, out.bytes);
            self.after_control_sent(now, &frame);
            return true;
        }
        matches!(self.state(), SourceState::Switchover | SourceState::Active) && self.send_requested_page(out)
    }

    /// Push stream `stream` (1 or more) carries its stream hello, then
    /// background pages only, each the next unsent one when the stream can
    /// take bytes: streams that go faster take more pages.
    fn next_push_frame(&mut self, stream: u8, out: &mut Outbox<'_, impl GuestMemory + ?Sized>) -> bool {
        if self.stream_hellos_due & 1 << stream != 0 {
            self.stream_hellos_due &= !(1 << stream);
            let hello = UrgentHello { session: self.session, epoch: self.epoch };
            wire::encode(&Frame::UrgentHello(hello), out.bytes);
            return true;
        }
        self.state() == SourceState::Active && self.send_background_page(out)
    }

    fn after_control_sent(&mut self, now: Timestamp, frame: &Frame) {
        match frame {
            Frame::StartGuest => {
                // From here on the destination may run the guest: never take it back.
                // Sent again after a recovery, it may follow the end of the
                // background push: keep ALL_PAGES_SENT then.
                if self.state() == SourceState::Switchover {
                    self.state = State::Active { end_of_stream_queued: false };
                }
                self.clock.0.started.get_or_insert(now);
                self.arm_takeover();
                self.check_all_sent();
            }
            Frame::Released => {
                if let Some(fallback) = &mut self.fallback {
                    fallback.released = true;
                }
                self.timers.stop(Timer::Takeover);
            }
            Frame::EndOfStream => match self.state() {
                SourceState::EocReceived => self.complete(now),
                SourceState::Active => self.state = State::AllPagesSent,
                _ => {}
            },
            _ => {}
        }
    }

    fn send_precopy_page(&mut self, out: &mut Outbox<'_, impl GuestMemory + ?Sized>) -> bool {
        // A page only parts carry (1 GiB) waits for postcopy: precopy pages
        // cross whole, and the destination takes parts in postcopy only.
        let mut next = self.sent.next_clear(self.cursor);
        while let Some(page) = next.filter(|&p| self.parts_only(PageNumber(p))) {
            next = self.sent.next_clear(page + 1);
        }
        match next {
            Some(page) => {
                self.write_page(out, PageNumber(page), PageKind::Precopy);
                self.precopy_sent_any = true;
                self.cursor = page + 1;
                true
            }
            None => {
                // Round over: learn what the guest dirtied meanwhile.
                self.state = State::DirtySync;
                self.actions.push_back(SourceAction::SyncDirtyLog);
                false
            }
        }
    }

    fn send_discard(&mut self, out: &mut Vec<u8>) -> bool {
        let State::Switchover(Switchover { discard_cursor, .. }) = &mut self.state else {
            return false;
        };
        let Some(first) = self.stale.next_set(*discard_cursor) else {
            *discard_cursor = self.stale.len();
            return false;
        };
        let Some(address) = self.layout.address(PageNumber(first)) else {
            return false;
        };
        let block_end = self.layout.block_range(address.block).map_or(first + 1, |r| r.end);
        let block_start = block_end - self.layout.blocks()[address.block as usize].page_count;
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        let mut page = first;
        while ranges.len() < DISCARD_RANGES_PER_FRAME {
            let Some(start) = self.stale.next_set(page).filter(|&p| p < block_end) else {
                page = block_end;
                break;
            };
            let mut end = start + 1;
            while end < block_end && self.stale.get(end) {
                end += 1;
            }
            ranges.push(((start - block_start) as u32, (end - start) as u32));
            self.stats.0.stale_pages_discarded += end - start;
            page = end;
        }
        *discard_cursor = page;
        wire::encode(&Frame::Discard(wire::Discard { block: address.block, ranges }), out);
        true
    }

    fn send_device_state(&mut self, out: &mut Vec<u8>) -> bool {
        let State::Switchover(switchover) = &mut self.state else {
            return false;
        };
        let Some(remaining) = switchover.device_state.as_mut() else {
            return false;
        };
        let chunk = remaining.split_to(remaining.len().min(self.config.device_state_chunk()));
        let last = remaining.is_empty();
        wire::encode(&Frame::DeviceState { last, chunk }, out);
        if last {
            switchover.device_state = None;
        }
        true
    }

    fn send_requested_page(&mut self, out: &mut Outbox<'_, impl GuestMemory + ?Sized>) -> bool {
        if let Some(push) = self.rushing.front_mut() {
            let part = *push;
            push.next += push.part_len;
            if push.next >= push.page_size {
                self.rushing.pop_front();
            }
            self.write_part(out, part, PageKind::Requested);
            self.check_all_sent();
            return true;
        }
        while let Some(page) = self.urgent_queue.pop_front() {
            self.queued.clear(page.0);
            if self.sent.get(page.0) {
                continue;
            }
            if !self.start_parts(out, page, PageKind::Requested) {
                self.write_page(out, page, PageKind::Requested);
            }
            if planted!(self.config, BackgroundOverwritesNewer) {
                self.sent.clear(page.0);
            }
            if self.config.prepaging {
                self.cursor = page.0 + 1;
            }
            self.check_all_sent();
            return true;
        }
        false
    }

    fn send_background_page(&mut self, out: &mut Outbox<'_, impl GuestMemory + ?Sized>) -> bool {
        if let Some(push) = &mut self.pushing {
            let part = *push;
            push.next += push.part_len;
            if push.next >= push.page_size {
                self.pushing = None;
            }
            self.write_part(out, part, PageKind::Background);
            self.check_all_sent();
            return true;
        }
        // Skip pages waiting in the urgent queue: they go there, once. Each
        // queued page is skipped at most once per call, so this ends.
        let mut candidate = self.cursor;
        for _ in 0..=self.urgent_queue.len() {
            let Some(page) = self.sent.next_clear_wrapping(candidate) else {
                break;
            };
            if self.queued.get(page) {
                candidate = page + 1;
                continue;
            }
            self.cursor = page + 1;
            if !self.start_parts(out, PageNumber(page), PageKind::Background) {
                self.write_page(out, PageNumber(page), PageKind::Background);
            }
            self.check_all_sent();
            return true;
        }
        false
    }

    /// Starts sending `page` in parts (its first part goes into `out`) when
    /// its block's pages are larger than a part and it is not all zeros
    /// (a zero page goes whole, as a flag). Returns whether it did. A
    /// background page's other parts follow on the push (`pushing`); a
    /// requested page is sent in parts only when it cannot cross whole (a
    /// page larger than a frame), its other parts on the urgent channel
    /// (`rushing`).
    fn start_parts(
        &mut self,
        out: &mut Outbox<'_, impl GuestMemory + ?Sized>,
        page: PageNumber,
        kind: PageKind,
    ) -> bool {
        let Some(page_size) = self.layout.page_size_of(page) else { return false };
        let page_size = page_size as usize;
        if kind == PageKind::Requested && !Config::parts_only(page_size) {
            return false;
        }
        let Some(part_len) = self.config.part_len(page_size) else { return false };
        if out.guest.is_zero_page(page, page_size) {
            return false;
        }
        let resent = self.lost.get(page.0);
        if resent {
            self.lost.clear(page.0);
        }
        let push = PartPush { page, page_size, part_len, next: part_len, resent };
        self.write_part(out, PartPush { next: 0, ..push }, kind);
        match kind {
            PageKind::Requested => self.rushing.push_back(push),
            _ => self.pushing = Some(push),
        }
        true
    }

    /// Whether `page` crosses only in parts (its block's pages are larger
    /// than a frame carries).
    fn parts_only(&self, page: PageNumber) -> bool {
        self.layout.page_size_of(page).is_some_and(|size| Config::parts_only(size as usize))
    }

    /// Writes the part of `push.page` at byte `push.next`. The page counts
    /// as sent from its first part on.
    fn write_part(&mut self, out: &mut Outbox<'_, impl GuestMemory + ?Sized>, push: PartPush, kind: PageKind) {
        let Some(address) = self.layout.address(push.page) else {
            debug_assert!(false, "the source only schedules pages of its own layout");
            return;
        };
        let before = out.bytes.len();
        let len = push.part_len.min(push.page_size - push.next);
        let data_at = wire::encode_page_part_unfilled(out.bytes, address, kind, push.next as u32, len);
        match &mut out.deferred {
            Some(deferred) => deferred.push(DeferredPage {
                offset: data_at,
                page: push.page,
                len,
                page_offset: push.next,
                page_size: push.page_size,
            }),
            None => out.guest.read_page_part(push.page, push.page_size, push.next, &mut out.bytes[data_at..]),
        }
        let bytes = (out.bytes.len() - before) as u64;
        if push.next == 0 {
            self.sent.set(push.page.0);
        }
        let stats = &mut self.stats.0;
        stats.page_bytes_sent.add(kind, bytes);
        stats.page_parts_sent += 1;
        if push.next == 0 {
            stats.pages_sent.add(kind, 1);
        }
        if push.resent {
            if push.next == 0 {
                stats.pages_sent.resent += 1;
            }
            stats.page_bytes_sent.resent += bytes;
        }
    }

    fn write_page(&mut self, out: &mut Outbox<'_, impl GuestMemory + ?Sized>, page: PageNumber, kind: PageKind) {
        let (Some(address), Some(page_size)) = (self.layout.address(page), self.layout.page_size_of(page)) else {
            debug_assert!(false, "the source only schedules pages of its own layout");
            return;
        };
        let before = out.bytes.len();
        let page_size = page_size as usize;
        let guest = out.guest;
        let zero = match &mut out.deferred {
            // A page only parts carry comes here only when it is all zeros
            // (`start_parts` took it otherwise): a flag, never a read of
            // the whole page into the frame.
            _ if Config::parts_only(page_size) => {
                debug_assert!(guest.is_zero_page(page, page_size), "a non-zero page larger than a frame sent whole");
                wire::encode_page_frame_unfilled(out.bytes, address, kind, page_size, true);
                true
            }
            None => wire::encode_page_frame(out.bytes, address, kind, page_size, |buf| guest.read_page(page, buf)),
            Some(deferred) => {
                let zero = guest.is_zero_page(page, page_size);
                if let Some(offset) = wire::encode_page_frame_unfilled(out.bytes, address, kind, page_size, zero) {
                    deferred.push(DeferredPage { offset, page, len: page_size, page_offset: 0, page_size });
                }
                zero
            }
        };
        let out = &mut *out.bytes;
        self.sent.set(page.0);
        let stats = &mut self.stats.0;
        stats.pages_sent.add(kind, 1);
        stats.page_bytes_sent.add(kind, (out.len() - before) as u64);
        if zero {
            stats.pages_sent.zero += 1;
        }
        if kind == PageKind::Precopy {
            self.stale.clear(page.0);
        }
        if self.lost.get(page.0) {
            self.lost.clear(page.0);
            stats.pages_sent.resent += 1;
            stats.page_bytes_sent.resent += (out.len() - before) as u64;
        }
    }

    // ----- internals: transitions -----------------------------------------

    fn mark_dirty(&mut self, page: u64) {
        if self.sent.clear(page) && !self.stale.is_empty() {
            self.stale.set(page);
        }
    }

    fn stop_guest(&mut self, now: Timestamp) {
        self.state = State::Stopping;
        self.clock.0.stopped = Some(now);
        self.clock.0.handshake_done.get_or_insert(now);
        self.actions.push_back(SourceAction::StopVcpus);
    }

    fn begin_switchover(&mut self, device_state: Bytes) {
        self.state =
            State::Switchover(Switchover { discard_cursor: 0, device_state: Some(device_state), start_queued: false });
        self.cursor = 0;
        if planted!(self.config, StaleNotDropped) {
            self.stale.clear_all();
        }
    }

    fn queue_start_guest(&mut self) {
        let urgent = self.config.urgent_channel && self.links[Channel::Urgent.index()].up;
        let queue = if urgent { &mut self.urgent_control } else { &mut self.main_control };
        queue.push_back(Frame::StartGuest);
    }

    fn check_all_sent(&mut self) {
        if let State::Active { end_of_stream_queued: queued @ false } = &mut self.state {
            // Every page begun, and every part of those sent in parts.
            if self.sent.is_full() && self.pushing.is_none() && self.rushing.is_empty() {
                *queued = true;
                self.main_control.push_back(Frame::EndOfStream);
            }
        }
    }

    /// Every page is at the destination and it said so. Without fallback
    /// (or once released) that is the end; with fallback, the destination
    /// runs under a lease until it hears `Released`, and the source may
    /// still take the guest back until that frame leaves.
    fn complete(&mut self, now: Timestamp) {
        if self.fallback.as_ref().is_some_and(|f| !f.release_acked) {
            if self.state() != SourceState::Releasing {
                self.state = State::Releasing;
                self.queue_fast(Frame::Released);
            }
            return;
        }
        self.finish_completed(now);
    }

    fn finish_completed(&mut self, now: Timestamp) {
        self.state = State::Completed;
        self.timers.stop_all();
        for channel in Channel::EVERY {
            if self.links[channel.index()].up {
                self.links[channel.index()].down();
                self.actions.push_back(SourceAction::Close(channel));
            }
        }
        let stats = self.stats(now);
        self.actions.push_back(SourceAction::Finished(Box::new(Finished {
            result: Ok(()),
            guest_on: Side::Destination,
            stats,
        })));
    }

    /// Ends the migration with the guest on the source, telling the
    /// destination why when the main channel is up.
    fn fail(&mut self, now: Timestamp, error: MigrationError) {
        let stopped = matches!(self.state(), SourceState::Stopping | SourceState::FinalSync | SourceState::Switchover);
        let main_up = self.links[Channel::Main.index()].up;
        let handshaken = !matches!(self.state(), SourceState::Connecting | SourceState::Withdrawing);
        if handshaken && main_up {
            let mut bytes = Vec::new();
            wire::encode(&Frame::Cancel { reason: error.to_string() }, &mut bytes);
            self.links[Channel::Main.index()].down();
            self.actions.push_back(SourceAction::Farewell { channel: Channel::Main, bytes: bytes.into() });
        }
        // The destination may wait after its ReadyToRun, and the cancel may
        // not reach it: the main channel is gone, or the failure is a loss
        // that may have cut the main channel too before this side saw it.
        let cancel_may_be_lost =
            !main_up || matches!(error, MigrationError::ConnectionLost { .. } | MigrationError::PeerTimeout { .. });
        if self.device_state_sent() && cancel_may_be_lost && self.config.withdraw_attempts > 0 {
            self.withdraw(now, error);
            return;
        }
        self.finish_failed(now, error, stopped);
    }

    /// A loss after the whole device state left and before StartGuest did:
    /// the destination may have loaded it and be waiting. Run the guest here
    /// again at once (StartGuest never left, so this is safe), then reconnect
    /// only to tell the destination to drop its copy, so that it does not
    /// wait forever. A destination that already heard the cancel has
    /// finished: the attempts then fail and the source finishes after them.
    fn withdraw(&mut self, now: Timestamp, error: MigrationError) {
        self.close_all_links();
        self.state = State::Withdrawing(error.clone());
        self.timers.stop(Timer::Handshake);
        self.attempt = 0;
        self.actions.push_back(SourceAction::ResumeVcpus);
        self.actions.push_back(SourceAction::Notice(Notice::Withdrawing { reason: error }));
        self.timers.set(Timer::Retry, now + self.config.reconnect_delay(0));
    }

    /// Withdrawing and connected: a resume hello so that the destination
    /// takes the connection, then the cancel; then the migration is over.
    fn tell_destination_to_drop(&mut self, now: Timestamp, mut hello: Hello) {
        hello.resume = true;
        let error = self.withdraw_reason().unwrap_or(MigrationError::Cancelled);
        let mut bytes = Vec::new();
        wire::encode(&Frame::Hello(hello), &mut bytes);
        if self.took_over() {
            // The destination may still hold the guest, fenced: it drops it
            // and never resumes it.
            wire::encode(&Frame::Superseded, &mut bytes);
        } else {
            wire::encode(&Frame::Cancel { reason: format!("the source took the guest back: {error}") }, &mut bytes);
        }
        self.links[Channel::Main.index()].down();
        self.actions.push_back(SourceAction::Farewell { channel: Channel::Main, bytes: bytes.into() });
        self.finish_failed(now, error, false);
    }

    /// The migration is over with the guest on this side (resumed here first
    /// when `resume_guest`).
    fn finish_failed(&mut self, now: Timestamp, error: MigrationError, resume_guest: bool) {
        self.state = State::Failed;
        self.timers.stop_all();
        self.close_all_links();
        if resume_guest {
            self.actions.push_back(SourceAction::ResumeVcpus);
        }
        let stats = self.stats(now);
        self.actions.push_back(SourceAction::Finished(Box::new(Finished {
            result: Err(error),
            guest_on: Side::Source,
            stats,
        })));
    }

    /// Paused, and every attempt was refused for `destination_gone_timeout`:
    /// the destination finished and exited (a source that lost the Eoc of a
    /// completed migration), or failed with the guest. Either way the guest
    /// is the destination's, and never resumes here: end, keeping nothing.
    fn leave_guest_to_destination(&mut self, now: Timestamp, refused_ms: u64) {
        self.state = State::Failed;
        self.timers.stop_all();
        self.refused_since = None;
        self.close_all_links();
        let stats = self.stats(now);
        self.actions.push_back(SourceAction::Finished(Box::new(Finished {
            result: Err(MigrationError::DestinationGone { refused_ms }),
            guest_on: Side::Destination,
            stats,
        })));
    }

    /// Pauses after the destination may have started the guest: keep every
    /// page, close the channels, and try again after a delay.
    fn pause(&mut self, now: Timestamp, reason: MigrationError, bad_bytes: bool) {
        if planted!(self.config, SourceResumesAfterSwitchover) {
            self.close_all_links();
            self.timers.stop_all();
            self.state = State::Failed;
            self.actions.push_back(SourceAction::ResumeVcpus);
            return;
        }
        let was_recovering = self.state() == SourceState::Recovering;
        self.state = if bad_bytes { State::ErrorReceive } else { State::Paused };
        self.close_all_links();
        self.drop_staging();
        self.timers.stop(Timer::Handshake);
        // The destination re-sends its outstanding requests after recovery.
        while let Some(page) = self.urgent_queue.pop_front() {
            if !planted!(self.config, RequestForgottenOnReconnect) {
                self.queued.clear(page.0);
            }
        }
        self.main_control.clear();
        self.urgent_control.clear();
        // A page whose parts were not all sent is not present at the
        // destination (it drops incomplete pages): the recovery's report
        // makes it go again, whole or in parts from the first.
        self.pushing = None;
        self.rushing.clear();
        self.clock.0.pause(now);
        if was_recovering {
            self.actions.push_back(SourceAction::Notice(Notice::RecoveryFailed {
                attempt: self.attempt,
                reason: reason.clone(),
            }));
        }
        self.actions.push_back(SourceAction::Notice(Notice::Paused { reason }));
        self.retry_later(now);
    }

    fn on_link_failure(&mut self, now: Timestamp, reason: MigrationError) {
        match self.state() {
            SourceState::Completed | SourceState::Failed => {}
            SourceState::Withdrawing => {
                self.close_all_links();
                self.timers.stop(Timer::Handshake);
                if self.attempt >= self.config.withdraw_attempts {
                    // Every attempt failed: the destination may keep waiting
                    // until its operator stops it. The guest runs here.
                    let error = self.withdraw_reason().unwrap_or(reason);
                    self.finish_failed(now, error, false);
                } else {
                    self.timers.set(Timer::Retry, now + self.config.reconnect_delay(self.attempt));
                }
            }
            SourceState::Paused | SourceState::ErrorReceive => {
                // A reconnection attempt failed: close what did connect, retry later.
                self.close_all_links();
                self.timers.stop(Timer::Handshake);
                self.actions.push_back(SourceAction::Notice(Notice::RecoveryFailed { attempt: self.attempt, reason }));
                self.retry_later(now);
            }
            state if state.after_start() => self.pause(now, reason, false),
            _ => self.fail(now, reason),
        }
    }

    fn on_protocol_error(&mut self, now: Timestamp, error: ProtocolError) {
        match self.state() {
            SourceState::Completed | SourceState::Failed => {}
            // Bad bytes on a connection of a reconnection attempt: the
            // attempt failed (its connections close), retry later.
            SourceState::Paused | SourceState::ErrorReceive | SourceState::Withdrawing => {
                self.on_link_failure(now, error.into())
            }
            state if state.after_start() => self.pause(now, error.into(), true),
            _ => self.fail(now, error.into()),
        }
    }

    /// Switching over, with the whole device state sent: the destination
    /// may have loaded it and be waiting for StartGuest.
    fn device_state_sent(&self) -> bool {
        matches!(self.state, State::Switchover(Switchover { device_state: None, .. }))
    }

    /// Why the migration was abandoned, while withdrawing.
    fn withdraw_reason(&self) -> Option<MigrationError> {
        match &self.state {
            State::Withdrawing(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    /// Something came from the destination: it is alive. The peer timeout
    /// runs while the return channel, the one it writes, is up.
    fn heard_from_peer(&mut self, now: Timestamp) {
        if let Some(timeout) = self.config.peer_timeout {
            if self.links[Channel::Return.index()].up {
                self.timers.set(Timer::PeerTimeout, now + timeout);
            }
        }
    }

    /// A keep-alive an interval after `since`, when keep-alives are on. It
    /// runs from the moment the main connection has its hello queued:
    /// nothing may go before the hello (the destination refuses any other
    /// first frame).
    fn arm_keepalive(&mut self, since: Timestamp) {
        if let Some(interval) = self.config.keepalive_interval {
            self.timers.set(Timer::Keepalive, since + interval);
        }
    }

    fn connect_all(&mut self) {
        let channels: Vec<Channel> = self.channels().collect();
        for channel in channels {
            let link = &mut self.links[channel.index()];
            link.down();
            link.connecting = true;
            self.actions.push_back(SourceAction::Connect(channel));
        }
    }

    fn close_all_links(&mut self) {
        self.timers.stop(Timer::Keepalive);
        self.timers.stop(Timer::PeerTimeout);
        self.stream_hellos_due = 0;
        for channel in Channel::EVERY {
            let link = &mut self.links[channel.index()];
            if link.up || link.connecting {
                link.down();
                self.actions.push_back(SourceAction::Close(channel));
            }
        }
    }

    fn unexpected(&self, channel: Channel, frame: &Frame) -> ProtocolError {
        ProtocolError::UnexpectedFrame { channel, kind: frame.kind(), state: self.state().to_string() }
    }

    fn wrong_state(&self, event: &'static str) -> EventError {
        EventError::WrongState { event, state: self.state().to_string() }
    }

    fn update_bookkeeping_stat(&mut self) {
        let bytes =
            self.sent.heap_bytes() + self.queued.heap_bytes() + self.stale.heap_bytes() + self.lost.heap_bytes();
        self.stats.0.bookkeeping_bytes = bytes as u64;
    }
}

fn duration_ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
