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

use super::state::{DestinationDriver, Machine};
use crate::devices::lock;
use crate::driver::clock::now;
use crate::driver::report::FallbackSummary;
use crate::driver::shell::SideDriver;
use crate::error::error_chain;
use crate::layout::PAGE_SIZE;
use crate::runner::VcpuSet;
use crate::state::DeviceState;

/// How long a checkpoint waits for the vCPUs to park between checks of
/// whether the migration is over (a vCPU blocked on a missing page parks
/// when its page arrives).
const PARK_POLL: Duration = Duration::from_millis(50);

/// Who holds the vCPUs stopped. They run only when no one does.
#[derive(Debug, Default)]
pub(crate) struct VcpuHold {
    /// The lease lapsed (until a renewal or the release).
    pub(crate) fenced: bool,
    /// A checkpoint is being taken.
    pub(crate) checkpointing: bool,
    /// The source took the guest back: this copy never runs again.
    pub(crate) discarded: bool,
}

impl VcpuHold {
    fn may_run(&self) -> bool {
        !self.fenced && !self.checkpointing && !self.discarded
    }
}

/// The summary and the stop times it is computed from.
#[derive(Debug, Default)]
pub(crate) struct FallbackLog {
    pub(crate) summary: FallbackSummary,
    stops_us: Vec<f64>,
}

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
        let taken = self.checkpoint_of_one_instant(seq);
        match taken {
            Some((device_state, pages)) => self.event(s, |l, now| {
                if let Err(e) = l.core.handle_checkpoint(now, seq, device_state, pages) {
                    tracing::error!(%e, seq, "checkpoint");
                }
            }),
            None => tracing::warn!(seq, "checkpoint not taken (the migration is over)"),
        }
    }

    /// Stops the vCPUs, copies the dirty pages and the device state, and
    /// runs them again (unless fenced or discarded meanwhile).
    fn checkpoint_of_one_instant(&self, seq: u64) -> Option<(Bytes, Vec<(PageNumber, PageData)>)> {
        let m = self.machine.get()?;
        {
            let mut hold = lock(&self.vcpu_hold);
            if hold.discarded {
                return None;
            }
            hold.checkpointing = true;
        }
        let t0 = now().0;
        let taken = {
            let running = lock(&self.running);
            running.as_ref().and_then(|vcpus| self.copy_stopped(m, vcpus, seq))
        };
        let t_copied = now().0;
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
        let (device_state, pages, copy_ns) = taken?;
        let bytes: u64 = pages.iter().map(|(_, d)| if let PageData::Bytes(b) = d { b.len() as u64 } else { 0 }).sum();
        let mut log = lock(&self.fallback_log);
        let FallbackLog { summary, stops_us } = &mut *log;
        summary.add_checkpoint(stop_us, copy_ns as f64 / 1e3, pages.len() as u64, bytes, stops_us);
        tracing::debug!(
            seq,
            pages = pages.len(),
            bytes,
            stop_us,
            until_copied_us = (t_copied - t0) / 1000,
            "checkpoint taken"
        );
        Some((device_state, pages))
    }

    /// With the vCPUs parked: the dirty pages and the device state.
    #[allow(clippy::type_complexity)]
    fn copy_stopped(
        &self,
        m: &Machine,
        vcpus: &VcpuSet,
        seq: u64,
    ) -> Option<(Bytes, Vec<(PageNumber, PageData)>, u64)> {
        vcpus.pause_within(Duration::ZERO);
        while !vcpus.wait_paused(PARK_POLL) {
            if self.shell.is_stopping() || self.finished_flag.load(Ordering::SeqCst) {
                return None;
            }
        }
        let dirty = match m.vm.take_dirty_log() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(e = error_chain(&e), seq, "cannot read the dirty log for a checkpoint");
                return None;
            }
        };
        let t_copy = now().0;
        let mut numbers = Vec::new();
        for block in 0..dirty.num_blocks() {
            let Some(start) = m.map.block_start(block) else { continue };
            for (w, &word) in m.map.fold_dirty(dirty.block_words(block)).iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    numbers.push(PageNumber(start + w as u64 * 64 + u64::from(bits.trailing_zeros())));
                    bits &= bits - 1;
                }
            }
        }
        let page_bytes = (m.map.unit_pages() * PAGE_SIZE) as usize;
        // One allocation for the whole checkpoint; each page a slice of it.
        let mut buf = vec![0u8; numbers.len() * page_bytes];
        let mut zero = vec![false; numbers.len()];
        for ((page, out), zero) in numbers.iter().zip(buf.chunks_exact_mut(page_bytes)).zip(&mut zero) {
            let read = m.map.page_ref(*page).map(|r| m.ram.read_pages(r, out));
            if !matches!(read, Some(Ok(()))) {
                tracing::error!(page = page.0, ?read, seq, "cannot read a dirty page for a checkpoint");
                return None;
            }
            *zero = out.iter().all(|&b| b == 0);
        }
        let copy_ns = now().0 - t_copy;
        let device_state = match DeviceState::capture(&m.vm, vcpus).and_then(|st| st.to_bytes()) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                tracing::error!(e = error_chain(&e), seq, "cannot capture the device state for a checkpoint");
                return None;
            }
        };
        let buf = Bytes::from(buf);
        let pages = numbers
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
        Some((device_state, pages, copy_ns))
    }
}
