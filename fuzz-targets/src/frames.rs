//! Structured frames for the state-machine targets: every frame type, with
//! fields that are either plausible in the receiver's context (the right
//! session and epoch, a block and page that exist) or any value at all.

use bytes::Bytes;
use postcopy_core::wire::{
    self, Decoder, Discard, Frame, Hello, PageData, PageFrame, PageKind, PagePartFrame, PresentPages, Request,
    UrgentHello, Welcome, WireMode, MAX_DEVICE_STATE_CHUNK,
};
use postcopy_core::{PageAddress, RamBlock, RamLayout};

use crate::input::{In, Num, Out};

/// Most blocks, ranges, indexes or words a structured frame carries.
pub const MAX_ITEMS: usize = 16;
/// Longest reason string.
pub const MAX_REASON: usize = 64;

/// Page payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSpec {
    /// The zero flag, no bytes.
    Zero,
    /// A whole page filled with this byte.
    Fill(u8),
    /// A payload of the wrong length (any length up to 64 KiB).
    Length(u16),
}

/// Words of a present-pages report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordSpec {
    /// Every page the word covers.
    AllValid,
    Empty,
    /// Any bits, including past the last page.
    Raw(u64),
    /// These bits, restricted to pages that exist.
    Masked(u64),
}

/// A frame, as the fuzzer chooses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameSpec {
    Hello {
        resume: bool,
        urgent: bool,
        session: Num,
        epoch: Num,
        page_size: Num,
        hybrid: bool,
        rounds: u8,
        /// `(name selector, page count)`: names `b0`..`b3`, 255 for an empty name.
        blocks: Vec<(u8, Num)>,
        /// The opaque machine description.
        machine: Vec<u8>,
        /// `push_streams = 1 + v % 8`.
        push: u8,
    },
    UrgentHello {
        session: Num,
        epoch: Num,
    },
    Page {
        block: Num,
        index: Num,
        /// 0 precopy, 1 background, 2 requested (mod 3).
        kind: u8,
        data: PageSpec,
    },
    Discard {
        block: Num,
        ranges: Vec<(Num, Num)>,
    },
    DeviceState {
        last: bool,
        len: u16,
    },
    StartGuest,
    EndOfStream,
    Cancel(Vec<u8>),
    Ping,
    Welcome {
        session: Num,
        epoch: Num,
        started: bool,
        loaded: bool,
        max_requests: Num,
    },
    Request {
        block: Num,
        indexes: Vec<Num>,
    },
    ReadyToRun,
    Eoc,
    GuestDropped(Vec<u8>),
    PresentPages {
        first_word: Num,
        words: Vec<WordSpec>,
    },
    PresentEnd {
        count: Num,
    },
    Reject(Vec<u8>),
    /// A part of a page: `Near(k)` offsets are `k` parts in.
    PagePart {
        block: Num,
        index: Num,
        /// 0 precopy, 1 background, 2 requested (mod 3).
        kind: u8,
        offset: Num,
        /// Bytes of the part; 0: half the block's page.
        len: u16,
    },
}

/// What the receiver would find plausible.
#[derive(Clone, Copy, Debug)]
pub struct Ctx<'a> {
    pub session: u64,
    pub epoch: u32,
    pub page_size: u32,
    pub layout: Option<&'a RamLayout>,
    /// The next word of a present-pages report.
    pub next_word: u64,
    /// Pages reported present so far.
    pub present_seen: u64,
}

impl FrameSpec {
    pub fn read(r: &mut In) -> FrameSpec {
        match r.u8() % 18 {
            0 => FrameSpec::Hello {
                resume: r.bool(),
                urgent: r.bool(),
                session: r.num(),
                epoch: r.num(),
                page_size: r.num(),
                hybrid: r.bool(),
                rounds: r.u8(),
                blocks: r.list(MAX_ITEMS, |r| (r.u8(), r.num())),
                machine: r.bytes(255),
                push: r.u8(),
            },
            1 => FrameSpec::UrgentHello { session: r.num(), epoch: r.num() },
            2 => FrameSpec::Page {
                block: r.num(),
                index: r.num(),
                kind: r.u8(),
                data: match r.u8() % 3 {
                    0 => PageSpec::Zero,
                    1 => PageSpec::Fill(r.u8()),
                    _ => PageSpec::Length(r.u16()),
                },
            },
            3 => FrameSpec::Discard { block: r.num(), ranges: r.list(MAX_ITEMS, |r| (r.num(), r.num())) },
            4 => FrameSpec::DeviceState { last: r.bool(), len: r.u16() },
            5 => FrameSpec::StartGuest,
            6 => FrameSpec::EndOfStream,
            7 => FrameSpec::Cancel(r.bytes(MAX_REASON)),
            8 => FrameSpec::Ping,
            9 => FrameSpec::Welcome {
                session: r.num(),
                epoch: r.num(),
                started: r.bool(),
                loaded: r.bool(),
                max_requests: r.num(),
            },
            10 => FrameSpec::Request { block: r.num(), indexes: r.list(MAX_ITEMS, In::num) },
            11 => FrameSpec::ReadyToRun,
            12 => FrameSpec::Eoc,
            13 => FrameSpec::GuestDropped(r.bytes(MAX_REASON)),
            14 => FrameSpec::PresentPages {
                first_word: r.num(),
                words: r.list(MAX_ITEMS, |r| match r.u8() % 4 {
                    0 => WordSpec::AllValid,
                    1 => WordSpec::Empty,
                    2 => WordSpec::Raw(r.u64()),
                    _ => WordSpec::Masked(r.u64()),
                }),
            },
            15 => FrameSpec::PresentEnd { count: r.num() },
            16 => FrameSpec::Reject(r.bytes(MAX_REASON)),
            _ => FrameSpec::PagePart { block: r.num(), index: r.num(), kind: r.u8(), offset: r.num(), len: r.u16() },
        }
    }

    pub fn write(&self, o: &mut Out) {
        match self {
            FrameSpec::Hello { resume, urgent, session, epoch, page_size, hybrid, rounds, blocks, machine, push } => {
                o.u8(0).bool(*resume).bool(*urgent).num(*session).num(*epoch).num(*page_size);
                o.bool(*hybrid).u8(*rounds).list(blocks, |o, &(name, pages)| {
                    o.u8(name).num(pages);
                });
                o.bytes(machine).u8(*push);
            }
            FrameSpec::UrgentHello { session, epoch } => {
                o.u8(1).num(*session).num(*epoch);
            }
            FrameSpec::Page { block, index, kind, data } => {
                o.u8(2).num(*block).num(*index).u8(*kind);
                match data {
                    PageSpec::Zero => o.u8(0),
                    PageSpec::Fill(b) => o.u8(1).u8(*b),
                    PageSpec::Length(n) => o.u8(2).u16(*n),
                };
            }
            FrameSpec::Discard { block, ranges } => {
                o.u8(3).num(*block).list(ranges, |o, &(first, count)| {
                    o.num(first).num(count);
                });
            }
            FrameSpec::DeviceState { last, len } => {
                o.u8(4).bool(*last).u16(*len);
            }
            FrameSpec::StartGuest => {
                o.u8(5);
            }
            FrameSpec::EndOfStream => {
                o.u8(6);
            }
            FrameSpec::Cancel(reason) => {
                o.u8(7).bytes(reason);
            }
            FrameSpec::Ping => {
                o.u8(8);
            }
            FrameSpec::Welcome { session, epoch, started, loaded, max_requests } => {
                o.u8(9).num(*session).num(*epoch).bool(*started).bool(*loaded).num(*max_requests);
            }
            FrameSpec::Request { block, indexes } => {
                o.u8(10).num(*block).list(indexes, |o, &i| {
                    o.num(i);
                });
            }
            FrameSpec::ReadyToRun => {
                o.u8(11);
            }
            FrameSpec::Eoc => {
                o.u8(12);
            }
            FrameSpec::GuestDropped(reason) => {
                o.u8(13).bytes(reason);
            }
            FrameSpec::PresentPages { first_word, words } => {
                o.u8(14).num(*first_word).list(words, |o, w| {
                    match *w {
                        WordSpec::AllValid => o.u8(0),
                        WordSpec::Empty => o.u8(1),
                        WordSpec::Raw(x) => o.u8(2).u64(x),
                        WordSpec::Masked(x) => o.u8(3).u64(x),
                    };
                });
            }
            FrameSpec::PresentEnd { count } => {
                o.u8(15).num(*count);
            }
            FrameSpec::Reject(reason) => {
                o.u8(16).bytes(reason);
            }
            FrameSpec::PagePart { block, index, kind, offset, len } => {
                o.u8(17).num(*block).num(*index).u8(*kind).num(*offset).u16(*len);
            }
        }
    }

    /// The frame, with plausible values taken from `ctx`. Always within the
    /// wire limits, so that it encodes.
    pub fn build(&self, ctx: &Ctx) -> Frame {
        let blocks = ctx.layout.map_or(1, |l| l.blocks().len() as u64);
        let block_of = |n: Num| n.index_below(blocks) as u32;
        let pages_in = |block: u32| {
            ctx.layout.and_then(|l| l.blocks().get(block as usize)).map_or(u64::from(u32::MAX), |b| b.page_count)
        };
        let session = |n: Num| n.offset_from(ctx.session);
        let epoch = |n: Num| n.offset_from(u64::from(ctx.epoch)) as u32;
        let reason = |bytes: &[u8]| String::from_utf8_lossy(bytes).chars().take(MAX_REASON).collect::<String>();
        let total_pages = ctx.layout.map_or(0, RamLayout::total_pages);
        match self {
            FrameSpec::Hello {
                resume,
                urgent,
                session: s,
                epoch: e,
                page_size,
                hybrid,
                rounds,
                blocks,
                machine,
                push,
            } => {
                let hello_page_size = match page_size {
                    Num::Near(0) => ctx.page_size,
                    Num::Near(k) => 1 << (k % 20),
                    Num::Raw(x) => *x as u32,
                };
                Frame::Hello(Hello {
                    resume: *resume,
                    urgent_channel: *urgent,
                    session: session(*s),
                    epoch: epoch(*e),
                    page_size: hello_page_size,
                    mode: if *hybrid { WireMode::Hybrid } else { WireMode::Postcopy },
                    precopy_rounds: u32::from(*rounds),
                    blocks: blocks
                        .iter()
                        .map(|&(name, pages)| RamBlock {
                            name: if name == 255 { String::new() } else { format!("b{}", name % 4) },
                            page_count: pages.offset_from(1),
                            // A name byte with bit 7 set (not 255) gives the
                            // block pages four times the hello's (a huge-page
                            // block); the others have the hello's.
                            page_size: if name != 255 && name & 0x80 != 0 {
                                hello_page_size.saturating_mul(4)
                            } else {
                                hello_page_size
                            },
                        })
                        .collect(),
                    machine: Bytes::from(machine.clone()),
                    push_streams: 1 + push % postcopy_core::MAX_PUSH_STREAMS,
                })
            }
            FrameSpec::UrgentHello { session: s, epoch: e } => {
                Frame::UrgentHello(UrgentHello { session: session(*s), epoch: epoch(*e) })
            }
            FrameSpec::Page { block, index, kind, data } => {
                let block = block_of(*block);
                let index = index.index_below(pages_in(block)) as u32;
                let kind = page_kind(*kind);
                let data = match *data {
                    PageSpec::Zero => PageData::Zero,
                    PageSpec::Fill(b) => PageData::Bytes(Bytes::from(vec![b; ctx.page_size as usize])),
                    PageSpec::Length(n) => PageData::Bytes(Bytes::from(vec![0xa5; (n as usize).max(1)])),
                };
                Frame::Page(PageFrame { address: PageAddress { block, index }, kind, data })
            }
            FrameSpec::Discard { block, ranges } => {
                let block = block_of(*block);
                let pages = pages_in(block);
                let ranges = ranges
                    .iter()
                    .map(|&(first, count)| (first.index_below(pages) as u32, count.offset_from(1) as u32))
                    .collect();
                Frame::Discard(Discard { block, ranges })
            }
            FrameSpec::DeviceState { last, len } => Frame::DeviceState {
                last: *last,
                chunk: Bytes::from(vec![0x5d; (*len as usize).min(MAX_DEVICE_STATE_CHUNK)]),
            },
            FrameSpec::StartGuest => Frame::StartGuest,
            FrameSpec::EndOfStream => Frame::EndOfStream,
            FrameSpec::Cancel(r) => Frame::Cancel { reason: reason(r) },
            FrameSpec::Ping => Frame::Ping,
            FrameSpec::Welcome { session: s, epoch: e, started, loaded, max_requests } => Frame::Welcome(Welcome {
                session: session(*s),
                epoch: epoch(*e),
                guest_started: *started,
                device_loaded: *loaded,
                max_outstanding_requests: max_requests.offset_from(0) as u32,
            }),
            FrameSpec::Request { block, indexes } => {
                let block = block_of(*block);
                let pages = pages_in(block);
                Frame::Request(Request {
                    block,
                    indexes: indexes.iter().map(|i| i.index_below(pages) as u32).collect(),
                })
            }
            FrameSpec::ReadyToRun => Frame::ReadyToRun,
            FrameSpec::Eoc => Frame::Eoc,
            FrameSpec::GuestDropped(r) => Frame::GuestDropped { reason: reason(r) },
            FrameSpec::PresentPages { first_word, words } => {
                let first_word = first_word.offset_from(ctx.next_word);
                let words = words
                    .iter()
                    .enumerate()
                    .map(|(j, w)| {
                        let base = first_word.saturating_add(j as u64).saturating_mul(64);
                        let valid = match total_pages.saturating_sub(base) {
                            0 => 0,
                            n if n >= 64 => !0,
                            n => (1u64 << n) - 1,
                        };
                        match *w {
                            WordSpec::AllValid => valid,
                            WordSpec::Empty => 0,
                            WordSpec::Raw(x) => x,
                            WordSpec::Masked(x) => x & valid,
                        }
                    })
                    .collect();
                Frame::PresentPages(PresentPages { first_word, words })
            }
            FrameSpec::PresentEnd { count } => Frame::PresentEnd { present_pages: count.offset_from(ctx.present_seen) },
            FrameSpec::Reject(r) => Frame::Reject { reason: reason(r) },
            FrameSpec::PagePart { block, index, kind, offset, len } => {
                let block = block_of(*block);
                let index = index.index_below(pages_in(block)) as u32;
                let kind = page_kind(*kind);
                let page_size = ctx.layout.and_then(|l| l.block_page_size(block)).unwrap_or(ctx.page_size);
                let len = if *len == 0 { (page_size / 2).max(1) } else { u32::from(*len) };
                let offset = match offset {
                    Num::Near(k) => u32::from(*k).wrapping_mul(len),
                    Num::Raw(x) => *x as u32,
                };
                Frame::PagePart(PagePartFrame {
                    address: PageAddress { block, index },
                    kind,
                    offset,
                    data: Bytes::from(vec![0x3c; len as usize]),
                })
            }
        }
    }
}

/// The whole frames `decoder` holds. The bytes are a core's own output, so
/// bytes that do not decode, or a partial frame left over, fail the run
/// (`what` says whose bytes they were).
pub fn take_frames(decoder: &mut Decoder, what: &dyn std::fmt::Display) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => break,
            Err(error) => panic!("{what}: undecodable bytes: {error}"),
        }
    }
    assert!(!decoder.has_partial(), "{what}: part of a frame");
    frames
}

/// Every frame in `bytes`, a core's own output in one piece.
pub fn decode_all(bytes: &[u8]) -> Vec<Frame> {
    let mut decoder = Decoder::new();
    decoder.push(Bytes::copy_from_slice(bytes));
    take_frames(&mut decoder, &"the core's own bytes")
}

/// `frame` encoded and cut in two at `split` (modulo its length plus one):
/// a peer's bytes as they may arrive, in two reads.
pub fn encode_split(frame: &Frame, split: usize) -> (Bytes, Bytes) {
    let mut bytes = Vec::new();
    wire::encode(frame, &mut bytes);
    let bytes = Bytes::from(bytes);
    let split = split % (bytes.len() + 1);
    (bytes.slice(..split), bytes.slice(split..))
}

/// A page kind from the fuzzer's byte (whole pages and parts alike).
fn page_kind(selector: u8) -> PageKind {
    match selector % 3 {
        0 => PageKind::Precopy,
        1 => PageKind::Background,
        _ => PageKind::Requested,
    }
}
