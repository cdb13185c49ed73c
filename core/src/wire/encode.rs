//! The encoder. Frames are appended to a caller's buffer; the hot path (a page
//! frame) reads the page straight into that buffer, with no copy in between.

use super::frame::*;
use crate::channel::Channel;
use crate::layout::PageAddress;

/// Appends a frame header, returning the position of its length field.
fn begin(out: &mut Vec<u8>, kind: FrameKind, flags: u8) -> usize {
    out.push(kind.code());
    out.push(flags);
    out.extend_from_slice(&[0, 0]);
    let length_at = out.len();
    out.extend_from_slice(&[0; 4]);
    length_at
}

/// Writes the payload length now that the payload is appended.
fn finish(out: &mut [u8], length_at: usize, kind: FrameKind) {
    let len = out.len() - length_at - 4;
    debug_assert!(len <= kind.max_payload() as usize, "{kind} payload of {len} bytes exceeds its limit");
    out[length_at..length_at + 4].copy_from_slice(&(len as u32).to_be_bytes());
}

fn put_reason(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(truncate_reason(reason).as_bytes());
}

/// Appends the 8-byte preamble that opens a connection for `channel`.
pub fn encode_preamble(out: &mut Vec<u8>, channel: Channel) {
    out.extend_from_slice(&PREAMBLE_MAGIC.to_be_bytes());
    out.extend_from_slice(&[channel.code(), 0, 0, 0]);
}

/// Appends a page frame whose payload `fill` writes in place (`page_size`
/// bytes). An all-zero page is sent as a flag with no payload. Returns
/// whether the page was zero.
pub fn encode_page_frame(
    out: &mut Vec<u8>,
    address: PageAddress,
    kind: PageKind,
    page_size: usize,
    fill: impl FnOnce(&mut [u8]),
) -> bool {
    let start = out.len();
    let data_at = page_frame_with_room(out, address, kind, page_size, false);
    fill(&mut out[data_at..]);
    let zero = is_zero_page(&out[data_at..]);
    if zero {
        out.truncate(data_at);
        out[start + 1] |= PAGE_FLAG_ZERO;
        finish(out, start + 4, FrameKind::Page);
    }
    zero
}

/// Appends a page frame whose payload the caller writes later: a zero page
/// is a flag with no payload (None); otherwise `page_size` bytes are
/// reserved at the returned offset, to be filled before `out` is sent.
pub fn encode_page_frame_unfilled(
    out: &mut Vec<u8>,
    address: PageAddress,
    kind: PageKind,
    page_size: usize,
    zero: bool,
) -> Option<usize> {
    let data_at = page_frame_with_room(out, address, kind, page_size, zero);
    (!zero).then_some(data_at)
}

/// Appends a page part frame with `len` bytes of room for the part, which
/// the caller writes at the returned offset of `out` before sending it.
pub fn encode_page_part_unfilled(
    out: &mut Vec<u8>,
    address: PageAddress,
    kind: PageKind,
    offset: u32,
    len: usize,
) -> usize {
    let length_at = begin(out, FrameKind::PagePart, kind.code() << PAGE_KIND_SHIFT);
    out.extend_from_slice(&address.block.to_be_bytes());
    out.extend_from_slice(&address.index.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    let data_at = out.len();
    out.resize(data_at + len, 0);
    finish(out, length_at, FrameKind::PagePart);
    data_at
}

/// A whole page frame with `page_size` zero bytes of room for the payload
/// (none when `zero`); returns where the payload starts.
fn page_frame_with_room(
    out: &mut Vec<u8>,
    address: PageAddress,
    kind: PageKind,
    page_size: usize,
    zero: bool,
) -> usize {
    let flags = kind.code() << PAGE_KIND_SHIFT | if zero { PAGE_FLAG_ZERO } else { 0 };
    let length_at = begin(out, FrameKind::Page, flags);
    out.extend_from_slice(&address.block.to_be_bytes());
    out.extend_from_slice(&address.index.to_be_bytes());
    let data_at = out.len();
    if !zero {
        out.resize(data_at + page_size, 0);
    }
    finish(out, length_at, FrameKind::Page);
    data_at
}

/// Whether every byte is zero (a word at a time: this runs on every page sent).
pub fn is_zero_page(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    words.map(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])).all(|w| w == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Appends `frame` to `out`.
///
/// The caller keeps each frame within its wire limits (block counts, request
/// batch sizes, chunk sizes); the core's own senders always do.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let kind = frame.kind();
    match frame {
        Frame::Hello(hello) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&MAGIC.to_be_bytes());
            out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            let mut flags = 0;
            if hello.resume {
                flags |= HELLO_FLAG_RESUME;
            }
            if hello.urgent_channel {
                flags |= HELLO_FLAG_URGENT;
            }
            // Page sizes per block only when one differs from the hello's:
            // a uniform layout keeps the encoding older builds read.
            let block_page_sizes = hello.blocks.iter().any(|b| b.page_size != hello.page_size);
            if block_page_sizes {
                flags |= HELLO_FLAG_BLOCK_PAGE_SIZES;
            }
            // One push stream keeps the encoding older builds read.
            let push_streams = hello.push_streams > 1;
            if push_streams {
                flags |= HELLO_FLAG_PUSH_STREAMS;
            }
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&hello.session.to_be_bytes());
            out.extend_from_slice(&hello.epoch.to_be_bytes());
            out.extend_from_slice(&hello.page_size.to_be_bytes());
            out.push(match hello.mode {
                WireMode::Postcopy => 0,
                WireMode::Hybrid => 1,
            });
            out.extend_from_slice(&hello.precopy_rounds.to_be_bytes());
            out.extend_from_slice(&(hello.blocks.len() as u16).to_be_bytes());
            for block in &hello.blocks {
                out.push(block.name.len() as u8);
                out.extend_from_slice(block.name.as_bytes());
                out.extend_from_slice(&block.page_count.to_be_bytes());
                if block_page_sizes {
                    out.extend_from_slice(&block.page_size.to_be_bytes());
                }
            }
            out.extend_from_slice(&(hello.machine.len() as u16).to_be_bytes());
            out.extend_from_slice(&hello.machine);
            if push_streams {
                out.push(hello.push_streams);
            }
            finish(out, at, kind);
        }
        Frame::UrgentHello(hello) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&MAGIC.to_be_bytes());
            out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
            out.extend_from_slice(&hello.session.to_be_bytes());
            out.extend_from_slice(&hello.epoch.to_be_bytes());
            finish(out, at, kind);
        }
        Frame::Page(page) => {
            let mut flags = page.kind.code() << PAGE_KIND_SHIFT;
            if page.data == PageData::Zero {
                flags |= PAGE_FLAG_ZERO;
            }
            let at = begin(out, kind, flags);
            out.extend_from_slice(&page.address.block.to_be_bytes());
            out.extend_from_slice(&page.address.index.to_be_bytes());
            if let PageData::Bytes(bytes) = &page.data {
                out.extend_from_slice(bytes);
            }
            finish(out, at, kind);
        }
        Frame::PagePart(part) => {
            let at = begin(out, kind, part.kind.code() << PAGE_KIND_SHIFT);
            out.extend_from_slice(&part.address.block.to_be_bytes());
            out.extend_from_slice(&part.address.index.to_be_bytes());
            out.extend_from_slice(&part.offset.to_be_bytes());
            out.extend_from_slice(&part.data);
            finish(out, at, kind);
        }
        Frame::Discard(discard) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&discard.block.to_be_bytes());
            out.extend_from_slice(&(discard.ranges.len() as u16).to_be_bytes());
            for (first, count) in &discard.ranges {
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
            finish(out, at, kind);
        }
        Frame::DeviceState { last, chunk } => {
            let at = begin(out, kind, if *last { DEVICE_STATE_FLAG_LAST } else { 0 });
            out.extend_from_slice(chunk);
            finish(out, at, kind);
        }
        Frame::StartGuest
        | Frame::EndOfStream
        | Frame::Ping
        | Frame::ReadyToRun
        | Frame::Eoc
        | Frame::Superseded
        | Frame::Released
        | Frame::ReleaseAck => {
            let at = begin(out, kind, 0);
            finish(out, at, kind);
        }
        Frame::Cancel { reason } | Frame::GuestDropped { reason } | Frame::Reject { reason } => {
            let at = begin(out, kind, 0);
            put_reason(out, reason);
            finish(out, at, kind);
        }
        Frame::Welcome(welcome) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&MAGIC.to_be_bytes());
            out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            let mut flags = 0;
            if welcome.guest_started {
                flags |= WELCOME_FLAG_STARTED;
            }
            if welcome.device_loaded {
                flags |= WELCOME_FLAG_LOADED;
            }
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&welcome.session.to_be_bytes());
            out.extend_from_slice(&welcome.epoch.to_be_bytes());
            out.extend_from_slice(&welcome.max_outstanding_requests.to_be_bytes());
            finish(out, at, kind);
        }
        Frame::Request(request) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&request.block.to_be_bytes());
            out.extend_from_slice(&(request.indexes.len() as u16).to_be_bytes());
            for index in &request.indexes {
                out.extend_from_slice(&index.to_be_bytes());
            }
            finish(out, at, kind);
        }
        Frame::PresentPages(present) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&present.first_word.to_be_bytes());
            out.extend_from_slice(&(present.words.len() as u16).to_be_bytes());
            for word in &present.words {
                out.extend_from_slice(&word.to_be_bytes());
            }
            finish(out, at, kind);
        }
        Frame::PresentEnd { present_pages } => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&present_pages.to_be_bytes());
            finish(out, at, kind);
        }
        Frame::FallbackTerms(terms) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&terms.lease_ms.to_be_bytes());
            out.extend_from_slice(&terms.committed_checkpoint.to_be_bytes());
            finish(out, at, kind);
        }
        Frame::LeaseGrant { seq } | Frame::CheckpointAck { seq } | Frame::LeaseRequest { seq } => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&seq.to_be_bytes());
            finish(out, at, kind);
        }
        Frame::CheckpointBegin(checkpoint) => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&checkpoint.seq.to_be_bytes());
            out.extend_from_slice(&checkpoint.pages.to_be_bytes());
            out.extend_from_slice(&checkpoint.device_bytes.to_be_bytes());
            finish(out, at, kind);
        }
        Frame::CheckpointPage { address, data } => {
            let at = begin(out, kind, if *data == PageData::Zero { PAGE_FLAG_ZERO } else { 0 });
            out.extend_from_slice(&address.block.to_be_bytes());
            out.extend_from_slice(&address.index.to_be_bytes());
            if let PageData::Bytes(bytes) = data {
                out.extend_from_slice(bytes);
            }
            finish(out, at, kind);
        }
        Frame::CheckpointDevice { chunk } => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(chunk);
            finish(out, at, kind);
        }
        Frame::CheckpointEnd { seq, digest } => {
            let at = begin(out, kind, 0);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&digest.to_be_bytes());
            finish(out, at, kind);
        }
    }
}
