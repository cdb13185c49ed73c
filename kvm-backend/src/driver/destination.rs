//! The destination side's driver. See the module docs of [`super`] for
//! threads.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Scope;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use postcopy_core::wire::PageData;
use postcopy_core::{
    Channel, Config, DestinationAction, DestinationStats, Finished, LatencySummary, Notice, PageNumber, Timestamp,
    Waiter,
};

use super::digest::PageDigests;
use super::machine::{core_layout, GuestKind, MachineDescription, PageMap};
use super::net::{self, lock_spin, Conn};
use super::report::{DestinationReport, PatternCheck};
use super::source::notice_text;
use super::sync::{Doorbell, FaultClock, PageBits};
use super::{now, pin_self, set_policy, Boost, Damage, Tuning};
use crate::devices::{lock, SerialOutput};
use crate::guest::TestGuest;
use crate::layout::PAGE_SIZE;
use crate::memory::GuestRam;
use crate::runner::VcpuSet;
use crate::state::DeviceState;
use crate::uffd::{Install, InstallFailure, PageFault, UffdRam};
use crate::vcpu::Vcpu;
use crate::vm::{Vm, VmConfig};

/// Bytes read per receive on the main channel.
const MAIN_READ_BYTES: usize = 256 * 1024;
/// Bytes read per receive on the urgent channel.
const URGENT_READ_BYTES: usize = 64 * 1024;
/// Pages installed with one `UFFDIO_COPY` at most (the run's bits fit a u64).
const MAX_INSTALL_RUN: usize = 64;
/// How long a thread spins for the core lock before sleeping on it.
const LOCK_SPIN: Duration = Duration::from_micros(10);
/// How long the fault thread blocks in one poll (it checks for shutdown
/// in between).
const FAULT_POLL: Duration = Duration::from_millis(50);
/// Retries of an install that failed transiently (`EAGAIN`) before the page
/// is reported missing to the core.
const INSTALL_RETRIES: u32 = 3;

/// How to run the destination.
#[derive(Clone, Debug)]
pub struct DestinationOptions {
    /// The core's settings.
    pub config: Config,
    /// Thread placement and polling.
    pub tuning: Tuning,
    /// Where the guest's serial port writes.
    pub serial: SerialOutput,
    /// How long the guest runs here after the migration before it is checked.
    pub run_after: Duration,
    /// Write guest RAM here after the migration (guest stopped).
    pub dump_memory: Option<PathBuf>,
    /// Test-only damage to one page.
    pub damage: Option<Damage>,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress_bar: bool,
    /// Guest RAM allocated before listening ([`GuestRam::new_preallocated`]),
    /// for the layout the source is expected to send; None: anonymous RAM
    /// allocated when the machine description arrives.
    pub preallocated: Option<Arc<GuestRam>>,
}

/// What the destination reports, and whether it succeeded.
#[derive(Debug)]
pub struct DestinationOutcome {
    /// The report (also for failures).
    pub report: DestinationReport,
}

struct Machine {
    desc: MachineDescription,
    ram: Arc<GuestRam>,
    uffd: UffdRam,
    vm: Vm,
    map: PageMap,
    installed: PageBits,
    digests: PageDigests,
    clock: FaultClock,
}

struct Locked {
    core: postcopy_core::Destination,
    conns: [Option<Arc<Conn>>; 3],
    /// The machine is being built: nothing goes out on the return path
    /// (the welcome would let the source stop its guest before this side
    /// can take it).
    preparing: bool,
}

impl Locked {
    fn is_current(&self, conn: &Conn) -> bool {
        self.conns[conn.channel.index()].as_ref().is_some_and(|c| c.id == conn.id)
    }
}

enum Op {
    Prepare(Bytes),
    Install { page: PageNumber, data: PageData, overwrite: bool },
    Discard { first: PageNumber, count: u64 },
    Load(Bytes),
    Resume,
    Wake(PageNumber),
    Shutdown(Arc<Conn>),
    Farewell(Arc<Conn>, Bytes),
    Notice(Notice),
    Finished(Box<Finished<DestinationStats>>),
}

fn drain(l: &mut Locked) -> Vec<Op> {
    let mut ops = Vec::new();
    while let Some(action) = l.core.poll_action() {
        ops.push(match action {
            DestinationAction::PrepareMemory(_) => {
                l.preparing = true;
                Op::Prepare(l.core.machine_description().cloned().unwrap_or_default())
            }
            DestinationAction::InstallPage { page, data, overwrite } => Op::Install { page, data, overwrite },
            DestinationAction::DiscardPages { first, count } => Op::Discard { first, count },
            DestinationAction::LoadDeviceState(state) => Op::Load(state),
            DestinationAction::ResumeVcpus => Op::Resume,
            DestinationAction::Wake(page) => Op::Wake(page),
            DestinationAction::Close(channel) => match l.conns[channel.index()].take() {
                Some(conn) => Op::Shutdown(conn),
                None => continue,
            },
            DestinationAction::Farewell { channel, bytes } => match l.conns[channel.index()].take() {
                Some(conn) => Op::Farewell(conn, bytes),
                None => continue,
            },
            DestinationAction::Notice(notice) => Op::Notice(notice),
            DestinationAction::Finished(finished) => Op::Finished(finished),
        });
    }
    ops
}

struct Driver<'a> {
    locked: Mutex<Locked>,
    write_lock: Mutex<()>,
    flush_wanted: AtomicBool,
    machine: OnceLock<Machine>,
    vcpus: Mutex<Option<Vec<Vcpu>>>,
    set: Mutex<Option<VcpuSet>>,
    vcpu_tids: OnceLock<Vec<i32>>,
    finished: Mutex<Option<Finished<DestinationStats>>>,
    finished_flag: AtomicBool,
    finished_bell: Doorbell,
    stopping: AtomicBool,
    fatal: Mutex<Option<String>>,
    latency: Mutex<Histogram<u64>>,
    resume_ns: AtomicU64,
    state_received_ns: AtomicU64,
    state_loaded_ns: AtomicU64,
    start_received_ns: AtomicU64,
    end_ns: AtomicU64,
    faults_read: AtomicU64,
    install_anomalies: AtomicU64,
    /// Wall time in the calls that placed pages, summed over the installers.
    install_busy_ns: AtomicU64,
    /// Installs drained from the core and not yet carried out: the EOC
    /// waits for them (a failure must reach the core before it leaves).
    installs_in_flight: AtomicU64,
    notices: Mutex<Vec<String>>,
    opts: &'a DestinationOptions,
    listener: TcpListener,
}

fn spawn<'s, 'e, F: FnOnce() + Send + 's>(s: &'s Scope<'s, 'e>, name: &str, f: F) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn_scoped(s, f) {
        tracing::error!(%e, name, "cannot spawn a driver thread");
    }
}

/// Accepts a migration on `listener`, runs the guest after it, checks it,
/// and reports. Returns when the migration failed, or when the guest ran
/// `run_after` here and was checked.
pub fn run_destination(listener: TcpListener, opts: &DestinationOptions) -> DestinationOutcome {
    let histogram = Histogram::new_with_bounds(1, 3_600_000_000_000, 3).map_err(|e| e.to_string());
    let histogram = match histogram {
        Ok(h) => h,
        Err(e) => {
            return DestinationOutcome {
                report: DestinationReport { error: Some(format!("histogram: {e}")), ..Default::default() },
            }
        }
    };
    let driver = Driver {
        locked: Mutex::new(Locked {
            core: postcopy_core::Destination::new(opts.config.clone(), PAGE_SIZE as u32),
            conns: [None, None, None],
            preparing: false,
        }),
        write_lock: Mutex::new(()),
        flush_wanted: AtomicBool::new(false),
        machine: OnceLock::new(),
        vcpus: Mutex::new(None),
        set: Mutex::new(None),
        vcpu_tids: OnceLock::new(),
        finished: Mutex::new(None),
        finished_flag: AtomicBool::new(false),
        finished_bell: Doorbell::new(),
        stopping: AtomicBool::new(false),
        fatal: Mutex::new(None),
        latency: Mutex::new(histogram),
        resume_ns: AtomicU64::new(0),
        state_received_ns: AtomicU64::new(0),
        state_loaded_ns: AtomicU64::new(0),
        start_received_ns: AtomicU64::new(0),
        end_ns: AtomicU64::new(0),
        faults_read: AtomicU64::new(0),
        install_anomalies: AtomicU64::new(0),
        install_busy_ns: AtomicU64::new(0),
        installs_in_flight: AtomicU64::new(0),
        notices: Mutex::new(Vec::new()),
        opts,
        listener,
    };
    let mut report = DestinationReport::default();
    std::thread::scope(|s| {
        let d = &driver;
        spawn(s, "dst-accept", move || d.accept_loop(s));
        spawn(s, "dst-timer", move || d.timer_loop(s));
        if opts.progress_bar {
            spawn(s, "dst-progress", move || d.progress_loop());
        }
        while !d.finished_flag.load(Ordering::SeqCst) {
            d.finished_bell.wait_timeout(Duration::from_millis(100));
        }
        report = d.after_finish();
        d.stop_all();
    });
    if let Some(set) = lock(&driver.set).take() {
        if let Err(e) = set.stop() {
            tracing::warn!(%e, "stopping the vCPUs");
        }
    }
    DestinationOutcome { report }
}

impl<'a> Driver<'a> {
    fn event<'s>(&'s self, s: &'s Scope<'s, '_>, f: impl FnOnce(&mut Locked, Timestamp)) {
        let ops = {
            let mut l = lock_spin(&self.locked, LOCK_SPIN);
            f(&mut l, now());
            self.drain_counted(&mut l)
        };
        self.execute(s, ops);
    }

    /// [`drain`], counting the installs it hands out (under the core lock,
    /// so that the EOC check in [`Driver::flush_return`] sees them).
    fn drain_counted(&self, l: &mut Locked) -> Vec<Op> {
        let ops = drain(l);
        let installs = ops.iter().filter(|op| matches!(op, Op::Install { .. })).count() as u64;
        if installs > 0 {
            self.installs_in_flight.fetch_add(installs, Ordering::SeqCst);
        }
        ops
    }

    fn execute<'s>(&'s self, s: &'s Scope<'s, '_>, ops: Vec<Op>) {
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            match op {
                Op::Prepare(machine) => self.prepare(s, &machine),
                Op::Install { page, data: PageData::Bytes(bytes), overwrite: false } if self.batchable(page) => {
                    // Consecutive pages of one block go in one UFFDIO_COPY
                    // (a syscall per page was a fifth of the receiver's time).
                    let mut run = vec![(page, bytes)];
                    while run.len() < MAX_INSTALL_RUN {
                        let next = PageNumber(page.0 + run.len() as u64);
                        match ops.peek() {
                            Some(Op::Install { page: p, data: PageData::Bytes(_), overwrite: false })
                                if *p == next && self.batchable(next) && self.same_block(page, next) =>
                            {
                                if let Some(Op::Install { page, data: PageData::Bytes(bytes), .. }) = ops.next() {
                                    run.push((page, bytes));
                                }
                            }
                            _ => break,
                        }
                    }
                    let n = run.len() as u64;
                    self.install_run(s, run);
                    self.installs_in_flight.fetch_sub(n, Ordering::SeqCst);
                }
                Op::Install { page, data, overwrite } => {
                    self.install(s, page, data, overwrite);
                    self.installs_in_flight.fetch_sub(1, Ordering::SeqCst);
                }
                Op::Discard { first, count } => self.discard(first, count),
                Op::Load(state) => {
                    self.state_received_ns.store(now().0, Ordering::SeqCst);
                    spawn(s, "dst-loader", move || self.load(s, state))
                }
                Op::Resume => {
                    self.start_received_ns.store(now().0, Ordering::SeqCst);
                    self.resume()
                }
                Op::Wake(page) => {
                    if let Some(m) = self.machine.get() {
                        if let Some(r) = m.map.page_ref(page) {
                            if let Err(e) = m.uffd.wake_pages(r, 1) {
                                tracing::warn!(%e, "wake");
                            }
                        }
                    }
                }
                Op::Shutdown(conn) => conn.shutdown(),
                Op::Farewell(conn, bytes) => spawn(s, "dst-farewell", move || {
                    set_policy(None, "dst-farewell");
                    let _w = lock(&self.write_lock);
                    let _ = conn.stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = conn.write_all(&bytes);
                    conn.shutdown();
                }),
                Op::Notice(notice) => {
                    let text = notice_text(&notice);
                    eprintln!("destination: {text}");
                    lock(&self.notices).push(text);
                }
                Op::Finished(finished) => {
                    self.end_ns.store(now().0, Ordering::SeqCst);
                    *lock(&self.finished) = Some(*finished);
                    self.finished_flag.store(true, Ordering::SeqCst);
                    self.finished_bell.ring();
                }
            }
        }
        self.flush_return(s);
    }

    /// Builds the VM and its userfaultfd-registered RAM before any vCPU
    /// runs, and starts serving faults.
    fn prepare<'s>(&'s self, s: &'s Scope<'s, '_>, machine: &[u8]) {
        let built = (|| -> Result<(Machine, Vec<Vcpu>), String> {
            let desc = MachineDescription::from_bytes(machine)?;
            let layout = self.locked_layout()?;
            if core_layout(&desc.ram)? != layout {
                return Err("the machine description's RAM differs from the hello's layout".into());
            }
            let ram = match &self.opts.preallocated {
                Some(ram) if ram.layout() == &desc.ram => ram.clone(),
                Some(ram) => {
                    return Err(format!(
                        "the source's guest RAM ({} MiB) is not the RAM preallocated here ({} MiB, --prealloc)",
                        desc.ram.total_bytes() >> 20,
                        ram.layout().total_bytes() >> 20
                    ))
                }
                None => Arc::new(GuestRam::new(desc.ram.clone()).map_err(|e| e.to_string())?),
            };
            let uffd = UffdRam::register(ram.clone()).map_err(|e| e.to_string())?;
            let config = VmConfig { vcpus: desc.vcpus, irqchip: desc.irqchip, serial: self.opts.serial.clone() };
            let vm = Vm::new(ram.clone(), config).map_err(|e| e.to_string())?;
            let vcpus = vm.create_vcpus().map_err(|e| e.to_string())?;
            let map = PageMap::new(ram.layout());
            let pages = map.total_pages();
            let machine = Machine {
                desc,
                ram,
                uffd,
                vm,
                map,
                installed: PageBits::new(pages),
                digests: PageDigests::new(pages, PAGE_SIZE as usize),
                clock: FaultClock::new(pages),
            };
            Ok((machine, vcpus))
        })();
        lock(&self.locked).preparing = false;
        match built {
            Ok((machine, vcpus)) => {
                if self.machine.set(machine).is_err() {
                    tracing::error!("the machine was prepared twice");
                    return;
                }
                // Only the vCPUs of the machine in place: a second prepare
                // must not swap in vCPUs of a VM that was dropped.
                *lock(&self.vcpus) = Some(vcpus);
                self.arm_install_fault();
                spawn(s, "dst-fault", move || self.fault_loop(s));
            }
            Err(e) => {
                eprintln!("destination: cannot build the machine: {e}");
                *lock(&self.fatal) = Some(format!("cannot build the machine: {e}"));
                self.event(s, |l, now| {
                    let _ = l.core.handle_cancel(now);
                });
            }
        }
    }

    /// Test-only: arms the install fault asked for in the environment.
    fn arm_install_fault(&self) {
        let Some(m) = self.machine.get() else { return };
        match super::install_faults::InstallFault::from_env() {
            Ok(None) => {}
            Ok(Some(f)) => match m.map.page_ref(PageNumber(f.page)) {
                Some(page) => {
                    eprintln!("destination: test-only install fault armed: {f:?}");
                    let plan = crate::uffd::InstallFaultPlan { page, fault: f.fault, times: f.times };
                    m.uffd.inject_install_fault(Some(plan));
                }
                None => eprintln!("destination: test-only install fault at page {} outside the guest", f.page),
            },
            Err(e) => eprintln!("destination: {e}"),
        }
    }

    fn locked_layout(&self) -> Result<postcopy_core::RamLayout, String> {
        // Called from an op, after the lock was released.
        lock(&self.locked).core.layout().cloned().ok_or_else(|| "no layout yet".to_string())
    }

    fn install<'s>(&'s self, s: &'s Scope<'s, '_>, page: PageNumber, data: PageData, overwrite: bool) {
        let Some(m) = self.machine.get() else {
            tracing::error!("page before the machine was built");
            return;
        };
        let Some(r) = m.map.page_ref(page) else { return };
        let mut data = data;
        if let Some(damage) = self.opts.damage.filter(|d| d.page() == page.0) {
            data = match (damage, data) {
                (Damage::Drop(_), _) => PageData::Zero,
                (Damage::Corrupt(_), PageData::Bytes(b)) => {
                    let mut v = b.to_vec();
                    v[0] ^= 0x10;
                    PageData::Bytes(Bytes::from(v))
                }
                (Damage::Corrupt(_), PageData::Zero) => {
                    let mut v = vec![0u8; PAGE_SIZE as usize];
                    v[0] ^= 0x10;
                    PageData::Bytes(Bytes::from(v))
                }
            };
            eprintln!("destination: test-only damage applied to page {} ({damage:?})", page.0);
        }
        // The install time is taken before a woken vCPU can preempt this thread.
        let started_ns = now().0;
        let result = match (&data, overwrite) {
            (PageData::Bytes(b), true) => m.ram.write_page(r, b).map(|()| (Install::Installed, now().0)),
            (PageData::Zero, true) => {
                m.ram.write_page(r, &[0u8; PAGE_SIZE as usize]).map(|()| (Install::Installed, now().0))
            }
            (PageData::Bytes(b), false) => m.uffd.install_page_with(r, b, || now().0),
            (PageData::Zero, false) => m.uffd.install_zero_page_with(r, || now().0),
        };
        if let Ok((_, at_ns)) = &result {
            self.install_busy_ns.fetch_add(at_ns.saturating_sub(started_ns), Ordering::Relaxed);
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

    /// Whether `page` may be installed as part of a run (the machine is
    /// built and no test-only damage applies to it).
    fn batchable(&self, page: PageNumber) -> bool {
        self.machine.get().is_some() && self.opts.damage.is_none_or(|d| d.page() != page.0)
    }

    fn same_block(&self, a: PageNumber, b: PageNumber) -> bool {
        let Some(m) = self.machine.get() else { return false };
        matches!((m.map.page_ref(a), m.map.page_ref(b)), (Some(x), Some(y)) if x.block == y.block)
    }

    /// Installs consecutive pages of one block with one `UFFDIO_COPY`
    /// through a per-thread staging buffer; the bookkeeping is per page,
    /// as in [`Driver::install`].
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
                self.install_busy_ns.fetch_add(t.saturating_sub(started_ns), Ordering::Relaxed);
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
        m.installed.set(page.0);
        if let Some(waited) = m.clock.finish(page.0, at_ns) {
            let _ = lock(&self.latency).record(waited.max(1));
        }
    }

    /// The kernel already had `page`: left as it was, counted as an anomaly.
    fn note_already_present(&self, page: PageNumber) {
        self.install_anomalies.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(page = page.0, "page already present: install skipped");
    }

    /// A run stopped part-way: the pages before the stop are noted as
    /// usual, each later one goes through [`Driver::install`] again (and
    /// its failure handling) on its own.
    fn install_run_failed<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        m: &Machine,
        run: Vec<(PageNumber, Bytes)>,
        present: u64,
        error: crate::Error,
    ) {
        let stopped_at = match &error {
            crate::Error::Install(e) => (e.stopped_at as usize).min(run.len()),
            _ => 0,
        };
        tracing::warn!(%error, "install of a run stopped; its remaining pages go one by one");
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
                if let Err(e) = m.uffd.wake_pages(r, run.len() as u64) {
                    tracing::error!(%e, first = first.0, "waking a run's waiters");
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
        error: crate::Error,
    ) {
        let bytes = match data {
            PageData::Bytes(b) => Some(&b[..]),
            PageData::Zero => None,
        };
        let Some(r) = m.map.page_ref(page) else { return };
        let mut error = error;
        for attempt in 0..=INSTALL_RETRIES {
            match &error {
                crate::Error::Install(e) if matches!(e.cause, InstallFailure::Wake(_)) => {
                    self.note_installed(m, page, bytes, now().0);
                    if let Err(e) = m.uffd.wake_pages(r, 1) {
                        tracing::error!(%e, page = page.0, "waking a page's waiters");
                    }
                    return;
                }
                crate::Error::Install(e) if e.is_transient() && !overwrite && attempt < INSTALL_RETRIES => {
                    eprintln!("destination: page {} failed to install ({}), retrying", page.0, e.cause);
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
        self.install_anomalies.fetch_add(1, Ordering::Relaxed);
        eprintln!("destination: page {} could not be installed: {error}", page.0);
        let reason = error.to_string();
        let mut late = None;
        self.event(s, |l, now| {
            if let Err(e) = l.core.handle_install_failed(now, page, reason) {
                late = Some(e);
            }
        });
        if let Some(e) = late {
            // Nothing brings the page back: the guest is not run on the hole.
            *lock(&self.fatal) = Some(format!("install failed: {e}"));
        }
    }

    fn discard(&self, first: PageNumber, count: u64) {
        let Some(m) = self.machine.get() else { return };
        let Some(r) = m.map.page_ref(first) else { return };
        if let Err(e) = m.uffd.discard_pages(r, count) {
            tracing::error!(%e, "discard failed");
            self.install_anomalies.fetch_add(1, Ordering::Relaxed);
        }
        for page in first.0..first.0 + count {
            m.digests.forget(page);
            m.installed.clear(page);
        }
    }

    /// Loads the device state in its own thread: restoring may touch guest
    /// RAM, whose faults the fault thread keeps serving.
    fn load<'s>(&'s self, s: &'s Scope<'s, '_>, state: Bytes) {
        set_policy(self.opts.tuning.rt_switchover, "dst-loader");
        let result = (|| -> Result<(), String> {
            let m = self.machine.get().ok_or("no machine")?;
            let vcpus = lock(&self.vcpus).take().ok_or("no vCPUs")?;
            let r = DeviceState::from_bytes(&state).and_then(|st| st.restore(&m.vm, &vcpus)).map_err(|e| e.to_string());
            *lock(&self.vcpus) = Some(vcpus);
            r
        })();
        self.state_loaded_ns.store(now().0, Ordering::SeqCst);
        if let Err(e) = &result {
            eprintln!("destination: loading the device state failed: {e}");
        }
        self.event(s, |l, now| {
            if let Err(e) = l.core.handle_device_state_loaded(now, result) {
                tracing::error!(%e, "device state loaded");
            }
        });
    }

    fn resume(&self) {
        let Some(m) = self.machine.get() else { return };
        let Some(vcpus) = lock(&self.vcpus).take() else {
            tracing::error!("resume without vCPUs");
            return;
        };
        // vCPU threads inherit this thread's policy, possibly real time;
        // each switches itself to the normal policy first thing (runner.rs).
        match VcpuSet::start(vcpus, m.vm.devices().clone()) {
            Ok(set) => {
                self.resume_ns.store(now().0, Ordering::SeqCst);
                let tids = set.thread_ids();
                // vCPU threads inherit the policy of the thread that spawned
                // them: never leave a guest in real time.
                for &tid in &tids {
                    let _ = crate::sys::set_realtime(tid, None);
                }
                if let Some(cpu) = self.opts.tuning.vcpu_cpu {
                    for &tid in &tids {
                        if let Err(e) = crate::sys::pin_thread(tid, cpu) {
                            tracing::warn!(%e, "pinning a vCPU");
                        }
                    }
                }
                let _ = self.vcpu_tids.set(tids);
                *lock(&self.set) = Some(set);
            }
            Err(e) => {
                // Past StartGuest nothing can give the guest back: report loudly.
                eprintln!("destination: cannot start the vCPUs: {e}");
                *lock(&self.fatal) = Some(format!("cannot start the vCPUs: {e}"));
            }
        }
    }

    fn flush_return<'s>(&'s self, s: &'s Scope<'s, '_>) {
        self.flush_wanted.store(true, Ordering::SeqCst);
        loop {
            let Ok(guard) = self.write_lock.try_lock() else { return };
            let mut buf = Vec::new();
            while self.flush_wanted.swap(false, Ordering::SeqCst) {
                loop {
                    buf.clear();
                    let (conn, ops) = {
                        let mut l = lock_spin(&self.locked, LOCK_SPIN);
                        // The EOC waits while an install may still fail.
                        let eoc_held = l.core.eoc_queued() && self.installs_in_flight.load(Ordering::SeqCst) > 0;
                        let conn =
                            if l.preparing || eoc_held { None } else { l.conns[Channel::Return.index()].clone() };
                        if conn.is_some() {
                            let _ = l.core.poll_transmit(now(), Channel::Return, &mut buf, 64 * 1024);
                        }
                        (conn, self.drain_counted(&mut l))
                    };
                    if !ops.is_empty() {
                        self.flush_wanted.store(true, Ordering::SeqCst);
                        self.execute(s, ops);
                    }
                    let Some(conn) = conn else { break };
                    if buf.is_empty() {
                        break;
                    }
                    if conn.write_all(&buf).is_err() {
                        self.lost(s, &conn);
                        break;
                    }
                }
            }
            drop(guard);
            if !self.flush_wanted.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    fn lost<'s>(&'s self, s: &'s Scope<'s, '_>, conn: &Arc<Conn>) {
        conn.shutdown();
        self.event(s, |l, now| {
            if l.is_current(conn) {
                l.conns[conn.channel.index()] = None;
                l.core.handle_connection_lost(now, conn.channel);
            }
        });
    }

    fn accept_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        set_policy(None, "dst-accept");
        if let Err(e) = self.listener.set_nonblocking(true) {
            *lock(&self.fatal) = Some(format!("listener: {e}"));
            self.finish_with_fatal();
            return;
        }
        while !self.stopping.load(Ordering::SeqCst) {
            match crate::sys::poll_readable(&self.listener, Duration::from_millis(50)) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(%e, "poll on the listener");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            match self.listener.accept() {
                Ok((stream, peer)) => spawn(s, "dst-conn", move || self.serve_connection(s, stream, peer)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(%e, "accept"),
            }
        }
    }

    fn serve_connection<'s>(
        &'s self,
        s: &'s Scope<'s, '_>,
        mut stream: std::net::TcpStream,
        peer: std::net::SocketAddr,
    ) {
        let _ = stream.set_nonblocking(false);
        let channel = match net::read_preamble(&mut stream, self.opts.config.handshake_timeout) {
            Ok(channel) => channel,
            Err(reason) => {
                let listening = {
                    let l = lock(&self.locked);
                    l.core.state() == postcopy_core::DestinationState::Listening && l.core.layout().is_none()
                };
                eprintln!("destination: connection from {peer} refused: {reason}");
                if listening {
                    // Nothing is at stake yet: a peer that does not speak the
                    // protocol ends this destination with a clear error.
                    *lock(&self.fatal) = Some(format!("connection from {peer}: {reason}"));
                    self.finish_with_fatal();
                }
                return;
            }
        };
        self.opts.tuning.tune_socket(&stream, channel);
        let conn = Arc::new(Conn::new(channel, stream));
        let _ = conn.stream.set_write_timeout(self.opts.config.peer_timeout);
        let c2 = conn.clone();
        self.event(s, move |l, now| {
            if let Some(old) = l.conns[channel.index()].replace(c2) {
                old.shutdown();
            }
            l.core.handle_connected(now, channel);
        });
        self.read_loop(s, conn);
    }

    fn read_loop<'s>(&'s self, s: &'s Scope<'s, '_>, conn: Arc<Conn>) {
        let tuning = &self.opts.tuning;
        let (max, spin, base) = match conn.channel {
            Channel::Main => {
                pin_self(tuning.bulk_cpu, "dst-main");
                (MAIN_READ_BYTES, Duration::ZERO, None)
            }
            Channel::Urgent => {
                pin_self(tuning.latency_cpu, "dst-urgent");
                (URGENT_READ_BYTES, tuning.spin(), tuning.rt_priority)
            }
            Channel::Return => (4096, Duration::ZERO, None),
        };
        set_policy(base, "dst-reader");
        // The main and urgent readers carry the switchover (device state,
        // StartGuest): boosted until the guest runs here.
        let mut boost = Boost::default();
        let boostable = conn.channel != Channel::Return;
        let mut apply_boost = |started: bool| {
            if conn.channel == Channel::Main {
                boost.set_nice(tuning.rt_switchover, !started, tuning.bulk_nice, "dst-main");
            } else {
                boost.set(base, tuning.rt_switchover, boostable && !started, "dst-reader");
            }
        };
        apply_boost(lock(&self.locked).core.guest_started());
        let on_bytes = |bytes| {
            let mut started = None;
            self.event(s, |l, now| {
                if l.is_current(&conn) {
                    l.core.handle_input(now, conn.channel, bytes);
                    started = Some(l.core.guest_started());
                }
            });
            match started {
                Some(started) => {
                    apply_boost(started);
                    true
                }
                // The connection was replaced: its successor's reader goes on.
                None => false,
            }
        };
        let on_closed = || {
            self.event(s, |l, now| {
                if l.is_current(&conn) {
                    if !self.stopping.load(Ordering::SeqCst) && !l.core.state().is_terminal() {
                        let peer = conn.peer.map_or("?".to_string(), |p| p.to_string());
                        eprintln!("destination: the {} connection from {peer} closed", conn.channel);
                    }
                    l.conns[conn.channel.index()] = None;
                    l.core.handle_connection_lost(now, conn.channel);
                }
            })
        };
        net::read_until_closed(&conn, max, spin, on_bytes, on_closed);
    }

    fn fault_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        let Some(m) = self.machine.get() else { return };
        super::latency_thread(&self.opts.tuning, "dst-fault");
        let spin = self.opts.tuning.spin();
        let mut reader = m.uffd.fault_reader();
        let mut faults: Vec<PageFault> = Vec::new();
        while !self.stopping.load(Ordering::SeqCst) {
            faults.clear();
            let got = if spin.is_zero() {
                match reader.wait(FAULT_POLL) {
                    Ok(true) => reader.read(&mut faults),
                    Ok(false) => continue,
                    Err(e) => Err(e),
                }
            } else {
                let until = Instant::now() + spin;
                loop {
                    match reader.read(&mut faults) {
                        Ok(0) if Instant::now() < until => std::hint::spin_loop(),
                        Ok(0) => match reader.wait(FAULT_POLL) {
                            Ok(true) => break reader.read(&mut faults),
                            Ok(false) => break Ok(0),
                            Err(e) => break Err(e),
                        },
                        other => break other,
                    }
                }
            };
            match got {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("destination: reading faults failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
            let t = now();
            let tids = self.vcpu_tids.get();
            let pages: Vec<(PageNumber, Waiter)> = faults
                .iter()
                .filter_map(|f| {
                    let page = m.map.number(f.page)?;
                    m.clock.start(page.0, t.0);
                    let vcpu = f.thread_id.and_then(|tid| tids.and_then(|ts| ts.iter().position(|&x| x == tid)));
                    Some((page, vcpu.map_or(Waiter::Vmm, |i| Waiter::Vcpu(i as u32))))
                })
                .collect();
            self.faults_read.fetch_add(pages.len() as u64, Ordering::Relaxed);
            self.event(s, |l, now| {
                for (page, waiter) in pages {
                    if let Err(e) = l.core.handle_page_fault(now, page, waiter) {
                        tracing::error!(%e, page = page.0, "page fault");
                    }
                }
            });
        }
    }

    fn timer_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        set_policy(None, "dst-timer");
        // It takes the core lock too: boosted with the switchover's threads,
        // it is never preempted while holding it (priority inversion).
        let mut boost = Boost::default();
        while !self.stopping.load(Ordering::SeqCst) {
            let (deadline, started) = {
                let l = lock(&self.locked);
                (l.core.poll_timeout(), l.core.guest_started() || l.core.state().is_terminal())
            };
            boost.set(None, self.opts.tuning.rt_switchover, !started, "dst-timer");
            let t = now();
            match deadline {
                Some(d) if d <= t => self.event(s, |l, now| l.core.handle_timeout(now)),
                Some(d) => std::thread::sleep(d.saturating_since(t).min(Duration::from_millis(10))),
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn progress_loop(&self) {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        set_policy(None, "dst-progress");
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} pages present ({percent}%)")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("waiting for the source");
        while !self.stopping.load(Ordering::SeqCst) && !self.finished_flag.load(Ordering::SeqCst) {
            if let Some(m) = self.machine.get() {
                bar.set_length(m.installed.len());
                bar.set_position(m.installed.count());
                bar.set_message(format!("{} faults served", self.faults_read.load(Ordering::Relaxed)));
            }
            bar.tick();
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(m) = self.machine.get() {
            bar.set_position(m.installed.count());
        }
        bar.finish_and_clear();
    }

    fn finish_with_fatal(&self) {
        self.finished_flag.store(true, Ordering::SeqCst);
        self.finished_bell.ring();
    }

    /// Ends every driver thread: connections, listener, fault thread, timer.
    fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let conns: Vec<Arc<Conn>> = lock(&self.locked).conns.iter_mut().filter_map(Option::take).collect();
        for conn in conns {
            conn.shutdown();
        }
        let set = lock(&self.set);
        if let Some(plan) = self.machine.get().and_then(|m| m.uffd.armed_install_fault()) {
            eprintln!("destination: test-only install fault left unfired: {plan:?}");
        }
        if let Some(m) = self.machine.get() {
            let hole = m.installed.first_clear().is_some();
            if set.is_none() || hole || lock(&self.finished).as_ref().is_none_or(|f| f.result.is_err()) {
                // Wake any thread still waiting for a page (a loader cut off
                // mid-way): the guest is abandoned here. Running vCPUs are
                // kicked first, so that none runs the guest on missing pages.
                let abandoned = match set.as_ref() {
                    Some(set) => set.abandon(&m.uffd),
                    None => m.uffd.unregister_all(),
                };
                if let Err(e) = abandoned {
                    tracing::warn!(%e, "abandoning the guest");
                }
            }
        }
    }

    /// After the core finished: run the guest a while, check it, report.
    fn after_finish(&self) -> DestinationReport {
        let finished = lock(&self.finished).clone();
        if finished.as_ref().is_some_and(|f| f.result.is_ok()) {
            // The core may complete (all pages present, EOC sent by another
            // thread) while the thread that took StartGuest still starts the
            // vCPUs: wait for them, within a bound.
            let t0 = Instant::now();
            while lock(&self.set).is_none() && lock(&self.fatal).is_none() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let fatal = lock(&self.fatal).clone();
        let mut report = DestinationReport {
            resume_ns: self.resume_ns.load(Ordering::SeqCst),
            device_state_received_ns: self.state_received_ns.load(Ordering::SeqCst),
            device_state_loaded_ns: self.state_loaded_ns.load(Ordering::SeqCst),
            start_received_ns: self.start_received_ns.load(Ordering::SeqCst),
            end_ns: self.end_ns.load(Ordering::SeqCst),
            damage: self.opts.damage.map(|d| format!("{d:?}")),
            ..Default::default()
        };
        if let Some(f) = &finished {
            report.stats = f.stats.clone();
            report.error = f.result.as_ref().err().map(|e| e.to_string());
        }
        if let Some(e) = fatal {
            report.error = Some(report.error.map_or(e.clone(), |r| format!("{e}; {r}")));
        }
        report.ok = finished.as_ref().is_some_and(|f| f.result.is_ok()) && report.error.is_none();
        report.notices = lock(&self.notices).clone();
        report.install_anomalies = self.install_anomalies.load(Ordering::Relaxed);
        report.install_busy_ns = self.install_busy_ns.load(Ordering::Relaxed);
        report.preallocated = self.opts.preallocated.is_some();
        let summary = {
            let h = lock(&self.latency);
            let us = |ns: u64| ns as f64 / 1e3;
            if h.is_empty() {
                LatencySummary::default()
            } else {
                LatencySummary {
                    count: h.len(),
                    p50_us: us(h.value_at_quantile(0.5)),
                    p90_us: us(h.value_at_quantile(0.9)),
                    p99_us: us(h.value_at_quantile(0.99)),
                    max_us: us(h.max()),
                    mean_us: h.mean() / 1e3,
                }
            }
        };
        report.fault_latency = summary;
        let Some(m) = self.machine.get() else { return report };
        if !report.ok {
            report.digest = m.digests.fold();
            return report;
        }
        // The guest runs here now; let it run, then stop and check it.
        let stats = m.vm.devices().stats().clone();
        let t_done = report.end_ns;
        std::thread::sleep(self.opts.run_after);
        report.progress_during_pages_per_s = stats.pages_rate(report.resume_ns, t_done);
        report.progress_after_pages_per_s = stats.pages_rate(t_done, now().0);
        report.pages_installed = m.installed.count();
        if let Some(first) = m.installed.first_clear() {
            // Reading through the guest mapping would block on the hole:
            // no verification, no dump; the guest is paused (vCPUs blocked
            // on the hole stay kicked, and the stop abandons them).
            report.ok = false;
            report.error = Some(format!("page {first} was never installed"));
            if let Some(set) = lock(&self.set).as_ref() {
                set.pause_within(Duration::from_millis(100));
            }
            report.digest = m.digests.fold();
            return report;
        }
        let set_guard = lock(&self.set);
        let Some(set) = set_guard.as_ref() else {
            report.ok = false;
            report.error = Some("the migration completed but the vCPUs never started here".into());
            return report;
        };
        let states = set.pause().and_then(|_| set.save_states());
        report.digest = m.digests.fold();
        if m.desc.guest == GuestKind::Pattern {
            let check = states.map_err(|e| e.to_string()).and_then(|states| {
                let guest = TestGuest::new(&m.desc.ram, m.desc.vcpus).map_err(|e| e.to_string())?;
                let positions = states
                    .iter()
                    .enumerate()
                    .map(|(i, st)| guest.position_from_regs(i, &st.regs))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let v = guest.verify(&m.ram, &positions).map_err(|e| e.to_string())?;
                Ok(PatternCheck {
                    pages_checked: v.pages_checked,
                    bad_pages: v.bad_pages,
                    bad_reserved_bytes: v.bad_reserved_bytes,
                    guest_reported_errors: stats.error_count(),
                    first_bad: v
                        .first_bad
                        .iter()
                        .map(|b| {
                            format!(
                                "vcpu {} gpa {:#x}: expected {:#x}, found {:#x}",
                                b.vcpu, b.gpa, b.expected, b.found
                            )
                        })
                        .chain(stats.errors().iter().take(4).map(|e| {
                            format!("guest reported gpa {:#x}: expected {:#x}, found {:#x}", e.gpa, e.expected, e.found)
                        }))
                        .collect(),
                    passes_after: stats.snapshot().reports.iter().sum(),
                })
            });
            match check {
                Ok(c) => report.pattern = Some(c),
                Err(e) => {
                    report.ok = false;
                    report.error = Some(format!("cannot check the guest's memory: {e}"));
                }
            }
        }
        if let Some(path) = &self.opts.dump_memory {
            let dumped = std::fs::File::create(path)
                .map_err(|e| e.to_string())
                .and_then(|f| m.ram.dump(&mut std::io::BufWriter::new(f)).map_err(|e| e.to_string()));
            if let Err(e) = dumped {
                report.ok = false;
                report.error = Some(format!("cannot dump memory to {}: {e}", path.display()));
            }
        }
        report
    }
}
