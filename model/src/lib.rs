//! A [stateright] model of postcopy migration that drives the **real**
//! [`postcopy_core::Source`] and [`postcopy_core::Destination`], and checks
//! the invariants of `docs/protocol.md` exhaustively for small configurations.
//!
//! # State
//!
//! A model state is a [`postcopy_core::testkit::Pair`] (both cores, each with
//! its fake host: guest memory holding a content version per page, the
//! dirty log, which side runs the guest; three in-memory connections, each an
//! ordered queue of written batches; the [`Oracle`](postcopy_core::testkit::Oracle)
//! that knows the newest version of every page in the guest's history), plus
//! budgets that bound the environment: guest writes, lost connections (and
//! failed reconnection attempts), timer firings, one user command (cancel).
//! Keep-alives are off (`keepalive_interval: None, peer_timeout: None`):
//! a lost connection is an explicit action instead.
//!
//! Statistics inside the cores are [`Observed`](postcopy_core::stats::Observed):
//! they are not part of a state's identity, so paths that differ only in
//! counters merge. Nothing checked here reads them, except the witnesses of
//! `sometimes` properties (a witness path is the one that reached the state
//! first, whose statistics are the stored ones).
//!
//! # Actions
//!
//! - `Transmit(c)`: the writer of channel `c` writes exactly one frame (the
//!   cores choose pages as late as possible, so when a frame is written
//!   matters); at most `window` batches may be in flight per channel (TCP
//!   back-pressure).
//! - `Deliver(c)`: the oldest batch in flight on `c` reaches its reader.
//! - `Lose(c)`: the network drops connection `c` and what is in flight on it.
//! - `Timer` / `TimerConnectFails`: the earliest armed timer fires (the
//!   source's reconnection timer among them); in the second form every
//!   connection attempt it makes fails (a partition), also while the source
//!   withdraws (those cost a timer only, so that the withdrawal's attempt
//!   cap, [`WITHDRAW_ATTEMPTS`], is within the timer budget).
//! - `DestinationExits`: a destination that finished (completed, or dropped
//!   the guest) exits; every connection attempt is refused from then on.
//! - `Read`/`Write { vcpu, page }`: the guest touches a page on whichever
//!   side runs it; on the destination a missing page faults and the vCPU
//!   waits. The dirty-log sync happens when the source core asks for it.
//! - `SwitchToPostcopy`, `CancelOnSource`, `CancelOnDestination`: the user.
//!
//! vCPUs are interchangeable: a state's blocked vCPUs are kept sorted (the
//! destination core records which vCPUs wait only as an observation), which
//! is stateright's symmetry reduction done inside `next_state`, the only
//! place where it works with the BFS checker of stateright 0.31.
//!
//! # Properties
//!
//! `always`: no page lost (invariant 1: once the destination has the
//! device state, and while the source does not run the guest, every page
//! present there holds the newest version; reads see it; at COMPLETED every
//! page is present and newest), one runner
//! (invariant 2), each page crosses once in pure postcopy without a lost
//! connection (invariant 4), queues within bounds (invariant 5), the cores
//! accept every event a correct driver gives them, every connection carries
//! its frames in protocol order (the harness checks each batch as it is
//! written, as the fuzz targets do: its opening frame first and once, a
//! present report whole and in order, nothing after an Eoc), and a fair run from here
//! finishes correctly (invariant 3, below). `sometimes` properties show that the
//! interesting states are reached at all, so that no `always` passes
//! vacuously: completion, recovery after a lost connection, a hybrid
//! switchover, a fault served while the background push runs, a safe
//! cancellation, a withdrawal that ends at its attempt cap, a paused source
//! that leaves the guest to a completed destination that exited.
//!
//! # Liveness: why not `eventually`
//!
//! stateright's `eventually` only looks at paths that end in a state without
//! successors; a path that joins an already visited state is not followed,
//! so a run that loops forever without completing would pass. Invariant 3
//! is checked in two parts instead.
//!
//! 1. **From every reachable state a fair run finishes correctly** (the
//!    `always` property "a fair run completes"). On a copy of the state the
//!    real cores are driven by a deterministic fair scheduler: every channel
//!    is drained in turn, timers fire when nothing else moves, connection
//!    attempts succeed, no new faults, writes or losses. Within
//!    `fair_rounds` rounds both sides must finish as the testkit's
//!    [`Pair::check_outcome`] requires: COMPLETED on both sides with every
//!    page present and newest (and here also no vCPU waiting, no fault
//!    outstanding), or, only if the source never passed `StartGuest`, the
//!    migration abandoned with the guest running on the source. So no
//!    reachable state is a trap: whatever happened before, once faults stop,
//!    EOC leads to COMPLETED and every fault is resolved. The scheduler is a
//!    function of the state at the start of each round, so states known to
//!    finish are cached by fingerprint and a run that reaches one stops
//!    there.
//! 2. **Every run of the model is finite** ([`find_cycle`], `check
//!    --cycles`): a depth-first search over the same transitions finds no
//!    cycle. So every run within the bounds ends in a state where the model
//!    has no move left. Where that is because nothing can move at all, part 1
//!    from that state could not move either, so the state is already a
//!    correct end. Where it is because the timer budget is spent, part 1
//!    says the fair continuation finishes correctly.
//!
//! Together: within the bounds, every run without new faults finishes, and
//! finishes correctly, under any schedule, not only the one of part 1. The
//! bounds (pages, vCPUs, budgets, window) are what the argument does not
//! cover.
//!
//! # Assumptions
//!
//! - Both sides share one clock and a timer fires at the earliest armed
//!   deadline of either side (no clock skew): the source's reconnection
//!   delay (50 ms, doubling) always runs out before the destination's
//!   timeouts (seconds). Messages, on the other hand, may be arbitrarily
//!   slow: a timer may fire with anything in flight.
//! - Connections are independent: closing several at once, the testkit
//!   drops them one after the other, and a side reacts to the first loss it
//!   sees; a farewell (Cancel, GuestDropped) may so be lost with the rest.
//!   After a source-side cancel between ReadyToRun and StartGuest the
//!   destination may then wait paused for good (it cannot tell that source
//!   from one past StartGuest, core commit b134bc8): the model accepts that
//!   end, with the guest running on the source.
//! - No process crashes without fallback: a crash after StartGuest loses
//!   the guest whatever the protocol does; before it, it is a lost
//!   connection, which is modelled. A destination does exit once it has
//!   finished.
//!
//! # Fallback (`check --fallback`, docs/fallback.md)
//!
//! Both sides run with fallback; the destination may crash once after
//! StartGuest and before the source released the guest (`CrashDestination`:
//! its core stops, its connections go, nothing listens any more). The
//! destination's clock runs slow by the drift bound ([`FALLBACK_DRIFT_PPM`]),
//! the worst case the bound allows for fencing, so a lease lapses as late as
//! it may against the source's takeover timer. Lost connections with failed
//! reconnections are the partitions. Extra properties: the rollback is exact
//! (invariant 7: the harness compares the source's memory and device state
//! at a takeover with the guest's image at that checkpoint's instant); one
//! runner covers fencing; a fair run completes or falls back. The
//! destination's driver may abandon a checkpoint (`AbandonCheckpoint`, at
//! most `abandons` times): the core asks for it again at the next interval
//! and the driver carries the pages it read from the dirty log into that
//! one; `sometimes` "an abandoned checkpoint is asked for again and
//! committed". The planted bugs of [`PlantedBug::FALLBACK`] are caught
//! (`model/tests/fallback.rs`); `abandoned-checkpoint-not-asked-again`,
//! which breaks no safety property, by that `sometimes` never reached.
//! Not `eoc-unannounced`: the model polls the return path whole, as one
//! writer would, and never asks `return_bulk_pending` (the simulator and
//! the `destination_events` fuzzer check the driver's split).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use postcopy_core::testkit::{page_version, Outcome, Pair, PairConfig, Violation};
use postcopy_core::wire::{Decoder, Frame, PageData, PageKind};
use postcopy_core::{
    Channel, Config, DestinationState, FallbackConfig, MigrationError, Mode, PageNumber, PlantedBug, Side, SourceState,
    MAX_PUSH_STREAMS,
};
use stateright::{Checker, Expectation, HasDiscoveries, Model, Property};

/// Withdrawal attempts in the model's core configuration.
pub const WITHDRAW_ATTEMPTS: u32 = 2;

/// The bounds and switches of one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Guest pages (64 bytes each).
    pub pages: u64,
    /// Pages of a second block of huge pages (256 bytes each: four of the
    /// others); 0 for none.
    pub huge_pages: u64,
    /// Guest vCPUs (on the destination each may wait for one page).
    pub vcpus: u32,
    /// Precopy rounds before the switchover; 0 is pure postcopy.
    pub precopy_rounds: u32,
    /// Lost connections (and failed reconnection attempts), at most.
    pub losses: u8,
    /// Guest writes, at most.
    pub writes: u8,
    /// Timer firings, at most.
    pub timers: u8,
    /// Batches in flight per channel, at most.
    pub window: usize,
    /// Use the urgent channel for requested pages.
    pub urgent_channel: bool,
    /// Connections the background push is spread over (the main channel
    /// and `push_streams - 1` push channels, each its own pipe).
    pub push_streams: u8,
    /// The destination's device-state load touches the last page.
    pub device_page: bool,
    /// The user may cancel (once, on either side).
    pub cancel: bool,
    /// The user may switch to postcopy early (hybrid only).
    pub switch: bool,
    /// Keep blocked vCPUs sorted (symmetry reduction).
    pub symmetry: bool,
    /// Check the fair run from every state (liveness, part 1).
    pub liveness: bool,
    /// Rounds the fair run may take before it counts as stuck.
    pub fair_rounds: usize,
    /// Peers of another migration may connect to the destination at any
    /// point (each must change nothing).
    pub strangers: bool,
    /// A planted bug in both cores.
    pub plant: Option<PlantedBug>,
    /// Fallback on (docs/fallback.md): leases, fencing and checkpoints; the
    /// destination may crash once after StartGuest; its clock runs slow by
    /// the drift bound ([`FALLBACK_DRIFT_PPM`]), the latest its lease may lapse.
    pub fallback: bool,
    /// Fallback: checkpoints the destination's driver may abandon, at most
    /// (`AbandonCheckpoint`: the checkpoint timer fires and the driver gives
    /// up on the checkpoint the core asks for).
    pub abandons: u8,
}

/// The model's fallback lease: long against a checkpoint interval and a
/// renewal, so that few timer firings reach a checkpoint, a renewal, a
/// lapse and a takeover.
pub const FALLBACK_LEASE_MS: u64 = 100;
/// The drift bound of the model's fallback, and how slow the destination's
/// clock runs (the worst case it allows).
pub const FALLBACK_DRIFT_PPM: u32 = 10_000;

impl Default for ModelConfig {
    /// The CI configuration: 3 pages, 1 vCPU, 1 precopy round, 2 lost
    /// connections.
    fn default() -> Self {
        Self {
            pages: 3,
            huge_pages: 0,
            vcpus: 1,
            precopy_rounds: 1,
            losses: 2,
            writes: 2,
            timers: 3,
            window: 2,
            urgent_channel: true,
            push_streams: 1,
            device_page: false,
            cancel: true,
            switch: true,
            symmetry: true,
            liveness: true,
            fair_rounds: 200,
            strangers: true,
            plant: None,
            fallback: false,
            abandons: 0,
        }
    }
}

impl ModelConfig {
    /// The fallback configuration (`check --fallback`): 2 pages, pure
    /// postcopy, 1 vCPU, 1 lost connection, 1 write, 4 timer firings, 1
    /// batch in flight per channel, a destination crash, 1 abandoned
    /// checkpoint; no cancel, switch or strangers (checked without
    /// fallback, and unchanged by it).
    pub fn fallback() -> Self {
        Self {
            pages: 2,
            precopy_rounds: 0,
            losses: 1,
            writes: 1,
            timers: 4,
            window: 1,
            cancel: false,
            switch: false,
            strangers: false,
            fallback: true,
            abandons: 1,
            ..Self::default()
        }
    }

    /// The core configuration both sides use.
    pub fn core_config(&self) -> Config {
        let mode = if self.precopy_rounds == 0 {
            Mode::Postcopy
        } else {
            Mode::Hybrid { precopy_rounds: self.precopy_rounds }
        };
        Config {
            mode,
            urgent_channel: self.urgent_channel,
            push_streams: self.push_streams,
            keepalive_interval: None,
            peer_timeout: None,
            // A fault can be outstanding for every page, never more.
            max_outstanding_requests: (self.pages + self.huge_pages).max(1) as u32,
            // Small enough that the timer budget reaches the withdrawal's
            // cap (each attempt is a timer firing)...
            withdraw_attempts: WITHDRAW_ATTEMPTS,
            // ...and a paused source's giving up on a destination that
            // exited (refused at the first retry, 50 ms after the pause,
            // and at the second, 100 ms later).
            destination_gone_timeout: Duration::from_millis(100),
            // A checkpoint before the first renewal, a renewal twice a
            // lease: a lapse and a takeover within a few timer firings.
            fallback: self.fallback.then(|| FallbackConfig {
                lease: Duration::from_millis(FALLBACK_LEASE_MS),
                drift_ppm: FALLBACK_DRIFT_PPM,
                takeover_margin: Duration::from_millis(5),
                checkpoint_interval: Duration::from_millis(40),
                renewals_per_lease: 2,
            }),
            plant: self.plant,
            ..Config::default()
        }
    }

    /// The harness both sides run in.
    pub fn pair_config(&self) -> PairConfig {
        let mut cfg = if self.huge_pages > 0 {
            PairConfig::with_huge_pages(self.core_config(), self.pages, self.huge_pages)
        } else {
            PairConfig::new(self.core_config(), self.pages)
        };
        cfg.vcpus = self.vcpus;
        let total = self.pages + self.huge_pages;
        if self.device_page && total > 0 {
            cfg.device_pages = vec![PageNumber(total - 1)];
        }
        cfg
    }

    /// One line naming the configuration.
    pub fn summary(&self) -> String {
        format!(
            "pages={} huge_pages={} vcpus={} precopy_rounds={} losses={} writes={} timers={} window={} urgent={} push_streams={} device_page={} \
             cancel={} switch={} symmetry={} fallback={} abandons={} plant={}",
            self.pages,
            self.huge_pages,
            self.vcpus,
            self.precopy_rounds,
            self.losses,
            self.writes,
            self.timers,
            self.window,
            self.urgent_channel,
            self.push_streams,
            self.device_page,
            self.cancel,
            self.switch,
            self.symmetry,
            self.fallback,
            self.abandons,
            self.plant.map_or("none", PlantedBug::name),
        )
    }
}

/// One model state: the real cores in their harness, and what the
/// environment may still do.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct State {
    pub pair: Pair,
    pub writes_left: u8,
    pub losses_left: u8,
    pub timers_left: u8,
    pub cancel_left: bool,
    pub switch_left: bool,
    /// Fallback: the destination may still crash.
    pub crash_left: bool,
    /// Fallback: checkpoints the destination may still abandon.
    pub abandons_left: u8,
}

/// One step of the environment or of the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Transmit(Channel),
    Deliver(Channel),
    Lose(Channel),
    Timer,
    TimerConnectFails,
    /// Fallback: the earliest timer fires and the destination's driver
    /// abandons the checkpoint the core asks for (its vCPUs could not be
    /// parked: fenced meanwhile, or one waits on a page behind a
    /// partition); the pages it read from the dirty log go into the next.
    /// Refused when the timer asks for no checkpoint.
    AbandonCheckpoint,
    DestinationExits,
    Read {
        vcpu: u32,
        page: u64,
    },
    Write {
        vcpu: u32,
        page: u64,
    },
    SwitchToPostcopy,
    CancelOnSource,
    CancelOnDestination,
    /// Fallback: the destination process crashes (its guest, memory and
    /// connections gone; nothing listens any more).
    CrashDestination,
    /// A peer of another migration connects to the destination on the
    /// channel, shows its own hello (or garbage), and goes.
    Stranger {
        channel: Channel,
        garbage: bool,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Transmit(c) => write!(f, "transmit {c}"),
            Action::Deliver(c) => write!(f, "deliver {c}"),
            Action::Lose(c) => write!(f, "LOSE {c} connection"),
            Action::Timer => write!(f, "timer fires"),
            Action::TimerConnectFails => write!(f, "timer fires, connections fail"),
            Action::AbandonCheckpoint => write!(f, "timer fires, the destination ABANDONS its checkpoint"),
            Action::DestinationExits => write!(f, "the finished destination exits"),
            Action::Read { vcpu, page } => write!(f, "vCPU {vcpu} reads page {page}"),
            Action::Write { vcpu, page } => write!(f, "vCPU {vcpu} writes page {page}"),
            Action::SwitchToPostcopy => write!(f, "user: switch to postcopy"),
            Action::CancelOnSource => write!(f, "user: cancel on the source"),
            Action::CancelOnDestination => write!(f, "user: cancel on the destination"),
            Action::CrashDestination => write!(f, "the destination CRASHES"),
            Action::Stranger { channel, garbage: false } => write!(f, "a stranger's hello on {channel}"),
            Action::Stranger { channel, garbage: true } => write!(f, "a stranger's garbage on {channel}"),
        }
    }
}

/// The model: its configuration and the harness to start from.
pub struct MigrationModel {
    pub cfg: ModelConfig,
    pair_cfg: PairConfig,
    fair_cache: FairCache,
}

impl MigrationModel {
    pub fn new(cfg: ModelConfig) -> Self {
        let pair_cfg = cfg.pair_config();
        Self { cfg, pair_cfg, fair_cache: FairCache::default() }
    }

    fn hybrid(&self) -> bool {
        self.cfg.precopy_rounds > 0
    }

    fn channels(&self) -> impl Iterator<Item = Channel> {
        let urgent = self.cfg.urgent_channel;
        Channel::ALL
            .into_iter()
            .filter(move |&c| c != Channel::Urgent || urgent)
            .chain(Channel::push_streams(self.cfg.push_streams))
    }

    /// Applies `action`; false when the cores refused it (a user command
    /// in the wrong state: the user gets an error, nothing happens).
    fn apply(&self, state: &mut State, action: Action) -> bool {
        let pair = &mut state.pair;
        match action {
            Action::Transmit(channel) => {
                pair.transmit(channel, 0);
            }
            Action::Deliver(channel) => {
                pair.deliver(channel, usize::MAX);
            }
            Action::Lose(channel) => {
                state.losses_left -= 1;
                pair.lose(channel);
            }
            Action::Stranger { channel, garbage } => pair.stranger(channel, garbage),
            Action::Timer => {
                state.timers_left -= 1;
                pair.fire_timer();
            }
            Action::TimerConnectFails => {
                state.timers_left -= 1;
                // A withdrawal's failed attempts cost timers only, so that
                // the timer budget reaches its cap.
                if pair.src.core.state() != SourceState::Withdrawing {
                    state.losses_left -= 1;
                }
                pair.connect_allowed = false;
                pair.fire_timer();
                pair.connect_allowed = true;
            }
            Action::AbandonCheckpoint => {
                state.timers_left -= 1;
                state.abandons_left -= 1;
                pair.dst.abandon_checkpoints = 1;
                pair.fire_timer();
                let asked = pair.dst.abandon_checkpoints == 0;
                pair.dst.abandon_checkpoints = 0;
                if !asked {
                    // No checkpoint asked for: the same as `Timer`.
                    return false;
                }
            }
            Action::DestinationExits => {
                pair.destination_exits();
            }
            Action::Read { vcpu, page } => pair.guest_access(vcpu, PageNumber(page), false),
            Action::Write { vcpu, page } => {
                state.writes_left -= 1;
                pair.guest_access(vcpu, PageNumber(page), true);
            }
            Action::SwitchToPostcopy => {
                state.switch_left = false;
                let now = pair.now;
                if let Err(error) = pair.src.core.handle_switch_to_postcopy(now) {
                    pair.violations.push(Violation::DriverEvent { error: error.to_string() });
                }
                pair.settle();
            }
            Action::CancelOnSource => {
                state.cancel_left = false;
                let now = pair.now;
                if pair.src.core.handle_cancel(now).is_err() {
                    return false;
                }
                pair.settle();
            }
            Action::CancelOnDestination => {
                state.cancel_left = false;
                let now = pair.now;
                if pair.dst.core.handle_cancel(now).is_err() {
                    return false;
                }
                pair.settle();
            }
            Action::CrashDestination => {
                state.crash_left = false;
                pair.crash_destination();
            }
        }
        pair.check();
        if self.cfg.symmetry {
            canonicalize(pair);
        }
        true
    }
}

/// Equality, looking first where states usually differ.
fn same(a: &State, b: &State) -> bool {
    a.pair.pipes == b.pair.pipes
        && a.pair.blocked == b.pair.blocked
        && a.pair.src.core.state() == b.pair.src.core.state()
        && a.pair.dst.core.state() == b.pair.dst.core.state()
        && a.pair.dst.memory == b.pair.dst.memory
        && a == b
}

/// vCPUs are interchangeable: keep the blocked ones first, in page order.
fn canonicalize(pair: &mut Pair) {
    pair.blocked.sort_by_key(|b| match b {
        Some((page, write)) => (0, page.0, *write),
        None => (1, 0, false),
    });
}

impl Model for MigrationModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let mut pair = Pair::new(self.pair_cfg.clone());
        if self.cfg.fallback {
            pair.dst_slow_ppm = FALLBACK_DRIFT_PPM;
        }
        pair.check();
        vec![State {
            pair,
            writes_left: self.cfg.writes,
            losses_left: self.cfg.losses,
            timers_left: self.cfg.timers,
            cancel_left: self.cfg.cancel,
            switch_left: self.cfg.switch && self.hybrid(),
            crash_left: self.cfg.fallback,
            abandons_left: if self.cfg.fallback { self.cfg.abandons } else { 0 },
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        let pair = &state.pair;
        // A broken invariant ends the path (its trace stays short); so does
        // the end of the migration on both sides.
        if !pair.violations.is_empty() || pair.finished() || (pair.dst_crashed && pair.src.finished_ok.is_some()) {
            return;
        }
        for channel in self.channels() {
            let pipe = &pair.pipes[channel.index()];
            if pipe.up && !pipe.closing && pipe.in_flight.len() < self.cfg.window {
                actions.push(Action::Transmit(channel));
            }
            if !pipe.in_flight.is_empty() {
                actions.push(Action::Deliver(channel));
            }
        }
        // The guest.
        if pair.src.running && state.writes_left > 0 {
            for page in 0..pair.pages() {
                actions.push(Action::Write { vcpu: 0, page });
            }
        }
        if pair.dst.running {
            let free: Vec<u32> =
                (0..pair.blocked.len() as u32).filter(|&v| pair.blocked[v as usize].is_none()).collect();
            // With symmetry, the free vCPUs are interchangeable: one acts for all.
            let acting = if self.cfg.symmetry { &free[..free.len().min(1)] } else { &free[..] };
            for &vcpu in acting {
                for page in 0..pair.pages() {
                    // A read of a present page changes nothing: the
                    // "no page lost" property checks every present page.
                    if !pair.dst.is_present(PageNumber(page)) {
                        actions.push(Action::Read { vcpu, page });
                    }
                    if state.writes_left > 0 {
                        actions.push(Action::Write { vcpu, page });
                    }
                }
            }
        }
        // The network.
        if state.losses_left > 0 {
            for channel in self.channels() {
                if pair.pipes[channel.index()].up {
                    actions.push(Action::Lose(channel));
                }
            }
        }
        // Strangers: each must change nothing, so its next state is the
        // same one (no new state) unless a property fails.
        if self.cfg.strangers && !pair.dst_gone {
            for channel in self.channels().filter(|&c| c != Channel::Return) {
                actions.push(Action::Stranger { channel, garbage: false });
                actions.push(Action::Stranger { channel, garbage: true });
            }
        }
        // Timers.
        let src_deadline = pair.src.core.poll_timeout();
        let dst_deadline = pair.dst.core.poll_timeout();
        if state.timers_left > 0 && (src_deadline.is_some() || dst_deadline.is_some()) {
            actions.push(Action::Timer);
            let reconnecting = matches!(
                pair.src.core.state(),
                SourceState::Paused | SourceState::ErrorReceive | SourceState::Withdrawing
            );
            let source_first = match (src_deadline, dst_deadline) {
                (Some(s), Some(d)) => s <= d,
                (s, _) => s.is_some(),
            };
            let withdrawing = pair.src.core.state() == SourceState::Withdrawing;
            if (state.losses_left > 0 || withdrawing) && reconnecting && source_first {
                actions.push(Action::TimerConnectFails);
            }
            // The core asks for checkpoints only while the guest runs there.
            if state.abandons_left > 0 && pair.dst.running && !pair.dst_crashed {
                actions.push(Action::AbandonCheckpoint);
            }
        }
        // A destination that finished (completed, or dropped the guest)
        // exits: the source's attempts are refused from then on.
        if pair.dst.finished_ok.is_some() && !pair.dst_gone {
            actions.push(Action::DestinationExits);
        }
        // Fallback: the destination crashes once the guest may run there
        // (before that a crash is a lost connection, modelled as one), and
        // before the source released it (after that the guest is the
        // destination's alone, as after COMPLETED without fallback).
        if state.crash_left && pair.dst.core.guest_started() && !pair.src.core.released() {
            actions.push(Action::CrashDestination);
        }
        // The user.
        if state.switch_left
            && matches!(pair.src.core.state(), SourceState::Handshake | SourceState::Precopy | SourceState::DirtySync)
        {
            actions.push(Action::SwitchToPostcopy);
        }
        if state.cancel_left {
            let src = pair.src.core.state();
            if !src.after_start() && !src.is_terminal() {
                actions.push(Action::CancelOnSource);
            }
            if !pair.dst.core.guest_started() && !pair.dst.core.state().is_terminal() {
                actions.push(Action::CancelOnDestination);
            }
        }
    }

    fn next_state(&self, state: &State, action: Action) -> Option<State> {
        let mut next = state.clone();
        (self.apply(&mut next, action) && !same(&next, state)).then_some(next)
    }

    fn format_action(&self, action: &Action) -> String {
        action.to_string()
    }

    fn format_step(&self, state: &State, action: Action) -> Option<String> {
        let next = self.next_state(state, action)?;
        Some(format!("{}\n{:?}", describe_step(state, action, &next), next))
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always(NO_PAGE_LOST, |_: &MigrationModel, s: &State| no_page_lost(&s.pair).is_ok()),
            Property::always(ONE_RUNNER, |_: &MigrationModel, s: &State| one_runner(&s.pair).is_ok()),
            Property::always(CROSSES_ONCE, |_: &MigrationModel, s: &State| crosses_once(&s.pair).is_ok()),
            Property::always(BOUNDED, |m: &MigrationModel, s: &State| bounded(m, &s.pair).is_ok()),
            Property::always(DRIVER_CONTRACT, |_: &MigrationModel, s: &State| driver_contract(&s.pair).is_ok()),
            Property::always(FRAME_ORDER, |_: &MigrationModel, s: &State| frame_order(&s.pair).is_ok()),
            Property::always(HUGE_PAGE_WHOLE, |_: &MigrationModel, s: &State| huge_page_whole(&s.pair).is_ok()),
            Property::always(STRANGER_CHANGES_NOTHING, |_: &MigrationModel, s: &State| {
                stranger_changes_nothing(&s.pair).is_ok()
            }),
            Property::always(ROLLBACK_EXACT, |_: &MigrationModel, s: &State| rollback_exact(&s.pair).is_ok()),
            Property::always(FAIR_RUN_COMPLETES, |m: &MigrationModel, s: &State| m.fair_run_ok(&s.pair)),
            Property::sometimes("both sides complete", |_: &MigrationModel, s: &State| s.pair.completed()),
            Property::sometimes("fault served during background push", |_: &MigrationModel, s: &State| {
                fault_during_push(&s.pair)
            }),
        ];
        if self.cfg.losses > 0 {
            properties.push(Property::sometimes(
                "completes after recovering from a lost connection",
                |_: &MigrationModel, s: &State| s.pair.completed() && s.pair.src.recovered,
            ));
        }
        if self.cfg.huge_pages > 0 && self.cfg.urgent_channel {
            properties.push(Property::sometimes(
                "a request meets a huge page half pushed: its other part goes urgent",
                |_: &MigrationModel, s: &State| part_rushed(&s.pair),
            ));
        }
        if self.cfg.push_streams > 1 {
            properties.push(Property::sometimes(
                "background pages in flight on two push streams at once",
                |_: &MigrationModel, s: &State| pushed_on_two_streams(&s.pair),
            ));
        }
        if self.hybrid() {
            properties.push(Property::sometimes(
                "hybrid switchover: precopy pages, then postcopy",
                |_: &MigrationModel, s: &State| hybrid_switchover(&s.pair),
            ));
        }
        if self.cfg.losses > 0 && self.cfg.timers >= WITHDRAW_ATTEMPTS as u8 {
            properties.push(Property::sometimes(
                "a withdrawal ends at its attempt cap, the guest on the source",
                |_: &MigrationModel, s: &State| withdrawal_capped(&s.pair),
            ));
            properties.push(Property::sometimes(
                "a paused source leaves the guest to a completed destination that exited",
                |_: &MigrationModel, s: &State| {
                    s.pair.dst_gone
                        && s.pair.dst.finished_ok == Some(true)
                        && s.pair.src.finished.0.as_ref().is_some_and(|f| f.guest_on == Side::Destination)
                },
            ));
        }
        if self.cfg.fallback {
            properties.push(Property::sometimes(
                "completes with fallback on: the source releases the guest",
                |_: &MigrationModel, s: &State| s.pair.completed() && s.pair.dst.core.is_released(),
            ));
            properties.push(Property::sometimes("a checkpoint is committed", |_: &MigrationModel, s: &State| {
                s.pair.src.core.committed_checkpoint() > 0
            }));
            if self.cfg.abandons > 0 {
                properties.push(Property::sometimes(ABANDONED_ASKED_AGAIN, |_: &MigrationModel, s: &State| {
                    s.pair.dst.abandoned.is_some_and(|seq| s.pair.src.core.committed_checkpoint() >= seq)
                }));
            }
            properties.push(Property::sometimes(
                "a crashed destination: the source restarts the guest from a committed checkpoint",
                |_: &MigrationModel, s: &State| {
                    s.pair.dst_crashed && s.pair.src.core.took_over() && s.pair.src.core.committed_checkpoint() > 0
                },
            ));
            if self.cfg.losses > 0 {
                properties.push(Property::sometimes(
                    "a lapsed lease fences the destination",
                    |_: &MigrationModel, s: &State| s.pair.dst.core.is_fenced() && !s.pair.dst_crashed,
                ));
                properties.push(Property::sometimes(
                    "a partitioned destination is superseded and drops its copy",
                    |_: &MigrationModel, s: &State| {
                        s.pair.dst.finished.0.as_ref().is_some_and(|f| f.result == Err(MigrationError::Superseded))
                    },
                ));
            }
        }
        if self.cfg.cancel || self.cfg.losses > 0 {
            properties.push(Property::sometimes(
                "fails safely: guest back on the source",
                |_: &MigrationModel, s: &State| {
                    s.pair.src.finished_ok == Some(false) && s.pair.dst.finished_ok == Some(false) && s.pair.src.running
                },
            ));
        }
        properties
    }
}

pub const NO_PAGE_LOST: &str = "no page lost (invariant 1)";
pub const ONE_RUNNER: &str = "one runner (invariant 2)";
pub const CROSSES_ONCE: &str = "each page crosses once in pure postcopy (invariant 4)";
pub const BOUNDED: &str = "queues within bounds (invariant 5)";
pub const DRIVER_CONTRACT: &str = "cores accept every event of a correct driver";
pub const FRAME_ORDER: &str = "frames in protocol order on every connection";
pub const ROLLBACK_EXACT: &str =
    "after a takeover the source holds exactly the last committed checkpoint (invariant 7)";
pub const FAIR_RUN_COMPLETES: &str = "a fair run completes: EOC reaches COMPLETED, faults resolved (invariant 3)";

/// Fallback, reached with `abandons > 0`.
pub const ABANDONED_ASKED_AGAIN: &str = "an abandoned checkpoint is asked for again and committed";
pub const STRANGER_CHANGES_NOTHING: &str = "a stranger (another migration's hello, garbage) changes nothing";
pub const HUGE_PAGE_WHOLE: &str = "a huge page is never visible half-filled";

/// The names of the `always` properties.
pub const SAFETY: [&str; 10] = [
    ROLLBACK_EXACT,
    NO_PAGE_LOST,
    ONE_RUNNER,
    CROSSES_ONCE,
    BOUNDED,
    DRIVER_CONTRACT,
    FRAME_ORDER,
    STRANGER_CHANGES_NOTHING,
    HUGE_PAGE_WHOLE,
    FAIR_RUN_COMPLETES,
];

fn violation_of(pair: &Pair, matches: impl Fn(&Violation) -> bool) -> Result<(), String> {
    pair.violations.iter().find(|v| matches(v)).map_or(Ok(()), |v| Err(v.to_string()))
}

/// Invariant 1. The harness checks reads and completion; here also every
/// page present on the destination once it has the device state: the
/// guest may read any of them at any moment.
pub fn no_page_lost(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| {
        matches!(v, Violation::StaleRead { .. } | Violation::SourceStaleRead { .. } | Violation::WrongPageAtEnd { .. })
    })?;
    // Once the destination has the device state, and unless the source
    // took the guest back (the destination then never runs it: "one
    // runner"), the destination's pages are the guest's.
    let has_device_state = !matches!(
        pair.dst.core.state(),
        DestinationState::Listening | DestinationState::Precopy | DestinationState::Failed
    );
    if has_device_state && !pair.src.running {
        for page in 0..pair.pages() {
            let expected = pair.oracle.latest(PageNumber(page));
            if let Some(Some(found)) = pair.dst.memory.get(page as usize) {
                if *found != expected {
                    return Err(format!(
                        "page {page} on the destination holds version {found}, the guest's newest is {expected}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Invariant 7: a takeover restarts the guest from exactly the image of
/// the last committed checkpoint (every page at its version at that
/// instant) with that checkpoint's device state (the harness compares them
/// when the source takes the guest back).
pub fn rollback_exact(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| matches!(v, Violation::RollbackMismatch { .. } | Violation::RollbackDeviceState { .. }))
}

/// Invariant 2.
pub fn one_runner(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| matches!(v, Violation::TwoRunners | Violation::SourceResumedAfterStart))?;
    if pair.src.running && pair.dst.running {
        return Err("both sides run the guest".into());
    }
    Ok(())
}

/// Invariant 4 (the harness counts page frames per page from the bytes).
pub fn crosses_once(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| matches!(v, Violation::PageSentTwice { .. }))?;
    if pair.src.core.config().mode == Mode::Postcopy && !pair.any_loss {
        if let Some(page) = pair.page_crossings.iter().position(|&n| n > 1) {
            return Err(format!("page {page} crossed {} times", pair.page_crossings[page]));
        }
    }
    Ok(())
}

/// Invariant 5: the cores' queues (checked by the harness) and the pipes.
pub fn bounded(model: &MigrationModel, pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| matches!(v, Violation::QueueOverBound { .. }))?;
    for channel in Channel::EVERY {
        let len = pair.pipes[channel.index()].in_flight.len();
        // A farewell may follow a full window.
        if len > model.cfg.window + 1 {
            return Err(format!("{len} batches in flight on {channel}"));
        }
    }
    let waiting = pair.blocked.iter().filter(|b| b.is_some()).count();
    if pair.dst.core.outstanding_faults() > pair.pages() as usize || waiting > pair.blocked.len() {
        return Err("more faults outstanding than pages".into());
    }
    Ok(())
}

/// The cores never refuse what a correct driver does, never ask to install
/// over a present page, and carry pages and device state intact.
pub fn driver_contract(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| {
        matches!(
            v,
            Violation::DriverEvent { .. }
                | Violation::InstallOverPresent { .. }
                | Violation::CorruptPage { .. }
                | Violation::DeviceStateMismatch
        )
    })
}

/// A huge page is never visible half-filled: every page the destination
/// makes visible carries all of its block's page size, of one version (the
/// harness checks each install; a mixed page fails its content check).
pub fn huge_page_whole(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| matches!(v, Violation::HalfFilledPage { .. } | Violation::CorruptPage { .. }))
}

/// Every connection carried its frames in an order the protocol allows
/// (checked by the harness as each batch is written, as the fuzz targets
/// do): its opening frame first and once, a present report whole and in
/// order, nothing after an Eoc.
pub fn frame_order(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| matches!(v, Violation::FrameOrder { .. }))
}

/// A connection of another migration's peer left the destination as it was.
pub fn stranger_changes_nothing(pair: &Pair) -> Result<(), String> {
    violation_of(pair, |v| matches!(v, Violation::StrangerChangedState { .. }))
}

/// The source withdrew, its attempts to tell the destination failed to
/// connect, and it finished after the last one with the guest running
/// here: the destination, never told, waits paused (a connected attempt
/// ends the withdrawal at once, its farewell then delivered or lost).
fn withdrawal_capped(pair: &Pair) -> bool {
    pair.src.running
        && !pair.src.past_start
        && pair.src.core.state() == SourceState::Failed
        && pair.src.core.reconnect_attempt() == WITHDRAW_ATTEMPTS
        && pair.dst.core.state() == DestinationState::Paused
        && pair.pipes.iter().all(|p| !p.up)
}

/// The guest runs on the destination after precopy pages crossed.
fn hybrid_switchover(pair: &Pair) -> bool {
    pair.dst.core.guest_started() && pair.src.core.stats(pair.now).pages_sent.precopy > 0
}

/// A fault waits on the destination while the background push is partway:
/// the property "a fair run completes" then requires it to be served.
/// A part of a page pushed in parts is on the urgent channel: a request
/// met the page while the push was sending it.
fn part_rushed(pair: &Pair) -> bool {
    let mut decoder = Decoder::new();
    for bytes in &pair.pipes[Channel::Urgent.index()].in_flight {
        decoder.push(bytes.clone());
    }
    while let Ok(Some(frame)) = decoder.next_frame() {
        if matches!(frame, Frame::PagePart(_)) {
            return true;
        }
    }
    false
}

/// Background pages are in flight on the main channel and on a push
/// channel at once: the destination may take them in either order.
fn pushed_on_two_streams(pair: &Pair) -> bool {
    let carries_background = |channel: Channel| {
        let mut decoder = Decoder::new();
        for bytes in &pair.pipes[channel.index()].in_flight {
            decoder.push(bytes.clone());
        }
        std::iter::from_fn(|| decoder.next_frame().ok().flatten())
            .any(|frame| matches!(frame, Frame::Page(ref page) if page.kind == PageKind::Background))
    };
    carries_background(Channel::Main) && Channel::push_streams(MAX_PUSH_STREAMS).any(carries_background)
}

fn fault_during_push(pair: &Pair) -> bool {
    let sent = pair.src.core.pages_sent();
    pair.dst.core.state() == DestinationState::Running
        && pair.dst.core.outstanding_faults() > 0
        && pair.src.core.state() == SourceState::Active
        && sent > 0
        && sent < pair.pages()
}

impl MigrationModel {
    fn fair_run_ok(&self, pair: &Pair) -> bool {
        // A state that already broke an invariant is reported by that one.
        if !pair.violations.is_empty() || !self.cfg.liveness {
            return true;
        }
        fair_run_cached(pair, self.cfg.fair_rounds, Some(&self.fair_cache)).is_ok()
    }
}

fn fingerprint(pair: &Pair) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pair.hash(&mut hasher);
    hasher.finish()
}

/// Pairs known to finish correctly under the fair scheduler, by
/// fingerprint, with the rounds it takes them. The scheduler is a function
/// of the pair alone at the start of a round, so a run that reaches one of
/// these pairs ends as that pair's run did.
#[derive(Default)]
pub struct FairCache {
    shards: [Mutex<HashMap<u64, usize>>; 16],
}

impl FairCache {
    fn get(&self, fp: u64) -> Option<usize> {
        self.shards[(fp & 15) as usize].lock().ok().and_then(|shard| shard.get(&fp).copied())
    }

    fn insert(&self, fp: u64, rounds: usize) {
        if let Ok(mut shard) = self.shards[(fp & 15) as usize].lock() {
            shard.insert(fp, rounds);
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |s| s.len())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs a copy of `pair` under the fair scheduler (every channel drained in
/// turn, timers fired when nothing moves, connections succeed, no new
/// faults, writes or losses) for at most `max_rounds` rounds, and judges
/// the end. Returns the rounds taken.
pub fn fair_run(pair: &Pair, max_rounds: usize) -> Result<usize, String> {
    fair_run_cached(pair, max_rounds, None)
}

fn fair_run_cached(pair: &Pair, max_rounds: usize, cache: Option<&FairCache>) -> Result<usize, String> {
    fair_run_inner(pair, max_rounds, cache, None)
}

/// The fair run from `pair`, step by step (for counterexamples).
pub fn fair_run_log(pair: &Pair, max_rounds: usize) -> (Vec<String>, Result<usize, String>) {
    let mut log = Vec::new();
    let result = fair_run_inner(pair, max_rounds, None, Some(&mut log));
    (log, result)
}

fn fair_run_inner(
    pair: &Pair,
    max_rounds: usize,
    cache: Option<&FairCache>,
    mut log: Option<&mut Vec<String>>,
) -> Result<usize, String> {
    let mut pair = pair.clone();
    pair.connect_allowed = true;
    let mut rounds = 0;
    // Fingerprints at the start of each round, to fill the cache.
    let mut seen: Vec<u64> = Vec::new();
    let mut total = None;
    while !pair.finished() && rounds < max_rounds {
        let before = fingerprint(&pair);
        if let Some(rest) = cache.and_then(|c| c.get(before)) {
            total = Some(rounds + rest);
            break;
        }
        seen.push(before);
        rounds += 1;
        let mut moved = false;
        for channel in Channel::EVERY {
            let written = pair.transmit(channel, 1 << 16);
            moved |= written;
            if let (Some(log), true) = (log.as_deref_mut(), written) {
                let frames = pair.pipes[channel.index()].in_flight.back().map(describe_bytes).unwrap_or_default();
                log.push(format!("round {rounds}: transmit {channel:<7} {frames}"));
            }
            loop {
                let front = pair.pipes[channel.index()].in_flight.front().map(describe_bytes);
                if !pair.deliver(channel, usize::MAX) {
                    break;
                }
                moved = true;
                if let Some(log) = log.as_deref_mut() {
                    log.push(format!("round {rounds}: deliver  {channel:<7} {}", front.unwrap_or_default()));
                }
            }
        }
        pair.check();
        if let Some(violation) = pair.violations.first() {
            return Err(format!("fair run after {rounds} rounds: {violation}"));
        }
        no_page_lost(&pair)
            .and_then(|()| one_runner(&pair))
            .map_err(|e| format!("fair run after {rounds} rounds: {e}"))?;
        // A transmit may change a core without writing (the end of a
        // precopy round): that is progress too.
        if !moved && fingerprint(&pair) == before {
            if !pair.fire_timer() {
                break;
            }
            if let Some(log) = log.as_deref_mut() {
                log.push(format!("round {rounds}: timer fires (now {} ms)", pair.now.as_nanos() / 1_000_000));
            }
        }
        if let Some(log) = log.as_deref_mut() {
            log.push(format!("         {:?}", StateView(&pair)));
        }
    }
    let total = match total {
        Some(total) => total,
        None => {
            judge_end(&mut pair).map_err(|e| format!("fair run, {rounds} rounds: {e}"))?;
            rounds
        }
    };
    if total > max_rounds {
        return Err(format!("fair run took {total} rounds, more than {max_rounds}"));
    }
    if let Some(cache) = cache {
        for (i, fp) in seen.into_iter().enumerate() {
            cache.insert(fp, total - i);
        }
    }
    Ok(total)
}

/// Both sides finished, and correctly, as the testkit judges a healed run
/// ([`Pair::check_outcome`]): completed with every page newest, or
/// abandoned before StartGuest with the guest running on the source with
/// its newest content (the destination dropped its copy or, if its
/// ReadyToRun had left, waits paused: it cannot tell that source from one
/// past StartGuest). In addition: no vCPU still waits, no fault is
/// outstanding, and no page the destination holds is stale.
pub fn judge_end(pair: &mut Pair) -> Result<(), String> {
    let outcome = pair.check_outcome().map_err(|violation| {
        format!(
            "{violation} (source {}, destination {}, vCPUs waiting: {})",
            pair.src.core.state(),
            pair.dst.core.state(),
            pair.blocked.iter().filter(|b| b.is_some()).count()
        )
    })?;
    no_page_lost(pair)?;
    if matches!(outcome, Outcome::Completed | Outcome::CompletedSourceGaveUp) {
        if let Some(vcpu) = pair.blocked.iter().position(Option::is_some) {
            return Err(format!("completed with vCPU {vcpu} still waiting"));
        }
        if pair.dst.core.outstanding_faults() > 0 {
            return Err("completed with faults outstanding".into());
        }
    }
    Ok(())
}

// ----- running the checker ----------------------------------------------

/// What a check found.
pub struct CheckReport {
    pub unique_states: usize,
    pub generated_states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
    /// Failed `always` properties, each with its counterexample trace.
    pub failures: Vec<(&'static str, String)>,
    /// `sometimes` properties never witnessed (only meaningful without failures).
    pub unreached: Vec<&'static str>,
    /// `sometimes` properties witnessed.
    pub reached: Vec<&'static str>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && self.unreached.is_empty()
    }
}

/// Exhaustive breadth-first check of every property; stops at the first
/// failed `always` property.
pub fn check(cfg: &ModelConfig, threads: usize) -> CheckReport {
    let start = Instant::now();
    let model = MigrationModel::new(cfg.clone());
    let properties = model.properties();
    let checker = model.checker().threads(threads.max(1)).finish_when(HasDiscoveries::AnyFailures).spawn_bfs().join();
    let elapsed = start.elapsed();
    let discoveries = checker.discoveries();
    let mut report = CheckReport {
        unique_states: checker.unique_state_count(),
        generated_states: checker.state_count(),
        max_depth: checker.max_depth(),
        elapsed,
        failures: Vec::new(),
        unreached: Vec::new(),
        reached: Vec::new(),
    };
    for property in &properties {
        let found = discoveries.get(property.name);
        match (&property.expectation, found) {
            (Expectation::Sometimes, Some(_)) => report.reached.push(property.name),
            (Expectation::Sometimes, None) => report.unreached.push(property.name),
            (_, Some(path)) => {
                let steps = path.clone().into_vec();
                report.failures.push((property.name, format_trace(checker.model(), property.name, &steps)));
            }
            (_, None) => {}
        }
    }
    report
}

/// A counterexample, step by step: each action, what crossed the wire, and
/// the state after it.
pub fn format_trace(model: &MigrationModel, property: &str, steps: &[(State, Option<Action>)]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "counterexample for \"{property}\" ({} steps)", steps.len().saturating_sub(1));
    if let Some((first, _)) = steps.first() {
        let _ = writeln!(out, "   0. start                                  {first:?}");
    }
    for (i, window) in steps.windows(2).enumerate() {
        let (state, action) = &window[0];
        let (next, _) = &window[1];
        let Some(action) = action else { continue };
        let _ = writeln!(out, "{:4}. {}", i + 1, describe_step(state, *action, next));
        let _ = writeln!(out, "      {next:?}");
    }
    if let Some((last, _)) = steps.last() {
        let reason = match property {
            NO_PAGE_LOST => no_page_lost(&last.pair),
            ONE_RUNNER => one_runner(&last.pair),
            CROSSES_ONCE => crosses_once(&last.pair),
            BOUNDED => bounded(model, &last.pair),
            DRIVER_CONTRACT => driver_contract(&last.pair),
            FRAME_ORDER => frame_order(&last.pair),
            STRANGER_CHANGES_NOTHING => stranger_changes_nothing(&last.pair),
            ROLLBACK_EXACT => rollback_exact(&last.pair),
            FAIR_RUN_COMPLETES => {
                let _ = writeln!(out, "      then the fair run from this state (no new faults or losses):");
                let (log, result) = fair_run_log(&last.pair, model.cfg.fair_rounds);
                for line in log {
                    let _ = writeln!(out, "      {line}");
                }
                result.map(|_| ())
            }
            _ => Ok(()),
        };
        if let Err(reason) = reason {
            let _ = writeln!(out, "   => {reason}");
        }
    }
    out
}

/// An action and what it moved: the frames written or delivered.
pub fn describe_step(state: &State, action: Action, next: &State) -> String {
    let frames = match action {
        Action::Transmit(channel) => {
            let pipe = &next.pair.pipes[channel.index()];
            let before = state.pair.pipes[channel.index()].in_flight.len();
            if pipe.in_flight.len() > before {
                pipe.in_flight.back().map(describe_bytes).unwrap_or_default()
            } else {
                "(nothing to send)".into()
            }
        }
        Action::Deliver(channel) => {
            state.pair.pipes[channel.index()].in_flight.front().map(describe_bytes).unwrap_or_default()
        }
        _ => String::new(),
    };
    format!("{:<38} {frames}", action.to_string())
}

fn describe_bytes(bytes: &Bytes) -> String {
    let mut decoder = Decoder::new();
    decoder.push(bytes.clone());
    let mut parts = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => parts.push(describe_frame(&frame)),
            Ok(None) => break,
            Err(error) => {
                parts.push(format!("<{error}>"));
                break;
            }
        }
    }
    parts.join(", ")
}

/// A frame in a few words (single-block layouts: the page index is the page).
pub fn describe_frame(frame: &Frame) -> String {
    match frame {
        Frame::Hello(h) => format!("Hello(epoch {}{})", h.epoch, if h.resume { ", resume" } else { "" }),
        Frame::UrgentHello(h) => format!("UrgentHello(epoch {})", h.epoch),
        Frame::Page(p) => {
            let page = PageNumber(u64::from(p.address.index));
            let version = match &p.data {
                PageData::Zero => Some(0),
                PageData::Bytes(b) => page_version(b, page),
            };
            let kind = match p.kind {
                PageKind::Precopy => "precopy",
                PageKind::Background => "background",
                PageKind::Requested => "requested",
            };
            match version {
                Some(v) => format!("Page({} {kind} v{v})", page.0),
                None => format!("Page({} {kind} corrupt)", page.0),
            }
        }
        Frame::PagePart(p) => {
            let kind = if p.kind == PageKind::Requested { "requested" } else { "background" };
            format!(
                "PagePart(block {} page {} {kind} at {}+{})",
                p.address.block,
                p.address.index,
                p.offset,
                p.data.len()
            )
        }
        Frame::Discard(d) => {
            let ranges: Vec<String> = d.ranges.iter().map(|(first, count)| format!("{first}+{count}")).collect();
            format!("Discard({})", ranges.join(" "))
        }
        Frame::DeviceState { last, .. } => format!("DeviceState{}", if *last { "" } else { "(part)" }),
        Frame::StartGuest => "StartGuest".into(),
        Frame::EndOfStream => "EndOfStream".into(),
        Frame::Cancel { .. } => "Cancel".into(),
        Frame::Ping => "Ping".into(),
        Frame::Welcome(w) => format!(
            "Welcome(epoch {}{}{})",
            w.epoch,
            if w.guest_started { ", started" } else { "" },
            if w.device_loaded { ", device loaded" } else { "" }
        ),
        Frame::Request(r) => format!("Request{:?}", r.indexes),
        Frame::ReadyToRun => "ReadyToRun".into(),
        Frame::Eoc => "Eoc".into(),
        Frame::GuestDropped { .. } => "GuestDropped".into(),
        Frame::PresentPages(p) => format!("PresentPages({:#b})", p.words.first().copied().unwrap_or(0)),
        Frame::PresentEnd { present_pages } => format!("PresentEnd({present_pages})"),
        Frame::Reject { reason } => format!("Reject({reason})"),
        Frame::FallbackTerms(t) => {
            format!("FallbackTerms(lease {} ms, committed {})", t.lease_ms, t.committed_checkpoint)
        }
        Frame::LeaseGrant { seq } => format!("LeaseGrant({seq})"),
        Frame::CheckpointAck { seq } => format!("CheckpointAck({seq})"),
        Frame::Superseded => "Superseded".into(),
        Frame::Released => "Released".into(),
        Frame::LeaseRequest { seq } => format!("LeaseRequest({seq})"),
        Frame::CheckpointBegin(b) => format!("CheckpointBegin({}, {} pages)", b.seq, b.pages),
        Frame::CheckpointPage { address, data } => {
            let page = PageNumber(u64::from(address.index));
            let version = match data {
                PageData::Zero => Some(0),
                PageData::Bytes(b) => page_version(b, page),
            };
            match version {
                Some(v) => format!("CheckpointPage({} v{v})", page.0),
                None => format!("CheckpointPage({} corrupt)", page.0),
            }
        }
        Frame::CheckpointDevice { chunk } => format!("CheckpointDevice({} bytes)", chunk.len()),
        Frame::CheckpointEnd { seq, .. } => format!("CheckpointEnd({seq})"),
        Frame::ReleaseAck => "ReleaseAck".into(),
    }
}

/// One line: each side's state, memory and runner, the pipes' frames, the
/// oracle's newest versions.
struct StateView<'a>(&'a Pair);

impl fmt::Debug for StateView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pair = self.0;
        let pages = pair.pages();
        let src_sent: String =
            (0..pages).map(|p| if pair.src.core.is_sent(PageNumber(p)) { 's' } else { '.' }).collect();
        let dst_mem: Vec<String> =
            pair.dst.memory.iter().map(|v| v.map_or_else(|| "-".to_string(), |v| format!("v{v}"))).collect();
        let latest: Vec<String> = (0..pages).map(|p| format!("v{}", pair.oracle.latest(PageNumber(p)))).collect();
        let blocked: Vec<String> = pair
            .blocked
            .iter()
            .map(|b| match b {
                Some((page, write)) => format!("{}{}", if *write { "w" } else { "r" }, page.0),
                None => "-".into(),
            })
            .collect();
        write!(
            f,
            "src {}{} sent[{src_sent}] | dst {}{} mem[{}] waiting[{}] | newest[{}]",
            pair.src.core.state(),
            if pair.src.running { " RUNS" } else { "" },
            pair.dst.core.state(),
            if pair.dst_crashed {
                " CRASHED"
            } else if pair.dst.running {
                " RUNS"
            } else if pair.dst.core.is_fenced() {
                " FENCED"
            } else {
                ""
            },
            dst_mem.join(" "),
            blocked.join(" "),
            latest.join(" "),
        )?;
        for channel in Channel::EVERY {
            let pipe = &pair.pipes[channel.index()];
            if pipe.up || !pipe.in_flight.is_empty() {
                let frames: Vec<String> = pipe.in_flight.iter().map(describe_bytes).collect();
                write!(f, " | {channel}{}[{}]", if pipe.closing { " closing" } else { "" }, frames.join("; "))?;
            }
        }
        if !pair.violations.is_empty() {
            write!(f, " | VIOLATIONS {:?}", pair.violations)?;
        }
        Ok(())
    }
}

impl fmt::Debug for State {
    /// The pair in one line, then the budgets left.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} | left: w{} l{} t{} a{}",
            StateView(&self.pair),
            self.writes_left,
            self.losses_left,
            self.timers_left,
            self.abandons_left
        )
    }
}

// ----- cycle check (part 2 of the liveness argument) ----------------------

/// What [`find_cycle`] found.
pub struct CycleReport<A> {
    pub states: usize,
    pub elapsed: Duration,
    /// A path from the start into a cycle and round it, if there is one.
    pub cycle: Option<Vec<A>>,
}

/// Depth-first search over a model's transitions for a cycle (a run that
/// never ends). Single-threaded; keeps a fingerprint per state.
pub fn find_cycle<M>(model: &M) -> CycleReport<M::Action>
where
    M: Model,
    M::State: Hash,
    M::Action: Clone,
{
    struct Frame<S, A> {
        state: S,
        fp: u64,
        actions: Vec<A>,
        next: usize,
        via: Option<A>,
    }
    let start = Instant::now();
    // Fingerprint -> whether the state is on the current path.
    let mut on_path: HashMap<u64, bool> = HashMap::new();
    let mut stack: Vec<Frame<M::State, M::Action>> = Vec::new();
    for init in model.init_states() {
        let fp = state_fingerprint(&init);
        if on_path.contains_key(&fp) {
            continue;
        }
        on_path.insert(fp, true);
        let mut actions = Vec::new();
        model.actions(&init, &mut actions);
        stack.push(Frame { state: init, fp, actions, next: 0, via: None });
        while let Some(top) = stack.last_mut() {
            let Some(action) = top.actions.get(top.next).cloned() else {
                on_path.insert(top.fp, false);
                stack.pop();
                continue;
            };
            top.next += 1;
            let Some(next) = model.next_state(&top.state, action.clone()) else { continue };
            let fp = state_fingerprint(&next);
            match on_path.get(&fp) {
                Some(true) => {
                    let mut path: Vec<M::Action> = stack.iter().filter_map(|f| f.via.clone()).collect();
                    path.push(action);
                    return CycleReport { states: on_path.len(), elapsed: start.elapsed(), cycle: Some(path) };
                }
                Some(false) => {}
                None => {
                    on_path.insert(fp, true);
                    let mut actions = Vec::new();
                    model.actions(&next, &mut actions);
                    stack.push(Frame { state: next, fp, actions, next: 0, via: Some(action) });
                }
            }
        }
    }
    CycleReport { states: on_path.len(), elapsed: start.elapsed(), cycle: None }
}

fn state_fingerprint<S: Hash>(state: &S) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    state.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// States 0..n; `loops` adds an edge back from the last to the first.
    struct Ring {
        n: u8,
        loops: bool,
    }

    impl Model for Ring {
        type State = u8;
        type Action = u8;
        fn init_states(&self) -> Vec<u8> {
            vec![0]
        }
        fn actions(&self, state: &u8, actions: &mut Vec<u8>) {
            if *state + 1 < self.n {
                actions.push(*state + 1);
            } else if self.loops {
                actions.push(0);
            }
            // A diamond: a second way to the same state is no cycle.
            if *state + 2 < self.n {
                actions.push(*state + 2);
            }
        }
        fn next_state(&self, _: &u8, action: u8) -> Option<u8> {
            Some(action)
        }
    }

    #[test]
    fn finds_a_cycle_and_only_a_cycle() {
        let report = find_cycle(&Ring { n: 5, loops: false });
        assert_eq!(report.states, 5);
        assert!(report.cycle.is_none());
        let report = find_cycle(&Ring { n: 5, loops: true });
        assert_eq!(report.cycle, Some(vec![1, 2, 3, 4, 0]));
    }
}
