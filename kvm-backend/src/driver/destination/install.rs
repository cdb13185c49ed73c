//! Placing pages in guest RAM: single pages, runs of consecutive pages in
//! one `UFFDIO_COPY`, discards, the bookkeeping per page (digest, present
//! bit, fault latency), an install that fails (retried, or reported to the
//! core), and the test-only damage and install fault switches.

use std::iter::Peekable;
use std::sync::atomic::Ordering;
use std::thread::Scope;
use std::time::Duration;

use bytes::Bytes;
use postcopy_core::wire::PageData;
use postcopy_core::PageNumber;

use super::error::DestinationError;
use super::state::{DestinationDriver, DestinationOp, Machine};
use crate::devices::lock;
use crate::driver::clock::now;
use crate::driver::install_faults::InstallFault;
use crate::driver::shell::SideDriver;
use crate::error::error_chain;
use crate::layout::PAGE_SIZE;
use crate::uffd::{Install, InstallFailure, InstallFaultPlan, UffdError};

/// Pages installed with one `UFFDIO_COPY` at most (the run's bits fit a u64).
const MAX_INSTALL_RUN: usize = 64;
/// How long a page's install waits for its parts being placed by other
/// readers (a copy of 2 MiB takes well under a millisecond) before the
/// page is reported lost.
const PARTS_PLACED_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of an install that failed transiently (`EAGAIN`) before the page
/// is reported missing to the core.
const INSTALL_RETRIES: u32 = 3;

impl DestinationDriver<'_> {
    /// Installs `page` and, when the next operations install the pages after
    /// it in the same block, those too in one `UFFDIO_COPY` (a syscall per
    /// page was a fifth of the receiver's time). Returns the pages it took.
    pub(super) fn install_batch<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        page: PageNumber,
        bytes: Bytes,
        ops: &mut Peekable<impl Iterator<Item = DestinationOp>>,
    ) -> u64 {
        let mut run = vec![(page, bytes)];
        while run.len() < MAX_INSTALL_RUN {
            let next = PageNumber(page.0 + run.len() as u64);
            match ops.peek() {
                Some(DestinationOp::Install { page: p, data: PageData::Bytes(_), overwrite: false })
                    if *p == next && self.batchable(next) && self.same_block(page, next) =>
                {
                    if let Some(DestinationOp::Install { page, data: PageData::Bytes(bytes), .. }) = ops.next() {
                        run.push((page, bytes));
                    }
                }
                _ => break,
            }
        }
        let pages = run.len() as u64;
        self.install_run(s, run);
        pages
    }

    /// Installs one page (`overwrite`: write over a present page).
    pub(super) fn install<'s>(&'s self, s: &'s Scope<'s, '_>, page: PageNumber, data: PageData, overwrite: bool) {
        let Some(m) = self.machine.get() else {
            tracing::error!(page = page.0, "page before the machine was built");
            return;
        };
        let Some(r) = m.map.page_ref(page) else { return };
        let mut data = data;
        if let Some(damage) = self.opts.damage.filter(|d| d.page() == page.0) {
            data = damage.apply(data, (m.map.unit_pages() * PAGE_SIZE) as usize);
            tracing::warn!(page = page.0, ?damage, "test-only damage applied");
        }
        if m.map.unit_pages() > 1 && !overwrite {
            // A whole copy of a page whose parts of an earlier copy another
            // reader may still be placing: those go first.
            let _ = self.parts_in_flight.wait_placed(page.0, PARTS_PLACED_TIMEOUT);
        }
        // The install time is taken before a woken vCPU can preempt this thread.
        let started_ns = now().0;
        // A page of the migration: a huge page on huge-page RAM, written or
        // mapped whole.
        let page_bytes = (m.map.unit_pages() * PAGE_SIZE) as usize;
        let result = match (&data, overwrite) {
            (PageData::Bytes(b), true) => {
                m.ram.write_pages(r, b).map(|()| (Install::Installed, now().0)).map_err(UffdError::from)
            }
            (PageData::Zero, true) => m
                .ram
                .write_pages(r, &vec![0u8; page_bytes])
                .map(|()| (Install::Installed, now().0))
                .map_err(UffdError::from),
            (PageData::Bytes(b), false) => m.uffd.install_page_with(r, b, || now().0),
            (PageData::Zero, false) => m.uffd.install_zero_page_with(r, || now().0),
        };
        if let Ok((_, at_ns)) = &result {
            self.install_counters.busy_ns.fetch_add(at_ns.saturating_sub(started_ns), Ordering::Relaxed);
        }
        match result {
            Ok((Install::Installed, at_ns)) => {
                let bytes = match &data {
                    PageData::Bytes(b) => Some(&b[..]),
                    PageData::Zero => None,
                };
                self.note_installed(m, page, bytes, at_ns);
            }
            Ok((Install::AlreadyPresent, _)) => self.note_already_present(page),
            Err(e) => self.install_failed(s, m, page, &data, overwrite, e),
        }
    }

    /// Places a part of a page arriving in parts where the guest cannot
    /// see it: through the placement mapping (so a 1 GiB page is never
    /// buffered whole a second time), or, on RAM without one or for parts
    /// smaller than 4 KiB, into a buffer of the page. Its hash goes to the
    /// page's digest ([`crate::driver::digest::parts_hash`]).
    pub(super) fn place_part(&self, page: PageNumber, offset: u32, data: Bytes) {
        self.place_part_inner(page, offset, data);
        self.parts_in_flight.done(page.0);
    }

    fn place_part_inner(&self, page: PageNumber, offset: u32, data: Bytes) {
        let Some(m) = self.machine.get() else {
            tracing::error!(page = page.0, "page part before the machine was built");
            return;
        };
        let Some(r) = m.map.page_ref(page) else { return };
        let page_bytes = (m.map.unit_pages() * PAGE_SIZE) as usize;
        let (offset, len) = (offset as usize, data.len());
        if len == 0 || page_bytes % len != 0 || offset % len != 0 || offset + len > page_bytes {
            // The core checked the part against the page size.
            tracing::error!(page = page.0, offset, len, "page part does not fit its page");
            return;
        }
        self.part_hashes.part(page.0, offset / len, page_bytes / len, &data);
        let started_ns = now().0;
        if m.ram.is_preallocated() && len % PAGE_SIZE as usize == 0 {
            match m.uffd.place_part(r, offset, &data) {
                Ok(true) => {}
                Ok(false) => tracing::warn!(page = page.0, offset, "part of a page already mapped: dropped"),
                Err(e) => {
                    tracing::error!(e = error_chain(&e), page = page.0, offset, "placing a page part");
                    // An empty buffer marks the page as failed: its install
                    // reports it lost, and the source sends it again.
                    lock(&self.staged_parts).insert(page.0, Vec::new());
                }
            }
        } else {
            let mut staged = lock(&self.staged_parts);
            let bytes = staged.entry(page.0).or_insert_with(|| vec![0; page_bytes]);
            if let Some(room) = bytes.get_mut(offset..offset + len) {
                room.copy_from_slice(&data);
            }
        }
        self.install_counters.busy_ns.fetch_add(now().0.saturating_sub(started_ns), Ordering::Relaxed);
    }

    /// Every part of `page` is placed ([`DestinationDriver::place_part`]):
    /// maps it into the guest whole, with one `UFFDIO_CONTINUE` (or installs
    /// its buffer), and wakes its waiters.
    pub(super) fn install_placed<'s>(&'s self, s: &'s Scope<'s, '_>, page: PageNumber) {
        let Some(m) = self.machine.get() else {
            tracing::error!(page = page.0, "page before the machine was built");
            return;
        };
        let Some(r) = m.map.page_ref(page) else { return };
        // Another reader may still be copying a part of this page in.
        if !self.parts_in_flight.wait_placed(page.0, PARTS_PLACED_TIMEOUT) {
            tracing::error!(page = page.0, "a part of the page was never placed: the page is asked for again");
            self.part_hashes.take(page.0);
            lock(&self.staged_parts).remove(&page.0);
            return self.report_lost(s, page, UffdError::PartNotPlaced);
        }
        let hash = self.part_hashes.take(page.0);
        let staged = lock(&self.staged_parts).remove(&page.0);
        let started_ns = now().0;
        let result = match staged {
            Some(bytes) if bytes.is_empty() => Err(UffdError::PartNotPlaced),
            Some(bytes) => m.uffd.install_page_with(r, &bytes, || now().0),
            None => m.uffd.map_placed_page_with(r, || now().0),
        };
        if let Ok((_, at_ns)) = &result {
            self.install_counters.busy_ns.fetch_add(at_ns.saturating_sub(started_ns), Ordering::Relaxed);
        }
        let note = |at_ns| {
            match hash {
                Some(h) => m.digests.record_hash(page.0, h),
                None => {
                    tracing::error!(page = page.0, "page installed without the hashes of all of its parts");
                    m.digests.forget(page.0);
                }
            }
            self.note_in_place(m, page, at_ns);
        };
        match result {
            Ok((Install::Installed, at_ns)) => note(at_ns),
            Ok((Install::AlreadyPresent, _)) => self.note_already_present(page),
            Err(UffdError::Install(e)) if matches!(e.cause, InstallFailure::Wake(_)) => {
                note(now().0);
                if let Err(e) = m.uffd.wake_pages(r, m.map.unit_pages()) {
                    tracing::error!(e = error_chain(&e), page = page.0, "waking a page's waiters");
                }
            }
            Err(e) => self.report_lost(s, page, e),
        }
    }

    /// Whether `page` may be installed as part of a run (the machine is
    /// built and no test-only damage applies to it).
    pub(super) fn batchable(&self, page: PageNumber) -> bool {
        // A huge page is installed alone: 2 MiB is plenty for one call.
        self.machine.get().is_some_and(|m| m.map.unit_pages() == 1)
            && self.opts.damage.is_none_or(|d| d.page() != page.0)
    }

    fn same_block(&self, a: PageNumber, b: PageNumber) -> bool {
        let Some(m) = self.machine.get() else { return false };
        matches!((m.map.page_ref(a), m.map.page_ref(b)), (Some(x), Some(y)) if x.block == y.block)
    }

    /// Installs consecutive pages of one block with one `UFFDIO_COPY`
    /// through a per-thread staging buffer; the bookkeeping is per page,
    /// as in [`DestinationDriver::install`].
    fn install_run<'s>(&'s self, s: &'s Scope<'s, '_>, run: Vec<(PageNumber, Bytes)>) {
        thread_local! {
            static STAGING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (Some(m), Some(&(first, _))) = (self.machine.get(), run.first()) else { return };
        if run.len() == 1 {
            for (page, bytes) in run {
                self.install(s, page, PageData::Bytes(bytes), false);
            }
            return;
        }
        let Some(r) = m.map.page_ref(first) else { return };
        let mut present = 0u64;
        let result = STAGING.with_borrow_mut(|staging| {
            staging.clear();
            for (_, bytes) in &run {
                staging.extend_from_slice(bytes);
            }
            let started_ns = now().0;
            m.uffd.install_pages_with(r, staging, |i| present |= 1 << i, || now().0).map(|(_, t)| (started_ns, t))
        });
        let t = match result {
            Ok((started_ns, t)) => {
                self.install_counters.busy_ns.fetch_add(t.saturating_sub(started_ns), Ordering::Relaxed);
                t
            }
            Err(e) => return self.install_run_failed(s, m, run, present, e),
        };
        for (i, (page, bytes)) in run.iter().enumerate() {
            if present >> i & 1 == 1 {
                self.note_already_present(*page);
            } else {
                self.note_installed(m, *page, Some(bytes), t);
            }
        }
    }

    /// `page` now holds `data` (None: zeros): its hash for the digest, its
    /// present bit, and the latency of a fault that waited for it.
    fn note_installed(&self, m: &Machine, page: PageNumber, data: Option<&[u8]>, at_ns: u64) {
        match data {
            Some(bytes) => m.digests.record(page.0, bytes),
            None => m.digests.record_zero(page.0),
        }
        self.note_in_place(m, page, at_ns);
    }

    /// `page` is in place (its digest recorded): its present bit, and the
    /// latency of a fault that waited for it.
    fn note_in_place(&self, m: &Machine, page: PageNumber, at_ns: u64) {
        m.installed.set(page.0);
        if let Some(waited) = m.clock.finish(page.0, at_ns) {
            let _ = lock(&self.latency).record(waited.max(1));
            if let Some(b) = &self.opts.blocktime {
                b.resolved(page.0, at_ns, Some(waited));
            }
        }
    }

    /// The kernel already had `page`: left as it was, counted as an anomaly.
    fn note_already_present(&self, page: PageNumber) {
        self.install_counters.anomalies.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(page = page.0, "page already present: install skipped");
    }

    /// A run stopped part-way: the pages before the stop are noted as
    /// usual, each later one goes through [`DestinationDriver::install`]
    /// again (and its failure handling) on its own.
    fn install_run_failed<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        m: &Machine,
        run: Vec<(PageNumber, Bytes)>,
        present: u64,
        error: UffdError,
    ) {
        let stopped_at = match &error {
            UffdError::Install(e) => usize::try_from(e.stopped_at).map_or(run.len(), |i| i.min(run.len())),
            _ => 0,
        };
        tracing::warn!(
            e = error_chain(&error),
            pages = run.len(),
            stopped_at,
            "install of a run stopped; its remaining pages go one by one"
        );
        let t = now().0;
        for (i, (page, bytes)) in run.iter().enumerate().take(stopped_at) {
            if present >> i & 1 == 1 {
                self.note_already_present(*page);
            } else {
                self.note_installed(m, *page, Some(bytes), t);
            }
        }
        if let (Some(&(first, _)), true) = (run.first(), stopped_at == run.len()) {
            // Only the wake-up failed: wake again.
            if let Some(r) = m.map.page_ref(first) {
                if let Err(e) = m.uffd.wake_pages(r, run.len() as u64 * m.map.unit_pages()) {
                    tracing::error!(e = error_chain(&e), first = first.0, pages = run.len(), "waking a run's waiters");
                }
            }
        }
        for (page, bytes) in run.into_iter().skip(stopped_at) {
            self.install(s, page, PageData::Bytes(bytes), false);
        }
    }

    /// Installing `page` failed with `error`. Installed after all with only
    /// the wake-up failing: noted, woken again. A transient failure is
    /// retried a few times here. Otherwise the page is missing: the core
    /// hears of it ([`postcopy_core::Destination::handle_install_failed`])
    /// and gets it back from the source, or ends the migration.
    fn install_failed<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        m: &Machine,
        page: PageNumber,
        data: &PageData,
        overwrite: bool,
        error: UffdError,
    ) {
        let bytes = match data {
            PageData::Bytes(b) => Some(&b[..]),
            PageData::Zero => None,
        };
        let Some(r) = m.map.page_ref(page) else { return };
        let mut error = error;
        for attempt in 0..=INSTALL_RETRIES {
            match &error {
                UffdError::Install(e) if matches!(e.cause, InstallFailure::Wake(_)) => {
                    self.note_installed(m, page, bytes, now().0);
                    if let Err(e) = m.uffd.wake_pages(r, m.map.unit_pages()) {
                        tracing::error!(e = error_chain(&e), page = page.0, "waking a page's waiters");
                    }
                    return;
                }
                UffdError::Install(e) if e.is_transient() && !overwrite && attempt < INSTALL_RETRIES => {
                    tracing::warn!(page = page.0, attempt, "page {} failed to install ({}), retrying", page.0, e.cause);
                    std::thread::sleep(Duration::from_millis(1 << attempt));
                }
                _ => break,
            }
            let retried = match bytes {
                Some(b) => m.uffd.install_page(r, b),
                None => m.uffd.install_zero_page(r),
            };
            match retried {
                Ok(Install::Installed) => return self.note_installed(m, page, bytes, now().0),
                Ok(Install::AlreadyPresent) => return self.note_already_present(page),
                Err(e) => error = e,
            }
        }
        self.report_lost(s, page, error);
    }

    /// Installing `page` failed for good: the core hears of it and gets
    /// the page back from the source, or ends the migration.
    fn report_lost<'s>(&'s self, s: &'s Scope<'s, '_>, page: PageNumber, error: UffdError) {
        self.install_counters.anomalies.fetch_add(1, Ordering::Relaxed);
        // The core keeps the reason as text.
        let reason = error_chain(&error);
        tracing::error!(e = error_chain(&DestinationError::InstallFailed { page: page.0, source: error.into() }));
        let mut late = None;
        self.event(s, |l, now| {
            if let Err(e) = l.core.handle_install_failed(now, page, reason) {
                late = Some(e);
            }
        });
        if let Some(source) = late {
            // Nothing brings the page back: the guest is not run on the hole.
            let e = DestinationError::PageLost { page: page.0, source };
            tracing::error!(e = error_chain(&e));
            *lock(&self.fatal) = Some(e);
        }
    }

    /// Test-only: arms the install fault asked for in the environment
    /// ([`crate::driver::install_faults`]).
    pub(super) fn arm_install_fault(&self) {
        let Some(m) = self.machine.get() else { return };
        match InstallFault::from_env() {
            Ok(None) => {}
            Ok(Some(f)) => match m.map.page_ref(PageNumber(f.page)) {
                Some(page) => {
                    tracing::warn!(fault = ?f, "test-only install fault armed");
                    m.uffd.inject_install_fault(Some(InstallFaultPlan { page, fault: f.fault, times: f.times }));
                }
                None => tracing::warn!(page = f.page, "test-only install fault outside the guest: not armed"),
            },
            Err(e) => tracing::warn!(e = error_chain(&e), "test-only install fault not armed"),
        }
    }

    /// Drops `count` pages from `first` (the source sends them again).
    pub(super) fn discard(&self, first: PageNumber, count: u64) {
        let Some(m) = self.machine.get() else { return };
        let Some(r) = m.map.page_ref(first) else { return };
        if let Err(e) = m.uffd.discard_pages(r, count * m.map.unit_pages()) {
            tracing::error!(%e, first = first.0, count, "discard failed");
            self.install_counters.anomalies.fetch_add(1, Ordering::Relaxed);
        }
        for page in first.0..first.0 + count {
            m.digests.forget(page);
            m.installed.clear(page);
        }
    }
}
