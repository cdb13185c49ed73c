//! Bugs the model checker (`postcopy-model`) found in the clean core, each
//! replayed step by step on the test harness.

use postcopy_core::testkit::{Pair, PairConfig};
use postcopy_core::{Channel, Config, DestinationState, PageNumber, SourceState};

/// Found by the model: the destination accepted a cancel after it had said
/// ReadyToRun. The source may already have transmitted StartGuest (its
/// point of no return) while the destination has not received it yet; the
/// destination then dropped the guest and the source, past the point of no
/// return, paused and retried forever: nobody ran the guest any more.
#[test]
fn destination_cannot_cancel_once_ready_to_run() {
    let mut pair = Pair::new(PairConfig::new(Config::postcopy(), 2));
    pair.guest_access(0, PageNumber(1), true);
    // Handshake, device state, ReadyToRun.
    for channel in [Channel::Main, Channel::Return, Channel::Main, Channel::Return] {
        assert!(pair.transmit(channel, 0));
        assert!(pair.deliver(channel, usize::MAX));
    }
    assert_eq!(pair.dst.core.state(), DestinationState::AwaitingStart);
    // The source transmits StartGuest on the urgent channel; it is still in flight.
    while pair.src.core.state() != SourceState::Active {
        assert!(pair.transmit(Channel::Urgent, 0), "the source should transmit StartGuest");
    }
    let now = pair.now;
    assert!(pair.dst.core.handle_cancel(now).is_err(), "the destination must not drop a guest the source gave away");
    pair.settle();
    pair.run_to_completion(1_000).expect("the migration completes");
}

/// Before ReadyToRun the destination may still cancel: the source cannot
/// have given the guest away, and keeps running it.
#[test]
fn destination_cancel_before_ready_to_run_leaves_guest_on_source() {
    let mut pair = Pair::new(PairConfig::new(Config::postcopy(), 2));
    for channel in [Channel::Main, Channel::Return] {
        assert!(pair.transmit(channel, 0));
        assert!(pair.deliver(channel, usize::MAX));
    }
    let now = pair.now;
    pair.dst.core.handle_cancel(now).expect("cancel before the device state is loaded");
    pair.settle();
    for _ in 0..10 {
        for channel in Channel::ALL {
            pair.transmit(channel, 1 << 16);
            while pair.deliver(channel, usize::MAX) {}
        }
    }
    assert_eq!(pair.src.finished_ok, Some(false));
    assert_eq!(pair.dst.finished_ok, Some(false));
    assert!(pair.src.running && !pair.dst.running);
    pair.check();
    assert!(pair.violations.is_empty(), "{:?}", pair.violations);
}

/// Found by the model: after a recovery in which StartGuest had been lost,
/// the source re-sends StartGuest; when it went out after the background
/// push had finished (the urgent channel lagging behind the main one), the
/// source fell back from ALL_PAGES_SENT to ACTIVE. The destination's Eoc
/// then moved it to EOC_RECEIVED, where it waited for an EndOfStream that
/// had already been sent: the destination completed, the source never did.
#[test]
fn start_guest_resent_after_recovery_does_not_rewind_the_source() {
    let mut pair = Pair::new(PairConfig::new(Config::postcopy(), 2));
    for channel in [Channel::Main, Channel::Return, Channel::Main, Channel::Return] {
        assert!(pair.transmit(channel, 0));
        assert!(pair.deliver(channel, usize::MAX));
    }
    // StartGuest is transmitted, then lost with the connections.
    while pair.src.core.state() != SourceState::Active {
        assert!(pair.transmit(Channel::Urgent, 0));
    }
    assert!(pair.lose(Channel::Main));
    assert_eq!(pair.src.core.state(), SourceState::Paused);
    assert!(pair.fire_timer(), "the source retries");
    assert_eq!(pair.src.core.state(), SourceState::Recovering);
    // Recovery on the main channel and the return path only.
    assert!(pair.transmit(Channel::Main, 0));
    assert!(pair.deliver(Channel::Main, usize::MAX));
    assert!(pair.transmit(Channel::Return, 1 << 16));
    assert!(pair.deliver(Channel::Return, usize::MAX));
    assert_eq!(pair.src.core.state(), SourceState::Active);
    // The background push finishes before the urgent channel moves.
    while pair.src.core.state() == SourceState::Active {
        assert!(pair.transmit(Channel::Main, 0), "the source should push pages, then EndOfStream");
    }
    assert_eq!(pair.src.core.state(), SourceState::AllPagesSent);
    // The urgent channel now carries its hello and StartGuest again.
    assert!(pair.transmit(Channel::Urgent, 1 << 16));
    assert_eq!(pair.src.core.state(), SourceState::AllPagesSent, "StartGuest must not rewind the source");
    pair.run_to_completion(1_000).expect("the migration completes");
}
