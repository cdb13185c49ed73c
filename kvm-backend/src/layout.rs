//! Guest RAM layout: named blocks of 4 KiB pages at guest-physical addresses.
//!
//! A page is named by [`PageRef`] (block index, page index in the block);
//! that is the unit the migration moves.

use serde::{Deserialize, Serialize};

/// A [`MemoryMap`] that cannot be, or a page it does not have (the
/// protocol's view of the layout has its own `postcopy_core::LayoutError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryMapError {
    /// The RAM layout is not valid.
    #[error("invalid RAM layout: {0}")]
    Invalid(String),
    /// A page reference names no page of the layout.
    #[error("page {page} of block {block} is out of range")]
    PageOutOfRange {
        /// Block index.
        block: usize,
        /// Page index in the block.
        page: u64,
    },
}

type Result<T> = std::result::Result<T, MemoryMapError>;

/// Size of a guest page in bytes.
pub const PAGE_SIZE: u64 = crate::guest::abi::GUEST_PAGE_SIZE;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;
/// Start of the MMIO hole below 4 GiB (as on a PC: LAPIC, IOAPIC, PCI holes
/// live there). RAM beyond this goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 * GIB;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 4 * GIB;
/// Largest guest RAM supported (bounded by the identity map of the built-in
/// guest: 64 page directories of 1 GiB each, hole included).
pub const MAX_RAM_BYTES: u64 = 63 * GIB;
/// Most blocks in a layout.
pub const MAX_BLOCKS: usize = 8;

/// One contiguous region of guest RAM in guest-physical memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Name, unique in the layout (e.g. "ram-below-4g").
    pub name: String,
    /// Guest-physical address of the first byte (page aligned).
    pub gpa: u64,
    /// Size in bytes (a multiple of the page size, non-zero).
    pub size: u64,
}

impl MemoryRegion {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// First guest-physical address after the block.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Whether `gpa` lies in the block.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
}

/// A page of guest RAM: block index and page index within the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PageRef {
    /// Index of the block in the layout.
    pub block: usize,
    /// Index of the page in the block.
    pub page: u64,
}

impl PageRef {
    /// Shorthand constructor.
    pub fn new(block: usize, page: u64) -> Self {
        Self { block, page }
    }
}

/// Where a guest's RAM lies in guest-physical memory: non-overlapping
/// regions in ascending address order. (The protocol's view of the same
/// RAM, named blocks of pages, is `postcopy_core::RamLayout`.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMap {
    blocks: Vec<MemoryRegion>,
}

impl MemoryMap {
    /// Checks and builds a layout.
    pub fn new(blocks: Vec<MemoryRegion>) -> Result<Self> {
        if blocks.is_empty() || blocks.len() > MAX_BLOCKS {
            return Err(MemoryMapError::Invalid(format!("{} blocks (1..={MAX_BLOCKS} allowed)", blocks.len())));
        }
        let mut prev_end = 0u64;
        let mut total = 0u64;
        for (i, b) in blocks.iter().enumerate() {
            if b.size == 0 || b.size % PAGE_SIZE != 0 || b.gpa % PAGE_SIZE != 0 {
                return Err(MemoryMapError::Invalid(format!(
                    "block {:?} at {:#x} size {:#x} is empty or not page aligned",
                    b.name, b.gpa, b.size
                )));
            }
            let end = b
                .gpa
                .checked_add(b.size)
                .ok_or_else(|| MemoryMapError::Invalid(format!("block {:?} wraps the address space", b.name)))?;
            if i > 0 && b.gpa < prev_end {
                return Err(MemoryMapError::Invalid(format!("block {:?} overlaps or is out of order", b.name)));
            }
            if blocks[..i].iter().any(|o| o.name == b.name) {
                return Err(MemoryMapError::Invalid(format!("duplicate block name {:?}", b.name)));
            }
            prev_end = end;
            total += b.size;
        }
        if total > MAX_RAM_BYTES {
            return Err(MemoryMapError::Invalid(format!("{total} bytes of RAM, at most {MAX_RAM_BYTES}")));
        }
        Ok(Self { blocks })
    }

    /// The PC layout for `ram_bytes` of RAM: "ram-below-4g" from 0 up to the
    /// MMIO hole at 3 GiB, and "ram-above-4g" from 4 GiB for the rest.
    pub fn pc(ram_bytes: u64) -> Result<Self> {
        if ram_bytes < 2 * MIB || ram_bytes % (2 * MIB) != 0 {
            return Err(MemoryMapError::Invalid(format!("RAM size {ram_bytes} must be a non-zero multiple of 2 MiB")));
        }
        let below = ram_bytes.min(MMIO_HOLE_START);
        let mut blocks = vec![MemoryRegion { name: "ram-below-4g".into(), gpa: 0, size: below }];
        if ram_bytes > below {
            blocks.push(MemoryRegion { name: "ram-above-4g".into(), gpa: MMIO_HOLE_END, size: ram_bytes - below });
        }
        Self::new(blocks)
    }

    /// The blocks.
    pub fn blocks(&self) -> &[MemoryRegion] {
        &self.blocks
    }

    /// Block `index`, if any.
    pub fn block(&self, index: usize) -> Option<&MemoryRegion> {
        self.blocks.get(index)
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.size).sum()
    }

    /// Total number of pages.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes() / PAGE_SIZE
    }

    /// First address above all RAM.
    pub fn top(&self) -> u64 {
        self.blocks.last().map_or(0, MemoryRegion::end)
    }

    /// The page holding `gpa`, if `gpa` is RAM.
    pub fn locate(&self, gpa: u64) -> Option<PageRef> {
        self.blocks
            .iter()
            .position(|b| b.contains(gpa))
            .map(|block| PageRef { block, page: (gpa - self.blocks[block].gpa) / PAGE_SIZE })
    }

    /// Guest-physical address of `page`, if it exists.
    pub fn gpa_of(&self, page: PageRef) -> Option<u64> {
        let b = self.blocks.get(page.block)?;
        (page.page < b.pages()).then(|| b.gpa + page.page * PAGE_SIZE)
    }

    /// Checks that `count` pages from `first` exist in one block.
    pub fn check_range(&self, first: PageRef, count: u64) -> Result<()> {
        let b = self
            .blocks
            .get(first.block)
            .ok_or(MemoryMapError::PageOutOfRange { block: first.block, page: first.page })?;
        match first.page.checked_add(count) {
            Some(end) if end <= b.pages() => Ok(()),
            _ => Err(MemoryMapError::PageOutOfRange { block: first.block, page: first.page.saturating_add(count) }),
        }
    }

    /// Every page of the layout, block by block.
    pub fn pages(&self) -> impl Iterator<Item = PageRef> + '_ {
        self.blocks.iter().enumerate().flat_map(|(block, b)| (0..b.pages()).map(move |page| PageRef { block, page }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pc_layout_small_is_one_block() {
        let l = MemoryMap::pc(64 * MIB).unwrap();
        assert_eq!(l.blocks().len(), 1);
        assert_eq!(l.total_pages(), 64 * MIB / PAGE_SIZE);
        assert_eq!(l.top(), 64 * MIB);
    }

    #[test]
    fn pc_layout_large_skips_the_hole() {
        let l = MemoryMap::pc(8 * GIB).unwrap();
        assert_eq!(l.blocks().len(), 2);
        assert_eq!(l.blocks()[0].end(), MMIO_HOLE_START);
        assert_eq!(l.blocks()[1].gpa, MMIO_HOLE_END);
        assert_eq!(l.total_bytes(), 8 * GIB);
        assert_eq!(l.top(), 9 * GIB);
        assert_eq!(l.locate(MMIO_HOLE_START), None);
        assert_eq!(l.locate(MMIO_HOLE_END + PAGE_SIZE), Some(PageRef::new(1, 1)));
        assert_eq!(l.gpa_of(PageRef::new(1, 1)), Some(MMIO_HOLE_END + PAGE_SIZE));
        assert_eq!(l.gpa_of(PageRef::new(1, 5 * GIB / PAGE_SIZE)), None);
        assert_eq!(l.gpa_of(PageRef::new(2, 0)), None);
    }

    #[test]
    fn bad_layouts_are_rejected() {
        assert!(MemoryMap::pc(0).is_err());
        assert!(MemoryMap::pc(3 * MIB).is_err());
        assert!(MemoryMap::pc(64 * GIB).is_err());
        let b = |name: &str, gpa, size| MemoryRegion { name: name.into(), gpa, size };
        assert!(MemoryMap::new(vec![]).is_err());
        assert!(MemoryMap::new(vec![b("a", 0, 100)]).is_err());
        assert!(MemoryMap::new(vec![b("a", 0, 2 * MIB), b("b", MIB, 2 * MIB)]).is_err());
        assert!(MemoryMap::new(vec![b("a", 0, 2 * MIB), b("a", 4 * MIB, 2 * MIB)]).is_err());
        assert!(MemoryMap::new(vec![b("a", u64::MAX - 4095, 8192)]).is_err());
        assert!(MemoryMap::new(vec![b("a", 0, 2 * MIB), b("b", 4 * MIB, 2 * MIB)]).is_ok());
    }

    #[test]
    fn check_range_bounds() {
        let l = MemoryMap::pc(4 * MIB).unwrap();
        assert!(l.check_range(PageRef::new(0, 0), 1024).is_ok());
        assert!(l.check_range(PageRef::new(0, 1), 1024).is_err());
        assert!(l.check_range(PageRef::new(0, u64::MAX), 2).is_err());
        assert!(l.check_range(PageRef::new(1, 0), 1).is_err());
        assert_eq!(l.pages().count() as u64, l.total_pages());
    }
}
