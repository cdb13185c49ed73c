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
    Layout(#[source] crate::Error),
}

/// The core's view of a layout: same blocks (names, page counts), 4 KiB pages.
pub fn core_layout(layout: &MemoryMap) -> Result<postcopy_core::RamLayout, postcopy_core::LayoutError> {
    let blocks = layout
        .blocks()
        .iter()
        .map(|b| postcopy_core::RamBlock { name: b.name.clone(), page_count: b.pages(), page_size: PAGE_SIZE as u32 })
        .collect();
    postcopy_core::RamLayout::new(PAGE_SIZE as u32, blocks)
}

/// Global page numbers (blocks end to end, as the core numbers them) to and
/// from `PageRef`s.
#[derive(Clone, Debug)]
pub struct PageMap {
    /// First global page of each block, plus the total at the end.
    starts: Vec<u64>,
}

impl PageMap {
    /// The map of `layout`.
    pub fn new(layout: &MemoryMap) -> Self {
        let mut starts = Vec::with_capacity(layout.blocks().len() + 1);
        let mut total = 0;
        for b in layout.blocks() {
            starts.push(total);
            total += b.pages();
        }
        starts.push(total);
        Self { starts }
    }

    /// Total pages.
    pub fn total_pages(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// First global page of block `block`.
    pub fn block_start(&self, block: usize) -> Option<u64> {
        (block + 1 < self.starts.len()).then(|| self.starts[block])
    }

    /// The `PageRef` of a global page number.
    pub fn page_ref(&self, page: PageNumber) -> Option<PageRef> {
        if page.0 >= self.total_pages() {
            return None;
        }
        let block = self.starts.partition_point(|&s| s <= page.0) - 1;
        Some(PageRef { block, page: page.0 - self.starts[block] })
    }

    /// The global number of a `PageRef`.
    pub fn number(&self, page: PageRef) -> Option<PageNumber> {
        let start = self.block_start(page.block)?;
        (page.page < self.starts[page.block + 1] - start).then(|| PageNumber(start + page.page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GIB;

    #[test]
    fn page_numbers_round_trip_across_the_hole() {
        let layout = MemoryMap::pc(5 * GIB).unwrap();
        let map = PageMap::new(&layout);
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
        let core = core_layout(&layout).unwrap();
        assert_eq!(core.total_pages(), map.total_pages());
        assert_eq!(core.block_start(1), Some(PageNumber(below)));
        // Dirty bitmaps are handed per block: block starts are multiples of 64.
        assert_eq!(below % 64, 0);
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
