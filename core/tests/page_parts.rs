//! Pages pushed in parts (`Config::page_part_bytes`): a request for the page
//! whose parts the push is sending gets the rest on the urgent channel, each
//! part crossing once; the destination installs the page whole, drops the
//! parts of an incomplete page on a loss, and refuses bad parts.

use bytes::Bytes;
use postcopy_core::testkit::{Outcome, Pair, PairConfig};
use postcopy_core::wire::{Decoder, Frame, PageKind, PagePartFrame};
use postcopy_core::{Channel, Config, DestinationState, PageAddress, PageNumber, ProtocolError, RamBlock, RamLayout};

/// Two small pages (block "ram"), then two huge pages (block "huge", pages
/// 2 and 3), pushed in two parts each.
const HUGE_PAGE: PageNumber = PageNumber(2);

fn started_pair() -> Pair {
    let mut cfg = Config::postcopy();
    cfg.prepaging = false;
    let mut pair = Pair::new(PairConfig::with_huge_pages(cfg, 2, 2));
    // Written on the source: no page is zero (a zero page goes whole).
    for p in 0..4 {
        pair.guest_access(0, PageNumber(p), true);
    }
    run_to_the_switchover(&mut pair);
    pair
}

/// Delivers only what the switchover needs (no page pushed yet) until the
/// destination runs the guest.
fn run_to_the_switchover(pair: &mut Pair) {
    for _ in 0..50 {
        for ch in [Channel::Main, Channel::Return, Channel::Urgent] {
            if ch != Channel::Main || !pair.dst.running {
                pair.transmit(ch, 0);
                pair.deliver(ch, usize::MAX);
            }
        }
        if pair.dst.running {
            break;
        }
    }
    assert!(pair.dst.running, "{:?} {:?}", pair.src.core.state(), pair.dst.core.state());
}

/// Pushes main-channel frames until the first part of `page` is on the wire
/// (not delivered).
fn push_until_first_part(pair: &mut Pair, page: PageNumber) {
    for _ in 0..10 {
        if pair.src.core.is_sent(page) {
            return;
        }
        pair.deliver(Channel::Main, usize::MAX);
        pair.transmit(Channel::Main, 0);
    }
    panic!("the push never reached page {}", page.0);
}

fn parts_in_flight(pair: &Pair, channel: Channel) -> Vec<(u32, u32, PageKind)> {
    let mut decoder = Decoder::new();
    for bytes in &pair.pipes[channel.index()].in_flight {
        decoder.push(bytes.clone());
    }
    let mut parts = Vec::new();
    while let Ok(Some(frame)) = decoder.next_frame() {
        if let Frame::PagePart(part) = frame {
            parts.push((part.address.index, part.offset, part.kind));
        }
    }
    parts
}

#[test]
fn a_fault_on_the_page_being_pushed_gets_the_rest_on_the_urgent_channel() {
    let mut pair = started_pair();
    push_until_first_part(&mut pair, HUGE_PAGE);
    assert_eq!(parts_in_flight(&pair, Channel::Main), vec![(0, 0, PageKind::Background)], "one part pushed");
    // The guest touches the page: the request reaches the source while the
    // page's first part is still on the main channel.
    pair.guest_access(0, HUGE_PAGE, false);
    pair.transmit(Channel::Return, 0);
    pair.deliver(Channel::Return, usize::MAX);
    assert_eq!(pair.src.core.stats(pair.now).requests_for_pages_in_parts, 1);
    pair.transmit(Channel::Urgent, 0);
    assert_eq!(parts_in_flight(&pair, Channel::Urgent), vec![(0, 128, PageKind::Requested)], "the rest goes urgent");
    // The urgent part arrives first: nothing is visible until the push's part does.
    pair.deliver(Channel::Urgent, usize::MAX);
    assert!(!pair.dst.is_present(HUGE_PAGE), "a page with a part missing is not present");
    assert!(pair.blocked[0].is_some(), "the vCPU still waits");
    pair.deliver(Channel::Main, usize::MAX);
    assert!(pair.dst.is_present(HUGE_PAGE));
    assert!(pair.blocked[0].is_none(), "the vCPU read the whole page");
    // The push does not send the page's second part again.
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::Completed));
    assert_eq!(pair.page_crossings, vec![1, 1, 1, 1], "every page crossed once");
    assert!(pair.violations.is_empty(), "{:?}", pair.violations);
    let src = pair.src.core.stats(pair.now);
    assert_eq!(src.page_parts_sent, 4, "two huge pages of two parts");
    assert_eq!(pair.dst.core.stats(pair.now).page_parts_received, 4);
}

#[test]
fn a_page_whose_parts_were_cut_off_by_a_loss_is_sent_again_after_the_recovery() {
    let mut pair = started_pair();
    push_until_first_part(&mut pair, HUGE_PAGE);
    pair.deliver(Channel::Main, usize::MAX);
    assert!(!pair.dst.is_present(HUGE_PAGE), "half the page arrived");
    pair.lose(Channel::Main);
    assert_eq!(pair.dst.core.state(), DestinationState::Paused);
    pair.guest_access(0, HUGE_PAGE, true);
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::Completed));
    assert!(pair.violations.is_empty(), "{:?}", pair.violations);
    assert!(pair.src.recovered);
    assert_eq!(pair.src.core.stats(pair.now).pages_sent.resent, 1, "the cut page went again");
}

fn part(index: u32, offset: u32, len: usize) -> Frame {
    Frame::PagePart(PagePartFrame {
        address: PageAddress { block: 1, index },
        kind: PageKind::Background,
        offset,
        data: Bytes::from(vec![7; len]),
    })
}

#[test]
fn bad_and_repeated_parts_are_typed_protocol_errors() {
    let pair = started_pair();
    let now = pair.now;
    let refused = |frame: Frame| {
        let mut dst = pair.dst.core.clone();
        dst.handle_frame(now, Channel::Main, frame)
    };
    for (offset, len) in [(0, 256), (0, 96), (64, 128), (256, 128), (0, 3)] {
        let error = refused(part(0, offset, len));
        assert_eq!(error, Err(ProtocolError::BadPagePart { page_size: 256, offset, len }), "offset {offset} len {len}");
    }
    assert_eq!(
        refused(part(0, 0, 64 << 20)),
        Err(ProtocolError::BadPagePart { page_size: 256, offset: 0, len: 64 << 20 })
    );
    // A part as long as its (small) page.
    let small = Frame::PagePart(PagePartFrame {
        address: PageAddress { block: 0, index: 0 },
        kind: PageKind::Background,
        offset: 0,
        data: Bytes::from(vec![1; 64]),
    });
    assert!(matches!(refused(small), Err(ProtocolError::BadPagePart { page_size: 64, .. })));
    assert_eq!(refused(part(9, 0, 128)), Err(ProtocolError::PageOutOfRange { block: 1, index: 9 }));
    let mut dst = pair.dst.core.clone();
    assert_eq!(dst.handle_frame(now, Channel::Main, part(1, 128, 128)), Ok(()));
    assert_eq!(
        dst.handle_frame(now, Channel::Urgent, part(1, 128, 128)),
        Err(ProtocolError::DuplicatePagePart { block: 1, index: 1, offset: 128 })
    );
    // Parts of another length than the page's first.
    let mut dst = pair.dst.core.clone();
    assert_eq!(dst.handle_frame(now, Channel::Main, part(1, 0, 128)), Ok(()));
    assert!(matches!(dst.handle_frame(now, Channel::Main, part(1, 192, 64)), Err(ProtocolError::BadPagePart { .. })));
    // Precopy parts do not exist.
    let precopy = Frame::PagePart(PagePartFrame {
        address: PageAddress { block: 1, index: 0 },
        kind: PageKind::Precopy,
        offset: 0,
        data: Bytes::from(vec![1; 128]),
    });
    assert!(matches!(refused(precopy), Err(ProtocolError::UnexpectedFrame { .. })));
}

#[test]
fn whole_pages_only_when_parts_are_off() {
    let mut cfg = PairConfig::with_huge_pages(Config::postcopy(), 2, 2);
    cfg.config.page_part_bytes = 0;
    let mut pair = Pair::new(cfg);
    for p in 0..4 {
        pair.guest_access(0, PageNumber(p), true);
    }
    assert_eq!(pair.run_to_completion(10_000), Ok(Outcome::Completed));
    assert_eq!(pair.src.core.stats(pair.now).page_parts_sent, 0);
    assert!(pair.violations.is_empty(), "{:?}", pair.violations);
}

/// Pages larger than a frame carries (`MAX_FRAME_PAGE_SIZE`, 2 MiB; a
/// 1 GiB page on KVM): a block of two 4 MiB pages, written on the source.
fn pair_with_pages_larger_than_a_frame() -> Pair {
    pair_with_pages_larger_than_a_frame_in(Config::postcopy())
}

/// As [`pair_with_pages_larger_than_a_frame`], in mode `cfg`.
fn pair_with_pages_larger_than_a_frame_in(mut cfg: Config) -> Pair {
    cfg.prepaging = false;
    cfg.page_part_bytes = 0;
    let mut pc = PairConfig::new(cfg, 2);
    let big = 2 * postcopy_core::layout::MAX_FRAME_PAGE_SIZE;
    let blocks = vec![
        RamBlock { name: "ram".into(), page_count: 2, page_size: 64 },
        RamBlock { name: "huge".into(), page_count: 2, page_size: big },
    ];
    pc.layout = RamLayout::new(64, blocks).expect("a valid layout");
    let mut pair = Pair::new(pc);
    for p in 0..4 {
        pair.guest_access(0, PageNumber(p), true);
    }
    pair
}

#[test]
fn a_page_larger_than_a_frame_always_crosses_in_parts_requested_or_pushed() {
    let mut pair = pair_with_pages_larger_than_a_frame();
    // The guest's first touch on the destination is the huge page.
    pair.guest_access(0, HUGE_PAGE, false);
    assert_eq!(pair.run_to_completion(100_000), Ok(Outcome::Completed));
    assert!(pair.violations.is_empty(), "{:?}", pair.violations);
    let src = pair.src.core.stats(pair.now);
    // Parts on, though the configuration asks for whole pages: two pages
    // of two 2 MiB parts, each part once.
    assert_eq!(src.page_parts_sent, 4, "{src:?}");
    assert_eq!(pair.dst.core.stats(pair.now).page_parts_received, 4);
    assert_eq!(src.pages_sent.total(), 4, "each page once: {:?}", src.pages_sent);
    assert!(pair.dst.is_present(HUGE_PAGE) && pair.dst.is_present(PageNumber(3)));
    // Nothing placed is left over: every placed page was installed.
    assert!(pair.dst.placed.is_empty(), "{:?}", pair.dst.placed.keys());
}

#[test]
fn a_page_crosses_in_at_most_max_page_parts_parts() {
    let mut pair = pair_with_pages_larger_than_a_frame();
    run_to_the_switchover(&mut pair);
    let big = 2 * postcopy_core::layout::MAX_FRAME_PAGE_SIZE;
    let (now, limit) = (pair.now, postcopy_core::wire::MAX_PAGE_PARTS);
    let frame = |offset: u32, len: usize| {
        Frame::PagePart(PagePartFrame {
            address: PageAddress { block: 1, index: 0 },
            kind: PageKind::Background,
            offset,
            data: Bytes::from(vec![7; len]),
        })
    };
    let mut dst = pair.dst.core.clone();
    // One part more than the limit allows: refused before anything is kept.
    let too_small = big as usize / (2 * limit);
    assert_eq!(
        dst.handle_frame(now, Channel::Main, frame(0, too_small)),
        Err(ProtocolError::BadPagePart { page_size: big, offset: 0, len: too_small })
    );
    // Exactly the limit: taken, each part placed, the page installed whole
    // with the last.
    let len = big as usize / limit;
    let mut dst = pair.dst.core.clone();
    for i in (0..limit).rev() {
        assert_eq!(dst.handle_frame(now, Channel::Main, frame((i * len) as u32, len)), Ok(()), "part {i}");
    }
    let mut placed = 0;
    let mut installed = 0;
    while let Some(action) = dst.poll_action() {
        match action {
            postcopy_core::DestinationAction::PlacePagePart { .. } => placed += 1,
            postcopy_core::DestinationAction::InstallPlacedPage { page } => {
                assert_eq!(placed, limit, "installed before every part was placed");
                assert_eq!(page, HUGE_PAGE);
                installed += 1;
            }
            _ => {}
        }
    }
    assert_eq!((placed, installed), (limit, 1));
}

#[test]
fn precopy_rounds_leave_pages_larger_than_a_frame_to_postcopy() {
    let mut pair = pair_with_pages_larger_than_a_frame_in(Config::hybrid(2));
    assert_eq!(pair.run_to_completion(100_000), Ok(Outcome::Completed));
    assert!(pair.violations.is_empty(), "{:?}", pair.violations);
    let src = pair.src.core.stats(pair.now);
    // The small pages crossed in precopy; the big ones only in postcopy, in parts.
    assert!(src.pages_sent.precopy >= 2, "{:?}", src.pages_sent);
    assert_eq!(src.page_parts_sent, 4, "{src:?}");
    assert!(pair.dst.is_present(HUGE_PAGE) && pair.dst.is_present(PageNumber(3)));
}
