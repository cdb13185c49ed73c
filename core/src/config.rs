//! What the user chooses: mode, channels, scheduling policy, limits, timeouts.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::channel::MAX_PUSH_STREAMS;
use crate::wire::{MAX_DEVICE_STATE_CHUNK, MAX_REQUEST_PAGES};

/// Pure postcopy, or precopy rounds first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Stop the guest at once and move it; every page follows on demand or in
    /// the background. Each page crosses the wire once.
    Postcopy,
    /// Push all RAM while the guest runs, re-send what it dirtied for
    /// `precopy_rounds` rounds (or until the user switches), then postcopy.
    Hybrid { precopy_rounds: u32 },
}

impl Mode {
    pub fn precopy_rounds(self) -> u32 {
        match self {
            Mode::Postcopy => 0,
            Mode::Hybrid { precopy_rounds } => precopy_rounds,
        }
    }
}

/// Settings of one side. Both sides' settings must agree on `mode`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub mode: Mode,
    /// Open a third connection that carries requested pages only.
    pub urgent_channel: bool,
    /// After serving a request, continue the background push just after the
    /// requested page (pre-paging), instead of where it was.
    pub prepaging: bool,
    /// Page indexes per request frame (the destination batches faults of one
    /// block into one frame).
    pub request_batch_pages: u32,
    /// Page faults the destination keeps outstanding at most; announced to the
    /// source, which rejects a peer that asks for more. The source also caps
    /// its queue of requested pages at its own value (both sides should agree).
    pub max_outstanding_requests: u32,
    /// Largest device state accepted, in bytes.
    pub max_device_state_bytes: u64,
    /// Largest guest the destination accepts, in pages: the peer's hello
    /// sizes the destination's bookkeeping (a bit per page) and its memory.
    pub max_guest_pages: u64,
    /// Connection attempts the source makes, after taking the guest back,
    /// to tell a destination that may be waiting after its ReadyToRun to
    /// drop its copy (0: do not try).
    pub withdraw_attempts: u32,
    /// Device state is sent in chunks of this many bytes.
    pub device_state_chunk_bytes: u32,
    /// Bound on connecting and on each handshake (first one and recoveries).
    pub handshake_timeout: Duration,
    /// Send a ping when a channel was idle this long (`None`: never).
    pub keepalive_interval: Option<Duration>,
    /// Declare the connection lost when the peer sent nothing this long.
    pub peer_timeout: Option<Duration>,
    /// First delay before reconnecting after a loss; doubles each attempt.
    pub reconnect_delay_min: Duration,
    /// Longest delay between reconnection attempts.
    pub reconnect_delay_max: Duration,
    /// Past StartGuest, after a loss the source reconnects by itself (with
    /// back-off). Off (manual recovery, as an operator of QEMU does it), a
    /// paused source makes one attempt per [`Source::handle_resume`] and
    /// waits paused in between; a refused attempt then never ends the
    /// migration (the operator decides).
    ///
    /// [`Source::handle_resume`]: crate::Source::handle_resume
    pub auto_reconnect: bool,
    /// How long a destination that loaded the device state, but lost the
    /// connection before its ReadyToRun left, waits for the source to come
    /// back before dropping the guest. Once ReadyToRun has left, the source
    /// may have transmitted StartGuest, and the destination waits however long.
    pub start_timeout: Duration,
    /// How long a paused source (past StartGuest) keeps reconnecting while
    /// every attempt is refused (nothing listens at the destination's
    /// address) before it concludes that the destination finished and
    /// exited, and ends with [`MigrationError::DestinationGone`], the guest
    /// left to the destination (it never resumes here). A destination that
    /// needs the source keeps listening until it finishes, so only a
    /// destination restarting takes this long; an attempt that is not
    /// refused (a partition times out instead) starts the count again.
    ///
    /// [`MigrationError::DestinationGone`]: crate::MigrationError::DestinationGone
    pub destination_gone_timeout: Duration,
    /// In postcopy the source pushes a page larger than this many bytes
    /// (a 2 MiB huge page) in parts of about this size (a power of two,
    /// at least a 512th of the page), so that a request for the page being
    /// pushed gets the parts not yet sent on the urgent channel; 0 (the
    /// default): whole pages only. The destination takes either. 128 KiB
    /// parts of 2 MiB pages cost about half again the push's time on
    /// loopback (docs/hugepages.md); they pay off where a page takes long
    /// to cross. A page larger than a frame carries
    /// ([`MAX_FRAME_PAGE_SIZE`](crate::layout::MAX_FRAME_PAGE_SIZE), 2 MiB:
    /// a 1 GiB page) always goes in parts of at most that, pushed or
    /// requested, whatever this says.
    pub page_part_bytes: u32,
    /// Fallback (docs/fallback.md): while postcopy runs, the destination
    /// runs the guest only under a lease from the source and streams
    /// checkpoints back, so that the source can restart the guest from the
    /// last one if the destination is lost. `None` (the default): off, and
    /// the wire and both state machines behave exactly as without it. The
    /// source offers it (its lease and drift bound count); a destination
    /// accepts it only with this set too (its driver must fence and take
    /// checkpoints), follows the source's lease and takes checkpoints at
    /// its own `checkpoint_interval`. A destination without it refuses the
    /// source's terms before the switchover: the source keeps the guest.
    pub fallback: Option<crate::fallback::FallbackConfig>,
    /// Connections the background push is spread over (1 to
    /// [`MAX_PUSH_STREAMS`]): the main channel and `push_streams - 1`
    /// [`Channel::Push`](crate::Channel::Push) channels, each taking the
    /// next unsent page whenever it can take bytes. The source opens that
    /// many; the destination accepts a hello that asks for at most that
    /// many and refuses one that asks for more (`PushStreamsRefused`).
    /// Requested pages keep to the urgent channel (or the main one).
    pub push_streams: u8,
    /// A deliberate bug, for showing that the checkers catch it.
    #[cfg(feature = "planted-bugs")]
    pub plant: Option<crate::plant::PlantedBug>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Postcopy,
            urgent_channel: true,
            prepaging: true,
            request_batch_pages: 64,
            max_outstanding_requests: 4096,
            max_device_state_bytes: 64 << 20,
            // 1 TiB of 4 KiB pages; 32 MiB of present bitmap.
            max_guest_pages: 1 << 28,
            withdraw_attempts: 8,
            device_state_chunk_bytes: MAX_DEVICE_STATE_CHUNK as u32,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Some(Duration::from_secs(1)),
            peer_timeout: Some(Duration::from_secs(10)),
            reconnect_delay_min: Duration::from_millis(50),
            reconnect_delay_max: Duration::from_secs(2),
            auto_reconnect: true,
            start_timeout: Duration::from_secs(60),
            destination_gone_timeout: Duration::from_secs(600),
            page_part_bytes: 0,
            fallback: None,
            push_streams: 1,
            #[cfg(feature = "planted-bugs")]
            plant: None,
        }
    }
}

impl Config {
    /// Pure postcopy with the default settings.
    pub fn postcopy() -> Self {
        Self::default()
    }

    /// Hybrid with `rounds` precopy rounds and the default settings.
    pub fn hybrid(rounds: u32) -> Self {
        Self { mode: Mode::Hybrid { precopy_rounds: rounds }, ..Self::default() }
    }

    /// The request batch size, within the wire limit.
    pub(crate) fn request_batch(&self) -> usize {
        (self.request_batch_pages as usize).clamp(1, MAX_REQUEST_PAGES)
    }

    /// The device-state chunk size, within the wire limit.
    pub(crate) fn device_state_chunk(&self) -> usize {
        (self.device_state_chunk_bytes as usize).clamp(1, MAX_DEVICE_STATE_CHUNK)
    }

    /// The length of the parts a page of `page_size` bytes is pushed in, or
    /// None when it goes whole (see [`Config::page_part_bytes`]).
    pub(crate) fn part_len(&self, page_size: usize) -> Option<usize> {
        let frame_max = crate::layout::MAX_FRAME_PAGE_SIZE as usize;
        let must = page_size > frame_max;
        let asked = self.page_part_bytes as usize;
        if !must && (asked == 0 || page_size <= asked) {
            return None;
        }
        // The largest power of two not above the asked length, and never
        // above what a frame carries.
        let wanted = match asked {
            0 => frame_max,
            n => (1usize << (usize::BITS - 1 - n.leading_zeros())).min(frame_max),
        };
        let part = wanted.max(page_size.div_ceil(crate::wire::MAX_PAGE_PARTS));
        (part < page_size && page_size % part == 0 && part <= frame_max).then_some(part)
    }

    /// Whether a page of `page_size` bytes can only cross in parts (it is
    /// larger than a frame carries).
    pub(crate) fn parts_only(page_size: usize) -> bool {
        page_size > crate::layout::MAX_FRAME_PAGE_SIZE as usize
    }

    /// The number of push streams, within 1 and [`MAX_PUSH_STREAMS`].
    pub fn push_stream_count(&self) -> u8 {
        self.push_streams.clamp(1, MAX_PUSH_STREAMS)
    }

    /// The reconnection delay before attempt `attempt` (0-based): exponential, capped.
    pub fn reconnect_delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.reconnect_delay_min.saturating_mul(factor).min(self.reconnect_delay_max)
    }
}
