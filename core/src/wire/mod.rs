//! The wire protocol: frames, their byte layout, an encoder and an
//! incremental decoder.
//!
//! # Connections
//!
//! Each [`Channel`](crate::Channel) is its own connection, opened by the
//! source. A connection starts with an 8-byte [`Preamble`] written by the
//! source (magic `PCPC`, channel code, three zero bytes) so that the
//! destination can tell the channels apart whatever order they arrive in.
//! After the preamble, the channel's writer sends frames.
//!
//! # Frames
//!
//! All integers are big-endian. Every frame starts with an 8-byte header:
//!
//! ```text
//! 0      1      2             4                           8
//! +------+------+-------------+---------------------------+
//! | type | flags| reserved = 0| payload length (u32)      |  payload ...
//! +------+------+-------------+---------------------------+
//! ```
//!
//! The payload length has a hard upper bound per frame type (see
//! [`FrameKind::max_payload`]); the decoder rejects an oversized length as
//! soon as the header arrives, before buffering anything.
//!
//! | type | frame | channel | payload |
//! |------|-------|---------|---------|
//! | 0x01 | `Hello` | main | magic u32, version u16, flags u16 (bit 0: resume, bit 1: urgent channel, bit 2: block page sizes), session u64, epoch u32, page size u32, mode u8, precopy rounds u32, block count u16, then per block: name length u8, name (UTF-8), page count u64, and its page size u32 only when flag bit 2 is set (else the block's pages have the hello's page size); then machine description length u16 and bytes (opaque, at most 4 KiB) |
//! | 0x02 | `UrgentHello` | urgent | magic u32, version u16, reserved u16, session u64, epoch u32 |
//! | 0x03 | `Page` | main, urgent | block u32, page index u32, then the page, as many bytes as its block's page size, up to 2 MiB: larger pages cross in `PagePart` frames (absent when flag bit 0, *zero*, is set); flags bits 1-2: kind (0 precopy, 1 background, 2 requested) |
//! | 0x04 | `Discard` | main | block u32, range count u16, then per range: first page u32, page count u32 |
//! | 0x05 | `DeviceState` | main | a chunk of the opaque device state; flag bit 0: last chunk |
//! | 0x06 | `StartGuest` | main, urgent | empty |
//! | 0x07 | `EndOfStream` | main | empty |
//! | 0x08 | `Cancel` | main | UTF-8 reason |
//! | 0x09 | `Ping` | any | empty |
//! | 0x21 | `Welcome` | return | magic u32, version u16, flags u16 (bit 0: guest started, bit 1: device state loaded), session u64, epoch u32, max outstanding requests u32 |
//! | 0x22 | `Request` | return | block u32, count u16, then count page indexes u32 (the seed's PAGE / PAGE_CONT in one frame) |
//! | 0x23 | `ReadyToRun` | return | empty |
//! | 0x24 | `Eoc` | return | empty |
//! | 0x25 | `GuestDropped` | return | UTF-8 reason |
//! | 0x26 | `PresentPages` | return | first word u64, word count u16, then words u64 (bit i of word w: page 64 w + i is present) |
//! | 0x27 | `PresentEnd` | return | present page count u64 |
//! | 0x28 | `Reject` | return | UTF-8 reason |
//! | 0x0a | `PagePart` | main, urgent | block u32, page index u32, offset u32, then a part of the page (at least one byte); flags bits 1-2: kind (background or requested) |
//!
//! Fallback frames (only in a migration with fallback on; docs/fallback.md):
//!
//! | type | frame | channel | payload |
//! |------|-------|---------|---------|
//! | 0x30 | `FallbackTerms` | main, after each hello | lease ms u32 (non-zero), last committed checkpoint u64 |
//! | 0x31 | `LeaseGrant` | main, urgent | the request's sequence number u64 |
//! | 0x32 | `CheckpointAck` | main, urgent | the committed checkpoint's sequence number u64 |
//! | 0x33 | `Superseded` | main, after a resume hello | empty: the source took the guest back |
//! | 0x34 | `Released` | main, urgent | empty: the source will never take the guest back |
//! | 0x38 | `LeaseRequest` | return | sequence number u64 |
//! | 0x39 | `CheckpointBegin` | return | sequence number u64 (from 1), page count u64, device-state bytes u32 |
//! | 0x3a | `CheckpointPage` | return | block u32, page index u32, the page (flag bit 0: zero page, no bytes) |
//! | 0x3b | `CheckpointDevice` | return | a chunk (at most 64 KiB) of the checkpoint's device state |
//! | 0x3c | `CheckpointEnd` | return | sequence number u64, digest u64 |
//! | 0x3d | `ReleaseAck` | return | empty |
//!
//! # Page sizes
//!
//! Each RAM block has its own page size (a power of two from 16 bytes to
//! 1 GiB; a page larger than 2 MiB crosses only in parts, or as a zero
//! page frame); pages, requests, discards and present-page reports of a block
//! count in that block's pages. The hello's page size is the base: a hello
//! whose blocks all have it is encoded as by builds that knew one page size
//! (flag bit 2 clear, so they read it and compare page sizes as before);
//! otherwise flag bit 2 is set and every block carries its page size. A
//! build without block page sizes refuses such a hello (`ReservedBits`); the
//! flag with every block at the base size is refused (`Malformed`), so that
//! each hello has one encoding, which the fuzzer checks.
//!
//! # Page parts
//!
//! In postcopy the source may push a page larger than its part size
//! (`Config::page_part_bytes`, off by default; 128 KiB for 2 MiB pages), and
//! always a non-zero page larger than 2 MiB (a 1 GiB page: 512 parts of
//! 2 MiB, whether pushed or requested), as `PagePart` frames, so that a request for the page whose parts the push
//! is sending gets the parts not yet sent on the urgent channel instead of
//! waiting behind the push (docs/hugepages.md). The parts of a page all
//! have one length, a divisor of the page size giving at most 512 parts, at
//! offsets that are multiples of it; each crosses once (a part twice is a
//! protocol error). The destination places each part where the guest
//! cannot see it (`DestinationAction::PlacePagePart`) and makes the page
//! visible only once all have arrived (`DestinationAction::InstallPlacedPage`); it drops the parts of pages not
//! complete when a connection is lost (the page is not present, so the
//! source sends it again after the recovery).

mod decode;
mod encode;
mod error;
mod frame;

pub use decode::{Decoder, PreambleError};
pub use encode::{
    encode, encode_page_frame, encode_page_frame_unfilled, encode_page_part_unfilled, encode_preamble, is_zero_page,
};
pub use error::WireError;
pub use frame::{
    CheckpointBegin, Discard, FallbackTerms, Frame, FrameKind, Hello, PageData, PageFrame, PageKind, PagePartFrame,
    Preamble, PresentPages, Request, UrgentHello, Welcome, WireMode, HEADER_LEN, MAGIC, MAX_DEVICE_STATE_CHUNK,
    MAX_DISCARD_RANGES, MAX_MACHINE_LEN, MAX_PAGE_PARTS, MAX_PRESENT_WORDS, MAX_REASON_LEN, MAX_REQUEST_PAGES,
    PREAMBLE_LEN, PREAMBLE_MAGIC, PROTOCOL_VERSION,
};

#[cfg(test)]
mod tests;
