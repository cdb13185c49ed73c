//! Fallback on the destination (docs/fallback.md): the guest runs only
//! under the source's lease (fencing stops its vCPUs when it lapses), and
//! checkpoints of one instant go back to the source.
//!
//! A checkpoint stops the vCPUs, reads and clears KVM's dirty log (on from
//! the guest's start here), copies every page the guest dirtied since the
//! previous checkpoint and the device state, and resumes the vCPUs: a copy
//! of one instant. Pages placed by the migration are written through the
//! placement mapping, not by the guest, so they are not in the log: the
//! source has them already. The vCPUs' pauses (fence, checkpoint) and
//! resumes (lease restored, checkpoint done) are decided under one lock,
//! so that a checkpoint never runs a fenced guest and a fence is never
//! undone by a checkpoint's end.

use std::sync::atomic::Ordering;
use std::thread::Scope;
use std::time::Duration;

use bytes::Bytes;
use postcopy_core::wire::PageData;
use postcopy_core::PageNumber;

use super::fallback_state::{CopyOnWrite, FallbackLog};
use super::state::{DestinationDriver, Machine};
use crate::devices::lock;
use crate::driver::clock::now;
use crate::driver::placement::set_policy;
use crate::driver::shell::SideDriver;
use crate::error::error_chain;
use crate::layout::{PageRef, PAGE_SIZE};
use crate::state::DeviceState;

/// Test-only: with `N`, the destination process dies at once (as by
/// SIGKILL: no farewell, no cleanup) when asked for checkpoint `N + 1`,
/// that is once checkpoint `N` was acknowledged. The bench's takeover
/// figure uses it.
pub const DIE_AFTER_CHECKPOINT_ENV: &str = "POSTCOPY_TEST_DIE_AFTER_CHECKPOINT";

/// Test-only: with `N`, the copy of a checkpoint's write-protected pages
/// starts `N` ms after the vCPUs resume, so that the guest's writes come
/// first and go through the copy on write. Without it the copier may reach
/// a page before the guest writes it, and a copy-on-write bug would then
/// go unseen in that run; the e2e fallback tests set it.
pub const COPY_ON_WRITE_HEAD_START_ENV: &str = "POSTCOPY_TEST_COPY_ON_WRITE_HEAD_START_MS";

/// How long a checkpoint waits for the vCPUs to park between checks of
/// whether the migration is over (a vCPU blocked on a missing page parks
/// when its page arrives).
const PARK_POLL: Duration = Duration::from_millis(50);

impl DestinationDriver<'_> {
    /// The lease lapsed: stop every vCPU now (they stay stopped until the
    /// lease is renewed). A vCPU blocked on a missing page runs no guest
    /// code and parks when its page arrives.
    pub(super) fn fence(&self) {
        let mut hold = lock(&self.vcpu_hold);
        hold.fenced = true;
        let running = lock(&self.running);
        let Some(vcpus) = running.as_ref() else { return };
        let report = vcpus.pause_within(Duration::from_millis(5));
        tracing::warn!(parked = report.all_parked(), us = report.latency.as_micros(), "the lease lapsed: vCPUs fenced");
        let mut log = lock(&self.fallback_log);
        log.summary.fences += 1;
        log.summary.fence_us_max = log.summary.fence_us_max.max(report.latency.as_secs_f64() * 1e6);
    }

    /// The guest may run (started, or the lease renewed): runs the vCPUs,
    /// starting them the first time, unless something holds them.
    pub(super) fn run_vcpus(&self) {
        let started = lock(&self.running).is_some();
        if !started {
            return self.resume();
        }
        let mut hold = lock(&self.vcpu_hold);
        hold.fenced = false;
        if hold.may_run() {
            if let Some(vcpus) = lock(&self.running).as_ref() {
                vcpus.resume();
                tracing::info!("the lease holds again: vCPUs run");
            }
        }
    }

    /// The source took the guest back: stop the vCPUs for good.
    pub(super) fn discard_guest(&self) {
        let mut hold = lock(&self.vcpu_hold);
        hold.discarded = true;
        if let Some(vcpus) = lock(&self.running).as_ref() {
            vcpus.pause_within(Duration::ZERO);
        }
        lock(&self.fallback_log).summary.discarded = true;
        tracing::warn!("the source took the guest back: this copy is dropped and never runs again");
    }

    /// The migration is over: no more checkpoints, so no more dirty log.
    pub(super) fn stop_checkpointing(&self) {
        if let Some(m) = self.machine.get().filter(|m| m.vm.dirty_logging()) {
            if let Err(e) = m.vm.set_dirty_logging(false) {
                tracing::warn!(e = error_chain(&e), "cannot turn off dirty logging");
            }
        }
    }

    /// Takes checkpoint `seq` in its own thread and hands it to the core.
    pub(super) fn take_checkpoint<'s>(&'s self, s: &'s Scope<'s, '_>, seq: u64) {
        let die_after = std::env::var(DIE_AFTER_CHECKPOINT_ENV).ok().and_then(|v| v.parse::<u64>().ok());
        if die_after.is_some_and(|n| seq > n) {
            tracing::warn!(seq, "{DIE_AFTER_CHECKPOINT_ENV}: the destination dies now");
            std::process::abort();
        }
        self.checkpoint_buffers.free_retired();
        let taken = self.checkpoint_of_one_instant(seq);
        match taken {
            Some((device_state, pages)) => self.event(s, |l, now| {
                if let Err(e) = l.core.handle_checkpoint(now, seq, device_state, pages) {
                    tracing::error!(%e, seq, "checkpoint");
                }
            }),
            // Over, fenced or discarded: the core may ask again later.
            None => self.event(s, |l, now| l.core.handle_checkpoint_abandoned(now, seq)),
        }
    }

    /// Stops the vCPUs, takes the dirty pages and the device state of this
    /// instant, and runs them again (unless fenced or discarded
    /// meanwhile). The pages are copied during the stop, or (write-protect)
    /// after it: each before the guest's first write to it, by the fault
    /// thread, the rest here.
    fn checkpoint_of_one_instant(&self, seq: u64) -> Option<(Bytes, Vec<(PageNumber, PageData)>)> {
        let m = self.machine.get()?;
        {
            let mut hold = lock(&self.vcpu_hold);
            if hold.discarded {
                return None;
            }
            hold.checkpointing = true;
        }
        let ahead = m.write_protect.then(|| self.protect_ahead(m, seq));
        // The guest is stopped until the resume below: preempted by the
        // push's threads, a stop of 0.7 ms lasted 1.3-6 ms.
        set_policy(self.opts.tuning.rt_switchover, "dst-checkpoint");
        let t0 = now().0;
        let stopped = self.stop_and_take(m, seq);
        if stopped.is_none() {
            self.let_go_ahead(m);
        }
        {
            let mut hold = lock(&self.vcpu_hold);
            hold.checkpointing = false;
            if hold.may_run() {
                if let Some(vcpus) = lock(&self.running).as_ref() {
                    vcpus.resume();
                }
            }
        }
        let stop_us = (now().0 - t0) as f64 / 1e3;
        set_policy(None, "dst-checkpoint");
        let Stopped { device_state, pages: numbers, copied, copy_ns } = stopped?;
        if copied.is_none() {
            let head_start = std::env::var(COPY_ON_WRITE_HEAD_START_ENV).ok().and_then(|v| v.parse().ok());
            if let Some(ms) = head_start {
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        let t_copy = now().0;
        let (buf, on_write) = match copied {
            Some(buf) => (buf, 0),
            None => self.copy_the_rest(m)?,
        };
        let copy_ns = copy_ns + (now().0 - t_copy);
        let page_bytes = (m.map.unit_pages() * PAGE_SIZE) as usize;
        // The buffer may be longer than this checkpoint (kept from a larger
        // one): only its first pages are this one's.
        let zero: Vec<bool> =
            buf.chunks_exact(page_bytes).take(numbers.len()).map(postcopy_core::wire::is_zero_page).collect();
        let buf = self.checkpoint_buffers.lend(buf);
        let pages: Vec<(PageNumber, PageData)> = numbers
            .iter()
            .zip(zero)
            .enumerate()
            .map(|(i, (&page, zero))| {
                let data = if zero {
                    PageData::Zero
                } else {
                    PageData::Bytes(buf.slice(i * page_bytes..(i + 1) * page_bytes))
                };
                (page, data)
            })
            .collect();
        let bytes: u64 = pages.iter().map(|(_, d)| if let PageData::Bytes(b) = d { b.len() as u64 } else { 0 }).sum();
        let mut log = lock(&self.fallback_log);
        let FallbackLog { summary, stops_us, .. } = &mut *log;
        summary.add_checkpoint(stop_us, copy_ns as f64 / 1e3, pages.len() as u64, bytes, stops_us);
        summary.copied_on_write += on_write;
        tracing::debug!(seq, pages = pages.len(), bytes, stop_us, on_write, ?ahead, "checkpoint taken");
        Some((device_state, pages))
    }

    /// With the vCPUs parked: the dirty pages (copied, or write-protected
    /// and handed to the fault thread) and the device state.
    fn stop_and_take(&self, m: &Machine, seq: u64) -> Option<Stopped> {
        let t_pause = now().0;
        let parked = {
            let running = lock(&self.running);
            let vcpus = running.as_ref()?;
            vcpus.pause_within(Duration::ZERO);
            vcpus.park_watch()
        };
        // With `running` released: a vCPU blocked on a page that does not
        // come (a partition) may never park, and the fence must not wait
        // for this checkpoint to stop the guest.
        while !parked.wait(PARK_POLL) {
            if self.shell.is_stopping() || self.finished_flag.load(Ordering::SeqCst) {
                return None;
            }
            let hold = lock(&self.vcpu_hold);
            if hold.fenced || hold.discarded {
                tracing::info!(seq, fenced = hold.fenced, "checkpoint abandoned: the guest is held stopped");
                return None;
            }
        }
        let running = lock(&self.running);
        let vcpus = running.as_ref()?;
        let t_log = now().0;
        let dirty = match m.vm.take_dirty_log() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(e = error_chain(&e), seq, "cannot read the dirty log for a checkpoint");
                return None;
            }
        };
        let mut pages = dirty_pages(m, &dirty);
        let carried = std::mem::take(&mut lock(&self.fallback_log).carried);
        if !carried.is_empty() {
            pages.extend(carried);
            pages.sort_unstable();
            pages.dedup();
        }
        let page_bytes = (m.map.unit_pages() * PAGE_SIZE) as usize;
        let t_copy = now().0;
        let copied = if m.write_protect {
            // The pages protected ahead join this checkpoint; those a write
            // let go are protected again with the pages dirtied since. The
            // copy-on-write state is in place before any protection, so a
            // late fault on one of them copies it (the guest is stopped).
            let protect = {
                let mut cow = lock(&self.copy_on_write);
                let (ahead, released) = match cow.take() {
                    Some(c) if c.ahead => (c.pages, c.released),
                    _ => (Vec::new(), Vec::new()),
                };
                let let_go: Vec<PageNumber> =
                    ahead.iter().zip(&released).filter(|(_, &r)| r).map(|(&p, _)| p).collect();
                let protect = merge(&pages, &let_go);
                pages = merge(&pages, &ahead);
                let buf =
                    self.checkpoint_buffers.take(pages.len() * page_bytes, m.map.total_pages() as usize * page_bytes);
                *cow = Some(CopyOnWrite::at_the_stop(pages.clone(), page_bytes, buf));
                protect
            };
            for (first, count) in runs(m, &protect) {
                if let Err(e) = m.uffd.write_protect(first, count) {
                    tracing::error!(e = error_chain(&e), seq, "cannot write-protect a checkpoint's pages");
                    self.drop_copy_on_write(m, pages);
                    return None;
                }
            }
            None
        } else {
            let mut buf =
                self.checkpoint_buffers.take(pages.len() * page_bytes, m.map.total_pages() as usize * page_bytes);
            for (page, out) in pages.iter().zip(buf.chunks_exact_mut(page_bytes)) {
                let read = m.map.page_ref(*page).map(|r| m.ram.read_pages(r, out));
                if !matches!(read, Some(Ok(()))) {
                    tracing::error!(page = page.0, ?read, seq, "cannot read a dirty page for a checkpoint");
                    self.carry(pages.clone());
                    self.checkpoint_buffers.give_back(buf);
                    return None;
                }
            }
            Some(buf)
        };
        let copy_ns = now().0 - t_copy;
        let t_capture = now().0;
        let device_state = match DeviceState::capture(&m.vm, vcpus).and_then(|st| st.to_bytes()) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                tracing::error!(e = error_chain(&e), seq, "cannot capture the device state for a checkpoint");
                if m.write_protect {
                    self.drop_copy_on_write(m, pages);
                } else {
                    self.carry(pages);
                }
                return None;
            }
        };
        let us = |a: u64, b: u64| b.saturating_sub(a) / 1000;
        tracing::debug!(
            seq,
            pages = pages.len(),
            pause_us = us(t_pause, t_log),
            dirty_log_us = us(t_log, t_copy),
            protect_or_copy_us = us(t_copy, t_capture),
            capture_us = us(t_capture, now().0),
            "checkpoint stop"
        );
        Some(Stopped { device_state, pages, copied, copy_ns })
    }

    /// After a write-protected stop: copies the pages the guest has not
    /// written yet (a chunk at a time, then unprotects them), and returns
    /// every page's copy and how many the fault thread copied on write.
    fn copy_the_rest(&self, m: &Machine) -> Option<(Vec<u8>, u64)> {
        let pages = lock(&self.copy_on_write).as_ref()?.pages.clone();
        for chunk in (0..pages.len()).collect::<Vec<_>>().chunks(COPY_CHUNK) {
            {
                let mut cow = lock(&self.copy_on_write);
                let cow = cow.as_mut()?;
                for &i in chunk {
                    cow.copy(&m.map, &m.ram, i);
                }
            }
            let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
            for (start, count) in runs(m, &pages[first..=last]) {
                if let Err(e) = m.uffd.unprotect(start, count) {
                    tracing::error!(e = error_chain(&e), "cannot unprotect a checkpoint's pages");
                }
            }
        }
        let cow = lock(&self.copy_on_write).take()?;
        if cow.copied.iter().any(|&c| !c) {
            tracing::error!("a checkpoint page was left uncopied");
            self.carry(cow.pages);
            return None;
        }
        Some((cow.buf, cow.on_write))
    }

    /// A write-protect fault: the guest writes a page of the checkpoint
    /// being copied. Copies it first (unless done), then lets the write go.
    pub(super) fn copy_before_write(&self, m: &Machine, fault: PageRef) {
        let Some(page) = m.map.number(fault) else { return };
        // Held until the page is unprotected: a stop that protects it again
        // does so after, never before.
        let mut cow = lock(&self.copy_on_write);
        if let Some(cow) = cow.as_mut() {
            if let Ok(i) = cow.pages.binary_search(&page) {
                if cow.ahead {
                    cow.released[i] = true;
                } else if cow.copy(&m.map, &m.ram, i) {
                    cow.on_write += 1;
                }
            }
        }
        // A page of no checkpoint (protected by one whose copy failed) is
        // let go as well: nothing would ever copy it.
        if let Some(first) = m.map.page_ref(page) {
            if let Err(e) = m.uffd.unprotect(first, m.map.unit_pages()) {
                tracing::error!(
                    e = error_chain(&e),
                    page = page.0,
                    "cannot unprotect a page written during a checkpoint"
                );
            }
        }
    }

    /// Write-protect, before the stop, the guest still running: reads and
    /// clears the dirty log and protects those pages, so that the stop
    /// protects only the pages dirtied since (the ioctl's cost is linear in
    /// the pages it protects). Returns how many pages it protected.
    fn protect_ahead(&self, m: &Machine, seq: u64) -> usize {
        let mut carried = std::mem::take(&mut lock(&self.fallback_log).carried);
        carried.sort_unstable();
        carried.dedup();
        // In place before any protection: a write to one of them lets it go.
        *lock(&self.copy_on_write) = Some(CopyOnWrite::ahead(Vec::new()));
        let mut protected = 0;
        for round in 0..AHEAD_ROUNDS {
            let dirty = match m.vm.take_dirty_log() {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(e = error_chain(&e), seq, "cannot read the dirty log ahead of a checkpoint");
                    break;
                }
            };
            let mut pages = dirty_pages(m, &dirty);
            if round == 0 {
                pages = merge(&pages, &carried);
            }
            {
                let mut cow = lock(&self.copy_on_write);
                let Some(cow) = cow.as_mut().filter(|c| c.ahead) else { return protected };
                // Pages a write let go and dirtied again are protected again.
                let let_go: Vec<PageNumber> =
                    cow.pages.iter().zip(&cow.released).filter(|(_, &r)| r).map(|(&p, _)| p).collect();
                let still_let_go: Vec<PageNumber> =
                    let_go.into_iter().filter(|p| pages.binary_search(p).is_err()).collect();
                cow.pages = merge(&cow.pages, &pages);
                cow.released = cow.pages.iter().map(|p| still_let_go.binary_search(p).is_ok()).collect();
            }
            for (first, count) in runs(m, &pages) {
                if let Err(e) = m.uffd.write_protect(first, count) {
                    tracing::error!(
                        e = error_chain(&e),
                        seq,
                        "cannot write-protect a checkpoint's pages ahead of its stop"
                    );
                    self.let_go_ahead(m);
                    return 0;
                }
            }
            protected += pages.len();
        }
        protected
    }

    /// The pages protected ahead of a stop that did not happen: unprotected,
    /// and carried into the next checkpoint (KVM cleared their dirty bits).
    fn let_go_ahead(&self, m: &Machine) {
        let mut cow = lock(&self.copy_on_write);
        if cow.as_ref().is_some_and(|c| c.ahead) {
            if let Some(c) = cow.take() {
                self.unprotect_all(m, &c.pages);
                self.carry(c.pages);
            }
        }
    }

    /// A checkpoint failed after its stop protected `pages`: no copy, the
    /// pages unprotected and carried into the next one.
    fn drop_copy_on_write(&self, m: &Machine, pages: Vec<PageNumber>) {
        let mut cow = lock(&self.copy_on_write);
        cow.take();
        self.unprotect_all(m, &pages);
        self.carry(pages);
    }

    /// A checkpoint failed after reading the dirty log: its pages go into
    /// the next one (KVM cleared their dirty bits).
    fn carry(&self, pages: Vec<PageNumber>) {
        lock(&self.fallback_log).carried.extend(pages);
    }

    /// Undoes a write protection whose checkpoint is abandoned.
    fn unprotect_all(&self, m: &Machine, pages: &[PageNumber]) {
        for (first, count) in runs(m, pages) {
            let _ = m.uffd.unprotect(first, count);
        }
    }
}

/// Rounds of write protection ahead of a stop: the second protects the
/// pages dirtied during the first (milliseconds for 100k pages), so that
/// the stop protects only those of the last round's short time.
const AHEAD_ROUNDS: usize = 2;

/// Pages the write-protected copy handles under one hold of its lock.
const COPY_CHUNK: usize = 64;

/// What a checkpoint took while the vCPUs were stopped.
struct Stopped {
    device_state: Bytes,
    /// The dirty pages, in order.
    pages: Vec<PageNumber>,
    /// Their contents, when copied during the stop.
    copied: Option<Vec<u8>>,
    copy_ns: u64,
}

/// The pages a dirty log marks, in order (a huge page if any of its 4 KiB
/// pages is dirty).
fn dirty_pages(m: &Machine, dirty: &crate::memory::DirtyBitmap) -> Vec<PageNumber> {
    let mut pages = Vec::new();
    for block in 0..dirty.num_blocks() {
        let Some(start) = m.map.block_start(block) else { continue };
        for (w, &word) in m.map.fold_dirty(dirty.block_words(block)).iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                pages.push(PageNumber(start + w as u64 * 64 + u64::from(bits.trailing_zeros())));
                bits &= bits - 1;
            }
        }
    }
    pages
}

/// The union of two ordered lists of distinct pages, in order: linear,
/// since it runs while the guest is stopped.
fn merge(a: &[PageNumber], b: &[PageNumber]) -> Vec<PageNumber> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (page, next_i, next_j) = match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => (a[i], i + 1, j),
            std::cmp::Ordering::Greater => (b[j], i, j + 1),
            std::cmp::Ordering::Equal => (a[i], i + 1, j + 1),
        };
        out.push(page);
        (i, j) = (next_i, next_j);
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

/// `pages` (in order) as runs of adjacent pages within one block: the
/// first page and the run's length in 4 KiB pages.
fn runs(m: &Machine, pages: &[PageNumber]) -> Vec<(PageRef, u64)> {
    let unit = m.map.unit_pages();
    let mut out: Vec<(PageRef, u64)> = Vec::new();
    for r in pages.iter().filter_map(|&p| m.map.page_ref(p)) {
        match out.last_mut() {
            Some((first, count)) if first.block == r.block && first.page + *count == r.page => *count += unit,
            _ => out.push((r, unit)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(numbers: &[u64]) -> Vec<PageNumber> {
        numbers.iter().map(|&n| PageNumber(n)).collect()
    }

    #[test]
    fn merge_is_the_ordered_union() {
        assert_eq!(merge(&pages(&[1, 3, 5, 9]), &pages(&[2, 3, 10, 11])), pages(&[1, 2, 3, 5, 9, 10, 11]));
        assert_eq!(merge(&pages(&[]), &pages(&[4])), pages(&[4]));
        assert_eq!(merge(&pages(&[7, 8]), &pages(&[])), pages(&[7, 8]));
        assert_eq!(merge(&pages(&[1, 2]), &pages(&[1, 2])), pages(&[1, 2]));
    }
}
