//! A scenario: every option of one simulated migration, drawn from its seed
//! (swarm testing: the configuration itself is random), printed in full so
//! that `postcopy-sim run --seed S` alone replays it, and overridable one
//! key at a time with `--set key=value`.

use crate::net::PageCharge;
pub use crate::net::{CHARGED_PAGE_BYTES, HUGE_CHARGED_PAGE_BYTES};
use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use postcopy_core::{Config, Mode, RamBlock, RamLayout};

use crate::rng::{stream, Rng};

/// A huge page is this many small pages long in the simulation (so that a
/// page filled from two versions, or half, shows in its bytes).
pub const HUGE_WIRE_FACTOR: u32 = 4;

/// Name of the block of huge pages.
pub const HUGE_BLOCK: &str = "hugepages";

/// The simulated orchestrator starts the next migration at most this long
/// after one that left the guest on the source.
pub const NEW_ATTEMPT_DELAY_MAX_MS: u64 = 20;

/// How long a run may take after the faults heal, from the schedules the
/// cores and the simulated orchestrator must be allowed to follow. The run
/// either recovers the migration under way or abandons it (the source
/// withdraws) and the orchestrator starts another, fault-free one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LivenessSchedule {
    /// A side notices a connection the faults broke: its peer timeout
    /// (a silent connection) or its handshake timeout (an attempt under way).
    pub detect_ms: u64,
    /// A paused source: the back-off in force (at most the longest delay),
    /// then one recovery handshake.
    pub recovery_ms: u64,
    /// A withdrawing source: every attempt of the withdrawal's back-off
    /// schedule (`withdraw_attempts` of them), each up to one handshake
    /// timeout, before it finishes.
    pub withdrawal_ms: u64,
    /// The orchestrator's delay before the next migration.
    pub next_attempt_ms: u64,
    /// One fault-free migration: its handshake, the wire time of every
    /// round (plus the background push, the switchover and margin), faults
    /// served one round trip each, the device state's load.
    pub migration_ms: u64,
    /// Event granularity and the tail after the last page.
    pub slack_ms: u64,
    /// Fallback: a crash after the start (its delay), the takeover wait,
    /// then the withdrawal's attempts to tell the destination.
    pub fallback_ms: u64,
}

impl LivenessSchedule {
    /// The longer of the two ways a healed run ends: the migration under way
    /// recovers and finishes, or it is abandoned and the next one runs.
    pub fn bound_ms(&self) -> u64 {
        let recover = self.recovery_ms + self.migration_ms;
        let abandon = self.withdrawal_ms + self.next_attempt_ms + self.migration_ms;
        self.detect_ms + recover.max(abandon).max(self.fallback_ms) + self.slack_ms
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// How a vCPU chooses the pages it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Each vCPU scans its own slice of the working set in order (30% writes).
    Sequential,
    /// Uniformly random pages of the working set (30% writes).
    Uniform,
    /// Zipf-like: a few pages take most accesses (30% writes).
    Hotspot,
    /// Uniform, 80% writes.
    WriteHeavy,
    /// Zipf-like, 2% writes.
    ReadMostly,
    /// Each vCPU draws one of the above.
    Mixed,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::Sequential,
        Workload::Uniform,
        Workload::Hotspot,
        Workload::WriteHeavy,
        Workload::ReadMostly,
        Workload::Mixed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Sequential => "sequential",
            Workload::Uniform => "uniform",
            Workload::Hotspot => "hotspot",
            Workload::WriteHeavy => "write-heavy",
            Workload::ReadMostly => "read-mostly",
            Workload::Mixed => "mixed",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown workload {s:?}; known: {}", Workload::ALL.map(|w| w.name()).join(", ")))
    }
}

/// The migration mode, printable: `postcopy` or `hybrid:ROUNDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModeOpt(pub Mode);

impl fmt::Display for ModeOpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Mode::Postcopy => f.write_str("postcopy"),
            Mode::Hybrid { precopy_rounds } => write!(f, "hybrid:{precopy_rounds}"),
        }
    }
}

impl FromStr for ModeOpt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "postcopy" {
            return Ok(ModeOpt(Mode::Postcopy));
        }
        let rounds = s.strip_prefix("hybrid:").or(if s == "hybrid" { Some("1") } else { None });
        match rounds.map(str::parse::<u32>) {
            Some(Ok(precopy_rounds)) if precopy_rounds > 0 => Ok(ModeOpt(Mode::Hybrid { precopy_rounds })),
            _ => Err(format!("mode {s:?}: expected postcopy or hybrid:ROUNDS (ROUNDS >= 1)")),
        }
    }
}

/// Points in real code paths where the fault injector resets a connection
/// (FoundationDB-style fault points), each at most `trigger_budget` times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Triggers(pub u8);

impl Triggers {
    /// The source holds requested pages it has not sent yet.
    pub const QUEUED: u8 = 1;
    /// The source is in the middle of a recovery handshake.
    pub const RECOVERING: u8 = 2;
    /// The destination is loading the device state.
    pub const LOADING: u8 = 4;
    /// The source has just transmitted StartGuest.
    pub const STARTED: u8 = 8;
    /// The destination has sent EOC, the source has not completed.
    pub const EOC: u8 = 16;
    const NAMES: [(u8, &'static str); 5] = [
        (Self::QUEUED, "queued"),
        (Self::RECOVERING, "recovering"),
        (Self::LOADING, "loading"),
        (Self::STARTED, "started"),
        (Self::EOC, "eoc"),
    ];

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

impl fmt::Display for Triggers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Self::NAMES.iter().filter(|(bit, _)| self.has(*bit)).map(|(_, n)| *n).collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join("+"))
        }
    }
}

impl FromStr for Triggers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(Triggers(0));
        }
        let mut bits = 0;
        for part in s.split('+') {
            let Some((bit, _)) = Self::NAMES.iter().find(|(_, n)| *n == part) else {
                return Err(format!("unknown trigger {part:?}; known: queued, recovering, loading, started, eoc"));
            };
            bits |= bit;
        }
        Ok(Triggers(bits))
    }
}

/// Where the destination process crashes (once), if at all. A crash after
/// the source transmitted StartGuest would lose the only running guest: no
/// protocol survives that, so the injector skips such a crash (and says so).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Crash {
    None,
    /// While connecting / handshaking.
    Handshake,
    /// During precopy rounds (hybrid).
    Precopy,
    /// While loading the device state (QEMU 2025: the source stayed paused).
    Loading,
    /// After ReadyToRun, before StartGuest arrived.
    AwaitingStart,
    /// Not a crash: loading the device state fails (the destination drops the guest).
    LoadError,
}

impl Crash {
    pub const ALL: [Crash; 6] =
        [Crash::None, Crash::Handshake, Crash::Precopy, Crash::Loading, Crash::AwaitingStart, Crash::LoadError];

    pub fn name(self) -> &'static str {
        match self {
            Crash::None => "none",
            Crash::Handshake => "handshake",
            Crash::Precopy => "precopy",
            Crash::Loading => "loading",
            Crash::AwaitingStart => "awaiting-start",
            Crash::LoadError => "load-error",
        }
    }
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Crash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Crash::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown crash point {s:?}; known: {}", Crash::ALL.map(|c| c.name()).join(", ")))
    }
}

/// A planted bug by name (`none` for the clean core). Parsed into the core's
/// `PlantedBug` only in builds with the `planted-bugs` feature.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plant(pub Option<String>);

impl fmt::Display for Plant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_deref().unwrap_or("none"))
    }
}

impl FromStr for Plant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(Plant(None));
        }
        #[cfg(feature = "planted-bugs")]
        {
            s.parse::<postcopy_core::PlantedBug>()?;
            Ok(Plant(Some(s.to_owned())))
        }
        #[cfg(not(feature = "planted-bugs"))]
        Err(format!("plant {s:?}: this build has no planted bugs (build with --features planted-bugs)"))
    }
}

macro_rules! scenario {
    ($($(#[doc = $doc:literal])* $name:ident : $ty:ty,)*) => {
        /// Every option of one run. Times and sizes carry their unit in the name.
        #[derive(Clone, Debug, PartialEq, Serialize)]
        pub struct Scenario {
            pub seed: u64,
            $($(#[doc = $doc])* pub $name: $ty,)*
        }

        impl Scenario {
            /// The option names, in printing order.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($name)),*];

            /// `(key, value)` for every option.
            pub fn fields(&self) -> Vec<(&'static str, String)> {
                vec![$((stringify!($name), self.$name.to_string())),*]
            }

            /// Overrides one option.
            pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
                match key {
                    $(stringify!($name) => {
                        self.$name = value.parse().map_err(|e| format!("{key}={value}: {e}"))?;
                    })*
                    _ => return Err(format!("unknown option {key:?}; known: {}", Self::KEYS.join(", "))),
                }
                Ok(())
            }
        }
    };
}

scenario! {
    /// Guest RAM in pages (charged as 4 KiB each: 1048576 pages = 4 GiB).
    pages: u64,
    /// RAM blocks the pages are split into.
    blocks: u32,
    /// Bytes per page in the simulation (content version + check words).
    wire_page_bytes: u32,
    /// Pages of an extra block of 2 MiB huge pages (0: none), charged 2 MiB
    /// each on the network, `HUGE_WIRE_FACTOR` small pages long in the
    /// simulation.
    huge_pages: u64,
    /// Percent of pages that are zero when the guest starts.
    zero_pct: u32,
    vcpus: u32,
    workload: Workload,
    /// Percent of RAM the workload touches.
    working_set_pct: u32,
    /// Guest compute time per page access.
    access_ns: u64,
    device_state_bytes: u64,
    /// Guest pages the device-state load touches (they may fault).
    device_pages: u32,
    device_load_us: u64,
    /// Time to stop the vCPUs on the source.
    stop_us: u64,
    /// From a page's install to its faulting vCPU running again.
    fault_wake_us: u64,
    /// Guest runs this long on the source before the migration starts.
    warmup_ms: u64,
    /// Guest runs this long on the destination after completion.
    after_ms: u64,
    mode: ModeOpt,
    urgent: bool,
    prepaging: bool,
    batch_pages: u32,
    max_outstanding: u32,
    /// Hybrid: the user asks for postcopy this long after the start (0: never).
    switch_after_ms: u64,
    /// 0: no keep-alives.
    keepalive_ms: u64,
    /// 0: no peer timeout.
    peer_timeout_ms: u64,
    handshake_timeout_ms: u64,
    reconnect_min_ms: u64,
    reconnect_max_ms: u64,
    start_timeout_ms: u64,
    /// Each direction's link.
    bandwidth_mbps: u64,
    /// One-way propagation delay.
    latency_us: u64,
    /// Extra delay per chunk, uniform in 0..=jitter (order kept per connection).
    jitter_us: u64,
    /// Socket buffer per connection: bytes written and not yet delivered.
    buffer_kib: u64,
    /// Bytes a writer hands the socket at once (also the link's unit).
    chunk_kib: u64,
    /// A connection attempt during a partition fails after this long.
    connect_timeout_ms: u64,
    /// Fault injection in the safety phase.
    faults: bool,
    /// Random connection resets.
    resets: u32,
    /// Network partitions (all links down for a while).
    partitions: u32,
    /// Strangers connecting to the destination (garbage, a bare preamble,
    /// another migration's resume hello); each must change nothing.
    strangers: u32,
    partition_max_ms: u64,
    triggers: Triggers,
    /// Resets per trigger at most.
    trigger_budget: u32,
    crash: Crash,
    /// End of the safety phase, from the migration's start: faults heal.
    heal_ms: u64,
    /// The migration must finish this long after the heal (0: derived from
    /// the other options, see `Scenario::liveness_bound_ms`).
    liveness_ms: u64,
    plant: Plant,
    /// Fallback on (docs/fallback.md): leases, fencing, checkpoints.
    fallback: bool,
    /// Fallback: the lease.
    lease_ms: u64,
    /// Fallback: the destination takes a checkpoint this often.
    checkpoint_ms: u64,
    /// Fallback: the destination's vCPUs stop this long for each checkpoint
    /// (plus 200 ns per dirty page copied): slow checkpoints.
    checkpoint_us: u64,
    /// Fallback: the destination process crashes this long after the guest
    /// started there (0: never), healed or not; only with `fallback` (without
    /// it no protocol saves the only running guest).
    crash_after_start_ms: u64,
    /// Fallback: percent of checkpoints whose capture fails after the
    /// dirty log was read (the driver abandons it and carries its pages
    /// into the next). Besides these, a checkpoint asked for while a vCPU
    /// waits on a missing page waits for it, and is abandoned if the
    /// guest is fenced or dropped meanwhile.
    abandon_pct: u32,
    /// Fallback: the destination's other writers flush only the urgent
    /// frames of the return path and ring one return writer for the
    /// checkpoints and the end of copy when `return_bulk_pending` says so,
    /// as the KVM driver does; the writer wakes this long after the ring
    /// (0: one writer sends everything).
    return_writer_us: u64,
    /// Connections the background push is spread over (`--push-streams`).
    push_streams: u8,
    /// CPU time a source connection's sender and receiver spend on a page
    /// (0: free): each connection has its own, so on a fast link several
    /// push streams move pages faster than one.
    stream_page_ns: u64,
}

impl Scenario {
    /// The scenario of `seed`, as the swarm draws it.
    pub fn draw(seed: u64) -> Scenario {
        let mut r = Rng::new(seed, stream::SCENARIO);
        let size = r.below(100);
        let pages = if size < 65 {
            r.log_uniform(256, 16 << 10)
        } else if size < 93 {
            r.log_uniform(16 << 10, 256 << 10)
        } else {
            r.log_uniform(256 << 10, 1 << 20)
        };
        let blocks = if pages >= 1024 { r.range(1, 4) as u32 } else { 1 };
        let wire_page_bytes = r.pick(&[16, 32, 64]);
        let zero_pct = r.pick(&[0, 10, 50, 90]);
        let vcpus = r.pick(&[1, 2, 4, 8, 16]);
        let workload = r.pick(&Workload::ALL);
        let working_set_pct = r.pick(&[5, 25, 100]);
        let mut access_ns = r.log_uniform(300, 30_000);
        let device_state_bytes = r.log_uniform(1 << 10, 4 << 20);
        let device_pages = r.below(9) as u32;
        let device_load_us = r.log_uniform(10, 5000);
        let stop_us = r.log_uniform(10, 500);
        let fault_wake_us = r.log_uniform(2, 100);
        let warmup_ms = r.range(1, 20);
        let after_ms = r.range(5, 20);

        let mode = if r.chance(0.6) { Mode::Postcopy } else { Mode::Hybrid { precopy_rounds: r.range(1, 3) as u32 } };
        let urgent = r.chance(0.6);
        let prepaging = r.chance(0.7);
        let batch_pages = r.pick(&[1, 8, 64, 1024]);
        let max_outstanding = r.log_uniform(u64::from(vcpus + device_pages + 1), 4096) as u32;

        let mut bandwidth_mbps = r.log_uniform(1000, 40_000);
        let latency_us = r.log_uniform(5, 2000);
        let jitter_us = if r.chance(0.5) { 0 } else { r.range(0, latency_us / 2) };
        let buffer_kib = r.log_uniform(64, 16 << 10);
        let chunk_kib = r.pick(&[4, 16, 64]).min(buffer_kib / 4).max(4);
        let connect_timeout_ms = r.log_uniform(1, 100);

        // Keep one migration's wire time within 3 simulated seconds, so that
        // a seed costs about a second of real time at most. A socket buffer
        // holds bytes until they arrive, so it caps a connection at
        // buffer / latency.
        let mut buffer_kib = buffer_kib;
        let wire_bits = pages * (CHARGED_PAGE_BYTES + 16) * 8;
        let needed_mbps = wire_bits / 1000 / 3000 + 1;
        bandwidth_mbps = bandwidth_mbps.max(needed_mbps);
        let window_mbps = |kib: u64| kib * 1024 * 8 / latency_us.max(1);
        if window_mbps(buffer_kib) < needed_mbps {
            buffer_kib = (needed_mbps * latency_us.max(1)).div_ceil(8 * 1024) + 1;
        }
        let effective_mbps = bandwidth_mbps.min(window_mbps(buffer_kib)).max(1);
        let est_ms = wire_bits / effective_mbps / 1000 + 1;
        let rounds = u64::from(mode.precopy_rounds());
        let switch_after_ms = if rounds > 0 && r.chance(0.3) { r.range(1, est_ms * rounds) } else { 0 };

        let rtt_ms = latency_us * 2 / 1000 + 1;
        let keepalive_ms = if r.chance(0.2) { 0 } else { r.log_uniform(1, 200) };
        let peer_timeout_ms = if keepalive_ms == 0 || r.chance(0.5) {
            0
        } else {
            let floor = 4 * keepalive_ms + 4 * rtt_ms + 10;
            r.log_uniform(floor, floor.max(2000))
        };
        // A recovery reports the present pages (8 bytes per 64 pages) within
        // one handshake.
        let report_ms = pages / 8 * 8 / effective_mbps / 1000;
        let handshake_floor = 20 + 20 * rtt_ms + 4 * report_ms;
        let handshake_timeout_ms = r.log_uniform(handshake_floor, handshake_floor.max(2000));
        let reconnect_min_ms = r.log_uniform(1, 50);
        let reconnect_max_ms = (reconnect_min_ms * r.range(1, 40)).min(1000);
        let start_timeout_ms = r.log_uniform(100, 2000).max(handshake_timeout_ms + 2 * reconnect_max_ms);

        // Keep the guest's accesses to a few million per run.
        let guest_ms = warmup_ms + after_ms + est_ms * (rounds + 2);
        let budget_accesses = 4_000_000;
        let floor_ns = guest_ms * 1_000_000 * u64::from(vcpus) / budget_accesses;
        access_ns = access_ns.max(floor_ns);

        let faults = r.chance(0.75);
        let resets = r.below(5) as u32;
        let partitions = r.below(3) as u32;
        let partition_max_ms = r.log_uniform(1, 500);
        let triggers = Triggers((0..5).filter(|_| r.chance(0.3)).fold(0, |bits, i| bits | (1 << i)));
        let trigger_budget = r.range(1, 3) as u32;
        let crash = if r.chance(0.15) { r.pick(&Crash::ALL[1..]) } else { Crash::None };
        let heal_ms = r.log_uniform(1, 2 * est_ms * (rounds + 1) + 50);
        let liveness_ms = 0;
        // Drawn last: the options above stay what they were for every seed.
        let strangers = if r.chance(0.3) { r.range(1, 4) as u32 } else { 0 };
        let huge_pages = if r.chance(0.25) { r.log_uniform(1, 64) } else { 0 };
        let push_streams = if r.chance(0.3) { r.range(2, 3) as u8 } else { 1 };
        // At most 2 simulated seconds of one stream's CPU for the whole push.
        let frames = pages + u64::from(HUGE_WIRE_FACTOR) * huge_pages;
        let stream_page_ns = if r.chance(0.3) { r.log_uniform(100, 3000).min(2_000_000_000 / frames) } else { 0 };
        // Fallback, drawn after everything else: a seed that draws it off
        // keeps every option it had.
        let fallback = r.chance(0.3);
        let (mut lease_ms, mut checkpoint_ms, mut checkpoint_us, mut crash_after_start_ms) = (1000, 100, 100, 0);
        let (mut abandon_pct, mut return_writer_us) = (0, 0);
        let mut partition_max_ms = partition_max_ms;
        if fallback {
            // Longer than a round trip plus what a full socket buffer holds
            // ahead of a lease request or a grant, four times over.
            let drain_ms = buffer_kib * 1024 * 8 / effective_mbps / 1000 + 1;
            let floor = 4 * (rtt_ms + 2 * drain_ms) + 20;
            lease_ms = r.log_uniform(floor, floor.max(400) * 2);
            // Checkpoints within a migration's time, up to a lease.
            checkpoint_ms = r.log_uniform(1, est_ms.clamp(2, lease_ms));
            checkpoint_us = r.log_uniform(10, 5000);
            crash_after_start_ms = if r.chance(0.5) { r.range(0, est_ms + 5) } else { 0 };
            // Partitions shorter and longer than the lease.
            partition_max_ms = partition_max_ms.max(3 * lease_ms);
            // Drawn after the other fallback options, which stay as they were.
            abandon_pct = if r.chance(0.5) { r.pick(&[5, 20, 50]) } else { 0 };
            return_writer_us = if r.chance(0.5) { r.log_uniform(5, 2000) } else { 0 };
        }

        Scenario {
            seed,
            pages,
            blocks,
            wire_page_bytes,
            huge_pages,
            zero_pct,
            vcpus,
            workload,
            working_set_pct,
            access_ns,
            device_state_bytes,
            device_pages,
            device_load_us,
            stop_us,
            fault_wake_us,
            warmup_ms,
            after_ms,
            mode: ModeOpt(mode),
            urgent,
            prepaging,
            batch_pages,
            max_outstanding,
            switch_after_ms,
            keepalive_ms,
            peer_timeout_ms,
            handshake_timeout_ms,
            reconnect_min_ms,
            reconnect_max_ms,
            start_timeout_ms,
            bandwidth_mbps,
            latency_us,
            jitter_us,
            buffer_kib,
            chunk_kib,
            connect_timeout_ms,
            faults,
            resets,
            partitions,
            strangers,
            partition_max_ms,
            triggers,
            trigger_budget,
            crash,
            heal_ms,
            liveness_ms,
            plant: Plant(None),
            fallback,
            lease_ms,
            checkpoint_ms,
            checkpoint_us,
            crash_after_start_ms,
            abandon_pct,
            return_writer_us,
            push_streams,
            stream_page_ns,
        }
    }

    /// Simulated milliseconds the liveness phase may take: `liveness_ms`, or
    /// when it is 0 the bound [`Scenario::liveness_schedule`] derives.
    pub fn liveness_bound_ms(&self) -> u64 {
        if self.liveness_ms > 0 {
            return self.liveness_ms;
        }
        self.liveness_schedule().bound_ms()
    }

    /// The longest schedule the cores and the simulated orchestrator may
    /// follow after the faults heal, phase by phase, from the options.
    pub fn liveness_schedule(&self) -> LivenessSchedule {
        let wire_bits = (self.pages * (CHARGED_PAGE_BYTES + 16) + self.huge_pages * (HUGE_CHARGED_PAGE_BYTES + 16)) * 8;
        let window_mbps = self.buffer_kib * 1024 * 8 / self.latency_us.max(1);
        let effective_mbps = self.bandwidth_mbps.min(window_mbps).max(1);
        // The senders' CPU: counted as if one stream pushed every page
        // (precopy goes on the main channel alone).
        let frames = self.pages + u64::from(HUGE_WIRE_FACTOR) * self.huge_pages;
        let cpu_ms = frames * self.stream_page_ns / 1_000_000;
        let est_ms = wire_bits / effective_mbps / 1000 + cpu_ms + 1;
        let rounds = u64::from(self.mode.0.precopy_rounds());
        // Faults served one round trip each, by a vCPU that scans.
        let fault_ms = (self.pages + self.huge_pages) * 2 * self.latency_us / 1000 / 8
            + self.huge_pages * HUGE_CHARGED_PAGE_BYTES * 8 / effective_mbps / 1000;
        let config = self.config();
        // Each withdrawal attempt waits its back-off, then lasts one
        // handshake timeout at most (the core's bound on connecting and on
        // the handshake); the source finishes after the last one.
        let withdrawal_ms = (0..config.withdraw_attempts)
            .map(|attempt| duration_ms(config.reconnect_delay(attempt)) + self.handshake_timeout_ms)
            .sum();
        // Fallback: a destination lost for good is replaced after the
        // takeover wait (from its crash, which may come after the heal),
        // then told, as a withdrawal tells.
        let fallback_ms = if self.fallback {
            let wait = config.fallback.as_ref().map_or(0, |f| duration_ms(f.takeover_wait()));
            self.crash_after_start_ms + wait + withdrawal_ms
        } else {
            0
        };
        LivenessSchedule {
            fallback_ms,
            detect_ms: self.peer_timeout_ms.max(self.handshake_timeout_ms),
            recovery_ms: self.reconnect_max_ms + self.handshake_timeout_ms,
            withdrawal_ms,
            next_attempt_ms: NEW_ATTEMPT_DELAY_MAX_MS,
            migration_ms: self.handshake_timeout_ms + (rounds + 4) * est_ms + fault_ms + self.device_load_us / 1000,
            slack_ms: 200,
        }
    }

    /// The scenario of `seed`, then the overrides, in order.
    pub fn with_overrides(seed: u64, overrides: &[(String, String)]) -> Result<Scenario, String> {
        let mut scenario = Scenario::draw(seed);
        for (key, value) in overrides {
            scenario.set(key, value)?;
        }
        scenario.validate()?;
        Ok(scenario)
    }

    /// Rejects combinations the simulator cannot run.
    pub fn validate(&self) -> Result<(), String> {
        if self.pages == 0 || self.pages > 1 << 28 {
            return Err(format!("pages={} must be in 1..=2^28", self.pages));
        }
        if self.blocks == 0 || u64::from(self.blocks) > self.pages || self.blocks > 256 {
            return Err(format!("blocks={} must be in 1..=min(pages, 256)", self.blocks));
        }
        if !self.wire_page_bytes.is_power_of_two() || !(16..=4096).contains(&self.wire_page_bytes) {
            return Err(format!("wire_page_bytes={} must be a power of two in 16..=4096", self.wire_page_bytes));
        }
        if self.huge_pages > 4096 {
            return Err(format!("huge_pages={} must be at most 4096", self.huge_pages));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(format!("vcpus={} must be in 1..=64", self.vcpus));
        }
        if self.zero_pct > 100 || self.working_set_pct == 0 || self.working_set_pct > 100 {
            return Err("zero_pct must be 0..=100 and working_set_pct 1..=100".into());
        }
        if self.access_ns == 0 || self.bandwidth_mbps == 0 || self.buffer_kib == 0 || self.chunk_kib == 0 {
            return Err("access_ns, bandwidth_mbps, buffer_kib and chunk_kib must be positive".into());
        }
        if self.max_outstanding < self.vcpus + self.device_pages + 1 {
            return Err(format!(
                "max_outstanding={} must exceed vcpus + device_pages (each waits for one page at most)",
                self.max_outstanding
            ));
        }
        if self.fallback && (self.lease_ms == 0 || self.checkpoint_ms == 0) {
            return Err("lease_ms and checkpoint_ms must be positive".into());
        }
        if self.abandon_pct > 100 {
            return Err(format!("abandon_pct={} must be at most 100", self.abandon_pct));
        }
        // The liveness bound's slack (200 ms) covers a wake-up of the return
        // writer behind the end of copy.
        if self.return_writer_us > 100_000 {
            return Err(format!("return_writer_us={} must be at most 100000", self.return_writer_us));
        }
        if self.push_streams == 0 || self.push_streams > postcopy_core::MAX_PUSH_STREAMS {
            return Err(format!(
                "push_streams={} must be in 1..={}",
                self.push_streams,
                postcopy_core::MAX_PUSH_STREAMS
            ));
        }
        if self.device_state_bytes > 64 << 20 {
            return Err("device_state_bytes must be at most 64 MiB".into());
        }
        Ok(())
    }

    /// The RAM layout: `blocks` blocks, the first holding most pages.
    pub fn layout(&self) -> RamLayout {
        let blocks = u64::from(self.blocks);
        let small = (self.pages / (4 * blocks)).max(1);
        let page_size = self.wire_page_bytes;
        let mut list =
            vec![RamBlock { name: "pc.ram".into(), page_count: self.pages - (blocks - 1) * small, page_size }];
        list.extend((1..blocks).map(|i| RamBlock { name: format!("blk{i}"), page_count: small, page_size }));
        if self.huge_pages > 0 {
            list.push(RamBlock {
                name: HUGE_BLOCK.into(),
                page_count: self.huge_pages,
                page_size: self.huge_wire_bytes(),
            });
        }
        // Validated sizes: the layout cannot be rejected.
        RamLayout::new(self.wire_page_bytes, list).unwrap_or_else(|e| panic!("scenario layout: {e}"))
    }

    /// What pages cost on the simulated network.
    pub fn page_charge(&self) -> PageCharge {
        let huge_wire_bytes = if self.huge_pages > 0 { u64::from(self.huge_wire_bytes()) } else { 0 };
        PageCharge { wire_page_bytes: u64::from(self.wire_page_bytes), huge_wire_bytes }
    }

    /// Bytes of a huge page in the simulation.
    pub fn huge_wire_bytes(&self) -> u32 {
        self.wire_page_bytes * HUGE_WIRE_FACTOR
    }

    /// The cores' configuration.
    pub fn config(&self) -> Config {
        let ms = Duration::from_millis;
        Config {
            mode: self.mode.0,
            urgent_channel: self.urgent,
            prepaging: self.prepaging,
            request_batch_pages: self.batch_pages,
            max_outstanding_requests: self.max_outstanding,
            max_device_state_bytes: 64 << 20,
            handshake_timeout: ms(self.handshake_timeout_ms),
            keepalive_interval: (self.keepalive_ms > 0).then(|| ms(self.keepalive_ms)),
            peer_timeout: (self.peer_timeout_ms > 0).then(|| ms(self.peer_timeout_ms)),
            reconnect_delay_min: ms(self.reconnect_min_ms),
            reconnect_delay_max: ms(self.reconnect_max_ms),
            start_timeout: ms(self.start_timeout_ms),
            // A huge page goes in HUGE_WIRE_FACTOR parts, as a 2 MiB one in
            // parts of 128 KiB: a request can meet a page half pushed.
            page_part_bytes: self.wire_page_bytes,
            fallback: self.fallback.then(|| postcopy_core::FallbackConfig {
                lease: ms(self.lease_ms),
                checkpoint_interval: ms(self.checkpoint_ms),
                ..postcopy_core::FallbackConfig::default()
            }),
            push_streams: self.push_streams,
            #[cfg(feature = "planted-bugs")]
            plant: self.plant.0.as_deref().and_then(|name| name.parse().ok()),
            ..Config::default()
        }
    }

    /// `key=value` for every option, on one line.
    pub fn options_line(&self) -> String {
        let fields: Vec<String> = self.fields().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("seed={} {}", self.seed, fields.join(" "))
    }

    /// The command that replays this scenario: the seed, plus every option
    /// that differs from what the seed draws.
    pub fn replay_command(&self) -> String {
        let drawn = Scenario::draw(self.seed);
        let drawn_fields = drawn.fields();
        let mut command = format!("postcopy-sim run --seed {}", self.seed);
        for ((key, value), (_, drawn_value)) in self.fields().into_iter().zip(drawn_fields) {
            if value != drawn_value {
                command.push_str(&format!(" --set {key}={value}"));
            }
        }
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_valid_reproducible_scenarios() {
        for seed in 0..500 {
            let a = Scenario::draw(seed);
            a.validate().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(a, Scenario::draw(seed));
            assert_eq!(a.layout().total_pages(), a.pages + a.huge_pages);
        }
    }

    #[test]
    fn every_option_round_trips_through_set() {
        let a = Scenario::draw(3);
        let mut b = Scenario::draw(4);
        for (key, value) in a.fields() {
            b.set(key, &value).unwrap();
        }
        b.seed = a.seed;
        assert_eq!(a, b);
        assert_eq!(a.replay_command(), "postcopy-sim run --seed 3");
        let mut c = a.clone();
        c.set("pages", "1048576").unwrap();
        c.set("mode", "hybrid:2").unwrap();
        assert!(c.replay_command().contains("--set mode=hybrid:2"));
        assert!(c.set("nope", "1").is_err());
        assert!(c.set("mode", "hybrid:0").is_err());
    }
}
