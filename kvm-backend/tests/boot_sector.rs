//! PC boot sectors on real KVM: started in real mode at 0000:7c00 with
//! DL = 0x80, serial output at 0x3f8, A20 through port 0x92, switch to
//! protected mode.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use postcopy_kvm::guest::abi::{TEST_BOOT_MARKER, TEST_BOOT_MARKER_ADDR};
use postcopy_kvm::guest::programs::TEST_BOOT_EXPECTED_SERIAL;
use postcopy_kvm::layout::MIB;
use postcopy_kvm::{BootSector, GuestRam, MemoryMap, RunState, SerialOutput, VcpuSet, Vm, VmConfig};

struct Booted {
    ram: Arc<GuestRam>,
    vm: Vm,
    set: VcpuSet,
    serial: Arc<Mutex<Vec<u8>>>,
}

fn boot(sector: &BootSector, irqchip: bool) -> Booted {
    let ram = Arc::new(GuestRam::new(MemoryMap::pc(16 * MIB).unwrap()).unwrap());
    sector.load(&ram).unwrap();
    let (out, serial) = SerialOutput::buffer();
    let vm = Vm::new(ram.clone(), VmConfig { vcpus: 1, irqchip, serial: out }).unwrap();
    let vcpus = vm.create_vcpus().unwrap();
    BootSector::configure_vcpus(&vcpus, irqchip).unwrap();
    let set = VcpuSet::start(vcpus, vm.devices().clone()).unwrap();
    Booted { ram, vm, set, serial }
}

fn wait_serial(b: &Booted, want: &str) -> String {
    let t0 = Instant::now();
    loop {
        let s = String::from_utf8_lossy(&b.serial.lock().unwrap()).into_owned();
        if s.contains(want) || t0.elapsed() > Duration::from_secs(20) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn check_protected_mode(b: &Booted) {
    assert_eq!(b.ram.read_u64(TEST_BOOT_MARKER_ADDR).unwrap() as u32, TEST_BOOT_MARKER);
    assert!(b.vm.devices().a20_enabled());
    let states = b.set.save_states().unwrap();
    let s = &states[0].sregs;
    assert_eq!(s.cr0 & 1, 1, "CR0.PE");
    assert_eq!((s.cs.selector, s.cs.db), (0x08, 1), "32-bit code segment");
    assert_eq!(s.ds.selector, 0x10);
}

#[test]
fn test_boot_sector_with_irqchip() {
    if !kvm_or_skip("test_boot_sector_with_irqchip") {
        return;
    }
    let b = boot(&BootSector::test_image(), true);
    let out = wait_serial(&b, TEST_BOOT_EXPECTED_SERIAL);
    assert_eq!(out, TEST_BOOT_EXPECTED_SERIAL);
    // With the in-kernel LAPIC, HLT blocks in the kernel; the pause must
    // still get the vCPU out.
    let latency = b.set.pause().unwrap();
    eprintln!("pause of a halted vCPU took {latency:?}");
    assert_eq!(b.set.states(), vec![RunState::Paused]);
    check_protected_mode(&b);
    b.set.stop().unwrap();
}

#[test]
fn test_boot_sector_without_irqchip_exits_on_hlt() {
    if !kvm_or_skip("test_boot_sector_without_irqchip_exits_on_hlt") {
        return;
    }
    let b = boot(&BootSector::test_image(), false);
    let out = wait_serial(&b, TEST_BOOT_EXPECTED_SERIAL);
    assert_eq!(out, TEST_BOOT_EXPECTED_SERIAL);
    let t0 = Instant::now();
    while b.set.states() != vec![RunState::Halted] {
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", b.set.states());
        std::thread::sleep(Duration::from_millis(5));
    }
    check_protected_mode(&b);
    b.set.stop().unwrap();
}

#[test]
fn any_boot_sector_image_runs() {
    if !kvm_or_skip("any_boot_sector_image_runs") {
        return;
    }
    // Hand-assembled: prints DL as a letter ('A' + DL - 0x80 = 'A'), the
    // CS:IP it runs at via a call/pop, then "ok", and asks for a reset
    // through port 0x92, which the VMM treats as a shutdown.
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x88, 0xd0,             // mov al, dl
        0x2c, 0x3f,             // sub al, 0x3f        (0x80 - 0x3f = 'A')
        0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xee,                   // out dx, al
        0xe8, 0x00, 0x00,       // call next
        0x5b,                   // next: pop bx        (bx = 0x7c0b)
        0x88, 0xf8,             // mov al, bh          (0x7c = '|')
        0xee,                   // out dx, al
        0xb0, b'o', 0xee,       // mov al, 'o'; out
        0xb0, b'k', 0xee,       // mov al, 'k'; out
        0xb0, 0x01,             // mov al, 1
        0xe6, 0x92,             // out 0x92, al        (fast reset)
        0xf4,                   // hlt (not reached)
    ];
    let mut image = vec![0u8; 512];
    image[..code.len()].copy_from_slice(code);
    image[510] = 0x55;
    image[511] = 0xaa;
    let sector = BootSector::from_bytes(&image).unwrap();
    let b = boot(&sector, true);
    let out = wait_serial(&b, "ok");
    assert_eq!(out, "A|ok");
    let t0 = Instant::now();
    while b.set.states() != vec![RunState::Shutdown] {
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", b.set.states());
        std::thread::sleep(Duration::from_millis(5));
    }
    b.set.stop().unwrap();
}
