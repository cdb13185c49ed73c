//! Destination memory: guest RAM registered with userfaultfd, so that a
//! touch of a page that has not arrived yet (by a vCPU, by KVM itself, or by
//! the VMM) blocks until the page is installed. Anonymous RAM is registered
//! for missing faults; preallocated RAM (every page already allocated in
//! shared memory) for minor faults: its pages are in memory but not yet
//! mapped into the guest's mapping.
//!
//! - [`UffdRam::register`] registers every block; do it before any vCPU runs.
//! - [`UffdRam::install_page`] / [`UffdRam::install_pages`] and
//!   [`UffdRam::install_zero_pages`] place pages and wake the threads waiting
//!   for them: `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` for anonymous RAM; for
//!   preallocated RAM a copy through the placement mapping, then
//!   `UFFDIO_CONTINUE` maps the pages into the guest's. A page that is
//!   already present is reported ([`Install::AlreadyPresent`]), not an error,
//!   and never overwritten.
//!   Their `_with` forms run a callback between the install and the wake-up.
//! - [`UffdRam::discard_pages`] drops pages (`MADV_DONTNEED`) so that they
//!   fault again (stale precopy pages).
//! - [`FaultReader`] turns userfaultfd events into [`PageFault`]s. Its fd is
//!   non-blocking and pollable, so a driver thread can poll it together with
//!   sockets.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use userfaultfd::{Event, EventBuffer, FeatureFlags, IoctlFlags, ReadWrite, RegisterMode, Uffd, UffdBuilder};

use crate::driver::sync::PageBits;

use crate::error::{Error, Result};
use crate::layout::{PageRef, PAGE_SIZE};
use crate::memory::GuestRam;
use crate::sys::{self, UffdFill, Wake};

/// Events read per `read(2)` on the userfaultfd.
pub const FAULT_BATCH: usize = 64;
/// Retries of a fill the kernel cut short (`EAGAIN`: address space changing).
const FILL_RETRIES: u32 = 1000;

/// `UFFD_FEATURE_MINOR_SHMEM` (the crate names no constant for it).
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `1 << _UFFDIO_CONTINUE` among a registration's ioctls.
const IOCTL_CONTINUE: u64 = 1 << 0x07;

/// userfaultfd features, by name and `UFFD_FEATURE_*` bit.
const FEATURES: &[(&str, u64)] = &[
    ("PAGEFAULT_FLAG_WP", 1 << 0),
    ("EVENT_FORK", 1 << 1),
    ("EVENT_REMAP", 1 << 2),
    ("EVENT_REMOVE", 1 << 3),
    ("MISSING_HUGETLBFS", 1 << 4),
    ("MISSING_SHMEM", 1 << 5),
    ("EVENT_UNMAP", 1 << 6),
    ("SIGBUS", 1 << 7),
    ("THREAD_ID", 1 << 8),
    ("MINOR_HUGETLBFS", 1 << 9),
    ("MINOR_SHMEM", 1 << 10),
    ("EXACT_ADDRESS", 1 << 11),
    ("WP_HUGETLBFS_SHMEM", 1 << 12),
    ("WP_UNPOPULATED", 1 << 13),
    ("POISON", 1 << 14),
    ("WP_ASYNC", 1 << 15),
    ("MOVE", 1 << 16),
];

/// The userfaultfd features this kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UffdFeatures {
    /// `UFFD_FEATURE_*` bits.
    pub bits: u64,
    /// Their names.
    pub names: Vec<&'static str>,
}

impl UffdFeatures {
    /// Whether the feature called `name` (e.g. "THREAD_ID") is offered.
    pub fn has(&self, name: &str) -> bool {
        self.names.contains(&name)
    }
}

/// Asks the kernel which userfaultfd features it offers (one probe per
/// feature: `UFFDIO_API` fails for an unknown one). Also checks that a
/// userfaultfd that handles kernel faults can be created at all.
pub fn probe_features() -> Result<UffdFeatures> {
    new_uffd(FeatureFlags::empty())?;
    let mut out = UffdFeatures { bits: 0, names: Vec::new() };
    for &(name, bit) in FEATURES {
        if new_uffd(FeatureFlags::from_bits_retain(bit)).is_ok() {
            out.bits |= bit;
            out.names.push(name);
        }
    }
    Ok(out)
}

fn new_uffd(features: FeatureFlags) -> Result<Uffd> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        // Kernel faults too: KVM touches guest memory from the kernel.
        .user_mode_only(false)
        .require_features(features)
        .require_ioctls(IoctlFlags::REGISTER | IoctlFlags::UNREGISTER)
        .create()
        .map_err(|e| Error::Uffd { op: "create", reason: e.to_string() })
}

/// Outcome of installing one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// The page was missing and now holds the data.
    Installed,
    /// The page was already present; nothing changed.
    AlreadyPresent,
}

impl Install {
    /// The outcome of a one-page run.
    fn of(count: InstallCount) -> Self {
        if count.installed == 1 {
            Install::Installed
        } else {
            Install::AlreadyPresent
        }
    }
}

/// Outcome of installing a run of pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstallCount {
    /// Pages installed.
    pub installed: u64,
    /// Pages that were already present (left as they were).
    pub already_present: u64,
}

/// A missing-page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The page.
    pub page: PageRef,
    /// Whether the access was a write.
    pub write: bool,
    /// Kernel id of the faulting thread (a vCPU thread for guest and KVM
    /// faults), when the kernel reports it.
    pub thread_id: Option<i32>,
}

/// Whole pages in `data` (checked by the callers).
fn pages_in(data: &[u8]) -> u64 {
    (data.len() / PAGE_SIZE as usize) as u64
}

/// Guest RAM registered with a userfaultfd.
#[derive(Debug)]
pub struct UffdRam {
    ram: Arc<GuestRam>,
    uffd: Arc<Uffd>,
    thread_id: bool,
    /// Preallocated RAM: per block, the pages mapped into the guest's
    /// mapping. The kernel cannot refuse a late copy there (the copy goes
    /// through the placement mapping before `UFFDIO_CONTINUE`): a page is
    /// claimed here first, and never written again once claimed.
    mapped: Option<Vec<PageBits>>,
}

impl UffdRam {
    /// Registers every block of `ram`: for missing faults, or for minor
    /// faults when it is preallocated. An anonymous `ram` must not have been
    /// touched (pages already present never fault), a preallocated one must
    /// not have been touched through its guest mapping, and no vCPU may run
    /// before this.
    pub fn register(ram: Arc<GuestRam>) -> Result<Self> {
        let preallocated = ram.is_preallocated();
        let (mode, base, need) = if preallocated {
            let need = IoctlFlags::from_bits_retain(IOCTL_CONTINUE) | IoctlFlags::WAKE;
            (RegisterMode::MINOR, FeatureFlags::from_bits_retain(FEATURE_MINOR_SHMEM), need)
        } else {
            (RegisterMode::MISSING, FeatureFlags::empty(), IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE)
        };
        let (uffd, thread_id) = match new_uffd(base | FeatureFlags::THREAD_ID) {
            Ok(u) => (u, true),
            Err(_) => (new_uffd(base)?, false),
        };
        for block in 0..ram.layout().blocks().len() {
            let (host, len) =
                ram.block_host_range(block).ok_or_else(|| Error::Layout(format!("no mapping for block {block}")))?;
            let ioctls = uffd
                .register_with_mode(host as *mut libc::c_void, len as usize, mode)
                .map_err(|e| Error::Uffd { op: "register", reason: e.to_string() })?;
            if !ioctls.contains(need) {
                return Err(Error::Uffd {
                    op: "register",
                    reason: format!("range supports {ioctls:?}, need {need:?}"),
                });
            }
        }
        let mapped = preallocated.then(|| ram.layout().blocks().iter().map(|b| PageBits::new(b.pages())).collect());
        Ok(Self { ram, uffd: Arc::new(uffd), thread_id, mapped })
    }

    /// The guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Whether faults carry the faulting thread's id.
    pub fn reports_thread_ids(&self) -> bool {
        self.thread_id
    }

    /// A reader of this RAM's faults (several may exist; each event goes to
    /// one of them).
    pub fn fault_reader(&self) -> FaultReader {
        FaultReader {
            ram: self.ram.clone(),
            uffd: self.uffd.clone(),
            thread_id: self.thread_id,
            buf: EventBuffer::new(FAULT_BATCH),
        }
    }

    /// Installs one page and wakes the threads waiting for it.
    pub fn install_page(&self, page: PageRef, data: &[u8]) -> Result<Install> {
        Self::check_page(data)?;
        let n = self.install_pages(page, data)?;
        Ok(Install::of(n))
    }

    /// As [`UffdRam::install_page`], calling `installed()` once the page is
    /// in place and before its waiting threads are woken (see
    /// [`UffdRam::install_pages_with`]).
    pub fn install_page_with<T>(
        &self,
        page: PageRef,
        data: &[u8],
        installed: impl FnOnce() -> T,
    ) -> Result<(Install, T)> {
        Self::check_page(data)?;
        let (n, t) = self.install_pages_with(page, data, |_| {}, installed)?;
        Ok((Install::of(n), t))
    }

    /// Installs `data.len() / 4096` consecutive pages from `first` (one
    /// block), skipping those already present.
    pub fn install_pages(&self, first: PageRef, data: &[u8]) -> Result<InstallCount> {
        let dst = self.copy_target(first, data)?;
        if self.mapped.is_some() {
            return self.place_then_wake(first, pages_in(data), Some(data), |_| {}, || ()).map(|(n, ())| n);
        }
        self.fill(dst, data.len(), |at, off| sys::uffd_copy(&self.uffd, at, &data[off..], Wake::Now), |_| {})
    }

    /// As [`UffdRam::install_pages`], calling `already_present(i)` for the
    /// `i`-th page of the run when it was left as it was, and `installed()`
    /// once the pages are in place but before the threads waiting for them
    /// are woken (`UFFDIO_COPY_MODE_DONTWAKE`, then `UFFDIO_WAKE`). A vCPU
    /// woken on the caller's CPU runs first: whatever `installed` records
    /// (the install time) would otherwise wait until the guest faults again.
    pub fn install_pages_with<T>(
        &self,
        first: PageRef,
        data: &[u8],
        already_present: impl FnMut(u64),
        installed: impl FnOnce() -> T,
    ) -> Result<(InstallCount, T)> {
        let dst = self.copy_target(first, data)?;
        if self.mapped.is_some() {
            return self.place_then_wake(first, pages_in(data), Some(data), already_present, installed);
        }
        let len = data.len();
        self.fill_then_wake(
            dst,
            len,
            |at, off| sys::uffd_copy(&self.uffd, at, &data[off..], Wake::Later),
            already_present,
            installed,
        )
    }

    /// Installs `count` zero pages from `first` (`UFFDIO_ZEROPAGE`),
    /// skipping those already present.
    pub fn install_zero_pages(&self, first: PageRef, count: u64) -> Result<InstallCount> {
        let dst = self.ram.pages_host_addr(first, count)?;
        if self.mapped.is_some() {
            return self.place_then_wake(first, count, None, |_| {}, || ()).map(|(n, ())| n);
        }
        let len = (count * PAGE_SIZE) as usize;
        self.fill(dst, len, |at, off| sys::uffd_zeropage(&self.uffd, at, len - off, Wake::Now), |_| {})
    }

    /// Installs one zero page.
    pub fn install_zero_page(&self, page: PageRef) -> Result<Install> {
        Ok(Install::of(self.install_zero_pages(page, 1)?))
    }

    /// As [`UffdRam::install_zero_page`], calling `installed()` before the
    /// waiting threads are woken (see [`UffdRam::install_pages_with`]).
    pub fn install_zero_page_with<T>(&self, page: PageRef, installed: impl FnOnce() -> T) -> Result<(Install, T)> {
        let dst = self.ram.pages_host_addr(page, 1)?;
        if self.mapped.is_some() {
            let (n, t) = self.place_then_wake(page, 1, None, |_| {}, installed)?;
            return Ok((Install::of(n), t));
        }
        let len = PAGE_SIZE as usize;
        let (n, t) = self.fill_then_wake(
            dst,
            len,
            |at, off| sys::uffd_zeropage(&self.uffd, at, len - off, Wake::Later),
            |_| {},
            installed,
        )?;
        Ok((Install::of(n), t))
    }

    fn check_page(data: &[u8]) -> Result<()> {
        if data.len() != PAGE_SIZE as usize {
            return Err(Error::BadLength { want: PAGE_SIZE as usize, got: data.len() });
        }
        Ok(())
    }

    /// Where `data` goes from `first`: whole pages of one block.
    fn copy_target(&self, first: PageRef, data: &[u8]) -> Result<u64> {
        let len = data.len();
        if len == 0 || len % PAGE_SIZE as usize != 0 {
            return Err(Error::BadLength {
                want: len.div_ceil(PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize,
                got: len,
            });
        }
        self.ram.pages_host_addr(first, len as u64 / PAGE_SIZE)
    }

    /// Preallocated RAM: claims each of the `count` pages from `first` that is
    /// not mapped yet, writes `data` (None: zeros) into the claimed ones through the
    /// placement mapping, maps them into the guest's (`UFFDIO_CONTINUE`
    /// without waking), then runs `installed()` and wakes the whole range.
    fn place_then_wake<T>(
        &self,
        first: PageRef,
        count: u64,
        data: Option<&[u8]>,
        mut already_present: impl FnMut(u64),
        installed: impl FnOnce() -> T,
    ) -> Result<(InstallCount, T)> {
        const ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        let page = PAGE_SIZE as usize;
        let dst = self.ram.pages_host_addr(first, count)?;
        let bits = self.block_bits(first.block)?;
        let mut done = InstallCount::default();
        let mut failed = None;
        let mut i = 0;
        while i < count && failed.is_none() {
            if !bits.set(first.page + i) {
                already_present(i);
                done.already_present += 1;
                i += 1;
                continue;
            }
            let start = i;
            i += 1;
            while i < count && bits.set(first.page + i) {
                i += 1;
            }
            let run = PageRef { block: first.block, page: first.page + start };
            let (from, to) = (start as usize * page, i as usize * page);
            let placed = match data {
                Some(d) => self.ram.place(run, &d[from..to]),
                None => {
                    (start..i).try_for_each(|k| self.ram.place(PageRef { page: first.page + k, ..first }, &ZERO_PAGE))
                }
            };
            let len = to - from;
            let at = dst + from as u64;
            let mapped = placed.and_then(|()| {
                self.fill(
                    at,
                    len,
                    |a, _| sys::uffd_continue(&self.uffd, a, len - (a - at) as usize, Wake::Later),
                    |_| {},
                )
            });
            match mapped {
                Ok(n) if n.already_present == 0 => done.installed += i - start,
                Ok(n) => {
                    failed = Some(Error::Uffd {
                        op: "continue",
                        reason: format!("{} claimed pages were already mapped", n.already_present),
                    })
                }
                Err(e) => {
                    for k in start..i {
                        bits.clear(first.page + k);
                    }
                    failed = Some(e);
                }
            }
        }
        let t = installed();
        let woken = sys::uffd_wake(&self.uffd, dst, count as usize * page);
        if let Some(e) = failed {
            return Err(e);
        }
        woken.map_err(|e| Error::Uffd { op: "wake", reason: e.to_string() })?;
        Ok((done, t))
    }

    fn block_bits(&self, block: usize) -> Result<&PageBits> {
        self.mapped
            .as_ref()
            .and_then(|m| m.get(block))
            .ok_or_else(|| Error::Layout(format!("no block {block} among the mapped-page records")))
    }

    /// [`UffdRam::fill`] with an `op` that does not wake, then `installed()`,
    /// then one wake over the whole range, failed fill or not: a page
    /// placed before the failure may have waiters.
    fn fill_then_wake<T>(
        &self,
        dst: u64,
        len: usize,
        op: impl FnMut(u64, usize) -> std::io::Result<UffdFill>,
        already_present: impl FnMut(u64),
        installed: impl FnOnce() -> T,
    ) -> Result<(InstallCount, T)> {
        let filled = self.fill(dst, len, op, already_present);
        let t = installed();
        sys::uffd_wake(&self.uffd, dst, len).map_err(|e| Error::Uffd { op: "wake", reason: e.to_string() })?;
        Ok((filled?, t))
    }

    fn fill(
        &self,
        dst: u64,
        len: usize,
        mut op: impl FnMut(u64, usize) -> std::io::Result<UffdFill>,
        mut already_present: impl FnMut(u64),
    ) -> Result<InstallCount> {
        let page = PAGE_SIZE as usize;
        let mut count = InstallCount::default();
        let mut off = 0usize;
        let mut retries = 0;
        while off < len {
            let filled = op(dst + off as u64, off).map_err(|e| Error::Uffd { op: "fill", reason: e.to_string() })?;
            match filled {
                UffdFill::Exists => {
                    already_present((off / page) as u64);
                    count.already_present += 1;
                    off += page;
                    retries = 0;
                }
                UffdFill::Filled(n) if n >= page => {
                    let n = n - n % page;
                    count.installed += (n / page) as u64;
                    off += n;
                    retries = 0;
                }
                UffdFill::Filled(_) => {
                    retries += 1;
                    if retries > FILL_RETRIES {
                        return Err(Error::Uffd { op: "fill", reason: "no progress (EAGAIN)".into() });
                    }
                }
            }
        }
        Ok(count)
    }

    /// Wakes the threads waiting on `count` pages from `first` (`UFFDIO_WAKE`),
    /// for a fault that raced with the page's install.
    pub fn wake_pages(&self, first: PageRef, count: u64) -> Result<()> {
        let dst = self.ram.pages_host_addr(first, count)?;
        sys::uffd_wake(&self.uffd, dst, (count * PAGE_SIZE) as usize)
            .map_err(|e| Error::Uffd { op: "wake", reason: e.to_string() })
    }

    /// Unregisters all RAM from userfaultfd: threads waiting for pages wake
    /// up and find zero pages. Only to abandon a guest whose pages will not
    /// come (so that its vCPU threads can exit); installs fail afterwards.
    pub fn unregister_all(&self) -> Result<()> {
        for block in 0..self.ram.layout().blocks().len() {
            let (host, len) = self
                .ram
                .block_host_range(block)
                .ok_or_else(|| Error::Layout(format!("no mapping for block {block}")))?;
            self.uffd
                .unregister(host as *mut libc::c_void, len as usize)
                .map_err(|e| Error::Uffd { op: "unregister", reason: e.to_string() })?;
        }
        Ok(())
    }

    /// Drops `count` pages from `first` so that the next access faults
    /// again. Safe while vCPUs run: a vCPU touching them blocks until they
    /// are installed again.
    pub fn discard_pages(&self, first: PageRef, count: u64) -> Result<()> {
        let host = self.ram.pages_host_addr(first, count)?;
        // Preallocated RAM: this unmaps the pages from the guest's mapping
        // only; their stale contents stay in memory, and the next install
        // overwrites them before mapping them again.
        sys::madvise(host, (count * PAGE_SIZE) as usize, sys::Advice::DontNeed)
            .map_err(crate::error::os_err("madvise(MADV_DONTNEED)"))?;
        if self.mapped.is_some() {
            let bits = self.block_bits(first.block)?;
            for page in first.page..first.page + count {
                bits.clear(page);
            }
        }
        Ok(())
    }
}

/// Reads page faults from a [`UffdRam`]'s userfaultfd.
pub struct FaultReader {
    ram: Arc<GuestRam>,
    uffd: Arc<Uffd>,
    thread_id: bool,
    buf: EventBuffer,
}

impl std::fmt::Debug for FaultReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultReader").field("fd", &self.uffd.as_raw_fd()).finish()
    }
}

impl AsRawFd for FaultReader {
    /// The non-blocking userfaultfd, readable when faults are pending.
    fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }
}

impl FaultReader {
    /// Waits up to `timeout` for a fault; returns whether one is pending.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        sys::poll_readable(&*self.uffd, timeout).map_err(crate::error::os_err("poll"))
    }

    /// Appends the pending faults (at most [`FAULT_BATCH`]) to `out` without
    /// blocking; returns how many were read.
    pub fn read(&mut self, out: &mut Vec<PageFault>) -> Result<usize> {
        let events =
            self.uffd.read_events(&mut self.buf).map_err(|e| Error::Uffd { op: "read", reason: e.to_string() })?;
        let mut n = 0;
        for ev in events {
            match ev.map_err(|e| Error::Uffd { op: "read", reason: e.to_string() })? {
                Event::Pagefault { rw, addr, thread_id, .. } => {
                    let page = self.ram.page_of_host_addr(addr as u64).ok_or_else(|| Error::Uffd {
                        op: "read",
                        reason: format!("fault at {addr:?} outside guest RAM"),
                    })?;
                    out.push(PageFault {
                        page,
                        write: rw == ReadWrite::Write,
                        thread_id: self.thread_id.then(|| thread_id.as_raw()),
                    });
                    n += 1;
                }
                other => return Err(Error::Uffd { op: "read", reason: format!("unexpected event {other:?}") }),
            }
        }
        Ok(n)
    }
}
