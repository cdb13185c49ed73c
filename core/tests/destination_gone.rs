//! A paused source whose Eoc was lost faces a destination that completed
//! and exited: every reconnection is refused. It says why it waits, and
//! after `destination_gone_timeout` of refusals only it ends, the guest left
//! to the destination (never resumed on the source).

use postcopy_core::testkit::{Outcome, Pair, PairConfig};
use postcopy_core::{Channel, Config, DestinationState, MigrationError, Notice, Side, SourceAction, SourceState};
use std::time::Duration;

const GONE_AFTER: Duration = Duration::from_secs(30);

/// A pair whose destination completed and exited while its Eoc was in
/// flight: the source is paused, the destination's address refuses.
fn source_paused_before_a_gone_destination() -> Pair {
    let config = Config { destination_gone_timeout: GONE_AFTER, ..Config::postcopy() };
    let mut pair = Pair::new(PairConfig::new(config, 8));
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
    assert!(pair.destination_exits());
    assert_eq!(pair.src.core.state(), SourceState::Paused);
    pair
}

/// Fires the source's timer and refuses the connections it asks for
/// (driving the core by hand, to read its notices); returns them.
fn refused_attempt(pair: &mut Pair) -> Vec<Notice> {
    let deadline = pair.src.core.poll_timeout().expect("a paused source retries");
    pair.now = pair.now.max(deadline);
    pair.src.core.handle_timeout(pair.now);
    let mut notices = Vec::new();
    while let Some(action) = pair.src.core.poll_action() {
        match action {
            SourceAction::Connect(channel) => pair.src.core.handle_connect_refused(pair.now, channel),
            SourceAction::Notice(notice) => notices.push(notice),
            SourceAction::ResumeVcpus => panic!("the source resumed a guest it gave away"),
            _ => {}
        }
    }
    notices
}

#[test]
fn a_paused_source_gives_the_guest_up_after_refusals_only() {
    let mut pair = source_paused_before_a_gone_destination();
    let start = pair.now;
    let outcome = pair.run_to_completion(10_000).unwrap();
    assert_eq!(outcome, Outcome::CompletedSourceGaveUp);
    let finished = pair.src.finished.0.as_ref().expect("the source finished");
    assert_eq!(finished.guest_on, Side::Destination);
    let Err(MigrationError::DestinationGone { refused_ms }) = finished.result else {
        panic!("{:?}", finished.result);
    };
    assert!(refused_ms >= GONE_AFTER.as_millis() as u64, "{refused_ms}");
    assert!(pair.now.saturating_since(start) >= GONE_AFTER);
    assert!(!pair.src.running, "the guest never resumes on the source");
    assert_eq!(pair.src.core.state(), SourceState::Failed);
    assert_eq!(pair.src.core.poll_timeout(), None, "nothing more to do: the process may exit");
}

#[test]
fn a_refused_attempt_says_why_the_source_waits() {
    let mut pair = source_paused_before_a_gone_destination();
    let notices = refused_attempt(&mut pair);
    let reason = notices.iter().find_map(|n| match n {
        Notice::RecoveryFailed { reason: MigrationError::DestinationRefused { refused_ms, limit_ms, .. }, .. } => {
            Some((*refused_ms, *limit_ms))
        }
        _ => None,
    });
    assert_eq!(reason, Some((0, GONE_AFTER.as_millis() as u64)), "{notices:?}");
    let text = MigrationError::DestinationRefused { channel: Channel::Main, refused_ms: 0, limit_ms: 1 }.to_string();
    assert!(text.contains("finished and exited"), "{text}");
    assert_eq!(pair.src.core.state(), SourceState::Paused);
}

#[test]
fn an_attempt_that_is_not_refused_starts_the_count_again() {
    let mut pair = source_paused_before_a_gone_destination();
    // Refused for a while, short of the limit.
    let first = pair.now;
    while pair.now.saturating_since(first) < GONE_AFTER - Duration::from_secs(5) {
        refused_attempt(&mut pair);
    }
    // A partition: the next attempt times out instead of being refused.
    let deadline = pair.src.core.poll_timeout().expect("a retry");
    pair.now = pair.now.max(deadline);
    pair.src.core.handle_timeout(pair.now);
    while let Some(action) = pair.src.core.poll_action() {
        if let SourceAction::Connect(channel) = action {
            pair.src.core.handle_connect_failed(pair.now, channel);
        }
    }
    // Refused again: a whole timeout more before the source gives up.
    let restart = pair.now;
    while pair.src.core.state() == SourceState::Paused {
        refused_attempt(&mut pair);
    }
    assert_eq!(pair.src.core.state(), SourceState::Failed);
    assert!(pair.now.saturating_since(restart) >= GONE_AFTER, "the count started again");
}
