//! The frames: their kinds, limits, flag bits and decoded forms.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

use crate::channel::Channel;
use crate::layout::{PageAddress, RamBlock, MAX_BLOCKS, MAX_BLOCK_NAME_LEN, MAX_FRAME_PAGE_SIZE, MAX_PAGE_SIZE};

/// "PCPY": first field of every hello.
pub const MAGIC: u32 = 0x5043_5059;
/// "PCPC": first field of every connection preamble.
pub const PREAMBLE_MAGIC: u32 = 0x5043_5043;
/// Length of a connection preamble.
pub const PREAMBLE_LEN: usize = 8;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Length of every frame header.
pub const HEADER_LEN: usize = 8;
/// Page indexes per `Request` frame, at most.
pub const MAX_REQUEST_PAGES: usize = 1024;
/// Ranges per `Discard` frame, at most.
pub const MAX_DISCARD_RANGES: usize = 4096;
/// Words per `PresentPages` frame, at most.
pub const MAX_PRESENT_WORDS: usize = 8192;
/// Bytes per `DeviceState` chunk, at most.
pub const MAX_DEVICE_STATE_CHUNK: usize = 64 * 1024;
/// Parts of one page, at most (a page part's length is at least its page
/// size divided by this). Why 512: the largest page (1 GiB,
/// [`MAX_PAGE_SIZE`]) must cross in frames of at most
/// [`MAX_FRAME_PAGE_SIZE`] (2 MiB), which takes 512 parts. The bound keeps
/// what a destination records per page in assembly small (a bit per part,
/// 64 bytes) and what a part may claim checkable before anything is kept.
pub const MAX_PAGE_PARTS: usize = (MAX_PAGE_SIZE / MAX_FRAME_PAGE_SIZE) as usize;
/// Bytes of a reason string, at most.
pub const MAX_REASON_LEN: usize = 1024;
/// Bytes of the machine description in a hello, at most.
pub const MAX_MACHINE_LEN: usize = 4096;

/// Frame types, with their wire codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FrameKind {
    Hello = 0x01,
    UrgentHello = 0x02,
    Page = 0x03,
    Discard = 0x04,
    DeviceState = 0x05,
    StartGuest = 0x06,
    EndOfStream = 0x07,
    Cancel = 0x08,
    Ping = 0x09,
    Welcome = 0x21,
    Request = 0x22,
    ReadyToRun = 0x23,
    Eoc = 0x24,
    GuestDropped = 0x25,
    PresentPages = 0x26,
    PresentEnd = 0x27,
    Reject = 0x28,
    PagePart = 0x0a,
    // Fallback (docs/fallback.md), source to destination.
    FallbackTerms = 0x30,
    LeaseGrant = 0x31,
    CheckpointAck = 0x32,
    Superseded = 0x33,
    Released = 0x34,
    // Fallback, destination to source.
    LeaseRequest = 0x38,
    CheckpointBegin = 0x39,
    CheckpointPage = 0x3a,
    CheckpointDevice = 0x3b,
    CheckpointEnd = 0x3c,
    ReleaseAck = 0x3d,
}

impl FrameKind {
    pub fn from_code(code: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match code {
            0x01 => Hello,
            0x02 => UrgentHello,
            0x03 => Page,
            0x04 => Discard,
            0x05 => DeviceState,
            0x06 => StartGuest,
            0x07 => EndOfStream,
            0x08 => Cancel,
            0x09 => Ping,
            0x21 => Welcome,
            0x22 => Request,
            0x23 => ReadyToRun,
            0x24 => Eoc,
            0x25 => GuestDropped,
            0x26 => PresentPages,
            0x27 => PresentEnd,
            0x28 => Reject,
            0x0a => PagePart,
            0x30 => FallbackTerms,
            0x31 => LeaseGrant,
            0x32 => CheckpointAck,
            0x33 => Superseded,
            0x34 => Released,
            0x38 => LeaseRequest,
            0x39 => CheckpointBegin,
            0x3a => CheckpointPage,
            0x3b => CheckpointDevice,
            0x3c => CheckpointEnd,
            0x3d => ReleaseAck,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_payload(self) -> u32 {
        use FrameKind::*;
        let bytes = match self {
            Hello => 34 + MAX_BLOCKS * (1 + MAX_BLOCK_NAME_LEN + 8 + 4) + MAX_MACHINE_LEN + 1,
            UrgentHello => 20,
            Page => 8 + MAX_FRAME_PAGE_SIZE as usize,
            Discard => 6 + 8 * MAX_DISCARD_RANGES,
            DeviceState => MAX_DEVICE_STATE_CHUNK,
            StartGuest | EndOfStream | Ping | ReadyToRun | Eoc | Superseded | Released | ReleaseAck => 0,
            Cancel | GuestDropped | Reject => MAX_REASON_LEN,
            Welcome => 24,
            Request => 6 + 4 * MAX_REQUEST_PAGES,
            PresentPages => 10 + 8 * MAX_PRESENT_WORDS,
            PresentEnd => 8,
            PagePart => 12 + MAX_FRAME_PAGE_SIZE as usize,
            FallbackTerms => 12,
            LeaseGrant | CheckpointAck | LeaseRequest => 8,
            CheckpointBegin => 20,
            CheckpointPage => 8 + MAX_FRAME_PAGE_SIZE as usize,
            CheckpointDevice => MAX_DEVICE_STATE_CHUNK,
            CheckpointEnd => 16,
        };
        bytes as u32
    }

    /// Flag bits this kind may set; any other bit is a protocol error.
    pub(super) fn allowed_flags(self) -> u8 {
        match self {
            FrameKind::Page => PAGE_FLAG_ZERO | PAGE_KIND_MASK,
            FrameKind::PagePart => PAGE_KIND_MASK,
            FrameKind::DeviceState => DEVICE_STATE_FLAG_LAST,
            FrameKind::CheckpointPage => PAGE_FLAG_ZERO,
            _ => 0,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

pub(super) const PAGE_FLAG_ZERO: u8 = 0x01;
pub(super) const PAGE_KIND_SHIFT: u8 = 1;
pub(super) const PAGE_KIND_MASK: u8 = 0x06;
pub(super) const DEVICE_STATE_FLAG_LAST: u8 = 0x01;
pub(super) const HELLO_FLAG_RESUME: u16 = 0x01;
pub(super) const HELLO_FLAG_URGENT: u16 = 0x02;
pub(super) const HELLO_FLAG_BLOCK_PAGE_SIZES: u16 = 0x04;
/// The hello ends with the number of push streams (2 or more).
pub(super) const HELLO_FLAG_PUSH_STREAMS: u16 = 0x08;
pub(super) const WELCOME_FLAG_STARTED: u16 = 0x01;
pub(super) const WELCOME_FLAG_LOADED: u16 = 0x02;

/// How the migration runs, as announced in the hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WireMode {
    /// Stop at once, then postcopy.
    Postcopy,
    /// Precopy rounds first, then postcopy.
    Hybrid,
}

/// Why a page crosses the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PageKind {
    /// Pushed while the guest still runs on the source; may go stale.
    Precopy,
    /// Pushed in postcopy without being asked.
    Background,
    /// Sent because the destination asked for it.
    Requested,
}

impl PageKind {
    pub(super) fn code(self) -> u8 {
        match self {
            PageKind::Precopy => 0,
            PageKind::Background => 1,
            PageKind::Requested => 2,
        }
    }

    pub(super) fn from_code(code: u8) -> Option<PageKind> {
        match code {
            0 => Some(PageKind::Precopy),
            1 => Some(PageKind::Background),
            2 => Some(PageKind::Requested),
            _ => None,
        }
    }
}

/// The first frame of the main channel.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Set when this connection resumes a paused migration.
    pub resume: bool,
    /// Whether the source will open the urgent channel.
    pub urgent_channel: bool,
    pub session: u64,
    /// Connection generation: 0 at first, one more after each recovery.
    pub epoch: u32,
    /// The base page size: every block's whose `page_size` is the same.
    pub page_size: u32,
    pub mode: WireMode,
    pub precopy_rounds: u32,
    /// The RAM blocks, each with its own page size.
    pub blocks: Vec<RamBlock>,
    /// What the destination must build before the device state arrives
    /// (vCPU count, interrupt controller...), opaque to the protocol.
    pub machine: Bytes,
    /// Connections the background push is spread over: the main channel
    /// and `push_streams - 1` [`Channel::Push`] channels (1 to
    /// [`MAX_PUSH_STREAMS`]; 1 is encoded as older builds encode a hello).
    ///
    /// [`Channel::Push`]: crate::Channel::Push
    /// [`MAX_PUSH_STREAMS`]: crate::channel::MAX_PUSH_STREAMS
    pub push_streams: u8,
}

/// The first frame of the urgent channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UrgentHello {
    pub session: u64,
    pub epoch: u32,
}

/// The destination's answer to a hello: the first frame of the return path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Welcome {
    pub session: u64,
    pub epoch: u32,
    /// Whether the guest has run on the destination (recovery only).
    pub guest_started: bool,
    /// Whether the destination has loaded the device state (recovery only).
    pub device_loaded: bool,
    /// The destination never has more page requests outstanding than this.
    pub max_outstanding_requests: u32,
}

/// Payload of a page frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PageData {
    /// The page is all zero bytes; nothing else crossed the wire.
    Zero,
    /// The page's bytes (a slice of the receive buffer, not a copy).
    Bytes(Bytes),
}

/// One page of guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageFrame {
    pub address: PageAddress,
    pub kind: PageKind,
    pub data: PageData,
}

/// A part of a page larger than the source's part size, pushed in
/// postcopy: `data` goes at byte `offset` of the page. Every part of a page
/// has the same length, which divides the page size, and crosses once; the
/// destination makes the page visible only when all have arrived.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PagePartFrame {
    pub address: PageAddress,
    pub kind: PageKind,
    pub offset: u32,
    pub data: Bytes,
}

/// Pages of one block that the destination must drop (stale precopy pages).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Discard {
    pub block: u32,
    /// `(first page index, page count)` pairs.
    pub ranges: Vec<(u32, u32)>,
}

/// Pages of one block that the destination asks for, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    pub block: u32,
    pub indexes: Vec<u32>,
}

/// A slice of the destination's present-page bitmap, sent during recovery.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PresentPages {
    /// Index of the first 64-bit word: it covers pages `64 * first_word ..`.
    pub first_word: u64,
    pub words: Vec<u64>,
}

/// The source's fallback terms (docs/fallback.md): sent on the main
/// channel right after every hello of a migration with fallback on. A
/// destination that does not know this frame refuses the migration before
/// the switchover, as it would refuse an unknown hello flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FallbackTerms {
    /// The destination runs the guest only within this long (by its own
    /// clock) of sending a lease request the source granted.
    pub lease_ms: u32,
    /// The last checkpoint the source committed (0: none yet).
    pub committed_checkpoint: u64,
}

/// The opening frame of a checkpoint: what must follow for it to be whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CheckpointBegin {
    /// Checkpoints count from 1, one more each.
    pub seq: u64,
    /// `CheckpointPage` frames that follow.
    pub pages: u64,
    /// Bytes of device state the `CheckpointDevice` frames carry.
    pub device_bytes: u32,
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Frame {
    Hello(Hello),
    UrgentHello(UrgentHello),
    Page(PageFrame),
    Discard(Discard),
    DeviceState { last: bool, chunk: Bytes },
    StartGuest,
    EndOfStream,
    Cancel { reason: String },
    Ping,
    Welcome(Welcome),
    Request(Request),
    ReadyToRun,
    Eoc,
    GuestDropped { reason: String },
    PresentPages(PresentPages),
    PresentEnd { present_pages: u64 },
    Reject { reason: String },
    PagePart(PagePartFrame),
    FallbackTerms(FallbackTerms),
    LeaseGrant { seq: u64 },
    CheckpointAck { seq: u64 },
    Superseded,
    Released,
    LeaseRequest { seq: u64 },
    CheckpointBegin(CheckpointBegin),
    CheckpointPage { address: PageAddress, data: PageData },
    CheckpointDevice { chunk: Bytes },
    CheckpointEnd { seq: u64, digest: u64 },
    ReleaseAck,
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::UrgentHello(_) => FrameKind::UrgentHello,
            Frame::Page(_) => FrameKind::Page,
            Frame::Discard(_) => FrameKind::Discard,
            Frame::DeviceState { .. } => FrameKind::DeviceState,
            Frame::StartGuest => FrameKind::StartGuest,
            Frame::EndOfStream => FrameKind::EndOfStream,
            Frame::Cancel { .. } => FrameKind::Cancel,
            Frame::Ping => FrameKind::Ping,
            Frame::Welcome(_) => FrameKind::Welcome,
            Frame::Request(_) => FrameKind::Request,
            Frame::ReadyToRun => FrameKind::ReadyToRun,
            Frame::Eoc => FrameKind::Eoc,
            Frame::GuestDropped { .. } => FrameKind::GuestDropped,
            Frame::PresentPages(_) => FrameKind::PresentPages,
            Frame::PresentEnd { .. } => FrameKind::PresentEnd,
            Frame::Reject { .. } => FrameKind::Reject,
            Frame::PagePart(_) => FrameKind::PagePart,
            Frame::FallbackTerms(_) => FrameKind::FallbackTerms,
            Frame::LeaseGrant { .. } => FrameKind::LeaseGrant,
            Frame::CheckpointAck { .. } => FrameKind::CheckpointAck,
            Frame::Superseded => FrameKind::Superseded,
            Frame::Released => FrameKind::Released,
            Frame::LeaseRequest { .. } => FrameKind::LeaseRequest,
            Frame::CheckpointBegin(_) => FrameKind::CheckpointBegin,
            Frame::CheckpointPage { .. } => FrameKind::CheckpointPage,
            Frame::CheckpointDevice { .. } => FrameKind::CheckpointDevice,
            Frame::CheckpointEnd { .. } => FrameKind::CheckpointEnd,
            Frame::ReleaseAck => FrameKind::ReleaseAck,
        }
    }
}

/// The first bytes of every connection: which channel it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Preamble {
    pub channel: Channel,
}

/// Cuts a reason string to the wire limit on a character boundary.
pub(super) fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
