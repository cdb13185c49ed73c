//! Fallback (docs/fallback.md) through the testkit: a migration with
//! fallback on completes as before; checkpoints are committed while the
//! guest writes on the destination; a crashed or cut-off destination is
//! replaced by the source restarting the guest from exactly the last
//! committed checkpoint; a fenced destination never resumes; a reappearing
//! one drops its copy.

use postcopy_core::testkit::{Outcome, Pair, PairConfig, Violation};
use postcopy_core::{
    Channel, Config, DestinationState, FallbackConfig, MigrationError, PageNumber, SourceState, Timestamp,
};
use std::time::Duration;

const PAGES: u64 = 8;

fn fallback_config() -> Config {
    Config {
        fallback: Some(FallbackConfig {
            lease: Duration::from_millis(200),
            drift_ppm: 1000,
            takeover_margin: Duration::from_millis(10),
            checkpoint_interval: Duration::from_millis(20),
            renewals_per_lease: 4,
        }),
        ..Config::postcopy()
    }
}

/// Moves the return and urgent channels until nothing moves (no timer
/// fires). The main channel, which carries the background push, is held,
/// so that the migration does not complete under the test's feet (grants
/// and acknowledgements go on the urgent channel).
fn pump(pair: &mut Pair) {
    for _ in 0..1000 {
        let mut moved = false;
        for channel in [Channel::Return, Channel::Urgent] {
            moved |= pair.transmit(channel, 1 << 16);
            while pair.deliver(channel, usize::MAX) {
                moved = true;
            }
        }
        assert!(pair.violations.is_empty(), "{:?}", pair.violations);
        if !moved {
            return;
        }
    }
}

/// A pair whose guest runs on the destination, every page still at the
/// source (none sent yet: the background push is held back by not pumping).
fn started(config: Config) -> Pair {
    let mut pair = Pair::new(PairConfig::new(config, PAGES));
    for _ in 0..200 {
        if pair.dst.core.guest_started() {
            break;
        }
        for channel in Channel::ALL {
            pair.transmit(channel, 0);
            while pair.deliver(channel, usize::MAX) {}
        }
    }
    assert!(pair.dst.running, "the destination runs the guest under its first lease");
    pair
}

/// Advances the clock to `at`, firing every timer due on the way, and
/// moving bytes after each.
fn advance_to(pair: &mut Pair, at: Timestamp) {
    loop {
        let next = [pair.src.core.poll_timeout(), if pair.dst_crashed { None } else { pair.dst.core.poll_timeout() }]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(deadline) if deadline <= at => {
                pair.fire_timer();
                pump(pair);
            }
            _ => break,
        }
    }
    pair.now = pair.now.max(at);
}

#[test]
fn with_fallback_on_a_migration_completes_and_releases() {
    let mut pair = started(fallback_config());
    // What QMP's x-postcopy shows: the lease the terms set, its own interval.
    assert_eq!(pair.dst.core.fallback_lease(), Some(Duration::from_millis(200)));
    assert_eq!(pair.dst.core.checkpoint_interval(), Some(Duration::from_millis(20)));
    let outcome = pair.run_to_completion(10_000).expect("completes");
    assert_eq!(outcome, Outcome::Completed);
    assert!(pair.dst.core.is_released());
    assert_eq!(pair.src.core.state(), SourceState::Completed);
}

#[test]
fn writes_on_the_destination_are_checkpointed_and_committed() {
    let mut pair = started(fallback_config());
    pump(&mut pair);
    // A missing page faults; its write lands once the page arrived.
    pair.guest_access(0, PageNumber(3), true);
    pump(&mut pair);
    pair.guest_access(0, PageNumber(5), true);
    pump(&mut pair);
    assert!(pair.dst.memory[3].is_some_and(|v| v > 0) && pair.blocked[0].is_none());
    let at = pair.now + Duration::from_millis(25);
    advance_to(&mut pair, at);
    pump(&mut pair);
    assert_eq!(pair.src.core.committed_checkpoint(), 1);
    assert_eq!(pair.dst.core.checkpoints_taken(), 1);
    assert_eq!(pair.src.guest.versions[3], pair.oracle.latest(PageNumber(3)), "committed into the image");
}

#[test]
fn an_abandoned_checkpoint_is_asked_for_again_and_its_writes_are_in_the_next() {
    let mut pair = started(fallback_config());
    pump(&mut pair);
    pair.guest_access(0, PageNumber(3), true);
    pump(&mut pair);
    pair.dst.abandon_checkpoints = 1;
    let at = pair.now + Duration::from_millis(25);
    advance_to(&mut pair, at);
    pump(&mut pair);
    assert_eq!(pair.dst.abandon_checkpoints, 0, "a checkpoint was asked for and abandoned");
    assert_eq!(pair.src.core.committed_checkpoint(), 0);
    assert_eq!(pair.dst.core.checkpoints_taken(), 0, "an abandoned checkpoint is not counted as taken");
    // The next interval asks again: the same sequence number, the write in it.
    let at = pair.now + Duration::from_millis(25);
    advance_to(&mut pair, at);
    pump(&mut pair);
    assert_eq!(pair.src.core.committed_checkpoint(), 1);
    assert_eq!(pair.dst.core.checkpoints_taken(), 1);
    assert_eq!(pair.src.guest.versions[3], pair.oracle.latest(PageNumber(3)), "committed into the image");
}

#[test]
fn a_crashed_destination_is_replaced_from_the_last_committed_checkpoint() {
    let mut pair = started(fallback_config());
    pump(&mut pair);
    pair.guest_access(0, PageNumber(2), true);
    pump(&mut pair);
    let at = pair.now + Duration::from_millis(25);
    advance_to(&mut pair, at);
    pump(&mut pair);
    assert_eq!(pair.src.core.committed_checkpoint(), 1);
    let at_checkpoint = pair.oracle.latest(PageNumber(2));
    // Written after the checkpoint: rolled back.
    pair.guest_access(0, PageNumber(2), true);
    let crashed_at = pair.now;
    assert!(pair.crash_destination());
    let outcome = pair.run_to_completion(10_000).expect("falls back");
    assert_eq!(outcome, Outcome::TookOver);
    assert!(pair.src.running && !pair.dst.running);
    assert_eq!(pair.src.guest.versions[2], at_checkpoint);
    assert!(pair.now.saturating_since(crashed_at) >= Duration::from_millis(200), "waited for the lease");
    let finished = pair.src.finished.0.as_ref().expect("finished");
    assert!(matches!(finished.result, Err(MigrationError::TookOver { checkpoint: 1, .. })), "{:?}", finished.result);
}

#[test]
fn a_partition_longer_than_the_lease_fences_then_the_destination_is_superseded() {
    let mut pair = started(fallback_config());
    pump(&mut pair);
    pair.connect_allowed = false;
    for channel in Channel::ALL {
        pair.lose(channel);
    }
    // The lease lapses before the source's takeover: never two runners.
    let mut fenced_before_takeover = false;
    for _ in 0..50 {
        if pair.src.core.took_over() {
            break;
        }
        fenced_before_takeover |= pair.dst.core.is_fenced() && !pair.dst.running;
        pair.fire_timer();
        pair.check();
        assert!(pair.violations.is_empty(), "{:?}", pair.violations);
    }
    assert!(fenced_before_takeover && pair.src.core.took_over());
    let outcome = pair.run_to_completion(10_000).expect("the heal tells the destination");
    assert_eq!(outcome, Outcome::TookOver);
    assert_eq!(pair.dst.core.state(), DestinationState::Failed);
    let finished = pair.dst.finished.0.as_ref().expect("the destination finished");
    assert_eq!(finished.result, Err(MigrationError::Superseded));
}

#[test]
fn a_partition_shorter_than_the_lease_is_an_ordinary_recovery() {
    let mut pair = started(fallback_config());
    pump(&mut pair);
    pair.guest_access(0, PageNumber(1), true);
    for channel in Channel::ALL {
        pair.lose(channel);
    }
    let outcome = pair.run_to_completion(10_000).expect("recovers");
    assert_eq!(outcome, Outcome::Completed);
    assert!(pair.src.recovered && !pair.src.core.took_over());
    assert!(!pair.violations.iter().any(|v| matches!(v, Violation::TwoRunners)));
}

/// Cuts every connection for good and runs the timers; returns whether the
/// two sides ever both ran the guest.
fn partition_until_takeover(pair: &mut Pair) -> bool {
    pump(pair);
    pair.connect_allowed = false;
    for channel in Channel::ALL {
        pair.lose(channel);
    }
    for _ in 0..50 {
        if pair.src.core.took_over() {
            break;
        }
        pair.fire_timer();
        pair.check();
    }
    assert!(pair.src.core.took_over());
    pair.violations.iter().any(|v| matches!(v, Violation::TwoRunners))
}

#[test]
fn the_lease_lapses_before_the_takeover_at_the_worst_drift_the_bound_allows() {
    let mut pair = started(fallback_config());
    pair.dst_slow_ppm = 1000;
    assert!(!partition_until_takeover(&mut pair), "{:?}", pair.violations);
}

#[test]
fn clocks_that_break_the_drift_bound_can_give_two_runners() {
    // The destination's clock 10 % slow, where the bound says 0.1 % and the
    // margin covers 5 %: its lease lapses after the source took over. The
    // timing assumption is what makes fencing safe.
    let mut pair = started(fallback_config());
    pair.dst_slow_ppm = 100_000;
    assert!(partition_until_takeover(&mut pair));
}

#[test]
fn a_release_cut_off_is_sent_again_after_a_recovery() {
    let mut pair = started(fallback_config());
    for _ in 0..100 {
        if pair.src.core.state() == SourceState::Releasing && !pair.pipes[Channel::Urgent.index()].in_flight.is_empty()
        {
            break;
        }
        for channel in Channel::ALL {
            pair.transmit(channel, 1 << 16);
            if pair.src.core.state() == SourceState::Releasing && channel == Channel::Urgent {
                break;
            }
            while pair.deliver(channel, usize::MAX) {}
        }
    }
    assert_eq!(pair.src.core.state(), SourceState::Releasing);
    pair.lose(Channel::Main);
    let outcome = pair.run_to_completion(10_000);
    assert_eq!(
        outcome,
        Ok(Outcome::Completed),
        "source {} destination {}",
        pair.src.core.state(),
        pair.dst.core.state()
    );
    assert!(pair.dst.core.is_released());
}

#[test]
fn a_destination_that_cannot_fence_refuses_fallback_before_the_switchover() {
    use postcopy_core::wire::{encode, FallbackTerms, Frame, Hello, WireMode};
    use postcopy_core::{Destination, DestinationAction, RamLayout};
    // A destination whose driver cannot fence nor checkpoint.
    let mut dst = Destination::new(Config::postcopy(), 64);
    let now = Timestamp::ZERO;
    for channel in Channel::ALL {
        dst.handle_connected(now, channel);
    }
    let layout = RamLayout::single("ram", 64, PAGES).unwrap();
    let mut bytes = Vec::new();
    let hello = Hello {
        resume: false,
        urgent_channel: true,
        session: 7,
        epoch: 0,
        page_size: 64,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: layout.blocks().to_vec(),
        machine: bytes::Bytes::new(),
        push_streams: 1,
    };
    encode(&Frame::Hello(hello), &mut bytes);
    encode(&Frame::FallbackTerms(FallbackTerms { lease_ms: 200, committed_checkpoint: 0 }), &mut bytes);
    dst.handle_input(now, Channel::Main, bytes.into());
    assert_eq!(dst.state(), DestinationState::Failed);
    assert!(!dst.fallback_on());
    let actions: Vec<DestinationAction> = std::iter::from_fn(|| dst.poll_action()).collect();
    let refused = actions.iter().any(|a| matches!(a, DestinationAction::Farewell { channel: Channel::Return, .. }));
    let finished = actions.iter().find_map(|a| match a {
        DestinationAction::Finished(f) => Some(f.result.clone()),
        _ => None,
    });
    assert!(refused, "the source hears why: {actions:?}");
    assert!(
        matches!(finished, Some(Err(MigrationError::Protocol(postcopy_core::ProtocolError::UnexpectedFrame { .. })))),
        "{finished:?}"
    );
}

/// Swarm seeds 1273 and 1958: the source committed a checkpoint, its
/// acknowledgement was lost with the connection, and after the recovery
/// the terms (saying it was committed) reached the destination after its
/// report: the destination must not send the checkpoint again before them.
#[test]
fn a_committed_checkpoint_whose_ack_was_lost_is_not_sent_again() {
    let mut pair = started(fallback_config());
    pump(&mut pair);
    pair.guest_access(0, PageNumber(4), true);
    pump(&mut pair);
    // The checkpoint is taken (the harness records its image), sent, and
    // committed; its acknowledgement stays on the source's side.
    while !pair.images.iter().any(|(seq, _)| *seq == 1) {
        assert!(pair.fire_timer());
    }
    for _ in 0..50 {
        if pair.src.core.committed_checkpoint() == 1 {
            break;
        }
        pair.transmit(Channel::Return, 1 << 16);
        while pair.deliver(Channel::Return, usize::MAX) {}
    }
    assert_eq!(pair.src.core.committed_checkpoint(), 1);
    // The acknowledgement is lost with every connection.
    for channel in Channel::ALL {
        pair.lose(channel);
    }
    // Reconnect; the hello reaches the destination, the terms not yet.
    while pair.src.core.state() != SourceState::Recovering {
        assert!(pair.fire_timer());
    }
    assert!(pair.transmit(Channel::Main, 0), "the resume hello");
    assert!(pair.transmit(Channel::Main, 0), "the terms");
    pair.deliver(Channel::Main, usize::MAX);
    assert!(pair.pipes[Channel::Main.index()].in_flight.len() == 1, "the terms are held back");
    // The destination's answer goes out whole before the terms arrive.
    for _ in 0..20 {
        pair.transmit(Channel::Return, 0);
    }
    while pair.deliver(Channel::Return, usize::MAX) {}
    let outcome = pair.run_to_completion(10_000).expect("completes");
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(pair.src.core.stats(pair.now).recoveries, 1, "one recovery: no checkpoint refused after it");
}

/// The frames of `bytes`, decoded.
fn frames(bytes: Vec<u8>) -> Vec<postcopy_core::wire::Frame> {
    let mut decoder = postcopy_core::wire::Decoder::new();
    decoder.push(bytes::Bytes::from(bytes));
    std::iter::from_fn(|| decoder.next_frame().expect("well-formed")).collect()
}

#[test]
fn the_urgent_poll_leaves_a_checkpoint_to_the_full_one_but_not_a_request() {
    use postcopy_core::wire::Frame;
    let mut pair = started(fallback_config());
    pump(&mut pair);
    pair.guest_access(0, PageNumber(3), true);
    pump(&mut pair);
    assert!(!pair.dst.core.return_bulk_pending());
    // The checkpoint timer fires; its frames are not transmitted yet.
    for _ in 0..100 {
        if pair.dst.core.return_bulk_pending() {
            break;
        }
        assert!(pair.fire_timer(), "no timer left before a checkpoint");
    }
    assert!(pair.dst.core.return_bulk_pending(), "a checkpoint to send");
    let now = pair.dst_now();
    let mut out = Vec::new();
    let urgent = frames({
        let _ = pair.dst.core.poll_transmit_urgent(now, &mut out, usize::MAX);
        out
    });
    assert!(
        !urgent.iter().any(|f| matches!(f, Frame::CheckpointBegin(_) | Frame::CheckpointPage { .. } | Frame::Eoc)),
        "{urgent:?}"
    );
    assert!(pair.dst.core.return_bulk_pending(), "still there for the full poll");
    // A fault now: its request goes out on the urgent poll, ahead of the
    // checkpoint.
    pair.guest_access(0, PageNumber(6), false);
    let mut out = Vec::new();
    let _ = pair.dst.core.poll_transmit_urgent(now, &mut out, usize::MAX);
    let urgent = frames(out);
    assert!(urgent.iter().any(|f| matches!(f, Frame::Request(_))), "{urgent:?}");
    assert!(!urgent.iter().any(|f| matches!(f, Frame::CheckpointPage { .. })), "{urgent:?}");
    // The full poll sends the checkpoint.
    let mut out = Vec::new();
    let _ = pair.dst.core.poll_transmit(now, Channel::Return, &mut out, usize::MAX);
    let full = frames(out);
    assert!(full.iter().any(|f| matches!(f, Frame::CheckpointEnd { .. })), "{full:?}");
    assert!(!pair.dst.core.return_bulk_pending());
}
