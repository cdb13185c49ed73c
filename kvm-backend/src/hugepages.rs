//! Huge pages: which size backs guest RAM (`--hugepages 2M|1G`), what the
//! protocol can carry, and how many the host has free.
//!
//! Guest RAM on huge pages lives in one hugetlbfs memfd
//! ([`crate::GuestRam::new_preallocated_with`]). The migration then moves
//! whole huge pages: the protocol's page of each RAM block is the huge page
//! (see `postcopy_core::RamBlock`), a fault asks for the 2 MiB page around the
//! address, and the destination copies it in through its placement mapping
//! and maps it with one `UFFDIO_CONTINUE`. The driver keeps counting guest
//! memory in 4 KiB pages underneath ([`crate::PageRef`]): KVM's dirty log is
//! per 4 KiB page, and a huge page is dirty when any of its 4 KiB pages is.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::layout::PAGE_SIZE;

/// A huge page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum HugePageSize {
    /// 2 MiB (x86 PMD pages).
    Size2M,
    /// 1 GiB (x86 PUD pages).
    Size1G,
}

/// Huge pages that cannot back guest RAM here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HugePageError {
    /// Not "2M" or "1G".
    #[error("huge page size {0:?}: use 2M or 1G")]
    Parse(String),
    /// Larger than a page the protocol carries.
    #[error("{size} huge pages are not supported: the protocol carries pages of at most {max} bytes")]
    TooLarge {
        /// The size asked for.
        size: HugePageSize,
        /// The protocol's largest page.
        max: u32,
    },
    /// Fallback (`--fallback checkpoint`) on pages larger than a frame:
    /// a checkpoint carries each page whole, in one frame.
    #[error(
        "--fallback checkpoint does not work with {size} huge pages: a checkpoint carries each page whole, \
         in one frame of at most {max} bytes"
    )]
    NoFallback {
        /// The size asked for.
        size: HugePageSize,
        /// The largest page a frame carries.
        max: u32,
    },
    /// The host has fewer free huge pages than the guest needs.
    #[error(
        "{needed} free {size} huge pages needed, {free} free: reserve them as root (echo N > {path}, \
         or scripts/hugepages --size {size} reserve N)"
    )]
    NotEnough {
        /// The size.
        size: HugePageSize,
        /// Pages the guest needs.
        needed: u64,
        /// Pages free.
        free: u64,
        /// Where to reserve them.
        path: String,
    },
    /// Guest RAM whose blocks are not whole huge pages.
    #[error("guest RAM block of {bytes} bytes at {gpa:#x} is not a whole number of {size} huge pages")]
    Unaligned {
        /// The size.
        size: HugePageSize,
        /// The block's guest-physical address.
        gpa: u64,
        /// The block's size.
        bytes: u64,
    },
}

impl HugePageSize {
    /// Bytes per huge page.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }

    /// 4 KiB pages per huge page.
    pub fn small_pages(self) -> u64 {
        self.bytes() / PAGE_SIZE
    }

    /// The sysfs directory of this size's pool.
    pub fn sysfs_dir(self) -> PathBuf {
        PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB", self.bytes() >> 10))
    }

    /// Checks that the protocol carries pages of this size (2 MiB: whole
    /// or in parts; 1 GiB: in 512 parts of 2 MiB).
    pub fn check_supported(self) -> Result<(), HugePageError> {
        let max = postcopy_core::layout::MAX_PAGE_SIZE;
        if self.bytes() > u64::from(max) {
            return Err(HugePageError::TooLarge { size: self, max });
        }
        Ok(())
    }

    /// Checks that fallback (`with_fallback`) works on pages of this size:
    /// its checkpoints carry each page whole, so not on 1 GiB pages.
    pub fn check_fallback(self, with_fallback: bool) -> Result<(), HugePageError> {
        let max = postcopy_core::layout::MAX_FRAME_PAGE_SIZE;
        if with_fallback && self.bytes() > u64::from(max) {
            return Err(HugePageError::NoFallback { size: self, max });
        }
        Ok(())
    }

    /// Free pages in this size's pool (0 when the kernel has no such pool).
    pub fn free_pages(self) -> u64 {
        std::fs::read_to_string(self.sysfs_dir().join("free_hugepages"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Checks that `needed` pages are free now.
    pub fn check_free(self, needed: u64) -> Result<(), HugePageError> {
        let free = self.free_pages();
        if free < needed {
            let path = self.sysfs_dir().join("nr_hugepages").display().to_string();
            return Err(HugePageError::NotEnough { size: self, needed, free, path });
        }
        Ok(())
    }
}

impl fmt::Display for HugePageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HugePageSize::Size2M => "2M",
            HugePageSize::Size1G => "1G",
        })
    }
}

impl FromStr for HugePageSize {
    type Err = HugePageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_uppercase().as_str() {
            "2M" | "2MB" | "2MIB" => Ok(HugePageSize::Size2M),
            "1G" | "1GB" | "1GIB" => Ok(HugePageSize::Size1G),
            _ => Err(HugePageError::Parse(s.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_both_cross() {
        assert_eq!("2M".parse(), Ok(HugePageSize::Size2M));
        assert_eq!("1g".parse(), Ok(HugePageSize::Size1G));
        assert!(matches!("4M".parse::<HugePageSize>(), Err(HugePageError::Parse(_))));
        assert_eq!(HugePageSize::Size2M.small_pages(), 512);
        assert_eq!(HugePageSize::Size2M.to_string(), "2M");
        assert!(HugePageSize::Size2M.check_supported().is_ok());
        assert!(HugePageSize::Size1G.check_supported().is_ok());
        assert!(HugePageSize::Size2M.check_fallback(true).is_ok());
        assert!(HugePageSize::Size1G.check_fallback(false).is_ok());
        assert!(matches!(HugePageSize::Size1G.check_fallback(true), Err(HugePageError::NoFallback { .. })));
        assert_eq!(HugePageSize::Size1G.small_pages(), 262_144);
        assert_eq!(HugePageSize::Size1G.sysfs_dir(), PathBuf::from("/sys/kernel/mm/hugepages/hugepages-1048576kB"));
        assert_eq!(HugePageSize::Size2M.sysfs_dir(), PathBuf::from("/sys/kernel/mm/hugepages/hugepages-2048kB"));
        let Err(e) = HugePageSize::Size2M.check_free(u64::MAX) else { panic!("nobody has 2^64 free huge pages") };
        assert!(e.to_string().contains("nr_hugepages"), "{e}");
    }
}
