//! Helpers shared by the KVM integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use postcopy_kvm::{CpuPosition, GuestRam, MemoryMap, TestGuest, VcpuSet, VcpuState, Vm, VmConfig};

/// Env var that turns a skip (no /dev/kvm or /dev/userfaultfd) into a failure.
pub const REQUIRE_KVM_ENV: &str = "POSTCOPY_REQUIRE_KVM";

fn required() -> bool {
    std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1")
}

/// True if KVM can be used; otherwise prints why the test is skipped (or
/// panics when `POSTCOPY_REQUIRE_KVM=1`).
pub fn kvm_or_skip(test: &str) -> bool {
    if postcopy_kvm::kvm_available() {
        return true;
    }
    if required() {
        panic!("{test}: /dev/kvm is not usable and {REQUIRE_KVM_ENV}=1");
    }
    eprintln!("SKIPPED {test}: /dev/kvm is not usable (set {REQUIRE_KVM_ENV}=1 to fail instead)");
    false
}

/// True if `pages` 2 MiB huge pages are free; otherwise prints why the test
/// is skipped (`reason`), or panics when `POSTCOPY_REQUIRE_KVM=1`.
pub fn huge_pages_or_skip(test: &str, pages: u64) -> bool {
    match postcopy_kvm::HugePageSize::Size2M.check_free(pages) {
        Ok(()) => true,
        Err(e) if required() => panic!("{test}: {e} and {REQUIRE_KVM_ENV}=1"),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e} (set {REQUIRE_KVM_ENV}=1 to fail instead)");
            false
        }
    }
}

/// True if KVM and userfaultfd (with kernel faults) can be used.
pub fn uffd_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    match postcopy_kvm::uffd::probe_features() {
        Ok(_) => true,
        Err(e) if required() => {
            panic!("{test}: userfaultfd unusable ({e}) and {REQUIRE_KVM_ENV}=1")
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: userfaultfd unusable: {e} (set {REQUIRE_KVM_ENV}=1 to fail instead)");
            false
        }
    }
}

/// A running pattern guest.
pub struct PatternVm {
    pub guest: TestGuest,
    pub ram: Arc<GuestRam>,
    pub vm: Vm,
    pub set: VcpuSet,
}

/// Builds and starts the pattern guest.
pub fn start_pattern_vm(mem_bytes: u64, vcpus: usize, irqchip: bool) -> PatternVm {
    let layout = MemoryMap::pc(mem_bytes).expect("layout");
    let guest = TestGuest::new(&layout, vcpus).expect("guest");
    let ram = Arc::new(GuestRam::new(layout).expect("ram"));
    guest.load(&ram).expect("load");
    let vm = Vm::new(ram.clone(), VmConfig { irqchip, ..VmConfig::new(vcpus) }).expect("vm");
    let v = vm.create_vcpus().expect("vcpus");
    guest.configure_vcpus(&v).expect("configure");
    let set = VcpuSet::start(v, vm.devices().clone()).expect("start");
    PatternVm { guest, ram, vm, set }
}

/// Positions of every vCPU from saved states.
pub fn positions(guest: &TestGuest, states: &[VcpuState]) -> Vec<CpuPosition> {
    states.iter().enumerate().map(|(i, s)| guest.position_from_regs(i, &s.regs).expect("position")).collect()
}

/// Waits until every vCPU reported at least `passes` passes, or panics.
pub fn wait_for_passes(vm: &Vm, passes: u64, timeout: Duration) {
    let t0 = std::time::Instant::now();
    loop {
        let s = vm.devices().stats().snapshot();
        if s.reports.iter().all(|&r| r >= passes) {
            return;
        }
        assert!(t0.elapsed() < timeout, "guest too slow: {:?} passes after {:?}", s.reports, timeout);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until every vCPU reported `more` passes beyond the count now.
pub fn wait_for_more_passes(vm: &Vm, more: u64, timeout: Duration) {
    let base = vm.devices().stats().snapshot().reports;
    let t0 = std::time::Instant::now();
    loop {
        let s = vm.devices().stats().snapshot();
        if s.reports.iter().zip(&base).all(|(r, b)| *r >= b + more) {
            return;
        }
        assert!(t0.elapsed() < timeout, "guest too slow: {:?} -> {:?} passes in {:?}", base, s.reports, timeout);
        std::thread::sleep(Duration::from_millis(2));
    }
}
