//! Guest RAM backed by `vm-memory`'s `GuestMemoryMmap`, one mapping per block
//! of the [`MemoryMap`], with a per-page bitmap of the writes the VMM itself
//! makes (vm-memory's `AtomicBitmap`, set by every write through this type).
//!
//! Two kinds: anonymous memory, backed page by page on first touch
//! ([`GuestRam::new`]); and preallocated shared memory ([`GuestRam::new_preallocated`]):
//! one memfd, every page allocated up front and mapped twice, by the guest
//! and by a second "placement" mapping through which a destination writes
//! pages before mapping them into the guest's (`UFFDIO_CONTINUE`). Here, a
//! first touch of memory the host has reclaimed costs about 10 us a page:
//! preallocating takes that out of the migration (see docs/machine.md).
//! Preallocated RAM may be huge pages ([`GuestRam::new_preallocated_with`]):
//! a hugetlbfs memfd, whose pages the migration moves whole
//! (docs/hugepages.md); this type still names memory in 4 KiB pages.
//!
//! The guest's own writes are tracked by KVM's dirty log (see
//! [`crate::vm::Vm::take_dirty_log`]); a precopy round sends the union of
//! both.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::hugepages::{HugePageError, HugePageSize};
use crate::layout::{MemoryMap, MemoryMapError, PageRef, PAGE_SIZE};

/// Allocating, mapping or accessing guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The layout does not fit (or a page is not in it).
    #[error(transparent)]
    Layout(#[from] MemoryMapError),
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    /// An access to guest memory failed (address outside RAM).
    #[error("guest memory access at {gpa:#x} (+{len}) failed: {reason}")]
    GuestMemory {
        /// Guest-physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
        /// What went wrong.
        reason: String,
    },
    /// A buffer did not have the size the call requires.
    #[error("buffer of {got} bytes where {want} are required")]
    BadLength {
        /// Required length.
        want: usize,
        /// Given length.
        got: usize,
    },
    /// Huge pages cannot back this RAM.
    #[error(transparent)]
    HugePages(#[from] HugePageError),
    /// Placing pages needs RAM made by [`GuestRam::new_preallocated`].
    #[error("unsupported guest configuration: RAM is not preallocated")]
    NotPreallocated,
    /// An operating-system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, MemoryError>;

fn os_err(op: &'static str) -> impl FnOnce(std::io::Error) -> MemoryError {
    move |source| MemoryError::Os { op, source }
}

fn layout_err(reason: String) -> MemoryError {
    MemoryError::Layout(MemoryMapError::Invalid(reason))
}

/// The vm-memory type of guest RAM.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM: the layout and its host mappings.
#[derive(Debug)]
pub struct GuestRam {
    layout: MemoryMap,
    mem: GuestMemory,
    /// Host virtual address of each block's first byte.
    hosts: Vec<u64>,
    /// Preallocated RAM only: the second mapping of the same pages.
    placement: Option<GuestMemoryMmap<()>>,
    /// The huge pages backing the RAM, if any.
    huge: Option<HugePageSize>,
}

impl GuestRam {
    /// Allocates anonymous, zero-filled, lazily backed memory for `layout`.
    pub fn new(layout: MemoryMap) -> Result<Self> {
        let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> =
            block_sizes(&layout)?.into_iter().map(|(gpa, size)| (gpa, size, None)).collect();
        let mem = GuestMemory::from_ranges_with_files(&ranges).map_err(MemoryError::Allocate)?;
        Self::with_mappings(layout, mem, None)
    }

    /// Allocates every page of `layout` now, zero-filled, in one memfd
    /// mapped twice: the guest's mapping, and the placement mapping (see
    /// `GuestRam::place`). Takes as long as touching all of it.
    pub fn new_preallocated(layout: MemoryMap) -> Result<Self> {
        Self::new_preallocated_with(layout, None)
    }

    /// [`GuestRam::new_preallocated`] on huge pages of `huge` (None: 4 KiB
    /// pages): a hugetlbfs memfd (`MFD_HUGETLB`), whose every huge page is
    /// allocated now from the host's reserved pool. Fails with
    /// [`HugePageError`] when the pool has too few free pages or a block is
    /// not whole huge pages.
    pub fn new_preallocated_with(layout: MemoryMap, huge: Option<HugePageSize>) -> Result<Self> {
        Self::new_shared(layout, huge, true)
    }

    /// The shared memory of [`GuestRam::new_preallocated`] (one memfd of 4
    /// KiB pages, mapped twice), with no page allocated yet: returns at
    /// once, whatever the size. Pages are allocated by
    /// [`GuestRam::populate_pages`] (a background thread:
    /// [`crate::driver::populate::Population`]), or by the first write through the
    /// placement mapping. A page the guest touches before either is not in
    /// memory: registered with userfaultfd, that is a *missing* fault, not a
    /// minor one ([`crate::uffd::UffdRam::register`] registers both).
    pub fn new_unpopulated(layout: MemoryMap) -> Result<Self> {
        Self::new_shared(layout, None, false)
    }

    fn new_shared(layout: MemoryMap, huge: Option<HugePageSize>, populate: bool) -> Result<Self> {
        let sizes = block_sizes(&layout)?;
        let total: u64 = layout.blocks().iter().map(|b| b.size).sum();
        let mut flags = rustix::fs::MemfdFlags::CLOEXEC;
        if let Some(size) = huge {
            size.check_supported()?;
            for b in layout.blocks() {
                if b.gpa % size.bytes() != 0 || b.size % size.bytes() != 0 {
                    return Err(HugePageError::Unaligned { size, gpa: b.gpa, bytes: b.size }.into());
                }
            }
            size.check_free(total / size.bytes())?;
            flags |= rustix::fs::MemfdFlags::HUGETLB
                | match size {
                    HugePageSize::Size2M => rustix::fs::MemfdFlags::HUGE_2MB,
                    HugePageSize::Size1G => rustix::fs::MemfdFlags::HUGE_1GB,
                };
        }
        let fd = rustix::fs::memfd_create("postcopy-guest-ram", flags)
            .map_err(|e| MemoryError::Os { op: "memfd_create", source: e.into() })?;
        let file = Arc::new(std::fs::File::from(fd));
        file.set_len(total).map_err(os_err("ftruncate(guest RAM memfd)"))?;
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut offset = 0u64;
        for &(gpa, size) in &sizes {
            offsets.push((gpa, size, FileOffset::from_arc(file.clone(), offset)));
            offset += size as u64;
        }
        let guest: Vec<_> = offsets.iter().map(|(gpa, size, fo)| (*gpa, *size, Some(fo.clone()))).collect();
        let mem = GuestMemory::from_ranges_with_files(&guest).map_err(MemoryError::Allocate)?;
        let mut regions = Vec::with_capacity(offsets.len());
        for (gpa, size, fo) in offsets {
            let prot = libc::PROT_READ | libc::PROT_WRITE;
            let map = MmapRegion::<()>::build(Some(fo), size, prot, libc::MAP_SHARED | libc::MAP_NORESERVE)
                .map_err(|e| layout_err(format!("placement mapping at {:#x}: {e}", gpa.0)))?;
            if populate {
                // Allocates the pages and maps them writable here (not in
                // the guest's mapping): placing a page later is a plain copy.
                crate::sys::populate_write(&map).map_err(os_err("madvise(MADV_POPULATE_WRITE)"))?;
            }
            let region = GuestRegionMmap::new(map, gpa)
                .ok_or_else(|| layout_err(format!("placement region at {:#x} overflows", gpa.0)))?;
            regions.push(Arc::new(region));
        }
        let placement =
            GuestMemoryMmap::from_arc_regions(regions).map_err(|e| layout_err(format!("placement mapping: {e}")))?;
        let mut ram = Self::with_mappings(layout, mem, Some(placement))?;
        ram.huge = huge;
        Ok(ram)
    }

    /// Allocates `count` pages from `first` (one block) in the shared memory
    /// and maps them writable in the placement mapping
    /// (`MADV_POPULATE_WRITE`), as [`GuestRam::new_preallocated`] does for
    /// all RAM. Never changes a page's contents: a page already allocated
    /// (written through the placement mapping, or populated before) keeps
    /// them. The guest's mapping is left as it is. Shared RAM only.
    pub fn populate_pages(&self, first: PageRef, count: u64) -> Result<()> {
        let placement = self.placement.as_ref().ok_or(MemoryError::NotPreallocated)?;
        self.layout.check_range(first, count)?;
        let out_of_range =
            || MemoryMapError::PageOutOfRange { block: first.block, page: first.page.saturating_add(count) };
        let len = count.checked_mul(PAGE_SIZE).and_then(|l| usize::try_from(l).ok()).ok_or_else(out_of_range)?;
        let gpa = self.gpa(first)?;
        crate::sys::populate_guest_range(placement, gpa, len).map_err(os_err("madvise(MADV_POPULATE_WRITE)"))
    }

    fn with_mappings(layout: MemoryMap, mem: GuestMemory, placement: Option<GuestMemoryMmap<()>>) -> Result<Self> {
        let mut hosts = Vec::with_capacity(layout.blocks().len());
        for b in layout.blocks() {
            let region = mem
                .find_region(GuestAddress(b.gpa))
                .ok_or_else(|| layout_err(format!("no region for block {:?}", b.name)))?;
            hosts.push(region.as_ptr() as u64);
        }
        Ok(Self { layout, mem, hosts, placement, huge: None })
    }

    /// The huge pages backing this RAM, if any.
    pub fn huge_pages(&self) -> Option<HugePageSize> {
        self.huge
    }

    /// 4 KiB pages per page of the backing memory: 1, or 512 on 2 MiB huge
    /// pages. The migration moves memory in pages of this many.
    pub fn unit_pages(&self) -> u64 {
        self.huge.map_or(1, HugePageSize::small_pages)
    }

    /// Copies `buf.len()` bytes (whole 4 KiB pages, in one block) from page
    /// `first` into `buf`: a huge page at once.
    pub fn read_pages(&self, first: PageRef, buf: &mut [u8]) -> Result<()> {
        self.check_run(first, buf.len())?;
        let gpa = self.gpa(first)?;
        self.read(gpa, buf)
    }

    /// Overwrites `data.len()` bytes (whole pages, one block) from page
    /// `first`; a VMM write, marked in the VMM dirty bitmap.
    pub fn write_pages(&self, first: PageRef, data: &[u8]) -> Result<()> {
        self.check_run(first, data.len())?;
        let gpa = self.gpa(first)?;
        self.write(gpa, data)
    }

    /// Whether `count` pages from `first` are all zeros (stops at the first
    /// non-zero piece).
    pub fn pages_are_zero(&self, first: PageRef, count: u64) -> Result<bool> {
        self.layout.check_range(first, count)?;
        for page in first.page..first.page + count {
            if !self.page_is_zero(PageRef { page, ..first })? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn check_run(&self, first: PageRef, len: usize) -> Result<()> {
        if len == 0 || len % PAGE_SIZE as usize != 0 {
            return Err(MemoryError::BadLength {
                want: len.div_ceil(PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize,
                got: len,
            });
        }
        Ok(self.layout.check_range(first, len as u64 / PAGE_SIZE)?)
    }

    /// Whether every page is allocated in shared memory with a placement
    /// mapping ([`GuestRam::new_preallocated`]).
    pub fn is_preallocated(&self) -> bool {
        self.placement.is_some()
    }

    /// Writes `data` (whole pages) from page `first` through the placement
    /// mapping, not the guest's: no fault, no VMM dirty mark; the guest sees
    /// the pages once they are mapped into its mapping. Preallocated RAM only.
    ///
    /// Crate-private: it bypasses both the claims that keep a page mapped
    /// into the guest from being written again ([`crate::uffd`] calls it
    /// only for pages it claimed) and the VMM's dirty tracking.
    ///
    /// ```compile_fail
    /// # use postcopy_kvm::{GuestRam, PageRef, MemoryMap};
    /// let ram = GuestRam::new_preallocated(MemoryMap::pc(2 << 20).unwrap()).unwrap();
    /// ram.place(PageRef::new(0, 0), &[0u8; 4096]).unwrap(); // private: this does not compile
    /// ```
    pub(crate) fn place(&self, first: PageRef, data: &[u8]) -> Result<()> {
        let placement = self.placement.as_ref().ok_or(MemoryError::NotPreallocated)?;
        if data.is_empty() || data.len() % PAGE_SIZE as usize != 0 {
            return Err(MemoryError::BadLength {
                want: data.len().div_ceil(PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize,
                got: data.len(),
            });
        }
        self.layout.check_range(first, data.len() as u64 / PAGE_SIZE)?;
        let gpa = self.gpa(first)?;
        placement.write_slice(data, GuestAddress(gpa)).map_err(|e| mem_err(gpa, data.len(), e))
    }

    /// The layout.
    pub fn layout(&self) -> &MemoryMap {
        &self.layout
    }

    /// The underlying vm-memory object (for devices that use vm-memory).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Host virtual address and length of block `block`.
    pub fn block_host_range(&self, block: usize) -> Option<(u64, u64)> {
        let b = self.layout.block(block)?;
        Some((self.hosts[block], b.size))
    }

    /// Host virtual address of `count` pages from `first` (all in one block).
    pub fn pages_host_addr(&self, first: PageRef, count: u64) -> Result<u64> {
        self.layout.check_range(first, count)?;
        Ok(self.hosts[first.block] + first.page * PAGE_SIZE)
    }

    /// Drops `count` pages from `first` from the guest's mapping
    /// (`MADV_DONTNEED`): the next access faults (into userfaultfd when the
    /// RAM is registered).
    pub(crate) fn discard_pages(&self, first: PageRef, count: u64) -> Result<()> {
        self.layout.check_range(first, count)?;
        let out_of_range =
            || MemoryMapError::PageOutOfRange { block: first.block, page: first.page.saturating_add(count) };
        let len = count.checked_mul(PAGE_SIZE).and_then(|l| usize::try_from(l).ok()).ok_or_else(out_of_range)?;
        let gpa = self.gpa(first)?;
        crate::sys::discard_guest_range(&self.mem, gpa, len).map_err(os_err("madvise(MADV_DONTNEED)"))
    }

    /// The page at host virtual address `addr`, if it is guest RAM.
    pub fn page_of_host_addr(&self, addr: u64) -> Option<PageRef> {
        self.layout
            .blocks()
            .iter()
            .zip(&self.hosts)
            .enumerate()
            .find(|(_, (b, &h))| addr >= h && addr - h < b.size)
            .map(|(block, (_, &h))| PageRef { block, page: (addr - h) / PAGE_SIZE })
    }

    fn gpa(&self, page: PageRef) -> Result<u64> {
        self.layout.gpa_of(page).ok_or(MemoryMapError::PageOutOfRange { block: page.block, page: page.page }.into())
    }

    /// Copies page `page` into `buf` (exactly one page long).
    pub fn read_page(&self, page: PageRef, buf: &mut [u8]) -> Result<()> {
        check_len(buf.len(), PAGE_SIZE as usize)?;
        let gpa = self.gpa(page)?;
        self.read(gpa, buf)
    }

    /// Whether page `page` is all zeros. Reads it a piece at a time and stops
    /// at the first non-zero piece: for most pages, one read of 256 bytes.
    pub fn page_is_zero(&self, page: PageRef) -> Result<bool> {
        const PIECE: usize = 256;
        let gpa = self.gpa(page)?;
        let mut piece = [0u8; PIECE];
        for offset in (0..PAGE_SIZE).step_by(PIECE) {
            self.read(gpa + offset, &mut piece)?;
            if !postcopy_core::wire::is_zero_page(&piece) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Overwrites page `page` with `data` (exactly one page); a VMM write,
    /// so the page is marked in the VMM dirty bitmap.
    pub fn write_page(&self, page: PageRef, data: &[u8]) -> Result<()> {
        check_len(data.len(), PAGE_SIZE as usize)?;
        let gpa = self.gpa(page)?;
        self.write(gpa, data)
    }

    /// Reads guest memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.mem.read_slice(buf, GuestAddress(gpa)).map_err(|e| mem_err(gpa, buf.len(), e))
    }

    /// Writes guest memory at `gpa` (a VMM write: tracked).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem.write_slice(data, GuestAddress(gpa)).map_err(|e| mem_err(gpa, data.len(), e))
    }

    /// Reads a little-endian u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64 at `gpa` (tracked).
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<()> {
        self.write(gpa, &value.to_le_bytes())
    }

    /// Writes all RAM, block after block in layout order (no holes), to `out`
    /// (for `--dump-memory`). Touching pages that are missing under
    /// userfaultfd blocks until they arrive: dump only complete RAM.
    pub fn dump(&self, out: &mut impl std::io::Write) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK];
        for b in self.layout.blocks() {
            let mut gpa = b.gpa;
            while gpa < b.end() {
                let n = CHUNK.min((b.end() - gpa) as usize);
                self.read(gpa, &mut buf[..n])?;
                out.write_all(&buf[..n]).map_err(os_err("write memory dump"))?;
                gpa += n as u64;
            }
        }
        Ok(())
    }

    /// Returns the pages the VMM wrote since the last call, and clears the
    /// record.
    pub fn take_vmm_dirty(&self) -> DirtyBitmap {
        let blocks = self
            .layout
            .blocks()
            .iter()
            .map(|b| {
                self.mem
                    .find_region(GuestAddress(b.gpa))
                    .map(|r| r.get_mmap().bitmap().get_and_reset())
                    .unwrap_or_default()
            })
            .collect();
        DirtyBitmap::from_words(&self.layout, blocks)
    }
}

/// Each block's guest address and size.
fn block_sizes(layout: &MemoryMap) -> Result<Vec<(GuestAddress, usize)>> {
    layout
        .blocks()
        .iter()
        .map(|b| {
            usize::try_from(b.size)
                .map(|size| (GuestAddress(b.gpa), size))
                .map_err(|_| layout_err(format!("block {:?} too large", b.name)))
        })
        .collect()
}

fn check_len(got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(MemoryError::BadLength { want, got })
    }
}

fn mem_err(gpa: u64, len: usize, e: impl std::fmt::Display) -> MemoryError {
    MemoryError::GuestMemory { gpa, len, reason: e.to_string() }
}

/// A set of pages of a layout, one bit per page: 64-bit words per block,
/// page index = bit index (bit `i % 64` of word `i / 64`), as KVM's dirty log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    blocks: Vec<Vec<u64>>,
    pages: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty set for `layout`.
    pub fn empty(layout: &MemoryMap) -> Self {
        Self::from_words(layout, Vec::new())
    }

    /// A set from per-block words; missing words are zero, extra words and
    /// bits past each block's end are dropped.
    pub fn from_words(layout: &MemoryMap, mut words: Vec<Vec<u64>>) -> Self {
        let pages: Vec<u64> = layout.blocks().iter().map(|b| b.pages()).collect();
        words.resize(pages.len(), Vec::new());
        for (w, &n) in words.iter_mut().zip(&pages) {
            let nwords = n.div_ceil(64) as usize;
            w.resize(nwords, 0);
            if n % 64 != 0 {
                if let Some(last) = w.last_mut() {
                    *last &= (1u64 << (n % 64)) - 1;
                }
            }
        }
        Self { blocks: words, pages }
    }

    /// The words of block `block` (empty if there is no such block).
    pub fn block_words(&self, block: usize) -> &[u64] {
        self.blocks.get(block).map_or(&[], Vec::as_slice)
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Whether `page` is in the set (false for pages outside the layout).
    pub fn contains(&self, page: PageRef) -> bool {
        match self.blocks.get(page.block) {
            Some(w) if page.page < self.pages[page.block] => {
                w[(page.page / 64) as usize] & (1 << (page.page % 64)) != 0
            }
            _ => false,
        }
    }

    /// Adds `page`; returns false if it is outside the layout.
    pub fn insert(&mut self, page: PageRef) -> bool {
        match self.blocks.get_mut(page.block) {
            Some(w) if page.page < self.pages[page.block] => {
                w[(page.page / 64) as usize] |= 1 << (page.page % 64);
                true
            }
            _ => false,
        }
    }

    /// Adds every page of `other` (same layout).
    pub fn union_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.blocks.iter_mut().zip(&other.blocks) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= *y;
            }
        }
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.blocks.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.blocks.iter().flatten().all(|&w| w == 0)
    }

    /// The set as maximal runs of consecutive pages `(first, count)`, in
    /// block then page order (for batched discards and copies).
    pub fn runs(&self) -> impl Iterator<Item = (PageRef, u64)> + '_ {
        let mut pages = self.iter().peekable();
        std::iter::from_fn(move || {
            let first = pages.next()?;
            let mut count = 1;
            while pages.next_if(|p| p.block == first.block && p.page == first.page + count).is_some() {
                count += 1;
            }
            Some((first, count))
        })
    }

    /// The pages in the set, in block then page order.
    pub fn iter(&self) -> impl Iterator<Item = PageRef> + '_ {
        self.blocks.iter().enumerate().flat_map(|(block, words)| {
            words.iter().enumerate().flat_map(move |(i, &w)| {
                let mut rest = w;
                std::iter::from_fn(move || {
                    if rest == 0 {
                        return None;
                    }
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    Some(PageRef { block, page: i as u64 * 64 + u64::from(bit) })
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::MIB;

    #[test]
    fn vmm_writes_are_tracked_and_reset() {
        let ram = GuestRam::new(MemoryMap::pc(4 * MIB).unwrap()).unwrap();
        assert!(ram.take_vmm_dirty().is_empty());
        ram.write_u64(5 * PAGE_SIZE + 8, 42).unwrap();
        ram.write(PAGE_SIZE * 9 - 2, &[1, 2, 3, 4]).unwrap();
        let d = ram.take_vmm_dirty();
        let pages: Vec<_> = d.iter().collect();
        assert_eq!(pages, vec![PageRef::new(0, 5), PageRef::new(0, 8), PageRef::new(0, 9)]);
        assert!(ram.take_vmm_dirty().is_empty());
        // Reads do not mark.
        assert_eq!(ram.read_u64(5 * PAGE_SIZE + 8).unwrap(), 42);
        assert!(ram.take_vmm_dirty().is_empty());
    }

    #[test]
    fn dump_writes_blocks_in_order() {
        let layout = MemoryMap::new(vec![
            crate::layout::MemoryRegion { name: "a".into(), gpa: 0, size: 2 * MIB },
            crate::layout::MemoryRegion { name: "b".into(), gpa: 8 * MIB, size: 2 * MIB },
        ])
        .unwrap();
        let ram = GuestRam::new(layout).unwrap();
        ram.write_u64(8, 0x11).unwrap();
        ram.write_u64(8 * MIB + 16, 0x22).unwrap();
        let mut out = Vec::new();
        ram.dump(&mut out).unwrap();
        assert_eq!(out.len() as u64, 4 * MIB);
        assert_eq!(out[8], 0x11);
        assert_eq!(out[(2 * MIB + 16) as usize], 0x22);
        assert_eq!(out.iter().map(|&b| u64::from(b)).sum::<u64>(), 0x33);
    }

    #[test]
    fn page_io_checks_bounds_and_lengths() {
        let ram = GuestRam::new(MemoryMap::pc(2 * MIB).unwrap()).unwrap();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        assert!(ram.read_page(PageRef::new(0, 511), &mut buf).is_ok());
        assert!(ram.read_page(PageRef::new(0, 512), &mut buf).is_err());
        assert!(ram.read_page(PageRef::new(1, 0), &mut buf).is_err());
        assert!(ram.write_page(PageRef::new(0, 0), &buf[..100]).is_err());
        buf[7] = 9;
        ram.write_page(PageRef::new(0, 3), &buf).unwrap();
        let mut back = vec![0u8; PAGE_SIZE as usize];
        ram.read_page(PageRef::new(0, 3), &mut back).unwrap();
        assert_eq!(back, buf);
        assert!(ram.read_u64(2 * MIB).is_err());
    }

    #[test]
    fn zero_pages_are_told_apart_by_any_byte() {
        let ram = GuestRam::new(MemoryMap::pc(2 * MIB).unwrap()).unwrap();
        assert_eq!(ram.page_is_zero(PageRef::new(0, 5)).ok(), Some(true));
        for offset in [0, 255, 256, PAGE_SIZE - 1] {
            ram.write(5 * PAGE_SIZE + offset, &[1]).unwrap();
            assert_eq!(ram.page_is_zero(PageRef::new(0, 5)).ok(), Some(false), "byte {offset}");
            ram.write(5 * PAGE_SIZE + offset, &[0]).unwrap();
        }
        assert_eq!(ram.page_is_zero(PageRef::new(0, 5)).ok(), Some(true));
        assert!(ram.page_is_zero(PageRef::new(0, 512)).is_err());
    }

    #[test]
    fn host_addresses_map_back_to_pages() {
        let ram = GuestRam::new(MemoryMap::pc(4 * MIB).unwrap()).unwrap();
        let (h, len) = ram.block_host_range(0).unwrap();
        assert_eq!(len, 4 * MIB);
        assert_eq!(ram.page_of_host_addr(h + 3 * PAGE_SIZE + 17), Some(PageRef::new(0, 3)));
        assert_eq!(ram.page_of_host_addr(h + len), None);
        assert_eq!(ram.pages_host_addr(PageRef::new(0, 2), 3).unwrap(), h + 2 * PAGE_SIZE);
        assert!(ram.pages_host_addr(PageRef::new(0, 1023), 2).is_err());
    }

    #[test]
    fn bitmap_set_operations() {
        let layout = MemoryMap::pc(4 * GIB_TEST).unwrap();
        let mut a = DirtyBitmap::empty(&layout);
        assert!(a.insert(PageRef::new(0, 0)));
        assert!(a.insert(PageRef::new(1, 63)));
        assert!(a.insert(PageRef::new(1, 64)));
        assert!(!a.insert(PageRef::new(2, 0)));
        assert!(!a.insert(PageRef::new(1, 1 << 40)));
        let mut b = DirtyBitmap::empty(&layout);
        b.insert(PageRef::new(0, 0));
        b.insert(PageRef::new(0, 100));
        a.union_with(&b);
        assert_eq!(a.count(), 4);
        assert!(a.contains(PageRef::new(0, 100)));
        assert!(!a.contains(PageRef::new(0, 101)));
        let v: Vec<_> = a.iter().collect();
        assert_eq!(v, vec![PageRef::new(0, 0), PageRef::new(0, 100), PageRef::new(1, 63), PageRef::new(1, 64)]);
        let runs: Vec<_> = a.runs().collect();
        assert_eq!(runs, vec![(PageRef::new(0, 0), 1), (PageRef::new(0, 100), 1), (PageRef::new(1, 63), 2)]);
        // Bits past a block's end are dropped.
        let l2 = MemoryMap::pc(2 * MIB).unwrap(); // 512 pages = 8 words
        let d = DirtyBitmap::from_words(&l2, vec![vec![u64::MAX; 9]]);
        assert_eq!(d.count(), 512);
    }

    const GIB_TEST: u64 = 1 << 30;
}
