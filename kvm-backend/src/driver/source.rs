//! The source side's driver. See the module docs of [`super`] for threads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Scope;
use std::time::Duration;

use bytes::Bytes;
use postcopy_core::{
    Channel, Config, DeferredPage, EventError, Finished, GuestMemory, Notice, PageNumber, Source, SourceAction,
    SourceState, SourceStats, Timestamp,
};

use super::checkpoint_memory::CheckpointMemory;
use super::clock::now;
use super::digest::{PageDigests, PartHashes};
use super::fallback_image::{FallbackImage, ImageWrite, PageStore};
use super::machine::{core_layout, MachineDescription, PageMap};
use super::net::{self, lock_spin, Connection};
use super::placement::{latency_thread, pin_self, set_policy, Boost, Tuning};
use super::report::{CheckpointCounters, FallbackRecord, SourceReport, Takeover};
use super::security::{self, ChannelSecurity};
use super::shell::{
    spawn, warm_fault_path_buffer, ConnectionOp, LockedCore, ProtocolCore, Shell, SideDriver, LOCK_SPIN,
};
use super::sync::Doorbell;
use super::watch::{UserRequest, Watch};
use crate::devices::lock;
use crate::error::error_chain;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestRam;
use crate::runner::VcpuSet;
use crate::state::DeviceState;
use crate::vm::Vm;

/// Bytes the bulk writer gathers under one hold of the core lock.
const BULK_STEP_BYTES: usize = 32 * 1024;
/// Bytes the bulk writer writes per system call.
const BULK_WRITE_BYTES: usize = 256 * 1024;
/// Bytes read per receive on the return path.
const READ_BYTES: usize = 64 * 1024;
/// Room in the fault path's write buffer beyond one huge page: the
/// frame's header and the small frames written with it.
const FAULT_PATH_BUFFER_MARGIN: usize = 64 * 1024;

/// How to run the source.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// The destination.
    pub connect: SocketAddr,
    /// The core's settings.
    pub config: Config,
    /// Thread placement and polling.
    pub tuning: Tuning,
    /// Plain TCP or mutual TLS (and a migration secret).
    pub security: ChannelSecurity,
    /// Fallback: where the pages a checkpoint overwrites are kept until it
    /// is committed (reserved ahead, kept).
    pub checkpoint_memory: CheckpointMemory,
    /// Fallback: checkpoints committed and dropped, counted as it happens
    /// (a VMM keeps a clone to read them while the migration runs).
    pub checkpoint_counters: Arc<CheckpointCounters>,
}

/// How the source's migration ended.
#[derive(Debug)]
pub struct SourceOutcome {
    /// The core's verdict (statistics included).
    pub finished: Finished<SourceStats>,
    /// Monotonic ns: start, vCPU stop (0: never), end.
    pub start_ns: u64,
    /// When the vCPUs were stopped.
    pub stop_ns: u64,
    /// When it ended.
    pub end_ns: u64,
    /// Pause + capture time, us.
    pub stop_capture_us: f64,
    /// Pause time alone, us.
    pub pause_us: f64,
    /// Digests of the pages as sent.
    pub digests: PageDigests,
    /// Notices, as text.
    pub notices: Vec<String>,
    /// Why the last connection attempt of each channel failed, if one did
    /// and none succeeded after it (a TLS refusal says which side refused
    /// what); distinct reasons joined.
    pub last_connect_error: Option<String>,
    /// Each connection's handshake (TCP, TLS, preamble, proof): when it
    /// started and ended, monotonic ns.
    pub handshakes: Vec<(u64, u64)>,
    /// Fallback: the checkpoints committed and the takeover, if any.
    pub fallback: FallbackRecord,
}

/// What the caller of [`run_source`] knows of the guest, for the report.
#[derive(Clone, Debug)]
pub struct ReportedGuest {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// "postcopy" or "hybrid".
    pub mode: String,
    /// Guest pages written per second before the migration.
    pub progress_before_pages_per_s: Option<f64>,
    /// Pattern passes completed before the migration (all vCPUs).
    pub passes_before: u64,
    /// The migration ran with fallback (its record is reported).
    pub fallback: bool,
}

impl SourceOutcome {
    /// The report of this migration of `guest` (what only the caller
    /// learns after it, such as the guest's progress after a failure, is
    /// left empty).
    pub fn report(&self, guest: ReportedGuest) -> SourceReport {
        SourceReport {
            ok: self.finished.result.is_ok(),
            error: self.finished.result.as_ref().err().map(|e| match &self.last_connect_error {
                // Why connecting failed (a TLS refusal says who refused what).
                Some(why) => format!("{}: {why}", error_chain(e)),
                None => error_chain(e),
            }),
            guest_on: format!("{:?}", self.finished.guest_on).to_lowercase(),
            mem_bytes: guest.mem_bytes,
            vcpus: guest.vcpus,
            mode: guest.mode,
            stats: self.finished.stats.clone(),
            start_ns: self.start_ns,
            stop_ns: self.stop_ns,
            end_ns: self.end_ns,
            stop_capture_us: self.stop_capture_us,
            pause_us: self.pause_us,
            digest: self.digests.fold(),
            progress_before_pages_per_s: guest.progress_before_pages_per_s,
            passes_before: guest.passes_before,
            progress_after_failure_pages_per_s: None,
            notices: self.notices.clone(),
            handshakes_ns: self.handshakes.clone(),
            fallback: guest.fallback.then(|| self.fallback.clone()),
            pattern_after_takeover: None,
        }
    }
}

/// Why the source could not run a migration (the core's own verdict is in
/// [`SourceOutcome::finished`]).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The guest's RAM cannot be described to the core.
    #[error("the guest's RAM layout does not fit the protocol")]
    Layout(#[source] postcopy_core::LayoutError),
    /// The core refused the machine description.
    #[error("the machine description cannot be sent")]
    MachineDescription(#[source] postcopy_core::EventError),
    /// Dirty logging (for precopy rounds) could not be turned on.
    #[error("cannot turn on dirty logging")]
    DirtyLogging(#[source] crate::error::Error),
    /// The core never finished (a driver thread died).
    #[error("the source ended without a verdict")]
    NoVerdict,
}

/// The guest's RAM as the core reads it: every page read is hashed, so the
/// last copy sent of each page (its content at the stop) is on record.
struct SourceRam<'a> {
    ram: &'a GuestRam,
    map: PageMap,
    digests: PageDigests,
    /// Pages being sent in parts: their parts' hashes so far.
    parts: PartHashes,
}

impl GuestMemory for SourceRam<'_> {
    fn read_page(&self, page: PageNumber, out: &mut [u8]) {
        // A page of the migration is a huge page on huge-page RAM.
        let ok = self.map.page_ref(page).is_some_and(|r| self.ram.read_pages(r, out).is_ok());
        if !ok {
            // The core only schedules pages of the layout it was given.
            tracing::error!(page = page.0, "cannot read a page the core asked for");
            out.fill(0);
        }
        self.digests.record(page.0, out);
    }

    /// A part of a huge page sent in parts (postcopy only: the guest is
    /// stopped, so the parts are of one content). Only the part is read,
    /// and hashed for the page's digest ([`crate::driver::digest::parts_hash`]):
    /// a 1 GiB page is never read whole.
    fn read_page_part(&self, page: PageNumber, page_size: usize, offset: usize, out: &mut [u8]) {
        let small = PAGE_SIZE as usize;
        let ok = match self.map.page_ref(page) {
            Some(r) if offset % small == 0 && !out.is_empty() => {
                let first = crate::layout::PageRef { page: r.page + (offset / small) as u64, ..r };
                self.ram.read_pages(first, out).is_ok()
            }
            _ => false,
        };
        if !ok {
            tracing::error!(page = page.0, offset, "cannot read a part of a page the core asked for");
            out.fill(0);
        }
        let len = out.len().max(1);
        if self.parts.part(page.0, offset / len, page_size.div_ceil(len), out) {
            if let Some(hash) = self.parts.take(page.0) {
                self.digests.record_hash(page.0, hash);
            }
        }
    }

    /// Asked only for a page about to be sent: a zero page goes without
    /// payload and is never read, so its digest is recorded here.
    fn is_zero_page(&self, page: PageNumber, _page_size: usize) -> bool {
        // A page the core cannot place is sent (as zeros) by read_page, which reports it.
        let unit = self.map.unit_pages();
        let zero = self.map.page_ref(page).is_some_and(|r| self.ram.pages_are_zero(r, unit).unwrap_or(false));
        if zero {
            self.digests.record_zero(page.0);
        }
        zero
    }
}

impl PageStore for SourceRam<'_> {
    fn read(&self, page: PageNumber, out: &mut [u8]) -> Result<(), String> {
        let at = self.map.page_ref(page).ok_or_else(|| format!("page {} is outside the guest", page.0))?;
        self.ram.read_pages(at, out).map_err(|e| error_chain(&e))
    }

    fn write(&self, page: PageNumber, data: &[u8]) -> Result<(), String> {
        let at = self.map.page_ref(page).ok_or_else(|| format!("page {} is outside the guest", page.0))?;
        self.ram.write_pages(at, data).map_err(|e| error_chain(&e))
    }
}

/// Asks the core for frames on `channel`. While the guest may still run here
/// (precopy), pages are read under the core lock, so that the digest of a
/// page's last copy is recorded last; once it is stopped, contents no longer
/// change and the reads wait until the lock is released (`deferred`): the
/// fault path's threads then never wait for a bulk page being copied and hashed.
fn poll_frames(
    l: &mut LockedCore<Source>,
    channel: Channel,
    buf: &mut Vec<u8>,
    max_bytes: usize,
    guest: &SourceRam<'_>,
    deferred: &mut Vec<DeferredPage>,
) {
    if l.core.state() == SourceState::Precopy {
        let _ = l.core.poll_transmit(now(), channel, buf, max_bytes, guest);
    } else {
        let _ = l.core.poll_transmit_deferred(now(), channel, buf, max_bytes, guest, deferred);
    }
}

/// What the source's driver does for the core, resolved while the core
/// lock is held.
enum SourceOp {
    Connect(Channel),
    Close(ConnectionOp),
    StopVcpus,
    ResumeVcpus,
    SyncDirtyLog,
    Notice(Notice),
    Finished(Box<Finished<SourceStats>>),
    /// Fallback: carry out the writes queued for the image.
    WriteImage,
    /// Fallback: the guest restarts here from the last committed checkpoint.
    TakeOver {
        checkpoint: u64,
        device_state: Bytes,
    },
}

/// The source's driver: the shell, the guest it migrates, the bulk writer's
/// wake-ups and the switchover's timings.
struct SourceDriver<'a> {
    shell: Shell<Source>,
    /// The bulk writer of each push stream (main first) waits on its own.
    bulk_bells: Vec<Doorbell>,
    done_bell: Doorbell,
    finished: Mutex<Option<Finished<SourceStats>>>,
    guest: SourceRam<'a>,
    vm: &'a Vm,
    vcpus: &'a VcpuSet,
    /// The destination; a user's resume may point it elsewhere.
    addr: Mutex<SocketAddr>,
    connect_timeout: Duration,
    write_timeout: Option<Duration>,
    security: ChannelSecurity,
    /// Per channel, why its last connection attempt failed (None: it
    /// succeeded, or none failed).
    connect_errors: Mutex<[Option<String>; Channel::COUNT]>,
    handshakes: Mutex<Vec<(u64, u64)>>,
    stop_ns: AtomicU64,
    stop_capture_ns: AtomicU64,
    pause_ns: AtomicU64,
    /// Fallback: the image the guest restarts from (its memory here) and
    /// the checkpoint writes queued for it.
    image: FallbackImage,
    /// Where the image's undo log takes its memory from and gives it back
    /// to at the end.
    checkpoint_memory: CheckpointMemory,
    takeover: Mutex<Option<Takeover>>,
    /// When the last frame from the destination arrived, monotonic ns.
    last_heard_ns: AtomicU64,
}

/// Runs a migration of the running guest (`vm`, its vCPUs in `vcpus`) to
/// the destination at `opts.connect`. Returns when the core finished: with
/// the guest on the destination, or (before the switchover) back on the
/// source, running.
pub fn run_source(
    vm: &Vm,
    vcpus: &VcpuSet,
    machine: &MachineDescription,
    session: u64,
    opts: &SourceOptions,
) -> Result<SourceOutcome, SourceError> {
    run_source_watched(vm, vcpus, machine, session, opts, None)
}

/// [`run_source`], with a VMM watching the core (states, samples) and
/// passing the user's requests (cancel, switch to postcopy).
pub fn run_source_watched(
    vm: &Vm,
    vcpus: &VcpuSet,
    machine: &MachineDescription,
    session: u64,
    opts: &SourceOptions,
    watch: Option<Arc<dyn Watch<Source>>>,
) -> Result<SourceOutcome, SourceError> {
    let ram = vm.ram();
    let layout = core_layout(ram.layout(), ram.unit_pages()).map_err(SourceError::Layout)?;
    let map = PageMap::new(ram.layout(), ram.unit_pages());
    let pages = map.total_pages();
    let mut core = Source::new(opts.config.clone(), layout, session);
    core.set_machine_description(Bytes::from(machine.to_bytes())).map_err(SourceError::MachineDescription)?;
    if opts.config.mode.precopy_rounds() > 0 {
        vm.set_dirty_logging(true).map_err(SourceError::DirtyLogging)?;
    }
    let driver = SourceDriver {
        shell: Shell::new(core, opts.tuning.clone(), watch),
        bulk_bells: (0..opts.config.push_stream_count()).map(|_| Doorbell::new()).collect(),
        done_bell: Doorbell::new(),
        finished: Mutex::new(None),
        guest: SourceRam {
            ram,
            map,
            digests: PageDigests::new(pages, (ram.unit_pages() * PAGE_SIZE) as usize),
            parts: PartHashes::default(),
        },
        vm,
        vcpus,
        addr: Mutex::new(opts.connect),
        connect_timeout: opts.config.handshake_timeout,
        write_timeout: opts.config.peer_timeout,
        security: opts.security.clone(),
        connect_errors: Mutex::new(Default::default()),
        handshakes: Mutex::new(Vec::new()),
        stop_ns: AtomicU64::new(0),
        stop_capture_ns: AtomicU64::new(0),
        pause_ns: AtomicU64::new(0),
        image: FallbackImage::new(
            opts.checkpoint_memory.take(0, 0),
            (ram.unit_pages() * PAGE_SIZE) as usize,
            opts.checkpoint_counters.clone(),
        ),
        checkpoint_memory: opts.checkpoint_memory.clone(),
        takeover: Mutex::new(None),
        last_heard_ns: AtomicU64::new(0),
    };
    let start_ns = now().0;
    tracing::info!(session, destination = %opts.connect, pages, "migration starts");
    std::thread::scope(|s| {
        let d = &driver;
        for stream in std::iter::once(Channel::Main).chain(Channel::push_streams(opts.config.push_stream_count())) {
            spawn(s, "src-bulk", move || d.bulk_loop(s, stream));
        }
        spawn(s, "src-timer", move || d.timer_loop(s));
        d.event(s, |l, now| {
            if let Err(e) = l.core.handle_start(now) {
                tracing::error!(%e, "start");
            }
        });
        while !d.shell.is_stopping() {
            d.done_bell.wait_timeout(Duration::from_millis(100));
        }
        // Unblock every reader and writer still attached to a connection.
        d.shell.shutdown_all();
        d.ring_bulk();
    });
    if opts.config.mode.precopy_rounds() > 0 {
        if let Err(e) = vm.set_dirty_logging(false) {
            tracing::warn!(e = error_chain(&e), "cannot turn off dirty logging");
        }
    }
    let finished = lock(&driver.finished).take().ok_or(SourceError::NoVerdict)?;
    let mut why: Vec<String> = lock(&driver.connect_errors).iter().flatten().cloned().collect();
    why.sort();
    why.dedup();
    let last_connect_error = (!why.is_empty()).then(|| why.join("; "));
    let handshakes = std::mem::take(&mut *lock(&driver.handshakes));
    // The core discards a checkpoint cut off before it ends; a part still
    // in the image would be one it never saw end: undone.
    let (mut fallback, undo_memory) = driver.image.finish(&driver.guest);
    fallback.takeover = lock(&driver.takeover).take();
    // Kept for the next migration of this process.
    driver.checkpoint_memory.give_back(undo_memory);
    tracing::info!(result = ?finished.result, "migration ended");
    Ok(SourceOutcome {
        finished,
        start_ns,
        stop_ns: driver.stop_ns.load(Ordering::SeqCst),
        end_ns: now().0,
        stop_capture_us: driver.stop_capture_ns.load(Ordering::SeqCst) as f64 / 1e3,
        pause_us: driver.pause_ns.load(Ordering::SeqCst) as f64 / 1e3,
        notices: driver.shell.notices(),
        last_connect_error,
        handshakes,
        fallback,
        digests: driver.guest.digests,
    })
}

impl SideDriver for SourceDriver<'_> {
    type Core = Source;
    type Op = SourceOp;
    const SIDE: &'static str = "source";
    const TIMER_THREAD: &'static str = "src-timer";
    const FAREWELL_THREAD: &'static str = "src-farewell";
    const FAULT_PATH_CHANNEL: Channel = Channel::Urgent;

    fn shell(&self) -> &Shell<Source> {
        &self.shell
    }

    fn to_op(&self, l: &mut LockedCore<Source>, action: SourceAction) -> Option<SourceOp> {
        Some(match action {
            SourceAction::Connect(channel) => SourceOp::Connect(channel),
            SourceAction::Close(channel) => SourceOp::Close(l.close(channel)?),
            SourceAction::Farewell { channel, bytes } => SourceOp::Close(l.farewell(channel, bytes)?),
            SourceAction::StopVcpus => SourceOp::StopVcpus,
            SourceAction::ResumeVcpus => SourceOp::ResumeVcpus,
            SourceAction::SyncDirtyLog => SourceOp::SyncDirtyLog,
            SourceAction::Notice(notice) => SourceOp::Notice(notice),
            SourceAction::Finished(finished) => SourceOp::Finished(finished),
            // Queued here, carried out once the core's lock is released, in
            // the core's order (fallback_image.rs).
            SourceAction::StageCheckpointPage { seq, page, data } => {
                return self.image.queue(ImageWrite::Page { seq, page, data }).then_some(SourceOp::WriteImage);
            }
            SourceAction::CommitCheckpoint { seq } => {
                return self.image.queue(ImageWrite::Commit { seq }).then_some(SourceOp::WriteImage);
            }
            SourceAction::DiscardCheckpoint { seq } => {
                return self.image.queue(ImageWrite::Discard { seq }).then_some(SourceOp::WriteImage);
            }
            SourceAction::TakeOver { checkpoint, device_state } => SourceOp::TakeOver { checkpoint, device_state },
        })
    }

    fn execute<'s>(&'s self, s: &'s Scope<'s, '_>, ops: Vec<SourceOp>) {
        for op in ops {
            match op {
                SourceOp::Connect(channel) => spawn(s, "src-connect", move || self.connect(s, channel)),
                SourceOp::Close(op) => self.close_connection(s, op),
                SourceOp::StopVcpus => self.stop_vcpus(s),
                SourceOp::ResumeVcpus => {
                    tracing::info!("the guest resumes on the source");
                    self.vcpus.resume();
                }
                SourceOp::SyncDirtyLog => self.sync_dirty_log(s),
                SourceOp::Notice(notice) => self.notice(&notice),
                SourceOp::WriteImage => self.image.carry_out(&self.guest),
                SourceOp::TakeOver { checkpoint, device_state } => self.take_over(checkpoint, &device_state),
                SourceOp::Finished(finished) => {
                    *lock(&self.finished) = Some(*finished);
                    self.shell.stopping.store(true, Ordering::SeqCst);
                    self.done_bell.ring();
                    self.ring_bulk();
                }
            }
        }
        self.flush_fault_path(s);
        self.ring_bulk();
    }

    fn poll_fault_path(
        &self,
        l: &mut LockedCore<Source>,
        buf: &mut Vec<u8>,
        deferred: &mut Vec<DeferredPage>,
    ) -> Option<Arc<Connection>> {
        let conn = l.connection(Channel::Urgent).cloned();
        if conn.is_some() {
            // Up to a page per write: the parts of a page that a request
            // took from the push go out together, as a whole page would.
            let max = BULK_STEP_BYTES.max(self.shell.tuning.frame_page_bytes() as usize);
            poll_frames(l, Channel::Urgent, buf, max, &self.guest, deferred);
        }
        conn
    }

    fn fill_deferred(&self, deferred: &[DeferredPage], buf: &mut [u8]) {
        DeferredPage::fill_all(deferred, buf, &self.guest);
    }

    /// A resume connects to the address the user gave (kept only if the
    /// core takes the resume): its connector threads start after this event.
    fn user_request(&self, l: &mut LockedCore<Source>, now: Timestamp, request: UserRequest) -> Result<(), EventError> {
        let UserRequest::Resume(addr) = request else { return l.core.handle_user_request(now, request) };
        let before = std::mem::replace(&mut *lock(&self.addr), addr);
        let result = l.core.handle_user_request(now, request);
        if result.is_err() {
            *lock(&self.addr) = before;
        } else if before != addr {
            tracing::info!(%before, %addr, "the migration resumes to another address");
        }
        result
    }
}

impl SourceDriver<'_> {
    /// The destination is lost: the guest's memory here is the fallback
    /// image (committed checkpoints applied); load the checkpoint's device
    /// state into the parked vCPUs and run them.
    fn take_over(&self, checkpoint: u64, device_state: &[u8]) {
        // The image as the core left it: the discard of a checkpoint cut
        // off, queued before, carried out.
        self.image.carry_out(&self.guest);
        let restored = DeviceState::from_bytes(device_state)
            .and_then(|state| state.restore_parked(self.vm, self.vcpus))
            .map_err(|e| error_chain(&e));
        if restored.is_ok() {
            self.vcpus.resume();
            tracing::warn!(
                checkpoint,
                "the destination is lost: the guest runs here again, from checkpoint {checkpoint}"
            );
        } else {
            tracing::error!(checkpoint, error = ?restored, "the destination is lost and the guest cannot run here again");
        }
        *lock(&self.takeover) = Some(Takeover {
            checkpoint,
            last_heard_ns: self.last_heard_ns.load(Ordering::SeqCst),
            running_ns: now().0,
            error: restored.err(),
        });
    }

    fn stop_vcpus<'s>(&'s self, s: &'s Scope<'s, '_>) {
        let t0 = now().0;
        self.stop_ns.store(t0, Ordering::SeqCst);
        let rt = self.shell.tuning.rt_switchover;
        // The stopping thread (the return path's reader in pure postcopy,
        // the bulk writer after the last precopy round) runs in real time
        // from here to the switchover; its own boost logic lowers it after.
        set_policy(rt, "src-stop");
        // Kick first; then the vCPU threads, which must run to park and to
        // save their state, get a real-time priority just below this
        // thread's, so that they do it at once however busy the CPUs are;
        // back to normal after (they run the guest again only after a failed
        // migration).
        let first = self.vcpus.pause_within(Duration::ZERO);
        let tids = self.vcpus.thread_ids();
        if let Some(p) = rt {
            for &tid in &tids {
                let _ = crate::sys::set_realtime(tid, Some((p - 1).max(1)));
            }
        }
        let parked = first.all_parked() || self.vcpus.wait_paused(crate::runner::CONTROL_TIMEOUT);
        self.pause_ns.store(now().0.saturating_sub(t0), Ordering::SeqCst);
        // Each parked vCPU thread saves its own state: still boosted.
        let captured = if parked {
            DeviceState::capture(self.vm, self.vcpus).and_then(|state| state.to_bytes())
        } else {
            Err(crate::error::Error::Vcpu { vcpu: 0, reason: "a vCPU did not stop in time".into() })
        };
        for &tid in &tids {
            let _ = crate::sys::set_realtime(tid, None);
        }
        self.stop_capture_ns.store(now().0.saturating_sub(t0), Ordering::SeqCst);
        match captured {
            Ok(bytes) => {
                tracing::debug!(device_state_bytes = bytes.len(), "vCPUs stopped, device state captured");
                self.event(s, |l, now| {
                    if let Err(e) = l.core.handle_vcpus_stopped(now, Bytes::from(bytes)) {
                        tracing::error!(%e, "vcpus stopped");
                    }
                })
            }
            Err(e) => {
                tracing::error!(e = error_chain(&e), "cannot stop the guest and capture its state");
                self.event(s, |l, now| {
                    if let Err(e) = l.core.handle_cancel(now) {
                        tracing::error!(%e, "cancel");
                    }
                });
            }
        }
    }

    fn sync_dirty_log<'s>(&'s self, s: &'s Scope<'s, '_>) {
        match self.vm.take_dirty_log() {
            Ok(dirty) => self.event(s, |l, now| {
                for block in 0..dirty.num_blocks() {
                    let Some(start) = self.guest.map.block_start(block) else { continue };
                    let words = self.guest.map.fold_dirty(dirty.block_words(block));
                    if let Err(e) = l.core.handle_dirty_bitmap(now, start, &words) {
                        tracing::error!(%e, "dirty bitmap");
                    }
                }
                if let Err(e) = l.core.handle_dirty_sync_complete(now) {
                    tracing::error!(%e, "dirty sync complete");
                }
            }),
            Err(e) => {
                tracing::error!(e = error_chain(&e), "cannot read the dirty log");
                self.event(s, |l, now| {
                    let _ = l.core.handle_cancel(now);
                });
            }
        }
    }

    fn connect<'s>(&'s self, s: &'s Scope<'s, '_>, channel: Channel) {
        set_policy(None, "src-connect");
        let addr = *lock(&self.addr);
        let t0 = now().0;
        let result = security::connect(addr, channel, self.connect_timeout, &self.shell.tuning, &self.security);
        lock(&self.handshakes).push((t0, now().0));
        match result {
            Ok(conn) => {
                tracing::debug!(%channel, %addr, id = conn.id, secure = conn.is_secure(), "connected");
                conn.set_write_timeout(self.write_timeout);
                let conn = Arc::new(conn);
                let attached = conn.clone();
                lock(&self.connect_errors)[channel.index()] = None;
                self.event(s, move |l, now| l.attach(now, attached));
                spawn(s, "src-reader", move || self.read_loop(s, conn));
            }
            Err(e) if e.is_refused() => {
                tracing::info!(e = error_chain(&e), %channel, "connect refused");
                self.event(s, |l, now| l.core.handle_connect_refused(now, channel));
            }
            Err(e) => {
                let text = error_chain(&e);
                match &e {
                    security::ConnectError::Handshake(_) | security::ConnectError::Proof(_) => {
                        tracing::warn!(side = "source", %channel, "{text}")
                    }
                    _ => tracing::info!(e = text, %channel, "connect failed"),
                }
                lock(&self.connect_errors)[channel.index()] = Some(text);
                self.event(s, |l, now| l.core.handle_connect_failed(now, channel));
            }
        }
    }

    fn read_loop<'s>(&'s self, s: &'s Scope<'s, '_>, conn: Arc<Connection>) {
        let tuning = &self.shell.tuning;
        let fast = conn.channel == Channel::Return;
        let base = if fast { tuning.rt_priority } else { None };
        if fast {
            latency_thread(tuning, "src-return");
            // This thread writes the requested pages (flush_fault_path):
            // room for a huge page, touched before the first request.
            if tuning.page_bytes() > PAGE_SIZE {
                warm_fault_path_buffer(tuning.frame_page_bytes() as usize + FAULT_PATH_BUFFER_MARGIN);
            }
        } else {
            set_policy(None, "src-reader");
        }
        // The return path's reader stops the guest (on the welcome) and
        // queues StartGuest (on ReadyToRun): boosted until the guest started.
        let before_start = |state: SourceState| fast && !state.after_start() && !state.is_terminal();
        let mut boost = Boost::default();
        let mut state = lock(&self.shell.locked).core.state();
        boost.set(base, tuning.rt_switchover, before_start(state), "src-return");
        let spin = if fast { tuning.spin() } else { Duration::ZERO };
        let on_bytes = |bytes| {
            let mut current = false;
            self.event(s, |l, now| {
                current = l.input(now, &conn, bytes);
                if current && fast {
                    self.last_heard_ns.store(now.0, Ordering::Relaxed);
                }
                if current {
                    state = l.core.state();
                }
            });
            if current {
                boost.set(base, tuning.rt_switchover, before_start(state), "src-return");
            }
            current
        };
        let on_closed = || {
            tracing::debug!(channel = %conn.channel, id = conn.id, "connection closed");
            self.event(s, |l, now| {
                l.detach(now, &conn);
            })
        };
        net::read_until_closed(&conn, READ_BYTES, spin, on_bytes, on_closed);
    }

    /// Rings every push stream's bulk writer.
    fn ring_bulk(&self) {
        for bell in &self.bulk_bells {
            bell.ring();
        }
    }

    /// The bulk writer of push stream `channel` (the main channel, or a
    /// push channel: background pages only), one thread each.
    fn bulk_loop<'s>(&'s self, s: &'s Scope<'s, '_>, channel: Channel) {
        let bell = &self.bulk_bells[channel.push_stream().unwrap_or(0) as usize];
        let tuning = &self.shell.tuning;
        pin_self(tuning.bulk_cpu, "src-bulk");
        set_policy(None, "src-bulk");
        let mut boost = Boost::default();
        let mut buf: Vec<u8> = Vec::with_capacity(BULK_WRITE_BYTES + BULK_STEP_BYTES + 2 * PAGE_SIZE as usize);
        let mut deferred = Vec::new();
        let mut pace = Pace::default();
        while !self.shell.is_stopping() {
            let guard = lock(&self.shell.write_locks[channel.index()]);
            buf.clear();
            let mut conn: Option<Arc<Connection>> = None;
            let mut postcopy = false;
            while buf.len() < BULK_WRITE_BYTES {
                let before = buf.len();
                let (changed, ops, state) = {
                    let mut l = lock_spin(&self.shell.locked, LOCK_SPIN);
                    let state = l.core.state();
                    let current = l.connection(channel).cloned();
                    let changed = match (&conn, &current) {
                        (Some(a), Some(b)) => a.id != b.id,
                        (Some(_), None) => true,
                        (None, _) => false,
                    };
                    if !changed {
                        conn = current;
                        if conn.is_some() {
                            let max = before + BULK_STEP_BYTES;
                            deferred.clear();
                            poll_frames(&mut l, channel, &mut buf, max, &self.guest, &mut deferred);
                        }
                    }
                    (changed, self.drain(&mut l), state)
                };
                DeferredPage::fill_all(&deferred, &mut buf, &self.guest);
                deferred.clear();
                // Ready for the switchover (idle until the stop, then the
                // device state): wake at once when it comes.
                let switchover = matches!(
                    state,
                    SourceState::Handshake | SourceState::Stopping | SourceState::FinalSync | SourceState::Switchover
                );
                boost.set_nice(tuning.rt_switchover, switchover, tuning.bulk_nice, "src-bulk");
                postcopy = state.after_start();
                if !ops.is_empty() {
                    self.execute(s, ops);
                }
                if changed || conn.is_none() || buf.len() == before {
                    break;
                }
            }
            if buf.is_empty() {
                drop(guard);
                bell.wait_timeout(Duration::from_millis(20));
                continue;
            }
            if let Some(conn) = conn {
                if conn.write_all(&buf).is_err() {
                    drop(guard);
                    self.lost(s, &conn);
                } else if let Some(rate) = tuning.max_postcopy_bandwidth.filter(|_| postcopy) {
                    drop(guard);
                    // Each stream keeps to its share of the rate.
                    let share = (rate / self.bulk_bells.len().max(1) as u64).max(1);
                    let mut wait = pace.sent(buf.len() as u64, share, now().0);
                    // A ring (a fault's request, a state change) ends a wait
                    // early: wait again for what is left, or a guest that
                    // faults often unpaced the push altogether.
                    while !wait.is_zero() && !self.shell.is_stopping() {
                        bell.wait_timeout(wait.min(PACE_WAIT_MAX));
                        wait = pace.sent(0, share, now().0);
                    }
                }
            }
        }
    }
}

/// The longest single wait of a paced push (it checks for shutdown between).
const PACE_WAIT_MAX: Duration = Duration::from_millis(50);

/// Keeps the background push at a rate: the bytes sent since it began
/// are due no earlier than at that rate.
#[derive(Debug, Default)]
struct Pace {
    /// Monotonic ns of the first write, and bytes written since.
    since: Option<(u64, u64)>,
}

impl Pace {
    /// `bytes` more were sent at `now_ns`; returns how long to wait before
    /// the next write to stay within `bytes_per_s`.
    fn sent(&mut self, bytes: u64, bytes_per_s: u64, now_ns: u64) -> Duration {
        let (start, total) = self.since.get_or_insert((now_ns, 0));
        *total += bytes;
        let due = *start
            + u64::try_from(u128::from(*total) * 1_000_000_000 / u128::from(bytes_per_s.max(1))).unwrap_or(u64::MAX);
        Duration::from_nanos(due.saturating_sub(now_ns))
    }
}

/// A session id for a new migration (the core has no randomness).
pub fn new_session_id() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok();
    let mut x = if random { u64::from_le_bytes(bytes) } else { 0 };
    x ^= crate::sys::monotonic_ns() ^ (u64::from(std::process::id()) << 32);
    x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 29)
}

#[cfg(test)]
mod tests {
    use super::Pace;

    use std::time::Duration;

    #[test]
    fn the_pace_holds_the_push_to_its_rate() {
        let mut pace = Pace::default();
        // 1 MB/s: a first 1000-byte write is due 1 ms after it began.
        assert_eq!(pace.sent(1000, 1_000_000, 5_000), Duration::from_millis(1));
        // 2 ms later, 1000 more bytes: due at 2 ms, already past.
        assert_eq!(pace.sent(1000, 1_000_000, 2_005_000), Duration::ZERO);
        // 500 KB at once: due 502 ms after the start.
        assert_eq!(pace.sent(500_000, 1_000_000, 2_005_000), Duration::from_millis(500));
        // Woken 100 ms into that wait: nothing sent, 400 ms left.
        assert_eq!(pace.sent(0, 1_000_000, 102_005_000), Duration::from_millis(400));
    }
}
