//! Regression (found by the destination_events fuzz target, input
//! fuzz/artifacts/destination_events/eoc-before-welcome): a completed
//! destination answering a resume hello sends Welcome, PresentPages and
//! PresentEnd, then queues EOC. When that return connection was lost before
//! the EOC left, the destination kept the EOC queued and sent it as the first
//! frame of the next return connection, ahead of that recovery's welcome: the
//! source failed that recovery (`UnexpectedFrame { Eoc, "RECOVERING" }`).

use bytes::Bytes;
use postcopy_core::testkit::{Pair, PairConfig};
use postcopy_core::wire::{Decoder, Frame};
use postcopy_core::{Channel, Config, DestinationState, SourceState};

/// The frames in flight on `channel`, in order.
fn in_flight(pair: &Pair, channel: Channel) -> Vec<Frame> {
    let mut decoder = Decoder::new();
    for bytes in &pair.pipes[channel.index()].in_flight {
        decoder.push(Bytes::clone(bytes));
    }
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = decoder.next_frame() {
        frames.push(frame);
    }
    frames
}

#[test]
fn a_cut_recovery_leaves_no_queued_eoc_on_a_completed_destination() {
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
    pair.lose(Channel::Return);
    assert_eq!(pair.src.core.state(), SourceState::Paused);

    // First recovery: the hello reaches the destination, which answers one
    // frame at a time; the connection drops after PresentEnd, before the EOC
    // queued behind it leaves.
    assert!(pair.fire_timer());
    assert_eq!(pair.src.core.state(), SourceState::Recovering);
    pair.transmit(Channel::Main, 1 << 16);
    while pair.deliver(Channel::Main, usize::MAX) {}
    while !matches!(in_flight(&pair, Channel::Return).last(), Some(Frame::PresentEnd { .. })) {
        assert!(pair.transmit(Channel::Return, 1), "the destination answers the resume hello");
    }
    let answer = in_flight(&pair, Channel::Return);
    assert!(matches!(answer.first(), Some(Frame::Welcome(_))), "{answer:?}");
    assert!(!answer.contains(&Frame::Eoc), "the EOC is still queued: {answer:?}");
    pair.lose(Channel::Return);

    // Second recovery: the return path comes up before the new hello
    // arrives. The cut recovery's EOC must not go out on it.
    assert!(pair.fire_timer());
    assert_eq!(pair.src.core.state(), SourceState::Recovering);
    pair.transmit(Channel::Return, 1 << 16);
    let early = in_flight(&pair, Channel::Return);
    assert!(early.is_empty(), "nothing before this connection's welcome: {early:?}");
    while pair.deliver(Channel::Return, usize::MAX) {}
    assert_eq!(pair.src.core.state(), SourceState::Recovering, "a stale EOC failed the recovery");

    pair.run_to_completion(10_000).unwrap();
    assert_eq!(pair.src.core.state(), SourceState::Completed);
}
