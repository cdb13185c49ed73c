//! Property tests over both cores together: random guest accesses, channel
//! interleavings, byte chunkings and lost connections, with docs/protocol.md's
//! invariants checked after every step, then a healed run that must complete
//! with every page holding its newest version.

use postcopy_core::testkit::{Outcome, Pair, PairConfig, Violation};
use postcopy_core::{Channel, Config, Mode, PageNumber, PlantedBug};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum PairStep {
    Transmit(Channel, usize),
    Deliver(Channel, usize),
    Lose(Channel),
    Access { vcpu: u32, page: u64, write: bool },
    Timer,
    SwitchToPostcopy,
}

fn channel() -> impl Strategy<Value = Channel> {
    prop_oneof![Just(Channel::Main), Just(Channel::Return), Just(Channel::Urgent)]
}

fn pair_step(pages: u64, vcpus: u32, losses: bool) -> impl Strategy<Value = PairStep> {
    let lose_weight = if losses { 1 } else { 0 };
    prop_oneof![
        8 => (channel(), prop_oneof![Just(0usize), 1usize..300]).prop_map(|(c, n)| PairStep::Transmit(c, n)),
        8 => (channel(), prop_oneof![Just(usize::MAX), 1usize..100]).prop_map(|(c, n)| PairStep::Deliver(c, n)),
        lose_weight => channel().prop_map(PairStep::Lose),
        6 => (0..vcpus, 0..pages, any::<bool>()).prop_map(|(vcpu, page, write)| PairStep::Access { vcpu, page, write }),
        1 => Just(PairStep::Timer),
        1 => Just(PairStep::SwitchToPostcopy),
    ]
}

fn config(hybrid: bool, urgent: bool, prepaging: bool) -> Config {
    let base = if hybrid { Config::hybrid(2) } else { Config::postcopy() };
    // A `Timer` step jumps to the next deadline: keep-alives come every
    // second, so 250 ops must not reach a handshake or peer timeout, which
    // would be a loss (a run "without losses" must complete).
    let hour = std::time::Duration::from_secs(3600);
    Config {
        urgent_channel: urgent,
        prepaging,
        request_batch_pages: 3,
        max_outstanding_requests: 8,
        handshake_timeout: hour,
        peer_timeout: Some(hour),
        ..base
    }
}

fn apply(pair: &mut Pair, op: &PairStep) {
    match *op {
        PairStep::Transmit(channel, max) => {
            pair.transmit(channel, max);
        }
        PairStep::Deliver(channel, max) => {
            pair.deliver(channel, max);
        }
        PairStep::Lose(channel) => {
            pair.lose(channel);
        }
        PairStep::Access { vcpu, page, write } => pair.guest_access(vcpu, PageNumber(page), write),
        PairStep::Timer => {
            pair.fire_timer();
        }
        PairStep::SwitchToPostcopy => {
            let _ = pair.src.core.handle_switch_to_postcopy(pair.now);
            pair.settle();
        }
    }
}

/// Runs `ops`, checking after each; then heals and runs to completion.
fn run(cfg: PairConfig, ops: &[PairStep]) -> Result<(Outcome, Box<Pair>), (Violation, Box<Pair>)> {
    let mut pair = Box::new(Pair::new(cfg));
    for op in ops {
        apply(&mut pair, op);
        pair.check();
        if let Some(violation) = pair.violations.first().cloned() {
            return Err((violation, pair));
        }
    }
    match pair.run_to_completion(100_000) {
        Ok(outcome) => Ok((outcome, pair)),
        Err(violation) => Err((violation, pair)),
    }
}

fn scenario(losses: bool) -> impl Strategy<Value = (PairConfig, Vec<PairStep>)> {
    (1u64..12, 1u32..3, any::<bool>(), any::<bool>(), any::<bool>(), 0usize..3).prop_flat_map(
        move |(pages, vcpus, hybrid, urgent, prepaging, device_pages)| {
            let mut cfg = PairConfig::new(config(hybrid, urgent, prepaging), pages);
            cfg.vcpus = vcpus;
            cfg.device_pages = (0..device_pages as u64).map(|p| PageNumber(p % pages)).collect();
            (Just(cfg), prop::collection::vec(pair_step(pages, vcpus, losses), 0..250))
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_without_losses((cfg, ops) in scenario(false)) {
        let pure = cfg.config.mode == Mode::Postcopy;
        let pages = cfg.layout.total_pages();
        match run(cfg, &ops) {
            Ok((outcome, pair)) => {
                prop_assert_eq!(outcome, Outcome::Completed, "nothing was lost: the migration completes");
                // Invariant 4: in pure postcopy without losses each page crosses once.
                if pure {
                    prop_assert_eq!(pair.src.core.stats(pair.now).pages_sent.total(), pages);
                }
            }
            Err((violation, pair)) => prop_assert!(false, "{violation:?}\nsource {} destination {}", pair.src.core.state(), pair.dst.core.state()),
        }
    }

    #[test]
    fn invariants_hold_with_lost_connections((cfg, ops) in scenario(true)) {
        if let Err((violation, pair)) = run(cfg, &ops) {
            prop_assert!(false, "{violation:?}\nsource {} destination {}", pair.src.core.state(), pair.dst.core.state());
        }
    }
}

/// A small deterministic generator, so that the planted-bug search below
/// is the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_ops(rng: &mut XorShift, pages: u64, vcpus: u32, len: usize) -> Vec<PairStep> {
    (0..len)
        .map(|_| {
            let channel = Channel::ALL[rng.below(3) as usize];
            match rng.below(30) {
                0..=7 => PairStep::Transmit(channel, 0),
                8..=17 => PairStep::Deliver(channel, usize::MAX),
                18 => PairStep::Lose(channel),
                19 => PairStep::Timer,
                20 => PairStep::SwitchToPostcopy,
                _ => PairStep::Access {
                    vcpu: rng.below(u64::from(vcpus)) as u32,
                    page: rng.below(pages),
                    write: rng.below(2) == 0,
                },
            }
        })
        .collect()
}

/// The same random search finds each planted bug, and finds nothing on the
/// clean core: the checks of this file can fail.
#[test]
fn random_runs_catch_every_planted_bug() {
    for plant in PlantedBug::ALL {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut caught = None;
        for attempt in 0..3000 {
            let hybrid = matches!(plant, PlantedBug::StaleNotDropped) || attempt % 2 == 0;
            let mut base = config(hybrid, attempt % 3 != 0, true);
            base.plant = Some(plant);
            let mut cfg = PairConfig::new(base, 4);
            cfg.vcpus = 2;
            let ops = random_ops(&mut rng, 4, 2, 120);
            if let Err((violation, _)) = run(cfg.clone(), &ops) {
                // The same scenario passes on the clean core.
                cfg.config.plant = None;
                if let Err((clean, _)) = run(cfg, &ops) {
                    panic!("the clean core fails the scenario that caught {plant}: {clean:?}");
                }
                caught = Some((attempt, violation));
                break;
            }
        }
        let (attempt, violation) = caught.unwrap_or_else(|| panic!("{plant} was not caught"));
        println!("{plant}: caught after {attempt} scenarios: {violation:?}");
    }
}
