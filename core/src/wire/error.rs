//! Bytes that are not a frame.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::frame::FrameKind;

/// Bytes that do not form a valid frame. The stream cannot be trusted after one.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Error, Serialize, Deserialize)]
pub enum WireError {
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    #[error("{kind} frame of {len} bytes exceeds its limit of {max} bytes")]
    FrameTooLarge { kind: FrameKind, len: u32, max: u32 },
    #[error("{kind} frame is truncated")]
    Truncated { kind: FrameKind },
    #[error("{kind} frame has {extra} bytes after its last field")]
    TrailingBytes { kind: FrameKind, extra: usize },
    #[error("{kind} frame has reserved bits set")]
    ReservedBits { kind: FrameKind },
    #[error("{kind} frame: {what}")]
    Malformed { kind: FrameKind, what: String },
    #[error("bad magic {0:#010x}: the peer does not speak this protocol")]
    BadMagic(u32),
    #[error("peer speaks protocol version {got}, this side speaks {supported}")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("the stream is unusable after an earlier decoding error")]
    Desynchronized,
}
