//! Cutting a received byte stream at frame boundaries before it reaches the
//! core.
//!
//! The core's decoder slices frames that lie whole in one piece of input
//! without copying, and copies a frame that spans pieces into one buffer,
//! under the core lock. With 2 MiB pages nearly every page frame spans the
//! reads (256 KiB on the main channel), so the main reader held the lock
//! for a copy of every bulk page, a 256 KiB piece at a time, and the urgent
//! reader, which needs the lock for each piece of a requested page, waited
//! behind it. A [`FrameAligner`] in each reader thread assembles a spanning
//! frame itself, outside the lock, and passes the core only whole frames.
//!
//! It reads the header's type and length only to know where the frame ends;
//! a header the core would refuse (unknown type, payload over the type's
//! bound) stops the alignment and lets every later byte through as it came,
//! so that the core sees the same bytes and gives the same error.

use bytes::{Buf, Bytes, BytesMut};
use postcopy_core::wire::{FrameKind, HEADER_LEN};

/// Splits a stream into runs of whole frames (see the module docs).
#[derive(Debug, Default)]
pub struct FrameAligner {
    /// The start of a frame that spans pieces.
    partial: BytesMut,
    /// A header the core will refuse was seen: pass bytes through.
    passthrough: bool,
}

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

impl FrameAligner {
    /// Takes the next piece read; returns the pieces to hand the core, each
    /// a run of whole frames (or, after a refused header, raw bytes).
    pub fn push(&mut self, mut bytes: Bytes) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.passthrough {
            out.push(bytes);
            return out;
        }
        // Finish the spanning frame first.
        while !self.partial.is_empty() && !bytes.is_empty() {
            let wanted = match frame_len(&self.partial) {
                None => HEADER_LEN,
                Some(Ok(len)) => len,
                Some(Err(())) => return self.give_up(bytes, out),
            };
            if self.partial.capacity() < wanted {
                self.partial.reserve(wanted - self.partial.len());
            }
            let take = (wanted - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..take]);
            bytes.advance(take);
            if frame_len(&self.partial) == Some(Ok(self.partial.len())) {
                out.push(self.partial.split().freeze());
            }
        }
        // Whole frames in what is left go as one slice, the tail waits.
        let mut at = 0;
        loop {
            match frame_len(&bytes[at..]) {
                Some(Ok(len)) if at + len <= bytes.len() => at += len,
                Some(Err(())) => {
                    if at > 0 {
                        out.push(bytes.split_to(at));
                    }
                    return self.give_up(bytes, out);
                }
                _ => break,
            }
        }
        if at > 0 {
            out.push(bytes.split_to(at));
        }
        if !bytes.is_empty() {
            if let Some(Ok(len)) = frame_len(&bytes) {
                self.partial.reserve(len);
            }
            self.partial.extend_from_slice(&bytes);
        }
        out
    }

    /// A header the core refuses: everything held and later goes through.
    fn give_up(&mut self, rest: Bytes, mut out: Vec<Bytes>) -> Vec<Bytes> {
        self.passthrough = true;
        if !self.partial.is_empty() {
            out.push(self.partial.split().freeze());
        }
        if !rest.is_empty() {
            out.push(rest);
        }
        out
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
                for piece in aligner.push(Bytes::copy_from_slice(chunk)) {
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
        let out = aligner.push(Bytes::from(bytes.clone()));
        assert_eq!(out.concat(), bytes, "nothing is held back or changed");
        assert_eq!(aligner.push(Bytes::from_static(b"later")), vec![Bytes::from_static(b"later")]);
        // An oversized length is refused from the header alone: nothing is reserved for it.
        let mut aligner = FrameAligner::default();
        let mut header = vec![FrameKind::Page.code(), 0, 0, 0];
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(aligner.push(Bytes::from(header.clone())), vec![Bytes::from(header)]);
        assert_eq!(aligner.partial.capacity(), 0);
    }
}
