//! vCPU threads: one per vCPU, started, paused, resumed and stopped together
//! ([`VcpuSet`]), with the exit handling (port I/O, HLT, shutdown).
//!
//! # Pausing
//! To pause, the controller sets the vCPU's `pause` flag, sets
//! `kvm_run.immediate_exit` through its own mapping of the `kvm_run` page and
//! sends the thread a real-time signal (whose handler does nothing). Whatever
//! the thread is doing, it ends up in `KVM_RUN` returning `EINTR`:
//! - in the guest: the signal forces an exit;
//! - in the VMM, handling an exit: its next `KVM_RUN` first completes the
//!   pending I/O (so the saved state is consistent, as KVM's API requires)
//!   and then returns at once because of `immediate_exit`;
//! - blocked in the kernel in an interruptible wait (in-kernel HLT): the
//!   signal wakes it.
//!
//! The thread then parks on a condition variable and reports `Paused`; while
//! parked it can save its state on request; on resume it clears
//! `immediate_exit` and re-enters the guest.
//!
//! # vCPUs waiting for a missing page
//! A vCPU blocked in a userfault (its page is not there yet) cannot be
//! interrupted: on this kernel the wait does not end on a signal, whether
//! the guest or KVM itself (walking guest page tables) touched the page. It
//! runs no guest code meanwhile, and parks as soon as its page arrives (it
//! stays kicked). [`VcpuSet::pause_within`] reports such vCPUs instead of
//! failing; to abandon a guest whose pages will never come, kick the vCPUs
//! and then unregister its RAM ([`VcpuSet::abandon`]) before [`VcpuSet::stop`].

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::{lock, Devices, GuestErrorReport, PioOutcome};
use crate::error::{Error, Result};
use crate::sys::KvmRunMapping;
use crate::uffd::UffdRam;
use crate::vcpu::{Vcpu, VcpuState};

/// Offset from SIGRTMIN of the signal that kicks vCPU threads.
const KICK_SIGNAL_OFFSET: i32 = 2;
/// How long a pause, a save or a stop may take before it is an error.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a vCPU thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// Spawned, not yet in the guest.
    Starting,
    /// In (or about to enter) `KVM_RUN`.
    Running,
    /// Parked on request; its state is consistent and may be saved.
    Paused,
    /// The guest executed HLT (only without an in-kernel irqchip); parked.
    Halted,
    /// The guest triple-faulted or asked for a reset; parked.
    Shutdown,
    /// A KVM error or an exit the VMM cannot handle; parked.
    Failed(String),
    /// The thread has ended.
    Exited,
}

impl RunState {
    /// Whether the thread is parked (not running guest code).
    pub fn is_parked(&self) -> bool {
        matches!(self, Self::Paused | Self::Halted | Self::Shutdown | Self::Failed(_) | Self::Exited)
    }
}

#[derive(Debug)]
struct Ctrl {
    state: RunState,
    /// Bumped by every resume; a parked thread runs again when it changes.
    resume_gen: u64,
    exit: bool,
    save_requested: bool,
    saved: Option<Result<VcpuState>>,
    /// A state to load while parked (a takeover restarts the guest from a
    /// checkpoint's state), and the result.
    restore_requested: Option<Box<VcpuState>>,
    restored: Option<Result<()>>,
}

#[derive(Debug)]
struct Shared {
    index: usize,
    pause: AtomicBool,
    kick: KvmRunMapping,
    tid: AtomicI32,
    ctrl: Mutex<Ctrl>,
    cv: Condvar,
}

impl Shared {
    fn set_state(&self, state: RunState) {
        let mut c = lock(&self.ctrl);
        c.state = state;
        self.cv.notify_all();
    }
}

/// Threads running a VM's vCPUs.
#[derive(Debug)]
pub struct VcpuSet {
    shared: Vec<Arc<Shared>>,
    threads: Vec<Option<JoinHandle<Vcpu>>>,
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

fn install_kick_handler() -> Result<()> {
    static INSTALLED: std::sync::OnceLock<std::result::Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(|errno| Error::Os { op: "sigaction", source: std::io::Error::from_raw_os_error(errno) })
}

impl VcpuSet {
    /// Spawns one thread per vCPU (named `vcpu<N>`); they enter the guest at
    /// once. The vCPUs must be fully set up (registers, or restored state).
    ///
    /// If one cannot be started, those already started are stopped and
    /// joined before the error returns: no vCPU thread outlives a failed
    /// start.
    pub fn start(vcpus: Vec<Vcpu>, devices: Arc<Devices>) -> Result<Self> {
        install_kick_handler()?;
        // Built up as threads start: an early return drops it, and its
        // `Drop` stops and joins the threads started so far.
        let mut set = Self { shared: Vec::with_capacity(vcpus.len()), threads: Vec::with_capacity(vcpus.len()) };
        for vcpu in vcpus {
            let index = vcpu.index();
            #[cfg(test)]
            if tests::FAIL_START_OF.get() == Some(index) {
                return Err(Error::Vcpu { vcpu: index, reason: "test-only start failure".into() });
            }
            let kick = KvmRunMapping::new(&vcpu.fd).map_err(crate::error::os_err("mmap kvm_run"))?;
            kick.set_immediate_exit(false);
            let s = Arc::new(Shared {
                index,
                pause: AtomicBool::new(false),
                kick,
                tid: AtomicI32::new(0),
                ctrl: Mutex::new(Ctrl {
                    state: RunState::Starting,
                    resume_gen: 0,
                    exit: false,
                    save_requested: false,
                    saved: None,
                    restore_requested: None,
                    restored: None,
                }),
                cv: Condvar::new(),
            });
            let (s2, d2) = (s.clone(), devices.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(vcpu, s2, d2))
                .map_err(crate::error::os_err("spawn vCPU thread"))?;
            set.shared.push(s);
            set.threads.push(Some(handle));
        }
        // Wait until every thread has published its tid.
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        for s in &set.shared {
            let mut c = lock(&s.ctrl);
            while c.state == RunState::Starting {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::Vcpu { vcpu: s.index, reason: "did not start".into() });
                }
                c = s.cv.wait_timeout(c, left).map(|r| r.0).unwrap_or_else(|e| e.into_inner().0);
            }
        }
        Ok(set)
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty()
    }

    /// Kernel thread ids of the vCPU threads (index = vCPU), to map
    /// userfaultfd events to vCPUs.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.shared.iter().map(|s| s.tid.load(Ordering::SeqCst)).collect()
    }

    /// The state of each vCPU thread.
    pub fn states(&self) -> Vec<RunState> {
        self.shared.iter().map(|s| lock(&s.ctrl).state.clone()).collect()
    }

    fn kick(&self, i: usize) {
        let s = &self.shared[i];
        s.pause.store(true, Ordering::SeqCst);
        s.kick.set_immediate_exit(true);
        if let Some(Some(t)) = self.threads.get(i) {
            if let Err(e) = t.kill(kick_signal()) {
                tracing::debug!(vcpu = i, %e, "kick signal not delivered");
            }
        }
    }

    /// A handle that waits for these vCPUs to park without borrowing the
    /// set: a caller can wait with the lock that guards the set released.
    pub fn park_watch(&self) -> ParkWatch {
        ParkWatch { shared: self.shared.clone() }
    }

    /// Pauses every vCPU and waits until all are parked; returns how long
    /// that took (the stop latency). Fails if one does not park within
    /// [`CONTROL_TIMEOUT`] (e.g. it waits for a page that does not come; it
    /// stays kicked and parks when the page arrives).
    pub fn pause(&self) -> Result<Duration> {
        let r = self.pause_within(CONTROL_TIMEOUT);
        match r.parked.iter().position(|p| !p) {
            None => Ok(r.latency),
            Some(vcpu) => Err(Error::Vcpu { vcpu, reason: format!("did not stop within {CONTROL_TIMEOUT:?}") }),
        }
    }

    /// Kicks every vCPU and waits up to `timeout` for them to park. vCPUs
    /// that did not (blocked on a missing page) run no guest code and park
    /// when their page arrives; [`VcpuSet::wait_paused`] waits for them.
    pub fn pause_within(&self, timeout: Duration) -> PauseReport {
        let t0 = Instant::now();
        for i in 0..self.shared.len() {
            self.kick(i);
        }
        let parked = wait_parked(&self.shared, t0 + timeout);
        PauseReport { latency: t0.elapsed(), parked }
    }

    /// After a pause, waits up to `timeout` for the vCPUs still running to
    /// park; returns whether all are parked.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        wait_parked(&self.shared, Instant::now() + timeout).iter().all(|&p| p)
    }

    /// Resumes every parked vCPU (paused, halted or shut down ones alike).
    pub fn resume(&self) {
        for s in &self.shared {
            let mut c = lock(&s.ctrl);
            s.pause.store(false, Ordering::SeqCst);
            c.resume_gen += 1;
            s.cv.notify_all();
        }
    }

    /// Saves the state of every vCPU; they must be parked.
    pub fn save_states(&self) -> Result<Vec<VcpuState>> {
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        for s in &self.shared {
            let mut c = lock(&s.ctrl);
            if !c.state.is_parked() || c.state == RunState::Exited {
                return Err(Error::Vcpu { vcpu: s.index, reason: format!("cannot save state while {:?}", c.state) });
            }
            c.saved = None;
            c.save_requested = true;
            s.cv.notify_all();
        }
        let mut out = Vec::with_capacity(self.shared.len());
        for s in &self.shared {
            let mut c = lock(&s.ctrl);
            loop {
                if let Some(r) = c.saved.take() {
                    out.push(r?);
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || c.state == RunState::Exited {
                    return Err(Error::Vcpu { vcpu: s.index, reason: "state not saved in time".into() });
                }
                c = s.cv.wait_timeout(c, left).map(|r| r.0).unwrap_or_else(|e| e.into_inner().0);
            }
        }
        Ok(out)
    }

    /// Loads `states` (by vCPU index) into the parked vCPUs, each on its own
    /// thread; they stay parked until [`VcpuSet::resume`]. A fallback's
    /// takeover restarts the guest this way from a checkpoint's state.
    pub fn restore_states(&self, states: &[VcpuState]) -> Result<()> {
        if states.len() != self.shared.len() {
            return Err(Error::State(format!("{} saved vCPUs for {} vCPUs", states.len(), self.shared.len())));
        }
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        for (s, state) in self.shared.iter().zip(states) {
            let mut c = lock(&s.ctrl);
            if !c.state.is_parked() || c.state == RunState::Exited {
                return Err(Error::Vcpu { vcpu: s.index, reason: format!("cannot load state while {:?}", c.state) });
            }
            c.restored = None;
            c.restore_requested = Some(Box::new(state.clone()));
            s.cv.notify_all();
        }
        for s in &self.shared {
            let mut c = lock(&s.ctrl);
            loop {
                if let Some(r) = c.restored.take() {
                    r?;
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || c.state == RunState::Exited {
                    return Err(Error::Vcpu { vcpu: s.index, reason: "state not loaded in time".into() });
                }
                c = s.cv.wait_timeout(c, left).map(|r| r.0).unwrap_or_else(|e| e.into_inner().0);
            }
        }
        Ok(())
    }

    /// Abandons a guest whose pages will not come, so that its threads can
    /// be stopped: kicks every vCPU first, then unregisters `ram` from
    /// userfaultfd, which wakes the vCPUs blocked on a missing page. Kicked
    /// first, a woken vCPU parks before it runs another guest instruction;
    /// in the other order it would run the guest on zero pages until its
    /// kick arrived. The vCPUs are left paused; [`VcpuSet::stop`] ends them.
    pub fn abandon(&self, ram: &UffdRam) -> Result<()> {
        self.pause_within(Duration::ZERO);
        Ok(ram.unregister_all()?)
    }

    /// Stops every thread and returns the vCPUs (for inspection or reuse).
    /// Waits at most [`CONTROL_TIMEOUT`]; a thread still blocked on a missing
    /// page then is left behind (detached) and reported as an error.
    pub fn stop(mut self) -> Result<Vec<Vcpu>> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<Vec<Vcpu>> {
        for (i, s) in self.shared.iter().enumerate() {
            lock(&s.ctrl).exit = true;
            s.cv.notify_all();
            self.kick(i);
        }
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let mut out = Vec::new();
        let mut stuck = None;
        for (i, s) in self.shared.iter().enumerate() {
            let mut c = lock(&s.ctrl);
            while c.state != RunState::Exited {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                c = s.cv.wait_timeout(c, left).map(|r| r.0).unwrap_or_else(|e| e.into_inner().0);
            }
            let exited = c.state == RunState::Exited;
            drop(c);
            let handle = self.threads.get_mut(i).and_then(Option::take);
            match (exited, handle) {
                (true, Some(t)) => {
                    out.push(t.join().map_err(|_| Error::Vcpu { vcpu: i, reason: "thread panicked".into() })?)
                }
                (false, Some(_)) => stuck = Some(i),
                (_, None) => {}
            }
        }
        match stuck {
            Some(vcpu) => Err(Error::Vcpu { vcpu, reason: "thread did not exit (blocked on a missing page?)".into() }),
            None => Ok(out),
        }
    }
}

/// Waits for vCPUs to park (see [`VcpuSet::park_watch`]).
#[derive(Debug, Clone)]
pub struct ParkWatch {
    shared: Vec<Arc<Shared>>,
}

impl ParkWatch {
    /// Waits up to `timeout` for every vCPU to park; whether all did.
    pub fn wait(&self, timeout: Duration) -> bool {
        wait_parked(&self.shared, Instant::now() + timeout).iter().all(|&p| p)
    }
}

/// Per vCPU, whether it parked by `deadline`.
fn wait_parked(shared: &[Arc<Shared>], deadline: Instant) -> Vec<bool> {
    shared
        .iter()
        .map(|s| {
            let mut c = lock(&s.ctrl);
            while !c.state.is_parked() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                c = s.cv.wait_timeout(c, left).map(|r| r.0).unwrap_or_else(|e| e.into_inner().0);
            }
            true
        })
        .collect()
}

/// Result of [`VcpuSet::pause_within`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseReport {
    /// Time from the first kick until all parked, or until the timeout.
    pub latency: Duration,
    /// Per vCPU, whether it parked.
    pub parked: Vec<bool>,
}

impl PauseReport {
    /// Whether every vCPU parked.
    pub fn all_parked(&self) -> bool {
        self.parked.iter().all(|&p| p)
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        if self.threads.iter().any(Option::is_some) {
            if let Err(e) = self.shutdown() {
                tracing::error!(%e, "stopping vCPU threads");
            }
        }
    }
}

/// Why the run loop parks.
enum Park {
    Paused,
    Halted,
    Shutdown,
    Failed(String),
}

fn vcpu_thread(mut vcpu: Vcpu, s: Arc<Shared>, devices: Arc<Devices>) -> Vcpu {
    s.tid.store(crate::sys::current_tid(), Ordering::SeqCst);
    let index = s.index;
    {
        let mut c = lock(&s.ctrl);
        if c.state == RunState::Starting {
            c.state = RunState::Running;
        }
        s.cv.notify_all();
    }
    // A thread inherits its creator's scheduling policy (a migration driver
    // may start vCPUs from a real-time thread, so that starting them is not
    // delayed): a guest never runs in real time, it would starve the VMM's
    // own threads. Done after reporting in, which the starter waits for.
    if let Err(e) = crate::sys::set_realtime(0, None) {
        tracing::debug!(%e, "vCPU thread keeps its inherited policy");
    }
    loop {
        let park = match vcpu.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => match devices.pio_write(index, port, data) {
                    PioOutcome::Done => None,
                    outcome @ (PioOutcome::GuestError | PioOutcome::CounterError) => {
                        match vcpu.regs() {
                            Ok(r) => {
                                // A bad page is at rdi, the counter word at rsp - 8.
                                let gpa = if outcome == PioOutcome::GuestError { r.rdi } else { r.rsp.wrapping_sub(8) };
                                devices.stats().record_error(GuestErrorReport {
                                    vcpu: index,
                                    gpa,
                                    expected: r.rdx,
                                    found: r.rax,
                                })
                            }
                            Err(e) => tracing::error!(vcpu = index, %e, "reading registers"),
                        }
                        None
                    }
                    PioOutcome::ResetRequested => Some(Park::Shutdown),
                },
                VcpuExit::IoIn(port, data) => {
                    devices.pio_read(index, port, data);
                    None
                }
                VcpuExit::MmioRead(_, data) => {
                    data.fill(0xff);
                    None
                }
                VcpuExit::MmioWrite(..) => None,
                VcpuExit::Hlt => Some(Park::Halted),
                VcpuExit::Shutdown => Some(Park::Shutdown),
                other => Some(Park::Failed(format!("unhandled exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if s.pause.load(Ordering::SeqCst) {
                    Some(Park::Paused)
                } else {
                    // Kicked, then resumed before parking: clear the kick,
                    // then look again, so that a pause requested meanwhile
                    // (flag first, kick second) is never lost.
                    s.kick.set_immediate_exit(false);
                    if s.pause.load(Ordering::SeqCst) {
                        s.kick.set_immediate_exit(true);
                    }
                    None
                }
            }
            Err(e) => Some(Park::Failed(format!("KVM_RUN: {e}"))),
        };
        if let Some(reason) = park {
            if !park_thread(&vcpu, &s, reason) {
                break;
            }
        }
    }
    s.set_state(RunState::Exited);
    vcpu
}

/// Parks until resumed (returns true) or told to exit (false), saving state
/// on request meanwhile.
fn park_thread(vcpu: &Vcpu, s: &Shared, reason: Park) -> bool {
    let mut c = lock(&s.ctrl);
    c.state = match reason {
        Park::Paused => RunState::Paused,
        Park::Halted => RunState::Halted,
        Park::Shutdown => RunState::Shutdown,
        Park::Failed(msg) => {
            tracing::error!(vcpu = s.index, msg, "vCPU failed");
            RunState::Failed(msg)
        }
    };
    let gen = c.resume_gen;
    s.cv.notify_all();
    loop {
        if c.exit {
            return false;
        }
        if c.save_requested {
            c.save_requested = false;
            c.saved = Some(vcpu.save_state());
            s.cv.notify_all();
            continue;
        }
        if let Some(state) = c.restore_requested.take() {
            c.restored = Some(vcpu.restore_state(&state));
            s.cv.notify_all();
            continue;
        }
        if c.resume_gen != gen && !s.pause.load(Ordering::SeqCst) {
            s.kick.set_immediate_exit(false);
            c.state = RunState::Running;
            s.cv.notify_all();
            return true;
        }
        c = s.cv.wait(c).unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::layout::{MemoryMap, MIB};
    use crate::memory::GuestRam;
    use crate::vm::{kvm_available, Vm, VmConfig};

    thread_local! {
        /// Test-only: [`VcpuSet::start`] on this thread fails at this vCPU.
        pub(super) static FAIL_START_OF: Cell<Option<usize>> = const { Cell::new(None) };
    }

    /// A start that fails at the third vCPU stops and joins the two it had
    /// started: none still runs, none holds the devices.
    #[test]
    fn a_failed_start_leaves_no_vcpu_thread_behind() {
        if !kvm_available() {
            assert!(std::env::var_os("POSTCOPY_REQUIRE_KVM").is_none(), "KVM required but unavailable");
            eprintln!("SKIPPED: no KVM");
            return;
        }
        let ram = Arc::new(GuestRam::new(MemoryMap::pc(2 * MIB).expect("layout")).expect("ram"));
        let vm = Vm::new(ram, VmConfig::new(3)).expect("vm");
        let vcpus = vm.create_vcpus().expect("vcpus");
        let devices = vm.devices().clone();
        let held_before = Arc::strong_count(&devices);
        FAIL_START_OF.set(Some(2));
        let started = VcpuSet::start(vcpus, devices.clone());
        FAIL_START_OF.set(None);
        assert!(matches!(started, Err(Error::Vcpu { vcpu: 2, .. })), "{started:?}");
        assert_eq!(Arc::strong_count(&devices), held_before, "vCPU threads still hold the devices");
    }
}
