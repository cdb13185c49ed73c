use postcopy_core::testkit::{Outcome, Pair, PairConfig};
use postcopy_core::{Channel, Config, PageNumber};

#[test]
fn pure_postcopy_completes() {
    let mut pair = Pair::new(PairConfig::new(Config::postcopy(), 10));
    for p in 0..10 {
        pair.guest_access(0, PageNumber(p), true);
    }
    let result = pair.run_to_completion(10_000);
    println!("{:?} {:?}", pair.src.core.state(), pair.dst.core.state());
    assert_eq!(result, Ok(Outcome::Completed));
}

#[test]
fn hybrid_completes() {
    let mut pair = Pair::new(PairConfig::new(Config::hybrid(2), 10));
    for p in 0..10 {
        pair.guest_access(0, PageNumber(p), true);
    }
    pair.transmit(Channel::Main, 0);
    pair.transmit(Channel::Main, 0);
    pair.guest_access(0, PageNumber(0), true);
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::Completed));
}

#[test]
fn recovers_after_lost_connection() {
    let mut cfg = PairConfig::new(Config::postcopy(), 20);
    cfg.vcpus = 2;
    let mut pair = Pair::new(cfg);
    for p in 0..20 {
        pair.guest_access(0, PageNumber(p), true);
    }
    // Run until the destination runs the guest, then fault and lose the link.
    for _ in 0..50 {
        for ch in Channel::ALL {
            pair.transmit(ch, 0);
            pair.deliver(ch, usize::MAX);
        }
        if pair.dst.running {
            break;
        }
    }
    assert!(pair.dst.running, "destination should run: {:?} {:?}", pair.src.core.state(), pair.dst.core.state());
    pair.guest_access(1, PageNumber(17), false);
    pair.transmit(Channel::Return, 0);
    pair.transmit(Channel::Main, 0);
    pair.lose(Channel::Main);
    assert_eq!(pair.src.core.state(), postcopy_core::SourceState::Paused);
    assert_eq!(pair.dst.core.state(), postcopy_core::DestinationState::Paused);
    pair.guest_access(0, PageNumber(3), true);
    let result = pair.run_to_completion(10_000);
    println!("{:?} {:?} {:?}", pair.src.core.state(), pair.dst.core.state(), pair.src.core.stats(pair.now));
    assert_eq!(result, Ok(Outcome::Completed));
    assert!(pair.src.recovered);
}

/// The main channel dies after the destination said ReadyToRun and before
/// StartGuest left: the source runs the guest again and tells the
/// destination, which was waiting, to drop its copy. Nobody waits forever.
#[test]
fn a_waiting_destination_is_told_to_drop_the_guest() {
    let mut pair = Pair::new(PairConfig::new(Config::postcopy(), 4));
    pair.guest_access(0, PageNumber(1), true);
    for channel in [Channel::Main, Channel::Return, Channel::Urgent, Channel::Main] {
        pair.transmit(channel, 1 << 16);
        pair.deliver(channel, usize::MAX);
    }
    pair.transmit(Channel::Return, 1 << 16);
    pair.deliver(Channel::Return, usize::MAX);
    assert_eq!(pair.dst.core.state(), postcopy_core::DestinationState::AwaitingStart);
    assert_eq!(pair.src.core.state(), postcopy_core::SourceState::Switchover);
    pair.lose(Channel::Main);
    assert!(pair.src.running, "the guest runs on the source again");
    assert_eq!(pair.dst.core.state(), postcopy_core::DestinationState::Paused);
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::AbandonedOnSource));
    assert_eq!(pair.dst.core.state(), postcopy_core::DestinationState::Failed);
    pair.guest_access(0, PageNumber(1), false);
    assert!(pair.violations.is_empty(), "{:?}", pair.violations);
}
