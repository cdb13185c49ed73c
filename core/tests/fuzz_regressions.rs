//! Bugs the fuzzers found (fuzz/ and fuzz-targets/), each pinned by a
//! direct test; the fuzz input that found it stays in fuzz/artifacts/.

use bytes::Bytes;
use postcopy_core::wire::{Decoder, Frame};
use postcopy_core::{Channel, Config, GuestMemory, PageNumber, RamLayout, Source, Timestamp};
use std::time::Duration;

struct ZeroGuest;

impl GuestMemory for ZeroGuest {
    fn read_page(&self, _: PageNumber, out: &mut [u8]) {
        out.fill(0);
    }
}

fn frames_on(src: &mut Source, now: Timestamp, channel: Channel) -> Vec<Frame> {
    let mut out = Vec::new();
    while src.poll_transmit(now, channel, &mut out, usize::MAX, &ZeroGuest) > 0 {}
    let mut decoder = Decoder::new();
    decoder.push(Bytes::from(out));
    let mut frames = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        frames.push(frame);
    }
    frames
}

/// fuzz/artifacts/source_events/keepalive-before-hello: the main channel
/// connected first and idled past the keep-alive interval while the others
/// were still connecting; the source queued a Ping ahead of its Hello, and a
/// destination refuses anything before the hello.
#[test]
fn no_keepalive_before_the_hello() {
    let config = Config { keepalive_interval: Some(Duration::from_secs(1)), ..Config::postcopy() };
    let mut src = Source::new(config, RamLayout::single("ram", 64, 4).unwrap(), 7);
    let mut now = Timestamp::ZERO;
    src.handle_start(now).unwrap();
    src.handle_connected(now, Channel::Main);
    // Nothing to keep alive until the hello is out: no timer for it either.
    assert_eq!(src.poll_timeout(), Some(now + Duration::from_secs(10)), "only the handshake deadline");
    now = now + Duration::from_millis(1500);
    src.handle_timeout(now);
    src.handle_connected(now, Channel::Return);
    src.handle_connected(now, Channel::Urgent);
    let frames = frames_on(&mut src, now, Channel::Main);
    assert!(matches!(frames.first(), Some(Frame::Hello(_))), "main opens with its hello: {frames:?}");
}
