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
