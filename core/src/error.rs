//! Typed errors. Every way the peer's bytes or the driver's events can be
//! wrong has its own variant, so a user reads what went wrong, not a code.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::channel::Channel;
use crate::wire::FrameKind;

/// A RAM layout the protocol cannot carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Error, Serialize, Deserialize)]
pub enum LayoutError {
    #[error("page size {0} is not a power of two between 16 and 65536")]
    BadPageSize(u32),
    #[error("a layout needs 1 to 256 blocks, not {0}")]
    BadBlockCount(usize),
    #[error("block name {0:?} is empty or longer than 255 bytes")]
    BadBlockName(String),
    #[error("block name {0:?} appears twice")]
    DuplicateBlockName(String),
    #[error("block {name:?} has {pages} pages (1 to 2^32 allowed)")]
    BadBlockSize { name: String, pages: u64 },
    #[error("layout has {0} pages, more than 2^40")]
    TooManyPages(u64),
}

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

/// A frame that decoded but breaks the protocol in the receiver's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Error, Serialize, Deserialize)]
pub enum ProtocolError {
    #[error("undecodable bytes on the {channel} channel: {error}")]
    Wire { channel: Channel, error: WireError },
    #[error("{kind} frame on the {channel} channel is not allowed in state {state}")]
    UnexpectedFrame { channel: Channel, kind: FrameKind, state: String },
    #[error("block {block} does not exist")]
    BlockOutOfRange { block: u32 },
    #[error("page {index} of block {block} does not exist")]
    PageOutOfRange { block: u32, index: u32 },
    #[error("page size mismatch: this side uses {ours} bytes, the peer {theirs}")]
    PageSizeMismatch { ours: u32, theirs: u32 },
    #[error("page frame carries {got} bytes, the page size is {expected}")]
    PageLength { expected: u32, got: usize },
    #[error("the peer's RAM layout is invalid: {0}")]
    BadLayout(LayoutError),
    #[error("the guest has {pages} pages, more than the {limit} this side accepts")]
    GuestTooLarge { pages: u64, limit: u64 },
    #[error("the resumed session's RAM layout differs from the original one")]
    LayoutChanged,
    #[error("session mismatch: expected {expected:#x}, got {got:#x}")]
    SessionMismatch { expected: u64, got: u64 },
    /// A resume hello reached a destination that holds no migration (it was
    /// restarted, or never took part).
    #[error("nothing to resume: this destination holds no migration (session {session:#x})")]
    NothingToResume { session: u64 },
    #[error("epoch mismatch: expected {expected}, got {got}")]
    EpochMismatch { expected: u32, got: u32 },
    #[error("end of copy while {unsent} pages were never sent")]
    PrematureEoc { unsent: u64 },
    #[error("page request after the destination declared the end of copy")]
    RequestAfterEnd,
    #[error("more than {limit} page requests outstanding")]
    TooManyRequests { limit: u32 },
    #[error("device state exceeds {limit} bytes")]
    DeviceStateTooLarge { limit: u64 },
    #[error("bad present-pages report: {0}")]
    BadPresentReport(String),
    #[error("the peer rejected the migration: {0}")]
    Rejected(String),
}

/// Why a migration ended without completing, or paused.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Error, Serialize, Deserialize)]
pub enum MigrationError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the {channel} connection was lost")]
    ConnectionLost { channel: Channel },
    #[error("could not connect the {channel} channel")]
    ConnectFailed { channel: Channel },
    #[error("the peer sent nothing for {timeout_ms} ms")]
    PeerTimeout { timeout_ms: u64 },
    #[error("the handshake did not finish within {timeout_ms} ms")]
    HandshakeTimeout { timeout_ms: u64 },
    #[error("the source did not start the guest within {timeout_ms} ms after the device state loaded")]
    StartTimeout { timeout_ms: u64 },
    #[error("cancelled by the user")]
    Cancelled,
    #[error("the source cancelled the migration: {0}")]
    CancelledByPeer(String),
    #[error("the destination dropped the guest without running it: {0}")]
    DestinationDropped(String),
    #[error("loading the device state failed: {0}")]
    DeviceStateLoad(String),
    #[error("page {page} could not be installed: {reason}")]
    InstallFailed { page: u64, reason: String },
}

/// An event the driver should not have delivered (a bug in the driver, not the peer).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Error, Serialize, Deserialize)]
pub enum EventError {
    #[error("page {0} is outside the guest's RAM")]
    PageOutOfRange(u64),
    #[error("{event} is not expected in state {state}")]
    WrongState { event: &'static str, state: String },
    #[error("{limit} page faults are already outstanding")]
    TooManyFaults { limit: u32 },
    #[error("machine description of {len} bytes exceeds {max}")]
    MachineDescriptionTooLong { len: usize, max: usize },
    #[error("page {page} failed to install after the end of copy was sent: the guest has a hole")]
    InstallFailedAfterEnd { page: u64 },
}
