//! `wire_decode`: any bytes, cut into any chunks, through the incremental
//! decoder.
//!
//! Asserts: no panic; no allocation larger than a bounded frame (plus the
//! input itself); the same frames and the same typed error whatever the
//! chunking (one chunk, the fuzzer's chunks, one byte at a time); after an
//! error the decoder stays failed with `Desynchronized`; every decoded frame
//! re-encodes to exactly the bytes it came from, and those bytes decode to the
//! same frame; what is left after the last frame without an error is a
//! prefix of a frame, and the decoder says so.

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use postcopy_core::wire::{self, Decoder, Frame, Preamble, HEADER_LEN, PREAMBLE_LEN};
use postcopy_core::WireError;

use crate::alloc_guard::Scope;
use crate::input::{In, Out};

/// Chunk sizes, then the byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireInput {
    /// Sizes of the chunks pushed into the decoder, used in a cycle; 0 means
    /// "everything left".
    pub chunks: Vec<u16>,
    pub stream: Vec<u8>,
}

/// Chunk sizes per input, at most.
const MAX_CHUNK_SIZES: usize = 8;

impl<'a> Arbitrary<'a> for WireInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut r = In::new(u);
        let count = r.u8() as usize % (MAX_CHUNK_SIZES + 1);
        let chunks = (0..count).map(|_| r.u16()).collect();
        Ok(WireInput { chunks, stream: r.rest() })
    }
}

impl WireInput {
    /// The bytes that decode to this input.
    pub fn to_bytes(&self) -> Vec<u8> {
        assert!(self.chunks.len() <= MAX_CHUNK_SIZES);
        let mut out = Out::default();
        out.u8(self.chunks.len() as u8);
        for &c in &self.chunks {
            out.u16(c);
        }
        out.raw(&self.stream);
        out.0
    }
}

/// How a decoding ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub frames: Vec<Frame>,
    pub error: Option<WireError>,
    /// Bytes buffered that do not form a frame yet (no error).
    pub partial: bool,
}

fn decode_in_chunks(stream: &[u8], sizes: &mut dyn Iterator<Item = usize>) -> Decoded {
    // One allocation for the stream, then zero-copy slices of it, as a
    // driver's receive buffer would be.
    let whole = Bytes::copy_from_slice(stream);
    let mut decoder = Decoder::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut error = None;
    while at < whole.len() && error.is_none() {
        let size = match sizes.next() {
            Some(0) | None => whole.len() - at,
            Some(n) => n.min(whole.len() - at),
        };
        decoder.push(whole.slice(at..at + size));
        at += size;
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
    }
    if let Some(e) = &error {
        assert_ne!(*e, WireError::Desynchronized, "the first error names the problem");
        assert_eq!(decoder.next_frame(), Err(WireError::Desynchronized), "a failed decoder stays failed");
        assert!(!decoder.has_partial(), "a failed decoder drops what it buffered");
    }
    let partial = decoder.has_partial();
    if error.is_some() {
        decoder.push(Bytes::from_static(&[0x09, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(decoder.next_frame(), Err(WireError::Desynchronized), "a failed decoder ignores new bytes");
    }
    Decoded { frames, error, partial }
}

/// Runs the target on one input; returns what the fuzzer's chunking decoded.
pub fn run(input: &WireInput) -> Decoded {
    let stream = &input.stream;
    // A bounded frame is at most 64 KiB and change; the decoder may double a
    // buffer once while assembling one. Add the input's own copies.
    let limit = (1 << 20) + 4 * stream.len();
    let scope = Scope::begin(limit);

    let sizes: Vec<usize> = input.chunks.iter().map(|&c| c as usize).collect();
    let chunked = if sizes.is_empty() {
        decode_in_chunks(stream, &mut std::iter::empty())
    } else {
        decode_in_chunks(stream, &mut sizes.iter().copied().cycle())
    };
    let whole = decode_in_chunks(stream, &mut std::iter::empty());
    assert_eq!(chunked, whole, "chunking changed what decoded");
    if stream.len() <= 4096 {
        let bytewise = decode_in_chunks(stream, &mut std::iter::repeat(1));
        assert_eq!(bytewise, whole, "byte-at-a-time decoding differs");
    }

    // Every frame re-encodes to the bytes it came from, and decodes again.
    let mut offset = 0;
    for frame in &whole.frames {
        let mut encoded = Vec::new();
        wire::encode(frame, &mut encoded);
        let original = &stream[offset..];
        assert!(
            original.starts_with(&encoded),
            "{frame:?} re-encodes to {:02x?}, the stream had {:02x?}",
            encoded,
            &original[..encoded.len().min(original.len())]
        );
        let mut again = Decoder::new();
        again.push(Bytes::from(encoded.clone()));
        assert_eq!(again.next_frame().as_ref(), Ok(&Some(frame.clone())), "re-encoded frame decodes differently");
        assert_eq!(again.next_frame(), Ok(None));
        assert!(!again.has_partial());
        offset += encoded.len();
    }
    let rest = &stream[offset..];
    match &whole.error {
        None => {
            assert_eq!(whole.partial, !rest.is_empty(), "leftover bytes and has_partial disagree");
            if rest.len() >= HEADER_LEN {
                let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
                assert!(rest.len() < HEADER_LEN + len, "a whole frame was left undecoded");
            }
        }
        Some(_) => assert!(!rest.is_empty(), "an error needs bytes to blame"),
    }

    // The connection preamble parser, on the first bytes.
    if let Some(first) = stream.first_chunk::<PREAMBLE_LEN>() {
        if let Ok(preamble) = Preamble::decode(first) {
            let mut out = Vec::new();
            wire::encode_preamble(&mut out, preamble.channel);
            assert_eq!(&out[..], &first[..]);
        }
    }

    let usage = scope.usage();
    assert!(usage.largest_bytes <= limit, "allocated {} bytes at once", usage.largest_bytes);
    drop(scope);
    whole
}
