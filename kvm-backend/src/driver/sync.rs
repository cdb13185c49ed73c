//! The small structures that the driver's threads share outside the core's
//! lock, each checked with `loom` (with [`crate::page_bits`]:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p
//! postcopy-kvm --release --locked --lib -- page_bits driver::sync`):
//!
//! - [`PageBits`] (defined in [`crate::page_bits`], checked there): one bit
//!   per page (pages installed on the destination), set and cleared by
//!   installer threads, read by the progress bar and the end-of-run checks.
//! - [`FaultClock`]: per page, when the first fault on it was read; the
//!   thread that installs the page takes the start time exactly once.
//! - [`Doorbell`]: "there is work" from any thread to one sleeping worker,
//!   without lost wake-ups and without a system call when the worker is awake.
//! - [`InstallsInFlight`]: installs the destination's core handed out and
//!   the driver has not carried out; the end of copy waits for them (the
//!   loom model checks that protocol with the core lock around it).
//! - [`PartsInFlight`]: per page, the parts the destination's core handed
//!   out to be placed and not placed yet; the page is mapped only once
//!   none is left (another reader thread may still be copying one in).

pub use crate::page_bits::PageBits;

#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
use loom::sync::{Condvar, Mutex};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex};

/// Per page, the time (ns, never 0) its first outstanding fault was read.
#[derive(Debug)]
pub struct FaultClock {
    starts: Box<[AtomicU64]>,
}

impl FaultClock {
    /// Clocks for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self { starts: (0..pages).map(|_| AtomicU64::new(0)).collect() }
    }

    /// A fault on `page` was read at `now_ns`; a later fault on the same page
    /// keeps the first start. Returns whether this one started the clock.
    pub fn start(&self, page: u64, now_ns: u64) -> bool {
        self.starts
            .get(page as usize)
            .is_some_and(|s| s.compare_exchange(0, now_ns.max(1), Ordering::AcqRel, Ordering::Acquire).is_ok())
    }

    /// `page` was installed at `now_ns`: the wait of its fault, if one was
    /// started (and not yet taken by another installer).
    pub fn finish(&self, page: u64, now_ns: u64) -> Option<u64> {
        let start = self.starts.get(page as usize)?.swap(0, Ordering::AcqRel);
        (start != 0).then(|| now_ns.saturating_sub(start))
    }
}

/// "Work is waiting": rung by any thread, waited on by one worker.
///
/// One atomic word holds the state (idle, pending, worker asleep), changed
/// only by read-modify-write operations: a ring swaps in "pending" and,
/// seeing "asleep", takes the lock to wake the worker; the worker sets
/// "asleep" only while it holds that lock, right before it waits.
#[derive(Debug)]
pub struct Doorbell {
    state: AtomicU64,
    lock: Mutex<()>,
    cv: Condvar,
}

const IDLE: u64 = 0;
const PENDING: u64 = 1;
const ASLEEP: u64 = 2;

impl Default for Doorbell {
    fn default() -> Self {
        Self::new()
    }
}

impl Doorbell {
    /// A doorbell that has not rung.
    pub fn new() -> Self {
        Self { state: AtomicU64::new(IDLE), lock: Mutex::new(()), cv: Condvar::new() }
    }

    /// Rings: the worker's current or next wait returns. No system call when
    /// the worker is not asleep.
    pub fn ring(&self) {
        if self.state.swap(PENDING, Ordering::AcqRel) == ASLEEP {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
    }

    /// Takes a ring without waiting; returns whether there was one.
    pub fn take(&self) -> bool {
        self.state.compare_exchange(PENDING, IDLE, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// Waits for a ring (consumed) at most `timeout`; returns whether it
    /// rang. A ring that came before the wait counts.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> bool {
        if self.take() {
            return true;
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match self.state.compare_exchange(IDLE, ASLEEP, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) | Err(ASLEEP) => {}
                Err(_) => return self.take(),
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                // Withdraw; a ring that came meanwhile is taken.
                return match self.state.compare_exchange(ASLEEP, IDLE, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => false,
                    Err(_) => self.take(),
                };
            }
            guard = self.cv.wait_timeout(guard, left).map(|r| r.0).unwrap_or_else(|e| e.into_inner().0);
            if self.take() {
                return true;
            }
        }
    }
}

/// Installs the destination's core handed out that are not carried out yet.
/// Counted up under the core lock as they are drained, down once each is
/// done, its failure (if any) reported to the core first. So a holder of
/// the core lock that finds none knows that every install drained before
/// it succeeded or had its failure heard: the end of copy may leave.
#[derive(Debug)]
pub struct InstallsInFlight {
    count: AtomicU64,
}

impl Default for InstallsInFlight {
    fn default() -> Self {
        Self::new()
    }
}

impl InstallsInFlight {
    /// None in flight.
    pub fn new() -> Self {
        Self { count: AtomicU64::new(0) }
    }

    /// `installs` were drained from the core (call under the core lock).
    pub fn handed_out(&self, installs: u64) {
        if installs > 0 {
            self.count.fetch_add(installs, Ordering::SeqCst);
        }
    }

    /// `installs` were carried out (a failure already reported to the core).
    pub fn done(&self, installs: u64) {
        self.count.fetch_sub(installs, Ordering::SeqCst);
    }

    /// Whether any install is still in flight.
    pub fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// Per page, page parts handed out to be placed and not placed yet.
/// Counted up under the core lock as they are drained (so a page's
/// install, drained after its last part, sees every part of it counted),
/// down once each is placed. Placing runs on the reader that received the
/// part, outside the core lock: without this the reader of a page's last
/// part could map the page while another still copies an earlier part in.
#[derive(Debug, Default)]
pub struct PartsInFlight {
    // std's (not loom's): a timed wait; not part of the loom models.
    pages: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
    placed: std::sync::Condvar,
}

impl PartsInFlight {
    /// A part of `page` was drained from the core (call under the core lock).
    pub fn handed_out(&self, page: u64) {
        *self.pages.lock().unwrap_or_else(|e| e.into_inner()).entry(page).or_insert(0) += 1;
    }

    /// A part of `page` is placed (or dropped).
    pub fn done(&self, page: u64) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = pages.get_mut(&page) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pages.remove(&page);
            }
        }
        drop(pages);
        self.placed.notify_all();
    }

    /// Waits until no part of `page` is being placed, at most `timeout`;
    /// returns whether none is.
    pub fn wait_placed(&self, page: u64, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        while pages.contains_key(&page) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            pages = self.placed.wait_timeout(pages, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn each_fault_wait_is_taken_once() {
        loom::model(|| {
            let clock = Arc::new(FaultClock::new(4));
            let faulter = {
                let clock = clock.clone();
                thread::spawn(move || {
                    let first = clock.start(3, 10);
                    let second = clock.start(3, 20);
                    (first, second)
                })
            };
            let installers: Vec<_> = (0..2)
                .map(|_| {
                    let clock = clock.clone();
                    thread::spawn(move || clock.finish(3, 50))
                })
                .collect();
            let (first, second) = faulter.join().unwrap();
            let taken: Vec<u64> = installers.into_iter().filter_map(|t| t.join().unwrap()).collect();
            assert!(first, "the first fault on an idle page starts its clock");
            // Whatever the interleaving, no wait is counted twice, and each
            // counted wait is measured from a fault that really started one.
            let left = clock.finish(3, 100);
            let started = 1 + u64::from(second);
            assert_eq!(taken.len() as u64 + u64::from(left.is_some()), started);
            assert!(taken.iter().all(|&w| w == 40 || w == 30));
        });
    }

    /// What the model's core knows about the end of copy (EOC).
    #[derive(Default)]
    struct EocCore {
        eoc_queued: bool,
        eoc_sent: bool,
        failure_after_eoc: bool,
    }

    /// A reader drains the last page's install (the core queues the EOC)
    /// and carries it out, failing or not, then flushes; a fault-path
    /// flusher runs at the same time. The EOC leaves only when queued and
    /// no install is in flight. `report_first`: the failure reaches the
    /// core before the install counts as done (false: a planted bug).
    fn eoc_model(install_fails: bool, report_first: bool) {
        loom::model(move || {
            let core = Arc::new(Mutex::new(EocCore::default()));
            let in_flight = Arc::new(InstallsInFlight::new());
            let flush = |core: &Mutex<EocCore>, in_flight: &InstallsInFlight| {
                let mut c = core.lock().unwrap();
                if c.eoc_queued && !in_flight.any() {
                    c.eoc_sent = true;
                }
            };
            let report = |core: &Mutex<EocCore>| {
                let mut c = core.lock().unwrap();
                if c.eoc_sent {
                    c.failure_after_eoc = true;
                } else {
                    c.eoc_queued = false;
                }
            };
            let reader = {
                let (core, in_flight) = (core.clone(), in_flight.clone());
                thread::spawn(move || {
                    {
                        let mut c = core.lock().unwrap();
                        c.eoc_queued = true;
                        in_flight.handed_out(1);
                    }
                    if install_fails && report_first {
                        report(&core);
                    }
                    in_flight.done(1);
                    if install_fails && !report_first {
                        report(&core);
                    }
                    flush(&core, &in_flight);
                })
            };
            let flusher = {
                let (core, in_flight) = (core.clone(), in_flight.clone());
                thread::spawn(move || flush(&core, &in_flight))
            };
            reader.join().unwrap();
            flusher.join().unwrap();
            let c = core.lock().unwrap();
            assert!(!c.failure_after_eoc, "an install failed after the EOC left");
            // No EOC is lost: without a failure it leaves, with one it waits.
            assert_eq!(c.eoc_sent, !install_fails);
        });
    }

    #[test]
    fn the_eoc_waits_for_installs_in_flight() {
        eoc_model(false, true);
        eoc_model(true, true);
    }

    #[test]
    #[should_panic(expected = "an install failed after the EOC left")]
    fn the_eoc_model_catches_an_install_done_before_its_failure_is_heard() {
        eoc_model(true, false);
    }

    #[test]
    fn a_ring_is_never_lost() {
        loom::model(|| {
            let bell = Arc::new(Doorbell::new());
            let ringer = {
                let bell = bell.clone();
                thread::spawn(move || bell.ring())
            };
            // Returns only if the ring is seen, whenever it happens (loom's
            // timed wait never times out).
            while !bell.wait_timeout(std::time::Duration::from_secs(3600)) {}
            ringer.join().unwrap();
            assert!(!bell.take(), "the ring was consumed by the wait");
        });
    }

    #[test]
    fn two_rings_one_wait_then_none_pending() {
        loom::model(|| {
            let bell = Arc::new(Doorbell::new());
            let ringers: Vec<_> = (0..2)
                .map(|_| {
                    let bell = bell.clone();
                    thread::spawn(move || bell.ring())
                })
                .collect();
            for r in ringers {
                r.join().unwrap();
            }
            assert!(bell.wait_timeout(std::time::Duration::from_secs(3600)));
            assert!(!bell.take());
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    #[test]
    fn a_page_waits_for_its_parts_in_flight_only() {
        use std::sync::Arc;
        use std::time::Duration;
        let parts = Arc::new(super::PartsInFlight::default());
        parts.handed_out(7);
        parts.handed_out(7);
        assert!(parts.wait_placed(8, Duration::ZERO), "another page has none in flight");
        assert!(!parts.wait_placed(7, Duration::from_millis(10)), "two parts of page 7 in flight");
        parts.done(7);
        let placer = {
            let parts = parts.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                parts.done(7);
            })
        };
        assert!(parts.wait_placed(7, Duration::from_secs(10)), "the last part was placed");
        placer.join().expect("placer");
        // Done without being handed out (a part dropped twice): no underflow.
        parts.done(7);
        assert!(parts.wait_placed(7, Duration::ZERO));
    }

    use super::*;
    use std::time::Duration;

    #[test]
    fn fault_clock_measures_from_the_first_fault() {
        let clock = FaultClock::new(2);
        assert!(clock.start(1, 100));
        assert!(!clock.start(1, 150));
        assert_eq!(clock.finish(1, 180), Some(80));
        assert_eq!(clock.finish(1, 190), None);
        assert_eq!(clock.finish(0, 10), None);
        assert!(!clock.start(7, 1));
    }

    #[test]
    fn installs_in_flight_count_up_and_down() {
        let in_flight = InstallsInFlight::new();
        assert!(!in_flight.any());
        in_flight.handed_out(0);
        assert!(!in_flight.any());
        in_flight.handed_out(3);
        in_flight.done(2);
        assert!(in_flight.any());
        in_flight.done(1);
        assert!(!in_flight.any());
    }

    #[test]
    fn doorbell_rings_across_threads() {
        let bell = std::sync::Arc::new(Doorbell::new());
        assert!(!bell.wait_timeout(Duration::from_millis(1)));
        bell.ring();
        assert!(bell.wait_timeout(Duration::from_millis(1)));
        let b2 = bell.clone();
        let t = std::thread::spawn(move || b2.wait_timeout(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        bell.ring();
        assert!(t.join().unwrap());
    }
}
