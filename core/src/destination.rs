//! The destination side: the guest runs here at the end.
//!
//! # States
//!
//! ```text
//!  Listening --Hello (fresh)--> Precopy --last DeviceState chunk--> LoadingDevice
//!  (channels may                (precopy pages and stale            | device state loaded
//!   attach in any order)         discards; empty in pure postcopy)  v
//!                                                  AwaitingStart (ReadyToRun sent)
//!                                                          | StartGuest
//!                                                          v
//!      +--------------------------------------------> Running --every page present,
//!      |                                                          Eoc transmitted--> Completed
//!      |  from AwaitingStart / Running: a lost connection or bad bytes --> Paused
//!      |  Paused --Hello (resume, newer epoch)--> Recovering
//!      +-- Recovering: Welcome, PresentPages..., PresentEnd transmitted
//!
//!  Before the device state is loaded, any failure ends in Failed: the guest
//!  never ran here, the memory is discarded and the source keeps the guest.
//!  Once ReadyToRun (or a recovery welcome saying the device state is
//!  loaded) has left, the source may transmit StartGuest, its point of no
//!  return, at any moment: from then on the destination never drops the
//!  guest on its own and, paused, waits for the source however long. Paused
//!  before that, it waits `start_timeout`, then drops the guest too.
//!  Completed still answers a resume hello, so a source that lost the Eoc
//!  completes as well.
//! ```
//!
//! Faults are accepted from the moment the device state starts loading (it
//! may touch guest RAM) and while paused: a vCPU whose page is present keeps
//! running, one that faults waits for the recovery.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use crate::admission::{Admission, ConnectionId, Provisional, MAX_PROVISIONAL_PER_CHANNEL};
use crate::bitmap::Bitmap;
use crate::channel::Channel;
use crate::config::Config;
use crate::error::{EventError, MigrationError, ProtocolError};
use crate::fallback::{Checkpoint, Digest};
use crate::layout::{PageAddress, PageNumber, RamLayout};
use crate::link::Link;
use crate::outcome::{Finished, Notice, Side};
use crate::stats::{DestinationStats, LatencyHistogram, Observed, PhaseClock};
use crate::time::Timestamp;
use crate::timer::{Timer, TimerTable};
use crate::wire::{
    self, CheckpointBegin, FallbackTerms, Frame, Hello, PageData, PageFrame, PageKind, PagePartFrame, Welcome,
    WireMode, MAX_DEVICE_STATE_CHUNK, MAX_PRESENT_WORDS,
};

/// Words of the present bitmap per recovery report frame.
const PRESENT_WORDS_PER_FRAME: usize = 1024;
const _: () = assert!(PRESENT_WORDS_PER_FRAME <= MAX_PRESENT_WORDS);

/// Most vCPUs whose blocked time is accounted one by one.
pub const MAX_TRACKED_VCPUS: usize = 64;

/// How often one page may fail to install (each failure costs a recovery)
/// before the destination gives up on the migration.
pub const MAX_INSTALL_FAILURES: u32 = 3;

/// Where the destination is in the migration. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestinationState {
    Listening,
    Precopy,
    LoadingDevice,
    AwaitingStart,
    Running,
    Completed,
    Paused,
    Recovering,
    Failed,
}

impl DestinationState {
    pub fn is_terminal(self) -> bool {
        matches!(self, DestinationState::Completed | DestinationState::Failed)
    }
}

impl fmt::Display for DestinationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DestinationState::Listening => "LISTENING",
            DestinationState::Precopy => "PRECOPY",
            DestinationState::LoadingDevice => "LOADING_DEVICE",
            DestinationState::AwaitingStart => "AWAITING_START",
            DestinationState::Running => "RUNNING",
            DestinationState::Completed => "COMPLETED",
            DestinationState::Paused => "PAUSED",
            DestinationState::Recovering => "RECOVERING",
            DestinationState::Failed => "FAILED",
        };
        f.write_str(name)
    }
}

/// Who waits for a faulting page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Waiter {
    Vcpu(u32),
    /// The VMM itself (loading device state, a device model).
    Vmm,
}

/// What the destination's driver must do.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DestinationAction {
    /// Map empty guest RAM for this layout, registered so that every access
    /// to a missing page becomes [`Destination::handle_page_fault`], and
    /// build the machine of [`Destination::machine_description`]. Finish it
    /// before transmitting anything (the welcome that may already be queued
    /// lets the source stop its guest) and before any later action.
    PrepareMemory(RamLayout),
    /// Put this content in the page and wake whoever waits for it.
    /// `overwrite` is set only for precopy pages replacing an older copy
    /// (the guest has not run here yet).
    InstallPage { page: PageNumber, data: PageData, overwrite: bool },
    /// A part of a page arriving in parts: copy `data` into the page at
    /// byte `offset` where the guest cannot see it (the page stays missing:
    /// an access still faults). An [`DestinationAction::InstallPlacedPage`]
    /// of the page follows once every part of it has been placed; a page
    /// whose parts are dropped (a lost connection, a discard) has all of
    /// its parts placed again before that.
    PlacePagePart { page: PageNumber, offset: u32, data: Bytes },
    /// Every part of the page has been placed ([`DestinationAction::PlacePagePart`]):
    /// make it visible, whole at once, and wake whoever waits for it. The
    /// page was missing (parts cross in postcopy only).
    InstallPlacedPage { page: PageNumber },
    /// Drop these pages so that the next access faults again.
    DiscardPages { first: PageNumber, count: u64 },
    /// Load the device state (it may fault on guest RAM: keep serving
    /// faults), then call [`Destination::handle_device_state_loaded`].
    LoadDeviceState(Bytes),
    /// Run the guest here.
    ResumeVcpus,
    /// The page is already present: wake threads waiting on it.
    Wake(PageNumber),
    /// Close this channel's connection; deliver nothing more from it.
    Close(Channel),
    /// The provisional connection authenticated: it is now its channel's
    /// current connection (a `Close` of the older one, if any, comes first).
    PromoteConnection(ConnectionId),
    /// Close this provisional connection; deliver nothing more from it.
    CloseConnection(ConnectionId),
    /// Write `bytes` (a last frame telling the peer why), then close.
    Farewell { channel: Channel, bytes: Bytes },
    /// Something worth telling the user.
    Notice(Notice),
    /// The migration is over for this side.
    Finished(Box<Finished<DestinationStats>>),
    /// Fallback: the lease lapsed: stop every vCPU now and keep them
    /// stopped until [`DestinationAction::ResumeVcpus`] (a renewed lease).
    /// The source counts on this taking at most its takeover margin.
    FenceVcpus,
    /// Fallback: take checkpoint `seq` at one instant: stop the vCPUs, read
    /// and clear the dirty log, copy every page the guest dirtied since the
    /// previous checkpoint (since StartGuest for the first) and the device
    /// state, resume the vCPUs (unless fenced meanwhile), then call
    /// [`Destination::handle_checkpoint`].
    TakeCheckpoint { seq: u64 },
    /// Fallback: the source took the guest back: drop this copy (memory
    /// and vCPUs); it must never run again.
    DiscardGuest,
}

/// A page fault waiting for its page: when it began and who waits, for the
/// statistics only (no decision reads them, see [`Observed`]).
#[derive(Clone, Copy, Debug)]
struct FaultWait {
    since: Timestamp,
    /// Bit `i`: vCPU `i` waits (vCPUs past 63 are counted, not named).
    vcpus: u64,
}

/// What the destination learned from the main channel's hello.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Session {
    id: u64,
    machine: Bytes,
    mode: WireMode,
    urgent_channel: bool,
    layout: RamLayout,
    /// Push streams of the migration (the main channel and `push_streams - 1` push channels).
    push_streams: u8,
}

impl Session {
    /// Whether the source of this migration writes `channel` (an urgent
    /// channel is always taken; push streams up to the hello's count).
    fn has_channel(&self, channel: Channel) -> bool {
        match channel {
            Channel::Push(stream) => stream.number() < self.push_streams,
            Channel::Main | Channel::Return | Channel::Urgent => true,
        }
    }
}

/// What the destination knows of fallback (docs/fallback.md), from the
/// source's terms on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DestFallback {
    lease: std::time::Duration,
    checkpoint_interval: std::time::Duration,
    renew_interval: std::time::Duration,
    next_request: u64,
    /// Lease requests sent and not answered, oldest first: (seq, when it
    /// was queued, no later than it left). Bounded: see `MAX_LEASE_REQUESTS`.
    requests: VecDeque<(u64, Timestamp)>,
    /// The lease holds until then (by this side's clock).
    until: Option<Timestamp>,
    /// The vCPUs are stopped for a lapsed lease.
    fenced: bool,
    /// The source sent `Released`: no lease needed any more.
    released: bool,
    /// The next checkpoint's sequence number.
    next_checkpoint: u64,
    /// A checkpoint asked of the driver and not handed in yet.
    asked: Option<u64>,
    /// The checkpoint taken and not acknowledged: re-sent whole after a
    /// recovery until the source commits it. One at a time.
    outstanding: Option<Checkpoint>,
    /// Where sending `outstanding` is (None: nothing to send).
    sending: Option<CheckpointCursor>,
    /// The digest of what was sent of `outstanding` so far, folded frame by
    /// frame (at its end in one go, it held the core lock for as long as
    /// hashing the whole checkpoint takes).
    sending_digest: Digest,
    /// The `ReleaseAck` went out: the migration is over for this side.
    release_acked: bool,
    /// The epoch whose terms arrived: a checkpoint is sent again only once
    /// this epoch's terms said whether the source committed it (the terms
    /// may arrive after the recovery's report went out).
    terms_epoch: u32,
}

/// Lease requests remembered; a grant for an older one is ignored (it only
/// renews a lease a newer request renews further).
const MAX_LEASE_REQUESTS: usize = 16;

/// The next frame of a checkpoint to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CheckpointCursor {
    Begin,
    Page(usize),
    Device(usize),
}

/// Where the destination is, with what only that state needs (the public
/// [`DestinationState`] is its name).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum State {
    Listening,
    /// The device state received so far.
    Precopy(Vec<u8>),
    LoadingDevice,
    AwaitingStart,
    Running,
    Completed,
    Paused,
    Recovering,
    Failed,
}

impl State {
    fn kind(&self) -> DestinationState {
        match self {
            State::Listening => DestinationState::Listening,
            State::Precopy(_) => DestinationState::Precopy,
            State::LoadingDevice => DestinationState::LoadingDevice,
            State::AwaitingStart => DestinationState::AwaitingStart,
            State::Running => DestinationState::Running,
            State::Completed => DestinationState::Completed,
            State::Paused => DestinationState::Paused,
            State::Recovering => DestinationState::Recovering,
            State::Failed => DestinationState::Failed,
        }
    }
}

/// The destination's state machine.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    config: Config,
    /// The page size this side backs guest RAM with.
    page_size: u32,
    /// Blocks this side backs with pages of another size, by name.
    block_page_sizes: Vec<(String, u32)>,
    /// Why the last fresh hello was refused for its page sizes, and when,
    /// for a return connection of that source that arrives after it (see
    /// `refuse_with_reason`).
    refusal: Option<(String, Timestamp)>,
    session: Option<Session>,
    epoch: u32,
    state: State,
    /// The state to return to when a recovery ends.
    guest_started: bool,
    device_loaded: bool,
    eoc_queued: bool,
    /// ReadyToRun, or a welcome saying the device state is loaded, has been
    /// transmitted: the source may have given the guest away since.
    start_possible: bool,
    links: [Link; Channel::COUNT],
    /// Connections accepted beside a live one, oldest first; see [`Admission`].
    provisional: VecDeque<Provisional>,
    /// Names the next provisional connection. Names only label connections
    /// for the driver: states that differ only in it behave alike.
    next_connection: Observed<u64>,
    /// The hello (session, epoch) seen on each connection, if any.
    hellos: [Option<(u64, u32)>; Channel::COUNT],
    present: Bitmap,
    /// Pages with a fault waiting for them. Which vCPUs wait, and since when,
    /// are observations: faults on one page by different vCPUs behave alike.
    outstanding: BTreeMap<u64, Observed<FaultWait>>,
    pending_requests: VecDeque<PageNumber>,
    control: VecDeque<Frame>,
    welcome_pending: bool,
    /// The current return connection has carried (or queued) its welcome:
    /// a later hello's welcome belongs on a newer connection.
    return_welcomed: bool,
    /// Next word of the present bitmap to report, during a recovery.
    report_word: Option<u64>,
    timers: TimerTable,
    actions: VecDeque<DestinationAction>,
    clock: Observed<PhaseClock>,
    stats: Observed<DestinationStats>,
    latency: Observed<LatencyHistogram>,
    /// Per page, how often installing it failed (see
    /// [`Destination::handle_install_failed`]).
    install_failures: BTreeMap<u64, u32>,
    /// Pages arriving in parts, by page number: made visible (installed)
    /// only once every part has arrived.
    assembling: BTreeMap<u64, Assembly>,
    /// Fallback: when the last ReadyToRun, or welcome saying the device
    /// state is loaded, left: StartGuest answers one of them, and the
    /// first lease counts from there.
    start_requested_at: Option<Timestamp>,
    /// Fallback, once the source's terms arrived.
    fallback: Option<DestFallback>,
}

/// A page arriving in parts ([`Frame::PagePart`]). Its bytes are not kept
/// here: each part is placed as it arrives
/// ([`DestinationAction::PlacePagePart`]), so a 1 GiB page is never
/// buffered whole a second time.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Assembly {
    part_len: usize,
    /// Bit i: the part at `i * part_len` arrived (at most
    /// [`wire::MAX_PAGE_PARTS`] bits).
    have: Vec<u64>,
    /// Parts arrived.
    count: usize,
    /// A part came on request: the page counts as requested.
    requested: bool,
}

impl Destination {
    /// A destination that accepts guests with pages of `page_size` bytes
    /// (in every block, unless [`Destination::with_block_page_size`] says
    /// otherwise). A hello with other page sizes is refused: this side's
    /// memory could not hold or place such pages.
    pub fn new(config: Config, page_size: u32) -> Self {
        Destination {
            config,
            page_size,
            block_page_sizes: Vec::new(),
            refusal: None,
            session: None,
            epoch: 0,
            state: State::Listening,
            guest_started: false,
            device_loaded: false,
            eoc_queued: false,
            start_possible: false,
            links: Default::default(),
            provisional: VecDeque::new(),
            next_connection: Observed(0),
            hellos: [None; Channel::COUNT],
            present: Bitmap::new(0),
            outstanding: BTreeMap::new(),
            pending_requests: VecDeque::new(),
            control: VecDeque::new(),
            welcome_pending: false,
            return_welcomed: false,
            report_word: None,
            timers: TimerTable::default(),
            actions: VecDeque::new(),
            clock: Observed::default(),
            stats: Observed::default(),
            latency: Observed::default(),
            install_failures: BTreeMap::new(),
            assembling: BTreeMap::new(),
            start_requested_at: None,
            fallback: None,
        }
    }

    /// Expects pages of `page_size` bytes in the block named `block`.
    #[must_use]
    pub fn with_block_page_size(mut self, block: &str, page_size: u32) -> Self {
        self.expect_block_page_size(block, page_size);
        self
    }

    /// Expects pages of `page_size` bytes in the block named `block` (before
    /// the hello; a hello already accepted keeps its layout).
    pub fn expect_block_page_size(&mut self, block: &str, page_size: u32) {
        self.block_page_sizes.retain(|(name, _)| name != block);
        self.block_page_sizes.push((block.to_owned(), page_size));
    }

    /// The page size this side expects in the block named `block`.
    pub fn expected_page_size(&self, block: &str) -> u32 {
        self.block_page_sizes.iter().find(|(name, _)| name == block).map_or(self.page_size, |&(_, size)| size)
    }

    // ----- getters -------------------------------------------------------

    pub fn state(&self) -> DestinationState {
        self.state.kind()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The source's machine description (opaque), once the hello arrived:
    /// build the machine from it when [`DestinationAction::PrepareMemory`] comes.
    pub fn machine_description(&self) -> Option<&Bytes> {
        self.session.as_ref().map(|s| &s.machine)
    }

    /// The guest's RAM layout, once the hello arrived.
    pub fn layout(&self) -> Option<&RamLayout> {
        self.session.as_ref().map(|s| &s.layout)
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn is_present(&self, page: PageNumber) -> bool {
        self.present.get(page.0)
    }

    pub fn pages_present(&self) -> u64 {
        self.present.count_ones()
    }

    /// Whether the guest has been started here.
    pub fn guest_started(&self) -> bool {
        self.guest_started
    }

    /// Page faults waiting for their page.
    pub fn outstanding_faults(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether `page` has a fault waiting for it.
    pub fn is_outstanding(&self, page: PageNumber) -> bool {
        self.outstanding.contains_key(&page.0)
    }

    /// Whether the end of copy is queued and not yet transmitted: every
    /// page is present as far as this side knows. A driver whose installs
    /// run outside its lock holds the EOC back while one is in flight (a
    /// failure reported in time un-queues it, see
    /// [`Destination::handle_install_failed`]).
    pub fn eoc_queued(&self) -> bool {
        self.eoc_queued
    }

    /// Fallback: whether the vCPUs are stopped for a lapsed lease.
    pub fn is_fenced(&self) -> bool {
        self.fallback.as_ref().is_some_and(|f| f.fenced)
    }

    /// Fallback: whether the source released the guest (no lease needed).
    pub fn is_released(&self) -> bool {
        self.fallback.as_ref().is_some_and(|f| f.released)
    }

    /// Whether this migration runs with fallback (the source's terms arrived).
    pub fn fallback_on(&self) -> bool {
        self.fallback.is_some()
    }

    /// Fallback: the lease the source's terms set (None before them).
    pub fn fallback_lease(&self) -> Option<std::time::Duration> {
        self.fallback.as_ref().map(|f| f.lease)
    }

    /// Fallback: how often this side takes a checkpoint (None before the
    /// source's terms).
    pub fn checkpoint_interval(&self) -> Option<std::time::Duration> {
        self.fallback.as_ref().map(|f| f.checkpoint_interval)
    }

    /// Fallback: checkpoints the driver handed in (0: none yet, or
    /// fallback off). Sequence numbers run from 1 without gaps, so this is
    /// the last one's.
    pub fn checkpoints_taken(&self) -> u64 {
        self.fallback.as_ref().map_or(0, |f| f.next_checkpoint.saturating_sub(1))
    }

    pub fn is_connected(&self, channel: Channel) -> bool {
        self.links[channel.index()].up
    }

    pub fn stats(&self, now: Timestamp) -> DestinationStats {
        let mut stats = self.stats.0.clone();
        stats.phases = self.clock.0.times(now);
        stats.fault_latency = self.latency.0.summary();
        stats
    }

    // ----- outputs -------------------------------------------------------

    #[must_use]
    pub fn poll_action(&mut self) -> Option<DestinationAction> {
        self.actions.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.next()
    }

    /// Appends frames for `channel` (only the return path is written by the
    /// destination) to `out` until it holds at least `max_bytes`; returns the
    /// number of frames appended.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Timestamp, channel: Channel, out: &mut Vec<u8>, max_bytes: usize) -> usize {
        if channel != Channel::Return {
            return 0;
        }
        self.poll_return(now, out, max_bytes, true)
    }

    /// As [`Destination::poll_transmit`] on the return path, but only the
    /// frames that keep the migration going: control frames, the
    /// present-page report and page requests, not checkpoint frames nor
    /// the end of copy (which follows them). A driver whose every thread
    /// flushes the return path after its events lets them use this, so
    /// that the thread receiving the push never waits behind tens of MiB
    /// of checkpoint, and leaves the rest to one writer of its own
    /// ([`Destination::return_bulk_pending`] tells when it has work).
    #[must_use]
    pub fn poll_transmit_urgent(&mut self, now: Timestamp, out: &mut Vec<u8>, max_bytes: usize) -> usize {
        self.poll_return(now, out, max_bytes, false)
    }

    /// Whether the return path has frames that only
    /// [`Destination::poll_transmit`] sends: a checkpoint being sent, or
    /// the end of copy.
    pub fn return_bulk_pending(&self) -> bool {
        let eoc = self.eoc_queued && !planted!(self.config, EocUnannounced);
        eoc || (self.state() == DestinationState::Running && self.checkpoint_sending())
    }

    fn checkpoint_sending(&self) -> bool {
        let epoch = self.epoch;
        self.fallback
            .as_ref()
            .filter(|f| f.terms_epoch == epoch)
            .is_some_and(|f| f.sending.is_some() && f.outstanding.is_some())
    }

    fn poll_return(&mut self, now: Timestamp, out: &mut Vec<u8>, max_bytes: usize, bulk: bool) -> usize {
        if !self.links[Channel::Return.index()].up {
            return 0;
        }
        let mut frames = 0;
        while frames == 0 || out.len() < max_bytes {
            if !self.next_return_frame(now, out, bulk) {
                break;
            }
            frames += 1;
        }
        if frames > 0 {
            self.arm_keepalive(now);
        }
        frames
    }

    // ----- events ----------------------------------------------------------

    /// A connection for `channel` was accepted (its preamble named it) from
    /// a peer not yet known to be this migration's source.
    ///
    /// While the channel has a live connection, the new one is provisional
    /// (see [`Admission`]): it cannot displace the live one before its first
    /// frame shows this migration's id and a valid epoch. The return channel
    /// carries no frame from the source, so it has nothing to show: it is
    /// admitted as by [`Destination::handle_connected`].
    pub fn handle_accepted(&mut self, now: Timestamp, channel: Channel) -> Admission {
        let index = channel.index();
        if channel == Channel::Return || !self.links[index].up || self.state() == DestinationState::Failed {
            self.handle_connected(now, channel);
            return Admission::Current;
        }
        let id = ConnectionId(self.next_connection.0);
        self.next_connection.0 += 1;
        let mut link = Link::default();
        link.connected(now);
        self.provisional.push_back(Provisional { id, channel, link, first: None });
        if self.provisional.iter().filter(|p| p.channel == channel).count() > MAX_PROVISIONAL_PER_CHANNEL {
            if let Some(oldest) = self.provisional.iter().position(|p| p.channel == channel) {
                let limit = MAX_PROVISIONAL_PER_CHANNEL;
                self.refuse_provisional(oldest, ProtocolError::TooManyProvisional { channel, limit });
            }
        }
        Admission::Provisional(id)
    }

    /// Bytes received on the provisional connection `id`.
    pub fn handle_provisional_input(&mut self, now: Timestamp, id: ConnectionId, bytes: Bytes) {
        let Some(position) = self.provisional.iter().position(|p| p.id == id) else { return };
        let candidate = &mut self.provisional[position];
        candidate.link.decoder.push(bytes);
        let channel = candidate.channel;
        match candidate.link.decoder.next_frame() {
            Ok(None) => {}
            Err(error) => self.refuse_provisional(position, ProtocolError::Wire { channel, error }),
            Ok(Some(frame)) if matches!(channel, Channel::Urgent | Channel::Push(_)) && self.session.is_none() => {
                // Its identity shows once a migration is bound; until then
                // it waits (further bytes stay buffered).
                self.provisional[position].first = Some(frame);
            }
            Ok(Some(frame)) => match self.check_provisional(channel, &frame) {
                Err(reason) => self.refuse_provisional(position, reason),
                Ok(reconnects) => self.promote(now, position, frame, reconnects),
            },
        }
    }

    /// A migration was just bound: decide the provisional connections whose
    /// first frame waited for it.
    fn recheck_provisional(&mut self, now: Timestamp) {
        while let Some(position) = self.provisional.iter().position(|p| p.first.is_some()) {
            let channel = self.provisional[position].channel;
            let Some(frame) = self.provisional[position].first.take() else { return };
            match self.check_provisional(channel, &frame) {
                Err(reason) => self.refuse_provisional(position, reason),
                Ok(reconnects) => self.promote(now, position, frame, reconnects),
            }
        }
    }

    /// The provisional connection `id` was lost or closed by its peer.
    pub fn handle_provisional_lost(&mut self, _now: Timestamp, id: ConnectionId) {
        self.provisional.retain(|p| p.id != id);
    }

    /// The id of the migration bound here (the session of the first
    /// accepted hello), None before.
    pub fn session_id(&self) -> Option<u64> {
        self.session.as_ref().map(|s| s.id)
    }

    /// The connections still provisional, oldest first.
    pub fn provisional_connections(&self) -> impl Iterator<Item = (ConnectionId, Channel)> + '_ {
        self.provisional.iter().map(|p| (p.id, p.channel))
    }

    /// A connection for `channel` was accepted and is trusted to be this
    /// migration's source: it replaces any older connection of the channel
    /// at once. [`Destination::handle_accepted`] is the untrusting variant.
    pub fn handle_connected(&mut self, now: Timestamp, channel: Channel) {
        if self.state() == DestinationState::Failed {
            self.actions.push_back(DestinationAction::Close(channel));
            return;
        }
        self.clock.0.touch(now);
        if self.state() == DestinationState::Listening && !self.timers.is_armed(Timer::Handshake) {
            self.timers.set(Timer::Handshake, now + self.config.handshake_timeout);
        }
        // A newer connection replaces an older one of the same channel.
        self.links[channel.index()].connected(now);
        self.hellos[channel.index()] = None;
        if channel == Channel::Main {
            // A new attempt: an older refusal is not its business.
            self.refusal = None;
        }
        if channel == Channel::Return {
            self.heard_from_peer(now);
            self.arm_keepalive(now);
            self.return_welcomed = false;
            self.maybe_welcome();
            self.tell_refusal(now);
        }
    }

    /// The connection for `channel` was lost; frames in flight on it are gone.
    pub fn handle_connection_lost(&mut self, now: Timestamp, channel: Channel) {
        if !self.links[channel.index()].up {
            return;
        }
        let stranger = self.unauthenticated(channel);
        self.link_down(channel);
        if !stranger {
            self.on_link_failure(now, MigrationError::ConnectionLost { channel });
        }
    }

    /// Whether `channel`'s current connection has not shown this migration's
    /// identity yet (the return channel has none to show).
    fn unauthenticated(&self, channel: Channel) -> bool {
        channel != Channel::Return && self.hellos[channel.index()].is_none()
    }

    /// Bytes received on `channel`, in chunks of any size.
    pub fn handle_input(&mut self, now: Timestamp, channel: Channel, bytes: Bytes) {
        if !self.links[channel.index()].up {
            return;
        }
        if !self.unauthenticated(channel) {
            self.heard_from_peer(now);
        }
        self.links[channel.index()].decoder.push(bytes);
        self.decode_current(now, channel);
    }

    /// Handles every complete frame buffered on `channel`'s current connection.
    fn decode_current(&mut self, now: Timestamp, channel: Channel) {
        loop {
            let link = &mut self.links[channel.index()];
            if !link.up {
                return;
            }
            match link.decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(error) = self.handle_frame(now, channel, frame) {
                        self.on_protocol_error(now, channel, error);
                    }
                }
                Ok(None) => return,
                Err(error) => self.on_protocol_error(now, channel, ProtocolError::Wire { channel, error }),
            }
        }
    }

    /// Handles one decoded frame from `channel`.
    pub fn handle_frame(&mut self, now: Timestamp, channel: Channel, frame: Frame) -> Result<(), ProtocolError> {
        let index = channel.index();
        // Every source connection opens with its hello; nothing before it
        // counts, nor shows that the source is alive.
        if self.hellos[index].is_none() {
            let shown = match (channel, frame) {
                (Channel::Main, Frame::Hello(hello)) => self.on_hello(now, hello),
                (Channel::Urgent | Channel::Push(_), Frame::UrgentHello(hello)) => {
                    self.hellos[index] = Some((hello.session, hello.epoch));
                    self.check_urgent_hello(channel);
                    Ok(())
                }
                (channel, frame) => Err(self.unexpected(channel, &frame)),
            };
            // Shown and kept (an urgent hello of another migration is closed).
            if shown.is_ok() && self.hellos[index].is_some() {
                self.heard_from_peer(now);
            }
            return shown;
        }
        self.heard_from_peer(now);
        match (channel, frame) {
            (_, Frame::Ping) => Ok(()),
            (Channel::Main | Channel::Urgent | Channel::Push(_), Frame::Page(page)) => self.on_page(now, channel, page),
            (Channel::Main | Channel::Urgent | Channel::Push(_), Frame::PagePart(part)) => {
                self.on_page_part(now, channel, part)
            }
            (Channel::Main, Frame::Discard(discard)) if self.state() == DestinationState::Precopy => {
                self.on_discard(discard)
            }
            (Channel::Main, Frame::DeviceState { last, chunk }) => self.on_device_state(now, last, chunk),
            (Channel::Main | Channel::Urgent, Frame::StartGuest) => self.on_start_guest(now, channel),
            (Channel::Main, Frame::EndOfStream) if self.device_loaded => Ok(()),
            (Channel::Main, Frame::Cancel { reason }) if !self.guest_started => {
                self.fail(now, MigrationError::CancelledByPeer(reason), None);
                Ok(())
            }
            // Also in COMPLETED: a recovery of a source that lost the Eoc or
            // the release.
            // Only a destination whose driver fences and checkpoints (its
            // own `Config::fallback` set) takes them: any other refuses the
            // migration before the switchover, and the source keeps the guest.
            (Channel::Main, Frame::FallbackTerms(terms))
                if self.config.fallback.is_some() && self.state() != DestinationState::Failed =>
            {
                self.on_fallback_terms(terms);
                Ok(())
            }
            (Channel::Main, Frame::Superseded) if self.fallback.is_some() => {
                self.superseded(now);
                Ok(())
            }
            (Channel::Main | Channel::Urgent, Frame::LeaseGrant { seq }) if self.fallback.is_some() => {
                self.on_lease_grant(now, seq);
                Ok(())
            }
            (Channel::Main | Channel::Urgent, Frame::CheckpointAck { seq }) if self.fallback.is_some() => {
                self.on_checkpoint_ack(seq);
                Ok(())
            }
            (Channel::Main | Channel::Urgent, Frame::Released) if self.fallback.is_some() && self.guest_started => {
                self.on_released(now);
                Ok(())
            }
            (channel, frame) => Err(self.unexpected(channel, &frame)),
        }
    }

    /// A thread touched a missing page (or one that raced with its install).
    pub fn handle_page_fault(&mut self, now: Timestamp, page: PageNumber, waiter: Waiter) -> Result<(), EventError> {
        if matches!(self.state(), DestinationState::Listening | DestinationState::Precopy | DestinationState::Failed) {
            return Err(self.wrong_state("page fault"));
        }
        if page.0 >= self.present.len() {
            return Err(EventError::PageOutOfRange(page.0));
        }
        if self.present.get(page.0) {
            self.stats.0.faults_on_present_pages += 1;
            self.actions.push_back(DestinationAction::Wake(page));
            return Ok(());
        }
        let vcpu_bit = match waiter {
            Waiter::Vcpu(id) if (id as usize) < MAX_TRACKED_VCPUS => 1u64 << id,
            _ => 0,
        };
        if let Some(Observed(wait)) = self.outstanding.get_mut(&page.0) {
            wait.vcpus |= vcpu_bit;
            return Ok(());
        }
        let limit = self.config.max_outstanding_requests;
        if self.outstanding.len() >= limit as usize {
            return Err(EventError::TooManyFaults { limit });
        }
        self.outstanding.insert(page.0, Observed(FaultWait { since: now, vcpus: vcpu_bit }));
        self.pending_requests.push_back(page);
        self.stats.0.remote_faults += 1;
        Ok(())
    }

    /// The device state asked for by [`DestinationAction::LoadDeviceState`]
    /// is loaded (`Ok`) or could not be (`Err` with the reason).
    pub fn handle_device_state_loaded(&mut self, now: Timestamp, result: Result<(), String>) -> Result<(), EventError> {
        match self.state() {
            DestinationState::LoadingDevice => {}
            // The migration ended while loading: nothing to do.
            DestinationState::Failed => return Ok(()),
            _ => return Err(self.wrong_state("device state loaded")),
        }
        match result {
            Ok(()) => {
                self.device_loaded = true;
                self.state = State::AwaitingStart;
                self.control.push_back(Frame::ReadyToRun);
            }
            Err(reason) => {
                let farewell = Frame::GuestDropped { reason: format!("device state failed to load: {reason}") };
                self.fail(now, MigrationError::DeviceStateLoad(reason), Some(farewell));
            }
        }
        Ok(())
    }

    /// Installing `page` (an [`DestinationAction::InstallPage`]) failed: it is
    /// not in guest memory. It becomes missing again, and the EOC, if
    /// queued, is withdrawn. The source sent it once and never sends a page
    /// twice on request, but does resend what a recovery's present report
    /// lacks; so:
    /// - before the device state is loaded, the migration fails: the guest
    ///   never ran here and the source keeps it;
    /// - from then on the destination pauses (closes its connections): the
    ///   source reconnects and resends the page, as after a lost
    ///   connection. Paused already, the next report covers it;
    /// - the [`MAX_INSTALL_FAILURES`]-th failure of one page once the guest
    ///   may run here cannot be survived: the migration ends with
    ///   [`MigrationError::InstallFailed`], the guest left here paused by
    ///   the driver, never run on memory with a hole;
    /// - after the EOC was transmitted nothing can bring the page back:
    ///   [`EventError::InstallFailedAfterEnd`] (hold the EOC while installs
    ///   are in flight, see [`Destination::eoc_queued`]).
    ///
    /// A driver retries transient failures itself before reporting one.
    pub fn handle_install_failed(
        &mut self,
        now: Timestamp,
        page: PageNumber,
        reason: String,
    ) -> Result<(), EventError> {
        match self.state() {
            DestinationState::Listening => return Err(self.wrong_state("install failed")),
            DestinationState::Failed => return Ok(()),
            _ => {}
        }
        if page.0 >= self.present.len() {
            return Err(EventError::PageOutOfRange(page.0));
        }
        if self.state() == DestinationState::Completed {
            return Err(EventError::InstallFailedAfterEnd { page: page.0 });
        }
        // A discard may have made it missing already: then nothing is lost.
        if !self.present.clear(page.0) {
            return Ok(());
        }
        self.eoc_queued = false;
        let failures = {
            let count = self.install_failures.entry(page.0).or_insert(0);
            *count += 1;
            *count
        };
        let error = MigrationError::InstallFailed { page: page.0, reason };
        match self.state() {
            DestinationState::Precopy | DestinationState::LoadingDevice => {
                let farewell = Frame::GuestDropped { reason: error.to_string() };
                self.fail(now, error, Some(farewell));
            }
            _ if failures >= MAX_INSTALL_FAILURES && (self.guest_started || self.start_possible) => {
                self.give_up_with_guest(now, error);
            }
            _ if failures >= MAX_INSTALL_FAILURES => {
                let farewell = Frame::GuestDropped { reason: error.to_string() };
                self.fail(now, error, Some(farewell));
            }
            DestinationState::Paused => {}
            _ => self.pause(now, error),
        }
        Ok(())
    }

    /// The user gives up on the migration. Allowed until the device state is
    /// loaded here; the source then keeps running the guest. Once this side
    /// has said ReadyToRun (or reported the device state loaded in a
    /// recovery), the source may transmit StartGuest, its point of no return,
    /// at any moment: only the source may cancel from then on.
    pub fn handle_cancel(&mut self, now: Timestamp) -> Result<(), EventError> {
        if self.guest_started || self.device_loaded || self.state().is_terminal() {
            return Err(self.wrong_state("cancel"));
        }
        let farewell = Frame::GuestDropped { reason: "cancelled on the destination".into() };
        self.fail(now, MigrationError::Cancelled, Some(farewell));
        Ok(())
    }

    /// The user pauses a postcopy migration here (QEMU's `migrate-pause` on
    /// the destination): the connections close as after a loss, the guest
    /// keeps running where its pages are present, and a resume hello on
    /// new connections recovers it (the driver decides where it listens).
    /// Allowed while the guest runs here or a recovery is under way
    /// (RUNNING, RECOVERING).
    pub fn handle_pause(&mut self, now: Timestamp) -> Result<(), EventError> {
        match self.state() {
            DestinationState::Running | DestinationState::Recovering => {
                self.pause(now, MigrationError::PausedByUser);
                Ok(())
            }
            _ => Err(self.wrong_state("pause")),
        }
    }

    /// A timer armed through [`Destination::poll_timeout`] expired.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let Some(timer) = self.timers.take_expired(now) else {
            return;
        };
        match timer {
            Timer::Handshake => {
                // No migration is bound yet: whoever is connected never
                // showed its identity in time. Refuse them; keep listening.
                let timeout_ms = self.config.handshake_timeout.as_millis() as u64;
                for channel in Channel::EVERY {
                    if self.links[channel.index()].up {
                        self.link_down(channel);
                        self.actions.push_back(DestinationAction::Close(channel));
                        let reason = MigrationError::HandshakeTimeout { timeout_ms };
                        self.actions.push_back(DestinationAction::Notice(Notice::StrangerRefused { channel, reason }));
                    }
                }
            }
            Timer::Start => {
                let timeout_ms = self.config.start_timeout.as_millis() as u64;
                self.fail(now, MigrationError::StartTimeout { timeout_ms }, None);
            }
            Timer::PeerTimeout => {
                let timeout_ms = self.config.peer_timeout.unwrap_or_default().as_millis() as u64;
                self.close_all_links();
                self.on_link_failure(now, MigrationError::PeerTimeout { timeout_ms });
            }
            Timer::Keepalive => {
                // The next one is due an interval from now even while this
                // one waits for room: a deadline left in the past would spin
                // a driver whose socket is full.
                self.arm_keepalive(now);
                if self.control.is_empty() {
                    self.control.push_back(Frame::Ping);
                }
            }
            Timer::Lease => self.on_lease_lapse(now),
            Timer::Renew => self.renew(now),
            Timer::Checkpoint => self.checkpoint_due(now),
            Timer::Retry | Timer::Takeover => {}
        }
    }

    // ----- internals: provisional connections -----------------------------

    /// Whether `frame`, first on a provisional `channel` connection, shows
    /// this migration's identity. Pure: a refusal changes nothing.
    /// `Ok(true)`: it opens a newer epoch (the source reconnected).
    fn check_provisional(&self, channel: Channel, frame: &Frame) -> Result<bool, ProtocolError> {
        match (channel, frame, &self.session) {
            // Nothing bound yet: the first fresh hello binds the migration.
            (Channel::Main, Frame::Hello(hello), None) if !hello.resume => Ok(false),
            (Channel::Main, Frame::Hello(hello), None) => {
                Err(ProtocolError::NothingToResume { session: hello.session })
            }
            (Channel::Main, Frame::Hello(hello), Some(session)) => {
                if hello.session != session.id {
                    return Err(ProtocolError::SessionMismatch { expected: session.id, got: hello.session });
                }
                if !hello.resume || hello.epoch <= self.epoch {
                    return Err(ProtocolError::EpochMismatch {
                        expected: self.epoch.saturating_add(1),
                        got: hello.epoch,
                    });
                }
                Ok(true)
            }
            (Channel::Urgent | Channel::Push(_), Frame::UrgentHello(hello), Some(session)) => {
                if hello.session != session.id {
                    return Err(ProtocolError::SessionMismatch { expected: session.id, got: hello.session });
                }
                if !session.has_channel(channel) {
                    return Err(self.unexpected(channel, frame));
                }
                // The main connection's epoch, or a newer one whose main
                // hello is on its way; newer than the live urgent
                // connection's if that one showed its identity.
                let current = self.hellos[Channel::Main.index()].map_or(self.epoch, |(_, epoch)| epoch);
                let least = if self.hellos[channel.index()].is_some() { current.saturating_add(1) } else { current };
                if hello.epoch < least {
                    return Err(ProtocolError::EpochMismatch { expected: least, got: hello.epoch });
                }
                Ok(hello.epoch > current)
            }
            (channel, frame, _) => Err(self.unexpected(channel, frame)),
        }
    }

    fn refuse_provisional(&mut self, position: usize, reason: ProtocolError) {
        let Some(stranger) = self.provisional.remove(position) else { return };
        self.actions.push_back(DestinationAction::CloseConnection(stranger.id));
        let notice = Notice::StrangerRefused { channel: stranger.channel, reason: reason.into() };
        self.actions.push_back(DestinationAction::Notice(notice));
    }

    /// The provisional connection at `position` authenticated with `frame`:
    /// it replaces its channel's current connection.
    fn promote(&mut self, now: Timestamp, position: usize, frame: Frame, reconnects: bool) {
        let Some(Provisional { id, channel, link, .. }) = self.provisional.remove(position) else { return };
        let index = channel.index();
        if reconnects
            && matches!(
                self.state(),
                DestinationState::AwaitingStart | DestinationState::Running | DestinationState::Recovering
            )
        {
            // The source reconnected before this side saw the old
            // connections fail: they are gone for it.
            self.pause(now, MigrationError::ConnectionLost { channel });
        }
        if self.links[index].up {
            self.link_down(channel);
            self.actions.push_back(DestinationAction::Close(channel));
        }
        self.actions.push_back(DestinationAction::PromoteConnection(id));
        self.links[index] = link;
        self.hellos[index] = None;
        self.heard_from_peer(now);
        if let Err(error) = self.handle_frame(now, channel, frame) {
            self.on_protocol_error(now, channel, error);
        }
        self.decode_current(now, channel);
    }

    // ----- internals: frames in --------------------------------------------

    fn on_hello(&mut self, now: Timestamp, hello: Hello) -> Result<(), ProtocolError> {
        if hello.page_size != self.page_size {
            return Err(ProtocolError::PageSizeMismatch { ours: self.page_size, theirs: hello.page_size });
        }
        for block in &hello.blocks {
            let ours = self.expected_page_size(&block.name);
            if block.page_size != ours {
                return Err(ProtocolError::BlockPageSizeMismatch {
                    block: block.name.clone(),
                    ours,
                    theirs: block.page_size,
                });
            }
        }
        if hello.push_streams > self.config.push_stream_count() {
            return Err(ProtocolError::PushStreamsRefused {
                asked: hello.push_streams,
                accepted: self.config.push_stream_count(),
            });
        }
        let layout = RamLayout::new(hello.page_size, hello.blocks).map_err(ProtocolError::BadLayout)?;
        if layout.total_pages() > self.config.max_guest_pages {
            return Err(ProtocolError::GuestTooLarge {
                pages: layout.total_pages(),
                limit: self.config.max_guest_pages,
            });
        }
        match (&self.session, hello.resume) {
            (None, false) if self.state() == DestinationState::Listening => {
                self.present = Bitmap::new(layout.total_pages());
                self.stats.0.bookkeeping_bytes = self.present.heap_bytes() as u64;
                self.actions.push_back(DestinationAction::PrepareMemory(layout.clone()));
                self.session = Some(Session {
                    id: hello.session,
                    machine: hello.machine,
                    mode: hello.mode,
                    urgent_channel: hello.urgent_channel,
                    layout,
                    push_streams: hello.push_streams,
                });
                self.epoch = hello.epoch;
                self.state = State::Precopy(Vec::new());
                self.timers.stop(Timer::Handshake);
                self.heard_from_peer(now);
                self.clock.0.handshake_done = Some(now);
            }
            (Some(session), true)
                if matches!(
                    self.state(),
                    DestinationState::Paused | DestinationState::Recovering | DestinationState::Completed
                ) =>
            {
                if session.id != hello.session {
                    return Err(ProtocolError::SessionMismatch { expected: session.id, got: hello.session });
                }
                if hello.epoch <= self.epoch {
                    return Err(ProtocolError::EpochMismatch {
                        expected: self.epoch.saturating_add(1),
                        got: hello.epoch,
                    });
                }
                if session.layout != layout {
                    return Err(ProtocolError::LayoutChanged);
                }
                if session.push_streams != hello.push_streams {
                    return Err(ProtocolError::PushStreamsRefused {
                        asked: hello.push_streams,
                        accepted: session.push_streams,
                    });
                }
                self.epoch = hello.epoch;
                self.eoc_queued = false;
                self.report_word = None;
                self.control.clear();
                if self.state() != DestinationState::Completed {
                    self.state = State::Recovering;
                }
                self.timers.stop(Timer::Start);
            }
            (None, true) => return Err(ProtocolError::NothingToResume { session: hello.session }),
            _ => {
                return Err(ProtocolError::UnexpectedFrame {
                    channel: Channel::Main,
                    kind: wire::FrameKind::Hello,
                    state: self.state().to_string(),
                })
            }
        }
        self.hellos[Channel::Main.index()] = Some((hello.session, hello.epoch));
        self.check_urgent_hello(Channel::Urgent);
        for channel in Channel::push_streams(crate::channel::MAX_PUSH_STREAMS) {
            self.check_urgent_hello(channel);
        }
        if self.return_welcomed && self.links[Channel::Return.index()].up {
            // The return connection already answered an older hello: the
            // source that sent this one reads a newer connection. Close it
            // and answer on the next.
            self.link_down(Channel::Return);
            self.actions.push_back(DestinationAction::Close(Channel::Return));
        }
        self.welcome_pending = true;
        self.maybe_welcome();
        self.recheck_provisional(now);
        Ok(())
    }

    /// Closes an urgent or push connection (`channel`) that belongs to
    /// another session or epoch, or a push stream the migration does not use.
    fn check_urgent_hello(&mut self, channel: Channel) {
        let (Some((session, epoch)), Some(current)) = (self.hellos[channel.index()], &self.session) else {
            return;
        };
        let main_epoch = self.hellos[Channel::Main.index()].map(|(_, e)| e);
        let reason = if session != current.id {
            ProtocolError::SessionMismatch { expected: current.id, got: session }
        } else if !current.has_channel(channel) {
            self.unexpected(channel, &Frame::UrgentHello(wire::UrgentHello { session, epoch }))
        } else {
            match main_epoch {
                Some(main_epoch) if main_epoch != epoch => {
                    ProtocolError::EpochMismatch { expected: main_epoch, got: epoch }
                }
                _ => return,
            }
        };
        self.link_down(channel);
        self.actions.push_back(DestinationAction::Close(channel));
        let notice = Notice::StrangerRefused { channel, reason: reason.into() };
        self.actions.push_back(DestinationAction::Notice(notice));
    }

    fn on_page(&mut self, now: Timestamp, channel: Channel, frame: PageFrame) -> Result<(), ProtocolError> {
        let Some(session) = &self.session else {
            return Err(self.unexpected(channel, &Frame::Page(frame)));
        };
        let layout = &session.layout;
        if layout.block_range(frame.address.block).is_none() {
            return Err(ProtocolError::BlockOutOfRange { block: frame.address.block });
        }
        let page = layout
            .page_number(frame.address)
            .ok_or(ProtocolError::PageOutOfRange { block: frame.address.block, index: frame.address.index })?;
        if let PageData::Bytes(bytes) = &frame.data {
            let expected = layout.block_page_size(frame.address.block).unwrap_or(self.page_size);
            if bytes.len() != expected as usize {
                return Err(ProtocolError::PageLength { expected, got: bytes.len() });
            }
        }
        let precopy_ok = self.state() == DestinationState::Precopy
            && session.mode == WireMode::Hybrid
            && channel == Channel::Main
            && frame.kind == PageKind::Precopy;
        let postcopy_ok = frame.kind != PageKind::Precopy && self.takes_postcopy_pages();
        if !(precopy_ok || postcopy_ok) {
            return Err(self.unexpected(channel, &Frame::Page(frame)));
        }
        // A whole copy replaces parts of an earlier one (none cross in
        // parts before a loss that dropped them, so none are left here).
        self.assembling.remove(&page.0);
        self.page_arrived(now, page, frame.kind, Some(frame.data), postcopy_ok);
        Ok(())
    }

    /// Whether pages of the postcopy kinds (requested, background) are
    /// expected now: from the device state's loading on.
    fn takes_postcopy_pages(&self) -> bool {
        matches!(
            self.state(),
            DestinationState::LoadingDevice
                | DestinationState::AwaitingStart
                | DestinationState::Running
                | DestinationState::Recovering
                | DestinationState::Completed
        )
    }

    /// A part of a page: kept until all of the page's parts have arrived,
    /// then the page is installed as a whole page frame would be.
    fn on_page_part(&mut self, now: Timestamp, channel: Channel, frame: PagePartFrame) -> Result<(), ProtocolError> {
        let postcopy_ok = frame.kind != PageKind::Precopy && self.takes_postcopy_pages();
        let Some(session) = self.session.as_ref().filter(|_| postcopy_ok) else {
            return Err(self.unexpected(channel, &Frame::PagePart(frame)));
        };
        let layout = &session.layout;
        let block = frame.address.block;
        let page_size = layout.block_page_size(block).ok_or(ProtocolError::BlockOutOfRange { block })?;
        let page = layout
            .page_number(frame.address)
            .ok_or(ProtocolError::PageOutOfRange { block, index: frame.address.index })?;
        let (len, offset) = (frame.data.len(), frame.offset as usize);
        let bad = ProtocolError::BadPagePart { page_size, offset: frame.offset, len };
        let size = page_size as usize;
        if len >= size || size % len != 0 || size / len > wire::MAX_PAGE_PARTS || offset % len != 0 || offset >= size {
            return Err(bad);
        }
        if self.present.get(page.0) {
            // A late part of a page present here never replaces it.
            self.stats.0.duplicate_pages += 1;
            return Ok(());
        }
        let parts = size / len;
        let assembly = self.assembling.entry(page.0).or_insert_with(|| Assembly {
            part_len: len,
            have: vec![0; parts.div_ceil(64)],
            count: 0,
            requested: false,
        });
        if assembly.part_len != len {
            return Err(bad);
        }
        let part = offset / len;
        let (word, bit) = (part / 64, 1u64 << (part % 64));
        let Some(have) = assembly.have.get_mut(word) else { return Err(bad) };
        if *have & bit != 0 {
            return Err(ProtocolError::DuplicatePagePart { block, index: frame.address.index, offset: frame.offset });
        }
        *have |= bit;
        assembly.count += 1;
        assembly.requested |= frame.kind == PageKind::Requested;
        let complete = assembly.count == parts;
        self.stats.0.page_parts_received += 1;
        self.actions.push_back(DestinationAction::PlacePagePart { page, offset: frame.offset, data: frame.data });
        if !complete {
            return Ok(());
        }
        let Some(assembly) = self.assembling.remove(&page.0) else { return Ok(()) };
        let kind = if assembly.requested { PageKind::Requested } else { PageKind::Background };
        self.page_arrived(now, page, kind, None, true);
        Ok(())
    }

    /// A whole page arrived (in one frame, or its last part), in a state
    /// that takes it.
    /// `data` is None for a page whose parts were placed
    /// ([`DestinationAction::PlacePagePart`]).
    fn page_arrived(
        &mut self,
        now: Timestamp,
        page: PageNumber,
        kind: PageKind,
        data: Option<PageData>,
        postcopy_ok: bool,
    ) {
        let was_present = self.present.get(page.0);
        self.stats.0.pages_received.add(kind, 1);
        if data == Some(PageData::Zero) {
            self.stats.0.pages_received.zero += 1;
        }
        if was_present && postcopy_ok {
            if planted!(self.config, BackgroundOverwritesNewer) && kind == PageKind::Background {
                if let Some(data) = data {
                    self.actions.push_back(DestinationAction::InstallPage { page, data, overwrite: true });
                }
                return;
            }
            // A late or duplicate copy never replaces the page present here:
            // the guest may have written it since.
            self.stats.0.duplicate_pages += 1;
            return;
        }
        self.present.set(page.0);
        self.actions.push_back(match data {
            Some(data) => DestinationAction::InstallPage { page, data, overwrite: was_present },
            None => DestinationAction::InstallPlacedPage { page },
        });
        if let Some(Observed(wait)) = self.outstanding.remove(&page.0) {
            let waited_ns = now.saturating_since(wait.since).as_nanos() as u64;
            self.latency.0.record_ns(waited_ns);
            let blocked = &mut self.stats.0.vcpu_blocked_ns;
            let mut vcpus = wait.vcpus;
            while vcpus != 0 {
                let vcpu = vcpus.trailing_zeros() as usize;
                vcpus &= vcpus - 1;
                if blocked.len() <= vcpu {
                    blocked.resize(vcpu + 1, 0);
                }
                blocked[vcpu] += waited_ns;
            }
        }
        self.check_end_of_copy();
    }

    fn on_discard(&mut self, discard: wire::Discard) -> Result<(), ProtocolError> {
        let Some(session) = &self.session else {
            return Err(ProtocolError::BlockOutOfRange { block: discard.block });
        };
        let range =
            session.layout.block_range(discard.block).ok_or(ProtocolError::BlockOutOfRange { block: discard.block })?;
        let block_pages = range.end - range.start;
        // Check every range before acting on any.
        for &(first, count) in &discard.ranges {
            if u64::from(first) + u64::from(count) > block_pages {
                let index = first.saturating_add(count.saturating_sub(1));
                return Err(ProtocolError::PageOutOfRange { block: discard.block, index });
            }
        }
        for (first, count) in discard.ranges {
            let first = range.start + u64::from(first);
            for page in first..first + u64::from(count) {
                self.assembling.remove(&page);
                if self.present.clear(page) {
                    self.stats.0.stale_pages_discarded += 1;
                }
            }
            self.actions.push_back(DestinationAction::DiscardPages { first: PageNumber(first), count: count.into() });
        }
        Ok(())
    }

    fn on_device_state(&mut self, now: Timestamp, last: bool, chunk: Bytes) -> Result<(), ProtocolError> {
        let State::Precopy(device_state) = &mut self.state else {
            return Err(self.unexpected(Channel::Main, &Frame::DeviceState { last, chunk }));
        };
        if device_state.is_empty() {
            // The source stopped the guest before sending this.
            self.clock.0.stopped.get_or_insert(now);
        }
        let limit = self.config.max_device_state_bytes;
        if device_state.len() as u64 + chunk.len() as u64 > limit {
            return Err(ProtocolError::DeviceStateTooLarge { limit });
        }
        device_state.extend_from_slice(&chunk);
        if last {
            self.clock.0.stopped.get_or_insert(now);
            let state = Bytes::from(std::mem::take(device_state));
            self.stats.0.device_state_bytes = state.len() as u64;
            self.state = State::LoadingDevice;
            self.actions.push_back(DestinationAction::LoadDeviceState(state));
        }
        Ok(())
    }

    fn on_start_guest(&mut self, now: Timestamp, channel: Channel) -> Result<(), ProtocolError> {
        match self.state() {
            DestinationState::AwaitingStart => {
                self.guest_started = true;
                self.state = State::Running;
                self.clock.0.started = Some(now);
                if self.fallback.is_some() {
                    self.start_under_lease(now);
                } else {
                    self.actions.push_back(DestinationAction::ResumeVcpus);
                }
                self.check_end_of_copy();
                Ok(())
            }
            // Sent again after a recovery that crossed the first one.
            DestinationState::Running | DestinationState::Completed if self.guest_started => Ok(()),
            _ => Err(self.unexpected(channel, &Frame::StartGuest)),
        }
    }

    // ----- fallback -------------------------------------------------------

    /// Checkpoint `seq`, asked for by [`DestinationAction::TakeCheckpoint`],
    /// could not be taken (the guest was fenced or dropped meanwhile, or the
    /// host failed to read its state): the next checkpoint timer asks again.
    /// The last committed checkpoint stays the one the source would use.
    pub fn handle_checkpoint_abandoned(&mut self, _now: Timestamp, seq: u64) {
        if planted!(self.config, AbandonedCheckpointNotAskedAgain) {
            return;
        }
        if let Some(fallback) = &mut self.fallback {
            if fallback.asked == Some(seq) {
                fallback.asked = None;
            }
        }
    }

    /// Checkpoint `seq`, asked for by [`DestinationAction::TakeCheckpoint`],
    /// was taken: `device_state` and every page the guest dirtied here since
    /// the previous checkpoint, as they were at one instant (a zero page
    /// may be given as [`PageData::Zero`]). The core keeps it until the
    /// source commits it, and sends it again after a recovery if needed.
    pub fn handle_checkpoint(
        &mut self,
        _now: Timestamp,
        seq: u64,
        device_state: Bytes,
        mut pages: Vec<(PageNumber, PageData)>,
    ) -> Result<(), EventError> {
        let layout = self.session.as_ref().map(|s| s.layout.clone());
        let Some(fallback) = &mut self.fallback else {
            return Err(EventError::CheckpointNotDue { seq, expected: None });
        };
        if fallback.asked != Some(seq) {
            // Released or paused-and-superseded meanwhile: nothing to send.
            if fallback.released || self.state.kind().is_terminal() {
                return Ok(());
            }
            return Err(EventError::CheckpointNotDue { seq, expected: fallback.asked });
        }
        if device_state.len() as u64 > self.config.max_device_state_bytes.min(u64::from(u32::MAX)) {
            return Err(EventError::CheckpointNotDue { seq, expected: None });
        }
        let Some(layout) = layout else {
            return Err(EventError::CheckpointNotDue { seq, expected: None });
        };
        for (page, data) in &pages {
            let expected = layout.page_size_of(*page).ok_or(EventError::PageOutOfRange(page.0))?;
            if let PageData::Bytes(bytes) = data {
                if bytes.len() != expected as usize {
                    return Err(EventError::CheckpointPageLength { page: page.0, expected, got: bytes.len() });
                }
            }
        }
        if planted!(self.config, CheckpointMissesPage) {
            pages.pop();
        }
        fallback.asked = None;
        fallback.next_checkpoint = seq + 1;
        fallback.outstanding = Some(Checkpoint { seq, device_state, pages });
        fallback.sending = Some(CheckpointCursor::Begin);
        Ok(())
    }

    fn on_fallback_terms(&mut self, terms: FallbackTerms) {
        let own = self.config.fallback.clone().unwrap_or_default();
        let fallback = self.fallback.get_or_insert_with(|| DestFallback {
            lease: std::time::Duration::from_millis(u64::from(terms.lease_ms)),
            checkpoint_interval: own.checkpoint_interval.max(std::time::Duration::from_millis(1)),
            renew_interval: own.renew_interval(std::time::Duration::from_millis(u64::from(terms.lease_ms))),
            next_request: 1,
            requests: VecDeque::new(),
            until: None,
            fenced: false,
            released: false,
            next_checkpoint: 1,
            asked: None,
            outstanding: None,
            sending: None,
            sending_digest: Digest::new(0),
            release_acked: false,
            terms_epoch: 0,
        });
        fallback.terms_epoch = self.epoch;
        // The source committed it (its acknowledgement may have been lost).
        if fallback.outstanding.as_ref().is_some_and(|c| c.seq <= terms.committed_checkpoint) {
            fallback.outstanding = None;
            fallback.sending = None;
        }
    }

    /// StartGuest arrived: the first lease counts from the moment the
    /// request it answers (ReadyToRun, or a welcome saying the device state
    /// is loaded) left. Run the guest only if it still holds.
    fn start_under_lease(&mut self, now: Timestamp) {
        let since = self.start_requested_at;
        let Some(fallback) = &mut self.fallback else { return };
        let until = since.map(|at| at + fallback.lease);
        fallback.until = until;
        let renew = fallback.renew_interval;
        let interval = fallback.checkpoint_interval;
        match until {
            Some(until) if until > now => {
                self.timers.set(Timer::Lease, until);
                self.actions.push_back(DestinationAction::ResumeVcpus);
            }
            _ => {
                // Started, but under a lapsed lease: wait for a grant.
                fallback.fenced = true;
                self.actions.push_back(DestinationAction::Notice(Notice::Fenced));
                self.request_lease(now);
            }
        }
        self.timers.set(Timer::Renew, now + renew);
        self.timers.set(Timer::Checkpoint, now + interval);
    }

    /// Queues a lease request on a live return path, after its welcome and
    /// outside a present report.
    fn request_lease(&mut self, now: Timestamp) {
        if !self.links[Channel::Return.index()].up || !self.return_welcomed || self.report_word.is_some() {
            return;
        }
        let Some(fallback) = self.fallback.as_mut().filter(|f| !f.released) else { return };
        let seq = fallback.next_request;
        fallback.next_request += 1;
        fallback.requests.push_back((seq, now));
        if fallback.requests.len() > MAX_LEASE_REQUESTS {
            fallback.requests.pop_front();
        }
        self.control.push_back(Frame::LeaseRequest { seq });
    }

    fn renew(&mut self, now: Timestamp) {
        let Some(fallback) = self.fallback.as_ref().filter(|f| !f.released) else { return };
        if !self.guest_started || self.state.kind() == DestinationState::Failed {
            return;
        }
        self.timers.set(Timer::Renew, now + fallback.renew_interval);
        // Paused or recovering: the recovery's end asks at once.
        if matches!(self.state(), DestinationState::Running | DestinationState::Completed) {
            self.request_lease(now);
        }
    }

    fn on_lease_grant(&mut self, now: Timestamp, seq: u64) {
        let plant_late_grant = planted!(self.config, FencedDestinationResumes);
        let started = self.guest_started;
        let Some(fallback) = self.fallback.as_mut().filter(|f| !f.released) else { return };
        let Some(&(_, sent)) = fallback.requests.iter().find(|(s, _)| *s == seq) else { return };
        fallback.requests.retain(|(s, _)| *s > seq);
        // From the request's departure: a grant delayed in the network must
        // not stretch the lease past the source's takeover.
        let base = if plant_late_grant { now } else { sent };
        let until = base + fallback.lease;
        if fallback.until.is_some_and(|u| u >= until) {
            return;
        }
        fallback.until = Some(until);
        self.timers.set(Timer::Lease, until);
        if fallback.fenced && until > now && started {
            fallback.fenced = false;
            self.actions.push_back(DestinationAction::ResumeVcpus);
            self.actions.push_back(DestinationAction::Notice(Notice::LeaseRestored));
        }
    }

    fn on_lease_lapse(&mut self, now: Timestamp) {
        let started = self.guest_started;
        let Some(fallback) = self.fallback.as_mut().filter(|f| !f.released && !f.fenced) else { return };
        if !started || fallback.until.is_some_and(|u| u > now) {
            return;
        }
        fallback.fenced = true;
        self.actions.push_back(DestinationAction::FenceVcpus);
        self.actions.push_back(DestinationAction::Notice(Notice::Fenced));
    }

    fn checkpoint_due(&mut self, now: Timestamp) {
        let eoc = self.eoc_queued;
        let running = self.state() == DestinationState::Running;
        let Some(fallback) = self.fallback.as_mut().filter(|f| !f.released) else { return };
        self.timers.set(Timer::Checkpoint, now + fallback.checkpoint_interval);
        if running && !eoc && !fallback.fenced && fallback.asked.is_none() && fallback.outstanding.is_none() {
            let seq = fallback.next_checkpoint;
            fallback.asked = Some(seq);
            self.actions.push_back(DestinationAction::TakeCheckpoint { seq });
        }
    }

    fn on_checkpoint_ack(&mut self, seq: u64) {
        let Some(fallback) = &mut self.fallback else { return };
        if fallback.outstanding.as_ref().is_some_and(|c| c.seq == seq) {
            fallback.outstanding = None;
            fallback.sending = None;
        }
    }

    fn on_released(&mut self, _now: Timestamp) {
        let Some(fallback) = &mut self.fallback else { return };
        if !fallback.released {
            fallback.released = true;
            fallback.asked = None;
            fallback.outstanding = None;
            fallback.sending = None;
            fallback.requests.clear();
            self.timers.stop(Timer::Lease);
            self.timers.stop(Timer::Renew);
            self.timers.stop(Timer::Checkpoint);
            if std::mem::replace(&mut fallback.fenced, false) {
                self.actions.push_back(DestinationAction::ResumeVcpus);
                self.actions.push_back(DestinationAction::Notice(Notice::LeaseRestored));
            }
        }
        self.control.push_back(Frame::ReleaseAck);
    }

    /// The source took the guest back: drop this copy, never run it again.
    fn superseded(&mut self, now: Timestamp) {
        if let Some(fallback) = &mut self.fallback {
            if self.guest_started && !fallback.fenced {
                // Only if the clocks broke the drift bound: stop at once.
                fallback.fenced = true;
                self.actions.push_back(DestinationAction::FenceVcpus);
            }
            fallback.asked = None;
            fallback.outstanding = None;
            fallback.sending = None;
        }
        self.close_all_links();
        for stranger in std::mem::take(&mut self.provisional) {
            self.actions.push_back(DestinationAction::CloseConnection(stranger.id));
        }
        self.actions.push_back(DestinationAction::DiscardGuest);
        self.state = State::Failed;
        self.forget_outgoing();
        self.timers.stop_all();
        let stats = self.stats(now);
        self.actions.push_back(DestinationAction::Finished(Box::new(Finished {
            result: Err(MigrationError::Superseded),
            guest_on: Side::Source,
            stats,
        })));
    }

    /// The next frame of the checkpoint being sent, if any.
    fn send_checkpoint_frame(&mut self, out: &mut Vec<u8>) -> bool {
        let epoch = self.epoch;
        let Some(fallback) = self.fallback.as_mut().filter(|f| f.terms_epoch == epoch) else { return false };
        let (Some(cursor), Some(checkpoint)) = (fallback.sending, &fallback.outstanding) else { return false };
        let Some(layout) = self.session.as_ref().map(|s| &s.layout) else { return false };
        if cursor == CheckpointCursor::Begin {
            fallback.sending_digest = Digest::new(checkpoint.seq);
        }
        let (frame, next) = match cursor {
            CheckpointCursor::Begin => (
                Frame::CheckpointBegin(CheckpointBegin {
                    seq: checkpoint.seq,
                    pages: checkpoint.pages.len() as u64,
                    device_bytes: checkpoint.device_state.len() as u32,
                }),
                CheckpointCursor::Page(0),
            ),
            CheckpointCursor::Page(i) => match checkpoint.pages.get(i) {
                Some((page, data)) => {
                    let Some(address) = layout.address(*page) else { return false };
                    fallback.sending_digest.page(*page, data);
                    (Frame::CheckpointPage { address, data: data.clone() }, CheckpointCursor::Page(i + 1))
                }
                None => {
                    fallback.sending = Some(CheckpointCursor::Device(0));
                    return self.send_checkpoint_frame(out);
                }
            },
            CheckpointCursor::Device(offset) if offset < checkpoint.device_state.len() => {
                let end = (offset + MAX_DEVICE_STATE_CHUNK).min(checkpoint.device_state.len());
                fallback.sending_digest.device(&checkpoint.device_state[offset..end]);
                (
                    Frame::CheckpointDevice { chunk: checkpoint.device_state.slice(offset..end) },
                    CheckpointCursor::Device(end),
                )
            }
            CheckpointCursor::Device(_) => {
                let digest = fallback.sending_digest.finish();
                debug_assert_eq!(digest, checkpoint.digest());
                wire::encode(&Frame::CheckpointEnd { seq: checkpoint.seq, digest }, out);
                fallback.sending = None;
                return true;
            }
        };
        wire::encode(&frame, out);
        fallback.sending = Some(next);
        true
    }

    // ----- internals: frames out -------------------------------------------

    /// The next frame for the return path, by priority; with `bulk`
    /// false, none of checkpoints or the end of copy.
    fn next_return_frame(&mut self, now: Timestamp, out: &mut Vec<u8>, bulk: bool) -> bool {
        if let Some(frame) = self.control.pop_front() {
            wire::encode(&frame, out);
            if matches!(frame, Frame::ReadyToRun | Frame::Welcome(Welcome { device_loaded: true, .. })) {
                self.start_possible = true;
                if self.fallback.is_some() {
                    self.start_requested_at = Some(now);
                }
            }
            if frame == Frame::ReleaseAck && self.state() == DestinationState::Completed {
                if let Some(fallback) = self.fallback.as_mut().filter(|f| !f.release_acked) {
                    fallback.release_acked = true;
                    self.finish_completed(now);
                }
            }
            return true;
        }
        if let Some(word) = self.report_word {
            self.send_present_report(now, word, out);
            return true;
        }
        if matches!(
            self.state(),
            DestinationState::LoadingDevice | DestinationState::AwaitingStart | DestinationState::Running
        ) && self.send_request(out)
        {
            return true;
        }
        if !bulk {
            return false;
        }
        if self.state() == DestinationState::Running && self.send_checkpoint_frame(out) {
            return true;
        }
        if self.eoc_queued {
            self.eoc_queued = false;
            wire::encode(&Frame::Eoc, out);
            self.complete(now);
            return true;
        }
        false
    }

    fn send_present_report(&mut self, now: Timestamp, word: u64, out: &mut Vec<u8>) {
        let word_len = self.present.word_len() as u64;
        if word >= word_len {
            wire::encode(&Frame::PresentEnd { present_pages: self.present.count_ones() }, out);
            self.report_word = None;
            self.finish_recovery(now);
            return;
        }
        let end = (word + PRESENT_WORDS_PER_FRAME as u64).min(word_len);
        let words = (word..end).map(|w| self.present.word(w as usize)).collect();
        wire::encode(&Frame::PresentPages(wire::PresentPages { first_word: word, words }), out);
        self.report_word = Some(end);
    }

    /// Builds one request frame: pending faults of one block, in order.
    fn send_request(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(session) = &self.session else {
            return false;
        };
        let layout = &session.layout;
        let batch = self.config.request_batch();
        let mut block = None;
        let mut indexes = Vec::new();
        while let Some(&page) = self.pending_requests.front() {
            if self.present.get(page.0) || !self.outstanding.contains_key(&page.0) {
                self.pending_requests.pop_front();
                continue;
            }
            let Some(PageAddress { block: b, index }) = layout.address(page) else {
                self.pending_requests.pop_front();
                continue;
            };
            if block.is_some_and(|current| current != b) || indexes.len() >= batch {
                break;
            }
            block = Some(b);
            indexes.push(index);
            self.pending_requests.pop_front();
        }
        let Some(block) = block else { return false };
        self.stats.0.requests_sent += indexes.len() as u64;
        wire::encode(&Frame::Request(wire::Request { block, indexes }), out);
        true
    }

    // ----- internals: transitions -----------------------------------------

    fn maybe_welcome(&mut self) {
        if !self.welcome_pending || !self.links[Channel::Return.index()].up {
            return;
        }
        let Some(session) = &self.session else { return };
        self.welcome_pending = false;
        self.return_welcomed = true;
        // First on the connection, ahead of anything queued while the return
        // path was not up yet (a ReadyToRun, a keep-alive).
        self.control.push_front(Frame::Welcome(Welcome {
            session: session.id,
            epoch: self.epoch,
            guest_started: self.guest_started,
            device_loaded: self.device_loaded,
            max_outstanding_requests: self.config.max_outstanding_requests,
        }));
        if matches!(self.state(), DestinationState::Recovering | DestinationState::Completed) && self.device_loaded {
            self.report_word = Some(0);
        }
    }

    fn finish_recovery(&mut self, now: Timestamp) {
        self.stats.0.recoveries += 1;
        self.clock.0.unpause(now);
        self.actions.push_back(DestinationAction::Notice(Notice::Recovered { epoch: self.epoch }));
        // Ask again for every page still awaited; the old requests died with
        // the old connections.
        self.pending_requests = self.outstanding.keys().map(|&p| PageNumber(p)).collect();
        if self.state() == DestinationState::Recovering {
            self.state = if self.guest_started { State::Running } else { State::AwaitingStart };
        }
        if self.guest_started {
            // Renew the lease at once (a fenced guest runs again on the
            // grant) and send again the checkpoint the source has not
            // committed, whole.
            self.request_lease(now);
            if let Some(fallback) = &mut self.fallback {
                if fallback.outstanding.is_some() {
                    fallback.sending = Some(CheckpointCursor::Begin);
                }
            }
        }
        self.check_end_of_copy();
    }

    fn check_end_of_copy(&mut self) {
        if !self.guest_started || self.eoc_queued || self.report_word.is_some() {
            return;
        }
        if !matches!(self.state(), DestinationState::Running | DestinationState::Completed) {
            return;
        }
        let all_present = if planted!(self.config, EarlyEoc) {
            self.present.count_ones() + 1 >= self.present.len()
        } else {
            self.present.is_full()
        };
        if all_present {
            self.eoc_queued = true;
        }
    }

    fn complete(&mut self, now: Timestamp) {
        if self.state() == DestinationState::Completed {
            return;
        }
        self.state = State::Completed;
        if let Some(fallback) = &mut self.fallback {
            if !fallback.released {
                // Every page is here, but the source may still take the
                // guest back until it sends `Released`: the lease goes on,
                // the checkpoints stop.
                fallback.asked = None;
                fallback.sending = None;
                self.timers.stop(Timer::Checkpoint);
                self.timers.stop(Timer::Keepalive);
                self.timers.stop(Timer::PeerTimeout);
                return;
            }
        }
        self.finish_completed(now);
    }

    fn finish_completed(&mut self, now: Timestamp) {
        self.timers.stop_all();
        let stats = self.stats(now);
        self.actions.push_back(DestinationAction::Finished(Box::new(Finished {
            result: Ok(()),
            guest_on: Side::Destination,
            stats,
        })));
    }

    /// Ends the migration without the guest ever running here; the source
    /// keeps it. `farewell` tells the source why, on the return path.
    fn fail(&mut self, now: Timestamp, error: MigrationError, farewell: Option<Frame>) {
        debug_assert!(!self.guest_started, "a destination that ran the guest never drops it");
        if let Some(frame) = farewell {
            if self.links[Channel::Return.index()].up {
                let mut bytes = Vec::new();
                wire::encode(&frame, &mut bytes);
                self.link_down(Channel::Return);
                self.actions.push_back(DestinationAction::Farewell { channel: Channel::Return, bytes: bytes.into() });
            }
        }
        self.close_all_links();
        for stranger in std::mem::take(&mut self.provisional) {
            self.actions.push_back(DestinationAction::CloseConnection(stranger.id));
        }
        self.state = State::Failed;
        self.timers.stop_all();
        let stats = self.stats(now);
        self.actions.push_back(DestinationAction::Finished(Box::new(Finished {
            result: Err(error),
            guest_on: Side::Source,
            stats,
        })));
    }

    /// Ends a migration whose guest may already run here but cannot be
    /// given memory without a hole: the driver keeps the guest paused.
    fn give_up_with_guest(&mut self, now: Timestamp, error: MigrationError) {
        self.close_all_links();
        self.state = State::Failed;
        self.forget_outgoing();
        self.timers.stop_all();
        let stats = self.stats(now);
        self.actions.push_back(DestinationAction::Finished(Box::new(Finished {
            result: Err(error),
            guest_on: Side::Destination,
            stats,
        })));
    }

    /// What was queued for the return path goes with its links: control
    /// frames, requests not sent, the present report, the welcome and the
    /// end of copy (a recovery queues what it needs again).
    fn forget_outgoing(&mut self) {
        self.control.clear();
        self.pending_requests.clear();
        self.report_word = None;
        self.welcome_pending = false;
        self.eoc_queued = false;
    }

    fn pause(&mut self, now: Timestamp, reason: MigrationError) {
        self.close_all_links();
        self.state = State::Paused;
        // Parts of incomplete pages are dropped: those pages are not
        // present, so the source sends them again after the recovery.
        self.assembling.clear();
        self.forget_outgoing();
        if let Some(fallback) = &mut self.fallback {
            // Cut with the connection: sent again whole after the recovery.
            fallback.sending = None;
            fallback.requests.clear();
        }
        self.clock.0.pause(now);
        // Dropping the guest is safe only while the source cannot have
        // transmitted StartGuest.
        if !self.guest_started && !self.start_possible {
            self.timers.set(Timer::Start, now + self.config.start_timeout);
        }
        self.actions.push_back(DestinationAction::Notice(Notice::Paused { reason }));
    }

    fn on_link_failure(&mut self, now: Timestamp, reason: MigrationError) {
        match self.state() {
            DestinationState::Failed | DestinationState::Paused => {}
            DestinationState::Completed => {
                // A recovery of a source that lost the EOC was cut: what it
                // had queued answers a hello of a connection now gone, and
                // must not go out on the next recovery's connections (the
                // EOC too: the next recovery's report queues it again).
                self.welcome_pending = false;
                self.report_word = None;
                self.control.clear();
                self.eoc_queued = false;
            }
            // No migration is bound: nothing to fail.
            DestinationState::Listening => {}
            DestinationState::Precopy | DestinationState::LoadingDevice => {
                // The source takes the guest back: it never ran here.
                self.fail(now, reason, None);
            }
            DestinationState::AwaitingStart | DestinationState::Running | DestinationState::Recovering => {
                self.pause(now, reason)
            }
        }
    }

    fn on_protocol_error(&mut self, now: Timestamp, channel: Channel, error: ProtocolError) {
        let stranger = if channel == Channel::Return { self.session.is_none() } else { self.unauthenticated(channel) };
        if stranger && self.state() != DestinationState::Failed {
            // The connection never showed this migration's identity: it is
            // a stranger's for all we know, and changes nothing. (The source
            // writes nothing on the return channel, so bytes there are
            // never the source's; but once a migration is bound, the return
            // connection may carry its answers, so refusing it is a loss.)
            self.link_down(channel);
            if channel == Channel::Main && self.session.is_none() && error.is_told_to_source() {
                // A fresh hello whose pages this side cannot hold: most
                // likely the real source, configured with other page sizes.
                // It hears why on the return connection (no stranger gains
                // by this: any fresh hello would bind the migration), and
                // this side keeps listening for a source that matches. Its
                // main connection is left for it to close once it has read
                // the reason (closing it here races with the farewell), and
                // nothing more from it is read.
                self.refuse_with_reason(now, &error);
                self.actions
                    .push_back(DestinationAction::Notice(Notice::StrangerRefused { channel, reason: error.into() }));
                return;
            }
            self.actions.push_back(DestinationAction::Close(channel));
            self.actions
                .push_back(DestinationAction::Notice(Notice::StrangerRefused { channel, reason: error.into() }));
            return;
        }
        match self.state() {
            DestinationState::Failed => {}
            DestinationState::Completed | DestinationState::Paused => {
                // Nothing to lose: drop the offending connection only.
                self.link_down(channel);
                self.actions.push_back(DestinationAction::Close(channel));
                self.actions
                    .push_back(DestinationAction::Notice(Notice::ConnectionRefused { channel, error: error.clone() }));
                // A recovery answer queued for those connections is cut with
                // them, as after a loss.
                self.on_link_failure(now, error.into());
            }
            DestinationState::Listening | DestinationState::Precopy | DestinationState::LoadingDevice => {
                let farewell = Frame::Reject { reason: error.to_string() };
                self.fail(now, error.into(), Some(farewell));
            }
            DestinationState::AwaitingStart | DestinationState::Running | DestinationState::Recovering => {
                self.pause(now, error.into())
            }
        }
    }

    /// Writes a `Reject` with `error` as the last frame of the current
    /// return connection, which closes; with no return connection yet, the
    /// next one gets it if it comes within the handshake timeout and before
    /// another main connection.
    fn refuse_with_reason(&mut self, now: Timestamp, error: &ProtocolError) {
        self.refusal = Some((error.to_string(), now));
        self.tell_refusal(now);
    }

    fn tell_refusal(&mut self, now: Timestamp) {
        if self.session.is_some() || !self.links[Channel::Return.index()].up {
            return;
        }
        let Some((reason, at)) = self.refusal.take() else { return };
        if now.saturating_since(at) > self.config.handshake_timeout {
            return;
        }
        let mut bytes = Vec::new();
        wire::encode(&Frame::Reject { reason }, &mut bytes);
        self.link_down(Channel::Return);
        self.actions.push_back(DestinationAction::Farewell { channel: Channel::Return, bytes: bytes.into() });
    }

    fn close_all_links(&mut self) {
        for channel in Channel::EVERY {
            if self.links[channel.index()].up {
                self.link_down(channel);
                self.actions.push_back(DestinationAction::Close(channel));
            }
        }
    }

    /// `channel`'s connection is gone, with its hello and the timers that
    /// watch it.
    fn link_down(&mut self, channel: Channel) {
        self.links[channel.index()].down();
        self.hellos[channel.index()] = None;
        if channel == Channel::Return {
            self.timers.stop(Timer::Keepalive);
        }
        if !self.links.iter().any(|l| l.up) {
            self.timers.stop(Timer::PeerTimeout);
            if self.session.is_none() {
                // Nobody left to shake hands with: a stranger that came and
                // went leaves no deadline behind.
                self.timers.stop(Timer::Handshake);
            }
        }
    }

    /// Something came from the source: it is alive. The peer timeout runs
    /// while a connection of a known session is up and the migration is not over.
    fn heard_from_peer(&mut self, now: Timestamp) {
        let Some(timeout) = self.config.peer_timeout else { return };
        if self.session.is_some() && !self.state().is_terminal() && self.links.iter().any(|l| l.up) {
            self.timers.set(Timer::PeerTimeout, now + timeout);
        }
    }

    /// A keep-alive an interval after `since` (the last write on the return
    /// channel), while the return channel is up and the migration not over.
    fn arm_keepalive(&mut self, since: Timestamp) {
        let Some(interval) = self.config.keepalive_interval else { return };
        if self.links[Channel::Return.index()].up && !self.state().is_terminal() {
            self.timers.set(Timer::Keepalive, since + interval);
        }
    }

    fn unexpected(&self, channel: Channel, frame: &Frame) -> ProtocolError {
        ProtocolError::UnexpectedFrame { channel, kind: frame.kind(), state: self.state().to_string() }
    }

    fn wrong_state(&self, event: &'static str) -> EventError {
        EventError::WrongState { event, state: self.state().to_string() }
    }
}
