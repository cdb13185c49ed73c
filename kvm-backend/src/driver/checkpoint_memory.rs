//! The memory fallback's checkpoints pass through (docs/fallback.md): on
//! the destination, the copy of a checkpoint being sent; on the source,
//! what the pages of the checkpoint being received overwrote (its undo
//! log). Fresh memory costs a first touch per page, and on these hosts a
//! first touch costs 10-30 us while a guest runs, against about 1.3 us
//! when none does (docs/machine.md): a checkpoint of 170 MB staged in fresh
//! memory took 0.3 s to receive instead of 30 ms. So this memory is
//! reserved (taken and touched) when fallback is turned on, before the
//! guest runs where that can be, and kept from one checkpoint, and one
//! migration, to the next.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::devices::lock;
use crate::layout::PAGE_SIZE;

/// Buffers for checkpoints, kept: one process's, shared by its migrations.
/// A buffer is taken for a checkpoint (`CheckpointMemory::take`), lent to
/// the core's frames (`CheckpointMemory::lend`) and comes back when the
/// last of them is dropped, or given back (`CheckpointMemory::give_back`).
#[derive(Clone, Debug, Default)]
pub struct CheckpointMemory(Arc<Mutex<Pool>>);

#[derive(Debug, Default)]
struct Pool {
    /// The longest buffer back from its checkpoint, or reserved.
    kept: Option<Vec<u8>>,
    /// Buffers too short to keep, freed by [`CheckpointMemory::free_retired`]:
    /// unmapping 300 MB took milliseconds, and [`CheckpointMemory::take`]
    /// runs while the guest is stopped, [`CheckpointMemory::give_back`]
    /// under the core's lock.
    retired: Vec<Vec<u8>>,
}

impl CheckpointMemory {
    /// Makes sure a buffer of at least `bytes` is kept, every page of it
    /// touched now; returns how long that took (zero if one was kept).
    pub fn reserve(&self, bytes: usize) -> Duration {
        if self.kept_bytes() >= bytes {
            return Duration::ZERO;
        }
        let t0 = Instant::now();
        let buf = touched(bytes);
        self.give_back(buf);
        self.free_retired();
        t0.elapsed()
    }

    /// Bytes of the buffer kept (0: none, or it is lent).
    pub fn kept_bytes(&self) -> usize {
        lock(&self.0).kept.as_ref().map_or(0, Vec::len)
    }

    /// A buffer of at least `bytes`: the kept one if it is long enough (its
    /// old contents are there: every page is written before it is read),
    /// or a new one with room for half as much again, up to `at_most` (a
    /// checkpoint larger than the last is likely followed by a larger
    /// still), untouched until written (so that taking it during a
    /// checkpoint's stop costs nothing).
    pub(crate) fn take(&self, bytes: usize, at_most: usize) -> Vec<u8> {
        let mut pool = lock(&self.0);
        match pool.kept.take() {
            Some(buf) if buf.len() >= bytes => buf,
            short => {
                if let Some(short) = &short {
                    tracing::info!(
                        kept = short.len(),
                        needed = bytes,
                        "a checkpoint outgrew the checkpoint memory: fresh memory (a first touch per page)"
                    );
                }
                pool.retired.extend(short);
                vec![0u8; bytes.saturating_add(bytes / 2).min(at_most).max(bytes)]
            }
        }
    }

    /// `buf` as shared bytes that return it here when the last is dropped.
    pub(crate) fn lend(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Lent { buf, pool: self.clone() })
    }

    /// A buffer back (its checkpoint acknowledged, or failed): kept for
    /// the next checkpoint if it is the longest.
    pub(crate) fn give_back(&self, buf: Vec<u8>) {
        let mut pool = lock(&self.0);
        let keep = pool.kept.as_ref().is_none_or(|k| k.len() < buf.len());
        let retire = if keep { pool.kept.replace(buf) } else { Some(buf) };
        pool.retired.extend(retire);
    }

    /// Frees the buffers too short to keep (call where a pause costs
    /// nothing: the guest running, no lock held).
    pub(crate) fn free_retired(&self) {
        let retired = std::mem::take(&mut lock(&self.0).retired);
        drop(retired);
    }
}

/// A buffer of `bytes` with every page written once (so mapped).
fn touched(bytes: usize) -> Vec<u8> {
    let mut buf = vec![0u8; bytes];
    for page in buf.chunks_mut(PAGE_SIZE as usize) {
        page[0] = 1;
    }
    buf
}

/// A buffer lent to the core's frames.
struct Lent {
    buf: Vec<u8>,
    pool: CheckpointMemory,
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
    use super::CheckpointMemory;
    use crate::devices::lock;

    #[test]
    fn a_lent_buffer_comes_back_when_its_last_slice_is_dropped() {
        let pool = CheckpointMemory::default();
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

    #[test]
    fn a_reservation_is_kept_touched_and_taken_first() {
        let pool = CheckpointMemory::default();
        pool.reserve(5 * 4096 + 1);
        assert_eq!(pool.kept_bytes(), 5 * 4096 + 1);
        // Every page was written (mapped): the buffer is not the zero
        // pages of a fresh allocation.
        let buf = pool.take(4096, 4096);
        assert_eq!(buf.len(), 5 * 4096 + 1);
        assert!(buf.chunks(4096).all(|page| page[0] == 1));
        let at = buf.as_ptr();
        pool.give_back(buf);
        // Enough kept: nothing new.
        assert!(pool.reserve(4096).is_zero());
        let kept = pool.take(0, 0);
        assert_eq!(kept.as_ptr(), at);
        drop(kept);
        // A larger reservation replaces it.
        pool.reserve(8 * 4096);
        assert_eq!(pool.kept_bytes(), 8 * 4096);
        assert!(lock(&pool.0).retired.is_empty());
    }
}
