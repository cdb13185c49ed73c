//! PC boot sectors: a raw 512-byte image loaded at 0x7c00 and started in real
//! mode as a BIOS would (CS:IP = 0000:7c00, DL = 0x80 for the first hard
//! disk).
//!
//! There is no BIOS: the interrupt vector table points every vector at an
//! `iret`, so a stray `int 10h` returns instead of jumping into zeroes. Output
//! goes through the 16550 serial port at 0x3f8 and A20 is enabled through
//! System Control Port A (0x92), both emulated by [`crate::devices`].

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::abi::BOOT_SECTOR_ADDR;
use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::vcpu::Vcpu;

/// Size of a boot sector.
pub const BOOT_SECTOR_SIZE: usize = 512;
/// Where the `iret` stub that every interrupt vector points to lives
/// (F000:FF53, where PC BIOSes keep theirs).
pub const IRET_STUB_ADDR: u64 = 0xf_ff53;

/// A boot-sector image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSector {
    image: [u8; BOOT_SECTOR_SIZE],
}

impl BootSector {
    /// Checks an image: exactly 512 bytes ending in the 0x55 0xAA signature
    /// (a BIOS refuses to boot a sector without it).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let image: [u8; BOOT_SECTOR_SIZE] = bytes
            .try_into()
            .map_err(|_| Error::BootSector(format!("{} bytes, a boot sector has {BOOT_SECTOR_SIZE}", bytes.len())))?;
        if image[510..] != [0x55, 0xaa] {
            return Err(Error::BootSector("no 0x55 0xAA signature".into()));
        }
        Ok(Self { image })
    }

    /// The built-in test sector: prints over serial in real mode, enables A20
    /// through port 0x92, enters 32-bit protected mode, writes
    /// [`super::abi::TEST_BOOT_MARKER`] at 1 MiB, prints again, halts.
    pub fn test_image() -> Self {
        Self { image: super::programs::TEST_BOOT_SECTOR }
    }

    /// The image bytes.
    pub fn bytes(&self) -> &[u8; BOOT_SECTOR_SIZE] {
        &self.image
    }

    /// Writes the interrupt vector table, the `iret` stub and the sector.
    pub fn load(&self, ram: &GuestRam) -> Result<()> {
        if ram.layout().top() < 0x10_0000 {
            return Err(Error::Config("a boot sector needs at least 1 MiB of RAM".into()));
        }
        let seg = (IRET_STUB_ADDR >> 4) as u16 & 0xf000;
        let off = (IRET_STUB_ADDR - (u64::from(seg) << 4)) as u16;
        let ivt: Vec<u8> = (0..256).flat_map(|_| off.to_le_bytes().into_iter().chain(seg.to_le_bytes())).collect();
        ram.write(0, &ivt)?;
        ram.write(IRET_STUB_ADDR, &[0xcf])?;
        Ok(ram.write(BOOT_SECTOR_ADDR, &self.image)?)
    }

    /// Real-mode segments as a BIOS leaves them: CS = DS = ES = SS = 0.
    pub fn real_mode_sregs(sregs: &mut kvm_sregs) {
        for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
            seg.base = 0;
            seg.selector = 0;
            seg.limit = 0xffff;
        }
        // CR0 as after reset but with caches enabled (CD and NW clear).
        sregs.cr0 = 0x10;
    }

    /// Starts vCPU 0 at the sector in real mode. Other vCPUs stay in reset
    /// waiting for INIT/SIPI, which needs the in-kernel irqchip.
    pub fn configure_vcpus(vcpus: &[Vcpu], irqchip: bool) -> Result<()> {
        if vcpus.len() > 1 && !irqchip {
            return Err(Error::Config(
                "application processors of a boot-sector guest need the in-kernel irqchip".into(),
            ));
        }
        let bsp = vcpus.first().ok_or_else(|| Error::Config("no vCPU".into()))?;
        let mut sregs = bsp.sregs()?;
        Self::real_mode_sregs(&mut sregs);
        bsp.set_sregs(&sregs)?;
        bsp.set_regs(&Self::initial_regs())?;
        bsp.init_fpu()
    }

    /// Registers at the jump to the sector: IP = 0x7c00, DL = 0x80.
    pub fn initial_regs() -> kvm_regs {
        kvm_regs { rip: BOOT_SECTOR_ADDR, rdx: 0x80, rsp: BOOT_SECTOR_ADDR, rflags: 2, ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MemoryMap, MIB};

    #[test]
    fn images_are_checked() {
        assert!(BootSector::from_bytes(&[0u8; 511]).is_err());
        assert!(BootSector::from_bytes(&[0u8; 512]).is_err());
        let mut ok = [0u8; 512];
        ok[510] = 0x55;
        ok[511] = 0xaa;
        assert!(BootSector::from_bytes(&ok).is_ok());
        let t = BootSector::test_image();
        assert_eq!(BootSector::from_bytes(t.bytes()).unwrap(), t);
    }

    #[test]
    fn load_places_sector_and_ivt() {
        let ram = GuestRam::new(MemoryMap::pc(2 * MIB).unwrap()).unwrap();
        let t = BootSector::test_image();
        t.load(&ram).unwrap();
        let mut back = [0u8; 512];
        ram.read(BOOT_SECTOR_ADDR, &mut back).unwrap();
        assert_eq!(&back, t.bytes());
        // Vector 0x10 -> F000:FF53 -> the iret.
        let v = ram.read_u64(0x10 * 4).unwrap() as u32;
        let (off, seg) = (v & 0xffff, v >> 16);
        assert_eq!((u64::from(seg) << 4) + u64::from(off), IRET_STUB_ADDR);
        let mut b = [0u8; 1];
        ram.read(IRET_STUB_ADDR, &mut b).unwrap();
        assert_eq!(b[0], 0xcf);
    }
}
