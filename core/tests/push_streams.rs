//! Several push streams (`Config::push_streams`): the background push
//! spread over the main channel and extra push channels, negotiated in the
//! hello; every invariant of the testkit holds with pages arriving on
//! several streams in any interleaving, and a lost stream is a lost
//! connection like any other.

use bytes::Bytes;
use postcopy_core::testkit::{Outcome, Pair, PairConfig};
use postcopy_core::wire::{self, Frame, Hello, WireMode};
use postcopy_core::{
    Channel, Config, Destination, DestinationAction, DestinationState, MigrationError, Notice, PageNumber,
    ProtocolError, RamBlock, SourceState, Timestamp,
};

fn streams(n: u8) -> Config {
    Config { push_streams: n, ..Config::postcopy() }
}

fn push(k: u8) -> Channel {
    Channel::push_streams(postcopy_core::channel::MAX_PUSH_STREAMS).nth(k as usize - 1).expect("a push stream")
}

/// Moves every channel until the destination runs the guest.
fn until_running(pair: &mut Pair) {
    for _ in 0..100 {
        for channel in Channel::EVERY {
            pair.transmit(channel, 0);
            pair.deliver(channel, usize::MAX);
        }
        if pair.dst.running {
            return;
        }
    }
    panic!("the guest never ran on the destination: {:?} {:?}", pair.src.core.state(), pair.dst.core.state());
}

#[test]
fn the_source_opens_every_push_stream_and_a_push_stream_alone_carries_the_push() {
    let mut pair = Pair::new(PairConfig::new(streams(3), 40));
    for channel in [Channel::Main, Channel::Return, Channel::Urgent, push(1), push(2)] {
        assert!(pair.pipes[channel.index()].up, "{channel} not connected");
    }
    assert!(!pair.pipes[push(3).index()].up, "a fourth stream was opened");
    until_running(&mut pair);
    let present = pair.dst.core.pages_present();
    // Push stream 2 alone, frame by frame: each frame is a page that was
    // not present yet.
    for _ in 0..10 {
        assert!(pair.transmit(push(2), 0), "push stream 2 had nothing to send");
        assert!(pair.deliver(push(2), usize::MAX));
    }
    assert_eq!(pair.dst.core.pages_present(), present + 10);
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::Completed));
    assert!(pair.page_crossings.iter().all(|&n| n == 1), "{:?}", pair.page_crossings);
}

#[test]
fn pages_on_several_streams_in_any_interleaving_each_cross_once() {
    for seed in 0..40u64 {
        let mut cfg = PairConfig::new(streams(1 + (seed % 3) as u8), 48);
        cfg.vcpus = 2;
        let mut pair = Pair::new(cfg);
        until_running(&mut pair);
        let channels: Vec<Channel> = pair.src.core.channels().collect();
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for step in 0..300 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let channel = channels[(rng % channels.len() as u64) as usize];
            match (rng >> 8) % 4 {
                0 => _ = pair.transmit(channel, (rng >> 16) as usize % 200),
                1 => _ = pair.deliver(channel, (rng >> 16) as usize % 300 + 1),
                2 => pair.guest_access((step % 2) as u32, PageNumber((rng >> 20) % 48), rng & 1 == 0),
                _ => _ = pair.deliver(Channel::Return, usize::MAX),
            }
            pair.check();
            assert!(pair.violations.is_empty(), "seed {seed}: {:?}", pair.violations);
        }
        assert_eq!(pair.run_to_completion(20_000), Ok(Outcome::Completed), "seed {seed}");
        assert!(pair.page_crossings.iter().all(|&n| n == 1), "seed {seed}: {:?}", pair.page_crossings);
    }
}

#[test]
fn a_lost_push_stream_pauses_both_sides_and_the_recovery_sends_only_what_is_missing() {
    let mut pair = Pair::new(PairConfig::new(streams(2), 60));
    until_running(&mut pair);
    for _ in 0..5 {
        pair.transmit(push(1), 0);
        pair.transmit(Channel::Main, 0);
    }
    while pair.deliver(Channel::Main, usize::MAX) {}
    let present_before = pair.dst.core.pages_present();
    // What is in flight on push stream 1 (five pages or more) is lost with it.
    let lost = pair.src.core.pages_sent() - present_before;
    assert!(lost >= 5, "{lost}");
    assert!(pair.lose(push(1)));
    assert_eq!(pair.src.core.state(), SourceState::Paused);
    assert_eq!(pair.dst.core.state(), DestinationState::Paused);
    assert_eq!(pair.dst.core.pages_present(), present_before);
    assert_eq!(pair.run_to_completion(20_000), Ok(Outcome::Completed));
    assert!(pair.src.recovered);
    let stats = pair.src.core.stats(pair.now);
    // Only the lost ones went again: 60 pages, the lost ones twice.
    assert_eq!(stats.pages_sent.resent, lost, "{stats:?}");
    assert_eq!(stats.pages_sent.background + stats.pages_sent.requested, 60 + lost, "{stats:?}");
}

#[test]
fn streams_with_page_parts_and_huge_pages_complete_with_each_part_once() {
    let mut config = streams(3);
    config.prepaging = true;
    let mut pair = Pair::new(PairConfig::with_huge_pages(config, 8, 6));
    until_running(&mut pair);
    for step in 0..30u64 {
        pair.transmit(push(1 + (step % 2) as u8), 0);
        if step % 5 == 0 {
            pair.guest_access(0, PageNumber(8 + step % 6), false);
        }
        pair.deliver(Channel::Return, usize::MAX);
        pair.transmit(Channel::Urgent, 0);
        if step % 3 == 0 {
            pair.deliver(push(2), usize::MAX);
            pair.deliver(Channel::Urgent, usize::MAX);
        }
    }
    assert_eq!(pair.run_to_completion(20_000), Ok(Outcome::Completed));
    assert!(pair.page_crossings.iter().all(|&n| n == 1), "{:?}", pair.page_crossings);
}

fn hello(push_streams: u8) -> Frame {
    Frame::Hello(Hello {
        resume: false,
        urgent_channel: true,
        session: 7,
        epoch: 0,
        page_size: 64,
        mode: WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: vec![RamBlock { name: "ram".into(), page_count: 10, page_size: 64 }],
        machine: Bytes::new(),
        push_streams,
    })
}

fn actions(dst: &mut Destination) -> Vec<DestinationAction> {
    std::iter::from_fn(|| dst.poll_action()).collect()
}

#[test]
fn a_destination_refuses_more_push_streams_than_it_accepts_and_tells_the_source_why() {
    let mut dst = Destination::new(streams(2), 64);
    let now = Timestamp(0);
    dst.handle_connected(now, Channel::Return);
    dst.handle_connected(now, Channel::Main);
    let mut bytes = Vec::new();
    wire::encode(&hello(3), &mut bytes);
    dst.handle_input(now, Channel::Main, bytes.into());
    let actions = actions(&mut dst);
    let refused = ProtocolError::PushStreamsRefused { asked: 3, accepted: 2 };
    assert!(actions.contains(&DestinationAction::Notice(Notice::StrangerRefused {
        channel: Channel::Main,
        reason: MigrationError::Protocol(refused.clone()),
    })));
    let Some(DestinationAction::Farewell { channel: Channel::Return, bytes }) =
        actions.iter().find(|a| matches!(a, DestinationAction::Farewell { .. }))
    else {
        panic!("no Reject for the source: {actions:?}")
    };
    let mut decoder = wire::Decoder::new();
    decoder.push(bytes.clone());
    assert_eq!(decoder.next_frame(), Ok(Some(Frame::Reject { reason: refused.to_string() })));
    // Still listening: a hello within its limit binds the migration.
    assert_eq!(dst.state(), DestinationState::Listening);
    dst.handle_connected(now, Channel::Main);
    let mut bytes = Vec::new();
    wire::encode(&hello(2), &mut bytes);
    dst.handle_input(now, Channel::Main, bytes.into());
    assert_eq!(dst.state(), DestinationState::Precopy);
}

#[test]
fn a_source_asking_for_more_streams_than_the_destination_takes_keeps_its_guest() {
    let mut cfg = PairConfig::new(streams(3), 10);
    cfg.config.push_streams = 3;
    let mut pair = Pair::new(cfg);
    // The destination of this pair accepts one stream only.
    pair.dst.core = Destination::new(Config::postcopy(), 64);
    for channel in Channel::EVERY {
        if pair.pipes[channel.index()].up {
            pair.dst.core.handle_connected(pair.now, channel);
        }
    }
    for _ in 0..5 {
        for channel in Channel::EVERY {
            pair.transmit(channel, 0);
            pair.deliver(channel, usize::MAX);
        }
    }
    assert_eq!(pair.src.core.state(), SourceState::Failed);
    assert!(pair.src.running, "the guest keeps running on the source");
    assert_eq!(pair.dst.core.state(), DestinationState::Listening);
    let error = pair.src.finished.0.as_ref().and_then(|f| f.result.clone().err());
    assert!(
        matches!(&error, Some(MigrationError::Protocol(ProtocolError::Rejected(reason))) if reason.contains("push streams")),
        "{error:?}"
    );
}

#[test]
fn a_push_stream_the_migration_does_not_use_is_refused_as_a_strangers() {
    let mut pair = Pair::new(PairConfig::new(streams(2), 10));
    until_running(&mut pair);
    // Stream 2 of a two-stream migration, with this migration's own id.
    let before = pair.dst.core.state();
    pair.dst.core.handle_connected(pair.now, push(2));
    let mut bytes = Vec::new();
    let stream_hello = wire::UrgentHello { session: pair.src.core.session(), epoch: pair.dst.core.epoch() };
    wire::encode(&Frame::UrgentHello(stream_hello), &mut bytes);
    pair.dst.core.handle_input(pair.now, push(2), bytes.into());
    let actions = actions(&mut pair.dst.core);
    assert!(actions.contains(&DestinationAction::Close(push(2))), "{actions:?}");
    assert!(!pair.dst.core.is_connected(push(2)));
    assert_eq!(pair.dst.core.state(), before);
}
