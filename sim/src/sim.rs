//! The simulation: one clock, one event queue, the two real cores and the
//! hosts that drive them, the guest, the fault injector and the checkers.
//! The network ([`crate::net::Network`]) is a component of its own: the
//! simulation feeds it inputs, schedules the timers it asks for and hands
//! the hosts what it delivers.
//!
//! Events are ordered by `(time, tie-break, sequence)`, the tie-break drawn
//! from the seeded generator when the event is scheduled, so that events of
//! one instant run in a seed-chosen order. After every event the simulation
//! drains both cores' actions (as the core's driver rules ask), lets every
//! writer with socket room call `poll_transmit`, fires fault points, re-arms
//! the cores' timers and runs the step checkers. Nothing reads the real
//! clock except to report the simulator's own speed.

use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use postcopy_core::wire::{self, Frame, Hello, PageData, UrgentHello, WireMode};
use postcopy_core::{
    Admission, Channel, ConnectionId, DeferredPage, Destination, DestinationAction, DestinationState, DestinationStats,
    Finished, MigrationError, Notice, PageNumber, ProtocolError, RamLayout, Side, Source, SourceAction, SourceState,
    SourceStats, Timestamp, Waiter,
};

use crate::check::{Checkers, StepView, Where};
use crate::guest::{decode_version, Pattern, SourceMemory, Vcpu, MISSING};
use crate::net::{scan_chunk, ConnId, NetConfig, NetInput, NetOutput, NetTimer, Network, PageCharge, Received};
use crate::report::{GuestProgress, Report, RunResult};
use crate::rng::{stream, Rng};
use crate::scenario::{
    Crash, Scenario, Triggers, CHARGED_PAGE_BYTES, HUGE_BLOCK, HUGE_CHARGED_PAGE_BYTES, NEW_ATTEMPT_DELAY_MAX_MS,
};
use crate::trace::{Trace, What};

/// The device state the simulated destination captures at checkpoint `seq`.
fn checkpoint_device_state(seq: u64) -> Bytes {
    Bytes::from(format!("device state at checkpoint {seq}"))
}

const MS: u64 = 1_000_000;
const US: u64 = 1_000;
/// A vCPU runs at most this long per event (a coarser step is faster to
/// simulate; a vCPU that is about to fault stops at the faulting access).
const QUANTUM_NS: u64 = 50 * US;
/// Timer firings at one instant without the deadline moving: a busy loop.
const TIMER_LIVELOCK: u32 = 10_000;

/// A scheduled event. `Net` carries a timer the network asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Start,
    NewAttempt,
    Vcpu {
        vcpu: u32,
        generation: u32,
    },
    Net(NetTimer),
    Timer {
        dest: bool,
        generation: u32,
    },
    VcpusStopped {
        generation: u32,
    },
    DirtySynced {
        generation: u32,
        slot: u32,
    },
    DeviceLoaded {
        generation: u32,
    },
    Switch {
        generation: u32,
    },
    Reset,
    Stranger,
    /// A source connection's sender finished the pages of its last chunk.
    StreamFree,
    PartitionStart {
        index: u32,
    },
    Heal,
    DestRestart,
    Deadline,
    AfterEnd,
    /// Fallback: the destination's driver hands in the checkpoint it took.
    CheckpointTaken {
        generation: u32,
    },
    /// Fallback: the destination process crashes after the start.
    CrashAfterStart {
        generation: u32,
    },
    /// Fallback: the destination's return writer wakes after a ring.
    ReturnWriter {
        generation: u32,
    },
}

impl Ev {
    fn name(&self) -> &'static str {
        match self {
            Ev::Start => "start",
            Ev::NewAttempt => "new-attempt",
            Ev::Vcpu { .. } => "vcpu",
            Ev::Net(timer) => timer.name(),
            Ev::Timer { .. } => "timer",
            Ev::VcpusStopped { .. } => "vcpus-stopped",
            Ev::DirtySynced { .. } => "dirty-synced",
            Ev::DeviceLoaded { .. } => "device-loaded",
            Ev::Switch { .. } => "switch",
            Ev::Reset => "reset",
            Ev::Stranger => "stranger",
            Ev::StreamFree => "stream-free",
            Ev::PartitionStart { .. } => "partition-start",
            Ev::Heal => "heal",
            Ev::DestRestart => "dest-restart",
            Ev::Deadline => "deadline",
            Ev::AfterEnd => "after-end",
            Ev::CheckpointTaken { .. } => "checkpoint-taken",
            Ev::CrashAfterStart { .. } => "crash-after-start",
            Ev::ReturnWriter { .. } => "return-writer",
        }
    }

    fn args(&self) -> (u64, u64) {
        match *self {
            Ev::Vcpu { vcpu, .. } => (u64::from(vcpu), 0),
            Ev::Net(timer) => timer.args(),
            Ev::Timer { dest, .. } => (u64::from(dest), 0),
            Ev::PartitionStart { index } => (u64::from(index), 0),
            _ => (0, 0),
        }
    }
}

/// The source's end of a channel's connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SourceSocket {
    conn: ConnId,
    /// The source learned that the connection is up (the SYN-ACK came).
    established: bool,
}

struct SourceHost {
    core: Source,
    /// Its connection of each channel.
    sockets: [Option<SourceSocket>; Channel::COUNT],
    running: bool,
    /// StartGuest was transmitted in this attempt.
    past_start: bool,
    finished: Option<Finished<SourceStats>>,
    /// Fallback: pages of the checkpoint being received, with their versions.
    staging: Vec<(u64, u64)>,
    /// Fallback: the source took the guest back from this checkpoint.
    took_over: Option<u64>,
}

struct DestHost {
    core: Destination,
    /// Its connection of each channel.
    sockets: [Option<ConnId>; Channel::COUNT],
    /// Connections the core keeps beside a live one until they show the
    /// migration's identity.
    provisional: Vec<(ConnectionId, ConnId, Channel)>,
    /// The process exists (not crashed).
    alive: bool,
    running: bool,
    /// The guest ran here in this attempt.
    started: bool,
    memory: Vec<u64>,
    /// Fallback: pages the guest wrote here since the last checkpoint (the
    /// dirty log).
    dirty: Vec<bool>,
    /// Fallback: a checkpoint taken, its vCPUs stopped until it is handed in.
    checkpoint: Option<postcopy_core::Checkpoint>,
    /// Fallback: a checkpoint asked for while a vCPU waited on a missing
    /// page: the vCPUs are stopped and it waits for that one to park (when
    /// its page arrives), or is abandoned if the guest is fenced or
    /// dropped first, as the KVM driver does.
    parking: Option<u64>,
    /// A device-state load: done at this time, once its pages are present.
    load_until: Option<u64>,
    finished: Option<Finished<DestinationStats>>,
    /// Pages whose parts are being placed where the guest cannot see them
    /// (the driver's placement mapping): their bytes, and which bytes a
    /// part wrote.
    placed: std::collections::BTreeMap<u64, (Vec<u8>, Vec<bool>)>,
    /// Fallback with `return_writer_us`: the writer of checkpoints and the
    /// end of copy.
    return_writer: ReturnWriter,
}

/// The destination's return writer (the KVM driver's `dst-return` thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReturnWriter {
    /// Waits for a ring.
    Asleep,
    /// Rung; wakes at an `Ev::ReturnWriter`.
    Rung,
    /// Polls the return path whole until a poll writes nothing.
    Writing,
}

impl SourceHost {
    /// The connection the source uses for `channel`.
    fn conn(&self, channel: Channel) -> Option<ConnId> {
        self.sockets[channel.index()].map(|socket| socket.conn)
    }
}

impl DestHost {
    /// Fallback: a checkpoint holds the vCPUs stopped (waiting for them to
    /// park, or taken and not handed in yet).
    fn checkpointing(&self) -> bool {
        self.checkpoint.is_some() || self.parking.is_some()
    }

    fn new(scenario: &Scenario) -> Self {
        Self {
            core: Destination::new(scenario.config(), scenario.wire_page_bytes)
                .with_block_page_size(HUGE_BLOCK, scenario.huge_wire_bytes()),
            sockets: [None; Channel::COUNT],
            provisional: Vec::new(),
            alive: true,
            running: false,
            started: false,
            memory: Vec::new(),
            dirty: Vec::new(),
            checkpoint: None,
            parking: None,
            load_until: None,
            finished: None,
            placed: std::collections::BTreeMap::new(),
            return_writer: ReturnWriter::Asleep,
        }
    }
}

/// One simulated migration.
pub struct Sim {
    sc: Scenario,
    layout: RamLayout,
    block_start: Vec<u64>,
    /// Global page numbers of the huge-page block (empty without one).
    huge_block: std::ops::Range<u64>,
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64, u64, Ev)>>,
    seq: u64,
    rng: Rng,

    attempt: u32,
    /// Generation of each host's core (0 source, 1 destination): events
    /// of a replaced core are ignored.
    generation: [u32; 2],
    attempt_start: u64,
    src: SourceHost,
    dst: DestHost,
    src_mem: SourceMemory,
    device_state: Bytes,
    device_pages: Vec<u64>,
    vcpus: Vec<Vcpu>,
    vcpu_generation: u32,
    blocked: u32,
    /// Fallback: checkpoints the destination's driver abandoned, and of
    /// those the ones abandoned waiting for a vCPU to park.
    checkpoints_abandoned: u64,
    checkpoints_abandoned_parking: u64,
    /// Fallback: times the destination's return writer woke for a ring.
    return_writer_wakes: u64,

    net: Network,
    partitions: Vec<(u64, bool)>,
    pending_dirty: Vec<Vec<u64>>,

    faults_on: bool,
    healed: bool,
    heal_at: u64,
    trigger_budget: [u32; 5],
    crash_done: bool,
    timer_at: [Option<u64>; 2],
    /// Per source channel: its sender (one thread per connection) is busy
    /// with the pages it last wrote until then (`stream_page_ns` a page).
    sender_busy_until: [u64; Channel::COUNT],
    timer_spins: [(u64, u32); 2],
    last_states: (SourceState, Option<DestinationState>),

    checks: Checkers,
    trace: Trace,
    done: bool,

    // Measurements.
    events: u64,
    page_frames: u64,
    accesses: [u64; 4],
    start_at: Option<u64>,
    stop_at: Option<u64>,
    dst_started_at: Option<u64>,
    completed_at: Option<u64>,
    notes: Vec<String>,
}

impl Sim {
    pub fn new(sc: Scenario, trace_tail: usize) -> Self {
        let layout = sc.layout();
        let block_start = (0..layout.blocks().len() as u32).map(|b| layout.block_start(b).map_or(0, |p| p.0)).collect();
        let pages = layout.total_pages();
        let mut content = Rng::new(sc.seed, stream::CONTENT);
        let mut checks = Checkers::new(pages);
        let mut src_mem = SourceMemory::new(pages);
        // The guest's RAM before the migration: some pages zero, the others
        // written once (that history is the checkers').
        for page in 0..pages {
            if content.below(100) >= u64::from(sc.zero_pct) {
                src_mem.versions[page as usize] = checks.write(page);
            }
        }
        src_mem.take_dirty();
        let ws_len = (pages * u64::from(sc.working_set_pct) / 100).max(1);
        let ws_base = content.below(pages - ws_len + 1);
        let vcpus = (0..sc.vcpus)
            .map(|i| Vcpu { pattern: Pattern::new(&sc, i, ws_base, ws_len), pending: None, blocked_on: None, until: 0 })
            .collect();
        let device_pages = (0..sc.device_pages).map(|_| content.below(pages)).collect();
        let device_state: Bytes =
            (0..sc.device_state_bytes).map(|i| (i as u8) ^ (sc.seed as u8).rotate_left(i as u32 % 8)).collect();
        let mut rng = Rng::new(sc.seed, stream::WORLD);
        let session = rng.u64();
        let partitions = (0..sc.partitions)
            .map(|_| (rng.log_uniform(1, sc.partition_max_ms.max(1)) * MS, rng.chance(0.5)))
            .collect();
        let src = SourceHost {
            core: Source::new(sc.config(), layout.clone(), session),
            sockets: [None; Channel::COUNT],
            running: true,
            past_start: false,
            finished: None,
            staging: Vec::new(),
            took_over: None,
        };
        let dst = DestHost::new(&sc);
        let budget = sc.trigger_budget;
        let faults_on = sc.faults;
        let initial_state = src.core.state();
        let net = Network::new(NetConfig {
            latency_ns: sc.latency_us * US,
            jitter_ns: sc.jitter_us * US,
            bandwidth_mbps: sc.bandwidth_mbps,
            connect_timeout_ns: sc.connect_timeout_ms * MS,
            buffer_bytes: sc.buffer_kib * 1024,
            charge: sc.page_charge(),
        });
        let huge_block = layout.block_index(HUGE_BLOCK).and_then(|b| layout.block_range(b)).unwrap_or(0..0);
        Sim {
            layout,
            block_start,
            huge_block,
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            rng,
            attempt: 1,
            generation: [0, 0],
            attempt_start: 0,
            src,
            dst,
            src_mem,
            device_state,
            device_pages,
            vcpus,
            vcpu_generation: 0,
            blocked: 0,
            checkpoints_abandoned: 0,
            checkpoints_abandoned_parking: 0,
            return_writer_wakes: 0,
            net,
            partitions,
            pending_dirty: Vec::new(),
            faults_on,
            healed: !faults_on,
            heal_at: 0,
            trigger_budget: [budget; 5],
            crash_done: false,
            timer_at: [None; 2],
            sender_busy_until: [0; Channel::COUNT],
            timer_spins: [(u64::MAX, 0); 2],
            last_states: (initial_state, None),
            checks,
            trace: Trace::new(trace_tail),
            done: false,
            events: 0,
            page_frames: 0,
            accesses: [0; 4],
            start_at: None,
            stop_at: None,
            dst_started_at: None,
            completed_at: None,
            notes: Vec::new(),
            sc,
        }
    }

    fn at(&mut self, time: u64, ev: Ev) {
        let tie = self.rng.u64();
        self.push(time, tie, ev);
    }

    /// Schedules `ev` at `time`, after the events of that instant whose
    /// tie-break is smaller.
    fn push(&mut self, time: u64, tie: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((time.max(self.now), tie, self.seq, ev)));
    }

    fn ts(&self) -> Timestamp {
        Timestamp::from_nanos(self.now)
    }

    fn latency(&self) -> u64 {
        self.sc.latency_us * US
    }

    /// Runs the migration to its end and reports.
    pub fn run(mut self) -> RunResult {
        let real_start = Instant::now();
        let start = self.sc.warmup_ms * MS;
        self.heal_at = start + if self.faults_on { self.sc.heal_ms * MS } else { 0 };
        let deadline = self.heal_at + self.sc.liveness_bound_ms() * MS;
        for vcpu in 0..self.sc.vcpus {
            self.at(0, Ev::Vcpu { vcpu, generation: 0 });
        }
        self.at(start, Ev::Start);
        self.at(deadline, Ev::Deadline);
        if self.faults_on {
            self.at(self.heal_at, Ev::Heal);
            let span = self.heal_at - start;
            for _ in 0..self.sc.resets {
                let t = start + self.rng.below(span + 1);
                self.at(t, Ev::Reset);
            }
            for index in 0..self.sc.partitions {
                let t = start + self.rng.below(span + 1);
                self.at(t, Ev::PartitionStart { index });
            }
            // Its own stream: the other faults keep their times.
            let mut strangers = Rng::new(self.sc.seed, stream::STRANGERS);
            for _ in 0..self.sc.strangers {
                let t = start + strangers.below(span + 1);
                self.at(t, Ev::Stranger);
            }
        }
        while let Some(Reverse((time, _, _, ev))) = self.queue.pop() {
            self.now = time;
            self.events += 1;
            let (a, b) = ev.args();
            self.trace.record(time, What::Event(ev.name()), a, b);
            self.dispatch(ev);
            if self.done {
                break;
            }
            self.after_event();
            if self.done {
                break;
            }
        }
        if !self.done {
            let detail = format!("nothing left to happen: {}", self.states());
            self.checks.no_progress(detail);
        }
        let real = real_start.elapsed();
        self.result(real.as_secs_f64())
    }

    fn states(&self) -> String {
        format!(
            "migration attempt {} (the simulator's), source {} (the core's reconnection attempt {}), destination {}{}",
            self.attempt,
            self.src.core.state(),
            self.src.core.reconnect_attempt(),
            self.dst.core.state(),
            if self.dst.alive { "" } else { " (crashed)" }
        )
    }

    // ----- events --------------------------------------------------------

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::Start => {
                self.start_at = Some(self.now);
                self.begin_attempt();
            }
            Ev::NewAttempt => self.new_attempt(),
            Ev::Vcpu { vcpu, generation } => {
                if generation == self.vcpu_generation {
                    self.step_vcpu(vcpu as usize);
                }
            }
            Ev::Net(timer) => self.net_input(NetInput::Timer(timer)),
            Ev::Timer { dest, generation } => self.fire_timer(dest, generation),
            Ev::VcpusStopped { generation } => {
                if generation == self.generation[0] && self.src.core.state() == SourceState::Stopping {
                    let state = self.device_state.clone();
                    if let Err(error) = self.src.core.handle_vcpus_stopped(self.ts(), state) {
                        self.checks.driver_event("source", error.to_string());
                    }
                    self.drain_source();
                }
            }
            Ev::DirtySynced { generation, slot } => {
                let words = std::mem::take(&mut self.pending_dirty[slot as usize]);
                let state = self.src.core.state();
                if generation == self.generation[0] && matches!(state, SourceState::DirtySync | SourceState::FinalSync)
                {
                    let now = self.ts();
                    let result = self
                        .src
                        .core
                        .handle_dirty_bitmap(now, 0, &words)
                        .and_then(|()| self.src.core.handle_dirty_sync_complete(now));
                    if let Err(error) = result {
                        self.checks.driver_event("source", error.to_string());
                    }
                    self.drain_source();
                }
            }
            Ev::DeviceLoaded { generation } => {
                if generation == self.generation[1] {
                    self.try_finish_load();
                }
            }
            Ev::Switch { generation } => {
                let state = self.src.core.state();
                if generation == self.generation[0]
                    && matches!(state, SourceState::Handshake | SourceState::Precopy | SourceState::DirtySync)
                {
                    if let Err(error) = self.src.core.handle_switch_to_postcopy(self.ts()) {
                        self.checks.driver_event("source", error.to_string());
                    }
                    self.drain_source();
                }
            }
            Ev::Reset => {
                if !self.healed {
                    let d_src = self.rng.below(self.latency() + 1);
                    let d_dst = self.rng.below(self.latency() + 1);
                    if let Some(conn) = self.pick_conn() {
                        self.trace.record(self.now, What::Fault("reset"), u64::from(conn.0), 0);
                        self.net_input(NetInput::Reset {
                            conn,
                            tell_source_after_ns: Some(d_src),
                            tell_destination_after_ns: Some(d_dst),
                        });
                    }
                }
            }
            Ev::PartitionStart { index } => self.partition(index as usize),
            Ev::Stranger => self.stranger(),
            // The pump that follows every event lets the stream write again.
            Ev::StreamFree => {}
            Ev::Heal => {
                self.healed = true;
                self.trace.record(self.now, What::Fault("heal"), 0, 0);
                self.net_input(NetInput::EndPartition);
            }
            Ev::DestRestart => {
                if !self.dst.alive {
                    self.generation[1] += 1;
                    self.dst = DestHost::new(&self.sc);
                    self.timer_at[1] = None;
                    self.trace.record(self.now, What::Note("destination restarted"), 0, 0);
                }
            }
            Ev::Deadline => {
                let fell_back = self.src.took_over.is_some() && self.src.finished.is_some();
                if self.completed_at.is_none() && !fell_back {
                    let bound = if self.sc.liveness_ms > 0 {
                        "set by liveness_ms".to_owned()
                    } else {
                        format!("derived: {:?}", self.sc.liveness_schedule())
                    };
                    let detail = format!(
                        "not finished {} ms after the faults healed ({bound}): {}",
                        self.sc.liveness_bound_ms(),
                        self.states()
                    );
                    self.checks.no_progress(detail);
                    self.done = true;
                }
            }
            Ev::AfterEnd => self.done = true,
            Ev::CheckpointTaken { generation } => {
                if generation == self.generation[1] && self.dst.alive {
                    if let Some(checkpoint) = self.dst.checkpoint.take() {
                        let postcopy_core::Checkpoint { seq, device_state, pages } = checkpoint;
                        let fails = self.sc.abandon_pct > 0 && self.rng.chance(f64::from(self.sc.abandon_pct) / 100.0);
                        if fails {
                            self.abandon_read_checkpoint(seq, &pages);
                        } else {
                            let result = self.dst.core.handle_checkpoint(self.ts(), seq, device_state, pages);
                            if let Err(error) = result {
                                self.checks.driver_event("destination", error.to_string());
                            }
                        }
                        if self.dst.running {
                            self.run_vcpus();
                        }
                        self.drain_dest();
                    }
                }
            }
            Ev::ReturnWriter { generation } => {
                if generation == self.generation[1] && self.dst.alive && self.dst.return_writer == ReturnWriter::Rung {
                    // The pump after this event lets it write.
                    self.dst.return_writer = ReturnWriter::Writing;
                    self.return_writer_wakes += 1;
                }
            }
            Ev::CrashAfterStart { generation } => {
                if generation == self.generation[1] && self.dst.alive {
                    if self.src.core.released() || self.src.core.state().is_terminal() {
                        // Released: the guest is the destination's alone,
                        // as after COMPLETED without fallback.
                        self.notes.push("destination crash skipped: the source had released the guest".into());
                    } else {
                        self.crash_done = true;
                        self.crash_destination();
                    }
                }
            }
        }
    }

    fn after_event(&mut self) {
        self.pump();
        // After the pump: a fence or a page it delivered settles a
        // checkpoint waiting to park at this instant.
        self.checkpoint_parking();
        self.fault_points();
        self.arm_timers();
        self.observe();
        let max_buffered = self.net.max_buffered();
        let view = StepView {
            source_running: self.src.running,
            destination_running: self.dst.running,
            source_queue: self.src.core.urgent_queue_len() as u64,
            destination_faults: self.dst.core.outstanding_faults() as u64,
            max_outstanding: u64::from(self.sc.max_outstanding),
            max_buffered,
            // A writer may overshoot its room by one chunk plus one frame.
            // One frame may overshoot the budget: a huge page by 2 MiB.
            buffer_bound: (self.sc.buffer_kib + 2 * self.sc.chunk_kib) * 1024
                + (128 << 10)
                + if self.sc.huge_pages > 0 { HUGE_CHARGED_PAGE_BYTES } else { 0 },
        };
        self.checks.step(view);
        if !self.checks.ok() {
            self.done = true;
        }
    }

    /// Records state changes and the point of no return.
    fn observe(&mut self) {
        let s = self.src.core.state();
        let d = self.dst.alive.then(|| self.dst.core.state());
        if s != self.last_states.0 {
            self.trace.record(self.now, What::SourceState(s), u64::from(self.attempt), 0);
        }
        if d != self.last_states.1 {
            if let Some(d) = d {
                self.trace.record(self.now, What::DestState(d), u64::from(self.attempt), 0);
            }
        }
        self.last_states = (s, d);
        if s.after_start() {
            self.src.past_start = true;
        }
    }

    // ----- attempts --------------------------------------------------------

    fn begin_attempt(&mut self) {
        self.attempt_start = self.now;
        if let Err(error) = self.src.core.handle_start(self.ts()) {
            self.checks.driver_event("source", error.to_string());
        }
        self.drain_source();
        if self.sc.switch_after_ms > 0 {
            let generation = self.generation[0];
            self.at(self.now + self.sc.switch_after_ms * MS, Ev::Switch { generation });
        }
    }

    /// A new migration after one that left the guest on the source (an
    /// orchestrator retrying): fresh cores, fresh connections.
    fn new_attempt(&mut self) {
        self.attempt += 1;
        self.generation[0] += 1;
        self.generation[1] += 1;
        self.net_input(NetInput::ResetAll);
        self.src.sockets = [None; Channel::COUNT];
        let session = self.rng.u64();
        self.src.core = Source::new(self.sc.config(), self.layout.clone(), session);
        self.src.past_start = false;
        self.src.finished = None;
        self.src.staging.clear();
        self.dst = DestHost::new(&self.sc);
        self.src_mem.take_dirty();
        self.checks.new_attempt();
        self.timer_at = [None; 2];
        self.trace.record(self.now, What::Note("new attempt"), u64::from(self.attempt), 0);
        self.begin_attempt();
    }

    fn source_finished(&mut self, finished: Finished<SourceStats>) {
        let ok = finished.result.is_ok();
        let reason = finished.result.as_ref().err().map(ToString::to_string).unwrap_or_default();
        let took_over = matches!(finished.result, Err(MigrationError::TookOver { .. }));
        self.src.finished = Some(finished);
        if ok {
            self.maybe_completed();
            return;
        }
        if took_over {
            // The guest runs on the source again, rolled back: the run is
            // over once it has run a while more (its reads checked).
            self.trace.record(self.now, What::Note("fell back"), 0, 0);
            self.at(self.now + self.sc.after_ms * MS, Ev::AfterEnd);
            return;
        }
        if self.dst.started {
            self.checks.disagreement(format!("the source failed ({reason}) after the destination ran the guest"));
            return;
        }
        if self.attempt_start >= self.heal_at {
            self.checks.migration_failed(format!("a migration started after the faults healed failed: {reason}"));
            return;
        }
        if self.attempt >= 50 {
            self.checks.migration_failed(format!("50 attempts failed, the last: {reason}"));
            return;
        }
        self.notes.push(format!("migration attempt {} failed, guest back on the source: {reason}", self.attempt));
        let delay = self.rng.range(1, NEW_ATTEMPT_DELAY_MAX_MS) * MS;
        self.at(self.now + delay, Ev::NewAttempt);
    }

    fn maybe_completed(&mut self) {
        let src_ok = self.src.finished.as_ref().is_some_and(|f| f.result.is_ok());
        let dst_ok = self.dst.finished.as_ref().is_some_and(|f| f.result.is_ok());
        if src_ok && dst_ok && self.completed_at.is_none() {
            self.completed_at = Some(self.now);
            self.trace.record(self.now, What::Note("completed"), 0, 0);
            self.at(self.now + self.sc.after_ms * MS, Ev::AfterEnd);
        }
    }

    // ----- the cores' actions ---------------------------------------------

    fn drain_source(&mut self) {
        while let Some(action) = self.src.core.poll_action() {
            self.source_action(action);
        }
    }

    fn drain_dest(&mut self) {
        while let Some(action) = self.dst.core.poll_action() {
            self.dest_action(action);
        }
    }

    fn source_action(&mut self, action: SourceAction) {
        let now = self.now;
        match action {
            SourceAction::Connect(ch) => {
                self.trace.record(now, What::SourceAction("connect"), ch.index() as u64, 0);
                if let Some(old) = self.src.sockets[ch.index()].take() {
                    self.net_input(NetInput::Close { conn: old.conn, end: Side::Source, farewell: None });
                }
                self.net_input(NetInput::Connect { channel: ch });
            }
            SourceAction::Close(ch) => {
                self.trace.record(now, What::SourceAction("close"), ch.index() as u64, 0);
                if let Some(socket) = self.src.sockets[ch.index()].take() {
                    self.net_input(NetInput::Close { conn: socket.conn, end: Side::Source, farewell: None });
                }
            }
            SourceAction::Farewell { channel, bytes } => {
                self.trace.record(now, What::SourceAction("farewell"), channel.index() as u64, bytes.len() as u64);
                if let Some(socket) = self.src.sockets[channel.index()].take() {
                    self.net_input(NetInput::Close { conn: socket.conn, end: Side::Source, farewell: Some(bytes) });
                }
            }
            SourceAction::StopVcpus => {
                self.trace.record(now, What::SourceAction("stop-vcpus"), 0, 0);
                self.src.running = false;
                if self.sc.fallback {
                    // The fallback image until a checkpoint is committed.
                    self.checks.record_image(0, 0);
                }
                self.vcpu_generation += 1;
                self.stop_at = Some(now);
                // vCPUs leave the guest at the end of their current step.
                let until = self.vcpus.iter().map(|v| v.until).max().unwrap_or(now);
                let generation = self.generation[0];
                self.at(until.max(now + self.sc.stop_us * US), Ev::VcpusStopped { generation });
            }
            SourceAction::ResumeVcpus => {
                self.trace.record(now, What::SourceAction("resume-vcpus"), 0, 0);
                self.checks.source_resumed(self.src.past_start);
                self.src.running = true;
                self.run_vcpus();
            }
            SourceAction::SyncDirtyLog => {
                let (words, dirty) = self.src_mem.take_dirty();
                self.trace.record(now, What::SourceAction("sync-dirty-log"), dirty, 0);
                let slot = self.pending_dirty.len() as u32;
                self.pending_dirty.push(words);
                // KVM_GET_DIRTY_LOG: about 5 us, plus 3 ns per dirty page.
                let generation = self.generation[0];
                self.at(now + 5 * US + 3 * dirty, Ev::DirtySynced { generation, slot });
            }
            SourceAction::StageCheckpointPage { page, data, .. } => {
                let version = match &data {
                    PageData::Zero => Some(0),
                    PageData::Bytes(bytes) => decode_version(bytes, page),
                };
                match version {
                    Some(version) => self.src.staging.push((page.0, version)),
                    None => self.checks.driver_event("source", format!("corrupt checkpoint page {}", page.0)),
                }
            }
            SourceAction::CommitCheckpoint { seq } => {
                self.trace.record(now, What::SourceAction("commit-checkpoint"), seq, self.src.staging.len() as u64);
                for (page, version) in std::mem::take(&mut self.src.staging) {
                    self.src_mem.versions[page as usize] = version;
                }
            }
            SourceAction::DiscardCheckpoint { seq } => {
                self.trace.record(now, What::SourceAction("discard-checkpoint"), seq, 0);
                self.src.staging.clear();
            }
            SourceAction::TakeOver { checkpoint, device_state } => {
                self.trace.record(now, What::SourceAction("take-over"), checkpoint, 0);
                let expected =
                    if checkpoint == 0 { self.device_state.clone() } else { checkpoint_device_state(checkpoint) };
                self.checks.took_over(checkpoint, &self.src_mem.versions, device_state == expected);
                self.notes.push(format!("the source took the guest back from checkpoint {checkpoint}"));
                self.src.took_over = Some(checkpoint);
                self.src.running = true;
                self.run_vcpus();
            }
            SourceAction::Notice(notice) => self.notice("source", &notice),
            SourceAction::Finished(finished) => {
                let code = u64::from(finished.result.is_ok());
                self.trace.record(now, What::SourceAction("finished"), code, 0);
                if let Err(MigrationError::Protocol(error)) = &finished.result {
                    self.checks.protocol_error("source", error.to_string());
                }
                if finished.guest_on == Side::Source && finished.result.is_ok() {
                    self.checks.disagreement("the source completed with the guest on the source".into());
                }
                self.source_finished(*finished);
            }
        }
    }

    fn dest_action(&mut self, action: DestinationAction) {
        let now = self.now;
        match action {
            DestinationAction::PrepareMemory(layout) => {
                self.trace.record(now, What::DestAction("prepare-memory"), layout.total_pages(), 0);
                self.dst.memory = vec![MISSING; layout.total_pages() as usize];
                self.dst.dirty = vec![false; layout.total_pages() as usize];
            }
            DestinationAction::PlacePagePart { page, offset, data } => {
                let p = page.0;
                self.trace.record(now, What::DestAction("place-part"), p, u64::from(offset));
                let size =
                    if self.huge_block.contains(&p) { self.sc.huge_wire_bytes() } else { self.sc.wire_page_bytes };
                let size = size as usize;
                let (bytes, filled) = self.dst.placed.entry(p).or_insert_with(|| (vec![0; size], vec![false; size]));
                let (start, end) = (offset as usize, offset as usize + data.len());
                match (bytes.get_mut(start..end), filled.get_mut(start..end)) {
                    (Some(room), Some(marks)) => {
                        room.copy_from_slice(&data);
                        marks.fill(true);
                    }
                    _ => self.checks.driver_event("destination", format!("part of page {p} past its end")),
                }
            }
            DestinationAction::InstallPlacedPage { page } => {
                let p = page.0;
                let (bytes, filled) = self.dst.placed.remove(&p).unwrap_or_default();
                let have = filled.iter().filter(|&&f| f).count();
                if have != bytes.len() || bytes.is_empty() {
                    // Visible before every byte of it was placed: half filled.
                    let page_bytes = u64::from(self.sc.huge_wire_bytes());
                    self.checks.huge_install(p, have as u64, page_bytes, None);
                    return;
                }
                self.dest_action(DestinationAction::InstallPage {
                    page,
                    data: PageData::Bytes(bytes.into()),
                    overwrite: false,
                });
            }
            DestinationAction::InstallPage { page, data, overwrite } => {
                let p = page.0;
                self.trace.record(now, What::DestAction("install"), p, u64::from(overwrite));
                let version = match &data {
                    PageData::Zero => Some(0),
                    PageData::Bytes(bytes) => decode_version(bytes, page),
                };
                let Some(slot) = self.dst.memory.get_mut(p as usize) else {
                    self.checks.driver_event("destination", format!("install of page {p} outside the memory"));
                    return;
                };
                let was_present = *slot != MISSING;
                if self.huge_block.contains(&p) {
                    // A huge page is visible whole or not at all: a zero page
                    // is whole by definition, bytes must be all of it.
                    let page_bytes = u64::from(self.sc.huge_wire_bytes());
                    let bytes = match &data {
                        PageData::Zero => page_bytes,
                        PageData::Bytes(bytes) => bytes.len() as u64,
                    };
                    self.checks.huge_install(p, bytes, page_bytes, version);
                }
                if let Some(v) = version {
                    if !was_present || overwrite {
                        *slot = v;
                    }
                }
                self.checks.install(p, version, was_present, overwrite, self.dst.started);
                self.wake(p);
                if self.dst.load_until.is_some() {
                    self.try_finish_load();
                }
            }
            DestinationAction::DiscardPages { first, count } => {
                self.trace.record(now, What::DestAction("discard"), first.0, count);
                for p in first.0..first.0 + count {
                    if let Some(slot) = self.dst.memory.get_mut(p as usize) {
                        *slot = MISSING;
                    }
                    self.checks.discard(p, self.dst.started);
                }
            }
            DestinationAction::LoadDeviceState(state) => {
                self.trace.record(now, What::DestAction("load-device-state"), state.len() as u64, 0);
                self.checks.device_state(state == self.device_state);
                self.dst.load_until = Some(now + self.sc.device_load_us * US);
                let generation = self.generation[1];
                self.at(now + self.sc.device_load_us * US, Ev::DeviceLoaded { generation });
                // Loading touches guest pages: fault those not there yet.
                let mut faulted = Vec::new();
                for &p in &self.device_pages {
                    if self.dst.memory.get(p as usize) == Some(&MISSING) && !faulted.contains(&p) {
                        faulted.push(p);
                        if let Err(error) = self.dst.core.handle_page_fault(self.ts(), PageNumber(p), Waiter::Vmm) {
                            self.checks.driver_event("destination", error.to_string());
                        }
                    }
                }
            }
            DestinationAction::ResumeVcpus => {
                self.trace.record(now, What::DestAction("resume-vcpus"), 0, 0);
                self.dst.running = true;
                if !self.dst.started && self.sc.fallback && self.sc.crash_after_start_ms > 0 {
                    let generation = self.generation[1];
                    self.at(now + self.sc.crash_after_start_ms * MS, Ev::CrashAfterStart { generation });
                }
                self.dst.started = true;
                self.dst_started_at.get_or_insert(now);
                self.checks.guest_started(&self.dst.memory);
                if !self.dst.checkpointing() {
                    self.run_vcpus();
                }
            }
            DestinationAction::Wake(page) => {
                self.trace.record(now, What::DestAction("wake"), page.0, 0);
                if self.dst.memory.get(page.0 as usize).is_some_and(|&v| v != MISSING) {
                    self.wake(page.0);
                }
            }
            DestinationAction::PromoteConnection(id) => {
                self.trace.record(now, What::DestAction("promote"), id.0, 0);
                if let Some(at) = self.dst.provisional.iter().position(|&(p, _, _)| p == id) {
                    let (_, conn, ch) = self.dst.provisional.remove(at);
                    // The core closed the older connection first.
                    if let Some(old) = self.dst.sockets[ch.index()].replace(conn) {
                        self.checks.disagreement(format!("{ch} promoted over {old:?}, which the core did not close"));
                    }
                }
            }
            DestinationAction::CloseConnection(id) => {
                self.trace.record(now, What::DestAction("close-provisional"), id.0, 0);
                if let Some(at) = self.dst.provisional.iter().position(|&(p, _, _)| p == id) {
                    let (_, conn, _) = self.dst.provisional.remove(at);
                    self.net_input(NetInput::Close { conn, end: Side::Destination, farewell: None });
                }
            }
            DestinationAction::Close(ch) => {
                self.trace.record(now, What::DestAction("close"), ch.index() as u64, 0);
                if let Some(conn) = self.dst.sockets[ch.index()].take() {
                    self.net_input(NetInput::Close { conn, end: Side::Destination, farewell: None });
                }
            }
            DestinationAction::Farewell { channel, bytes } => {
                self.trace.record(now, What::DestAction("farewell"), channel.index() as u64, bytes.len() as u64);
                if let Some(conn) = self.dst.sockets[channel.index()].take() {
                    self.net_input(NetInput::Close { conn, end: Side::Destination, farewell: Some(bytes) });
                }
            }
            DestinationAction::FenceVcpus => {
                self.trace.record(now, What::DestAction("fence-vcpus"), 0, 0);
                self.dst.running = false;
            }
            DestinationAction::DiscardGuest => {
                self.trace.record(now, What::DestAction("discard-guest"), 0, 0);
                self.dst.running = false;
                self.dst.memory.fill(MISSING);
            }
            DestinationAction::TakeCheckpoint { seq } => self.take_checkpoint(seq),
            DestinationAction::Notice(notice) => self.notice("destination", &notice),
            DestinationAction::Finished(finished) => {
                let ok = finished.result.is_ok();
                self.trace.record(now, What::DestAction("finished"), u64::from(ok), 0);
                match &finished.result {
                    // A restarted destination knows no migration: the resume
                    // hello of a source that took its guest back and comes to
                    // say so is rightly refused.
                    Err(MigrationError::Protocol(ProtocolError::NothingToResume { .. }))
                        if self.generation[1] > 0 && self.src.finished.is_some() => {}
                    Err(MigrationError::Protocol(error)) => {
                        self.checks.protocol_error("destination", error.to_string())
                    }
                    _ => {}
                }
                if ok {
                    self.checks.completed(&self.dst.memory);
                } else {
                    let superseded = finished.result == Err(MigrationError::Superseded);
                    if self.dst.started && !superseded {
                        self.checks.disagreement("the destination dropped a guest it ran".into());
                    }
                    // The driver discards a guest that never ran here.
                    self.dst.memory.fill(MISSING);
                    self.dst.running = false;
                    self.dst.load_until = None;
                }
                self.dst.finished = Some(*finished);
                if ok {
                    self.maybe_completed();
                }
            }
        }
    }

    fn notice(&mut self, side: &'static str, notice: &Notice) {
        if side == "destination" && matches!(notice, Notice::Paused { .. }) {
            self.checks.destination_paused(&self.dst.memory);
        }
        let (name, reason) = match notice {
            Notice::Paused { reason } => ("paused", Some(reason)),
            Notice::RecoveryAttempt { .. } => ("recovery-attempt", None),
            Notice::Withdrawing { reason } => ("withdrawing", Some(reason)),
            Notice::RecoveryFailed { reason, .. } => ("recovery-failed", Some(reason)),
            Notice::Recovered { .. } => ("recovered", None),
            Notice::ConnectionRefused { error, .. } => {
                self.checks.protocol_error(side, format!("connection refused: {error}"));
                ("connection-refused", None)
            }
            // The sim's own strangers are expected; the real source's
            // connections refused as strangers are protocol errors.
            // A restarted destination knows no migration: the resume hello
            // of a source that comes to say it took its guest back is
            // rightly refused.
            Notice::StrangerRefused {
                reason: MigrationError::Protocol(ProtocolError::NothingToResume { .. }), ..
            } if self.generation[1] > 0 => ("stranger-refused", None),
            Notice::StrangerRefused { reason, .. } => ("stranger-refused", Some(reason)),
            Notice::Fenced => ("fenced", None),
            Notice::LeaseRestored => ("lease-restored", None),
            Notice::CheckpointCommitted { .. } => ("checkpoint-committed", None),
            Notice::TookOver { .. } => ("took-over", None),
        };
        let what = if side == "source" { What::SourceAction(name) } else { What::DestAction(name) };
        self.trace.record(self.now, what, 0, 0);
        if let Some(MigrationError::Protocol(error)) = reason {
            self.checks.protocol_error(side, error.to_string());
        }
    }

    fn try_finish_load(&mut self) {
        let Some(until) = self.dst.load_until else { return };
        if self.now < until || !self.device_pages.iter().all(|&p| self.dst.memory.get(p as usize) != Some(&MISSING)) {
            return;
        }
        self.dst.load_until = None;
        let fail = self.sc.crash == Crash::LoadError && !self.healed && !self.crash_done;
        let result = if fail {
            self.crash_done = true;
            self.trace.record(self.now, What::Fault("device-load-error"), 0, 0);
            Err("simulated device-state load failure".to_owned())
        } else {
            Ok(())
        };
        if let Err(error) = self.dst.core.handle_device_state_loaded(self.ts(), result) {
            self.checks.driver_event("destination", error.to_string());
        }
        self.drain_dest();
    }

    // ----- timers ---------------------------------------------------------

    fn arm_timers(&mut self) {
        for side in 0..2 {
            let deadline = if side == 0 {
                self.src.core.poll_timeout()
            } else if self.dst.alive {
                self.dst.core.poll_timeout()
            } else {
                None
            };
            let Some(deadline) = deadline else { continue };
            let t = deadline.as_nanos().max(self.now);
            if self.timer_at[side].is_none_or(|armed| t < armed) {
                self.timer_at[side] = Some(t);
                let generation = self.generation[side];
                self.at(t, Ev::Timer { dest: side == 1, generation });
            }
        }
    }

    fn fire_timer(&mut self, dest: bool, generation: u32) {
        let side = usize::from(dest);
        if generation != self.generation[side] || (dest && !self.dst.alive) {
            return;
        }
        if self.timer_at[side] == Some(self.now) {
            self.timer_at[side] = None;
        }
        let deadline = if dest { self.dst.core.poll_timeout() } else { self.src.core.poll_timeout() };
        if deadline.is_none_or(|d| d.as_nanos() > self.now) {
            return;
        }
        let spins = &mut self.timer_spins[side];
        if spins.0 == self.now {
            spins.1 += 1;
            if spins.1 > TIMER_LIVELOCK {
                let name = if dest { "destination" } else { "source" };
                self.checks.timer_livelock(name, self.now);
                return;
            }
        } else {
            *spins = (self.now, 0);
        }
        if dest {
            self.dst.core.handle_timeout(self.ts());
            self.drain_dest();
        } else {
            self.src.core.handle_timeout(self.ts());
            self.drain_source();
        }
    }

    // ----- network --------------------------------------------------------

    /// Feeds the network one input and carries out what it asks at once, so
    /// its timers are scheduled in the order their tie-breaks were drawn.
    fn net_input(&mut self, input: NetInput) {
        self.net.handle_input(self.now, input, &mut self.rng);
        self.drain_net();
    }

    fn drain_net(&mut self) {
        while let Some(output) = self.net.poll_output() {
            self.net_output(output);
        }
    }

    fn net_output(&mut self, output: NetOutput) {
        match output {
            NetOutput::Timer { at_ns, tie, timer } => self.push(at_ns, tie, Ev::Net(timer)),
            NetOutput::Connecting { conn, channel } => {
                self.src.sockets[channel.index()] = Some(SourceSocket { conn, established: false });
            }
            NetOutput::Readable { conn, channel } => self.read(conn, channel),
            NetOutput::Incoming { conn, channel } => self.incoming(conn, channel),
            NetOutput::Established { conn, channel } => {
                let Some(socket) = self.src.sockets[channel.index()].as_mut().filter(|s| s.conn == conn) else {
                    return;
                };
                socket.established = true;
                self.src.core.handle_connected(self.ts(), channel);
                self.drain_source();
            }
            NetOutput::ConnectFailed { conn, channel, refused } => {
                if self.src.conn(channel) == Some(conn) {
                    self.src.sockets[channel.index()] = None;
                    self.net_input(NetInput::Reset {
                        conn,
                        tell_source_after_ns: None,
                        tell_destination_after_ns: None,
                    });
                    if refused {
                        self.src.core.handle_connect_refused(self.ts(), channel);
                    } else {
                        self.src.core.handle_connect_failed(self.ts(), channel);
                    }
                    self.drain_source();
                }
            }
            NetOutput::Lost { conn, channel, end } => self.lost(conn, channel, end),
            NetOutput::Dropped { bytes } => self.drop_chunk(&bytes),
            NetOutput::AbortiveClose { conn } => {
                self.trace.record(self.now, What::Note("abortive close"), u64::from(conn.0), 0);
            }
            NetOutput::PartitionEnded => self.trace.record(self.now, What::Fault("partition-end"), 0, 0),
        }
    }

    /// Lets every writer with room hand its socket more frames.
    fn pump(&mut self) {
        let capacity = self.sc.buffer_kib * 1024;
        let chunk = self.sc.chunk_kib * 1024;
        let watermark = chunk.min(capacity / 2).max(1);
        let wire_page = u64::from(self.sc.wire_page_bytes);
        // Real bytes per charged byte, for a page frame (the smaller of the
        // two page sizes', so that a chunk of huge pages stays in budget).
        let mut ratio = (16 + wire_page) as f64 / (16 + CHARGED_PAGE_BYTES) as f64;
        if self.sc.huge_pages > 0 {
            let huge = u64::from(self.sc.huge_wire_bytes());
            ratio = ratio.min((16 + huge) as f64 / (16 + HUGE_CHARGED_PAGE_BYTES) as f64);
        }
        loop {
            let mut wrote = false;
            for ch in Channel::EVERY {
                let from_source = ch.is_from_source();
                let writer = if from_source {
                    self.src.sockets[ch.index()].filter(|s| s.established).map(|s| s.conn)
                } else {
                    self.dst.sockets[ch.index()].filter(|_| self.dst.alive)
                };
                let Some(c) = writer else { continue };
                if from_source && self.now < self.sender_busy_until[ch.index()] {
                    continue;
                }
                loop {
                    let room = self.net.room(c);
                    if room < watermark {
                        break;
                    }
                    let max_bytes = ((room.min(chunk) as f64 * ratio).ceil() as usize).max(1);
                    let mut out = Vec::with_capacity(max_bytes + 256);
                    let now = self.ts();
                    let frames = if from_source && self.sc.seed % 2 == 1 {
                        // Odd seeds take the path of a driver that reads pages
                        // after releasing the core: the same frames once filled.
                        let mut deferred = Vec::new();
                        let frames = self.src.core.poll_transmit_deferred(
                            now,
                            ch,
                            &mut out,
                            max_bytes,
                            &self.src_mem,
                            &mut deferred,
                        );
                        DeferredPage::fill_all(&deferred, &mut out, &self.src_mem);
                        frames
                    } else if from_source {
                        self.src.core.poll_transmit(now, ch, &mut out, max_bytes, &self.src_mem)
                    } else {
                        self.poll_destination(now, ch, &mut out, max_bytes)
                    };
                    let mut sender_busy = false;
                    if frames > 0 {
                        wrote = true;
                        let pages_before = self.page_frames;
                        self.write_chunk(c, Bytes::from(out));
                        let cost = (self.page_frames - pages_before) * self.sc.stream_page_ns;
                        if from_source && cost > 0 {
                            // This stream's sender works through the chunk's
                            // pages; the other streams' senders are free.
                            let free_at = self.now + cost;
                            self.sender_busy_until[ch.index()] = free_at;
                            self.at(free_at, Ev::StreamFree);
                            sender_busy = true;
                        }
                    }
                    if from_source {
                        self.drain_source();
                    } else {
                        self.drain_dest();
                    }
                    let current = if from_source { self.src.conn(ch) } else { self.dst.sockets[ch.index()] };
                    if frames == 0 || current != Some(c) || sender_busy {
                        break;
                    }
                }
            }
            if !wrote {
                break;
            }
        }
    }

    /// The destination's writers. With a return writer of its own
    /// (`return_writer_us`), every other flush sends only the urgent frames
    /// and rings the writer when `return_bulk_pending` says so, as the KVM
    /// driver does: a checkpoint frame or end of copy it did not announce
    /// would wait for nobody, and the run would not finish.
    fn poll_destination(&mut self, now: Timestamp, ch: Channel, out: &mut Vec<u8>, max_bytes: usize) -> usize {
        if !(self.sc.fallback && self.sc.return_writer_us > 0 && ch == Channel::Return) {
            return self.dst.core.poll_transmit(now, ch, out, max_bytes);
        }
        if self.dst.return_writer == ReturnWriter::Writing {
            let frames = self.dst.core.poll_transmit(now, ch, out, max_bytes);
            if frames == 0 {
                self.dst.return_writer = ReturnWriter::Asleep;
            }
            return frames;
        }
        let frames = self.dst.core.poll_transmit_urgent(now, out, max_bytes);
        if self.dst.return_writer == ReturnWriter::Asleep && self.dst.core.return_bulk_pending() {
            self.dst.return_writer = ReturnWriter::Rung;
            let generation = self.generation[1];
            self.at(self.now + self.sc.return_writer_us * US, Ev::ReturnWriter { generation });
        }
        frames
    }

    fn global_page(block_start: &[u64], block: u32, index: u32) -> Option<u64> {
        block_start.get(block as usize).map(|start| start + u64::from(index))
    }

    /// Hands the network frames a core wrote, telling the checkers which
    /// pages left.
    fn write_chunk(&mut self, conn: ConnId, bytes: Bytes) {
        let (checks, block_start, frames) = (&mut self.checks, &self.block_start, &mut self.page_frames);
        let charged = scan_chunk(&bytes, self.sc.page_charge(), |p| {
            *frames += 1;
            if let Some(page) = Self::global_page(block_start, p.block, p.index) {
                match p.part {
                    Some(part) => checks.part_sent(page, part, p.kind),
                    None => checks.page_sent(page, p.kind),
                }
            }
        });
        self.net_input(NetInput::Write { conn, bytes, charged });
    }

    /// Bytes that will never be read: their pages are lost.
    fn drop_chunk(&mut self, bytes: &[u8]) {
        let (checks, block_start) = (&mut self.checks, &self.block_start);
        scan_chunk(bytes, PageCharge::default(), |p| {
            if let Some(page) = Self::global_page(block_start, p.block, p.index) {
                match p.part {
                    Some(_) => checks.part_dropped(page, p.kind),
                    None => checks.page_dropped(page, p.kind),
                }
            }
        });
    }

    /// The reader takes what has arrived, chunk by chunk: the bytes go to
    /// its core if the core still reads that connection, else they are lost.
    fn read(&mut self, conn: ConnId, ch: Channel) {
        let to_dest = ch.is_from_source();
        while let Some(received) = self.net.receive(self.now, conn, &mut self.rng) {
            let bytes = match received {
                Received::Data(bytes) => bytes,
                Received::End => {
                    self.reader_sees_end(conn, ch);
                    continue;
                }
            };
            let reader_ok = if to_dest {
                self.dst.alive && self.dst.sockets[ch.index()] == Some(conn) && self.dst.core.is_connected(ch)
            } else {
                self.src.sockets[ch.index()] == Some(SourceSocket { conn, established: true })
                    && self.src.core.is_connected(ch)
            };
            if to_dest && self.dst.alive {
                if let Some(&(id, _, _)) = self.dst.provisional.iter().find(|&&(_, c, _)| c == conn) {
                    self.dst.core.handle_provisional_input(self.ts(), id, bytes);
                    self.drain_dest();
                    continue;
                }
            }
            if !reader_ok {
                self.drop_chunk(&bytes);
                continue;
            }
            if to_dest {
                self.dst.core.handle_input(self.ts(), ch, bytes);
                self.drain_dest();
            } else {
                self.src.core.handle_input(self.ts(), ch, bytes);
                self.drain_source();
            }
        }
        self.drain_net();
    }

    /// A graceful close reached the reader.
    fn reader_sees_end(&mut self, conn: ConnId, ch: Channel) {
        if self.provisional_gone(conn) {
            return;
        }
        if ch.is_from_source() {
            if self.dst.alive && self.dst.sockets[ch.index()] == Some(conn) {
                self.dst.sockets[ch.index()] = None;
                self.dst.core.handle_connection_lost(self.ts(), ch);
                self.drain_dest();
            }
        } else if self.src.conn(ch) == Some(conn) {
            self.src.sockets[ch.index()] = None;
            self.src.core.handle_connection_lost(self.ts(), ch);
            self.drain_source();
        }
    }

    /// A provisional connection ended: the core forgets it.
    fn provisional_gone(&mut self, conn: ConnId) -> bool {
        let Some(at) = self.dst.provisional.iter().position(|&(_, c, _)| c == conn) else { return false };
        let (id, _, _) = self.dst.provisional.remove(at);
        if self.dst.alive {
            self.dst.core.handle_provisional_lost(self.ts(), id);
            self.drain_dest();
        }
        true
    }

    fn lost(&mut self, conn: ConnId, ch: Channel, end: Side) {
        if end == Side::Destination && self.provisional_gone(conn) {
            return;
        }
        if end == Side::Source {
            let Some(socket) = self.src.sockets[ch.index()].filter(|s| s.conn == conn) else { return };
            self.src.sockets[ch.index()] = None;
            if socket.established {
                self.src.core.handle_connection_lost(self.ts(), ch);
            } else {
                self.src.core.handle_connect_failed(self.ts(), ch);
            }
            self.drain_source();
        } else if self.dst.alive && self.dst.sockets[ch.index()] == Some(conn) {
            self.dst.sockets[ch.index()] = None;
            self.dst.core.handle_connection_lost(self.ts(), ch);
            self.drain_dest();
        }
    }

    /// A SYN reached the destination host.
    fn incoming(&mut self, conn: ConnId, ch: Channel) {
        if !self.dst.alive {
            self.net_input(NetInput::Refuse { conn });
            return;
        }
        match self.dst.core.handle_accepted(self.ts(), ch) {
            Admission::Provisional(id) => self.dst.provisional.push((id, conn, ch)),
            Admission::Current => {
                if let Some(old) = self.dst.sockets[ch.index()] {
                    // A newer connection of the channel replaces the older
                    // one; the source learns one latency later if it still
                    // uses it.
                    let source_had_it = self.src.conn(ch) == Some(old);
                    self.net_input(NetInput::Abandon { conn: old, end: Side::Destination });
                    self.net_input(NetInput::Reset {
                        conn: old,
                        tell_source_after_ns: source_had_it.then(|| self.latency()),
                        tell_destination_after_ns: None,
                    });
                }
                self.dst.sockets[ch.index()] = Some(conn);
            }
        }
        self.net_input(NetInput::Accept { conn });
        self.drain_dest();
        self.net_input(NetInput::Acknowledge { conn });
    }

    // ----- faults ---------------------------------------------------------

    /// A random connection that either side still uses.
    fn pick_conn(&mut self) -> Option<ConnId> {
        let mut live: Vec<ConnId> = self
            .src
            .sockets
            .iter()
            .flatten()
            .map(|s| s.conn)
            .chain(self.dst.sockets.iter().flatten().copied())
            .filter(|&c| !self.net.is_dead(c))
            .collect();
        live.sort_unstable();
        live.dedup();
        if live.is_empty() {
            None
        } else {
            Some(live[self.rng.below(live.len() as u64) as usize])
        }
    }

    /// A peer that is not this migration's source connects to the
    /// destination, shows garbage, a bare preamble or another migration's
    /// resume hello, and goes. Checked: the destination's core is exactly as
    /// before, and the core asked nothing but to close that connection.
    fn stranger(&mut self) {
        if !self.dst.alive {
            return;
        }
        let mut rng = Rng::new(self.sc.seed ^ self.events, stream::STRANGERS);
        let channel = if rng.chance(0.5) { Channel::Main } else { Channel::Urgent };
        let bytes = match rng.below(3) {
            0 => Bytes::from((0..rng.range(1, 64)).map(|_| rng.below(256) as u8).collect::<Vec<u8>>()),
            1 => Bytes::new(),
            _ => {
                let session = self.src.core.session() ^ 1;
                let frame = match channel {
                    Channel::Urgent => Frame::UrgentHello(UrgentHello { session, epoch: u32::MAX }),
                    _ => Frame::Hello(Hello {
                        resume: true,
                        urgent_channel: false,
                        session,
                        epoch: u32::MAX,
                        page_size: self.sc.wire_page_bytes,
                        mode: WireMode::Postcopy,
                        precopy_rounds: 0,
                        blocks: self.layout.blocks().to_vec(),
                        machine: Bytes::new(),
                        push_streams: 1,
                    }),
                };
                let mut out = Vec::new();
                wire::encode(&frame, &mut out);
                Bytes::from(out)
            }
        };
        self.trace.record(self.now, What::Fault("stranger"), channel.index() as u64, bytes.len() as u64);
        let before = self.dst.core.clone();
        let now = self.ts();
        match self.dst.core.handle_accepted(now, channel) {
            Admission::Provisional(id) => {
                self.dst.core.handle_provisional_input(now, id, bytes);
                self.dst.core.handle_provisional_lost(now, id);
            }
            Admission::Current => {
                self.dst.core.handle_input(now, channel, bytes);
                self.dst.core.handle_connection_lost(now, channel);
            }
        }
        while let Some(action) = self.dst.core.poll_action() {
            match action {
                DestinationAction::Close(c) if c == channel => {}
                DestinationAction::CloseConnection(_) | DestinationAction::Notice(Notice::StrangerRefused { .. }) => {}
                other => self.checks.disagreement(format!("a stranger on {channel} made the destination do {other:?}")),
            }
        }
        if self.dst.core != before {
            self.checks.disagreement(format!("a stranger on {channel} changed the destination's state"));
        }
    }

    fn partition(&mut self, index: usize) {
        if self.healed {
            return;
        }
        let (duration, silent) = self.partitions[index];
        let until = (self.now + duration).min(self.heal_at.max(self.now));
        self.trace.record(self.now, What::Fault(if silent { "partition" } else { "partition+reset" }), duration, 0);
        self.net_input(NetInput::Partition { until_ns: until });
        if !silent {
            for conn in self.net.live_connections() {
                let d_src = self.rng.below(self.latency() + 1);
                let d_dst = self.rng.below(self.latency() + 1);
                self.net_input(NetInput::Reset {
                    conn,
                    tell_source_after_ns: Some(d_src),
                    tell_destination_after_ns: Some(d_dst),
                });
            }
        }
    }

    /// Fault points in the cores' own paths, and the crash.
    fn fault_points(&mut self) {
        if self.healed || self.start_at.is_none() {
            return;
        }
        let s = self.src.core.state();
        let d = self.dst.alive.then(|| self.dst.core.state());
        let t = self.sc.triggers;
        let hits = [
            (Triggers::QUEUED, s.after_start() && self.src.core.urgent_queue_len() > 0, "trigger-queued"),
            (Triggers::RECOVERING, s == SourceState::Recovering, "trigger-recovering"),
            (Triggers::LOADING, d == Some(DestinationState::LoadingDevice), "trigger-loading"),
            (
                Triggers::STARTED,
                s == SourceState::Active && self.last_states.0 == SourceState::Switchover,
                "trigger-started",
            ),
            (Triggers::EOC, d == Some(DestinationState::Completed) && !s.is_terminal(), "trigger-eoc"),
        ];
        for (i, (bit, hit, name)) in hits.into_iter().enumerate() {
            if t.has(bit) && hit && self.trigger_budget[i] > 0 {
                if let Some(conn) = self.pick_conn() {
                    self.trigger_budget[i] -= 1;
                    self.trace.record(self.now, What::Fault(name), u64::from(conn.0), 0);
                    let d_dst = self.rng.below(self.latency() + 1);
                    self.net_input(NetInput::Reset {
                        conn,
                        tell_source_after_ns: Some(0),
                        tell_destination_after_ns: Some(d_dst),
                    });
                }
            }
        }
        if self.crash_done || !self.dst.alive {
            return;
        }
        let hit = match self.sc.crash {
            Crash::Handshake => s == SourceState::Handshake,
            Crash::Precopy => s == SourceState::Precopy && d == Some(DestinationState::Precopy),
            Crash::Loading => d == Some(DestinationState::LoadingDevice),
            Crash::AwaitingStart => d == Some(DestinationState::AwaitingStart),
            Crash::None | Crash::LoadError => false,
        };
        if !hit {
            return;
        }
        self.crash_done = true;
        if s.after_start() {
            // The destination may run the only guest: a crash now loses it
            // whatever the protocol does. Not modelled.
            self.trace.record(self.now, What::Fault("crash skipped: past StartGuest"), 0, 0);
            self.notes.push("destination crash skipped: the source had transmitted StartGuest".into());
            return;
        }
        self.crash_destination();
    }

    /// The destination process dies: its memory and connections vanish; the
    /// source's kernel sees resets one latency later; a new destination
    /// process starts after a while.
    fn crash_destination(&mut self) {
        self.trace.record(self.now, What::Fault("crash destination"), 0, 0);
        self.notes.push(format!("destination crashed in {}", self.dst.core.state()));
        self.dst.alive = false;
        self.dst.running = false;
        self.dst.load_until = None;
        self.generation[1] += 1;
        self.timer_at[1] = None;
        let provisional: Vec<ConnId> = self.dst.provisional.drain(..).map(|(_, conn, _)| conn).collect();
        let current: Vec<ConnId> = Channel::EVERY.iter().filter_map(|ch| self.dst.sockets[ch.index()].take()).collect();
        for conn in current.into_iter().chain(provisional) {
            {
                self.net_input(NetInput::Abandon { conn, end: Side::Destination });
                self.net_input(NetInput::Reset {
                    conn,
                    tell_source_after_ns: Some(self.latency()),
                    tell_destination_after_ns: Some(0),
                });
            }
        }
        let restart = self.now + self.rng.range(1, 20) * MS;
        self.at(restart, Ev::DestRestart);
    }

    // ----- fallback ---------------------------------------------------------

    /// The destination driver's checkpoint. The vCPUs stop now; one that
    /// waits on a missing page parks only when its page arrives, and the
    /// checkpoint waits for it ([`Sim::checkpoint_parking`]).
    fn take_checkpoint(&mut self, seq: u64) {
        if self.blocked > 0 {
            self.trace.record(self.now, What::DestAction("checkpoint-waits-to-park"), seq, u64::from(self.blocked));
            self.dst.parking = Some(seq);
            // The vCPUs leave the guest now; a new generation stops their events.
            self.vcpu_generation += 1;
            return;
        }
        self.stop_and_take(seq);
    }

    /// A checkpoint waiting for its vCPUs to park: taken once none waits on
    /// a page; abandoned (nothing read from the dirty log yet) when the
    /// guest was fenced or dropped first, or the migration ended.
    fn checkpoint_parking(&mut self) {
        let Some(seq) = self.dst.parking else { return };
        if !self.dst.alive {
            self.dst.parking = None;
        } else if !self.dst.running || self.dst.finished.is_some() {
            self.dst.parking = None;
            self.trace.record(self.now, What::DestAction("checkpoint-abandoned"), seq, 0);
            self.checkpoints_abandoned += 1;
            self.checkpoints_abandoned_parking += 1;
            self.dst.core.handle_checkpoint_abandoned(self.ts(), seq);
        } else if self.blocked == 0 {
            self.dst.parking = None;
            self.stop_and_take(seq);
        }
    }

    /// A checkpoint whose capture failed after it read and cleared the
    /// dirty log: its pages go back into the log, so into the next
    /// checkpoint (the planted bug `abandoned-checkpoint-forgets-pages`
    /// drops them), and the vCPUs run again.
    fn abandon_read_checkpoint(&mut self, seq: u64, pages: &[(PageNumber, PageData)]) {
        self.trace.record(self.now, What::DestAction("checkpoint-abandoned"), seq, pages.len() as u64);
        self.checkpoints_abandoned += 1;
        #[cfg(feature = "planted-bugs")]
        let forgets = self.dst.core.config().plant == Some(postcopy_core::PlantedBug::AbandonedCheckpointForgetsPages);
        #[cfg(not(feature = "planted-bugs"))]
        let forgets = false;
        if !forgets {
            for (page, _) in pages {
                if let Some(dirty) = self.dst.dirty.get_mut(page.0 as usize) {
                    *dirty = true;
                }
            }
        }
        self.dst.core.handle_checkpoint_abandoned(self.ts(), seq);
    }

    /// The vCPUs are parked: every page dirtied since the last checkpoint
    /// and the device state are copied at this instant, and the vCPUs run
    /// again once it is handed in, after `checkpoint_us` plus 200 ns a page.
    fn stop_and_take(&mut self, seq: u64) {
        let mut pages = Vec::new();
        for page in 0..self.dst.dirty.len() {
            if !std::mem::take(&mut self.dst.dirty[page]) {
                continue;
            }
            let version = self.dst.memory[page];
            if version == MISSING {
                continue;
            }
            let number = PageNumber(page as u64);
            let data = if version == 0 {
                PageData::Zero
            } else {
                let size = self.layout.page_size_of(number).unwrap_or(self.sc.wire_page_bytes) as usize;
                let mut bytes = vec![0; size];
                postcopy_core::testkit::fill_page(&mut bytes, number, version);
                PageData::Bytes(Bytes::from(bytes))
            };
            pages.push((number, data));
        }
        self.trace.record(self.now, What::DestAction("take-checkpoint"), seq, pages.len() as u64);
        self.checks.record_image(seq, self.src.core.committed_checkpoint());
        let delay = self.sc.checkpoint_us * US + 200 * pages.len() as u64;
        self.dst.checkpoint =
            Some(postcopy_core::Checkpoint { seq, device_state: checkpoint_device_state(seq), pages });
        // The vCPUs leave the guest now; a new generation stops their events.
        self.vcpu_generation += 1;
        let generation = self.generation[1];
        self.at(self.now + delay, Ev::CheckpointTaken { generation });
    }

    // ----- guest ----------------------------------------------------------

    fn run_vcpus(&mut self) {
        self.vcpu_generation += 1;
        let generation = self.vcpu_generation;
        for vcpu in 0..self.sc.vcpus {
            if self.vcpus[vcpu as usize].blocked_on.is_none() {
                self.at(self.now, Ev::Vcpu { vcpu, generation });
            }
        }
    }

    fn wake(&mut self, page: u64) {
        if self.blocked == 0 {
            return;
        }
        let generation = self.vcpu_generation;
        let t = self.now + self.sc.fault_wake_us * US;
        for vcpu in 0..self.vcpus.len() {
            if self.vcpus[vcpu].blocked_on == Some(page) {
                self.vcpus[vcpu].blocked_on = None;
                self.blocked -= 1;
                if self.dst.running {
                    self.at(t, Ev::Vcpu { vcpu: vcpu as u32, generation });
                }
            }
        }
    }

    /// Runs vCPU `i` for up to one quantum, or to its next fault.
    fn step_vcpu(&mut self, i: usize) {
        let on_source = self.src.running;
        let on_dest = !on_source && self.dst.running && self.dst.alive && !self.dst.checkpointing();
        if (!on_source && !on_dest) || self.vcpus[i].blocked_on.is_some() {
            return;
        }
        let phase = match (on_source, self.start_at.is_some(), self.completed_at.is_some()) {
            (true, false, _) => 0,
            (true, true, _) => 1,
            (false, _, false) => 2,
            (false, _, true) => 3,
        };
        let end = self.now + QUANTUM_NS;
        let mut t = self.now;
        let generation = self.vcpu_generation;
        loop {
            let (page, write) = {
                let vcpu = &mut self.vcpus[i];
                vcpu.pending.take().unwrap_or_else(|| vcpu.pattern.next_access())
            };
            if on_dest && self.dst.memory[page as usize] == MISSING {
                let vcpu = &mut self.vcpus[i];
                vcpu.pending = Some((page, write));
                if t > self.now {
                    // Fault at the right time, not ahead of it.
                    vcpu.until = t;
                    self.at(t, Ev::Vcpu { vcpu: i as u32, generation });
                    return;
                }
                vcpu.blocked_on = Some(page);
                self.blocked += 1;
                self.trace.record(self.now, What::Note("fault"), i as u64, page);
                let result = self.dst.core.handle_page_fault(self.ts(), PageNumber(page), Waiter::Vcpu(i as u32));
                if let Err(error) = result {
                    self.checks.driver_event("destination", error.to_string());
                }
                self.drain_dest();
                return;
            }
            if on_source {
                if write {
                    let version = self.checks.write(page);
                    self.src_mem.write(page, version);
                } else {
                    self.checks.read(Where::Source, page, self.src_mem.versions[page as usize]);
                }
            } else if write {
                self.dst.memory[page as usize] = self.checks.write(page);
                if let Some(dirty) = self.dst.dirty.get_mut(page as usize) {
                    *dirty = true;
                }
            } else {
                self.checks.read(Where::Destination, page, self.dst.memory[page as usize]);
            }
            self.accesses[phase] += 1;
            t += self.sc.access_ns;
            if t >= end {
                self.vcpus[i].until = t;
                self.at(t, Ev::Vcpu { vcpu: i as u32, generation });
                return;
            }
        }
    }

    // ----- results --------------------------------------------------------

    fn result(self, real_secs: f64) -> RunResult {
        let now = self.ts();
        let src_stats = self.src.finished.as_ref().map_or_else(|| self.src.core.stats(now), |f| f.stats.clone());
        let dst_stats = self.dst.finished.as_ref().map_or_else(|| self.dst.core.stats(now), |f| f.stats.clone());
        let ms = |ns: u64| ns as f64 / 1e6;
        let window = |from: Option<u64>, to: Option<u64>| match (from, to) {
            (Some(a), Some(b)) if b > a => Some(ms(b - a)),
            _ => None,
        };
        let start = self.start_at;
        let rate = |count: u64, span: Option<f64>| span.filter(|&s| s > 0.0).map(|s| count as f64 / s);
        let before_ms = Some(ms(start.unwrap_or(self.now)));
        let source_ms = window(start, self.stop_at);
        let postcopy_ms = window(self.dst_started_at, self.completed_at);
        let after_ms = window(self.completed_at, Some(self.now));
        let before = rate(self.accesses[0], before_ms);
        let postcopy = rate(self.accesses[2], postcopy_ms);
        let guest = GuestProgress {
            before_per_ms: before,
            migrating_on_source_per_ms: rate(self.accesses[1], source_ms),
            postcopy_per_ms: postcopy,
            after_per_ms: rate(self.accesses[3], after_ms),
            postcopy_vs_before: match (postcopy, before) {
                (Some(p), Some(b)) if b > 0.0 => Some(p / b),
                _ => None,
            },
        };
        let blocked = &dst_stats.vcpu_blocked_ns;
        let report = Report {
            total_ms: window(start, self.completed_at),
            downtime_ms: window(self.stop_at, self.dst_started_at),
            phases: src_stats.phases,
            pages_sent: src_stats.pages_sent,
            network_bytes: self.net.charged_bytes(),
            remote_faults: dst_stats.remote_faults,
            fault_latency: dst_stats.fault_latency,
            vcpu_blocked_ms_total: ms(blocked.iter().sum()),
            vcpu_blocked_ms_max: ms(blocked.iter().copied().max().unwrap_or(0)),
            recoveries: src_stats.recoveries,
            duplicate_pages: dst_stats.duplicate_pages,
            stale_pages_discarded: dst_stats.stale_pages_discarded,
            requests_sent: dst_stats.requests_sent,
            page_parts_sent: src_stats.page_parts_sent,
            requests_for_pages_in_parts: src_stats.requests_for_pages_in_parts,
            checkpoints_abandoned: self.checkpoints_abandoned,
            checkpoints_abandoned_parking: self.checkpoints_abandoned_parking,
            return_writer_wakes: self.return_writer_wakes,
            guest,
        };
        let violations: Vec<String> = self.checks.violations.iter().map(ToString::to_string).collect();
        let outcome = if !violations.is_empty() {
            "violation"
        } else if self.completed_at.is_some() {
            "completed"
        } else if self.src.took_over.is_some() {
            "fell-back"
        } else {
            "unfinished"
        };
        RunResult {
            seed: self.sc.seed,
            options: self.sc.options_line(),
            replay: self.sc.replay_command(),
            outcome: outcome.into(),
            violations,
            notes: self.notes,
            attempts: self.attempt,
            sim_ms: ms(self.now),
            real_ms: real_secs * 1e3,
            events: self.events,
            page_transfers: self.page_frames,
            transfers_per_sec: self.page_frames as f64 / real_secs.max(1e-9),
            trace_hash: format!("{:016x}", self.trace.hash()),
            trace_records: self.trace.records,
            tail: self.trace.tail(),
            report,
        }
    }
}
