//! The incremental decoder: bytes in chunks of any size, frames out.
//!
//! Frames that lie whole inside one received chunk are sliced out of it
//! without a copy (a page's bytes stay in the receive buffer until they are
//! installed). Only a frame that straddles chunks is assembled in a buffer,
//! and that buffer never exceeds the frame's bounded length.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use thiserror::Error;

use super::error::WireError;
use super::frame::*;
use crate::channel::{Channel, MAX_PUSH_STREAMS};
use crate::layout::{PageAddress, RamBlock, MAX_BLOCKS};

/// A frame header, checked.
#[derive(Clone, Copy, Debug)]
struct Header {
    kind: FrameKind,
    flags: u8,
    payload_len: usize,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Header, WireError> {
        let kind = FrameKind::from_code(bytes[0]).ok_or(WireError::UnknownFrameType(bytes[0]))?;
        let flags = bytes[1];
        if bytes[2] != 0 || bytes[3] != 0 || flags & !kind.allowed_flags() != 0 {
            return Err(WireError::ReservedBits { kind });
        }
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len > kind.max_payload() {
            return Err(WireError::FrameTooLarge { kind, len, max: kind.max_payload() });
        }
        Ok(Header { kind, flags, payload_len: len as usize })
    }

    fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }
}

/// Turns a byte stream into frames. One decoder per connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Decoder {
    /// Received chunks not yet consumed.
    pending: VecDeque<Bytes>,
    /// The start of a frame that spans chunks.
    partial: BytesMut,
    /// Set after an error: the stream's framing is lost for good.
    failed: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.pending.push_back(bytes);
        }
    }

    /// Whether bytes are buffered that do not yet form a frame.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty() || self.pending.iter().any(|b| !b.is_empty())
    }

    /// The next complete frame; `Ok(None)` when more bytes are needed.
    ///
    /// After an error every later call fails with
    /// [`WireError::Desynchronized`]: a corrupt stream cannot be re-framed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.failed {
            return Err(WireError::Desynchronized);
        }
        let result = self.next_frame_inner();
        if result.is_err() {
            self.failed = true;
            self.pending.clear();
            self.partial = BytesMut::new();
        }
        result
    }

    fn next_frame_inner(&mut self) -> Result<Option<Frame>, WireError> {
        // Fast path: a whole frame inside the first chunk, sliced out without copying.
        if self.partial.is_empty() {
            while self.pending.front().is_some_and(|b| b.is_empty()) {
                self.pending.pop_front();
            }
            if let Some(front) = self.pending.front_mut() {
                if front.len() >= HEADER_LEN {
                    let header = Header::parse(&front[..HEADER_LEN])?;
                    if front.len() >= header.frame_len() {
                        let mut frame = front.split_to(header.frame_len());
                        if front.is_empty() {
                            self.pending.pop_front();
                        }
                        frame.advance(HEADER_LEN);
                        return parse_payload(header, frame).map(Some);
                    }
                }
            }
        }
        // Slow path: assemble the frame across chunks. The header is checked
        // as soon as it is complete, before any of the payload is buffered.
        loop {
            let header =
                if self.partial.len() >= HEADER_LEN { Some(Header::parse(&self.partial[..HEADER_LEN])?) } else { None };
            let wanted = header.map_or(HEADER_LEN, |h| h.frame_len());
            if let Some(header) = header.filter(|h| self.partial.len() == h.frame_len()) {
                let mut frame = self.partial.split().freeze();
                frame.advance(HEADER_LEN);
                return parse_payload(header, frame).map(Some);
            }
            if header.is_some() {
                // One allocation for all of the frame that has arrived, but
                // never for bytes a header merely claims: a peer that sends
                // headers of 2 MiB frames and stalls would otherwise hold
                // 2 MiB of ours per header. (The KVM driver hands the core
                // whole frames, so a spanning 2 MiB page is not its hot path.)
                let buffered: usize = self.pending.iter().map(Bytes::len).sum();
                self.partial.reserve((wanted - self.partial.len()).min(buffered));
            }
            let Some(front) = self.pending.front_mut() else {
                return Ok(None);
            };
            let take = (wanted - self.partial.len()).min(front.len());
            self.partial.extend_from_slice(&front[..take]);
            front.advance(take);
            if front.is_empty() {
                self.pending.pop_front();
            }
        }
    }
}

/// Reads the fields of one payload, failing on truncation.
struct Reader {
    kind: FrameKind,
    buf: Bytes,
}

impl Reader {
    fn truncated(&self) -> WireError {
        WireError::Truncated { kind: self.kind }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        if self.buf.len() < N {
            return Err(self.truncated());
        }
        let mut out = [0; N];
        self.buf.copy_to_slice(&mut out);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn take(&mut self, n: usize) -> Result<Bytes, WireError> {
        if self.buf.len() < n {
            return Err(self.truncated());
        }
        Ok(self.buf.split_to(n))
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes { kind: self.kind, extra: self.buf.len() })
        }
    }

    fn malformed(&self, what: &str) -> WireError {
        WireError::Malformed { kind: self.kind, what: what.to_owned() }
    }

    fn magic_and_version(&mut self) -> Result<(), WireError> {
        let magic = self.u32()?;
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = self.u16()?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion { got: version, supported: PROTOCOL_VERSION });
        }
        Ok(())
    }

    fn reason(&mut self) -> Result<String, WireError> {
        let bytes = self.rest();
        String::from_utf8(bytes.to_vec()).map_err(|_| self.malformed("reason is not UTF-8"))
    }
}

fn parse_payload(header: Header, payload: Bytes) -> Result<Frame, WireError> {
    let kind = header.kind;
    let mut r = Reader { kind, buf: payload };
    let frame = match kind {
        FrameKind::Hello => {
            r.magic_and_version()?;
            let flags = r.u16()?;
            if flags & !(HELLO_FLAG_RESUME | HELLO_FLAG_URGENT | HELLO_FLAG_BLOCK_PAGE_SIZES | HELLO_FLAG_PUSH_STREAMS)
                != 0
            {
                return Err(WireError::ReservedBits { kind });
            }
            let session = r.u64()?;
            let epoch = r.u32()?;
            let page_size = r.u32()?;
            let mode = match r.u8()? {
                0 => WireMode::Postcopy,
                1 => WireMode::Hybrid,
                _ => return Err(r.malformed("unknown mode")),
            };
            let precopy_rounds = r.u32()?;
            let count = r.u16()? as usize;
            if count == 0 || count > MAX_BLOCKS {
                return Err(r.malformed("block count out of range"));
            }
            let mut blocks = Vec::with_capacity(count);
            for _ in 0..count {
                let name_len = r.u8()? as usize;
                let name = r.take(name_len)?;
                let name = String::from_utf8(name.to_vec()).map_err(|_| r.malformed("block name is not UTF-8"))?;
                if name.is_empty() {
                    return Err(r.malformed("empty block name"));
                }
                let page_count = r.u64()?;
                // Without the flag every block has the hello's page size
                // (the encoding of builds that knew no other).
                let block_page_size = if flags & HELLO_FLAG_BLOCK_PAGE_SIZES != 0 { r.u32()? } else { page_size };
                blocks.push(RamBlock { name, page_count, page_size: block_page_size });
            }
            // One encoding per hello: the flag means some block differs.
            if flags & HELLO_FLAG_BLOCK_PAGE_SIZES != 0 && blocks.iter().all(|b| b.page_size == page_size) {
                return Err(r.malformed("block page sizes sent though every block has the hello's"));
            }
            let machine_len = r.u16()? as usize;
            if machine_len > MAX_MACHINE_LEN {
                return Err(r.malformed("machine description too long"));
            }
            let machine = r.take(machine_len)?;
            let push_streams = if flags & HELLO_FLAG_PUSH_STREAMS != 0 {
                let streams = r.u8()?;
                if !(2..=MAX_PUSH_STREAMS).contains(&streams) {
                    return Err(r.malformed("push stream count out of range"));
                }
                streams
            } else {
                1
            };
            Frame::Hello(Hello {
                resume: flags & HELLO_FLAG_RESUME != 0,
                urgent_channel: flags & HELLO_FLAG_URGENT != 0,
                session,
                epoch,
                page_size,
                mode,
                precopy_rounds,
                blocks,
                machine,
                push_streams,
            })
        }
        FrameKind::UrgentHello => {
            r.magic_and_version()?;
            if r.u16()? != 0 {
                return Err(WireError::ReservedBits { kind });
            }
            Frame::UrgentHello(UrgentHello { session: r.u64()?, epoch: r.u32()? })
        }
        FrameKind::Page => {
            let address = PageAddress { block: r.u32()?, index: r.u32()? };
            let kind_code = (header.flags & PAGE_KIND_MASK) >> PAGE_KIND_SHIFT;
            let page_kind = PageKind::from_code(kind_code).ok_or_else(|| r.malformed("unknown page kind"))?;
            let data = if header.flags & PAGE_FLAG_ZERO != 0 {
                PageData::Zero
            } else {
                let bytes = r.rest();
                if bytes.is_empty() {
                    return Err(r.malformed("page without data or zero flag"));
                }
                PageData::Bytes(bytes)
            };
            Frame::Page(PageFrame { address, kind: page_kind, data })
        }
        FrameKind::PagePart => {
            let address = PageAddress { block: r.u32()?, index: r.u32()? };
            let kind_code = (header.flags & PAGE_KIND_MASK) >> PAGE_KIND_SHIFT;
            let page_kind = PageKind::from_code(kind_code).ok_or_else(|| r.malformed("unknown page kind"))?;
            let offset = r.u32()?;
            let data = r.rest();
            if data.is_empty() {
                return Err(r.malformed("page part without data"));
            }
            Frame::PagePart(PagePartFrame { address, kind: page_kind, offset, data })
        }
        FrameKind::Discard => {
            let block = r.u32()?;
            let count = r.u16()? as usize;
            if count == 0 || count > MAX_DISCARD_RANGES {
                return Err(r.malformed("range count out of range"));
            }
            let mut ranges = Vec::with_capacity(count);
            for _ in 0..count {
                let first = r.u32()?;
                let pages = r.u32()?;
                if pages == 0 {
                    return Err(r.malformed("empty range"));
                }
                ranges.push((first, pages));
            }
            Frame::Discard(Discard { block, ranges })
        }
        FrameKind::DeviceState => {
            Frame::DeviceState { last: header.flags & DEVICE_STATE_FLAG_LAST != 0, chunk: r.rest() }
        }
        FrameKind::StartGuest => Frame::StartGuest,
        FrameKind::EndOfStream => Frame::EndOfStream,
        FrameKind::Ping => Frame::Ping,
        FrameKind::ReadyToRun => Frame::ReadyToRun,
        FrameKind::Eoc => Frame::Eoc,
        FrameKind::Cancel => Frame::Cancel { reason: r.reason()? },
        FrameKind::GuestDropped => Frame::GuestDropped { reason: r.reason()? },
        FrameKind::Reject => Frame::Reject { reason: r.reason()? },
        FrameKind::Welcome => {
            r.magic_and_version()?;
            let flags = r.u16()?;
            if flags & !(WELCOME_FLAG_STARTED | WELCOME_FLAG_LOADED) != 0 {
                return Err(WireError::ReservedBits { kind });
            }
            Frame::Welcome(Welcome {
                guest_started: flags & WELCOME_FLAG_STARTED != 0,
                device_loaded: flags & WELCOME_FLAG_LOADED != 0,
                session: r.u64()?,
                epoch: r.u32()?,
                max_outstanding_requests: r.u32()?,
            })
        }
        FrameKind::Request => {
            let block = r.u32()?;
            let count = r.u16()? as usize;
            if count == 0 || count > MAX_REQUEST_PAGES {
                return Err(r.malformed("request count out of range"));
            }
            let mut indexes = Vec::with_capacity(count);
            for _ in 0..count {
                indexes.push(r.u32()?);
            }
            Frame::Request(Request { block, indexes })
        }
        FrameKind::PresentPages => {
            let first_word = r.u64()?;
            let count = r.u16()? as usize;
            if count == 0 || count > MAX_PRESENT_WORDS {
                return Err(r.malformed("word count out of range"));
            }
            let mut words = Vec::with_capacity(count);
            for _ in 0..count {
                words.push(r.u64()?);
            }
            Frame::PresentPages(PresentPages { first_word, words })
        }
        FrameKind::PresentEnd => Frame::PresentEnd { present_pages: r.u64()? },
        FrameKind::FallbackTerms => {
            let lease_ms = r.u32()?;
            if lease_ms == 0 {
                return Err(r.malformed("zero lease"));
            }
            Frame::FallbackTerms(FallbackTerms { lease_ms, committed_checkpoint: r.u64()? })
        }
        FrameKind::LeaseGrant => Frame::LeaseGrant { seq: r.u64()? },
        FrameKind::CheckpointAck => Frame::CheckpointAck { seq: r.u64()? },
        FrameKind::LeaseRequest => Frame::LeaseRequest { seq: r.u64()? },
        FrameKind::Superseded => Frame::Superseded,
        FrameKind::Released => Frame::Released,
        FrameKind::ReleaseAck => Frame::ReleaseAck,
        FrameKind::CheckpointBegin => {
            let seq = r.u64()?;
            if seq == 0 {
                return Err(r.malformed("checkpoint 0 (they count from 1)"));
            }
            Frame::CheckpointBegin(CheckpointBegin { seq, pages: r.u64()?, device_bytes: r.u32()? })
        }
        FrameKind::CheckpointPage => {
            let address = PageAddress { block: r.u32()?, index: r.u32()? };
            let data = if header.flags & PAGE_FLAG_ZERO != 0 {
                PageData::Zero
            } else {
                let bytes = r.rest();
                if bytes.is_empty() {
                    return Err(r.malformed("page without data or zero flag"));
                }
                PageData::Bytes(bytes)
            };
            Frame::CheckpointPage { address, data }
        }
        FrameKind::CheckpointDevice => Frame::CheckpointDevice { chunk: r.rest() },
        FrameKind::CheckpointEnd => Frame::CheckpointEnd { seq: r.u64()?, digest: r.u64()? },
    };
    r.finish()?;
    Ok(frame)
}

/// A connection preamble that is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum PreambleError {
    #[error("bad preamble magic {0:#010x}")]
    BadMagic(u32),
    #[error("unknown channel code {0}")]
    UnknownChannel(u8),
    #[error("preamble has reserved bytes set")]
    ReservedBytes,
}

impl Preamble {
    /// Decodes the 8 bytes that open a connection.
    pub fn decode(bytes: &[u8; PREAMBLE_LEN]) -> Result<Preamble, PreambleError> {
        let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != PREAMBLE_MAGIC {
            return Err(PreambleError::BadMagic(magic));
        }
        if bytes[5..] != [0, 0, 0] {
            return Err(PreambleError::ReservedBytes);
        }
        let channel = Channel::from_code(bytes[4]).ok_or(PreambleError::UnknownChannel(bytes[4]))?;
        Ok(Preamble { channel })
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode::encode;
    use super::super::frame::{PageData, PageFrame, PageKind};
    use super::*;
    use crate::layout::PageAddress;

    fn huge_page_frame() -> Vec<u8> {
        let frame = Frame::Page(PageFrame {
            address: PageAddress { block: 0, index: 1 },
            kind: PageKind::Background,
            data: PageData::Bytes(Bytes::from(vec![0x5a; 2 << 20])),
        });
        let mut out = Vec::new();
        encode(&frame, &mut out);
        out
    }

    #[test]
    fn a_header_alone_does_not_reserve_the_frame_it_announces() {
        let bytes = huge_page_frame();
        let mut decoder = Decoder::new();
        decoder.push(Bytes::copy_from_slice(&bytes[..HEADER_LEN + 100]));
        assert!(decoder.next_frame().expect("a valid prefix").is_none());
        assert!(decoder.partial.capacity() < 64 << 10, "reserved {} bytes", decoder.partial.capacity());
    }

    #[test]
    fn a_frame_that_arrived_in_pieces_is_assembled_whole() {
        let bytes = huge_page_frame();
        let mut decoder = Decoder::new();
        decoder.push(Bytes::copy_from_slice(&bytes[..HEADER_LEN]));
        assert!(decoder.next_frame().expect("a valid header").is_none());
        for piece in bytes[HEADER_LEN..].chunks(256 << 10) {
            decoder.push(Bytes::copy_from_slice(piece));
        }
        let frame = decoder.next_frame().expect("valid bytes").expect("a whole frame");
        assert!(matches!(frame, Frame::Page(PageFrame { data: PageData::Bytes(ref d), .. }) if d.len() == 2 << 20));
        assert!(!decoder.has_partial());
    }
}
