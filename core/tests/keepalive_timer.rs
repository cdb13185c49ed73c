//! Regression (found by postcopy-sim, seed 0): when a keep-alive Ping is
//! queued but the channel has no room (the driver's socket buffer is full
//! of pages for longer than the keep-alive interval), `poll_timeout` kept
//! returning the old keep-alive deadline, already past, and `handle_timeout`
//! could not move it: a driver re-arming its timer from `poll_timeout` spun
//! at one instant forever.

use postcopy_core::testkit::{Pair, PairConfig};
use postcopy_core::{Channel, Config, DestinationState, SourceState, Timestamp};
use std::time::Duration;

#[test]
fn a_queued_keepalive_leaves_no_past_deadline() {
    let mut config = Config::postcopy();
    config.keepalive_interval = Some(Duration::from_millis(1));
    config.peer_timeout = None;
    let mut pair = Pair::new(PairConfig::new(config, 100_000));
    // Handshake and start, one frame at a time, far from the end of the copy.
    for _ in 0..20 {
        for channel in Channel::ALL {
            pair.transmit(channel, 0);
            while pair.deliver(channel, usize::MAX) {}
        }
    }
    assert_eq!(pair.src.core.state(), SourceState::Active);
    assert_eq!(pair.dst.core.state(), DestinationState::Running);
    // From here the sockets are full: the driver transmits nothing.
    let later = Timestamp::from_nanos(pair.now.as_nanos() + 5_000_000);
    pair.src.core.handle_timeout(later);
    pair.dst.core.handle_timeout(later);
    let src = pair.src.core.poll_timeout();
    let dst = pair.dst.core.poll_timeout();
    assert!(src.is_none_or(|t| t > later), "source deadline {src:?} is not after {later:?}");
    assert!(dst.is_none_or(|t| t > later), "destination deadline {dst:?} is not after {later:?}");
    // Once the channels take the pings, keep-alives are due again later.
    pair.now = later;
    pair.transmit(Channel::Main, 0);
    pair.transmit(Channel::Return, 0);
    assert!(pair.src.core.poll_timeout().is_some_and(|t| t > later));
    assert!(pair.dst.core.poll_timeout().is_some_and(|t| t > later));
}
