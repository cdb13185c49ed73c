// Constants shared by the build script (which assembles the guest programs)
// and the library (which loads and checks them). Plain consts only: this file
// is `include!`d by build.rs.

/// Size of a guest page, in bytes.
pub const GUEST_PAGE_SIZE: u64 = 4096;

/// Port the built-in guest writes its pass count to (`out PROGRESS_PORT, eax`).
pub const PROGRESS_PORT: u16 = 0xe0;
/// Port the built-in guest writes to when a page does not hold the expected
/// value (`out ERROR_PORT, al`); at that moment `rdi` holds the page address,
/// `rdx` the expected word and `rax` the word found.
pub const ERROR_PORT: u16 = 0xe1;

/// Port the built-in guest writes to when its counter word (the last word
/// of its stack page, a copy of `r12`: pages written since boot) differs
/// from what `r12` says it holds (`out COUNTER_ERROR_PORT, al`); at that
/// moment `rsp - 8` is the word's address, `rdx` the expected value and
/// `rax` the value found.
/// Registers and memory saved at one instant always agree on it.
pub const COUNTER_ERROR_PORT: u16 = 0xe3;

/// Port the built-in guest writes the low 32 bits of its count of pages
/// written since boot to, every [`PAGES_REPORT_INTERVAL`] pages: a progress
/// rate finer than whole passes.
pub const PAGES_PORT: u16 = 0xe2;
/// Pages between two reports on [`PAGES_PORT`] (a power of two).
pub const PAGES_REPORT_INTERVAL: u32 = 256;

/// Multiplier of the pattern word: `value(pass, addr) = pass * K ^ addr` for
/// `pass >= 1`, and 0 for pass 0 (fresh memory is zero).
pub const PATTERN_K: u64 = 0x9e37_79b9_7f4a_7c15;

/// Guest-physical address of the GDT used by the long-mode guest.
pub const LM_GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the (empty) IDT: any exception triple-faults.
pub const LM_IDT_ADDR: u64 = 0x520;
/// PML4 of the identity map.
pub const LM_PML4_ADDR: u64 = 0x1000;
/// PDPT of the identity map.
pub const LM_PDPT_ADDR: u64 = 0x2000;
/// First page directory (one per GiB, contiguous).
pub const LM_PD_ADDR: u64 = 0x3000;
/// Most page directories that fit below `LM_TABLES_ADDR` (so 64 GiB of
/// guest-physical address space).
pub const LM_MAX_PDS: u64 = 64;
/// Per-vCPU range tables: `LM_MAX_RANGES` entries of (start, end) u64 pairs,
/// terminated by a zero start.
pub const LM_TABLES_ADDR: u64 = 0x50000;
/// Bytes reserved for one vCPU's range table.
pub const LM_TABLE_STRIDE: u64 = 0x100;
/// Per-vCPU stacks: one page each, below `LM_STACKS_ADDR + (i + 1) * 4096`.
pub const LM_STACKS_ADDR: u64 = 0x60000;
/// Where the long-mode program is loaded.
pub const LM_CODE_ADDR: u64 = 0x70000;
/// First guest-physical address handed out to vCPU shares; everything below
/// is reserved for the structures above.
pub const LM_SHARES_START: u64 = 0x10_0000;

/// Where a PC boot sector is loaded.
pub const BOOT_SECTOR_ADDR: u64 = 0x7c00;
/// Where the test boot sector's 32-bit part starts (inside the 512 bytes).
pub const TEST_BOOT_PM_ADDR: u64 = 0x7d00;
/// Where the test boot sector keeps its data (GDT, messages).
pub const TEST_BOOT_DATA_ADDR: u64 = 0x7d80;
/// Word the test boot sector writes at 1 MiB once in protected mode.
pub const TEST_BOOT_MARKER: u32 = 0x600d_f00d;
/// Address of that word (needs A20 to be enabled to not alias 0).
pub const TEST_BOOT_MARKER_ADDR: u64 = 0x10_0000;
