//! Regression (found by postcopy-sim, seed 34 with 4096 pages): a completed
//! destination whose source lost the EOC answers the source's resume hello.
//! When that recovery was cut before the answer went out, the destination
//! kept its pending Welcome (of the old epoch) and sent it on the next
//! recovery's fresh return connection, before that recovery's hello: the
//! source failed that recovery with an epoch mismatch.

use postcopy_core::testkit::{Pair, PairConfig};
use postcopy_core::{Channel, Config, DestinationState, SourceState};

#[test]
fn a_cut_recovery_leaves_no_stale_welcome_on_a_completed_destination() {
    let mut pair = Pair::new(PairConfig::new(Config::postcopy(), 8));
    // Run until the destination has sent its EOC (and completed), but keep
    // the EOC from reaching the source.
    'run: for _ in 0..100 {
        for channel in Channel::ALL {
            pair.transmit(channel, 1 << 16);
            if pair.dst.core.state() == DestinationState::Completed {
                break 'run;
            }
            while pair.deliver(channel, usize::MAX) {}
        }
    }
    assert_eq!(pair.dst.core.state(), DestinationState::Completed);
    assert!(!pair.src.core.state().is_terminal());
    pair.lose(Channel::Return);
    assert_eq!(pair.src.core.state(), SourceState::Paused);

    // First recovery: the hello reaches the destination, then the return
    // path drops before the destination's answer goes out.
    assert!(pair.fire_timer());
    assert_eq!(pair.src.core.state(), SourceState::Recovering);
    pair.transmit(Channel::Main, 1 << 16);
    while pair.deliver(Channel::Main, usize::MAX) {}
    pair.lose(Channel::Return);
    assert!(!pair.src.core.is_connected(Channel::Main));

    // Second recovery: the return path comes up before the new hello
    // arrives. Nothing of the cut recovery may go out on it.
    assert!(pair.fire_timer());
    assert_eq!(pair.src.core.state(), SourceState::Recovering);
    pair.transmit(Channel::Return, 1 << 16);
    while pair.deliver(Channel::Return, usize::MAX) {}
    assert_eq!(pair.src.core.state(), SourceState::Recovering, "a stale answer failed the recovery");

    pair.run_to_completion(10_000).unwrap();
    assert_eq!(pair.src.core.state(), SourceState::Completed);
}
