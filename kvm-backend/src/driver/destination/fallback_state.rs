//! The destination's fallback state (docs/fallback.md): who holds the
//! vCPUs stopped (the lease, a checkpoint, the source's takeover) and the
//! checkpoints' log and the copy-on-write checkpoint in progress. Kept
//! apart from the driver so that the driver's state and the checkpoint
//! code both depend on it, not on each other.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use postcopy_core::PageNumber;

use crate::devices::lock;

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

/// The checkpoints' copy buffer, kept from one checkpoint to the next: a
/// fresh buffer costs a first touch per page (about 10 us here for memory
/// the host had reclaimed: 0.6 s for a checkpoint of 60k pages), and the
/// destination takes one checkpoint at a time. The buffer is lent to the
/// core's frames ([`BufferPool::lend`]) and comes back when the last of
/// them is dropped, once the source acknowledged the checkpoint.
#[derive(Clone, Debug, Default)]
pub(crate) struct BufferPool(Arc<Mutex<Pool>>);

#[derive(Debug, Default)]
struct Pool {
    /// The longest buffer back from its checkpoint.
    kept: Option<Vec<u8>>,
    /// Buffers too short to keep, freed by [`BufferPool::free_retired`]:
    /// unmapping 300 MB took milliseconds, and [`BufferPool::take`] runs
    /// while the guest is stopped, [`BufferPool::give_back`] under the
    /// core's lock.
    retired: Vec<Vec<u8>>,
}

impl BufferPool {
    /// A buffer of at least `bytes`: the kept one if it is long enough (its
    /// old contents are there: every page is copied before it is read), or
    /// a new one with room for half as much again, up to `at_most` (a
    /// checkpoint larger than the last is likely followed by a larger
    /// still), untouched until written (so that taking it during a
    /// checkpoint's stop costs nothing).
    pub(super) fn take(&self, bytes: usize, at_most: usize) -> Vec<u8> {
        let mut pool = lock(&self.0);
        match pool.kept.take() {
            Some(buf) if buf.len() >= bytes => buf,
            short => {
                pool.retired.extend(short);
                vec![0u8; bytes.saturating_add(bytes / 2).min(at_most).max(bytes)]
            }
        }
    }

    /// `buf` as shared bytes that return it here when the last is dropped.
    pub(super) fn lend(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Lent { buf, pool: self.clone() })
    }

    /// A buffer back (its checkpoint acknowledged, or failed): kept for
    /// the next checkpoint if it is the longest.
    pub(super) fn give_back(&self, buf: Vec<u8>) {
        let mut pool = lock(&self.0);
        let keep = pool.kept.as_ref().is_none_or(|k| k.len() < buf.len());
        let retire = if keep { pool.kept.replace(buf) } else { Some(buf) };
        pool.retired.extend(retire);
    }

    /// Frees the buffers too short to keep (call where a pause costs
    /// nothing: the guest running, no lock held).
    pub(super) fn free_retired(&self) {
        let retired = std::mem::take(&mut lock(&self.0).retired);
        drop(retired);
    }
}

/// A buffer lent to the core's frames.
struct Lent {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;
    use crate::devices::lock;

    #[test]
    fn a_lent_buffer_comes_back_when_its_last_slice_is_dropped() {
        let pool = BufferPool::default();
        let mut buf = pool.take(8192, 8192);
        assert_eq!(buf.len(), 8192);
        buf[0] = 7;
        let at = buf.as_ptr();
        let bytes = pool.lend(buf);
        let slice = bytes.slice(4096..8192);
        drop(bytes);
        // Still lent: a new buffer.
        let other = pool.take(4096, 1 << 20);
        assert_ne!(other.as_ptr(), at);
        // With room for half as much again.
        assert_eq!((other.len(), other[0]), (6144, 0));
        drop(slice);
        // Back: the same memory, for anything no longer than it.
        let again = pool.take(4096, 8192);
        assert_eq!((again.as_ptr(), again.len(), again[0]), (at, 8192, 7));
        pool.give_back(again);
        // Too short for a larger checkpoint: a new one, zeroed; the short
        // one is freed only when asked.
        let larger = pool.take(16384, 20000);
        assert_eq!((larger.len(), larger[0]), (20000, 0));
        assert_eq!(lock(&pool.0).retired.len(), 1);
        pool.give_back(larger);
        assert_eq!(lock(&pool.0).kept.as_ref().map(Vec::len), Some(20000));
        pool.free_retired();
        assert!(lock(&pool.0).retired.is_empty());
    }
}
