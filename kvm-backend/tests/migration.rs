//! In-process proof that the VMM layer can migrate a running guest: VM A runs
//! the pattern guest, is stopped and its device state saved; VM B gets empty
//! userfaultfd-registered RAM and the restored state, runs while a fault
//! thread serves its faults from A's memory and a background thread pushes
//! the rest; then B is stopped and every page checked.
//!
//! The hybrid variant first copies pages while A runs (dirty logging), re-
//! copies the dirty ones, and at the stop discards the pages dirtied since
//! their copy; a negative test proves that skipping that discard is caught.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use postcopy_kvm::layout::MIB;
use postcopy_kvm::{DeviceState, DirtyBitmap, GuestRam, Install, UffdRam, VcpuSet, Vm, VmConfig, PAGE_SIZE};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Postcopy,
    Hybrid {
        /// Test-only fault: keep the pages dirtied after their last copy.
        skip_stale_discard: bool,
    },
}

/// Serves B's faults from A's memory until told to stop.
struct FaultServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<FaultStats>>,
}

#[derive(Debug, Default)]
struct FaultStats {
    faults: u64,
    already_present: u64,
    serve_us: Vec<f64>,
    tids: Vec<i32>,
}

impl FaultServer {
    fn start(src: Arc<GuestRam>, dst: Arc<UffdRam>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let served = Arc::new(AtomicU64::new(0));
        let served2 = served.clone();
        let thread = std::thread::Builder::new()
            .name("fault-server".into())
            .spawn(move || {
                let mut reader = dst.fault_reader();
                let mut faults = Vec::new();
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                let mut st = FaultStats::default();
                while !stop2.load(Ordering::SeqCst) {
                    if !reader.wait(Duration::from_millis(5)).expect("poll") {
                        continue;
                    }
                    let t_read = Instant::now();
                    reader.read(&mut faults).expect("read faults");
                    for f in faults.drain(..) {
                        src.read_page(f.page, &mut buf).expect("read source page");
                        match dst.install_page(f.page, &buf).expect("install") {
                            Install::Installed => st.faults += 1,
                            Install::AlreadyPresent => st.already_present += 1,
                        }
                        st.serve_us.push(t_read.elapsed().as_secs_f64() * 1e6);
                        if let Some(t) = f.thread_id {
                            st.tids.push(t);
                        }
                        served2.fetch_add(1, Ordering::SeqCst);
                    }
                }
                st
            })
            .expect("spawn fault server");
        Self { stop, served, thread: Some(thread) }
    }

    fn finish(mut self) -> FaultStats {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().expect("thread").join().expect("fault server panicked")
    }
}

/// Copies every page of `src` into `dst` that `dst` lacks; returns the
/// number installed.
fn push_all(src: &GuestRam, dst: &UffdRam, pushed: &AtomicU64) {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for page in src.layout().pages() {
        src.read_page(page, &mut buf).expect("read");
        if dst.install_page(page, &buf).expect("push") == Install::Installed {
            pushed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Outcome {
    verify_at_switchover_bad_pages: u64,
    stale_discarded: u64,
}

fn migrate(mem: u64, vcpus: usize, mode: Mode) -> Outcome {
    let a = start_pattern_vm(mem, vcpus, true);
    let layout = a.ram.layout().clone();
    wait_for_passes(&a.vm, 2, Duration::from_secs(60));
    let s0 = a.vm.devices().stats().snapshot();
    std::thread::sleep(Duration::from_millis(300));
    let rate_before = a.vm.devices().stats().snapshot().total_rate_since(&s0);

    // Destination RAM: empty, registered before anything else touches it.
    let b_ram = Arc::new(GuestRam::new(layout.clone()).expect("ram B"));
    let b_mem = Arc::new(UffdRam::register(b_ram.clone()).expect("uffd"));

    let mut stale_discarded = 0;
    let mut precopied = 0u64;
    if let Mode::Hybrid { .. } = mode {
        // Round 0: everything, while A runs; then one round of dirty pages.
        a.vm.set_dirty_logging(true).expect("dirty log on");
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for page in layout.pages() {
            a.ram.read_page(page, &mut buf).expect("read");
            assert_eq!(b_mem.install_page(page, &buf).expect("copy"), Install::Installed);
            precopied += 1;
        }
        // Let the guest run a whole pass meanwhile, so there are dirty pages
        // however the threads were scheduled.
        wait_for_more_passes(&a.vm, 1, Duration::from_secs(60));
        let dirty = a.vm.take_dirty_log().expect("dirty log");
        assert!(!dirty.is_empty(), "the running guest dirtied nothing");
        for page in dirty.iter() {
            b_mem.discard_pages(page, 1).expect("discard");
            a.ram.read_page(page, &mut buf).expect("read");
            assert_eq!(b_mem.install_page(page, &buf).expect("re-copy"), Install::Installed);
            precopied += 1;
        }
        // A whole pass after the last copy: every share page is then stale.
        wait_for_more_passes(&a.vm, 1, Duration::from_secs(60));
    }

    // The destination VM is prepared before the switchover, and its faults
    // are served from the start: restoring state may touch guest memory.
    let server = FaultServer::start(a.ram.clone(), b_mem.clone());
    let b_vm = Vm::new(b_ram.clone(), VmConfig::new(vcpus)).expect("vm B");
    let b_vcpus = b_vm.create_vcpus().expect("vcpus B");

    // Switchover.
    let t_stop = Instant::now();
    let stop_latency = a.set.pause().expect("pause A");
    let state = DeviceState::capture(&a.vm, &a.set).expect("capture");
    let blob = state.to_bytes().expect("encode");
    let capture_time = t_stop.elapsed();
    if let Mode::Hybrid { skip_stale_discard } = mode {
        let t = Instant::now();
        let stale: DirtyBitmap = a.vm.take_dirty_log().expect("final dirty log");
        let sync_time = t.elapsed();
        assert!(!stale.is_empty(), "no page dirtied since the last copy");
        stale_discarded = stale.count();
        let t = Instant::now();
        if !skip_stale_discard {
            for (first, count) in stale.runs() {
                b_mem.discard_pages(first, count).expect("discard stale");
            }
        }
        eprintln!("final dirty sync {sync_time:?}, discard of {stale_discarded} stale pages {:?}", t.elapsed());
    }
    let a_positions = positions(&a.guest, &state.vcpus);

    let t_restore = Instant::now();
    DeviceState::from_bytes(&blob).expect("decode").restore(&b_vm, &b_vcpus).expect("restore");
    let restore_time = t_restore.elapsed();

    if mode == (Mode::Hybrid { skip_stale_discard: true }) {
        // Do not run B: fill in the rest and check memory at the switchover.
        let pushed = AtomicU64::new(0);
        push_all(&a.ram, &b_mem, &pushed);
        let report = a.guest.verify(&b_ram, &a_positions).expect("verify");
        server.finish();
        eprintln!("hybrid without stale discard: {report:?}");
        return Outcome { verify_at_switchover_bad_pages: report.bad_pages, stale_discarded };
    }

    let b_set = VcpuSet::start(b_vcpus, b_vm.devices().clone()).expect("start B");
    let downtime = t_stop.elapsed();
    let tids = b_set.thread_ids();

    // Background push, from B's first fault on (so that B does fault, however
    // the threads are scheduled).
    let t0 = Instant::now();
    while server.served.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "B never faulted");
        std::thread::sleep(Duration::from_millis(1));
    }
    let pushed = Arc::new(AtomicU64::new(0));
    let t_push = Instant::now();
    let pusher = {
        let (src, dst, pushed) = (a.ram.clone(), b_mem.clone(), pushed.clone());
        std::thread::spawn(move || push_all(&src, &dst, &pushed))
    };
    let progress_during = {
        let s0 = b_vm.devices().stats().snapshot();
        pusher.join().expect("pusher panicked");
        let s1 = b_vm.devices().stats().snapshot();
        s1.total_rate_since(&s0)
    };
    let push_time = t_push.elapsed();
    wait_for_passes(&b_vm, 2, Duration::from_secs(60));
    let s0 = b_vm.devices().stats().snapshot();
    std::thread::sleep(Duration::from_millis(300));
    let rate_after = b_vm.devices().stats().snapshot().total_rate_since(&s0);
    b_set.pause().expect("pause B");
    let b_states = b_set.save_states().expect("save B");
    let mut stats = server.finish();

    let b_positions = positions(&a.guest, &b_states);
    let report = a.guest.verify(&b_ram, &b_positions).expect("verify B");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(b_vm.devices().stats().error_count(), 0, "{:?}", b_vm.devices().stats().errors());
    assert_eq!(a.vm.devices().stats().error_count(), 0);
    for (b, a) in b_positions.iter().zip(&a_positions) {
        assert!(b.passes >= a.passes + 2, "B did not progress: {a:?} -> {b:?}");
    }
    let total = layout.total_pages();
    let faults = stats.faults;
    let pushed = pushed.load(Ordering::Relaxed);
    match mode {
        Mode::Postcopy => assert_eq!(faults + pushed, total, "each page installed exactly once"),
        Mode::Hybrid { .. } => assert_eq!(faults + pushed, stale_discarded),
    }
    assert!(faults > 0, "B never faulted");
    assert!(stats.tids.iter().any(|t| tids.contains(t)), "no fault attributed to a vCPU thread");
    let p50 = percentile(&mut stats.serve_us, 0.5);
    let p99 = percentile(&mut stats.serve_us, 0.99);
    let max = percentile(&mut stats.serve_us, 1.0);
    eprintln!(
        "{mode:?} {} MiB {vcpus} vCPUs: stop latency {stop_latency:?}, save+encode {capture_time:?}, decode+restore {restore_time:?}, downtime (stop to B running) {downtime:?}, \
         state {} bytes, precopied {precopied}, stale {stale_discarded}, faults {faults} (+{} already present), pushed {pushed} in {push_time:?}; \
         fault serve us p50 {p50:.1} p99 {p99:.1} max {max:.1}; passes/s before {rate_before:.1}, during push {progress_during:.1}, after {rate_after:.1}",
        mem / MIB,
        blob.len(),
        stats.already_present,
    );
    b_set.stop().expect("stop B");
    a.set.stop().expect("stop A");
    Outcome { verify_at_switchover_bad_pages: report.bad_pages, stale_discarded }
}

#[test]
fn postcopy_one_vcpu() {
    if !uffd_or_skip("postcopy_one_vcpu") {
        return;
    }
    migrate(64 * MIB, 1, Mode::Postcopy);
}

#[test]
fn postcopy_four_vcpus() {
    if !uffd_or_skip("postcopy_four_vcpus") {
        return;
    }
    migrate(128 * MIB, 4, Mode::Postcopy);
}

#[test]
fn hybrid_two_vcpus() {
    if !uffd_or_skip("hybrid_two_vcpus") {
        return;
    }
    let o = migrate(64 * MIB, 2, Mode::Hybrid { skip_stale_discard: false });
    assert!(o.stale_discarded > 0);
}

#[test]
fn hybrid_without_stale_discard_is_caught_by_the_verifier() {
    if !uffd_or_skip("hybrid_without_stale_discard_is_caught_by_the_verifier") {
        return;
    }
    let o = migrate(64 * MIB, 2, Mode::Hybrid { skip_stale_discard: true });
    assert!(o.stale_discarded > 0);
    assert!(o.verify_at_switchover_bad_pages > 0, "stale pages went unnoticed");
    assert!(o.verify_at_switchover_bad_pages <= o.stale_discarded);
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// The page is left zero (installed as a zero page).
    Dropped,
    /// One bit of the pattern word is flipped.
    Corrupted,
}

/// Migrates with one page damaged on the way: the verifier finds exactly that
/// page at the switchover, and the guest itself reports it through its error
/// port when it gets there.
fn migrate_with_damaged_page(damage: Damage) {
    let a = start_pattern_vm(32 * MIB, 1, true);
    wait_for_passes(&a.vm, 2, Duration::from_secs(60));
    a.set.pause().expect("pause A");
    let state = DeviceState::capture(&a.vm, &a.set).expect("capture");
    let a_pos = positions(&a.guest, &state.vcpus);
    let share: Vec<u64> = a.guest.share(0).expect("share").page_addrs().collect();
    let victim_gpa = share[(a_pos[0].pages_done as usize + 100) % share.len()];
    let layout = a.ram.layout().clone();
    let victim = layout.locate(victim_gpa).expect("victim page");

    let b_ram = Arc::new(GuestRam::new(layout.clone()).expect("ram B"));
    let b_mem = UffdRam::register(b_ram.clone()).expect("uffd");
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for page in layout.pages() {
        a.ram.read_page(page, &mut buf).expect("read");
        let installed = match (page == victim, damage) {
            (true, Damage::Dropped) => b_mem.install_zero_page(page),
            (true, Damage::Corrupted) => {
                buf[2] ^= 0x10;
                b_mem.install_page(page, &buf)
            }
            (false, _) => b_mem.install_page(page, &buf),
        };
        assert_eq!(installed.expect("install"), Install::Installed);
    }
    let report = a.guest.verify(&b_ram, &a_pos).expect("verify");
    assert_eq!(report.bad_pages, 1, "{report:?}");
    let bad = report.first_bad[0];
    assert_eq!(bad.gpa, victim_gpa);

    let b_vm = Vm::new(b_ram.clone(), VmConfig::new(1)).expect("vm B");
    let b_vcpus = b_vm.create_vcpus().expect("vcpus B");
    state.restore(&b_vm, &b_vcpus).expect("restore");
    let b_set = VcpuSet::start(b_vcpus, b_vm.devices().clone()).expect("start B");
    let t0 = Instant::now();
    while b_vm.devices().stats().error_count() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the guest did not notice the {damage:?} page");
        std::thread::sleep(Duration::from_millis(5));
    }
    // After reporting, the guest repairs the page and goes on.
    wait_for_passes(&b_vm, 2, Duration::from_secs(60));
    b_set.pause().expect("pause B");
    let errors = b_vm.devices().stats().errors();
    assert_eq!(
        errors,
        vec![postcopy_kvm::devices::GuestErrorReport {
            vcpu: 0,
            gpa: victim_gpa,
            expected: bad.expected,
            found: bad.found
        }]
    );
    let states = b_set.save_states().expect("save B");
    assert!(a.guest.verify(&b_ram, &positions(&a.guest, &states)).expect("verify").is_ok());
    eprintln!("{damage:?} page {victim_gpa:#x} caught by the verifier and reported by the guest: {:?}", errors[0]);
    b_set.stop().expect("stop B");
    a.set.stop().expect("stop A");
}

#[test]
fn dropped_page_is_caught() {
    if !uffd_or_skip("dropped_page_is_caught") {
        return;
    }
    migrate_with_damaged_page(Damage::Dropped);
}

#[test]
fn corrupted_page_is_caught() {
    if !uffd_or_skip("corrupted_page_is_caught") {
        return;
    }
    migrate_with_damaged_page(Damage::Corrupted);
}

/// A vCPU blocked on a missing page cannot be interrupted; a pause reports
/// it, it parks as soon as its page arrives, and a guest whose pages will
/// never come can still be torn down by unregistering its RAM.
#[test]
fn vcpu_waiting_for_a_page_parks_when_it_arrives() {
    if !uffd_or_skip("vcpu_waiting_for_a_page_parks_when_it_arrives") {
        return;
    }
    let a = start_pattern_vm(16 * MIB, 1, true);
    wait_for_passes(&a.vm, 1, Duration::from_secs(60));
    a.set.pause().expect("pause A");
    let state = DeviceState::capture(&a.vm, &a.set).expect("capture");
    let b_ram = Arc::new(GuestRam::new(a.ram.layout().clone()).expect("ram B"));
    let b_mem = UffdRam::register(b_ram.clone()).expect("uffd");
    let b_vm = Vm::new(b_ram.clone(), VmConfig::new(1)).expect("vm B");
    let b_vcpus = b_vm.create_vcpus().expect("vcpus B");
    state.restore(&b_vm, &b_vcpus).expect("restore");
    let b_set = VcpuSet::start(b_vcpus, b_vm.devices().clone()).expect("start B");
    let mut reader = b_mem.fault_reader();
    let mut faults = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    assert!(reader.wait(Duration::from_secs(10)).expect("poll"), "B did not fault");

    let r = b_set.pause_within(Duration::from_millis(200));
    assert_eq!(r.parked, vec![false], "a vCPU waiting for a page parked");
    // Serve pages until it parks: it stays kicked, so it stops at once.
    let t0 = Instant::now();
    let mut served = 0;
    while !b_set.wait_paused(Duration::from_millis(1)) {
        assert!(t0.elapsed() < Duration::from_secs(10), "did not park after its pages arrived");
        if reader.wait(Duration::from_millis(1)).expect("poll") {
            reader.read(&mut faults).expect("read");
            for f in faults.drain(..) {
                a.ram.read_page(f.page, &mut buf).expect("read A");
                b_mem.install_page(f.page, &buf).expect("install");
                served += 1;
            }
        }
    }
    eprintln!("parked {:?} after its first page arrived ({served} pages served)", t0.elapsed());
    b_set.save_states().expect("state of a parked vCPU");

    // Resume: it blocks on its next missing page; abandon the guest.
    b_set.resume();
    assert!(reader.wait(Duration::from_secs(10)).expect("poll"), "B did not fault again");
    assert!(!b_set.pause_within(Duration::from_millis(100)).all_parked());
    b_mem.unregister_all().expect("unregister");
    b_set.stop().expect("stop after unregistering");
    a.set.stop().expect("stop A");
}

/// Abandoning a guest blocked on a missing page: its vCPUs are kicked
/// before the RAM is unregistered, so the one woken by the unregister parks
/// without running a guest instruction on the zero pages it would now see
/// (the pattern guest would report them as bad at once).
#[test]
fn an_abandoned_guest_runs_nothing_on_missing_pages() {
    if !uffd_or_skip("an_abandoned_guest_runs_nothing_on_missing_pages") {
        return;
    }
    let a = start_pattern_vm(16 * MIB, 1, true);
    wait_for_passes(&a.vm, 1, Duration::from_secs(60));
    a.set.pause().expect("pause A");
    let state = DeviceState::capture(&a.vm, &a.set).expect("capture");
    let b_ram = Arc::new(GuestRam::new(a.ram.layout().clone()).expect("ram B"));
    let b_mem = UffdRam::register(b_ram.clone()).expect("uffd");
    let b_vm = Vm::new(b_ram.clone(), VmConfig::new(1)).expect("vm B");
    let b_vcpus = b_vm.create_vcpus().expect("vcpus B");
    state.restore(&b_vm, &b_vcpus).expect("restore");
    let b_set = VcpuSet::start(b_vcpus, b_vm.devices().clone()).expect("start B");
    // Serve B's first faults (its code, page tables and some data arrive),
    // then stop: it blocks on the next page it touches.
    let mut reader = b_mem.fault_reader();
    let mut faults = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    let mut served = 0;
    loop {
        assert!(reader.wait(Duration::from_secs(10)).expect("poll"), "B did not fault");
        reader.read(&mut faults).expect("read");
        if served >= 64 {
            break;
        }
        for f in faults.drain(..) {
            a.ram.read_page(f.page, &mut buf).expect("read A");
            b_mem.install_page(f.page, &buf).expect("install");
            served += 1;
        }
    }
    // Let it sit on the unserved fault, as an abandoned guest would.
    std::thread::sleep(Duration::from_millis(50));
    let stats = b_vm.devices().stats().clone();
    let errors_before = stats.error_count();
    b_set.abandon(&b_mem).expect("abandon");
    assert!(b_set.wait_paused(Duration::from_secs(10)), "the woken vCPU did not park");
    // Time for a vCPU that ran on would reach a zero page and report it.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(b_set.states(), vec![postcopy_kvm::RunState::Paused]);
    let bad = stats.error_count() - errors_before;
    assert_eq!(bad, 0, "the abandoned guest ran on zero pages ({bad} reported, first {:?})", stats.errors().first());
    b_set.stop().expect("stop B");
    a.set.stop().expect("stop A");
}
