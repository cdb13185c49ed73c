//! Destination RAM under userfaultfd, without a VM, for each kind of RAM
//! (anonymous, missing faults; preallocated, minor faults; shared and not
//! yet populated, missing and minor faults): installing pages
//! (copy and zero), "already present" handling, discards that fault again,
//! and the fault reader (non-blocking, pollable, with thread ids).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use postcopy_kvm::layout::MIB;
use postcopy_kvm::uffd::{InjectedFault, InstallCount, InstallError, InstallFailure, InstallFaultPlan};
use postcopy_kvm::{GuestRam, Install, MemoryMap, MemoryMapError, PageRef, UffdError, UffdRam, PAGE_SIZE};

/// The kinds of destination RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Anonymous: missing faults, `UFFDIO_COPY`.
    Anonymous,
    /// Shared memory, every page allocated: minor faults, placement
    /// mapping and `UFFDIO_CONTINUE`.
    Preallocated,
    /// Shared memory with no page allocated yet (a background population
    /// has not reached them): missing faults served as minor ones.
    Unpopulated,
}

/// Registered RAM of `mib` MiB of `kind`.
fn fresh(mib: u64, kind: Kind) -> Arc<UffdRam> {
    let layout = MemoryMap::pc(mib * MIB).expect("layout");
    let ram = match kind {
        Kind::Anonymous => GuestRam::new(layout),
        Kind::Preallocated => GuestRam::new_preallocated(layout),
        Kind::Unpopulated => GuestRam::new_unpopulated(layout),
    };
    let ram = Arc::new(ram.expect("ram"));
    assert_eq!(ram.is_preallocated(), kind != Kind::Anonymous);
    Arc::new(UffdRam::register(ram).expect("register"))
}

const KINDS: [Kind; 3] = [Kind::Anonymous, Kind::Preallocated, Kind::Unpopulated];

/// Runs `test` (called `name`) on 2 MiB of each kind of registered RAM, or
/// skips it where userfaultfd is missing.
fn for_each_kind(name: &str, test: impl Fn(Arc<UffdRam>)) {
    if !uffd_or_skip(name) {
        return;
    }
    for kind in KINDS {
        eprintln!("RAM: {kind:?}");
        test(fresh(2, kind));
    }
}

fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE as usize]
}

#[test]
fn features_are_reported() {
    if !uffd_or_skip("features_are_reported") {
        return;
    }
    let f = postcopy_kvm::uffd::probe_features().expect("probe");
    eprintln!("userfaultfd features: {:?}", f.names);
    assert!(f.has("THREAD_ID"), "{f:?}");
    assert_eq!(f.bits.count_ones() as usize, f.names.len());
    assert!(KINDS.iter().all(|&p| fresh(2, p).reports_thread_ids()));
}

#[test]
fn install_copy_zero_and_already_present() {
    for_each_kind("install_copy_zero_and_already_present", |m| {
        let p = PageRef::new(0, 7);
        assert_eq!(m.install_page(p, &page_of(0xab)).unwrap(), Install::Installed);
        // A late or duplicate copy never overwrites.
        assert_eq!(m.install_page(p, &page_of(0xcd)).unwrap(), Install::AlreadyPresent);
        assert_eq!(m.install_zero_page(p).unwrap(), Install::AlreadyPresent);
        let mut back = page_of(0);
        m.ram().read_page(p, &mut back).unwrap();
        assert_eq!(back, page_of(0xab));

        let z = PageRef::new(0, 8);
        assert_eq!(m.install_zero_page(z).unwrap(), Install::Installed);
        m.ram().read_page(z, &mut back).unwrap();
        assert_eq!(back, page_of(0));
        assert_eq!(m.install_page(z, &page_of(1)).unwrap(), Install::AlreadyPresent);

        // A run with present pages inside: those are skipped, the rest filled.
        let mut run = Vec::new();
        for i in 0..6u8 {
            run.extend_from_slice(&page_of(0x10 + i));
        }
        let mut skipped = Vec::new();
        let (n, marker) = m.install_pages_with(PageRef::new(0, 5), &run, |i| skipped.push(i), || "installed").unwrap();
        assert_eq!((n, marker), (InstallCount { installed: 4, already_present: 2 }, "installed"));
        assert_eq!(skipped, vec![2, 3], "pages 7 and 8 are the third and fourth of the run");
        for (i, want) in [(5, 0x10), (6, 0x11), (7, 0xab), (8, 0), (9, 0x14), (10, 0x15)] {
            m.ram().read_page(PageRef::new(0, i), &mut back).unwrap();
            assert_eq!(back[0], want, "page {i}");
            assert!(back.iter().all(|&b| b == want));
        }
        let n = m.install_zero_pages(PageRef::new(0, 9), 4).unwrap();
        assert_eq!(n, InstallCount { installed: 2, already_present: 2 });
    });
}

/// The `_with` installs run their callback with the page in place and its
/// faulting thread still asleep, and wake it afterwards.
#[test]
fn installs_with_a_callback_wake_the_waiter_after_it() {
    for_each_kind("installs_with_a_callback_wake_the_waiter_after_it", |m| {
        let mut reader = m.fault_reader();
        for (i, zero) in [(0u64, false), (1, true)] {
            let page = PageRef::new(0, 100 + i);
            let gpa = m.ram().layout().gpa_of(page).unwrap();
            let done = Arc::new(AtomicBool::new(false));
            let toucher = {
                let (m, done) = (m.clone(), done.clone());
                std::thread::spawn(move || {
                    let v = m.ram().read_u64(gpa).expect("read");
                    done.store(true, Ordering::SeqCst);
                    v
                })
            };
            assert!(reader.wait(Duration::from_secs(5)).unwrap(), "no fault arrived");
            let mut faults = Vec::new();
            assert_eq!(reader.read(&mut faults).unwrap(), 1);
            let asleep_after_install = || {
                // Time enough for a woken thread to finish its read.
                std::thread::sleep(Duration::from_millis(50));
                !done.load(Ordering::SeqCst)
            };
            let (outcome, asleep) = if zero {
                m.install_zero_page_with(page, asleep_after_install).unwrap()
            } else {
                m.install_page_with(page, &page_of(0x77), asleep_after_install).unwrap()
            };
            assert_eq!(outcome, Install::Installed);
            assert!(asleep, "the waiter was woken before the callback ran (zero page: {zero})");
            let want = if zero { 0 } else { 0x7777_7777_7777_7777 };
            assert_eq!(toucher.join().unwrap(), want, "the waiter was not woken, or read the wrong page");
        }
        // A page already present: reported, the callback still runs.
        let (outcome, ran) = m.install_page_with(PageRef::new(0, 100), &page_of(1), || true).unwrap();
        assert_eq!((outcome, ran), (Install::AlreadyPresent, true));
    });
}

#[test]
fn bad_arguments_are_errors() {
    for_each_kind("bad_arguments_are_errors", |m| {
        assert!(matches!(m.install_page(PageRef::new(0, 0), &[0u8; 100]), Err(UffdError::BadLength { .. })));
        assert!(matches!(
            m.install_page_with(PageRef::new(0, 0), &[0u8; 100], || ()),
            Err(UffdError::BadLength { .. })
        ));
        assert!(matches!(
            m.install_zero_page_with(PageRef::new(0, 512), || ()),
            Err(UffdError::Layout(MemoryMapError::PageOutOfRange { .. }))
        ));
        assert!(matches!(m.install_pages(PageRef::new(0, 0), &[]), Err(UffdError::BadLength { .. })));
        assert!(matches!(
            m.install_page(PageRef::new(0, 512), &page_of(0)),
            Err(UffdError::Layout(MemoryMapError::PageOutOfRange { .. }))
        ));
        assert!(matches!(
            m.install_page(PageRef::new(1, 0), &page_of(0)),
            Err(UffdError::Layout(MemoryMapError::PageOutOfRange { .. }))
        ));
        let two = [page_of(1), page_of(2)].concat();
        assert!(matches!(
            m.install_pages(PageRef::new(0, 511), &two),
            Err(UffdError::Layout(MemoryMapError::PageOutOfRange { .. }))
        ));
        assert!(matches!(
            m.install_zero_pages(PageRef::new(0, 500), 13),
            Err(UffdError::Layout(MemoryMapError::PageOutOfRange { .. }))
        ));
        assert!(matches!(
            m.discard_pages(PageRef::new(0, 510), 3),
            Err(UffdError::Layout(MemoryMapError::PageOutOfRange { .. }))
        ));
    });
}

#[test]
fn faults_are_read_with_thread_ids_and_served() {
    for_each_kind("faults_are_read_with_thread_ids_and_served", |m| {
        let mut reader = m.fault_reader();
        let mut faults = Vec::new();
        // Non-blocking: nothing pending means an immediate empty read.
        let t0 = Instant::now();
        assert_eq!(reader.read(&mut faults).unwrap(), 0);
        assert!(!reader.wait(Duration::from_millis(20)).unwrap());
        assert!(t0.elapsed() < Duration::from_secs(1));

        let page = PageRef::new(0, 42);
        let gpa = m.ram().layout().gpa_of(page).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let toucher = {
            let (m, done) = (m.clone(), done.clone());
            std::thread::spawn(move || {
                let tid = current_thread_id();
                let v = m.ram().read_u64(gpa + 16).expect("read");
                done.store(true, Ordering::SeqCst);
                (tid, v)
            })
        };
        assert!(reader.wait(Duration::from_secs(5)).unwrap(), "no fault arrived");
        assert_eq!(reader.read(&mut faults).unwrap(), 1);
        let f = faults[0];
        assert_eq!(f.page, page);
        assert!(!f.write);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!done.load(Ordering::SeqCst), "the reader did not wait for the page");
        let mut data = page_of(0);
        data[16..24].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(m.install_page(page, &data).unwrap(), Install::Installed);
        let (tid, v) = toucher.join().unwrap();
        assert_eq!(v, 0x1122_3344_5566_7788);
        assert_eq!(f.thread_id, Some(tid));

        // Discarded pages fault again, and a write fault says so.
        m.discard_pages(page, 1).unwrap();
        let writer = {
            let m = m.clone();
            std::thread::spawn(move || m.ram().write_u64(gpa, 5).expect("write"))
        };
        assert!(reader.wait(Duration::from_secs(5)).unwrap(), "no fault after discard");
        faults.clear();
        reader.read(&mut faults).unwrap();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].page, page);
        assert!(faults[0].write);
        assert_eq!(m.install_zero_page(page).unwrap(), Install::Installed);
        writer.join().unwrap();
        assert_eq!(m.ram().read_u64(gpa).unwrap(), 5);
        // The page's content before the discard is gone.
        assert_eq!(m.ram().read_u64(gpa + 16).unwrap(), 0);
    });
}

/// The calling thread's kernel id.
fn current_thread_id() -> i32 {
    // std has no gettid; /proc/thread-self names it without unsafe code.
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(|s| s.parse().ok()))
        .expect("thread id")
}

/// `UFFD_FEATURE_EVENT_REMOVE`: a discard then waits until its event is
/// read, and fills meanwhile fail with `EAGAIN` (address space changing).
const EVENT_REMOVE: u64 = 1 << 3;

fn install_error(e: UffdError) -> InstallError {
    match e {
        UffdError::Install(e) => *e,
        other => panic!("not an install error: {other}"),
    }
}

/// A page of `byte`s, `n` times.
fn pages_of(byte: u8, n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| page_of(byte.wrapping_add(i as u8))).collect()
}

/// A copy refused with `EAGAIN` while a discard's REMOVE event is unread
/// (the kernel stores -EAGAIN as the count) is "retry later", never
/// "2^64 - 11 bytes copied"; once the event is read, the retry installs.
/// Anonymous RAM only: on preallocated RAM a discard and an install of one
/// `UffdRam` exclude each other, so an install never meets this.
#[test]
fn eagain_from_a_changing_address_space_is_a_retry_not_a_copy() {
    if !uffd_or_skip("eagain_from_a_changing_address_space_is_a_retry_not_a_copy") {
        return;
    }
    let layout = MemoryMap::pc(2 * MIB).expect("layout");
    let ram = Arc::new(GuestRam::new(layout).expect("ram"));
    let m = Arc::new(UffdRam::register_with_features(ram, EVENT_REMOVE).expect("register with EVENT_REMOVE"));
    let mut reader = m.fault_reader();
    let discarder = {
        let m = m.clone();
        std::thread::spawn(move || m.discard_pages(PageRef::new(0, 300), 1))
    };
    assert!(reader.wait(Duration::from_secs(5)).unwrap(), "no REMOVE event");
    let page = PageRef::new(0, 10);
    for (what, result) in [
        ("copy", m.install_page(page, &page_of(0x5a)).map(|_| ())),
        ("zero", m.install_zero_page(page).map(|_| ())),
        ("run", m.install_pages(page, &pages_of(1, 3)).map(|_| ())),
    ] {
        let e = install_error(result.expect_err(what));
        assert!(matches!(e.cause, InstallFailure::Again), "{what}: {e}");
        assert_eq!((e.stopped_at, e.done), (0, InstallCount::default()), "{what}: {e}");
        assert!(e.is_transient());
    }
    // Reading the event ends the change; the discard returns.
    let mut faults = Vec::new();
    let read = reader.read(&mut faults);
    assert!(matches!(read, Err(UffdError::Operation { .. })), "a REMOVE event is not a fault: {read:?}");
    discarder.join().unwrap().expect("discard");
    assert_eq!(m.install_page(page, &page_of(0x5a)).unwrap(), Install::Installed);
    let mut back = page_of(0);
    m.ram().read_page(page, &mut back).unwrap();
    assert_eq!(back, page_of(0x5a));
}

/// A zero-fill the kernel cuts short at a present page counts the pages it
/// zeroed as installed, not as already present (`userfaultfd` 0.9 drops the
/// partial count of `UFFDIO_ZEROPAGE`).
#[test]
fn a_zero_fill_cut_short_counts_its_pages() {
    if !uffd_or_skip("a_zero_fill_cut_short_counts_its_pages") {
        return;
    }
    let m = fresh(2, Kind::Anonymous);
    assert_eq!(m.install_page(PageRef::new(0, 22), &page_of(9)).unwrap(), Install::Installed);
    let n = m.install_zero_pages(PageRef::new(0, 20), 4).unwrap();
    assert_eq!(n, InstallCount { installed: 3, already_present: 1 });
    // The same through a copy cut short.
    assert_eq!(m.install_page(PageRef::new(0, 42), &page_of(9)).unwrap(), Install::Installed);
    let mut skipped = Vec::new();
    let (n, ()) = m.install_pages_with(PageRef::new(0, 40), &pages_of(1, 4), |i| skipped.push(i), || ()).unwrap();
    assert_eq!((n, skipped), (InstallCount { installed: 3, already_present: 1 }, vec![2]));
}

/// An install refused part-way says exactly which pages it installed; the
/// others are still missing (preallocated RAM: their claims were given
/// back, and only theirs), so installing the run again fills just them.
#[test]
fn a_failed_install_says_which_pages_it_installed() {
    for_each_kind("a_failed_install_says_which_pages_it_installed", |m| {
        let first = PageRef::new(0, 60);
        let plan = InstallFaultPlan { page: PageRef::new(0, 63), fault: InjectedFault::Fail(libc::ENOMEM), times: 1 };
        m.inject_install_fault(Some(plan));
        let run = pages_of(0x30, 6);
        let e = install_error(m.install_pages(first, &run).expect_err("injected ENOMEM"));
        assert_eq!((e.stopped_at, e.done.installed, e.not_installed()), (3, 3, 3..6), "{e}");
        match &e.cause {
            InstallFailure::Os { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ENOMEM)),
            other => panic!("{other}"),
        }
        assert!(!e.is_transient());
        let mut skipped = Vec::new();
        let (n, ()) = m.install_pages_with(first, &run, |i| skipped.push(i), || ()).expect("the retry");
        assert_eq!((n, skipped), (InstallCount { installed: 3, already_present: 3 }, vec![0, 1, 2]));
        let mut back = page_of(0);
        for i in 0..6u64 {
            m.ram().read_page(PageRef::new(0, 60 + i), &mut back).unwrap();
            assert_eq!(back, page_of(0x30 + i as u8), "page {i}");
        }
        // The same for zero pages, failing on the first page.
        let plan = InstallFaultPlan { page: PageRef::new(0, 70), fault: InjectedFault::Fail(libc::EFAULT), times: 1 };
        m.inject_install_fault(Some(plan));
        let e = install_error(m.install_zero_pages(PageRef::new(0, 70), 2).expect_err("injected EFAULT"));
        assert_eq!((e.stopped_at, e.done), (0, InstallCount::default()), "{e}");
        assert_eq!(m.install_zero_pages(PageRef::new(0, 70), 2).unwrap().installed, 2);
    });
}

/// Fills cut short by the kernel go on from where they stopped; `EAGAIN`
/// is retried a few times, then reported as transient, and the pages
/// before it are counted.
#[test]
fn partial_fills_and_eagain_are_counted_exactly() {
    for_each_kind("partial_fills_and_eagain_are_counted_exactly", |m| {
        let partial = InstallFaultPlan { page: PageRef::new(0, 81), fault: InjectedFault::Partial, times: 1 };
        m.inject_install_fault(Some(partial));
        let n = m.install_pages(PageRef::new(0, 80), &pages_of(0x40, 4)).expect("a partial copy goes on");
        assert_eq!(n, InstallCount { installed: 4, already_present: 0 });
        m.inject_install_fault(Some(InstallFaultPlan { page: PageRef::new(0, 91), ..partial }));
        assert_eq!(m.install_zero_pages(PageRef::new(0, 90), 3).unwrap().installed, 3);

        // EAGAIN a few times: absorbed.
        let again = InstallFaultPlan { page: PageRef::new(0, 102), fault: InjectedFault::Again, times: 3 };
        m.inject_install_fault(Some(again));
        assert_eq!(m.install_pages(PageRef::new(0, 100), &pages_of(1, 4)).unwrap().installed, 4);
        // EAGAIN for ever: reported, the pages before it installed.
        m.inject_install_fault(Some(InstallFaultPlan { page: PageRef::new(0, 112), times: u32::MAX, ..again }));
        let e = install_error(m.install_pages(PageRef::new(0, 110), &pages_of(1, 4)).expect_err("EAGAIN for ever"));
        assert!(matches!(e.cause, InstallFailure::Again) && e.is_transient(), "{e}");
        assert_eq!((e.stopped_at, e.done.installed), (2, 2), "{e}");
        m.inject_install_fault(None);
        let n = m.install_pages(PageRef::new(0, 110), &pages_of(1, 4)).unwrap();
        assert_eq!(n, InstallCount { installed: 2, already_present: 2 });
    });
}

/// A fill that succeeded is reported as such when only the wake-up after
/// it fails: every page counted, the cause named; a later wake works.
#[test]
fn a_failed_wake_still_reports_the_pages_installed() {
    for_each_kind("a_failed_wake_still_reports_the_pages_installed", |m| {
        for (i, zero) in [(0u64, false), (1, true)] {
            let page = PageRef::new(0, 120 + i);
            let plan = InstallFaultPlan { page, fault: InjectedFault::WakeFails, times: 1 };
            m.inject_install_fault(Some(plan));
            let result = if zero {
                m.install_zero_page_with(page, || ())
            } else {
                m.install_page_with(page, &page_of(3), || ())
            };
            let e = install_error(result.map(|_| ()).expect_err("injected wake failure"));
            assert!(matches!(e.cause, InstallFailure::Wake(_)), "{e}");
            assert_eq!((e.stopped_at, e.done.installed, e.not_installed()), (1, 1, 1..1), "{e}");
            m.wake_pages(page, 1).expect("a later wake");
            assert_eq!(m.install_page(page, &page_of(4)).unwrap(), Install::AlreadyPresent);
        }
    });
}

/// Faults read together with an event that is not a fault are returned;
/// the bad event is reported by the next read.
#[test]
fn a_bad_event_does_not_cost_the_faults_read_with_it() {
    if !uffd_or_skip("a_bad_event_does_not_cost_the_faults_read_with_it") {
        return;
    }
    let layout = MemoryMap::pc(2 * MIB).expect("layout");
    let ram = Arc::new(GuestRam::new(layout).expect("ram"));
    let m = Arc::new(UffdRam::register_with_features(ram, EVENT_REMOVE).expect("register with EVENT_REMOVE"));
    let mut reader = m.fault_reader();
    let page = PageRef::new(0, 5);
    let gpa = m.ram().layout().gpa_of(page).unwrap();
    let toucher = {
        let m = m.clone();
        std::thread::spawn(move || m.ram().read_u64(gpa).expect("read"))
    };
    let discarder = {
        let m = m.clone();
        std::thread::spawn(move || m.discard_pages(PageRef::new(0, 300), 1))
    };
    // Both the fault and the REMOVE event are queued.
    std::thread::sleep(Duration::from_millis(200));
    let mut faults = Vec::new();
    let read = reader.read(&mut faults);
    assert_eq!(read.ok(), Some(1), "the fault was dropped with the bad event");
    assert_eq!(faults[0].page, page);
    let next = reader.read(&mut faults);
    assert!(matches!(&next, Err(UffdError::Operation { reason, .. }) if reason.contains("Remove")), "{next:?}");
    discarder.join().unwrap().expect("discard");
    let mut data = page_of(0);
    data[..8].copy_from_slice(&77u64.to_le_bytes());
    assert_eq!(m.install_page(page, &data).unwrap(), Install::Installed);
    assert_eq!(toucher.join().unwrap(), 77);
}

/// Huge-page RAM (2 MiB pages in a hugetlbfs memfd) registered for minor
/// faults: a huge page is placed and mapped whole, a second install finds
/// it present, its bytes read back through the guest's mapping. Skips where
/// no 2 MiB page can be reserved.
#[test]
fn huge_pages_install_whole() {
    use postcopy_kvm::HugePageSize;
    if !uffd_or_skip("huge_pages_install_whole") {
        return;
    }
    let size = HugePageSize::Size2M;
    if !huge_pages_or_skip("huge_pages_install_whole", 2) {
        return;
    }
    let ram = GuestRam::new_preallocated_with(MemoryMap::pc(4 * MIB).expect("layout"), Some(size)).expect("ram");
    assert_eq!(ram.unit_pages(), 512);
    let uffd = UffdRam::register(Arc::new(ram)).expect("register huge-page RAM for minor faults");
    let page: Vec<u8> = (0..2 * MIB as usize).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
    // A huge page is one install: a 4 KiB one is refused.
    assert!(uffd.install_page(PageRef::new(0, 512), &page_of(1)).is_err());
    assert_eq!(uffd.install_page(PageRef::new(0, 512), &page).expect("install"), Install::Installed);
    assert_eq!(uffd.install_page(PageRef::new(0, 512), &page).expect("again"), Install::AlreadyPresent);
    let mut back = vec![0u8; 2 * MIB as usize];
    uffd.ram().read_pages(PageRef::new(0, 512), &mut back).expect("read back");
    assert!(back == page, "the huge page reads back as placed");
    assert_eq!(uffd.install_zero_page(PageRef::new(0, 0)).expect("zero huge page"), Install::Installed);
    let mut first = vec![1u8; 4096];
    uffd.ram().read_pages(PageRef::new(0, 511), &mut first).expect("read the zero page's last 4 KiB");
    assert!(first.iter().all(|&b| b == 0));
}

/// A huge page arriving in parts: each part placed through the placement
/// mapping leaves the page invisible (a guest touch keeps waiting on its
/// fault); one `UFFDIO_CONTINUE` of the whole page maps it and wakes the
/// waiter, which reads the placed bytes; a part of a mapped page is never
/// written. Skips where no 2 MiB page can be reserved.
#[test]
fn huge_page_parts_stay_invisible_until_the_page_is_mapped_whole() {
    use postcopy_kvm::HugePageSize;
    let test = "huge_page_parts_stay_invisible_until_the_page_is_mapped_whole";
    if !uffd_or_skip(test) || !huge_pages_or_skip(test, 2) {
        return;
    }
    let ram = GuestRam::new_preallocated_with(MemoryMap::pc(4 * MIB).expect("layout"), Some(HugePageSize::Size2M))
        .expect("ram");
    let m = Arc::new(UffdRam::register(Arc::new(ram)).expect("register huge-page RAM for minor faults"));
    let mut reader = m.fault_reader();
    let page = PageRef::new(0, 512);
    let bytes: Vec<u8> = (0..2 * MIB as usize).map(|i| (i / 4096) as u8 ^ 0xa5).collect();
    let toucher = touch(&m, page);
    assert_eq!(one_fault(&mut reader).page / 512, 1, "the touch faults on the second huge page");
    let half = MIB as usize;
    // The second half first: parts arrive in any order.
    assert!(m.place_part(page, half, &bytes[half..]).expect("place the second half"));
    assert!(m.place_part(page, 0, &bytes[..half]).expect("place the first half"));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!toucher.is_finished(), "a placed page is visible before it is mapped");
    let (installed, ()) = m.map_placed_page_with(page, || ()).expect("map the placed page");
    assert_eq!(installed, Install::Installed);
    let first_word = toucher.join().expect("the toucher");
    assert_eq!(first_word, u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")));
    let mut back = vec![0u8; 2 * MIB as usize];
    m.ram().read_pages(page, &mut back).expect("read back");
    assert!(back == bytes, "the page reads back as placed");
    // A late part of a mapped page is dropped, the page left as it is.
    assert!(!m.place_part(page, 0, &vec![0u8; half]).expect("a late part"));
    m.ram().read_pages(page, &mut back).expect("read back again");
    assert!(back == bytes, "a late part changed a mapped page");
    // Parts are whole 4 KiB pages inside the huge page.
    assert!(m.place_part(PageRef::new(0, 0), 100, &page_of(1)).is_err());
    assert!(m.place_part(PageRef::new(0, 0), 2 * half, &page_of(1)).is_err());
}

/// Reads `page`'s first word through the guest's mapping in a thread (which
/// blocks on a fault until the page is installed).
fn touch(m: &Arc<UffdRam>, page: PageRef) -> std::thread::JoinHandle<u64> {
    let gpa = m.ram().layout().gpa_of(page).unwrap();
    let m = m.clone();
    std::thread::spawn(move || m.ram().read_u64(gpa).expect("read"))
}

/// Waits for exactly one fault and returns its page.
fn one_fault(reader: &mut postcopy_kvm::uffd::FaultReader) -> PageRef {
    assert!(reader.wait(Duration::from_secs(5)).unwrap(), "no fault arrived: the touch did not wait for the page");
    let mut faults = Vec::new();
    assert_eq!(reader.read(&mut faults).unwrap(), 1);
    faults[0].page
}

/// RAM whose pages are not allocated yet: a guest touch of such a page is a
/// (missing) fault that waits for the page, never a zero page mapped behind
/// the migration's back; a data or zero install allocates the page and wakes
/// the waiter; populating afterwards keeps every placed page as it is, and a
/// touch of a page populated but not installed still waits for it (minor
/// fault).
#[test]
fn unpopulated_pages_fault_and_populating_keeps_placed_pages() {
    if !uffd_or_skip("unpopulated_pages_fault_and_populating_keeps_placed_pages") {
        return;
    }
    let m = fresh(2, Kind::Unpopulated);
    let mut reader = m.fault_reader();
    // Missing faults, resolved by a data and by a zero install.
    let (data_page, zero_page) = (PageRef::new(0, 3), PageRef::new(0, 4));
    let toucher = touch(&m, data_page);
    assert_eq!(one_fault(&mut reader), data_page);
    assert_eq!(m.install_page(data_page, &page_of(0x5a)).unwrap(), Install::Installed);
    assert_eq!(toucher.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
    let toucher = touch(&m, zero_page);
    assert_eq!(one_fault(&mut reader), zero_page);
    assert_eq!(m.install_zero_page(zero_page).unwrap(), Install::Installed);
    assert_eq!(toucher.join().unwrap(), 0);
    // Installed without a fault (the push), before the population.
    let mut run = Vec::new();
    for i in 0..4u8 {
        run.extend_from_slice(&page_of(0x20 + i));
    }
    assert_eq!(m.install_pages(PageRef::new(0, 10), &run).unwrap().installed, 4);
    // Populating the whole block changes none of them.
    m.ram().populate_pages(PageRef::new(0, 0), 512).expect("populate");
    let mut back = page_of(1);
    for (page, want) in [(3, 0x5a), (4, 0), (10, 0x20), (11, 0x21), (12, 0x22), (13, 0x23)] {
        m.ram().read_page(PageRef::new(0, page), &mut back).unwrap();
        assert!(back.iter().all(|&b| b == want), "page {page} changed by the population");
    }
    // Populated, not installed: still a fault (minor now), still served.
    let populated = PageRef::new(0, 200);
    let toucher = touch(&m, populated);
    assert_eq!(one_fault(&mut reader), populated);
    assert_eq!(m.install_page(populated, &page_of(0x33)).unwrap(), Install::Installed);
    assert_eq!(toucher.join().unwrap(), 0x3333_3333_3333_3333);
    // A population request outside the RAM is an error, not a crash.
    assert!(m.ram().populate_pages(PageRef::new(0, 511), 2).is_err());
    assert!(GuestRam::new(MemoryMap::pc(2 * MIB).unwrap()).unwrap().populate_pages(PageRef::new(0, 0), 1).is_err());
}

/// The background population goes through all the RAM, in chunks, around
/// pages installed while it runs (their contents kept), and stops on request.
#[test]
fn background_population_covers_the_ram_and_stops() {
    use postcopy_kvm::driver::populate::{Population, CHUNK_PAGES};
    if !uffd_or_skip("background_population_covers_the_ram_and_stops") {
        return;
    }
    let m = fresh(64, Kind::Unpopulated);
    let total: u64 = m.ram().layout().blocks().iter().map(|b| b.pages()).sum();
    let population = Population::start(m.ram().clone(), None).expect("start");
    // Installs race with the population: every one lands, whichever of the
    // two allocates the page.
    for page in (0..total).step_by(997) {
        let p = PageRef::new(0, page);
        assert_eq!(m.install_page(p, &page_of((page % 251) as u8 + 1)).unwrap(), Install::Installed, "page {page}");
    }
    let done = population.wait();
    assert!(done.complete && done.error.is_none(), "{done:?}");
    assert!(population.has_reached(PageRef::new(0, total - 1)));
    assert_eq!((done.pages, done.total_pages), (total, total));
    let mut back = page_of(0);
    for page in (0..total).step_by(997) {
        m.ram().read_page(PageRef::new(0, page), &mut back).unwrap();
        assert!(back.iter().all(|&b| b == (page % 251) as u8 + 1), "page {page} changed by the population");
    }
    // Stopped at once: it ends between two chunks, whatever it reached.
    let big = fresh(256, Kind::Unpopulated);
    let big_total: u64 = big.ram().layout().blocks().iter().map(|b| b.pages()).sum();
    let population = Population::start(big.ram().clone(), None).expect("start");
    let stopped = population.stop();
    assert!(stopped.pages <= big_total && (stopped.complete || stopped.pages % CHUNK_PAGES == 0), "{stopped:?}");
    assert_eq!(population.summary(), stopped, "the thread ran on after the stop");
    // Faults are counted against where it stopped.
    population.note_fault(PageRef::new(0, big_total - 1));
    assert_eq!(population.summary().faults_ahead, u64::from(!stopped.complete));
    assert_eq!(population.has_reached(PageRef::new(0, 0)), stopped.pages > 0);
}

/// Fallback's copy-on-write checkpoints: a write to a write-protected page
/// waits, as a write-protect fault (not a missing page), until the page is
/// unprotected; reads go through; pages not protected are written freely.
#[test]
fn a_write_to_a_write_protected_page_waits_for_its_unprotection() {
    if !uffd_or_skip("a_write_to_a_write_protected_page_waits_for_its_unprotection") {
        return;
    }
    for kind in KINDS {
        eprintln!("RAM: {kind:?}");
        let layout = MemoryMap::pc(2 * MIB).expect("layout");
        let ram = match kind {
            Kind::Anonymous => GuestRam::new(layout),
            Kind::Preallocated => GuestRam::new_preallocated(layout),
            Kind::Unpopulated => GuestRam::new_unpopulated(layout),
        };
        let m = Arc::new(UffdRam::register_with_write_protect(Arc::new(ram.expect("ram")), true).expect("register"));
        let (page, other) = (PageRef::new(0, 42), PageRef::new(0, 43));
        for p in [page, other] {
            assert_eq!(m.install_page(p, &page_of(7)).unwrap(), Install::Installed);
        }
        let gpa = m.ram().layout().gpa_of(page).unwrap();
        m.write_protect(page, 1).expect("write-protect");
        // Reading a protected page, and writing a page beside it, do not fault.
        assert_eq!(m.ram().read_u64(gpa).unwrap(), u64::from_le_bytes([7; 8]));
        m.ram().write_u64(gpa + PAGE_SIZE, 9).expect("write beside");
        let mut reader = m.fault_reader();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (m, done) = (m.clone(), done.clone());
            std::thread::spawn(move || {
                m.ram().write_u64(gpa, 5).expect("write");
                done.store(true, Ordering::SeqCst);
            })
        };
        assert!(reader.wait(Duration::from_secs(5)).unwrap(), "no write-protect fault");
        let mut faults = Vec::new();
        assert_eq!(reader.read(&mut faults).unwrap(), 1);
        assert_eq!(faults[0].page, page);
        assert!(faults[0].write && faults[0].write_protected, "{:?}", faults[0]);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!done.load(Ordering::SeqCst), "the write did not wait");
        // The checkpoint's copy, taken before the write goes through.
        assert_eq!(m.ram().read_u64(gpa).unwrap(), u64::from_le_bytes([7; 8]));
        m.unprotect(page, 1).expect("unprotect");
        writer.join().unwrap();
        assert_eq!(m.ram().read_u64(gpa).unwrap(), 5);
    }
}
