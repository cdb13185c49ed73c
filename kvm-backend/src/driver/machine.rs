//! What the destination must build before the device state arrives (sent
//! opaquely in the core's hello), and the mapping between the core's global
//! page numbers and this crate's `PageRef`s.

use serde::{Deserialize, Serialize};

use crate::layout::{MemoryMap, PageRef, PAGE_SIZE};
use postcopy_core::PageNumber;

/// Version of [`MachineDescription`]'s encoding.
pub const MACHINE_FORMAT: u32 = 1;

/// Which guest runs: the destination needs it to verify the guest's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// The built-in pattern guest ([`crate::TestGuest`]).
    Pattern,
    /// A PC boot sector.
    BootSector,
}

/// The machine the destination builds: vCPUs, interrupt controller, RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDescription {
    /// [`MACHINE_FORMAT`].
    pub format: u32,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// In-kernel irqchip and PIT.
    pub irqchip: bool,
    /// RAM blocks with their guest-physical addresses.
    pub ram: MemoryMap,
    /// The guest.
    pub guest: GuestKind,
}

impl MachineDescription {
    /// JSON bytes (well under the hello's 4 KiB limit).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a description received from the peer.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MachineError> {
        let m: Self = serde_json::from_slice(bytes).map_err(MachineError::Decode)?;
        if m.format != MACHINE_FORMAT {
            return Err(MachineError::Format { found: m.format });
        }
        if m.vcpus == 0 || m.vcpus > crate::vm::MAX_VCPUS {
            return Err(MachineError::Vcpus(m.vcpus));
        }
        // Re-check the layout's invariants (serde bypassed the constructor).
        let ram = MemoryMap::new(m.ram.blocks().to_vec()).map_err(|e| MachineError::Layout(e.into()))?;
        Ok(Self { ram, ..m })
    }
}

/// Why a machine description from the peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Not the JSON of a description.
    #[error("bad machine description")]
    Decode(#[source] serde_json::Error),
    /// Another version of the encoding.
    #[error("machine description format {found}, this build reads {MACHINE_FORMAT}")]
    Format {
        /// The format it has.
        found: u32,
    },
    /// No vCPU, or more than a VM here can have.
    #[error("machine description asks for {0} vCPUs")]
    Vcpus(usize),
    /// Its RAM layout breaks the layout's invariants.
    #[error("machine description's RAM layout")]
    Layout(#[source] crate::error::Error),
}

/// The core's view of a layout: same blocks (names), in pages of
/// `unit_pages` 4 KiB pages (1, or 512 on 2 MiB huge pages: the page the
/// migration moves is the backing memory's).
pub fn core_layout(
    layout: &MemoryMap,
    unit_pages: u64,
) -> Result<postcopy_core::RamLayout, postcopy_core::LayoutError> {
    let unit_pages = unit_pages.max(1);
    let page_size = u32::try_from(unit_pages * PAGE_SIZE).unwrap_or(u32::MAX);
    let blocks = layout
        .blocks()
        .iter()
        .map(|b| postcopy_core::RamBlock { name: b.name.clone(), page_count: b.pages() / unit_pages, page_size })
        .collect();
    postcopy_core::RamLayout::new(page_size, blocks)
}

/// Global page numbers (blocks end to end, as the core numbers them) to and
/// from `PageRef`s.
#[derive(Clone, Debug)]
pub struct PageMap {
    /// First global page of each block, plus the total at the end.
    starts: Vec<u64>,
    /// 4 KiB pages per global page (1, or 512 on 2 MiB huge pages).
    unit: u64,
}

impl PageMap {
    /// The map of `layout` in pages of `unit_pages` 4 KiB pages.
    pub fn new(layout: &MemoryMap, unit_pages: u64) -> Self {
        let unit = unit_pages.max(1);
        let mut starts = Vec::with_capacity(layout.blocks().len() + 1);
        let mut total = 0;
        for b in layout.blocks() {
            starts.push(total);
            total += b.pages() / unit;
        }
        starts.push(total);
        Self { starts, unit }
    }

    /// 4 KiB pages per global page.
    pub fn unit_pages(&self) -> u64 {
        self.unit
    }

    /// A block's dirty bitmap of 4 KiB pages (KVM's dirty log is per 4 KiB
    /// page) as a bitmap of this map's pages: a huge page is dirty when any
    /// of its 4 KiB pages is.
    pub fn fold_dirty(&self, words: &[u64]) -> Vec<u64> {
        if self.unit == 1 {
            return words.to_vec();
        }
        let small = words.len() as u64 * 64;
        let pages = small.div_ceil(self.unit);
        let mut out = vec![0u64; pages.div_ceil(64) as usize];
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = (w as u64 * 64 + u64::from(bits.trailing_zeros())) / self.unit;
                bits &= bits - 1;
                out[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        out
    }

    /// Total pages.
    pub fn total_pages(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// First global page of block `block`.
    pub fn block_start(&self, block: usize) -> Option<u64> {
        (block + 1 < self.starts.len()).then(|| self.starts[block])
    }

    /// The `PageRef` of a global page number: its first 4 KiB page.
    pub fn page_ref(&self, page: PageNumber) -> Option<PageRef> {
        if page.0 >= self.total_pages() {
            return None;
        }
        let block = self.starts.partition_point(|&s| s <= page.0) - 1;
        Some(PageRef { block, page: (page.0 - self.starts[block]) * self.unit })
    }

    /// The global number of the page holding 4 KiB page `page`.
    pub fn number(&self, page: PageRef) -> Option<PageNumber> {
        let start = self.block_start(page.block)?;
        let index = page.page / self.unit;
        (index < self.starts[page.block + 1] - start).then(|| PageNumber(start + index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GIB;

    #[test]
    fn page_numbers_round_trip_across_the_hole() {
        let layout = MemoryMap::pc(5 * GIB).unwrap();
        let map = PageMap::new(&layout, 1);
        let below = layout.blocks()[0].pages();
        assert_eq!(map.total_pages(), 5 * GIB / PAGE_SIZE);
        for n in [0, 1, below - 1, below, below + 7, map.total_pages() - 1] {
            let r = map.page_ref(PageNumber(n)).unwrap();
            assert_eq!(map.number(r), Some(PageNumber(n)));
        }
        assert_eq!(map.page_ref(PageNumber(below)), Some(PageRef::new(1, 0)));
        assert_eq!(map.page_ref(PageNumber(map.total_pages())), None);
        assert_eq!(map.number(PageRef::new(2, 0)), None);
        assert_eq!(map.number(PageRef::new(0, below)), None);
        let core = core_layout(&layout, 1).unwrap();
        assert_eq!(core.total_pages(), map.total_pages());
        assert_eq!(core.block_start(1), Some(PageNumber(below)));
        // Dirty bitmaps are handed per block: block starts are multiples of 64.
        assert_eq!(below % 64, 0);
    }

    #[test]
    fn huge_pages_are_runs_of_small_ones() {
        let layout = MemoryMap::pc(5 * GIB).unwrap();
        let map = PageMap::new(&layout, 512);
        let below = layout.blocks()[0].pages() / 512;
        assert_eq!(map.total_pages(), 5 * GIB / (2 << 20));
        assert_eq!(map.page_ref(PageNumber(below + 3)), Some(PageRef::new(1, 3 * 512)));
        // Every 4 KiB page of a huge page maps to it.
        assert_eq!(map.number(PageRef::new(1, 3 * 512 + 511)), Some(PageNumber(below + 3)));
        assert_eq!(map.number(PageRef::new(0, 0)), Some(PageNumber(0)));
        let core = core_layout(&layout, 512).unwrap();
        assert_eq!(core.total_pages(), map.total_pages());
        assert_eq!(core.block_page_size(1), Some(2 << 20));
        assert_eq!(core.total_bytes(), 5 * GIB);
        // One dirty 4 KiB page makes its huge page dirty.
        let mut words = vec![0u64; 3 * 512 / 64];
        words[8 + 3] = 1 << 9; // 4 KiB page 512 + 192 + 9: in huge page 1
        words[2 * 8] = 1; // the first 4 KiB page of huge page 2
        assert_eq!(map.fold_dirty(&words), vec![0b110]);
        assert_eq!(PageMap::new(&layout, 1).fold_dirty(&words), words);
    }

    #[test]
    fn machine_description_round_trip_and_bad_input() {
        let m = MachineDescription {
            format: MACHINE_FORMAT,
            vcpus: 2,
            irqchip: true,
            ram: MemoryMap::pc(64 << 20).unwrap(),
            guest: GuestKind::Pattern,
        };
        let bytes = m.to_bytes();
        assert!(bytes.len() < postcopy_core::wire::MAX_MACHINE_LEN);
        assert_eq!(MachineDescription::from_bytes(&bytes).unwrap(), m);
        assert!(matches!(MachineDescription::from_bytes(b"garbage"), Err(MachineError::Decode(_))));
        let bad = MachineDescription { vcpus: 0, ..m.clone() };
        assert!(matches!(MachineDescription::from_bytes(&bad.to_bytes()), Err(MachineError::Vcpus(0))));
        let future = MachineDescription { format: 99, ..m };
        let err = MachineDescription::from_bytes(&future.to_bytes()).unwrap_err();
        assert!(matches!(err, MachineError::Format { found: 99 }));
        assert!(err.to_string().contains("format 99"));
    }
}
