//! The guest: its RAM on each side, and vCPUs that touch pages.
//!
//! A page's content encodes `(page, version)` (the core testkit's
//! `fill_page`): version 0 is a zero page, and every write makes a new
//! version. The source's RAM is a version per page; the destination's is a
//! version per page or [`MISSING`].

use postcopy_core::testkit::{fill_page, page_version};
use postcopy_core::{GuestMemory, PageNumber};

use crate::rng::{stream, Rng};
use crate::scenario::{Scenario, Workload};

/// A destination page that is not there yet.
pub const MISSING: u64 = u64::MAX;

/// The source's RAM (what the source core reads when it sends a page) and
/// its dirty log (KVM's, in the real backend).
#[derive(Clone, Debug)]
pub struct SourceMemory {
    pub versions: Vec<u64>,
    pub dirty: Vec<u64>,
    pub dirty_count: u64,
}

impl SourceMemory {
    pub fn new(pages: u64) -> Self {
        Self { versions: vec![0; pages as usize], dirty: vec![0; pages.div_ceil(64) as usize], dirty_count: 0 }
    }

    pub fn write(&mut self, page: u64, version: u64) {
        self.versions[page as usize] = version;
        let (word, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if self.dirty[word] & bit == 0 {
            self.dirty[word] |= bit;
            self.dirty_count += 1;
        }
    }

    /// Reads and clears the dirty log.
    pub fn take_dirty(&mut self) -> (Vec<u64>, u64) {
        let fresh = vec![0; self.dirty.len()];
        let words = std::mem::replace(&mut self.dirty, fresh);
        (words, std::mem::take(&mut self.dirty_count))
    }
}

impl GuestMemory for SourceMemory {
    fn read_page(&self, page: PageNumber, out: &mut [u8]) {
        fill_page(out, page, self.versions[page.0 as usize]);
    }
}

/// The version that `bytes` encode for `page`, or `None` if they are not a
/// valid content of that page. Same answer as the testkit's `page_version`,
/// without its allocation for the small pages the simulator uses.
pub fn decode_version(bytes: &[u8], page: PageNumber) -> Option<u64> {
    const SMALL: usize = 256;
    if bytes.len() > SMALL || bytes.len() < 8 {
        return page_version(bytes, page);
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    let version = u64::from_le_bytes(first);
    if version == 0 {
        return bytes.iter().all(|&b| b == 0).then_some(0);
    }
    let mut expected = [0u8; SMALL];
    let expected = &mut expected[..bytes.len()];
    fill_page(expected, page, version);
    (expected == bytes).then_some(version)
}

/// One vCPU's access pattern.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub kind: Workload,
    rng: Rng,
    base: u64,
    len: u64,
    cursor: u64,
    write_permille: u64,
}

impl Pattern {
    /// The pattern of vCPU `vcpu`: its own random stream, its slice of the
    /// working set for scans.
    pub fn new(scenario: &Scenario, vcpu: u32, ws_base: u64, ws_len: u64) -> Self {
        let mut rng = Rng::new(scenario.seed, stream::VCPU + u64::from(vcpu));
        let kind = match scenario.workload {
            Workload::Mixed => rng.pick(&Workload::ALL[..5]),
            kind => kind,
        };
        let write_permille = match kind {
            Workload::WriteHeavy => 800,
            Workload::ReadMostly => 20,
            _ => 300,
        };
        let (base, len) = if kind == Workload::Sequential {
            let slice = (ws_len / u64::from(scenario.vcpus)).max(1);
            (ws_base + (u64::from(vcpu) * slice) % ws_len, slice.min(ws_len))
        } else {
            (ws_base, ws_len)
        };
        let cursor = rng.below(len);
        Self { kind, rng, base, len, cursor, write_permille }
    }

    /// The next access: `(page, write)`.
    pub fn next_access(&mut self) -> (u64, bool) {
        let offset = match self.kind {
            Workload::Sequential => {
                self.cursor = (self.cursor + 1) % self.len;
                self.cursor
            }
            Workload::Uniform | Workload::WriteHeavy => self.rng.below(self.len),
            Workload::Hotspot | Workload::ReadMostly | Workload::Mixed => {
                // Zipf-like: rank = len * u^4 puts half the accesses on the
                // hottest 1/16 of the working set; ranks are scattered in
                // clusters of 8 pages.
                let u = self.rng.f64();
                let rank = ((self.len as f64) * u * u * u * u) as u64 % self.len;
                let cluster = (rank / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 8;
                (cluster * 8 + rank % 8) % self.len
            }
        };
        let write = self.rng.below(1000) < self.write_permille;
        (self.base + offset, write)
    }
}

/// Where a vCPU is.
#[derive(Clone, Debug)]
pub struct Vcpu {
    pub pattern: Pattern,
    /// An access not done yet (it was going to fault, or it faulted).
    pub pending: Option<(u64, bool)>,
    /// Waiting for this page to be installed.
    pub blocked_on: Option<u64>,
    /// Simulated time up to which this vCPU has run.
    pub until: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_matches_the_testkit() {
        for size in [16usize, 32, 64, 512] {
            let mut buf = vec![0u8; size];
            for (page, version) in [(0u64, 0u64), (5, 1), (77, 123_456), (1 << 20, u64::MAX - 1)] {
                fill_page(&mut buf, PageNumber(page), version);
                assert_eq!(decode_version(&buf, PageNumber(page)), page_version(&buf, PageNumber(page)));
                assert_eq!(decode_version(&buf, PageNumber(page)), Some(version));
                if version != 0 {
                    assert_eq!(decode_version(&buf, PageNumber(page + 1)), None);
                }
            }
        }
    }

    #[test]
    fn patterns_stay_in_the_working_set() {
        for workload in Workload::ALL {
            let mut scenario = Scenario::draw(1);
            scenario.workload = workload;
            scenario.vcpus = 3;
            for vcpu in 0..3 {
                let mut pattern = Pattern::new(&scenario, vcpu, 100, 1000);
                for _ in 0..10_000 {
                    let (page, _) = pattern.next_access();
                    assert!((100..1100).contains(&page), "{workload}: {page}");
                }
            }
        }
    }
}
