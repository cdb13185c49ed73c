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
    std::thread::sleep(Duration::from_millis(500));
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
