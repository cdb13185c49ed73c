//! Guest RAM layout: named blocks of pages, and global page numbers.
//!
//! On the wire a page is named by `(block index, page index in block)`, like
//! the seed's `idstr` + page offset. Inside the core every page has one global
//! [`PageNumber`] (blocks laid end to end) so that per-page state lives in flat
//! bitmaps.

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// Smallest page size the protocol accepts. Tiny pages let simulators and
/// model checkers carry a content version in each page cheaply.
pub const MIN_PAGE_SIZE: u32 = 16;
/// Largest page size the protocol accepts: 1 GiB (an x86 PUD huge page).
/// A page larger than [`MAX_FRAME_PAGE_SIZE`] never crosses whole: it goes
/// in parts of at most that size (`PagePart` frames), or as a zero flag.
pub const MAX_PAGE_SIZE: u32 = 1 << 30;
/// Most page bytes one frame carries: 2 MiB (an x86 PMD huge page), so that
/// no frame, and no receive buffer, is larger than about 2 MiB whatever the
/// page size. A page up to this size may cross whole in one `Page` frame.
pub const MAX_FRAME_PAGE_SIZE: u32 = 2 << 20;
/// Most RAM blocks a layout may have.
pub const MAX_BLOCKS: usize = 256;
/// Longest block name in bytes (UTF-8).
pub const MAX_BLOCK_NAME_LEN: usize = 255;
/// Most pages in one block: page indexes travel as `u32`.
pub const MAX_BLOCK_PAGES: u64 = 1 << 32;
/// Most pages in a whole layout (2^40 pages: 4 PiB of 4 KiB pages).
pub const MAX_TOTAL_PAGES: u64 = 1 << 40;

/// A RAM layout the protocol cannot carry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Error, Serialize, Deserialize)]
pub enum LayoutError {
    #[error("page size {0} is not a power of two between 16 and 1073741824 (1 GiB)")]
    BadPageSize(u32),
    #[error("block {name:?} has pages of {page_size} bytes: not a power of two between 16 and 1073741824 (1 GiB)")]
    BadBlockPageSize { name: String, page_size: u32 },
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

/// Index of a page across the whole layout (blocks laid end to end).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageNumber(pub u64);

impl fmt::Display for PageNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// A page named as the wire names it: block index and page index inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageAddress {
    pub block: u32,
    pub index: u32,
}

/// One named RAM block. Its pages are the unit of everything that names
/// pages of the block: page frames, requests, discards, bitmaps and
/// recovery reports. A block backed by huge pages has pages of the huge
/// page's size (2 MiB, which may cross whole, or 1 GiB, which crosses in
/// parts).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RamBlock {
    pub name: String,
    pub page_count: u64,
    /// Bytes per page of this block.
    pub page_size: u32,
}

/// Whether `page_size` is one the protocol carries.
pub fn valid_page_size(page_size: u32) -> bool {
    page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size)
}

/// The guest's RAM: a base page size and named blocks, each with its own
/// page size. Immutable once built.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RamLayout {
    /// The base page size: what the hello announces for every block that
    /// does not carry its own (see the wire docs).
    page_size: u32,
    blocks: Vec<RamBlock>,
    /// `first_page[i]` is the global number of block `i`'s first page; one
    /// extra entry holds the total.
    first_page: Vec<u64>,
}

impl RamLayout {
    /// Builds a layout, checking every limit the wire protocol imposes.
    /// `page_size` is the base page size; each block has its own.
    pub fn new(page_size: u32, blocks: Vec<RamBlock>) -> Result<Self, LayoutError> {
        if !valid_page_size(page_size) {
            return Err(LayoutError::BadPageSize(page_size));
        }
        if blocks.is_empty() || blocks.len() > MAX_BLOCKS {
            return Err(LayoutError::BadBlockCount(blocks.len()));
        }
        let mut first_page = Vec::with_capacity(blocks.len() + 1);
        let mut total: u64 = 0;
        for (i, block) in blocks.iter().enumerate() {
            if block.name.is_empty() || block.name.len() > MAX_BLOCK_NAME_LEN {
                return Err(LayoutError::BadBlockName(block.name.clone()));
            }
            if blocks[..i].iter().any(|b| b.name == block.name) {
                return Err(LayoutError::DuplicateBlockName(block.name.clone()));
            }
            if block.page_count == 0 || block.page_count > MAX_BLOCK_PAGES {
                return Err(LayoutError::BadBlockSize { name: block.name.clone(), pages: block.page_count });
            }
            if !valid_page_size(block.page_size) {
                return Err(LayoutError::BadBlockPageSize { name: block.name.clone(), page_size: block.page_size });
            }
            first_page.push(total);
            total += block.page_count;
            if total > MAX_TOTAL_PAGES {
                return Err(LayoutError::TooManyPages(total));
            }
        }
        first_page.push(total);
        Ok(Self { page_size, blocks, first_page })
    }

    /// A layout of one block, for tests and simple guests.
    pub fn single(name: &str, page_size: u32, page_count: u64) -> Result<Self, LayoutError> {
        Self::new(page_size, vec![RamBlock { name: name.to_owned(), page_count, page_size }])
    }

    /// The base page size (every block's, unless [`RamLayout::uniform`] is
    /// false).
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Whether every block has pages of the base page size.
    pub fn uniform(&self) -> bool {
        self.blocks.iter().all(|b| b.page_size == self.page_size)
    }

    /// Bytes per page of `block`.
    pub fn block_page_size(&self, block: u32) -> Option<u32> {
        self.blocks.get(block as usize).map(|b| b.page_size)
    }

    /// Bytes of page `page` (the page size of its block), or `None` when out
    /// of range.
    pub fn page_size_of(&self, page: PageNumber) -> Option<u32> {
        self.address(page).and_then(|a| self.block_page_size(a.block))
    }

    /// The largest page size of any block.
    pub fn max_page_size(&self) -> u32 {
        self.blocks.iter().map(|b| b.page_size).max().unwrap_or(self.page_size)
    }

    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    pub fn total_pages(&self) -> u64 {
        self.first_page[self.blocks.len()]
    }

    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.page_count * u64::from(b.page_size)).sum()
    }

    /// The global number of the first page of `block`.
    pub fn block_start(&self, block: u32) -> Option<PageNumber> {
        self.block_range(block).map(|range| PageNumber(range.start))
    }

    /// Global page number of a wire address, or `None` when out of range.
    pub fn page_number(&self, address: PageAddress) -> Option<PageNumber> {
        let block = self.blocks.get(address.block as usize)?;
        if u64::from(address.index) >= block.page_count {
            return None;
        }
        Some(PageNumber(self.first_page[address.block as usize] + u64::from(address.index)))
    }

    /// Wire address of a global page number, or `None` when out of range.
    pub fn address(&self, page: PageNumber) -> Option<PageAddress> {
        if page.0 >= self.total_pages() {
            return None;
        }
        // Blocks are few (at most MAX_BLOCKS): a binary search is plenty.
        let block = self.first_page.partition_point(|&start| start <= page.0) - 1;
        Some(PageAddress { block: block as u32, index: (page.0 - self.first_page[block]) as u32 })
    }

    /// The page holding byte `byte_offset` of block `block`.
    pub fn page_at(&self, block: u32, byte_offset: u64) -> Option<PageNumber> {
        let index = byte_offset / u64::from(self.block_page_size(block)?);
        self.page_number(PageAddress { block, index: u32::try_from(index).ok()? })
    }

    /// Index of the block with this name.
    pub fn block_index(&self, name: &str) -> Option<u32> {
        self.blocks.iter().position(|b| b.name == name).map(|i| i as u32)
    }

    /// The global page range of `block` as `start..end`.
    pub fn block_range(&self, block: u32) -> Option<std::ops::Range<u64>> {
        let i = block as usize;
        (i < self.blocks.len()).then(|| self.first_page[i]..self.first_page[i + 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_blocks() -> RamLayout {
        RamLayout::new(
            4096,
            vec![
                RamBlock { name: "low".into(), page_count: 10, page_size: 4096 },
                RamBlock { name: "high".into(), page_count: 5, page_size: 4096 },
            ],
        )
        .unwrap()
    }

    #[test]
    fn addresses_round_trip_across_blocks() {
        let layout = two_blocks();
        assert_eq!(layout.total_pages(), 15);
        for n in 0..15 {
            let address = layout.address(PageNumber(n)).unwrap();
            assert_eq!(layout.page_number(address), Some(PageNumber(n)));
        }
        assert_eq!(layout.address(PageNumber(10)), Some(PageAddress { block: 1, index: 0 }));
        assert_eq!(layout.address(PageNumber(15)), None);
        assert_eq!(layout.page_number(PageAddress { block: 1, index: 5 }), None);
        assert_eq!(layout.page_number(PageAddress { block: 2, index: 0 }), None);
        assert_eq!(layout.page_at(1, 4096 * 4 + 17), Some(PageNumber(14)));
        assert_eq!(layout.block_index("high"), Some(1));
        assert_eq!(layout.block_range(1), Some(10..15));
        assert_eq!(layout.block_start(1), Some(PageNumber(10)));
        assert_eq!(layout.block_start(2), None);
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(matches!(RamLayout::single("a", 4095, 1), Err(LayoutError::BadPageSize(4095))));
        assert!(matches!(RamLayout::single("a", 8, 1), Err(LayoutError::BadPageSize(8))));
        assert!(matches!(RamLayout::single("a", 4096, 0), Err(LayoutError::BadBlockSize { .. })));
        assert!(matches!(RamLayout::single("", 4096, 1), Err(LayoutError::BadBlockName(_))));
        assert!(matches!(RamLayout::new(4096, vec![]), Err(LayoutError::BadBlockCount(0))));
        let dup = vec![
            RamBlock { name: "a".into(), page_count: 1, page_size: 4096 },
            RamBlock { name: "a".into(), page_count: 1, page_size: 4096 },
        ];
        assert!(matches!(RamLayout::new(4096, dup), Err(LayoutError::DuplicateBlockName(_))));
        assert!(matches!(RamLayout::single("a", 4096, MAX_BLOCK_PAGES + 1), Err(LayoutError::BadBlockSize { .. })));
        assert!(matches!(RamLayout::single("a", 2 << 30, 1), Err(LayoutError::BadPageSize(_))));
        // 1 GiB pages are the largest: they cross in parts.
        assert!(RamLayout::single("a", 1 << 30, 1).is_ok());
        assert!(RamLayout::single("a", 4 << 20, 1).is_ok());
        let odd = vec![RamBlock { name: "a".into(), page_count: 1, page_size: 3 << 20 }];
        assert!(matches!(RamLayout::new(4096, odd), Err(LayoutError::BadBlockPageSize { .. })));
    }

    #[test]
    fn blocks_have_their_own_page_size() {
        let layout = RamLayout::new(
            4096,
            vec![
                RamBlock { name: "small".into(), page_count: 3, page_size: 4096 },
                RamBlock { name: "huge".into(), page_count: 2, page_size: 2 << 20 },
            ],
        )
        .unwrap();
        assert!(!layout.uniform());
        assert_eq!(layout.total_bytes(), 3 * 4096 + 2 * (2 << 20));
        assert_eq!(layout.page_size_of(PageNumber(2)), Some(4096));
        assert_eq!(layout.page_size_of(PageNumber(3)), Some(2 << 20));
        assert_eq!(layout.page_size_of(PageNumber(5)), None);
        assert_eq!(layout.max_page_size(), 2 << 20);
        // Byte offsets count in the block's own pages.
        assert_eq!(layout.page_at(1, (2 << 20) + 1), Some(PageNumber(4)));
        assert!(RamLayout::single("a", 4096, 1).unwrap().uniform());
    }
}
