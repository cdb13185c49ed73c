//! The simulated network's pieces: connections with bounded socket buffers,
//! and one link per direction that serialises chunks at its bandwidth.
//!
//! A writer hands its socket a chunk of frames (one `poll_transmit` call)
//! only while the socket buffer has room, so a slow link pushes back on the
//! core (which chooses pages as late as possible). Bytes count against the
//! buffer from the write until delivery. The link of a direction sends one
//! chunk at a time, taking turns between the connections that have data
//! (like a fair-queueing NIC), so the urgent channel waits for at most the
//! chunk on the wire, never for the main channel's buffer. A chunk arrives
//! after its serialisation, the latency and a jitter; arrivals keep their
//! order within a connection.

use bytes::Bytes;
use std::collections::VecDeque;

use postcopy_core::wire::{FrameKind, HEADER_LEN};
use postcopy_core::Channel;

use crate::scenario::CHARGED_PAGE_BYTES;

/// Bytes written to a socket in one go (or the end of the stream).
#[derive(Clone, Debug)]
pub struct Chunk {
    pub bytes: Bytes,
    /// What the chunk costs on the network (pages charged at 4 KiB).
    pub charged: u64,
    /// When it reaches the reader (set when it leaves the link).
    pub arrival: u64,
    /// The writer closed gracefully: the reader sees the end here.
    pub fin: bool,
}

/// One connection of one channel.
#[derive(Clone, Debug)]
pub struct Conn {
    pub channel: Channel,
    /// The source's end exists (connecting or connected) and was not closed.
    pub src_open: bool,
    /// The source learned that the connection is up.
    pub src_established: bool,
    /// The destination accepted it and did not close it.
    pub dst_open: bool,
    /// Reset or fully closed: nothing more is delivered.
    pub dead: bool,
    /// The writer closed (after a last chunk, maybe): it writes no more.
    pub writer_closed: bool,
    /// Charged bytes written and not yet delivered (or dropped unnoticed).
    pub buffered: u64,
    /// In the socket buffer, not yet on the link.
    pub waiting: VecDeque<Chunk>,
    /// On the link or propagating, in arrival order.
    pub in_flight: VecDeque<Chunk>,
    pub last_arrival: u64,
    /// A delivery event is scheduled at this time.
    pub deliver_at: Option<u64>,
    /// Listed in its link's round-robin.
    pub in_ready: bool,
}

impl Conn {
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            src_open: true,
            src_established: false,
            dst_open: false,
            dead: false,
            writer_closed: false,
            buffered: 0,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            last_arrival: 0,
            deliver_at: None,
            in_ready: false,
        }
    }

    /// Link index: 0 carries source-to-destination channels, 1 the return path.
    pub fn dir(&self) -> usize {
        usize::from(!self.channel.is_from_source())
    }
}

/// One direction's wire.
#[derive(Clone, Debug, Default)]
pub struct Link {
    pub busy: bool,
    /// Connections with chunks waiting, in turn order.
    pub ready: VecDeque<usize>,
}

/// A page frame found in a chunk.
#[derive(Clone, Copy, Debug)]
pub struct PageRef {
    pub block: u32,
    pub index: u32,
    /// The wire's kind code: 0 precopy, 1 background, 2 requested.
    pub kind: u8,
    pub zero: bool,
}

/// Walks the frames of a chunk (chunks always hold whole frames), calling
/// `page` for each page frame; returns the chunk's charged size: non-zero
/// pages cost [`CHARGED_PAGE_BYTES`] whatever the simulation's page size.
pub fn scan_chunk(bytes: &[u8], wire_page_bytes: u64, mut page: impl FnMut(PageRef)) -> u64 {
    // Page frame flags (see `postcopy_core::wire`): bit 0 zero, bits 1-2 kind.
    const ZERO: u8 = 0x01;
    let mut charged = bytes.len() as u64;
    let mut at = 0;
    while at + HEADER_LEN <= bytes.len() {
        let header = &bytes[at..at + HEADER_LEN];
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if header[0] == FrameKind::Page.code() && at + HEADER_LEN + 8 <= bytes.len() {
            let p = &bytes[at + HEADER_LEN..];
            let zero = header[1] & ZERO != 0;
            if !zero {
                charged += CHARGED_PAGE_BYTES.saturating_sub(wire_page_bytes);
            }
            page(PageRef {
                block: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                index: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                kind: (header[1] >> 1) & 0x3,
                zero,
            });
        }
        at += HEADER_LEN + len;
    }
    charged
}

/// Nanoseconds to serialise `bytes` at `mbps` (at least 1).
pub fn serialise_ns(bytes: u64, mbps: u64) -> u64 {
    ((u128::from(bytes) * 8000).div_ceil(u128::from(mbps.max(1))) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postcopy_core::wire::{encode, encode_page_frame, Frame, PageKind};
    use postcopy_core::PageAddress;

    #[test]
    fn scans_pages_and_charges_them_as_4k() {
        let mut out = Vec::new();
        encode(&Frame::Ping, &mut out);
        encode_page_frame(&mut out, PageAddress { block: 1, index: 7 }, PageKind::Requested, 32, |b| b.fill(3));
        encode_page_frame(&mut out, PageAddress { block: 0, index: 9 }, PageKind::Background, 32, |b| b.fill(0));
        let mut pages = Vec::new();
        let charged = scan_chunk(&out, 32, |p| pages.push((p.block, p.index, p.kind, p.zero)));
        assert_eq!(pages, vec![(1, 7, 2, false), (0, 9, 1, true)]);
        assert_eq!(charged, out.len() as u64 + 4096 - 32);
        assert_eq!(serialise_ns(1250, 10_000), 1000);
        assert_eq!(serialise_ns(1, 100_000), 1);
    }
}
