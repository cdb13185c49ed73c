//! Per-page bits shared by threads outside any lock, checked with `loom`
//! (`RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p
//! postcopy-kvm --release --locked --lib -- page_bits driver::sync`):
//!
//! - [`PageBits`]: one bit per page with an exact count of the set bits
//!   (the destination driver's pages installed; the claims below).
//! - `MappedPages`: preallocated RAM's claims, one bit per page mapped
//!   (or about to be mapped) into the guest's mapping, kept in step with
//!   the mapping itself: discards exclude installs, so no install ever sees
//!   a page unmapped but still claimed, or mapped but unclaimed.
//!
//! It sits below both [`crate::uffd`] (the claims) and [`crate::driver`]
//! (pages installed).

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
use loom::sync::{RwLock, RwLockReadGuard};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::{RwLock, RwLockReadGuard};

/// One bit per page, with a count of the set bits.
#[derive(Debug)]
pub struct PageBits {
    words: Box<[AtomicU64]>,
    len: u64,
    ones: AtomicU64,
}

impl PageBits {
    /// `len` clear bits.
    pub fn new(len: u64) -> Self {
        let words = (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, len, ones: AtomicU64::new(0) }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets bit `i`; returns whether it was clear. Out of range: false.
    pub fn set(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let Some(word) = self.words.get((i / 64) as usize) else { return false };
        let bit = 1u64 << (i % 64);
        let was_clear = word.fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if was_clear {
            self.ones.fetch_add(1, Ordering::AcqRel);
        }
        was_clear
    }

    /// Clears bit `i`; returns whether it was set.
    pub fn clear(&self, i: u64) -> bool {
        let Some(word) = self.words.get((i / 64) as usize) else { return false };
        let bit = 1u64 << (i % 64);
        let was_set = word.fetch_and(!bit, Ordering::AcqRel) & bit != 0;
        // A branch, not `ones -= u64::from(was_set)`: see core/src/bitmap.rs
        // for the release-mode miscompile of that form.
        if was_set {
            self.ones.fetch_sub(1, Ordering::AcqRel);
        }
        was_set
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.words.get((i / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Number of set bits (exact once the writers are done).
    pub fn count(&self) -> u64 {
        self.ones.load(Ordering::Acquire)
    }

    /// The first clear bit, if any (end-of-run checks).
    pub fn first_clear(&self) -> Option<u64> {
        self.words.iter().enumerate().find_map(|(w, word)| {
            let v = word.load(Ordering::Acquire);
            let bit = u64::from((!v).trailing_zeros());
            let i = w as u64 * 64 + bit;
            (v != u64::MAX && i < self.len).then_some(i)
        })
    }
}

/// Preallocated RAM's claims: per block, one bit per page mapped (or being
/// mapped) into the guest's mapping. An installer claims a page before it
/// writes the page through the placement mapping and maps it; a page once
/// claimed is never written again, so a late copy cannot overwrite what a
/// vCPU already uses.
///
/// The bits and the mapping change together: installers hold a shared
/// [`ClaimGuard`] from their first claim until the pages are mapped (or the
/// claims released); a discard holds the table exclusively while it unmaps
/// and clears. Without that, a discard racing an install could leave a
/// mapped page unclaimed (the next install writes into a page the guest
/// uses) or a claimed page unmapped (new data dropped as already present).
#[derive(Debug)]
pub(crate) struct MappedPages {
    blocks: Vec<PageBits>,
    discarding: RwLock<()>,
}

impl MappedPages {
    /// No page mapped, for blocks of `pages[i]` pages.
    pub(crate) fn new(pages: impl IntoIterator<Item = u64>) -> Self {
        Self { blocks: pages.into_iter().map(PageBits::new).collect(), discarding: RwLock::new(()) }
    }

    /// Number of blocks.
    pub(crate) fn blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Shared access for an install: claims taken and released under it are
    /// never interleaved with a discard.
    pub(crate) fn claim(&self) -> ClaimGuard<'_> {
        ClaimGuard { blocks: &self.blocks, _shared: self.discarding.read().unwrap_or_else(|e| e.into_inner()) }
    }

    /// Unmaps pages `first..first + count` of `block` with `unmap`, then
    /// clears their claims, with no install in between. The claims are
    /// cleared even if `unmap` fails: the pages are missing for the
    /// protocol, so the next install must write them (a page that stayed
    /// mapped then reports itself as such, see [`crate::uffd`]).
    pub(crate) fn discard<T>(&self, block: usize, first: u64, count: u64, unmap: impl FnOnce() -> T) -> T {
        let _exclusive = self.discarding.write().unwrap_or_else(|e| e.into_inner());
        let out = unmap();
        if let Some(bits) = self.blocks.get(block) {
            for page in first..first.saturating_add(count) {
                bits.clear(page);
            }
        }
        out
    }
}

/// An install's shared hold on [`MappedPages`] (see [`MappedPages::claim`]).
#[derive(Debug)]
pub(crate) struct ClaimGuard<'a> {
    blocks: &'a [PageBits],
    _shared: RwLockReadGuard<'a, ()>,
}

impl ClaimGuard<'_> {
    /// Claims `page` of `block`; returns whether it was unclaimed (the
    /// caller now owns writing and mapping it). No such page: false.
    pub(crate) fn take(&self, block: usize, page: u64) -> bool {
        self.blocks.get(block).is_some_and(|b| b.set(page))
    }

    /// Gives back the claim on a page that was not mapped after all.
    pub(crate) fn release(&self, block: usize, page: u64) {
        if let Some(b) = self.blocks.get(block) {
            b.clear(page);
        }
    }

    /// Whether `page` of `block` is claimed.
    pub(crate) fn is_claimed(&self, block: usize, page: u64) -> bool {
        self.blocks.get(block).is_some_and(|b| b.get(page))
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn page_bits_count_matches_bits_under_races() {
        loom::model(|| {
            let bits = Arc::new(PageBits::new(130));
            let a = {
                let bits = bits.clone();
                thread::spawn(move || {
                    bits.set(1);
                    bits.set(129);
                    bits.clear(1);
                })
            };
            let b = {
                let bits = bits.clone();
                thread::spawn(move || {
                    bits.set(1);
                    bits.set(2);
                })
            };
            a.join().unwrap();
            b.join().unwrap();
            let expected = (0..130).filter(|&i| bits.get(i)).count() as u64;
            assert_eq!(bits.count(), expected);
            assert!(bits.get(129) && bits.get(2));
        });
    }

    /// A discard racing an install of the same page: at the end, the page
    /// is claimed exactly when it is mapped, whatever the interleaving. The
    /// mapping is a flag here; `unmap` and "map" are what the kernel does.
    #[test]
    fn discard_and_install_keep_claims_and_mapping_in_step() {
        loom::model(|| {
            let claims = Arc::new(MappedPages::new([2]));
            let mapped = Arc::new(loom::sync::atomic::AtomicBool::new(false));
            let installer = {
                let (claims, mapped) = (claims.clone(), mapped.clone());
                thread::spawn(move || {
                    let guard = claims.claim();
                    if guard.take(0, 1) {
                        // Written through the placement mapping, then mapped.
                        mapped.store(true, Ordering::SeqCst);
                    }
                })
            };
            let discarder = {
                let (claims, mapped) = (claims.clone(), mapped.clone());
                thread::spawn(move || claims.discard(0, 1, 1, || mapped.store(false, Ordering::SeqCst)))
            };
            installer.join().unwrap();
            discarder.join().unwrap();
            assert_eq!(claims.claim().is_claimed(0, 1), mapped.load(Ordering::SeqCst));
        });
    }

    /// A partial map: the installer claimed two pages, mapped the first,
    /// failed on the second and released only that one; a concurrent
    /// discard of the first leaves claims and mapping in step.
    #[test]
    fn a_partial_map_releases_only_the_unmapped_claims() {
        loom::model(|| {
            let claims = Arc::new(MappedPages::new([2]));
            let mapped =
                Arc::new([loom::sync::atomic::AtomicBool::new(false), loom::sync::atomic::AtomicBool::new(false)]);
            let installer = {
                let (claims, mapped) = (claims.clone(), mapped.clone());
                thread::spawn(move || {
                    let guard = claims.claim();
                    if guard.take(0, 0) && guard.take(0, 1) {
                        mapped[0].store(true, Ordering::SeqCst);
                        guard.release(0, 1);
                    }
                })
            };
            let discarder = {
                let (claims, mapped) = (claims.clone(), mapped.clone());
                thread::spawn(move || claims.discard(0, 0, 1, || mapped[0].store(false, Ordering::SeqCst)))
            };
            installer.join().unwrap();
            discarder.join().unwrap();
            let guard = claims.claim();
            for page in 0..2 {
                assert_eq!(guard.is_claimed(0, page), mapped[page as usize].load(Ordering::SeqCst), "page {page}");
            }
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn page_bits_basics() {
        let bits = PageBits::new(130);
        assert!(bits.set(0) && !bits.set(0));
        assert!(bits.set(129));
        assert!(!bits.set(130), "out of range");
        assert_eq!(bits.count(), 2);
        assert_eq!(bits.first_clear(), Some(1));
        assert!(bits.clear(0) && !bits.clear(0));
        assert_eq!(bits.count(), 1);
        for i in 0..130 {
            bits.set(i);
        }
        assert_eq!(bits.first_clear(), None);
        assert_eq!(bits.count(), 130);
    }

    #[test]
    fn claims_follow_discards() {
        let claims = MappedPages::new([3, 5]);
        assert_eq!(claims.blocks(), 2);
        {
            let guard = claims.claim();
            assert!(guard.take(1, 4) && !guard.take(1, 4));
            assert!(!guard.take(2, 0), "no such block");
            assert!(!guard.take(0, 3), "no such page");
            guard.release(1, 4);
            assert!(guard.take(1, 4));
        }
        let unmapped = claims.discard(1, 3, 2, || "unmapped");
        assert_eq!(unmapped, "unmapped");
        assert!(!claims.claim().is_claimed(1, 4));
    }
}
