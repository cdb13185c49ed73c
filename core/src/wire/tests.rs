//! Codec tests: every frame round-trips through any chunking, and every kind
//! of bad input gets its own error.

use bytes::Bytes;
use proptest::prelude::*;

use super::frame::PAGE_KIND_MASK;
use super::*;
use crate::channel::Channel;
use crate::layout::{PageAddress, RamBlock};

fn decode_all(bytes: &[u8], chunk: usize) -> Result<Vec<Frame>, WireError> {
    let mut decoder = Decoder::new();
    let mut frames = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        decoder.push(Bytes::copy_from_slice(piece));
        while let Some(frame) = decoder.next_frame()? {
            frames.push(frame);
        }
    }
    assert!(!decoder.has_partial(), "bytes left over after the last frame");
    Ok(frames)
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    out
}

fn one_error(bytes: &[u8]) -> WireError {
    let mut decoder = Decoder::new();
    decoder.push(Bytes::copy_from_slice(bytes));
    match decoder.next_frame() {
        Err(error) => error,
        Ok(frame) => panic!("expected an error, decoded {frame:?}"),
    }
}

fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::Hello(Hello {
            resume: false,
            urgent_channel: true,
            session: 0xdead_beef,
            epoch: 0,
            page_size: 4096,
            mode: WireMode::Hybrid,
            precopy_rounds: 3,
            blocks: vec![
                RamBlock { name: "pc.ram".into(), page_count: 262_144, page_size: 4096 },
                RamBlock { name: "vga.vram".into(), page_count: 4096, page_size: 4096 },
            ],
            machine: Bytes::from_static(b"vcpus=4"),
            push_streams: 1,
        }),
        Frame::UrgentHello(UrgentHello { session: 7, epoch: 2 }),
        Frame::Page(PageFrame {
            address: PageAddress { block: 1, index: 99 },
            kind: PageKind::Requested,
            data: PageData::Bytes(Bytes::from(vec![7u8; 64])),
        }),
        Frame::Page(PageFrame {
            address: PageAddress { block: 0, index: 3 },
            kind: PageKind::Background,
            data: PageData::Zero,
        }),
        Frame::Discard(Discard { block: 0, ranges: vec![(0, 4), (10, 1)] }),
        Frame::DeviceState { last: true, chunk: Bytes::from_static(b"registers") },
        Frame::DeviceState { last: false, chunk: Bytes::new() },
        Frame::StartGuest,
        Frame::EndOfStream,
        Frame::Cancel { reason: "cancelled by the user".into() },
        Frame::Ping,
        Frame::Welcome(Welcome {
            session: 9,
            epoch: 1,
            guest_started: true,
            device_loaded: true,
            max_outstanding_requests: 4096,
        }),
        Frame::Request(Request { block: 0, indexes: vec![5, 6, 7, 1000] }),
        Frame::ReadyToRun,
        Frame::Eoc,
        Frame::GuestDropped { reason: "device state failed".into() },
        Frame::PresentPages(PresentPages { first_word: 3, words: vec![!0, 0, 5] }),
        Frame::PresentEnd { present_pages: 12 },
        Frame::Reject { reason: "unsupported version".into() },
        Frame::PagePart(PagePartFrame {
            address: PageAddress { block: 1, index: 5 },
            kind: PageKind::Requested,
            offset: 128 << 10,
            data: Bytes::from(vec![9u8; 32]),
        }),
        Frame::FallbackTerms(FallbackTerms { lease_ms: 1000, committed_checkpoint: 4 }),
        Frame::LeaseGrant { seq: 9 },
        Frame::CheckpointAck { seq: 4 },
        Frame::Superseded,
        Frame::Released,
        Frame::LeaseRequest { seq: 10 },
        Frame::CheckpointBegin(CheckpointBegin { seq: 5, pages: 2, device_bytes: 3 }),
        Frame::CheckpointPage {
            address: PageAddress { block: 1, index: 3 },
            data: PageData::Bytes(Bytes::from_static(&[7; 64])),
        },
        Frame::CheckpointPage { address: PageAddress { block: 0, index: 8 }, data: PageData::Zero },
        Frame::CheckpointDevice { chunk: Bytes::from_static(b"abc") },
        Frame::CheckpointEnd { seq: 5, digest: 0x1234_5678_9abc_def0 },
        Frame::ReleaseAck,
    ]
}

#[test]
fn a_page_part_without_data_or_with_an_unknown_kind_is_malformed() {
    let mut bytes = Vec::new();
    encode(
        &Frame::PagePart(PagePartFrame {
            address: PageAddress { block: 0, index: 1 },
            kind: PageKind::Background,
            offset: 0,
            data: Bytes::from_static(b"x"),
        }),
        &mut bytes,
    );
    // Without its one byte of data (the length says 12).
    let mut empty = bytes[..bytes.len() - 1].to_vec();
    empty[7] = 12;
    assert!(matches!(decode_all(&empty, 1), Err(WireError::Malformed { kind: FrameKind::PagePart, .. })));
    // Kind code 3 does not exist; the zero flag is not a part's.
    let mut unknown = bytes.clone();
    unknown[1] = 3 << 1;
    assert!(matches!(decode_all(&unknown, 1), Err(WireError::Malformed { kind: FrameKind::PagePart, .. })));
    let mut zero = bytes;
    zero[1] |= 1;
    assert_eq!(decode_all(&zero, 1), Err(WireError::ReservedBits { kind: FrameKind::PagePart }));
}

#[test]
fn every_frame_round_trips_one_byte_at_a_time() {
    let frames = sample_frames();
    let mut stream = Vec::new();
    for frame in &frames {
        encode(frame, &mut stream);
    }
    for chunk in [1, 2, 3, 7, 8, 9, 64, 4096, stream.len()] {
        assert_eq!(decode_all(&stream, chunk).unwrap(), frames, "chunk size {chunk}");
    }
}

#[test]
fn page_frames_are_sliced_not_copied() {
    let frame = Frame::Page(PageFrame {
        address: PageAddress { block: 0, index: 1 },
        kind: PageKind::Background,
        data: PageData::Bytes(Bytes::from(vec![1u8; 4096])),
    });
    let bytes = Bytes::from(encoded(&frame));
    let base = bytes.as_ptr() as usize;
    let mut decoder = Decoder::new();
    decoder.push(bytes.clone());
    let Some(Frame::Page(PageFrame { data: PageData::Bytes(data), .. })) = decoder.next_frame().unwrap() else {
        panic!("expected a page frame");
    };
    assert_eq!(data.as_ptr() as usize, base + HEADER_LEN + 8, "page data should point into the receive buffer");
}

#[test]
fn zero_pages_carry_no_payload() {
    let mut out = Vec::new();
    let zero =
        encode_page_frame(&mut out, PageAddress { block: 0, index: 0 }, PageKind::Background, 4096, |b| b.fill(0));
    assert!(zero);
    assert_eq!(out.len(), HEADER_LEN + 8);
    let mut out = Vec::new();
    let zero =
        encode_page_frame(&mut out, PageAddress { block: 0, index: 0 }, PageKind::Background, 4096, |b| b[4095] = 1);
    assert!(!zero);
    assert_eq!(out.len(), HEADER_LEN + 8 + 4096);
}

#[test]
fn block_page_sizes_cross_only_when_a_block_differs() {
    let uniform = sample_frames().remove(0);
    let Frame::Hello(hello) = &uniform else { panic!("the first sample is a hello") };
    let mut huge = hello.clone();
    huge.blocks[1].page_size = 2 << 20;
    let huge = Frame::Hello(huge);
    let (uniform_bytes, huge_bytes) = (encoded(&uniform), encoded(&huge));
    // The flag (bit 2 of the hello's flags) and a u32 per block.
    assert_eq!(huge_bytes.len(), uniform_bytes.len() + 4 * 2);
    assert_eq!(uniform_bytes[HEADER_LEN + 7] & 0x04, 0, "a uniform layout keeps the old encoding");
    assert_eq!(huge_bytes[HEADER_LEN + 7] & 0x04, 0x04);
    assert_eq!(decode_all(&huge_bytes, 5).unwrap(), vec![huge]);
    // The flag with every block at the hello's size is a second encoding of
    // the uniform hello, refused so that each hello has one.
    let huge_size = (2u32 << 20).to_be_bytes();
    let at = huge_bytes.windows(4).position(|w| w == huge_size).expect("the huge block's size is on the wire");
    let mut flagged_uniform = huge_bytes.clone();
    flagged_uniform[at..at + 4].copy_from_slice(&4096u32.to_be_bytes());
    assert!(matches!(decode_all(&flagged_uniform, 5), Err(WireError::Malformed { .. })));
    // A huge page crosses whole in one frame.
    let page = Frame::Page(PageFrame {
        address: PageAddress { block: 1, index: 0 },
        kind: PageKind::Requested,
        data: PageData::Bytes(Bytes::from(vec![3u8; 2 << 20])),
    });
    assert_eq!(decode_all(&encoded(&page), 1 << 16).unwrap(), vec![page]);
}

#[test]
fn unknown_frame_type() {
    assert_eq!(one_error(&[0x7f, 0, 0, 0, 0, 0, 0, 0]), WireError::UnknownFrameType(0x7f));
}

#[test]
fn oversized_length_is_rejected_from_the_header_alone() {
    // Only the header arrives: the decoder must refuse before buffering a payload.
    let mut header = vec![FrameKind::DeviceState.code(), 0, 0, 0];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    let error = one_error(&header);
    assert!(matches!(error, WireError::FrameTooLarge { kind: FrameKind::DeviceState, len: u32::MAX, .. }));
    // Byte by byte too.
    let mut decoder = Decoder::new();
    let mut result = Ok(None);
    for &b in &header {
        decoder.push(Bytes::copy_from_slice(&[b]));
        result = decoder.next_frame();
    }
    assert!(matches!(result, Err(WireError::FrameTooLarge { .. })));
    // An empty frame type with a payload is oversized too.
    assert!(matches!(one_error(&[FrameKind::Eoc.code(), 0, 0, 0, 0, 0, 0, 1, 0]), WireError::FrameTooLarge { .. }));
}

#[test]
fn truncated_and_trailing_payloads() {
    let mut bytes = encoded(&Frame::PresentEnd { present_pages: 1 });
    // Claim a shorter payload than the frame needs.
    bytes[7] = 4;
    bytes.truncate(HEADER_LEN + 4);
    assert_eq!(one_error(&bytes), WireError::Truncated { kind: FrameKind::PresentEnd });
    let mut bytes = encoded(&Frame::Request(Request { block: 0, indexes: vec![1] }));
    bytes.push(0);
    bytes[7] += 1;
    assert_eq!(one_error(&bytes), WireError::TrailingBytes { kind: FrameKind::Request, extra: 1 });
}

#[test]
fn reserved_bits_are_rejected() {
    let mut bytes = encoded(&Frame::Eoc);
    bytes[2] = 1;
    assert_eq!(one_error(&bytes), WireError::ReservedBits { kind: FrameKind::Eoc });
    let mut bytes = encoded(&Frame::Eoc);
    bytes[1] = 0x80;
    assert_eq!(one_error(&bytes), WireError::ReservedBits { kind: FrameKind::Eoc });
}

#[test]
fn bad_magic_and_version() {
    let hello = sample_frames().remove(0);
    let mut bytes = encoded(&hello);
    bytes[HEADER_LEN] ^= 0xff;
    assert!(matches!(one_error(&bytes), WireError::BadMagic(_)));
    let mut bytes = encoded(&hello);
    bytes[HEADER_LEN + 5] = 99;
    assert_eq!(one_error(&bytes), WireError::UnsupportedVersion { got: 99, supported: PROTOCOL_VERSION });
}

#[test]
fn malformed_fields() {
    // A request with zero pages.
    let mut bytes = vec![FrameKind::Request.code(), 0, 0, 0, 0, 0, 0, 6];
    bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    assert!(matches!(one_error(&bytes), WireError::Malformed { kind: FrameKind::Request, .. }));
    // A page frame with an unknown kind.
    let mut bytes = vec![FrameKind::Page.code(), PAGE_KIND_MASK, 0, 0, 0, 0, 0, 9];
    bytes.extend_from_slice(&[0; 9]);
    assert!(matches!(one_error(&bytes), WireError::Malformed { kind: FrameKind::Page, .. }));
    // A reason that is not UTF-8.
    let bytes = vec![FrameKind::Reject.code(), 0, 0, 0, 0, 0, 0, 1, 0xff];
    assert!(matches!(one_error(&bytes), WireError::Malformed { kind: FrameKind::Reject, .. })); // Fallback: a zero lease, checkpoint 0, a checkpoint page with neither
                                                                                                // bytes nor the zero flag, a flag a lease grant does not define.
    let mut bytes = vec![FrameKind::FallbackTerms.code(), 0, 0, 0, 0, 0, 0, 12];
    bytes.extend_from_slice(&[0; 12]);
    assert!(matches!(one_error(&bytes), WireError::Malformed { kind: FrameKind::FallbackTerms, .. }));
    let mut bytes = vec![FrameKind::CheckpointBegin.code(), 0, 0, 0, 0, 0, 0, 20];
    bytes.extend_from_slice(&[0; 20]);
    assert!(matches!(one_error(&bytes), WireError::Malformed { kind: FrameKind::CheckpointBegin, .. }));
    let mut bytes = vec![FrameKind::CheckpointPage.code(), 0, 0, 0, 0, 0, 0, 8];
    bytes.extend_from_slice(&[0; 8]);
    assert!(matches!(one_error(&bytes), WireError::Malformed { kind: FrameKind::CheckpointPage, .. }));
    let mut bytes = vec![FrameKind::LeaseGrant.code(), 1, 0, 0, 0, 0, 0, 8];
    bytes.extend_from_slice(&[0; 8]);
    assert_eq!(one_error(&bytes), WireError::ReservedBits { kind: FrameKind::LeaseGrant });
    // A lease request of 9 bytes: more than its limit, refused from the header.
    let bytes = vec![FrameKind::LeaseRequest.code(), 0, 0, 0, 0, 0, 0, 9];
    assert!(matches!(one_error(&bytes), WireError::FrameTooLarge { kind: FrameKind::LeaseRequest, .. }));
}

#[test]
fn a_failed_stream_stays_failed() {
    let mut decoder = Decoder::new();
    decoder.push(Bytes::from_static(&[0x7f, 0, 0, 0, 0, 0, 0, 0]));
    assert!(decoder.next_frame().is_err());
    decoder.push(Bytes::from(encoded(&Frame::Eoc)));
    assert_eq!(decoder.next_frame(), Err(WireError::Desynchronized));
}

#[test]
fn push_stream_counts_round_trip_and_one_stream_keeps_the_old_encoding() {
    let Some(Frame::Hello(one)) = sample_frames().into_iter().next() else { panic!("not a hello") };
    let old = encoded(&Frame::Hello(Hello { push_streams: 1, ..one.clone() }));
    for streams in 2..=crate::channel::MAX_PUSH_STREAMS {
        let frame = Frame::Hello(Hello { push_streams: streams, ..one.clone() });
        let bytes = encoded(&frame);
        // One byte more than the old encoding, and flag bit 3.
        assert_eq!(bytes.len(), old.len() + 1);
        assert_eq!(bytes[8 + 7] & 0x08, 0x08);
        let mut decoder = Decoder::new();
        decoder.push(Bytes::from(bytes.clone()));
        assert_eq!(decoder.next_frame(), Ok(Some(frame)));
        // A count out of range is a malformed hello, not a panic.
        for bad in [0u8, 1, crate::channel::MAX_PUSH_STREAMS + 1, 255] {
            let mut bad_bytes = bytes.clone();
            *bad_bytes.last_mut().unwrap() = bad;
            let mut decoder = Decoder::new();
            decoder.push(Bytes::from(bad_bytes));
            assert!(matches!(decoder.next_frame(), Err(WireError::Malformed { .. })), "{bad}");
        }
    }
    assert_eq!(old[8 + 7] & 0x08, 0);
}

#[test]
fn preambles() {
    for channel in Channel::EVERY {
        let mut out = Vec::new();
        encode_preamble(&mut out, channel);
        let bytes: [u8; PREAMBLE_LEN] = out.try_into().unwrap();
        assert_eq!(Preamble::decode(&bytes), Ok(Preamble { channel }));
    }
    assert!(matches!(Preamble::decode(&[0; 8]), Err(PreambleError::BadMagic(0))));
    let mut out = Vec::new();
    encode_preamble(&mut out, Channel::Main);
    // Codes 3 to 9 name push streams 1 to 7; 10 and up name nothing.
    out[4] = 10;
    assert_eq!(Preamble::decode(&out.clone().try_into().unwrap()), Err(PreambleError::UnknownChannel(10)));
    out[4] = 0;
    out[7] = 1;
    assert_eq!(Preamble::decode(&out.try_into().unwrap()), Err(PreambleError::ReservedBytes));
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_reason() -> impl Strategy<Value = String> {
    "[a-z ]{0,40}"
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    // A block's page size is the hello's (None) or its own.
    let block = (1usize..4)
        .prop_flat_map(|n| prop::collection::vec(("[a-z]{1,20}", 1u64..1 << 32, prop::option::of(any::<u32>())), n));
    prop_oneof![
        (any::<bool>(), any::<bool>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<bool>(), any::<u32>(), block)
            .prop_map(|(resume, urgent_channel, session, epoch, page_size, hybrid, precopy_rounds, blocks)| {
                let blocks = blocks
                    .into_iter()
                    .map(|(name, page_count, own)| RamBlock { name, page_count, page_size: own.unwrap_or(page_size) })
                    .collect();
                Frame::Hello(Hello {
                    resume,
                    urgent_channel,
                    session,
                    epoch,
                    page_size,
                    mode: if hybrid { WireMode::Hybrid } else { WireMode::Postcopy },
                    precopy_rounds,
                    blocks,
                    machine: Bytes::from(vec![page_size as u8; (session % 300) as usize]),
                    push_streams: (session % 8) as u8 + 1,
                })
            }),
        (any::<u64>(), any::<u32>()).prop_map(|(session, epoch)| Frame::UrgentHello(UrgentHello { session, epoch })),
        (
            any::<u32>(),
            any::<u32>(),
            0u8..3,
            prop::option::of(arb_bytes(300).prop_filter("non-empty", |b| !b.is_empty()))
        )
            .prop_map(|(block, index, kind, data)| {
                Frame::Page(PageFrame {
                    address: PageAddress { block, index },
                    kind: PageKind::from_code(kind).unwrap_or(PageKind::Background),
                    data: data.map_or(PageData::Zero, PageData::Bytes),
                })
            }),
        (any::<u32>(), any::<u32>(), 0u8..3, any::<u32>(), arb_bytes(300).prop_filter("non-empty", |b| !b.is_empty()))
            .prop_map(|(block, index, kind, offset, data)| {
                Frame::PagePart(PagePartFrame {
                    address: PageAddress { block, index },
                    kind: PageKind::from_code(kind).unwrap_or(PageKind::Background),
                    offset,
                    data,
                })
            }),
        (any::<u32>(), prop::collection::vec((any::<u32>(), 1u32..), 1..20))
            .prop_map(|(block, ranges)| Frame::Discard(Discard { block, ranges })),
        (any::<bool>(), arb_bytes(500)).prop_map(|(last, chunk)| Frame::DeviceState { last, chunk }),
        Just(Frame::StartGuest),
        Just(Frame::EndOfStream),
        arb_reason().prop_map(|reason| Frame::Cancel { reason }),
        Just(Frame::Ping),
        (any::<u64>(), any::<u32>(), any::<bool>(), any::<bool>(), any::<u32>()).prop_map(
            |(session, epoch, guest_started, device_loaded, max_outstanding_requests)| {
                Frame::Welcome(Welcome { session, epoch, guest_started, device_loaded, max_outstanding_requests })
            }
        ),
        (any::<u32>(), prop::collection::vec(any::<u32>(), 1..50))
            .prop_map(|(block, indexes)| Frame::Request(Request { block, indexes })),
        Just(Frame::ReadyToRun),
        Just(Frame::Eoc),
        arb_reason().prop_map(|reason| Frame::GuestDropped { reason }),
        (any::<u64>(), prop::collection::vec(any::<u64>(), 1..20))
            .prop_map(|(first_word, words)| Frame::PresentPages(PresentPages { first_word, words })),
        any::<u64>().prop_map(|present_pages| Frame::PresentEnd { present_pages }),
        arb_reason().prop_map(|reason| Frame::Reject { reason }),
    ]
}

proptest! {
    #[test]
    fn random_frames_round_trip(frames in prop::collection::vec(arb_frame(), 1..20), chunk in 1usize..200) {
        let mut stream = Vec::new();
        for frame in &frames {
            encode(frame, &mut stream);
        }
        prop_assert_eq!(decode_all(&stream, chunk).unwrap(), frames);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..64) {
        let mut decoder = Decoder::new();
        'outer: for piece in bytes.chunks(chunk) {
            decoder.push(Bytes::copy_from_slice(piece));
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        // Whatever decodes re-encodes to a frame that decodes the same.
                        let again = decode_all(&encoded(&frame), 3).unwrap();
                        prop_assert_eq!(again, vec![frame]);
                    }
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn corrupted_streams_give_errors_not_panics(frames in prop::collection::vec(arb_frame(), 1..6), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut stream = Vec::new();
        for frame in &frames {
            encode(frame, &mut stream);
        }
        for (at, value) in flips {
            let len = stream.len();
            stream[at % len] = value;
        }
        let mut decoder = Decoder::new();
        for piece in stream.chunks(5) {
            decoder.push(Bytes::copy_from_slice(piece));
            while let Ok(Some(_)) = decoder.next_frame() {}
        }
    }
}

#[test]
fn a_part_carries_at_most_a_frame_page_and_the_limit_is_checked_from_the_header() {
    use crate::layout::{MAX_FRAME_PAGE_SIZE, MAX_PAGE_SIZE};
    // The part limit is what a 1 GiB page in 2 MiB frames needs.
    assert_eq!(MAX_PAGE_PARTS, (MAX_PAGE_SIZE / MAX_FRAME_PAGE_SIZE) as usize);
    assert_eq!(MAX_PAGE_PARTS, 512);
    // The last 2 MiB part of a 1 GiB page round-trips.
    let max = MAX_FRAME_PAGE_SIZE as usize;
    let part = Frame::PagePart(PagePartFrame {
        address: PageAddress { block: 0, index: 3 },
        kind: PageKind::Requested,
        offset: MAX_PAGE_SIZE - MAX_FRAME_PAGE_SIZE,
        data: Bytes::from(vec![0x5a; max]),
    });
    let bytes = encoded(&part);
    assert_eq!(decode_all(&bytes, 1 << 16), Ok(vec![part]));
    // A byte more, for parts and whole pages alike: refused from the
    // header alone, before a payload is kept.
    for (kind, fixed) in [(FrameKind::PagePart, 12), (FrameKind::Page, 8)] {
        let mut header = vec![kind.code(), PageKind::Background.code() << 1, 0, 0];
        header.extend_from_slice(&((fixed + max + 1) as u32).to_be_bytes());
        assert!(matches!(one_error(&header), WireError::FrameTooLarge { .. }), "{kind:?}");
    }
}
