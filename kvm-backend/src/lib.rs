//! KVM backend of postcopy migration: the VMM layer.
//!
//! This crate runs real KVM guests and gives a migration driver what it
//! needs, without any protocol logic of its own:
//!
//! - [`layout`]: the RAM layout (named blocks of 4 KiB pages, [`PageRef`]).
//! - [`memory`]: guest RAM ([`GuestRam`], vm-memory mmaps) with the VMM's own
//!   write tracking, and [`DirtyBitmap`].
//! - [`hugepages`]: guest RAM on 2 MiB or 1 GiB huge pages ([`HugePageSize`]).
//! - [`vm`]: the KVM VM ([`Vm`]): memory slots, dirty logging, irqchip,
//!   vCPU creation, VM-wide state.
//! - [`vcpu`]: a vCPU ([`Vcpu`]) and its saved state ([`VcpuState`]).
//! - [`runner`]: vCPU threads ([`VcpuSet`]): start, pause (with its
//!   latency), resume, state save, stop; exit handling.
//! - [`devices`]: serial port, port 0x92, the pattern guest's ports and its
//!   statistics.
//! - [`uffd`]: destination RAM under userfaultfd ([`UffdRam`],
//!   [`FaultReader`]).
//! - [`state`]: the whole device state as one versioned blob
//!   ([`DeviceState`]).
//! - [`guest`]: the built-in pattern guest ([`TestGuest`]) with its verifier,
//!   and boot sectors ([`BootSector`]).
//!
//! - [`driver::populate`]: a destination's shared RAM allocated in the background,
//!   so that it listens at once.
//! - [`vmm`]: the long-running VMM behind `postcopy run`: one guest, QMP
//!   commands, migrations in and out, again and again.
//!
//! All unsafe code is in the private `sys` module.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod devices;
pub mod driver;
pub mod error;
pub mod guest;
pub mod hugepages;
pub mod layout;
pub mod memory;
pub mod page_bits;
pub mod runner;
pub mod state;
mod sys;
pub mod uffd;
pub mod vcpu;
pub mod vm;
pub mod vmm;

pub use devices::{Devices, GuestStats, ProgressSnapshot, SerialOutput};
pub use error::{Error, Result};
pub use guest::bootsector::BootSector;
pub use guest::{CpuPosition, TestGuest, VerifyReport};
pub use hugepages::{HugePageError, HugePageSize};
pub use layout::{MemoryMap, MemoryMapError, MemoryRegion, PageRef, PAGE_SIZE};
pub use memory::{DirtyBitmap, GuestRam, MemoryError};
pub use runner::{PauseReport, RunState, VcpuSet};
pub use state::DeviceState;
pub use sys::{current_cpu, monotonic_ns, pin_thread, set_realtime};
pub use uffd::{FaultReader, Install, PageFault, UffdError, UffdRam};
pub use vcpu::{Vcpu, VcpuState};
pub use vm::{kvm_available, Vm, VmConfig};
