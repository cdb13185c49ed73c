//! `pair`: both cores, over an adversarial network, through
//! [`postcopy_core::testkit::Pair`].
//!
//! The fuzzer picks every step: which side writes on which channel and how
//! much, how many bytes of which channel arrive (frames split anywhere;
//! channels reordered against each other), which connection the network
//! drops, whether connection attempts fail (a partition), guest reads and
//! writes on either side, timers, and the user's switch to postcopy; the
//! configuration (mode, urgent channel, batch sizes, timeouts, vCPUs, pages
//! the device-state load touches, RAM layout) too. The pair's oracle checks
//! docs/protocol.md's invariants after every step (no stale read, one runner, no
//! install over a present page, bounded queues, each page once in pure
//! postcopy without a loss). Then the network heals and the run must end:
//! either both sides completed with every page present at its newest
//! version, or the migration failed before `StartGuest` with the guest
//! running on the source and never on the destination.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use std::time::Duration;

use postcopy_core::testkit::{Outcome, Pair, PairConfig, Violation};
use postcopy_core::{Channel, Config, Mode, PageNumber, RamBlock, RamLayout, SourceState};

use crate::input::{pick_channel, In, Num, Out};

/// Steps per input, at most.
pub const MAX_OPS: usize = 1024;
/// Fair steps allowed to finish a healed run.
pub const HEAL_STEPS: usize = 20_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairSetup {
    /// `m % 5`: 0 pure postcopy, else hybrid with `m % 5 - 1` rounds.
    pub mode: u8,
    /// Bit 0 urgent channel, 1 prepaging, 2 keep-alives, 3 peer timeout,
    /// 4 short start timeout, 5 short handshake timeout, 6 slow reconnects.
    pub flags: u8,
    /// `request_batch_pages = v % 8 + 1`.
    pub batch: u8,
    /// Extra room in `max_outstanding_requests` beyond what vCPUs and the
    /// device load can fault at once: `v % 16`.
    pub spare_requests: u8,
    /// `vcpus = v % 3 + 1`.
    pub vcpus: u8,
    pub device_state_len: u8,
    /// `device_state_chunk_bytes = v % 64 + 1`.
    pub chunk: u8,
    /// Pages the device-state load touches (at most 3).
    pub device_pages: Vec<Num>,
    /// Page counts (`v % 48 + 1`) of one to three blocks.
    pub blocks: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PairOp {
    /// The writer of `Channel::ALL[ch % 3]` writes at least one frame and
    /// up to `max_bytes`.
    Transmit {
        ch: u8,
        max_bytes: u16,
    },
    /// Up to `max_bytes` of what is in flight arrive (0: the whole oldest write).
    Deliver {
        ch: u8,
        max_bytes: u16,
    },
    Lose(u8),
    Access {
        vcpu: u8,
        page: Num,
        write: bool,
    },
    FireTimer,
    /// Connection attempts fail (`true`) or succeed.
    Partition(bool),
    SwitchToPostcopy,
    /// `n % 16 + 1` fair rounds: every channel written and drained.
    Rounds(u8),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairInput {
    pub setup: PairSetup,
    pub ops: Vec<PairOp>,
}

impl PairOp {
    fn read(r: &mut In) -> PairOp {
        match r.u8() % 8 {
            0 => PairOp::Transmit { ch: r.u8(), max_bytes: r.u16() },
            1 => PairOp::Deliver { ch: r.u8(), max_bytes: r.u16() },
            2 => PairOp::Lose(r.u8()),
            3 => PairOp::Access { vcpu: r.u8(), page: r.num(), write: r.bool() },
            4 => PairOp::FireTimer,
            5 => PairOp::Partition(r.bool()),
            6 => PairOp::SwitchToPostcopy,
            _ => PairOp::Rounds(r.u8()),
        }
    }

    fn write(&self, o: &mut Out) {
        match self {
            PairOp::Transmit { ch, max_bytes } => {
                o.u8(0).u8(*ch).u16(*max_bytes);
            }
            PairOp::Deliver { ch, max_bytes } => {
                o.u8(1).u8(*ch).u16(*max_bytes);
            }
            PairOp::Lose(ch) => {
                o.u8(2).u8(*ch);
            }
            PairOp::Access { vcpu, page, write } => {
                o.u8(3).u8(*vcpu).num(*page).bool(*write);
            }
            PairOp::FireTimer => {
                o.u8(4);
            }
            PairOp::Partition(on) => {
                o.u8(5).bool(*on);
            }
            PairOp::SwitchToPostcopy => {
                o.u8(6);
            }
            PairOp::Rounds(n) => {
                o.u8(7).u8(*n);
            }
        }
    }
}

impl<'a> Arbitrary<'a> for PairInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut r = In::new(u);
        let setup = PairSetup {
            mode: r.u8(),
            flags: r.u8(),
            batch: r.u8(),
            spare_requests: r.u8(),
            vcpus: r.u8(),
            device_state_len: r.u8(),
            chunk: r.u8(),
            device_pages: r.list(3, In::num),
            blocks: r.list(3, In::u8),
        };
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < MAX_OPS {
            ops.push(PairOp::read(&mut r));
        }
        Ok(PairInput { setup, ops })
    }
}

impl PairInput {
    pub fn to_bytes(&self) -> Vec<u8> {
        let s = &self.setup;
        let mut o = Out::default();
        o.u8(s.mode).u8(s.flags).u8(s.batch).u8(s.spare_requests).u8(s.vcpus).u8(s.device_state_len).u8(s.chunk);
        o.list(&s.device_pages, |o, &p| {
            o.num(p);
        });
        o.list(&s.blocks, |o, &b| {
            o.u8(b);
        });
        for op in &self.ops {
            op.write(&mut o);
        }
        o.0
    }
}

impl PairSetup {
    pub fn pair_config(&self) -> PairConfig {
        let rounds = self.mode % 5;
        let flags = self.flags;
        let vcpus = u32::from(self.vcpus % 3) + 1;
        let blocks: Vec<RamBlock> = if self.blocks.is_empty() {
            vec![RamBlock { name: "ram".into(), page_count: 16, page_size: 64 }]
        } else {
            self.blocks
                .iter()
                .enumerate()
                .map(|(i, &pages)| RamBlock {
                    name: format!("b{i}"),
                    page_count: u64::from(pages % 48) + 1,
                    page_size: 64,
                })
                .collect()
        };
        let layout = RamLayout::new(64, blocks).expect("fuzz layouts are valid");
        let total = layout.total_pages();
        let mut device_pages: Vec<PageNumber> =
            self.device_pages.iter().map(|p| PageNumber(p.index_below(total) % total)).collect();
        device_pages.sort_unstable();
        device_pages.dedup();
        let config = Config {
            mode: if rounds == 0 { Mode::Postcopy } else { Mode::Hybrid { precopy_rounds: u32::from(rounds - 1) } },
            urgent_channel: flags & 1 != 0,
            prepaging: flags & 2 != 0,
            keepalive_interval: (flags & 4 != 0).then(|| Duration::from_secs(1)),
            peer_timeout: (flags & 8 != 0).then(|| Duration::from_secs(3)),
            start_timeout: if flags & 16 != 0 { Duration::from_secs(2) } else { Duration::from_secs(60) },
            handshake_timeout: if flags & 32 != 0 { Duration::from_secs(1) } else { Duration::from_secs(10) },
            reconnect_delay_min: Duration::from_millis(if flags & 64 != 0 { 200 } else { 20 }),
            reconnect_delay_max: Duration::from_millis(if flags & 64 != 0 { 2000 } else { 200 }),
            request_batch_pages: u32::from(self.batch % 8) + 1,
            max_outstanding_requests: vcpus + device_pages.len() as u32 + u32::from(self.spare_requests % 16),
            device_state_chunk_bytes: u32::from(self.chunk % 64) + 1,
            max_device_state_bytes: 256,
            // The spare-requests byte's top bits: push streams.
            push_streams: 1 + (self.spare_requests >> 4) % 3,
            ..Config::default()
        };
        let mut cfg = PairConfig::new(config, total);
        cfg.layout = layout;
        cfg.vcpus = vcpus;
        cfg.device_state = Bytes::from((0..self.device_state_len).collect::<Vec<u8>>());
        cfg.device_pages = device_pages;
        cfg
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PairOutcome {
    /// Both sides completed with every page in place.
    Completed,
    /// The migration failed before the switchover; the guest stayed on the source.
    FailedBeforeStart,
}

fn fail_on_violation(pair: &Pair, after: &str) {
    if let Some(violation) = pair.violations.first() {
        panic!("{violation} after {after} (source {}, destination {})", pair.src.core.state(), pair.dst.core.state());
    }
}

/// Runs the target on one input.
pub fn run(input: &PairInput) -> PairOutcome {
    let cfg = input.setup.pair_config();
    let total = cfg.layout.total_pages();
    let vcpus = cfg.vcpus;
    if crate::trace::enabled() {
        eprintln!("{:?}", cfg.config);
    }
    let mut pair = Pair::new(cfg);
    fail_on_violation(&pair, "start");
    for op in &input.ops {
        match *op {
            PairOp::Transmit { ch, max_bytes } => {
                pair.transmit(pick_channel(&Channel::ALL, ch), max_bytes as usize);
            }
            PairOp::Deliver { ch, max_bytes } => {
                let max = if max_bytes == 0 { usize::MAX } else { max_bytes as usize };
                pair.deliver(pick_channel(&Channel::ALL, ch), max);
            }
            PairOp::Lose(ch) => {
                pair.lose(pick_channel(&Channel::ALL, ch));
            }
            PairOp::Access { vcpu, page, write } => {
                let page = PageNumber(page.index_below(total) % total);
                pair.guest_access(u32::from(vcpu) % vcpus, page, write);
            }
            PairOp::FireTimer => {
                pair.fire_timer();
            }
            PairOp::Partition(on) => pair.connect_allowed = !on,
            PairOp::SwitchToPostcopy => {
                let _ = pair.src.core.handle_switch_to_postcopy(pair.now);
                pair.settle();
            }
            PairOp::Rounds(n) => {
                for _ in 0..=n % 16 {
                    for channel in Channel::EVERY {
                        pair.transmit(channel, 1 << 16);
                        while pair.deliver(channel, usize::MAX) {}
                    }
                }
            }
        }
        if crate::trace::enabled() {
            eprintln!(
                "{op:?} -> source {} destination {} (sent {}, now {:?})",
                pair.src.core.state(),
                pair.dst.core.state(),
                pair.src.core.stats(pair.now).pages_sent.total(),
                pair.now
            );
        }
        pair.check();
        fail_on_violation(&pair, &format!("{op:?}"));
    }

    // Heal the network and let the run finish fairly.
    match pair.run_to_completion(HEAL_STEPS) {
        Ok(Outcome::Completed) => PairOutcome::Completed,
        Ok(Outcome::AbandonedOnSource) => PairOutcome::FailedBeforeStart,
        // Only after the destination exits, which this target never does.
        Ok(Outcome::CompletedSourceGaveUp) => panic!("the source gave the guest up to a destination still there"),
        Ok(Outcome::TookOver) => panic!("a takeover in a pair without fallback"),
        // The source gave up before StartGuest and took the guest back; the
        // destination may still be listening (it never learned of a session).
        Err(Violation::MigrationFailed { .. })
            if !pair.src.past_start
                && pair.src.core.state() == SourceState::Failed
                && pair.src.running
                && !pair.dst.running
                && !pair.dst.core.guest_started() =>
        {
            PairOutcome::FailedBeforeStart
        }
        Err(violation) => panic!(
            "healed run: {violation} (source {} past start {}, destination {})",
            pair.src.core.state(),
            pair.src.past_start,
            pair.dst.core.state()
        ),
    }
}
