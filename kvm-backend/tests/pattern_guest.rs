//! The built-in pattern guest on real KVM: it runs, reports progress, pauses
//! and resumes quickly, and memory follows its pattern at every stop.

mod common;

use std::time::Duration;

use common::*;
use postcopy_kvm::layout::MIB;

#[test]
fn pattern_guest_runs_pauses_resumes_and_verifies() {
    if !kvm_or_skip("pattern_guest_runs_pauses_resumes_and_verifies") {
        return;
    }
    let p = start_pattern_vm(64 * MIB, 2, true);
    wait_for_passes(&p.vm, 3, Duration::from_secs(60));
    let stop = p.set.pause().expect("pause");
    let states = p.set.save_states().expect("save");
    let pos1 = positions(&p.guest, &states);
    let report = p.guest.verify(&p.ram, &pos1).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.pages_checked, p.guest.pattern_pages());
    assert!(pos1.iter().all(|x| x.passes >= 3), "{pos1:?}");
    eprintln!("stop latency {stop:?}, positions {pos1:?}");

    p.set.resume();
    let before = p.vm.devices().stats().snapshot();
    wait_for_more_passes(&p.vm, 2, Duration::from_secs(60));
    let after = p.vm.devices().stats().snapshot();
    let stop2 = p.set.pause().expect("pause");
    let states = p.set.save_states().expect("save");
    let pos2 = positions(&p.guest, &states);
    assert!(pos2.iter().zip(&pos1).all(|(b, a)| b.passes > a.passes), "{pos1:?} -> {pos2:?}");
    let report = p.guest.verify(&p.ram, &pos2).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(p.vm.devices().stats().error_count(), 0);
    eprintln!("stop latency {stop2:?}, rates {:?} passes/s", after.rates_since(&before));
    p.set.stop().expect("stop");
}

#[test]
fn stop_latency_over_many_pauses() {
    if !kvm_or_skip("stop_latency_over_many_pauses") {
        return;
    }
    let p = start_pattern_vm(64 * MIB, 4, true);
    wait_for_passes(&p.vm, 1, Duration::from_secs(60));
    let mut us: Vec<f64> = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let d = p.set.pause().expect("pause");
            p.set.resume();
            d.as_secs_f64() * 1e6
        })
        .collect();
    us.sort_by(f64::total_cmp);
    eprintln!(
        "stop latency of 4 vCPUs over 20 pauses: min {:.0} us, median {:.0} us, max {:.0} us",
        us[0], us[10], us[19]
    );
    // Bounded by CONTROL_TIMEOUT anyway; this is a sanity bound, not a benchmark.
    assert!(us[10] < 50_000.0, "median stop latency {:.0} us", us[10]);
    p.set.pause().expect("pause");
    let states = p.set.save_states().expect("save");
    let report = p.guest.verify(&p.ram, &positions(&p.guest, &states)).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(p.vm.devices().stats().error_count(), 0);
    p.set.stop().expect("stop");
}

#[test]
fn eight_gib_guest_with_a_hole_runs_and_verifies() {
    if !kvm_or_skip("eight_gib_guest_with_a_hole_runs_and_verifies") {
        return;
    }
    let p = start_pattern_vm(8 * 1024 * MIB, 4, true);
    assert_eq!(p.ram.layout().blocks().len(), 2, "RAM above 4 GiB");
    // Wait until every vCPU has done some pages, then check all 8 GiB.
    let t0 = std::time::Instant::now();
    let pos = loop {
        std::thread::sleep(Duration::from_millis(200));
        p.set.pause().expect("pause");
        let states = p.set.save_states().expect("save");
        let pos = positions(&p.guest, &states);
        if pos.iter().all(|x| x.passes > 0 || x.pages_done > 1000) {
            break pos;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{pos:?}");
        p.set.resume();
    };
    let t0 = std::time::Instant::now();
    let report = p.guest.verify(&p.ram, &pos).expect("verify");
    assert!(report.is_ok(), "{report:?}");
    eprintln!("8 GiB: positions {pos:?}, verified {} pages in {:?}", report.pages_checked, t0.elapsed());
    p.set.stop().expect("stop");
}

#[test]
fn shares_with_several_ranges_are_walked_across_holes() {
    if !kvm_or_skip("shares_with_several_ranges_are_walked_across_holes") {
        return;
    }
    use postcopy_kvm::{GuestRam, MemoryMap, MemoryRegion, TestGuest, VcpuSet, Vm, VmConfig};
    use std::sync::Arc;
    let block = |name: &str, gpa, size| MemoryRegion { name: name.into(), gpa, size };
    let layout = MemoryMap::new(vec![
        block("low", 0, 6 * MIB),
        block("mid", 10 * MIB, 4 * MIB),
        block("high", 64 * MIB, 6 * MIB),
    ])
    .expect("layout");
    for vcpus in [1, 2] {
        let guest = TestGuest::new(&layout, vcpus).expect("guest");
        assert!((0..vcpus).any(|v| guest.share(v).expect("share").ranges.len() >= 2));
        let ram = Arc::new(GuestRam::new(layout.clone()).expect("ram"));
        guest.load(&ram).expect("load");
        let vm = Vm::new(ram.clone(), VmConfig::new(vcpus)).expect("vm");
        let v = vm.create_vcpus().expect("vcpus");
        guest.configure_vcpus(&v).expect("configure");
        let set = VcpuSet::start(v, vm.devices().clone()).expect("start");
        wait_for_passes(&vm, 3, Duration::from_secs(60));
        set.pause().expect("pause");
        let states = set.save_states().expect("save");
        let pos = positions(&guest, &states);
        let report = guest.verify(&ram, &pos).expect("verify");
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.pages_checked, (16 * MIB - MIB) / postcopy_kvm::PAGE_SIZE);
        assert_eq!(vm.devices().stats().error_count(), 0);
        set.stop().expect("stop");
    }
}

/// The counter word (a copy of `r12` at the top of each vCPU's stack page)
/// agrees with the registers at every stop, and a word out of step, as
/// memory saved at a later instant than the registers would leave it, is
/// reported by the guest at its next page, then repaired.
#[test]
fn a_counter_word_out_of_step_with_the_registers_is_reported() {
    if !kvm_or_skip("a_counter_word_out_of_step_with_the_registers_is_reported") {
        return;
    }
    let p = start_pattern_vm(32 * MIB, 1, true);
    wait_for_passes(&p.vm, 1, Duration::from_secs(60));
    p.set.pause().expect("pause");
    let regs = p.set.save_states().expect("save")[0].regs;
    let at = regs.rsp - 8;
    let word = p.ram.read_u64(at).expect("read the counter word");
    assert!(regs.r12 > 0, "no page written yet");
    // r12 - 1 only between the increment and the check-and-store; the word is
    // what the guest expects at its next check either way.
    assert!(word == regs.r12 || word + 1 == regs.r12, "counter word {word} with r12 = {}", regs.r12);
    let wrong = regs.r12 + 1000;
    p.ram.write_u64(at, wrong).expect("write the counter word");
    p.set.resume();
    wait_for_more_passes(&p.vm, 1, Duration::from_secs(60));
    p.set.pause().expect("pause");
    let errors = p.vm.devices().stats().errors();
    assert_eq!(
        errors,
        vec![postcopy_kvm::devices::GuestErrorReport { vcpu: 0, gpa: at, expected: word, found: wrong }]
    );
    let states = p.set.save_states().expect("save");
    let word_now = p.ram.read_u64(at).expect("read the counter word");
    let r12_now = states[0].regs.r12;
    assert!(word_now == r12_now || word_now + 1 == r12_now, "not repaired: {word_now} with r12 = {r12_now}");
    assert!(p.guest.verify(&p.ram, &positions(&p.guest, &states)).expect("verify").is_ok());
    p.set.stop().expect("stop");
}
