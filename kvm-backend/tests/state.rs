//! vCPU and VM state: the versioned blob rejects bad bytes, and a state
//! restored into a new VM reads back as saved and runs on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use postcopy_kvm::guest::abi::LM_STACKS_ADDR;
use postcopy_kvm::layout::MIB;
use postcopy_kvm::state::{MAX_STATE_BYTES, STATE_VERSION};
use postcopy_kvm::vcpu::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use postcopy_kvm::{DeviceState, Error, GuestRam, MemoryMap, VcpuSet, Vm, VmConfig, PAGE_SIZE};

fn copy_ram(src: &GuestRam, dst: &GuestRam) {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for page in src.layout().pages() {
        src.read_page(page, &mut buf).unwrap();
        dst.write_page(page, &buf).unwrap();
    }
}

#[test]
fn blob_rejects_bad_bytes() {
    if !kvm_or_skip("blob_rejects_bad_bytes") {
        return;
    }
    let a = start_pattern_vm(16 * MIB, 2, true);
    a.set.pause().unwrap();
    let state = DeviceState::capture(&a.vm, &a.set).unwrap();
    let blob = state.to_bytes().unwrap();
    assert!(blob.len() < 64 * 1024, "{} bytes", blob.len());
    let back = DeviceState::from_bytes(&blob).unwrap();
    assert_eq!(back.to_bytes().unwrap(), blob, "decode/encode is the identity");

    fn is_state_err<T>(r: Result<T, Error>) -> bool {
        matches!(r, Err(Error::State(_)))
    }
    // Every truncation.
    for len in [0, 1, 8, 15, 16, 23, blob.len() / 2, blob.len() - 1] {
        assert!(is_state_err(DeviceState::from_bytes(&blob[..len])), "truncated to {len}");
    }
    // One flipped bit anywhere: magic, version, length, payload, checksum.
    for pos in [0, 7, 8, 12, 13, 20, blob.len() / 2, blob.len() - 9, blob.len() - 1] {
        let mut bad = blob.clone();
        bad[pos] ^= 0x04;
        assert!(is_state_err(DeviceState::from_bytes(&bad)), "bit flipped at {pos}");
    }
    // A newer version.
    let mut bad = blob.clone();
    bad[8..12].copy_from_slice(&(STATE_VERSION + 1).to_le_bytes());
    assert!(is_state_err(DeviceState::from_bytes(&bad)));
    // Trailing bytes, oversize, garbage.
    let mut bad = blob.clone();
    bad.push(0);
    assert!(is_state_err(DeviceState::from_bytes(&bad)));
    assert!(is_state_err(DeviceState::from_bytes(&vec![0u8; MAX_STATE_BYTES + 1])));
    let mut x = 0x9e37_79b9u32;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    assert!(is_state_err(DeviceState::from_bytes(&garbage)));

    // A well-formed state that does not fit the target VM.
    let other = Arc::new(GuestRam::new(MemoryMap::pc(32 * MIB).unwrap()).unwrap());
    let vm = Vm::new(other, VmConfig::new(2)).unwrap();
    let vcpus = vm.create_vcpus().unwrap();
    assert!(is_state_err(back.restore(&vm, &vcpus)), "RAM layout mismatch");
    let same = Arc::new(GuestRam::new(MemoryMap::pc(16 * MIB).unwrap()).unwrap());
    let vm = Vm::new(same, VmConfig::new(1)).unwrap();
    let vcpus = vm.create_vcpus().unwrap();
    assert!(is_state_err(back.restore(&vm, &vcpus)), "vCPU count mismatch");
    let same = Arc::new(GuestRam::new(MemoryMap::pc(16 * MIB).unwrap()).unwrap());
    let vm = Vm::new(same, VmConfig { irqchip: false, ..VmConfig::new(2) }).unwrap();
    let vcpus = vm.create_vcpus().unwrap();
    assert!(back.restore(&vm, &vcpus).is_err(), "irqchip mismatch");
    a.set.stop().unwrap();
}

#[test]
fn restored_state_reads_back_and_runs() {
    if !kvm_or_skip("restored_state_reads_back_and_runs") {
        return;
    }
    for irqchip in [true, false] {
        let a = start_pattern_vm(32 * MIB, 2, irqchip);
        wait_for_passes(&a.vm, 2, Duration::from_secs(60));
        a.set.pause().unwrap();
        let saved = DeviceState::capture(&a.vm, &a.set).unwrap();
        let blob = saved.to_bytes().unwrap();

        let b_ram = Arc::new(GuestRam::new(a.ram.layout().clone()).unwrap());
        copy_ram(&a.ram, &b_ram);
        let b_vm = Vm::new(b_ram.clone(), VmConfig { irqchip, ..VmConfig::new(2) }).unwrap();
        let b_vcpus = b_vm.create_vcpus().unwrap();
        DeviceState::from_bytes(&blob).unwrap().restore(&b_vm, &b_vcpus).unwrap();
        for (v, s) in b_vcpus.iter().zip(&saved.vcpus) {
            let r = v.save_state().unwrap();
            assert_eq!(r.regs, s.regs);
            assert_eq!(r.sregs, s.sregs);
            assert_eq!(r.fpu, s.fpu);
            assert_eq!(r.xsave, s.xsave);
            assert_eq!(r.xcrs, s.xcrs);
            assert_eq!(r.debug_regs, s.debug_regs);
            assert_eq!(r.mp_state, s.mp_state);
            assert_eq!(r.cpuid, s.cpuid);
            assert_eq!(r.lapic.map(|l| l.regs), s.lapic.map(|l| l.regs));
            assert_eq!(r.lapic.is_some(), irqchip);
            assert_eq!(r.vcpu_events.exception, s.vcpu_events.exception);
            assert_eq!(r.vcpu_events.interrupt, s.vcpu_events.interrupt);
            assert_eq!(r.vcpu_events.nmi, s.vcpu_events.nmi);
            assert_eq!(r.msrs.len(), s.msrs.len());
            assert!(s.msrs.len() > 10, "{} MSRs saved", s.msrs.len());
            for (x, y) in r.msrs.iter().zip(&s.msrs) {
                assert_eq!(x.index, y.index);
                if x.index == MSR_IA32_TSC {
                    // The TSC keeps counting between the restore and the read.
                    assert!(x.data >= y.data && x.data - y.data < 1 << 40, "TSC {:#x} -> {:#x}", y.data, x.data);
                } else if x.index != MSR_IA32_TSC_DEADLINE {
                    assert_eq!(x, y, "MSR {:#x}", x.index);
                }
            }
        }
        let b_set = VcpuSet::start(b_vcpus, b_vm.devices().clone()).unwrap();
        wait_for_passes(&b_vm, 2, Duration::from_secs(60));
        b_set.pause().unwrap();
        let states = b_set.save_states().unwrap();
        let pos = positions(&a.guest, &states);
        let before = positions(&a.guest, &saved.vcpus);
        assert!(pos.iter().zip(&before).all(|(b, a)| b.passes >= a.passes + 2));
        let report = a.guest.verify(&b_ram, &pos).unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(b_vm.devices().stats().error_count(), 0);
        b_set.stop().unwrap();
        a.set.stop().unwrap();
    }
}

#[test]
fn dirty_log_tracks_guest_and_vmm_writes() {
    if !kvm_or_skip("dirty_log_tracks_guest_and_vmm_writes") {
        return;
    }
    let a = start_pattern_vm(32 * MIB, 1, true);
    wait_for_passes(&a.vm, 1, Duration::from_secs(60));
    assert!(a.vm.take_dirty_log().is_err(), "logging is off");
    a.vm.set_dirty_logging(true).unwrap();
    // A whole pass with logging on dirties every page of the share.
    wait_for_more_passes(&a.vm, 2, Duration::from_secs(60));
    let layout = a.ram.layout().clone();
    let share = a.guest.share(0).unwrap().clone();
    let dirty = a.vm.take_dirty_log().unwrap();
    assert!(dirty.count() >= share.pages(), "{} dirty pages, share of {}", dirty.count(), share.pages());
    // The guest writes only to its share and to the counter word at the top
    // of its stack page.
    let stack_page = LM_STACKS_ADDR;
    let mut stack_dirty = false;
    for p in dirty.iter() {
        let gpa = layout.gpa_of(p).unwrap();
        stack_dirty |= gpa == stack_page;
        assert!(gpa == stack_page || share.ranges.iter().any(|&(s, e)| gpa >= s && gpa < e), "{gpa:#x} dirty");
    }
    assert!(stack_dirty, "the counter word's page {stack_page:#x} not dirty");
    a.set.pause().unwrap();
    let _ = a.vm.take_dirty_log().unwrap();
    assert!(a.vm.take_dirty_log().unwrap().is_empty(), "paused guest dirtied pages");
    // Writes by the VMM count too.
    a.ram.write_u64(0x9000, 1).unwrap();
    let d = a.vm.take_dirty_log().unwrap();
    assert_eq!(d.iter().map(|p| layout.gpa_of(p).unwrap()).collect::<Vec<_>>(), vec![0x9000]);
    // While paused with logging on, the pattern still verifies.
    let states = a.set.save_states().unwrap();
    assert!(a.guest.verify(&a.ram, &positions(&a.guest, &states)).unwrap().is_ok());
    a.vm.set_dirty_logging(false).unwrap();
    a.set.resume();
    a.set.stop().unwrap();
}
