//! How many page events per second the cores handle, for a 4 GiB guest
//! (1 Mi pages of 4 KiB). Goal: at least 10 million page events per second,
//! so that the core is never the bottleneck of a real migration.
//!
//! `cargo bench -p postcopy-core` prints one line per measurement.

use bytes::Bytes;
use postcopy_core::wire::{self, Decoder, Frame, Request, Welcome};
use postcopy_core::{
    Channel, Config, Destination, DestinationAction, GuestMemory, PageNumber, RamLayout, Source, SourceAction,
    Timestamp, Waiter,
};
use std::time::Instant;

const PAGES: u64 = 1 << 20;

/// A guest whose pages cost nothing to read: only the core is measured.
struct ConstantGuest;

impl GuestMemory for ConstantGuest {
    fn read_page(&self, _page: PageNumber, out: &mut [u8]) {
        out[0] = 1;
    }
}

fn quiet() -> Config {
    Config { keepalive_interval: None, peer_timeout: None, max_outstanding_requests: 1 << 16, ..Config::postcopy() }
}

fn drain_source(src: &mut Source) {
    while let Some(action) = src.poll_action() {
        if let SourceAction::StopVcpus = action {
            src.handle_vcpus_stopped(Timestamp(0), Bytes::new()).expect("stopping");
        }
    }
}

fn encode(frame: &Frame) -> Bytes {
    let mut out = Vec::new();
    wire::encode(frame, &mut out);
    Bytes::from(out)
}

/// A source past StartGuest, ready to push pages.
fn active_source(page_size: u32) -> Source {
    let layout = RamLayout::single("ram", page_size, PAGES).expect("layout");
    let mut src = Source::new(quiet(), layout, 1);
    let now = Timestamp(0);
    src.handle_start(now).expect("start");
    drain_source(&mut src);
    for channel in Channel::ALL {
        src.handle_connected(now, channel);
    }
    let mut sink = Vec::new();
    let _ = src.poll_transmit(now, Channel::Main, &mut sink, usize::MAX, &ConstantGuest);
    let _ = src.poll_transmit(now, Channel::Urgent, &mut sink, usize::MAX, &ConstantGuest);
    src.handle_input(
        now,
        Channel::Return,
        encode(&Frame::Welcome(Welcome {
            session: 1,
            epoch: 0,
            guest_started: false,
            device_loaded: false,
            max_outstanding_requests: 1 << 16,
        })),
    );
    drain_source(&mut src);
    let _ = src.poll_transmit(now, Channel::Main, &mut sink, usize::MAX, &ConstantGuest);
    src.handle_input(now, Channel::Return, encode(&Frame::ReadyToRun));
    drain_source(&mut src);
    let _ = src.poll_transmit(now, Channel::Urgent, &mut sink, 0, &ConstantGuest);
    assert_eq!(src.state(), postcopy_core::SourceState::Active);
    src
}

fn report(what: &str, events: u64, started: Instant) -> f64 {
    report_timed(what, events, started.elapsed())
}

fn report_timed(what: &str, events: u64, elapsed: std::time::Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    let rate = events as f64 / seconds;
    println!("{what:<58} {events:>9} events in {:>7.1} ms = {:>6.2} M events/s", seconds * 1e3, rate / 1e6);
    rate
}

/// Background push: every page of the guest, one frame per page.
fn background_push(page_size: u32) -> f64 {
    let mut src = active_source(page_size);
    let mut out = Vec::with_capacity(1 << 20);
    let started = Instant::now();
    let mut frames = 0u64;
    loop {
        out.clear();
        let n = src.poll_transmit(Timestamp(1), Channel::Main, &mut out, 1 << 20, &ConstantGuest);
        if n == 0 {
            break;
        }
        frames += n as u64;
    }
    let rate = report(&format!("source: background pages sent ({page_size}-byte pages)"), frames - 1, started);
    assert_eq!(src.pages_sent(), PAGES);
    rate
}

/// Requests in, requested pages out, spread over the guest.
fn requests(page_size: u32) -> f64 {
    let mut src = active_source(page_size);
    let batch = 64u32;
    let stride = (PAGES / u64::from(batch)) as u32;
    let request_frames: Vec<Bytes> = (0..u32::try_from(PAGES).unwrap_or(u32::MAX) / batch / 4)
        .map(|i| {
            encode(&Frame::Request(Request {
                block: 0,
                indexes: (0..batch).map(|j| (j * stride + i) % PAGES as u32).collect(),
            }))
        })
        .collect();
    let mut out = Vec::with_capacity(1 << 20);
    let started = Instant::now();
    let mut events = 0u64;
    for frame in request_frames {
        src.handle_input(Timestamp(1), Channel::Return, frame);
        loop {
            out.clear();
            let n = src.poll_transmit(Timestamp(1), Channel::Urgent, &mut out, 1 << 20, &ConstantGuest);
            if n == 0 {
                break;
            }
            events += n as u64;
        }
        events += u64::from(batch);
    }
    report(&format!("source: requests handled + pages sent ({page_size}-byte pages)"), events, started)
}

/// The destination takes a stream of page frames (zero-copy decode, install
/// actions) with a fault outstanding on one page in 16.
fn destination_receive(page_size: u32) -> f64 {
    let layout = RamLayout::single("ram", page_size, PAGES).expect("layout");
    let mut dst = Destination::new(quiet(), page_size);
    let now = Timestamp(0);
    for channel in Channel::ALL {
        dst.handle_connected(now, channel);
    }
    let hello = wire::Hello {
        resume: false,
        urgent_channel: true,
        session: 1,
        epoch: 0,
        page_size,
        mode: wire::WireMode::Postcopy,
        precopy_rounds: 0,
        blocks: layout.blocks().to_vec(),
        machine: Bytes::new(),
        push_streams: 1,
    };
    dst.handle_input(now, Channel::Main, encode(&Frame::Hello(hello)));
    dst.handle_input(now, Channel::Urgent, encode(&Frame::UrgentHello(wire::UrgentHello { session: 1, epoch: 0 })));
    dst.handle_input(now, Channel::Main, encode(&Frame::DeviceState { last: true, chunk: Bytes::new() }));
    while dst.poll_action().is_some() {}
    dst.handle_device_state_loaded(now, Ok(())).expect("loaded");
    dst.handle_input(now, Channel::Urgent, encode(&Frame::StartGuest));
    while dst.poll_action().is_some() {}
    // The stream arrives in 1 MiB chunks, as a socket would deliver it. Only
    // the destination's share of each step is timed.
    let mut src = active_source(page_size);
    let mut sink = Vec::new();
    let mut timed = std::time::Duration::ZERO;
    let mut events = 0u64;
    let mut first = 0u64;
    loop {
        let mut out = Vec::with_capacity(1 << 20);
        let frames = src.poll_transmit(Timestamp(1), Channel::Main, &mut out, 1 << 20, &ConstantGuest) as u64;
        if frames == 0 {
            break;
        }
        let chunk = Bytes::from(out);
        let started = Instant::now();
        // Faults on one in 16 of the pages about to arrive.
        for page in (first..first + frames).step_by(16).filter(|&p| p < PAGES) {
            let _ = dst.handle_page_fault(Timestamp(2), PageNumber(page), Waiter::Vcpu(0));
            events += 1;
        }
        first += frames;
        dst.handle_input(Timestamp(3), Channel::Main, chunk);
        while let Some(action) = dst.poll_action() {
            if let DestinationAction::InstallPage { .. } = action {
                events += 1;
            }
        }
        sink.clear();
        let _ = dst.poll_transmit(Timestamp(3), Channel::Return, &mut sink, usize::MAX);
        timed += started.elapsed();
    }
    let rate = report_timed(&format!("destination: faults + pages installed ({page_size}-byte pages)"), events, timed);
    assert_eq!(dst.pages_present(), PAGES);
    rate
}

fn decode_only() -> f64 {
    let mut src = active_source(4096);
    let mut decoder = Decoder::new();
    let mut frames = 0u64;
    let mut timed = std::time::Duration::ZERO;
    loop {
        let mut out = Vec::with_capacity(1 << 20);
        if src.poll_transmit(Timestamp(1), Channel::Main, &mut out, 1 << 20, &ConstantGuest) == 0 {
            break;
        }
        let started = Instant::now();
        decoder.push(Bytes::from(out));
        while let Ok(Some(_)) = decoder.next_frame() {
            frames += 1;
        }
        timed += started.elapsed();
    }
    report_timed("wire: frames decoded (4096-byte pages, 1 MiB chunks)", frames, timed)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run either way.
    println!("postcopy-core throughput, 4 GiB guest ({PAGES} pages), one thread");
    let mut worst = f64::MAX;
    for page_size in [16, 4096] {
        worst = worst.min(background_push(page_size));
        worst = worst.min(requests(page_size));
        worst = worst.min(destination_receive(page_size));
    }
    decode_only();
    let source = Source::new(quiet(), RamLayout::single("ram", 4096, 1 << 28).expect("layout"), 1);
    let stats = source.stats(Timestamp(0));
    println!("bookkeeping for a 1 TiB guest of 4 KiB pages: source {} MiB", stats.bookkeeping_bytes >> 20);
    println!("slowest path: {:.2} M page events/s (goal: 10)", worst / 1e6);
}
