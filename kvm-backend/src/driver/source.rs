//! The source side's driver. See the module docs of [`super`] for threads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Scope;
use std::time::Duration;

use bytes::Bytes;
use postcopy_core::{
    Channel, Config, DeferredPage, Finished, GuestMemory, Notice, PageNumber, Source, SourceAction, SourceState,
    SourceStats, Timestamp,
};

use super::digest::PageDigests;
use super::machine::{core_layout, MachineDescription, PageMap};
use super::net::{self, lock_spin, Conn};
use super::sync::Doorbell;
use super::{now, pin_self, set_policy, Boost, Tuning};
use crate::devices::lock;
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
/// How long a thread spins for the core lock before sleeping on it.
const LOCK_SPIN: Duration = Duration::from_micros(10);

/// How to run the source.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// The destination.
    pub connect: SocketAddr,
    /// The core's settings.
    pub config: Config,
    /// Thread placement and polling.
    pub tuning: Tuning,
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
}

/// The guest's RAM as the core reads it: every page read is hashed, so the
/// last copy sent of each page (its content at the stop) is on record.
struct SourceRam<'a> {
    ram: &'a GuestRam,
    map: PageMap,
    digests: PageDigests,
}

impl GuestMemory for SourceRam<'_> {
    fn read_page(&self, page: PageNumber, out: &mut [u8]) {
        let ok = self.map.page_ref(page).is_some_and(|r| self.ram.read_page(r, out).is_ok());
        if !ok {
            // The core only schedules pages of the layout it was given.
            tracing::error!(page = page.0, "cannot read a page the core asked for");
            out.fill(0);
        }
        self.digests.record(page.0, out);
    }

    /// Asked only for a page about to be sent: a zero page goes without
    /// payload and is never read, so its digest is recorded here.
    fn is_zero_page(&self, page: PageNumber, _page_size: usize) -> bool {
        // A page the core cannot place is sent (as zeros) by read_page, which reports it.
        let zero = self.map.page_ref(page).is_some_and(|r| self.ram.page_is_zero(r).unwrap_or(false));
        if zero {
            self.digests.record_zero(page.0);
        }
        zero
    }
}

/// Asks the core for frames on `channel`. While the guest may still run here
/// (precopy), pages are read under the core lock, so that the digest of a
/// page's last copy is recorded last; once it is stopped, contents no longer
/// change and the reads wait until the lock is released (`deferred`): the
/// fault path's threads then never wait for a bulk page being copied and hashed.
fn poll_frames(
    l: &mut Locked,
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

struct Locked {
    core: Source,
    conns: [Option<Arc<Conn>>; 3],
}

impl Locked {
    fn is_current(&self, conn: &Conn) -> bool {
        self.conns[conn.channel.index()].as_ref().is_some_and(|c| c.id == conn.id)
    }
}

/// What the driver does for the core, resolved while the core lock is held.
enum Op {
    Connect(Channel),
    Shutdown(Arc<Conn>),
    Farewell(Arc<Conn>, Bytes),
    Stop,
    Resume,
    SyncDirtyLog,
    Notice(Notice),
    Finished(Box<Finished<SourceStats>>),
}

fn drain(l: &mut Locked) -> Vec<Op> {
    let mut ops = Vec::new();
    while let Some(action) = l.core.poll_action() {
        ops.push(match action {
            SourceAction::Connect(channel) => Op::Connect(channel),
            SourceAction::Close(channel) => match l.conns[channel.index()].take() {
                Some(conn) => Op::Shutdown(conn),
                None => continue,
            },
            SourceAction::Farewell { channel, bytes } => match l.conns[channel.index()].take() {
                Some(conn) => Op::Farewell(conn, bytes),
                None => continue,
            },
            SourceAction::StopVcpus => Op::Stop,
            SourceAction::ResumeVcpus => Op::Resume,
            SourceAction::SyncDirtyLog => Op::SyncDirtyLog,
            SourceAction::Notice(notice) => Op::Notice(notice),
            SourceAction::Finished(finished) => Op::Finished(finished),
        });
    }
    ops
}

struct Driver<'a> {
    locked: Mutex<Locked>,
    write_locks: [Mutex<()>; 3],
    flush_wanted: [AtomicBool; 3],
    bulk_bell: Doorbell,
    done_bell: Doorbell,
    done: AtomicBool,
    finished: Mutex<Option<Finished<SourceStats>>>,
    guest: SourceRam<'a>,
    vm: &'a Vm,
    set: &'a VcpuSet,
    addr: SocketAddr,
    connect_timeout: Duration,
    write_timeout: Option<Duration>,
    tuning: Tuning,
    stop_ns: AtomicU64,
    stop_capture_ns: AtomicU64,
    pause_ns: AtomicU64,
    notices: Mutex<Vec<String>>,
}

/// Runs a migration of the running guest (`vm`, its vCPUs in `set`) to the
/// destination at `opts.connect`. Returns when the core finished: with the
/// guest on the destination, or (before the switchover) back on the source,
/// running.
pub fn run_source(
    vm: &Vm,
    set: &VcpuSet,
    machine: &MachineDescription,
    session: u64,
    opts: &SourceOptions,
) -> Result<SourceOutcome, String> {
    let ram = vm.ram();
    let layout = core_layout(ram.layout())?;
    let map = PageMap::new(ram.layout());
    let pages = map.total_pages();
    let mut core = Source::new(opts.config.clone(), layout, session);
    core.set_machine_description(Bytes::from(machine.to_bytes())).map_err(|e| e.to_string())?;
    if opts.config.mode.precopy_rounds() > 0 {
        vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
    }
    let driver = Driver {
        locked: Mutex::new(Locked { core, conns: [None, None, None] }),
        write_locks: [Mutex::new(()), Mutex::new(()), Mutex::new(())],
        flush_wanted: [AtomicBool::new(false), AtomicBool::new(false), AtomicBool::new(false)],
        bulk_bell: Doorbell::new(),
        done_bell: Doorbell::new(),
        done: AtomicBool::new(false),
        finished: Mutex::new(None),
        guest: SourceRam { ram, map, digests: PageDigests::new(pages, PAGE_SIZE as usize) },
        vm,
        set,
        addr: opts.connect,
        connect_timeout: opts.config.handshake_timeout,
        write_timeout: opts.config.peer_timeout,
        tuning: opts.tuning.clone(),
        stop_ns: AtomicU64::new(0),
        stop_capture_ns: AtomicU64::new(0),
        pause_ns: AtomicU64::new(0),
        notices: Mutex::new(Vec::new()),
    };
    let start_ns = now().0;
    std::thread::scope(|s| {
        let d = &driver;
        spawn(s, "src-bulk", move || d.bulk_loop(s));
        spawn(s, "src-timer", move || d.timer_loop(s));
        d.event(s, |l, now| {
            if let Err(e) = l.core.handle_start(now) {
                tracing::error!(%e, "start");
            }
        });
        while !d.done.load(Ordering::SeqCst) {
            d.done_bell.wait_timeout(Duration::from_millis(100));
        }
        // Unblock every reader and writer still attached to a connection.
        let conns: Vec<Arc<Conn>> = lock(&d.locked).conns.iter_mut().filter_map(Option::take).collect();
        for conn in conns {
            conn.shutdown();
        }
        d.bulk_bell.ring();
    });
    if opts.config.mode.precopy_rounds() > 0 {
        let _ = vm.set_dirty_logging(false);
    }
    let finished = lock(&driver.finished).take().ok_or("the source ended without a verdict")?;
    Ok(SourceOutcome {
        finished,
        start_ns,
        stop_ns: driver.stop_ns.load(Ordering::SeqCst),
        end_ns: now().0,
        stop_capture_us: driver.stop_capture_ns.load(Ordering::SeqCst) as f64 / 1e3,
        pause_us: driver.pause_ns.load(Ordering::SeqCst) as f64 / 1e3,
        digests: driver.guest.digests,
        notices: driver.notices.into_inner().unwrap_or_else(|e| e.into_inner()),
    })
}

fn spawn<'s, 'e, F: FnOnce() + Send + 's>(s: &'s Scope<'s, 'e>, name: &str, f: F) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn_scoped(s, f) {
        tracing::error!(%e, name, "cannot spawn a driver thread");
    }
}

impl<'a> Driver<'a> {
    /// One event: runs `f` on the core under the lock, then carries out what
    /// it asked for.
    fn event<'s>(&'s self, s: &'s Scope<'s, '_>, f: impl FnOnce(&mut Locked, Timestamp)) {
        let ops = {
            let mut l = lock_spin(&self.locked, LOCK_SPIN);
            f(&mut l, now());
            drain(&mut l)
        };
        self.execute(s, ops);
    }

    fn execute<'s>(&'s self, s: &'s Scope<'s, '_>, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Connect(channel) => spawn(s, "src-connect", move || self.connect(s, channel)),
                Op::Shutdown(conn) => conn.shutdown(),
                Op::Farewell(conn, bytes) => spawn(s, "src-farewell", move || {
                    set_policy(None, "src-farewell");
                    let _w = lock(&self.write_locks[conn.channel.index()]);
                    let _ = conn.stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = conn.write_all(&bytes);
                    conn.shutdown();
                }),
                Op::Stop => self.stop_vcpus(s),
                Op::Resume => {
                    tracing::info!("the guest resumes on the source");
                    self.set.resume();
                }
                Op::SyncDirtyLog => self.sync_dirty_log(s),
                Op::Notice(notice) => {
                    let text = notice_text(&notice);
                    tracing::warn!("{text}");
                    eprintln!("source: {text}");
                    lock(&self.notices).push(text);
                }
                Op::Finished(finished) => {
                    *lock(&self.finished) = Some(*finished);
                    self.done.store(true, Ordering::SeqCst);
                    self.done_bell.ring();
                    self.bulk_bell.ring();
                }
            }
        }
        self.flush_urgent(s);
        self.bulk_bell.ring();
    }

    fn stop_vcpus<'s>(&'s self, s: &'s Scope<'s, '_>) {
        let t0 = now().0;
        self.stop_ns.store(t0, Ordering::SeqCst);
        let rt = self.tuning.rt_switchover;
        // The stopping thread (the return path's reader in pure postcopy,
        // the bulk writer after the last precopy round) runs in real time
        // from here to the switchover; its own boost logic lowers it after.
        set_policy(rt, "src-stop");
        // Kick first; then the vCPU threads, which must run to park and to
        // save their state, get a real-time priority just below this
        // thread's, so that they do it at once however busy the CPUs are;
        // back to normal after (they run the guest again only after a failed
        // migration).
        let first = self.set.pause_within(Duration::ZERO);
        let tids = self.set.thread_ids();
        if let Some(p) = rt {
            for &tid in &tids {
                let _ = crate::sys::set_realtime(tid, Some((p - 1).max(1)));
            }
        }
        let parked = first.all_parked() || self.set.wait_paused(crate::runner::CONTROL_TIMEOUT);
        self.pause_ns.store(now().0.saturating_sub(t0), Ordering::SeqCst);
        // Each parked vCPU thread saves its own state: still boosted.
        let captured = if parked {
            DeviceState::capture(self.vm, self.set).and_then(|state| state.to_bytes())
        } else {
            Err(crate::Error::Vcpu { vcpu: 0, reason: "a vCPU did not stop in time".into() })
        };
        for &tid in &tids {
            let _ = crate::sys::set_realtime(tid, None);
        }
        self.stop_capture_ns.store(now().0.saturating_sub(t0), Ordering::SeqCst);
        match captured {
            Ok(bytes) => self.event(s, |l, now| {
                if let Err(e) = l.core.handle_vcpus_stopped(now, Bytes::from(bytes)) {
                    tracing::error!(%e, "vcpus stopped");
                }
            }),
            Err(e) => {
                eprintln!("source: cannot stop the guest and capture its state: {e}");
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
                    if let Err(e) = l.core.handle_dirty_bitmap(now, start, dirty.block_words(block)) {
                        tracing::error!(%e, "dirty bitmap");
                    }
                }
                if let Err(e) = l.core.handle_dirty_sync_complete(now) {
                    tracing::error!(%e, "dirty sync complete");
                }
            }),
            Err(e) => {
                eprintln!("source: cannot read the dirty log: {e}");
                self.event(s, |l, now| {
                    let _ = l.core.handle_cancel(now);
                });
            }
        }
    }

    fn connect<'s>(&'s self, s: &'s Scope<'s, '_>, channel: Channel) {
        set_policy(None, "src-connect");
        match net::connect(self.addr, channel, self.connect_timeout, &self.tuning) {
            Ok(conn) => {
                let _ = conn.stream.set_write_timeout(self.write_timeout);
                let conn = Arc::new(conn);
                let c2 = conn.clone();
                self.event(s, move |l, now| {
                    let old = l.conns[channel.index()].replace(c2);
                    if let Some(old) = old {
                        old.shutdown();
                    }
                    l.core.handle_connected(now, channel);
                });
                spawn(s, "src-reader", move || self.read_loop(s, conn));
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(%e, %channel, "connect refused");
                self.event(s, |l, now| l.core.handle_connect_refused(now, channel));
            }
            Err(e) => {
                tracing::info!(%e, %channel, "connect failed");
                self.event(s, |l, now| l.core.handle_connect_failed(now, channel));
            }
        }
    }

    fn read_loop<'s>(&'s self, s: &'s Scope<'s, '_>, conn: Arc<Conn>) {
        let fast = conn.channel == Channel::Return;
        let base = if fast { self.tuning.rt_priority } else { None };
        if fast {
            super::latency_thread(&self.tuning, "src-return");
        } else {
            set_policy(None, "src-reader");
        }
        // The return path's reader stops the guest (on the welcome) and
        // queues StartGuest (on ReadyToRun): boosted until the guest started.
        let before_start = |state: SourceState| fast && !state.after_start() && !state.is_terminal();
        let mut boost = Boost::default();
        let mut state = lock(&self.locked).core.state();
        boost.set(base, self.tuning.rt_switchover, before_start(state), "src-return");
        let spin = if fast { self.tuning.spin() } else { Duration::ZERO };
        let on_bytes = |bytes| {
            let mut current = false;
            self.event(s, |l, now| {
                if l.is_current(&conn) {
                    current = true;
                    l.core.handle_input(now, conn.channel, bytes);
                    state = l.core.state();
                }
            });
            if current {
                boost.set(base, self.tuning.rt_switchover, before_start(state), "src-return");
            }
            current
        };
        let on_closed = || {
            self.event(s, |l, now| {
                if l.is_current(&conn) {
                    l.conns[conn.channel.index()] = None;
                    l.core.handle_connection_lost(now, conn.channel);
                }
            })
        };
        net::read_until_closed(&conn, READ_BYTES, spin, on_bytes, on_closed);
    }

    /// Writes what the core has for the urgent channel. Re-entrant and
    /// never blocks on another writer: one that holds the channel writes our
    /// frames too (`flush_wanted`).
    fn flush_urgent<'s>(&'s self, s: &'s Scope<'s, '_>) {
        let ch = Channel::Urgent.index();
        self.flush_wanted[ch].store(true, Ordering::SeqCst);
        loop {
            let Ok(guard) = self.write_locks[ch].try_lock() else { return };
            let mut buf = Vec::new();
            let mut deferred = Vec::new();
            while self.flush_wanted[ch].swap(false, Ordering::SeqCst) {
                loop {
                    buf.clear();
                    deferred.clear();
                    let (conn, ops) = {
                        let mut l = lock_spin(&self.locked, LOCK_SPIN);
                        let conn = l.conns[ch].clone();
                        if conn.is_some() {
                            poll_frames(&mut l, Channel::Urgent, &mut buf, BULK_STEP_BYTES, &self.guest, &mut deferred);
                        }
                        (conn, drain(&mut l))
                    };
                    DeferredPage::fill_all(&deferred, &mut buf, PAGE_SIZE as usize, &self.guest);
                    if !ops.is_empty() {
                        self.flush_wanted[ch].store(true, Ordering::SeqCst);
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
            if !self.flush_wanted[ch].load(Ordering::SeqCst) {
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

    fn bulk_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        pin_self(self.tuning.bulk_cpu, "src-bulk");
        set_policy(None, "src-bulk");
        let mut boost = Boost::default();
        let ch = Channel::Main.index();
        let mut buf: Vec<u8> = Vec::with_capacity(BULK_WRITE_BYTES + BULK_STEP_BYTES + 2 * PAGE_SIZE as usize);
        let mut deferred = Vec::new();
        while !self.done.load(Ordering::SeqCst) {
            let guard = lock(&self.write_locks[ch]);
            buf.clear();
            let mut conn: Option<Arc<Conn>> = None;
            while buf.len() < BULK_WRITE_BYTES {
                let before = buf.len();
                let (changed, ops, state) = {
                    let mut l = lock_spin(&self.locked, LOCK_SPIN);
                    let state = l.core.state();
                    let current = l.conns[ch].clone();
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
                            poll_frames(&mut l, Channel::Main, &mut buf, max, &self.guest, &mut deferred);
                        }
                    }
                    (changed, drain(&mut l), state)
                };
                DeferredPage::fill_all(&deferred, &mut buf, PAGE_SIZE as usize, &self.guest);
                deferred.clear();
                // Ready for the switchover (idle until the stop, then the
                // device state): wake at once when it comes.
                let switchover = matches!(
                    state,
                    SourceState::Handshake | SourceState::Stopping | SourceState::FinalSync | SourceState::Switchover
                );
                boost.set_nice(self.tuning.rt_switchover, switchover, self.tuning.bulk_nice, "src-bulk");
                if !ops.is_empty() {
                    self.execute(s, ops);
                }
                if changed || conn.is_none() || buf.len() == before {
                    break;
                }
            }
            if buf.is_empty() {
                drop(guard);
                self.bulk_bell.wait_timeout(Duration::from_millis(20));
                continue;
            }
            if let Some(conn) = conn {
                if conn.write_all(&buf).is_err() {
                    drop(guard);
                    self.lost(s, &conn);
                }
            }
        }
    }

    fn timer_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        set_policy(None, "src-timer");
        // It takes the core lock too: boosted with the switchover's threads,
        // it is never preempted while holding it (priority inversion).
        let mut boost = Boost::default();
        while !self.done.load(Ordering::SeqCst) {
            let (deadline, state) = {
                let l = lock(&self.locked);
                (l.core.poll_timeout(), l.core.state())
            };
            boost.set(None, self.tuning.rt_switchover, !state.after_start() && !state.is_terminal(), "src-timer");
            let t = now();
            match deadline {
                Some(d) if d <= t => self.event(s, |l, now| l.core.handle_timeout(now)),
                Some(d) => std::thread::sleep(d.saturating_since(t).min(Duration::from_millis(10))),
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

/// A notice in words.
pub(crate) fn notice_text(notice: &Notice) -> String {
    match notice {
        Notice::Paused { reason } => format!("paused: {reason}"),
        Notice::RecoveryAttempt { attempt } => format!("recovery attempt {attempt}"),
        Notice::Withdrawing { reason } => {
            format!("the guest runs here again ({reason}); telling the destination to drop its copy")
        }
        Notice::RecoveryFailed { attempt, reason } => format!("recovery attempt {attempt} failed: {reason}"),
        Notice::Recovered { epoch } => format!("recovered (epoch {epoch})"),
        Notice::ConnectionRefused { channel, error } => format!("refused a {channel} connection: {error}"),
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
