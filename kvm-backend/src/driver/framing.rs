//! Cutting a received byte stream at frame boundaries before it reaches the
//! core.
//!
//! The core's decoder slices frames that lie whole in one piece of input
//! without copying, and copies a frame that spans pieces into one buffer,
//! under the core lock. With 2 MiB pages nearly every page frame spans the
//! reads (256 KiB on the main channel), so the main reader held the lock
//! for a copy of every bulk page, a 256 KiB piece at a time, and the urgent
//! reader, which needs the lock for each piece of a requested page, waited
//! behind it. [`read_frames_until_closed`] receives a spanning frame
//! straight into a buffer of its size, outside the lock, and passes the core
//! only whole frames.
//!
//! It reads the header's type and length only to know where the frame ends;
//! a header the core would refuse (unknown type, payload over the type's
//! bound) stops the alignment and lets every later byte through as it came,
//! so that the core sees the same bytes and gives the same error.

use bytes::{Bytes, BytesMut};
use postcopy_core::wire::{FrameKind, HEADER_LEN};
use std::time::Duration;

use super::net::Connection;

/// The length of the frame whose header starts `bytes`; None when the
/// header is incomplete, Err when the core would refuse it.
fn frame_len(bytes: &[u8]) -> Option<Result<usize, ()>> {
    let header = bytes.get(..HEADER_LEN)?;
    let Some(kind) = FrameKind::from_code(header[0]) else { return Some(Err(())) };
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len > kind.max_payload() {
        return Some(Err(()));
    }
    Some(Ok(HEADER_LEN + len as usize))
}

/// Received bytes, cut at frame boundaries (see the module docs).
#[derive(Debug, Default)]
pub struct FrameAligner {
    /// Received bytes not handed on yet: the start of a frame.
    buf: BytesMut,
    /// A header the core will refuse was seen: pass bytes through.
    passthrough: bool,
}

impl FrameAligner {
    /// How many bytes the next receive should take at most (`max` is the
    /// reader's usual size): when a frame larger than that has begun, the
    /// rest of it, which lands in place, whole, in room reserved for it.
    fn next_read(&mut self, max: usize) -> usize {
        match frame_len(&self.buf) {
            Some(Ok(len)) if !self.passthrough && len > self.buf.len() + max => {
                self.buf.reserve(len - self.buf.len());
                len - self.buf.len()
            }
            _ => max,
        }
    }

    /// The whole frames at the front of what was received, in one piece (or,
    /// after a refused header, everything); the rest waits for more bytes.
    fn take(&mut self) -> Option<Bytes> {
        if self.passthrough {
            return (!self.buf.is_empty()).then(|| self.buf.split().freeze());
        }
        let mut at = 0;
        loop {
            match frame_len(&self.buf[at..]) {
                Some(Ok(len)) if at + len <= self.buf.len() => at += len,
                Some(Err(())) => {
                    self.passthrough = true;
                    return Some(self.buf.split().freeze());
                }
                _ => break,
            }
        }
        (at > 0).then(|| self.buf.split_to(at).freeze())
    }

    /// Takes a piece received elsewhere (tests, other readers): returns what
    /// [`FrameAligner::take`] has then.
    pub fn push(&mut self, bytes: &[u8]) -> Option<Bytes> {
        self.buf.extend_from_slice(bytes);
        self.take()
    }
}

/// As `net::read_until_closed`, but `on_bytes` gets whole frames only: a
/// frame that spans reads is received straight into one buffer of its size
/// (no copy, no core lock), and handed on once complete.
pub fn read_frames_until_closed(
    conn: &Connection,
    max: usize,
    spin: Duration,
    mut on_bytes: impl FnMut(Bytes) -> bool,
    on_closed: impl FnOnce(),
) {
    let mut aligner = FrameAligner::default();
    loop {
        let want = aligner.next_read(max);
        match conn.recv(&mut aligner.buf, want, spin) {
            Ok(0) | Err(_) => {
                on_closed();
                return;
            }
            Ok(_) => {
                if let Some(frames) = aligner.take() {
                    if !on_bytes(frames) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postcopy_core::wire::{encode, encode_page_frame, Decoder, Frame, PageKind};
    use postcopy_core::PageAddress;

    fn stream() -> Vec<u8> {
        let mut out = Vec::new();
        encode(&Frame::Ping, &mut out);
        encode_page_frame(&mut out, PageAddress { block: 0, index: 1 }, PageKind::Background, 2 << 20, |b| b.fill(7));
        encode(&Frame::Eoc, &mut out);
        encode_page_frame(&mut out, PageAddress { block: 0, index: 2 }, PageKind::Requested, 4096, |b| b.fill(9));
        out
    }

    fn frames_of(pieces: &[Bytes]) -> Vec<Frame> {
        let mut d = Decoder::new();
        let mut frames = Vec::new();
        for p in pieces {
            d.push(p.clone());
            while let Some(f) = d.next_frame().expect("valid frames") {
                frames.push(f);
            }
        }
        assert!(!d.has_partial());
        frames
    }

    #[test]
    fn pieces_are_whole_frames_whatever_the_reads() {
        let all = stream();
        let expected = frames_of(&[Bytes::from(all.clone())]);
        for read in [1, 7, 8, 9, 4096, 65536, 256 << 10, all.len()] {
            let mut aligner = FrameAligner::default();
            let mut pieces = Vec::new();
            for chunk in all.chunks(read) {
                if let Some(piece) = aligner.push(chunk) {
                    // Every piece starts and ends on a frame boundary.
                    let mut d = Decoder::new();
                    d.push(piece.clone());
                    while d.next_frame().expect("a whole frame").is_some() {}
                    assert!(!d.has_partial(), "read size {read}: a piece ends inside a frame");
                    pieces.push(piece);
                }
            }
            assert_eq!(frames_of(&pieces), expected, "read size {read}");
        }
    }

    #[test]
    fn a_refused_header_lets_the_bytes_through() {
        let mut aligner = FrameAligner::default();
        let mut bytes = Vec::new();
        encode(&Frame::Ping, &mut bytes);
        bytes.extend_from_slice(&[0x7f, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        let out = aligner.push(&bytes);
        assert_eq!(out.as_deref(), Some(&bytes[..]), "nothing is held back or changed");
        assert_eq!(aligner.push(b"later").as_deref(), Some(&b"later"[..]));
        // An oversized length is refused from the header alone: nothing is reserved for it.
        let mut aligner = FrameAligner::default();
        let mut header = vec![FrameKind::Page.code(), 0, 0, 0];
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(aligner.push(&header).as_deref(), Some(&header[..]));
        assert_eq!(aligner.next_read(4096), 4096);
    }

    #[test]
    fn a_large_frame_is_read_in_place() {
        let all = stream();
        let mut aligner = FrameAligner::default();
        // The ping and the page frame's header arrive first.
        assert!(aligner.push(&all[..HEADER_LEN + HEADER_LEN + 3]).is_some(), "the ping goes at once");
        let rest = (HEADER_LEN + 8 + (2 << 20)) - (HEADER_LEN + 3);
        assert_eq!(aligner.next_read(64 << 10), rest, "the next read takes the rest of the page frame");
        assert!(aligner.buf.capacity() >= HEADER_LEN + 8 + (2 << 20), "room for all of it");
        // A small frame begun: the usual read size.
        let mut aligner = FrameAligner::default();
        assert!(aligner.push(&all[(HEADER_LEN + HEADER_LEN + 8 + (2 << 20) + HEADER_LEN)..][..20]).is_none());
        assert_eq!(aligner.next_read(64 << 10), 64 << 10);
    }
}
