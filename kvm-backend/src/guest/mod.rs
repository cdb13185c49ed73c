//! Guests: the built-in pattern guest ([`TestGuest`], 64-bit long mode, set up
//! directly by the VMM) and PC boot sectors ([`bootsector`], real mode).
//!
//! # The pattern guest
//! Each vCPU owns a contiguous share of guest RAM (all RAM from 1 MiB up,
//! split evenly; the share may span the MMIO hole as several ranges). It runs
//! forever: in pass `p` (counting from 0), for every page of its share in
//! address order, it checks that the page's first word holds
//! `value(p, addr)` and then writes `value(p + 1, addr)`; a mismatch is
//! reported on [`abi::ERROR_PORT`] (and the page repaired), the end of a pass
//! on [`abi::PROGRESS_PORT`] with the pass count. [`pattern_value`] is 0 for
//! pass 0 (fresh memory is zero), so a page that is dropped (left zero), stale
//! (an older pass) or corrupted is detected by the guest on its next visit,
//! and by [`TestGuest::verify`] at any stop.
//!
//! After every page it also checks and advances a counter word, a copy of
//! its count of pages written (`r12`) at the top of its stack page: memory
//! and registers saved at one instant agree on it, so a switchover or a
//! checkpoint whose memory is of a later instant than its registers is
//! reported on [`abi::COUNTER_ERROR_PORT`] at the next page, and by
//! [`TestGuest::verify`] against the registers' count at any stop (the pass
//! pattern alone misses that: a page written again holds the same value).
//! It also makes the guest write a page the pattern does not, between two
//! checkpoints, which is what copy-on-write of a checkpoint has to handle.

/// Addresses, ports and constants shared with the build script that
/// assembles the guest programs.
#[path = "abi.rs"]
pub mod abi;
pub mod bootsector;

pub mod programs;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::error::{Error, Result};
use crate::layout::{MemoryMap, GIB, PAGE_SIZE};
use crate::memory::GuestRam;
use crate::vcpu::Vcpu;
use abi::*;

/// Most vCPUs the pattern guest supports.
pub const MAX_VCPUS: usize = 4;
/// Most bad pages a [`VerifyReport`] lists (all are counted).
pub const MAX_REPORTED_BAD_PAGES: usize = 16;

/// The word the pattern guest keeps in the page at `addr` after `passes`
/// complete passes over it.
pub fn pattern_value(passes: u64, addr: u64) -> u64 {
    if passes == 0 {
        0
    } else {
        passes.wrapping_mul(PATTERN_K) ^ addr
    }
}

/// One vCPU's share: ascending, disjoint page-aligned ranges `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The ranges, in the order the guest walks them.
    pub ranges: Vec<(u64, u64)>,
}

impl Share {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum()
    }

    /// Guest-physical addresses of the share's pages, in walk order.
    pub fn page_addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|&(s, e)| (s..e).step_by(PAGE_SIZE as usize))
    }

    /// Number of pages of the share below `cursor`, if `cursor` lies in (or
    /// at the end of) one of its ranges.
    fn pages_below(&self, cursor: u64) -> Option<u64> {
        let mut before = 0;
        for &(s, e) in &self.ranges {
            if cursor >= s && cursor <= e {
                return Some(before + (cursor - s) / PAGE_SIZE);
            }
            before += (e - s) / PAGE_SIZE;
        }
        None
    }
}

/// Where a vCPU of the pattern guest is: `passes` complete passes, and in the
/// current pass the first `pages_done` pages of its share already hold
/// `value(passes + 1)` while the rest hold `value(passes)`; its counter
/// word holds `pages_written` (or one less, between the count's increment
/// and the word's store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuPosition {
    /// Complete passes.
    pub passes: u64,
    /// Pages of the share done in the current pass.
    pub pages_done: u64,
    /// Pages written since boot (`r12`).
    #[serde(default)]
    pub pages_written: u64,
}

/// A page that does not hold what the pattern says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadPage {
    /// vCPU owning the page.
    pub vcpu: usize,
    /// Guest-physical address.
    pub gpa: u64,
    /// Word expected.
    pub expected: u64,
    /// Word found.
    pub found: u64,
}

/// Result of [`TestGuest::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Pattern pages checked.
    pub pages_checked: u64,
    /// Pattern pages that were wrong.
    pub bad_pages: u64,
    /// The first few of them.
    pub first_bad: Vec<BadPage>,
    /// Reserved bytes (code, page tables, range tables) that differ from what
    /// the VMM wrote at setup.
    pub bad_reserved_bytes: u64,
}

impl VerifyReport {
    /// Whether memory follows the pattern everywhere.
    pub fn is_ok(&self) -> bool {
        self.bad_pages == 0 && self.bad_reserved_bytes == 0
    }
}

/// The built-in pattern guest for a RAM layout and a number of vCPUs.
#[derive(Clone, Debug)]
pub struct TestGuest {
    shares: Vec<Share>,
    page_directories: u64,
}

impl TestGuest {
    /// Plans the guest: splits RAM above 1 MiB into `vcpus` shares.
    pub fn new(layout: &MemoryMap, vcpus: usize) -> Result<Self> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("{vcpus} vCPUs (1..={MAX_VCPUS} supported)")));
        }
        let page_directories = layout.top().div_ceil(GIB);
        if page_directories > LM_MAX_PDS {
            return Err(Error::Config(format!("guest-physical top {:#x} beyond the identity map", layout.top())));
        }
        // Usable ranges: RAM minus the reserved low megabyte.
        let usable: Vec<(u64, u64)> = layout
            .blocks()
            .iter()
            .filter(|b| b.end() > LM_SHARES_START)
            .map(|b| (b.gpa.max(LM_SHARES_START), b.end()))
            .collect();
        let total: u64 = usable.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum();
        if total < vcpus as u64 {
            return Err(Error::Config(format!("{total} usable pages for {vcpus} vCPUs")));
        }
        let max_ranges = (LM_TABLE_STRIDE / 16 - 1) as usize;
        let mut shares = Vec::with_capacity(vcpus);
        for i in 0..vcpus as u64 {
            let (first, last) = (i * total / vcpus as u64, (i + 1) * total / vcpus as u64);
            // Pages [first, last) of the usable space, mapped onto the ranges.
            let mut ranges = Vec::new();
            let mut base = 0u64;
            for &(s, e) in &usable {
                let n = (e - s) / PAGE_SIZE;
                let lo = first.max(base);
                let hi = last.min(base + n);
                if lo < hi {
                    ranges.push((s + (lo - base) * PAGE_SIZE, s + (hi - base) * PAGE_SIZE));
                }
                base += n;
            }
            if ranges.len() > max_ranges {
                return Err(Error::Config("share split into too many ranges".into()));
            }
            shares.push(Share { ranges });
        }
        Ok(Self { shares, page_directories })
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.shares.len()
    }

    /// The share of vCPU `vcpu`.
    pub fn share(&self, vcpu: usize) -> Option<&Share> {
        self.shares.get(vcpu)
    }

    /// Total pages in all shares.
    pub fn pattern_pages(&self) -> u64 {
        self.shares.iter().map(Share::pages).sum()
    }

    /// The bytes the VMM writes into the reserved low memory at setup, as
    /// (guest-physical address, bytes).
    pub fn reserved_image(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        // GDT: null, 64-bit code, data, TSS.
        let gdt: Vec<u8> = GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
        out.push((LM_GDT_ADDR, gdt));
        out.push((LM_IDT_ADDR, vec![0u8; 8]));
        // Identity map of [0, page_directories GiB) with 2 MiB pages.
        out.push((LM_PML4_ADDR, (LM_PDPT_ADDR | 3).to_le_bytes().to_vec()));
        let pdpt: Vec<u8> =
            (0..self.page_directories).flat_map(|i| ((LM_PD_ADDR + i * PAGE_SIZE) | 3).to_le_bytes()).collect();
        out.push((LM_PDPT_ADDR, pdpt));
        let pds: Vec<u8> = (0..self.page_directories * 512).flat_map(|j| ((j << 21) | 0x83).to_le_bytes()).collect();
        out.push((LM_PD_ADDR, pds));
        for (i, share) in self.shares.iter().enumerate() {
            let mut table: Vec<u8> =
                share.ranges.iter().flat_map(|&(s, e)| s.to_le_bytes().into_iter().chain(e.to_le_bytes())).collect();
            table.extend_from_slice(&[0u8; 16]);
            out.push((LM_TABLES_ADDR + i as u64 * LM_TABLE_STRIDE, table));
        }
        out.push((LM_CODE_ADDR, programs::LM_CODE.to_vec()));
        out
    }

    /// Writes GDT, page tables, range tables and code into guest memory.
    pub fn load(&self, ram: &GuestRam) -> Result<()> {
        for (gpa, bytes) in self.reserved_image() {
            ram.write(gpa, &bytes)?;
        }
        Ok(())
    }

    /// Registers of vCPU `vcpu` at the start.
    pub fn initial_regs(&self, vcpu: usize) -> Result<kvm_regs> {
        let share = self.shares.get(vcpu).ok_or_else(|| no_vcpu(vcpu))?;
        let first = share.ranges.first().map_or(LM_SHARES_START, |r| r.0);
        let i = vcpu as u64;
        Ok(kvm_regs {
            rip: programs::LM_PASS_TOP,
            rsp: stack_top(vcpu),
            rflags: 2,
            rbx: i,
            rdi: first,
            r8: LM_TABLES_ADDR + i * LM_TABLE_STRIDE,
            r10: 0,
            r11: PATTERN_K,
            ..Default::default()
        })
    }

    /// Turns `sregs` (as KVM created them) into 64-bit long mode with paging
    /// through the identity map written by [`TestGuest::load`].
    pub fn long_mode_sregs(&self, sregs: &mut kvm_sregs) {
        let code = segment_from_gdt(GDT[1], 1);
        let data = segment_from_gdt(GDT[2], 2);
        let tss = segment_from_gdt(GDT[3], 3);
        sregs.gdt.base = LM_GDT_ADDR;
        sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
        sregs.idt.base = LM_IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        const CR0_PE: u64 = 1;
        const CR0_MP: u64 = 1 << 1;
        const CR0_ET: u64 = 1 << 4;
        const CR0_NE: u64 = 1 << 5;
        const CR0_WP: u64 = 1 << 16;
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const EFER_LME: u64 = 1 << 8;
        const EFER_LMA: u64 = 1 << 10;
        // Caches on (CD and NW clear), protected mode with paging.
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = LM_PML4_ADDR;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    }

    /// Puts every vCPU at the program's entry in long mode, runnable.
    pub fn configure_vcpus(&self, vcpus: &[Vcpu]) -> Result<()> {
        if vcpus.len() != self.shares.len() {
            return Err(Error::Config(format!("{} vCPUs for a guest planned for {}", vcpus.len(), self.shares.len())));
        }
        for v in vcpus {
            let mut sregs = v.sregs()?;
            self.long_mode_sregs(&mut sregs);
            v.set_sregs(&sregs)?;
            v.set_regs(&self.initial_regs(v.index())?)?;
            v.init_fpu()?;
            v.set_runnable()?;
        }
        Ok(())
    }

    /// Where vCPU `vcpu` stands, from its registers (see `build.rs` for the
    /// invariant this relies on).
    pub fn position_from_regs(&self, vcpu: usize, regs: &kvm_regs) -> Result<CpuPosition> {
        let share = self.shares.get(vcpu).ok_or_else(|| no_vcpu(vcpu))?;
        let code_end = LM_CODE_ADDR + programs::LM_CODE.len() as u64;
        if regs.rip < LM_CODE_ADDR || regs.rip >= code_end {
            return Err(Error::Vcpu { vcpu, reason: format!("rip {:#x} outside the pattern program", regs.rip) });
        }
        let cursor = regs.rdi.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let done = share
            .pages_below(cursor)
            .ok_or_else(|| Error::Vcpu { vcpu, reason: format!("rdi {:#x} outside its share", regs.rdi) })?;
        let pages_written = regs.r12;
        if done < share.pages() {
            return Ok(CpuPosition { passes: regs.r10, pages_done: done, pages_written });
        }
        // The pass is complete; r10 is incremented between PASS_COUNTED and
        // the reload of rdi at RANGE_TOP.
        let counted = regs.rip >= programs::LM_PASS_COUNTED && regs.rip <= programs::LM_RANGE_TOP;
        Ok(CpuPosition { passes: if counted { regs.r10 } else { regs.r10 + 1 }, pages_done: 0, pages_written })
    }

    /// Checks every pattern page of every share and each vCPU's counter word
    /// against `positions` (one per vCPU), and the reserved bytes against
    /// what setup wrote.
    pub fn verify(&self, ram: &GuestRam, positions: &[CpuPosition]) -> Result<VerifyReport> {
        if positions.len() != self.shares.len() {
            return Err(Error::Config(format!("{} positions for {} vCPUs", positions.len(), self.shares.len())));
        }
        let mut report = VerifyReport::default();
        for (vcpu, (share, pos)) in self.shares.iter().zip(positions).enumerate() {
            for (i, gpa) in share.page_addrs().enumerate() {
                let passes = if (i as u64) < pos.pages_done { pos.passes + 1 } else { pos.passes };
                let expected = pattern_value(passes, gpa);
                let found = ram.read_u64(gpa)?;
                report.pages_checked += 1;
                if found != expected {
                    report.bad_pages += 1;
                    if report.first_bad.len() < MAX_REPORTED_BAD_PAGES {
                        report.first_bad.push(BadPage { vcpu, gpa, expected, found });
                    }
                }
            }
            // Memory of a later (or earlier) instant than the registers.
            let gpa = counter_word_addr(vcpu);
            let (expected, found) = (pos.pages_written, ram.read_u64(gpa)?);
            if found != expected && found.wrapping_add(1) != expected {
                report.bad_pages += 1;
                if report.first_bad.len() < MAX_REPORTED_BAD_PAGES {
                    report.first_bad.push(BadPage { vcpu, gpa, expected, found });
                }
            }
        }
        let tables = LM_PML4_ADDR..LM_PD_ADDR + self.page_directories * PAGE_SIZE;
        for (gpa, want) in self.reserved_image() {
            let mut got = vec![0u8; want.len()];
            ram.read(gpa, &mut got)?;
            if tables.contains(&gpa) {
                // The CPU sets the accessed and dirty bits of the entries.
                for (g, w) in got.chunks_exact_mut(8).zip(want.chunks_exact(8)) {
                    g[0] = (g[0] & !PTE_ACCESSED_DIRTY) | (w[0] & PTE_ACCESSED_DIRTY);
                }
            }
            report.bad_reserved_bytes += got.iter().zip(&want).filter(|(a, b)| a != b).count() as u64;
        }
        Ok(report)
    }

    /// Writes the pattern as the guest would have left it at `positions`
    /// (for tests of the verifier and of page transfer without running KVM).
    pub fn write_pattern(&self, ram: &GuestRam, positions: &[CpuPosition]) -> Result<()> {
        for (vcpu, (share, pos)) in self.shares.iter().zip(positions).enumerate() {
            for (i, gpa) in share.page_addrs().enumerate() {
                let passes = if (i as u64) < pos.pages_done { pos.passes + 1 } else { pos.passes };
                ram.write_u64(gpa, pattern_value(passes, gpa))?;
            }
            ram.write_u64(counter_word_addr(vcpu), pos.pages_written)?;
        }
        Ok(())
    }
}

/// The top of vCPU `vcpu`'s stack page (its initial `rsp`).
fn stack_top(vcpu: usize) -> u64 {
    LM_STACKS_ADDR + (vcpu as u64 + 1) * PAGE_SIZE
}

/// Where vCPU `vcpu` keeps its counter word: the last word of its stack page.
fn counter_word_addr(vcpu: usize) -> u64 {
    stack_top(vcpu) - 8
}

fn no_vcpu(vcpu: usize) -> Error {
    Error::Vcpu { vcpu, reason: "no such vCPU in the guest".into() }
}

/// Accessed (bit 5) and dirty (bit 6) bits of a page-table entry.
const PTE_ACCESSED_DIRTY: u8 = 0x60;

/// GDT of the long-mode guest: null, 64-bit code, data, 64-bit TSS.
const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x008f_8b00_0000_ffff];

/// The KVM segment register a GDT entry describes.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{PageRef, MIB};

    fn guest(mib: u64, vcpus: usize) -> (GuestRam, TestGuest) {
        let layout = MemoryMap::pc(mib * MIB).unwrap();
        let g = TestGuest::new(&layout, vcpus).unwrap();
        let ram = GuestRam::new(layout).unwrap();
        g.load(&ram).unwrap();
        (ram, g)
    }

    #[test]
    fn shares_cover_usable_ram_exactly_once() {
        let layout = MemoryMap::pc(5 * GIB).unwrap();
        let g = TestGuest::new(&layout, 3).unwrap();
        let mut all: Vec<u64> = (0..3).flat_map(|v| g.share(v).unwrap().page_addrs().collect::<Vec<_>>()).collect();
        let n = all.len() as u64;
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len() as u64, n);
        assert_eq!(n, (5 * GIB - LM_SHARES_START) / PAGE_SIZE);
        assert!(all.iter().all(|&a| layout.locate(a).is_some() && a >= LM_SHARES_START));
        // One share spans the hole.
        assert!((0..3).any(|v| g.share(v).unwrap().ranges.len() == 2));
    }

    #[test]
    fn bad_configs_are_rejected() {
        let layout = MemoryMap::pc(64 * MIB).unwrap();
        assert!(TestGuest::new(&layout, 0).is_err());
        assert!(TestGuest::new(&layout, 5).is_err());
        let tiny = MemoryMap::pc(2 * MIB).unwrap();
        assert!(TestGuest::new(&tiny, 4).is_ok());
    }

    #[test]
    fn verifier_accepts_the_pattern_and_catches_dropped_stale_and_corrupt_pages() {
        let (ram, g) = guest(8, 2);
        let pos = [
            CpuPosition { passes: 3, pages_done: 100, pages_written: 3 * 1000 + 100 },
            CpuPosition { passes: 0, pages_done: 7, pages_written: 7 },
        ];
        g.write_pattern(&ram, &pos).unwrap();
        let r = g.verify(&ram, &pos).unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.pages_checked, g.pattern_pages());

        // A wrong position is itself a mismatch.
        let shifted = [CpuPosition { passes: 3, pages_done: 101, ..pos[0] }, pos[1]];
        assert_eq!(g.verify(&ram, &shifted).unwrap().bad_pages, 1);
        // The counter word may lag the count by one (a stop between the
        // increment and the store), not lead it nor lag it by more.
        let lagging = [pos[0], CpuPosition { pages_written: 8, ..pos[1] }];
        assert!(g.verify(&ram, &lagging).unwrap().is_ok());
        for wrong in [6, 9] {
            let r = g.verify(&ram, &[pos[0], CpuPosition { pages_written: wrong, ..pos[1] }]).unwrap();
            assert_eq!(r.bad_pages, 1, "count {wrong}, word 7");
            assert_eq!(r.first_bad[0].gpa, LM_STACKS_ADDR + 2 * PAGE_SIZE - 8);
        }

        let share0: Vec<u64> = g.share(0).unwrap().page_addrs().collect();
        // Dropped page (left zero).
        let dropped = share0[10];
        ram.write_u64(dropped, 0).unwrap();
        let r = g.verify(&ram, &pos).unwrap();
        assert_eq!(r.bad_pages, 1);
        assert_eq!(r.first_bad[0].gpa, dropped);
        ram.write_u64(dropped, pattern_value(4, dropped)).unwrap();
        // Stale page (the value of the previous pass).
        let stale = share0[50];
        ram.write_u64(stale, pattern_value(3, stale)).unwrap();
        assert_eq!(g.verify(&ram, &pos).unwrap().bad_pages, 1);
        ram.write_u64(stale, pattern_value(4, stale)).unwrap();
        // Corrupted page.
        let corrupt = share0[500];
        ram.write_u64(corrupt, pattern_value(3, corrupt) ^ 0x100).unwrap();
        assert_eq!(g.verify(&ram, &pos).unwrap().bad_pages, 1);
        ram.write_u64(corrupt, pattern_value(3, corrupt)).unwrap();
        assert!(g.verify(&ram, &pos).unwrap().is_ok());
        // Reserved memory (code) damaged.
        ram.write(LM_CODE_ADDR + 3, &[0xcc]).unwrap();
        let r = g.verify(&ram, &pos).unwrap();
        assert_eq!((r.bad_pages, r.bad_reserved_bytes), (0, 1));
        assert!(!r.is_ok());
        let _ = PageRef::new(0, 0);
    }

    #[test]
    fn position_from_registers() {
        let layout = MemoryMap::pc(4 * MIB).unwrap();
        let g = TestGuest::new(&layout, 1).unwrap();
        let share = g.share(0).unwrap().clone();
        let (start, end) = share.ranges[0];
        let mut regs = g.initial_regs(0).unwrap();
        assert_eq!(g.position_from_regs(0, &regs).unwrap(), CpuPosition { passes: 0, pages_done: 0, pages_written: 0 });
        // Mid pass, just after the store of page 5 (rdi = page + 8).
        regs.r10 = 7;
        regs.rdi = start + 5 * PAGE_SIZE + 8;
        regs.rip = programs::LM_PASS_TOP + 0x30;
        assert_eq!(g.position_from_regs(0, &regs).unwrap(), CpuPosition { passes: 7, pages_done: 6, pages_written: 0 });
        // Before the store of page 5.
        regs.rdi = start + 5 * PAGE_SIZE;
        assert_eq!(g.position_from_regs(0, &regs).unwrap(), CpuPosition { passes: 7, pages_done: 5, pages_written: 0 });
        // End of pass, counter not yet incremented.
        regs.rdi = end;
        regs.rip = programs::LM_PASS_TOP + 0x40;
        assert_eq!(g.position_from_regs(0, &regs).unwrap(), CpuPosition { passes: 8, pages_done: 0, pages_written: 0 });
        // End of pass, counter incremented.
        regs.rip = programs::LM_PASS_COUNTED;
        assert_eq!(g.position_from_regs(0, &regs).unwrap(), CpuPosition { passes: 7, pages_done: 0, pages_written: 0 });
        regs.rip = programs::LM_RANGE_TOP;
        assert_eq!(g.position_from_regs(0, &regs).unwrap(), CpuPosition { passes: 7, pages_done: 0, pages_written: 0 });
        // Nonsense registers.
        regs.rdi = 0x1000;
        assert!(g.position_from_regs(0, &regs).is_err());
        regs.rdi = start;
        regs.rip = 0x1234;
        assert!(g.position_from_regs(0, &regs).is_err());
        assert!(g.position_from_regs(1, &regs).is_err());
    }

    #[test]
    fn gdt_segments_decode() {
        let cs = segment_from_gdt(GDT[1], 1);
        assert_eq!((cs.selector, cs.type_, cs.l, cs.db, cs.g, cs.present, cs.s), (8, 0xb, 1, 0, 1, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(GDT[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.l, ds.db), (16, 3, 0, 1));
        let tr = segment_from_gdt(GDT[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (24, 0xb, 0));
    }
}
