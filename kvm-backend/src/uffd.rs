//! Destination memory: guest RAM registered with userfaultfd, so that a
//! touch of a page that has not arrived yet (by a vCPU, by KVM itself, or by
//! the VMM) blocks until the page is installed. Anonymous RAM is registered
//! for missing faults; preallocated RAM (shared memory) for minor faults:
//! its pages are in memory but not yet mapped into the guest's mapping; on
//! 4 KiB pages for missing faults too, for the pages a background
//! population has not allocated yet ([`crate::driver::populate`]).
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
//!   An install the kernel cuts short fails with an [`InstallError`] that
//!   says which pages of the run were handled and which were not, and why
//!   (retry later, refused, claims out of step, wake-up failed).
//! - [`UffdRam::discard_pages`] drops pages (`MADV_DONTNEED`) so that they
//!   fault again (stale precopy pages); safe while other threads install.
//! - [`UffdRam::inject_install_fault`] (tests only) makes an install fail,
//!   return `EAGAIN`, or stop part-way at a chosen page.
//! - [`FaultReader`] turns userfaultfd events into [`PageFault`]s. Its fd is
//!   non-blocking and pollable, so a driver thread can poll it together with
//!   sockets.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use userfaultfd::{
    Event, EventBuffer, FaultKind, FeatureFlags, IoctlFlags, ReadWrite, RegisterMode, Uffd, UffdBuilder,
};

use crate::page_bits::MappedPages;

use crate::layout::{MemoryMapError, PageRef, PAGE_SIZE};
use crate::memory::{GuestRam, MemoryError};

/// A userfaultfd operation on guest RAM failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// A userfaultfd call failed.
    #[error("userfaultfd {op} failed: {reason}")]
    Operation {
        /// Which operation.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// Installing pages stopped part-way (which pages, and why, inside).
    #[error(transparent)]
    Install(Box<InstallError>),
    /// A buffer did not have the size the call requires.
    #[error("buffer of {got} bytes where {want} are required")]
    BadLength {
        /// Required length.
        want: usize,
        /// Given length.
        got: usize,
    },
    /// A page range names no pages of the layout, or a block has no mapping.
    #[error(transparent)]
    Layout(#[from] MemoryMapError),
    /// Guest RAM itself failed.
    #[error(transparent)]
    Memory(MemoryError),
    /// A page arriving in parts cannot be mapped: a part of it was not
    /// placed (its placement failed, or never ran).
    #[error("a part of the page was not placed")]
    PartNotPlaced,
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

impl From<MemoryError> for UffdError {
    /// A layout error stays one: a bad page range reads the same whether
    /// the RAM or this module found it.
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::Layout(e) => Self::Layout(e),
            e => Self::Memory(e),
        }
    }
}

type Result<T> = std::result::Result<T, UffdError>;

fn layout_err(reason: String) -> UffdError {
    UffdError::Layout(MemoryMapError::Invalid(reason))
}
use crate::sys::{self, UffdFill, Wake};

/// Events read per `read(2)` on the userfaultfd.
pub const FAULT_BATCH: usize = 64;
/// Retries, each after a yield, of a fill that made no progress because the
/// address space is changing (`EAGAIN`); after them the install fails with
/// [`InstallFailure::Again`]. The change ends only when its userfaultfd
/// event is read, which may be this thread's caller's job: spinning longer
/// could wait for ever.
const AGAIN_RETRIES: u32 = 16;

/// `UFFD_FEATURE_MINOR_SHMEM` (the crate names no constant for it).
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`: minor faults on hugetlbfs memory.
const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect faults on shared and
/// hugetlbfs memory.
const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
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
        .map_err(|e| UffdError::Operation { op: "create", reason: e.to_string() })
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
    /// The outcome of a one-page run (one page of the backing memory: 512
    /// 4 KiB pages on 2 MiB huge pages, installed all or none).
    fn of(count: InstallCount) -> Self {
        if count.installed > 0 && count.already_present == 0 {
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

/// Why an install stopped before the end of its run.
#[derive(Debug, thiserror::Error)]
pub enum InstallFailure {
    /// The address space is changing (`EAGAIN` with nothing filled: an
    /// unread `REMOVE`/`REMAP`/`UNMAP`/`FORK` event): retry once it is read.
    #[error("the address space is changing (EAGAIN); retry later")]
    Again,
    /// The kernel refused the fill (`ENOMEM`, `EFAULT`, ...).
    #[error("{op}: {source}")]
    Os {
        /// Which ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a claimed page through the placement mapping failed.
    #[error("writing through the placement mapping: {0}")]
    Place(#[source] Box<MemoryError>),
    /// Pages claimed here were already mapped into the guest's mapping
    /// (claims and mapping out of step): their contents may be stale.
    #[error("{0} claimed pages were already mapped")]
    AlreadyMapped(u64),
    /// Every page was handled, but waking the threads waiting for them
    /// failed: they sleep until a later wake ([`UffdRam::wake_pages`]).
    #[error("UFFDIO_WAKE: {0}")]
    Wake(#[source] std::io::Error),
}

/// An install that stopped part-way: which pages of the run it handled.
#[derive(Debug, thiserror::Error)]
#[error(
    "install of {pages} pages from page {} of block {}: stopped at page {stopped_at} of the run \
     ({} installed, {} already present before it): {cause}",
    first.page, first.block, done.installed, done.already_present
)]
pub struct InstallError {
    /// First page of the run.
    pub first: PageRef,
    /// Pages in the run.
    pub pages: u64,
    /// What happened to the pages before `stopped_at` (every one of them is
    /// present: installed by this call, or already present).
    pub done: InstallCount,
    /// Index in the run of the first page this call did not handle: it and
    /// every page after it were not installed by this call (they were
    /// missing, or already present). `pages` when only the wake-up failed.
    pub stopped_at: u64,
    /// Why.
    pub cause: InstallFailure,
}

impl InstallError {
    /// The pages of the run (indexes) this call did not install.
    pub fn not_installed(&self) -> std::ops::Range<u64> {
        self.stopped_at..self.pages
    }

    /// Whether trying the same install again may succeed (the kernel asked
    /// for a retry, or only the wake-up failed).
    pub fn is_transient(&self) -> bool {
        matches!(self.cause, InstallFailure::Again | InstallFailure::Wake(_))
    }
}

/// A fill that stopped: progress so far (run-relative) and why.
struct Stopped {
    done: InstallCount,
    at_page: u64,
    cause: InstallFailure,
}

/// Test-only: how an injected install fault behaves at its page (see
/// [`UffdRam::inject_install_fault`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFault {
    /// The fill that reaches the page fills the pages before it, then the
    /// kernel refuses the page with `errno` (e.g. `ENOMEM`).
    Fail(i32),
    /// The fill that reaches the page fills the pages before it, then
    /// reports `EAGAIN` with nothing filled (address space changing).
    Again,
    /// The fill that reaches the page stops just before it, as a kernel
    /// cut short does (a partial count); the next fill goes on from there.
    Partial,
    /// The page is filled, but waking its waiters fails.
    WakeFails,
}

/// Test-only: an [`InjectedFault`] armed at a page, for a number of fills.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallFaultPlan {
    /// The page it fires at.
    pub page: PageRef,
    /// What it does.
    pub fault: InjectedFault,
    /// How many times it fires (each fill or wake that reaches the page).
    pub times: u32,
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
    /// A write to a write-protected page (present), not a missing page.
    pub write_protected: bool,
}

/// Whole pages in `data` (checked by the callers).
fn pages_in(data: &[u8]) -> u64 {
    (data.len() / PAGE_SIZE as usize) as u64
}

/// What [`UffdRam::place_then_wake`] writes into the pages it claims
/// before mapping them.
#[derive(Clone, Copy, Debug)]
enum Fill<'a> {
    /// These bytes.
    Bytes(&'a [u8]),
    /// Zeros.
    Zero,
    /// Nothing: the bytes are in place already ([`UffdRam::place_part`]).
    Placed,
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
    mapped: Option<MappedPages>,
    /// Test-only injected fault ([`UffdRam::inject_install_fault`]).
    injected: Mutex<Option<InstallFaultPlan>>,
    /// Whether `injected` holds a plan (checked without the lock).
    injection_armed: AtomicBool,
}

impl UffdRam {
    /// Registers every block of `ram`: for missing faults; or, when it is
    /// shared memory with a placement mapping, for minor faults (page in
    /// memory, not mapped in the guest's mapping) and, on 4 KiB pages, for
    /// missing faults too (page not allocated yet: RAM still being
    /// populated, [`GuestRam::new_unpopulated`]). An anonymous `ram` must
    /// not have been touched (pages already present never fault), a shared
    /// one must not have been touched through its guest mapping, and no
    /// vCPU may run before this.
    pub fn register(ram: Arc<GuestRam>) -> Result<Self> {
        Self::register_with_features(ram, 0)
    }

    /// [`UffdRam::register`], and for write-protect faults too when
    /// `write_protect`: a checkpoint write-protects the pages it must copy
    /// and copies each before the guest's first write to it
    /// ([`UffdRam::write_protect`], [`PageFault::write_protected`]).
    pub fn register_with_write_protect(ram: Arc<GuestRam>, write_protect: bool) -> Result<Self> {
        if !write_protect {
            return Self::register(ram);
        }
        let shared = ram.is_preallocated();
        let extra = if shared { FEATURE_WP_HUGETLBFS_SHMEM } else { 0 } | (1 << 0);
        Self::register_inner(ram, extra, RegisterMode::WRITE_PROTECT, IoctlFlags::WRITE_PROTECT)
    }

    /// Test-only: [`UffdRam::register`] asking for the extra `UFFD_FEATURE_*`
    /// bits `extra` too (e.g. `EVENT_REMOVE`, so that a discard leaves the
    /// address space "changing" until its event is read).
    #[doc(hidden)]
    pub fn register_with_features(ram: Arc<GuestRam>, extra: u64) -> Result<Self> {
        Self::register_inner(ram, extra, RegisterMode::empty(), IoctlFlags::empty())
    }

    fn register_inner(
        ram: Arc<GuestRam>,
        extra: u64,
        extra_mode: RegisterMode,
        extra_need: IoctlFlags,
    ) -> Result<Self> {
        let preallocated = ram.is_preallocated();
        let (mode, base, need) = if preallocated {
            let need = IoctlFlags::from_bits_retain(IOCTL_CONTINUE) | IoctlFlags::WAKE;
            match ram.huge_pages() {
                // Huge pages are all allocated up front: minor faults only.
                Some(_) => (RegisterMode::MINOR, FeatureFlags::from_bits_retain(FEATURE_MINOR_HUGETLBFS), need),
                // Shared 4 KiB pages may not be allocated yet
                // (`GuestRam::new_unpopulated`): a touch of such a page is a
                // missing fault, which the kernel would otherwise fill with
                // zeros behind our back. Both are resolved the same way: a
                // write through the placement mapping (which allocates the
                // page), then `UFFDIO_CONTINUE`, which wakes the waiters
                // of either kind.
                None => (
                    RegisterMode::MISSING | RegisterMode::MINOR,
                    FeatureFlags::from_bits_retain(FEATURE_MINOR_SHMEM),
                    need,
                ),
            }
        } else {
            (RegisterMode::MISSING, FeatureFlags::empty(), IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE)
        };
        let base = base | FeatureFlags::from_bits_retain(extra);
        let (mode, need) = (mode | extra_mode, need | extra_need);
        let (uffd, thread_id) = match new_uffd(base | FeatureFlags::THREAD_ID) {
            Ok(u) => (u, true),
            Err(_) => (new_uffd(base)?, false),
        };
        for block in 0..ram.layout().blocks().len() {
            let (host, len) =
                ram.block_host_range(block).ok_or_else(|| layout_err(format!("no mapping for block {block}")))?;
            let ioctls = uffd
                .register_with_mode(host as *mut libc::c_void, len as usize, mode)
                .map_err(|e| UffdError::Operation { op: "register", reason: e.to_string() })?;
            if !ioctls.contains(need) {
                return Err(UffdError::Operation {
                    op: "register",
                    reason: format!("range supports {ioctls:?}, need {need:?}"),
                });
            }
        }
        let mapped = preallocated.then(|| MappedPages::new(ram.layout().blocks().iter().map(|b| b.pages())));
        Ok(Self {
            ram,
            uffd: Arc::new(uffd),
            thread_id,
            mapped,
            injected: Mutex::new(None),
            injection_armed: AtomicBool::new(false),
        })
    }

    /// Test-only: arms (or with None, disarms) an injected install fault:
    /// fills and wake-ups that reach `plan.page` behave as `plan.fault`
    /// says, `plan.times` times. Installs of other pages are unaffected.
    #[doc(hidden)]
    pub fn inject_install_fault(&self, plan: Option<InstallFaultPlan>) {
        let mut slot = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        *slot = plan.filter(|p| p.times > 0);
        self.injection_armed.store(slot.is_some(), Ordering::SeqCst);
    }

    /// Test-only: the injected fault still armed (None once it fired its
    /// last time, or if none was armed).
    #[doc(hidden)]
    pub fn armed_install_fault(&self) -> Option<InstallFaultPlan> {
        *self.injected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The injected fault that fires on a fill of `pages` pages from `first`,
    /// if any: its page's index in the range. Counts the firing.
    fn injected_in(&self, first: PageRef, pages: u64, wake: bool) -> Option<(u64, InjectedFault)> {
        if !self.injection_armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut slot = self.injected.lock().unwrap_or_else(|e| e.into_inner());
        let plan = slot.as_mut()?;
        let in_range = plan.page.block == first.block
            && plan.page.page >= first.page
            && plan.page.page - first.page < pages
            && (plan.fault == InjectedFault::WakeFails) == wake;
        if !in_range {
            return None;
        }
        let fired = (plan.page.page - first.page, plan.fault);
        // A fill that only reaches up to the page (fills the pages before
        // it) does not count: the next one, starting at the page, fires.
        let fires = wake || fired.0 == 0 || plan.fault == InjectedFault::Partial;
        if !fires {
            return Some(fired);
        }
        plan.times -= 1;
        if plan.times == 0 {
            *slot = None;
            self.injection_armed.store(false, Ordering::SeqCst);
        }
        Some(fired)
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
            deferred: None,
        }
    }

    /// Installs one page (of the backing memory: a huge page on huge-page
    /// RAM, see [`GuestRam::unit_pages`]) and wakes the threads waiting for it.
    pub fn install_page(&self, page: PageRef, data: &[u8]) -> Result<Install> {
        self.check_page(data)?;
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
        self.check_page(data)?;
        let (n, t) = self.install_pages_with(page, data, |_| {}, installed)?;
        Ok((Install::of(n), t))
    }

    /// Installs `data.len() / 4096` consecutive pages from `first` (one
    /// block), skipping those already present. A run cut short fails with
    /// [`UffdError::Install`], which says which pages were installed.
    pub fn install_pages(&self, first: PageRef, data: &[u8]) -> Result<InstallCount> {
        let dst = self.copy_target(first, data)?;
        if self.mapped.is_some() {
            return self.place_then_wake(first, pages_in(data), Fill::Bytes(data), |_| {}, || ()).map(|(n, ())| n);
        }
        let copy = |at, off: usize, len| sys::uffd_copy(&self.uffd, at, &data[off..off + len], Wake::Now);
        self.fill(first, dst, data.len(), copy, "UFFDIO_COPY", |_| {}).map_err(|s| s.into_error(first, pages_in(data)))
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
            return self.place_then_wake(first, pages_in(data), Fill::Bytes(data), already_present, installed);
        }
        let copy = |at, off: usize, len| sys::uffd_copy(&self.uffd, at, &data[off..off + len], Wake::Later);
        self.fill_then_wake(first, dst, data.len(), copy, "UFFDIO_COPY", already_present, installed)
    }

    /// Installs `count` zero pages from `first` (`UFFDIO_ZEROPAGE`),
    /// skipping those already present.
    pub fn install_zero_pages(&self, first: PageRef, count: u64) -> Result<InstallCount> {
        let dst = self.ram.pages_host_addr(first, count)?;
        if self.mapped.is_some() {
            return self.place_then_wake(first, count, Fill::Zero, |_| {}, || ()).map(|(n, ())| n);
        }
        let zero = |at, _, len| sys::uffd_zeropage(&self.uffd, at, len, Wake::Now);
        let len = (count * PAGE_SIZE) as usize;
        self.fill(first, dst, len, zero, "UFFDIO_ZEROPAGE", |_| {}).map_err(|s| s.into_error(first, count))
    }

    /// Installs one zero page (of the backing memory).
    pub fn install_zero_page(&self, page: PageRef) -> Result<Install> {
        Ok(Install::of(self.install_zero_pages(page, self.ram.unit_pages())?))
    }

    /// As [`UffdRam::install_zero_page`], calling `installed()` before the
    /// waiting threads are woken (see [`UffdRam::install_pages_with`]).
    pub fn install_zero_page_with<T>(&self, page: PageRef, installed: impl FnOnce() -> T) -> Result<(Install, T)> {
        let unit = self.ram.unit_pages();
        let dst = self.ram.pages_host_addr(page, unit)?;
        if self.mapped.is_some() {
            let (n, t) = self.place_then_wake(page, unit, Fill::Zero, |_| {}, installed)?;
            return Ok((Install::of(n), t));
        }
        let zero = |at, _, len| sys::uffd_zeropage(&self.uffd, at, len, Wake::Later);
        let (n, t) = self.fill_then_wake(page, dst, PAGE_SIZE as usize, zero, "UFFDIO_ZEROPAGE", |_| {}, installed)?;
        Ok((Install::of(n), t))
    }

    fn check_page(&self, data: &[u8]) -> Result<()> {
        let want = (self.ram.unit_pages() * PAGE_SIZE) as usize;
        if data.len() != want {
            return Err(UffdError::BadLength { want, got: data.len() });
        }
        Ok(())
    }

    /// Where `data` goes from `first`: whole pages of one block.
    fn copy_target(&self, first: PageRef, data: &[u8]) -> Result<u64> {
        let len = data.len();
        if len == 0 || len % PAGE_SIZE as usize != 0 {
            return Err(UffdError::BadLength {
                want: len.div_ceil(PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize,
                got: len,
            });
        }
        Ok(self.ram.pages_host_addr(first, len as u64 / PAGE_SIZE)?)
    }

    /// Preallocated RAM: writes `data` at byte `offset` of the page (of the
    /// backing memory: a huge page on huge-page RAM) from `page` through
    /// the placement mapping, without mapping anything into the guest's:
    /// a part of a page arriving in parts, which stays invisible (a vCPU
    /// touching it still faults) until [`UffdRam::map_placed_page_with`].
    /// Returns false, writing nothing, when some of it is mapped already
    /// (a late part of a present page: a mapped page is never written
    /// again). `offset` and the length are whole 4 KiB pages.
    pub fn place_part(&self, page: PageRef, offset: usize, data: &[u8]) -> Result<bool> {
        let small = PAGE_SIZE as usize;
        let unit = (self.ram.unit_pages() * PAGE_SIZE) as usize;
        if data.is_empty() || offset % small != 0 || data.len() % small != 0 || offset + data.len() > unit {
            return Err(UffdError::BadLength {
                want: unit.min(data.len().div_ceil(small).max(1) * small),
                got: data.len(),
            });
        }
        let first = PageRef { page: page.page + (offset / small) as u64, ..page };
        let count = (data.len() / small) as u64;
        let claims = self.claims_of(first.block)?.claim();
        if (0..count).any(|k| claims.is_claimed(first.block, first.page + k)) {
            return Ok(false);
        }
        self.ram.place(first, data)?;
        Ok(true)
    }

    /// Preallocated RAM: maps the page (of the backing memory) from `page`,
    /// whose bytes were placed with [`UffdRam::place_part`], into the
    /// guest's mapping with one `UFFDIO_CONTINUE` over the whole page, then
    /// runs `installed()` and wakes its waiters (see
    /// [`UffdRam::install_page_with`]).
    pub fn map_placed_page_with<T>(&self, page: PageRef, installed: impl FnOnce() -> T) -> Result<(Install, T)> {
        if self.mapped.is_none() {
            return Err(UffdError::Memory(crate::memory::MemoryError::NotPreallocated));
        }
        let (n, t) = self.place_then_wake(page, self.ram.unit_pages(), Fill::Placed, |_| {}, installed)?;
        Ok((Install::of(n), t))
    }

    /// Preallocated RAM: claims each of the `count` pages from `first` that is
    /// not mapped yet, writes `data` (None: zeros) into the claimed ones through the
    /// placement mapping, maps them into the guest's (`UFFDIO_CONTINUE`
    /// without waking), then runs `installed()` and wakes the whole range.
    ///
    /// The claims are taken and given back under the table's shared guard,
    /// so a discard never runs in between (see [`MappedPages`]). A map cut
    /// short gives back the claims of the pages it did not map, and only
    /// those: a page it mapped stays claimed.
    fn place_then_wake<T>(
        &self,
        first: PageRef,
        count: u64,
        data: Fill<'_>,
        mut already_present: impl FnMut(u64),
        installed: impl FnOnce() -> T,
    ) -> Result<(InstallCount, T)> {
        const ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
        let page = PAGE_SIZE as usize;
        let dst = self.ram.pages_host_addr(first, count)?;
        let claims = self.claims_of(first.block)?.claim();
        let mut done = InstallCount::default();
        let mut stopped = None;
        let mut i = 0;
        while i < count && stopped.is_none() {
            if !claims.take(first.block, first.page + i) {
                already_present(i);
                done.already_present += 1;
                i += 1;
                continue;
            }
            let start = i;
            i += 1;
            while i < count && claims.take(first.block, first.page + i) {
                i += 1;
            }
            let run = PageRef { block: first.block, page: first.page + start };
            let (from, to) = (start as usize * page, i as usize * page);
            let placed = match data {
                Fill::Bytes(d) => self.ram.place(run, &d[from..to]),
                Fill::Zero => {
                    (start..i).try_for_each(|k| self.ram.place(PageRef { page: first.page + k, ..first }, &ZERO_PAGE))
                }
                Fill::Placed => Ok(()),
            };
            let mapped = match placed {
                Ok(()) => {
                    let map = |at, _, len| sys::uffd_continue(&self.uffd, at, len, Wake::Later);
                    self.fill(run, dst + from as u64, to - from, map, "UFFDIO_CONTINUE", |_| {})
                }
                Err(e) => Err(Stopped {
                    done: InstallCount::default(),
                    at_page: 0,
                    cause: InstallFailure::Place(Box::new(e)),
                }),
            };
            match mapped {
                Ok(n) => {
                    // Every claimed page is mapped now, with the data just
                    // placed; one that was mapped already is out of step.
                    done.installed += n.installed;
                    if n.already_present > 0 {
                        done.installed += n.already_present;
                        stopped = Some((i, InstallFailure::AlreadyMapped(n.already_present)));
                    }
                }
                Err(stop) => {
                    for k in start + stop.at_page..i {
                        claims.release(first.block, first.page + k);
                    }
                    done.installed += stop.done.installed + stop.done.already_present;
                    stopped = Some((start + stop.at_page, stop.cause));
                }
            }
        }
        drop(claims);
        let t = installed();
        let woken = self.wake_range(first, dst, count);
        match (stopped, woken) {
            (Some((at_page, cause)), _) => Err(Stopped { done, at_page, cause }.into_error(first, count)),
            (None, Err(e)) => {
                Err(Stopped { done, at_page: count, cause: InstallFailure::Wake(e) }.into_error(first, count))
            }
            (None, Ok(())) => Ok((done, t)),
        }
    }

    fn claims_of(&self, block: usize) -> Result<&MappedPages> {
        self.mapped
            .as_ref()
            .filter(|m| block < m.blocks())
            .ok_or_else(|| layout_err(format!("no block {block} among the mapped-page records")))
    }

    /// [`UffdRam::fill`] with an `op` that does not wake, then `installed()`,
    /// then one wake over the whole range, failed fill or not: a page
    /// placed before the failure may have waiters. A failed fill is
    /// reported as such whatever the wake did; a wake that fails after a
    /// complete fill is reported with every page counted.
    #[allow(clippy::too_many_arguments)]
    fn fill_then_wake<T>(
        &self,
        first: PageRef,
        dst: u64,
        len: usize,
        op: impl FnMut(u64, usize, usize) -> std::io::Result<UffdFill>,
        op_name: &'static str,
        already_present: impl FnMut(u64),
        installed: impl FnOnce() -> T,
    ) -> Result<(InstallCount, T)> {
        let pages = (len / PAGE_SIZE as usize) as u64;
        let filled = self.fill(first, dst, len, op, op_name, already_present);
        let t = installed();
        let woken = self.wake_range(first, dst, pages);
        match (filled, woken) {
            (Err(stop), _) => Err(stop.into_error(first, pages)),
            (Ok(done), Err(e)) => {
                Err(Stopped { done, at_page: pages, cause: InstallFailure::Wake(e) }.into_error(first, pages))
            }
            (Ok(done), Ok(())) => Ok((done, t)),
        }
    }

    /// `UFFDIO_WAKE` over `pages` pages from `first` (at host address `dst`).
    fn wake_range(&self, first: PageRef, dst: u64, pages: u64) -> std::io::Result<()> {
        if self.injected_in(first, pages, true).is_some() {
            return Err(std::io::Error::other("test-only injected wake failure"));
        }
        sys::uffd_wake(&self.uffd, dst, (pages * PAGE_SIZE) as usize)
    }

    /// Fills `len` bytes at `dst` (pages from `first`) with `op(address,
    /// offset, len)`, one call after another while the kernel cuts them
    /// short. A page already present is skipped (`already_present(i)`, `i`
    /// its index from `first`); `EAGAIN` with nothing filled is retried a
    /// few times. Stops at the first error, saying where.
    fn fill(
        &self,
        first: PageRef,
        dst: u64,
        len: usize,
        mut op: impl FnMut(u64, usize, usize) -> std::io::Result<UffdFill>,
        op_name: &'static str,
        mut already_present: impl FnMut(u64),
    ) -> std::result::Result<InstallCount, Stopped> {
        let page = PAGE_SIZE as usize;
        // The kernel maps huge-page memory a whole huge page at a time.
        let unit = self.ram.unit_pages();
        let mut count = InstallCount::default();
        let mut off = 0usize;
        let mut again = 0;
        while off < len {
            let at_page = (off / page) as u64;
            let here = PageRef { block: first.block, page: first.page + at_page };
            let left = len - off;
            let at = dst + off as u64;
            let filled = match self.injected_in(here, (left / page) as u64, false) {
                None => op(at, off, left),
                Some((k, InjectedFault::Partial)) => op(at, off, left.min((k as usize + 1) * page)),
                Some((0, InjectedFault::Fail(errno))) => Err(std::io::Error::from_raw_os_error(errno)),
                Some((0, InjectedFault::Again)) => Ok(UffdFill::Again),
                Some((k, _)) => op(at, off, k as usize * page),
            };
            match filled {
                Ok(UffdFill::Exists) => {
                    let skip = unit.min(((len - off) / page) as u64).max(1);
                    for k in 0..skip {
                        already_present(at_page + k);
                    }
                    count.already_present += skip;
                    off += skip as usize * page;
                    again = 0;
                }
                Ok(UffdFill::Filled(n)) if n >= page => {
                    let n = n - n % page;
                    count.installed += (n / page) as u64;
                    off += n;
                    again = 0;
                }
                Ok(UffdFill::Filled(_) | UffdFill::Again) => {
                    again += 1;
                    if again > AGAIN_RETRIES {
                        return Err(Stopped { done: count, at_page, cause: InstallFailure::Again });
                    }
                    std::thread::yield_now();
                }
                Err(source) => {
                    return Err(Stopped { done: count, at_page, cause: InstallFailure::Os { op: op_name, source } })
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
            .map_err(|e| UffdError::Operation { op: "wake", reason: e.to_string() })
    }

    /// Write-protects `count` pages from `first` (RAM registered with
    /// [`UffdRam::register_with_write_protect`]): a write to one of them
    /// then waits, as a write-protect fault, until it is unprotected.
    pub fn write_protect(&self, first: PageRef, count: u64) -> Result<()> {
        let dst = self.ram.pages_host_addr(first, count)?;
        self.uffd
            .write_protect(dst as *mut libc::c_void, (count * PAGE_SIZE) as usize)
            .map_err(|e| UffdError::Operation { op: "write-protect", reason: e.to_string() })
    }

    /// Removes the write protection of `count` pages from `first`, waking
    /// the threads whose writes waited for it.
    pub fn unprotect(&self, first: PageRef, count: u64) -> Result<()> {
        let dst = self.ram.pages_host_addr(first, count)?;
        self.uffd
            .remove_write_protection(dst as *mut libc::c_void, (count * PAGE_SIZE) as usize, true)
            .map_err(|e| UffdError::Operation { op: "unprotect", reason: e.to_string() })
    }

    /// Unregisters all RAM from userfaultfd: threads waiting for pages wake
    /// up and find zero pages. Only to abandon a guest whose pages will not
    /// come (so that its vCPU threads can exit); installs fail afterwards.
    pub fn unregister_all(&self) -> Result<()> {
        for block in 0..self.ram.layout().blocks().len() {
            let (host, len) =
                self.ram.block_host_range(block).ok_or_else(|| layout_err(format!("no mapping for block {block}")))?;
            self.uffd
                .unregister(host as *mut libc::c_void, len as usize)
                .map_err(|e| UffdError::Operation { op: "unregister", reason: e.to_string() })?;
        }
        Ok(())
    }

    /// Drops `count` pages from `first` so that the next access faults
    /// again. Safe while vCPUs run and other threads install: a vCPU
    /// touching the pages blocks until they are installed again, and on
    /// preallocated RAM the unmap and the claims change with no install in
    /// between.
    pub fn discard_pages(&self, first: PageRef, count: u64) -> Result<()> {
        // Preallocated RAM: this unmaps the pages from the guest's mapping
        // only; their stale contents stay in memory, and the next install
        // overwrites them before mapping them again.
        // Checked before the claims change: a bad range changes nothing.
        self.ram.pages_host_addr(first, count)?;
        let unmap = || self.ram.discard_pages(first, count).map_err(UffdError::from);
        match &self.mapped {
            Some(_) => self.claims_of(first.block)?.discard(first.block, first.page, count, unmap),
            None => unmap(),
        }
    }
}

impl Stopped {
    fn into_error(self, first: PageRef, pages: u64) -> UffdError {
        UffdError::Install(Box::new(InstallError {
            first,
            pages,
            done: self.done,
            stopped_at: self.at_page,
            cause: self.cause,
        }))
    }
}

/// Reads page faults from a [`UffdRam`]'s userfaultfd.
pub struct FaultReader {
    ram: Arc<GuestRam>,
    uffd: Arc<Uffd>,
    thread_id: bool,
    buf: EventBuffer,
    /// An error met while reading faults that were returned; the next read
    /// reports it.
    deferred: Option<UffdError>,
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
        sys::poll_readable(&*self.uffd, timeout).map_err(|source| UffdError::Os { op: "poll", source })
    }

    /// Appends the pending faults (at most [`FAULT_BATCH`]) to `out` without
    /// blocking; returns how many were read. An event that is not a fault
    /// in guest RAM never costs the faults read with it: they are returned,
    /// and the error comes from the next call.
    pub fn read(&mut self, out: &mut Vec<PageFault>) -> Result<usize> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let events = self
            .uffd
            .read_events(&mut self.buf)
            .map_err(|e| UffdError::Operation { op: "read", reason: e.to_string() })?;
        let mut n = 0;
        let mut bad: Option<(UffdError, usize)> = None;
        for ev in events {
            let fault = match ev {
                Ok(Event::Pagefault { kind, rw, addr, thread_id }) => match self.ram.page_of_host_addr(addr as u64) {
                    Some(page) => Ok(PageFault {
                        page,
                        write: rw == ReadWrite::Write,
                        thread_id: self.thread_id.then(|| thread_id.as_raw()),
                        write_protected: kind == FaultKind::WriteProtected,
                    }),
                    None => Err(format!("fault at {addr:?} outside guest RAM")),
                },
                Ok(other) => Err(format!("unexpected event {other:?}")),
                Err(e) => Err(e.to_string()),
            };
            match fault {
                Ok(f) => {
                    out.push(f);
                    n += 1;
                }
                Err(reason) => match &mut bad {
                    Some((_, more)) => *more += 1,
                    None => bad = Some((UffdError::Operation { op: "read", reason }, 0)),
                },
            }
        }
        match bad {
            None => Ok(n),
            Some((e, more)) => {
                let e = match (e, more) {
                    (UffdError::Operation { op, reason }, m) if m > 0 => {
                        UffdError::Operation { op, reason: format!("{reason} (and {m} more bad events)") }
                    }
                    (e, _) => e,
                };
                if n == 0 {
                    Err(e)
                } else {
                    self.deferred = Some(e);
                    Ok(n)
                }
            }
        }
    }
}
