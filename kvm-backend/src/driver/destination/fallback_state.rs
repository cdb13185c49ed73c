//! The destination's fallback state (docs/fallback.md): who holds the
//! vCPUs stopped (the lease, a checkpoint, the source's takeover) and the
//! checkpoints' log and the copy-on-write checkpoint in progress. Kept
//! apart from the driver so that the driver's state and the checkpoint
//! code both depend on it, not on each other.

use postcopy_core::PageNumber;

use crate::driver::machine::PageMap;
use crate::driver::report::FallbackSummary;
use crate::memory::GuestRam;

/// Who holds the vCPUs stopped. They run only when no one does.
#[derive(Debug, Default)]
pub(crate) struct VcpuHold {
    /// The lease lapsed (until a renewal or the release).
    pub(crate) fenced: bool,
    /// A checkpoint is being taken.
    pub(crate) checkpointing: bool,
    /// The source took the guest back: this copy never runs again.
    pub(crate) discarded: bool,
}

impl VcpuHold {
    pub(super) fn may_run(&self) -> bool {
        !self.fenced && !self.checkpointing && !self.discarded
    }
}

/// The summary and the stop times it is computed from.
#[derive(Debug, Default)]
pub(crate) struct FallbackLog {
    pub(crate) summary: FallbackSummary,
    pub(super) stops_us: Vec<f64>,
    /// Pages read from (and so cleared in) KVM's dirty log by a checkpoint
    /// that then failed: the next checkpoint includes them.
    pub(super) carried: Vec<PageNumber>,
}

/// A checkpoint whose pages are write-protected: ahead of its stop, or
/// after it and copied on write.
pub(crate) struct CopyOnWrite {
    /// The pages, in order, and whether each is copied (into `buf`).
    pub(super) pages: Vec<PageNumber>,
    pub(super) copied: Vec<bool>,
    pub(super) buf: Vec<u8>,
    pub(super) page_bytes: usize,
    /// Pages the fault thread copied before a write.
    pub(super) on_write: u64,
    /// Protected ahead of the stop, the guest still running: a write lets
    /// its page go (KVM logs the write, so the stop protects it again).
    pub(super) ahead: bool,
    /// Ahead of the stop: which pages a write let go.
    pub(super) released: Vec<bool>,
}

impl CopyOnWrite {
    /// `pages` (in order) protected ahead of the stop.
    pub(super) fn ahead(pages: Vec<PageNumber>) -> CopyOnWrite {
        let released = vec![false; pages.len()];
        CopyOnWrite { pages, copied: Vec::new(), buf: Vec::new(), page_bytes: 0, on_write: 0, ahead: true, released }
    }

    /// `pages` (in order) of the instant of the stop, to be copied into
    /// `buf` (at least as long as they are).
    pub(super) fn at_the_stop(pages: Vec<PageNumber>, page_bytes: usize, buf: Vec<u8>) -> CopyOnWrite {
        let copied = vec![false; pages.len()];
        CopyOnWrite { pages, copied, buf, page_bytes, on_write: 0, ahead: false, released: Vec::new() }
    }

    /// Copies page `i` unless it is copied; returns whether it copied.
    pub(super) fn copy(&mut self, map: &PageMap, ram: &GuestRam, i: usize) -> bool {
        if self.copied.get(i) != Some(&false) {
            return false; // copied, or ahead of the stop: nothing to copy
        }
        let out = &mut self.buf[i * self.page_bytes..(i + 1) * self.page_bytes];
        let read = map.page_ref(self.pages[i]).map(|r| ram.read_pages(r, out));
        if !matches!(read, Some(Ok(()))) {
            tracing::error!(page = self.pages[i].0, ?read, "cannot read a checkpoint page");
            return false;
        }
        self.copied[i] = true;
        true
    }
}
