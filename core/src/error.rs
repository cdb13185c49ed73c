//! The errors of a migration. Every way the peer's bytes or the driver's
//! events can be wrong has its own variant, so a user reads what went wrong,
//! not a code.
//!
//! Each module owns the errors of its own idea ([`LayoutError`] in
//! [`layout`](crate::layout), [`WireError`] in [`wire`](crate::wire)); the
//! errors here are the cores' and compose those.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::channel::Channel;
use crate::layout::LayoutError;
use crate::wire::{FrameKind, WireError};

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
    #[error("page size mismatch: this side's guest RAM has pages of {ours} bytes, the peer's of {theirs} bytes (both sides must back guest RAM with pages of one size)")]
    PageSizeMismatch { ours: u32, theirs: u32 },
    #[error("page size mismatch in RAM block {block:?}: this side's has pages of {ours} bytes, the peer's of {theirs} bytes (both sides must back guest RAM with pages of one size)")]
    BlockPageSizeMismatch { block: String, ours: u32, theirs: u32 },
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
    #[error("more than {limit} {channel} connections waited to show their identity; the oldest was dropped")]
    TooManyProvisional { channel: Channel, limit: usize },
    #[error("the peer rejected the migration: {0}")]
    Rejected(String),
    #[error("page part of {len} bytes at offset {offset} does not fit a page of {page_size} bytes (parts have one length, a divisor of the page size giving at most 512 parts, at a multiple of it)")]
    BadPagePart { page_size: u32, offset: u32, len: usize },
    #[error("page {index} of block {block}: its part at offset {offset} arrived twice (each part crosses once)")]
    DuplicatePagePart { block: u32, index: u32, offset: u32 },
    /// A checkpoint that does not add up (out of order, more or fewer pages
    /// or device-state bytes than announced, a digest that differs).
    #[error("bad checkpoint: {0}")]
    BadCheckpoint(String),
    #[error("the source asks for {asked} push streams, this side accepts at most {accepted} (give both sides --push-streams)")]
    PushStreamsRefused { asked: u8, accepted: u8 },
}

impl ProtocolError {
    /// Whether the peer's pages have another size than this side's.
    pub fn is_page_size_mismatch(&self) -> bool {
        matches!(self, ProtocolError::PageSizeMismatch { .. } | ProtocolError::BlockPageSizeMismatch { .. })
    }

    /// Whether a fresh hello refused for this is answered with a `Reject`
    /// saying why: the source is most likely the real one, configured
    /// differently (page sizes, push streams).
    pub fn is_told_to_source(&self) -> bool {
        self.is_page_size_mismatch() || matches!(self, ProtocolError::PushStreamsRefused { .. })
    }
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
    /// A paused source's attempt was refused: nothing listens at the
    /// destination's address (it finished and exited, or is restarting).
    #[error(
        "the destination refused the {channel} connection (nothing listens: it finished and exited, or is \
         restarting); refused for {refused_ms} ms, giving up after {limit_ms} ms"
    )]
    DestinationRefused { channel: Channel, refused_ms: u64, limit_ms: u64 },
    /// A paused source gave up: every attempt was refused for this long. The
    /// guest's fate is the destination's (the source never resumes it).
    #[error(
        "every connection to the destination was refused for {refused_ms} ms: it finished and exited; the \
         guest's fate is the destination's and it never resumes on the source"
    )]
    DestinationGone { refused_ms: u64 },
    #[error("the peer sent nothing for {timeout_ms} ms")]
    PeerTimeout { timeout_ms: u64 },
    #[error("the handshake did not finish within {timeout_ms} ms")]
    HandshakeTimeout { timeout_ms: u64 },
    #[error("the source did not start the guest within {timeout_ms} ms after the device state loaded")]
    StartTimeout { timeout_ms: u64 },
    #[error("cancelled by the user")]
    Cancelled,
    /// The user paused a postcopy migration (QEMU's `migrate-pause`); it
    /// waits for a resume.
    #[error("Postcopy migration is paused by the user")]
    PausedByUser,
    #[error("the source cancelled the migration: {0}")]
    CancelledByPeer(String),
    #[error("the destination dropped the guest without running it: {0}")]
    DestinationDropped(String),
    #[error("loading the device state failed: {0}")]
    DeviceStateLoad(String),
    #[error("page {page} could not be installed: {reason}")]
    InstallFailed { page: u64, reason: String },
    /// Fallback: the source heard nothing from the destination for the
    /// takeover wait (its lease had surely lapsed) and restarted the guest
    /// from the last committed checkpoint (0: from the switchover's state).
    #[error(
        "the destination was silent for {silent_ms} ms, longer than its lease allows: the source took the guest \
         back from checkpoint {checkpoint} (the guest rolled back to that instant)"
    )]
    TookOver { checkpoint: u64, silent_ms: u64 },
    /// Fallback: the destination learned that the source took the guest
    /// back; it dropped its copy (it never resumes it).
    #[error("the source took the guest back after this side's lease lapsed: the copy here was dropped")]
    Superseded,
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
    /// A checkpoint the core did not ask for (another sequence number, or
    /// none due).
    #[error("checkpoint {seq} was not asked for (expected {expected:?})")]
    CheckpointNotDue { seq: u64, expected: Option<u64> },
    /// A checkpoint page of the wrong length for its block.
    #[error("checkpoint page {page} has {got} bytes, its block's pages have {expected}")]
    CheckpointPageLength { page: u64, expected: u32, got: usize },
}
