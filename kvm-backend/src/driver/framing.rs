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
//!
//! A large receive lands in memory the aligner keeps: it holds on to the
//! allocations of past large frames and reuses one once the core dropped
//! its frame, and on huge-page RAM the readers touch a few such buffers
//! before the first page arrives ([`FrameAligner::warmed`]). A fresh 2 MiB
//! buffer costs 512 first touches, and the first pages after the
//! switchover (the first fault's, the push's first) landed in fresh ones.

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

/// The rest of a frame of at least this many bytes goes to a kept buffer.
const LARGE_READ: usize = 1 << 20;
/// Allocations of large receives an aligner keeps for reuse.
const KEPT_BUFFERS: usize = 4;

/// Received bytes, cut at frame boundaries (see the module docs).
#[derive(Debug, Default)]
pub struct FrameAligner {
    /// Received bytes not handed on yet: the start of a frame.
    buf: BytesMut,
    /// A header the core will refuse was seen: pass bytes through.
    passthrough: bool,
    /// Empty handles on the allocations of large receives: one whose
    /// frames were all dropped can be reclaimed whole for the next.
    kept: Vec<BytesMut>,
    /// `buf` is one of the kept allocations (a large frame is arriving).
    in_kept: bool,
}

impl FrameAligner {
    /// An aligner with `count` buffers of `bytes` each, allocated and
    /// touched now, so that the first large receives land in memory that
    /// is already there.
    pub fn warmed(bytes: usize, count: usize) -> Self {
        let mut aligner = Self::default();
        for _ in 0..count.min(KEPT_BUFFERS) {
            let mut handle = BytesMut::with_capacity(bytes);
            let mut room = handle.split_off(0);
            room.resize(bytes, 0);
            std::hint::black_box(&room);
            aligner.kept.push(handle);
        }
        aligner
    }

    /// How many bytes the next receive should take at most (`max` is the
    /// reader's usual size): when a frame larger than that has begun, the
    /// rest of it, which lands in place, whole, in room reserved for it.
    fn next_read(&mut self, max: usize) -> usize {
        match frame_len(&self.buf) {
            Some(Ok(len)) if !self.passthrough && len > self.buf.len() + max => {
                let rest = len - self.buf.len();
                if rest >= LARGE_READ {
                    self.make_room(rest);
                } else {
                    self.buf.reserve(rest);
                }
                rest
            }
            // The end of a large frame: no more than its rest, which fits
            // in the room made for it (a larger read would move the whole
            // frame to a new allocation to make room for what follows).
            Some(Ok(len)) if self.in_kept && len > self.buf.len() => len - self.buf.len(),
            _ => max,
        }
    }

    /// Room for `additional` more bytes in `buf`: its own spare room, else
    /// a kept allocation no frame uses any more, else a new one (kept too).
    fn make_room(&mut self, additional: usize) {
        if self.buf.try_reclaim(additional) {
            return;
        }
        let len = self.buf.len() + additional;
        let mut room = match self.kept.iter_mut().position(|k| k.try_reclaim(len)) {
            // The whole allocation; the handle stays behind, empty.
            Some(i) => self.kept[i].split_off(0),
            None => {
                let mut handle = BytesMut::with_capacity(len);
                let room = handle.split_off(0);
                if self.kept.len() == KEPT_BUFFERS {
                    self.kept.remove(0);
                }
                self.kept.push(handle);
                room
            }
        };
        // The start of the frame, a header and what came with it.
        room.extend_from_slice(&self.buf);
        self.buf = room;
        self.in_kept = true;
    }

    /// Once a large frame was taken: the bytes after it move out of its
    /// kept allocation, so that nothing but the frame holds it and it can
    /// be reclaimed as soon as the core dropped the frame.
    fn leave_kept(&mut self) {
        if std::mem::take(&mut self.in_kept) {
            let rest = std::mem::take(&mut self.buf);
            self.buf.extend_from_slice(&rest);
        }
    }

    /// The whole frames at the front of what was received, in one piece (or,
    /// after a refused header, everything); the rest waits for more bytes.
    fn take(&mut self) -> Option<Bytes> {
        if self.passthrough {
            let all = (!self.buf.is_empty()).then(|| self.buf.split().freeze());
            self.leave_kept();
            return all;
        }
        let mut at = 0;
        loop {
            match frame_len(&self.buf[at..]) {
                Some(Ok(len)) if at + len <= self.buf.len() => at += len,
                Some(Err(())) => {
                    self.passthrough = true;
                    let all = self.buf.split().freeze();
                    self.leave_kept();
                    return Some(all);
                }
                _ => break,
            }
        }
        if at == 0 {
            return None;
        }
        let frames = self.buf.split_to(at).freeze();
        self.leave_kept();
        Some(frames)
    }

    /// Takes a piece received elsewhere (tests, other readers): returns what
    /// `FrameAligner::take` has then.
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
    mut aligner: FrameAligner,
    mut on_bytes: impl FnMut(Bytes) -> bool,
    on_closed: impl FnOnce(),
) {
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

    /// Receives `stream` as a reader does, in pieces of at most `piece`
    /// bytes (what the socket has), each read no larger than the aligner
    /// asks; returns the frames handed on.
    fn receive(aligner: &mut FrameAligner, stream: &[u8], max: usize, piece: usize) -> Vec<Bytes> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < stream.len() {
            let n = aligner.next_read(max).min(piece).min(stream.len() - at);
            // As recv_into: room for the read first, then the bytes.
            aligner.buf.reserve(n);
            aligner.buf.extend_from_slice(&stream[at..at + n]);
            at += n;
            out.extend(aligner.take());
        }
        out
    }

    fn huge_page(index: u32, fill: u8) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&Frame::Ping, &mut out);
        encode_page_frame(&mut out, PageAddress { block: 0, index }, PageKind::Background, 2 << 20, |b| b.fill(fill));
        out
    }

    #[test]
    fn large_frames_land_in_the_warm_buffers_and_reuse_them() {
        let mut aligner = FrameAligner::warmed((2 << 20) + (64 << 10), 2);
        let warm: Vec<usize> = aligner.kept.iter().map(|k| k.as_ptr() as usize).collect();
        let page_frame = |pieces: &[Bytes]| pieces.iter().find(|p| p.len() > 1 << 20).cloned().expect("the page");
        // Reads of 256 KiB at most, as the main channel's socket gives them.
        let first = receive(&mut aligner, &huge_page(1, 1), 256 << 10, 256 << 10);
        let held = page_frame(&first);
        assert!(warm.contains(&(held.as_ptr() as usize)), "the first page lands in a warm buffer");
        assert_eq!(frames_of(&first).len(), 2);
        // While the first page is held, the second takes the other buffer.
        let second = receive(&mut aligner, &huge_page(2, 2), 256 << 10, 256 << 10);
        let other = page_frame(&second);
        assert!(warm.contains(&(other.as_ptr() as usize)));
        assert_ne!(other.as_ptr(), held.as_ptr(), "a buffer still held is not written over");
        assert!(held[HEADER_LEN + 8..].iter().all(|&b| b == 1), "the held page is intact");
        // Once dropped, a page's buffer serves again: no new allocation.
        let again = held.as_ptr() as usize;
        drop((first, held));
        let third = receive(&mut aligner, &huge_page(3, 3), 256 << 10, 256 << 10);
        assert_eq!(page_frame(&third).as_ptr() as usize, again);
        assert_eq!(aligner.kept.len(), 2, "nothing allocated besides the warm buffers");
        assert_eq!(frames_of(&third).len(), 2);
    }

    #[test]
    fn the_end_of_a_large_frame_is_read_alone() {
        // A small frame right behind a large one: the last read of the large
        // frame stops at its end, so that the frame stays where it landed.
        let mut all = huge_page(1, 1);
        encode(&Frame::Eoc, &mut all);
        let mut aligner = FrameAligner::warmed((2 << 20) + (64 << 10), 1);
        let warm = aligner.kept[0].as_ptr() as usize;
        let pieces = receive(&mut aligner, &all, 256 << 10, 256 << 10);
        assert!(pieces.iter().any(|p| p.as_ptr() as usize == warm && p.len() > 1 << 20));
        assert_eq!(frames_of(&pieces), frames_of(&[Bytes::from(all)]));
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
