//! Port-I/O devices: the 16550 serial port at 0x3f8 (vm-superio), System
//! Control Port A at 0x92 (fast A20 and reset), and the pattern guest's
//! progress and error ports, with the guest statistics they feed.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::guest::abi::{COUNTER_ERROR_PORT, ERROR_PORT, PAGES_PORT, PROGRESS_PORT};

/// First port of COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Number of COM1 ports.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// System Control Port A.
pub const PORT_SYSTEM_CONTROL_A: u16 = 0x92;
/// Bit 1 of port 0x92: A20 gate.
pub const PORT92_A20: u8 = 1 << 1;
/// Bit 0 of port 0x92: fast reset.
pub const PORT92_RESET: u8 = 1 << 0;
/// Most guest errors kept in detail (all are counted).
pub const MAX_GUEST_ERRORS_KEPT: usize = 1024;
/// Most page-count reports kept per vCPU (about 40 minutes of a vCPU at full
/// speed); later ones are dropped.
pub const MAX_PAGE_REPORTS_KEPT: usize = 1 << 20;

/// Where serial output goes.
#[derive(Clone, Debug, Default)]
pub enum SerialOutput {
    /// Dropped.
    #[default]
    Sink,
    /// The process's stdout.
    Stdout,
    /// A file (created or truncated).
    File(Arc<Mutex<File>>),
    /// An in-memory buffer, for tests and for callers that show it later.
    Buffer(Arc<Mutex<Vec<u8>>>),
}

impl SerialOutput {
    /// Output to a new in-memory buffer; returns it too.
    pub fn buffer() -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Self::Buffer(buf.clone()), buf)
    }

    /// Output to a file at `path`.
    pub fn file(path: &std::path::Path) -> io::Result<Self> {
        Ok(Self::File(Arc::new(Mutex::new(File::create(path)?))))
    }
}

impl Write for SerialOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Self::Sink => Ok(data.len()),
            Self::Stdout => io::stdout().write(data),
            Self::File(f) => lock(f).write(data),
            Self::Buffer(b) => {
                lock(b).extend_from_slice(data);
                Ok(data.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Sink | Self::Buffer(_) => Ok(()),
            Self::Stdout => io::stdout().flush(),
            Self::File(f) => lock(f).flush(),
        }
    }
}

/// Locks a mutex, recovering the data if a holder panicked (all data here
/// stays consistent across a panic: counters and byte buffers).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The serial port's interrupt line: an irqfd on GSI 4 when the VM has an
/// in-kernel irqchip, nothing otherwise.
#[derive(Debug)]
pub struct SerialIrq(pub Option<EventFd>);

impl Trigger for SerialIrq {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        match &self.0 {
            Some(evt) => evt.write(1),
            None => Ok(()),
        }
    }
}

/// What the vCPU loop must do after a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioOutcome {
    /// Handled.
    Done,
    /// The pattern guest found a bad page: the vCPU loop reads the registers
    /// and calls [`GuestStats::record_error`].
    GuestError,
    /// The pattern guest found its counter word wrong: the vCPU loop reads
    /// the registers and calls [`GuestStats::record_error`].
    CounterError,
    /// The guest asked for a reset (port 0x92 bit 0).
    ResetRequested,
}

/// A page the pattern guest found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestErrorReport {
    /// vCPU that found it.
    pub vcpu: usize,
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// Word it expected.
    pub expected: u64,
    /// Word it found.
    pub found: u64,
}

/// Progress of one vCPU of the pattern guest as seen by this VMM.
#[derive(Debug, Default)]
struct VcpuProgress {
    /// Progress reports received (passes completed while running here).
    reports: AtomicU64,
    /// Last pass count the guest reported (low 32 bits of its counter).
    last_pass: AtomicU64,
    /// Page-count reports: (monotonic ns, low 32 bits of pages written).
    pages: Mutex<Vec<(u64, u32)>>,
}

/// Counters fed by the pattern guest's ports.
#[derive(Debug)]
pub struct GuestStats {
    vcpus: Vec<VcpuProgress>,
    errors: Mutex<Vec<GuestErrorReport>>,
    error_count: AtomicU64,
}

/// Passes counted per vCPU at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressSnapshot {
    /// When.
    pub at: Instant,
    /// Progress reports received per vCPU.
    pub reports: Vec<u64>,
    /// Last pass number reported per vCPU.
    pub last_pass: Vec<u64>,
}

impl ProgressSnapshot {
    /// Passes per second of each vCPU between `earlier` and `self`.
    pub fn rates_since(&self, earlier: &ProgressSnapshot) -> Vec<f64> {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        self.reports
            .iter()
            .zip(&earlier.reports)
            .map(|(a, b)| if secs > 0.0 { a.saturating_sub(*b) as f64 / secs } else { 0.0 })
            .collect()
    }

    /// Sum over vCPUs of [`ProgressSnapshot::rates_since`].
    pub fn total_rate_since(&self, earlier: &ProgressSnapshot) -> f64 {
        self.rates_since(earlier).iter().sum()
    }
}

impl GuestStats {
    /// Counters for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            vcpus: (0..vcpus).map(|_| VcpuProgress::default()).collect(),
            errors: Mutex::new(Vec::new()),
            error_count: AtomicU64::new(0),
        }
    }

    fn record_pages(&self, vcpu: usize, pages: u32) {
        if let Some(p) = self.vcpus.get(vcpu) {
            let mut log = lock(&p.pages);
            if log.len() < MAX_PAGE_REPORTS_KEPT {
                log.push((crate::sys::monotonic_ns(), pages));
            }
        }
    }

    /// Pages per second the guest wrote between the monotonic times `from_ns`
    /// and `to_ns`, summed over vCPUs: for each vCPU, from its first to its
    /// last page-count report inside the window (a vCPU with fewer than two
    /// reports there wrote fewer than [`crate::guest::abi::PAGES_REPORT_INTERVAL`]
    /// pages in it and counts as 0). `None` if no vCPU had two reports.
    pub fn pages_rate(&self, from_ns: u64, to_ns: u64) -> Option<f64> {
        let mut total = None;
        for p in &self.vcpus {
            let log = lock(&p.pages);
            let inside: Vec<&(u64, u32)> = log.iter().filter(|(t, _)| *t >= from_ns && *t <= to_ns).collect();
            let rate = match (inside.first(), inside.last()) {
                (Some(a), Some(b)) if b.0 > a.0 => f64::from(b.1.wrapping_sub(a.1)) / ((b.0 - a.0) as f64 / 1e9),
                _ => 0.0,
            };
            if inside.len() >= 2 {
                total = Some(total.unwrap_or(0.0) + rate);
            }
        }
        total
    }

    /// The time of the latest page-count report, if any.
    pub fn last_pages_report_ns(&self) -> Option<u64> {
        self.vcpus.iter().filter_map(|p| lock(&p.pages).last().map(|r| r.0)).max()
    }

    fn record_progress(&self, vcpu: usize, pass: u64) {
        if let Some(p) = self.vcpus.get(vcpu) {
            p.reports.fetch_add(1, Ordering::Relaxed);
            p.last_pass.store(pass, Ordering::Relaxed);
        }
    }

    /// Records a bad page found by the guest.
    pub fn record_error(&self, report: GuestErrorReport) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut errors = lock(&self.errors);
        if errors.len() < MAX_GUEST_ERRORS_KEPT {
            errors.push(report);
        }
        tracing::warn!(
            vcpu = report.vcpu,
            gpa = format_args!("{:#x}", report.gpa),
            expected = format_args!("{:#x}", report.expected),
            found = format_args!("{:#x}", report.found),
            "guest reported a bad page"
        );
    }

    /// Number of bad pages the guest reported.
    pub fn error_count(&self) -> u64 {
        self.error_count.load(Ordering::Relaxed)
    }

    /// The first [`MAX_GUEST_ERRORS_KEPT`] bad pages the guest reported.
    pub fn errors(&self) -> Vec<GuestErrorReport> {
        lock(&self.errors).clone()
    }

    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            at: Instant::now(),
            reports: self.vcpus.iter().map(|p| p.reports.load(Ordering::Relaxed)).collect(),
            last_pass: self.vcpus.iter().map(|p| p.last_pass.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// Serializable state of the port devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// Serial registers and receive FIFO.
    pub serial: SerialRegs,
    /// Port 0x92.
    pub port92: u8,
}

/// The 16550's registers (mirror of vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Receive FIFO (at most 64 bytes).
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegs {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for SerialState {
    fn from(s: &SerialRegs) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

type SerialDevice = Serial<SerialIrq, NoEvents, SerialOutput>;

/// The port-I/O bus of a VM.
#[derive(Debug)]
pub struct Devices {
    serial: Mutex<SerialDevice>,
    port92: AtomicU8,
    stats: Arc<GuestStats>,
}

impl Devices {
    /// Devices for `vcpus` vCPUs; serial output to `output`, its interrupt
    /// through `irq`.
    pub fn new(vcpus: usize, output: SerialOutput, irq: SerialIrq) -> Self {
        Self {
            serial: Mutex::new(Serial::new(irq, output)),
            port92: AtomicU8::new(0),
            stats: Arc::new(GuestStats::new(vcpus)),
        }
    }

    /// The pattern guest's counters.
    pub fn stats(&self) -> &Arc<GuestStats> {
        &self.stats
    }

    /// Whether the guest enabled A20 through port 0x92. KVM itself never
    /// wraps addresses at 1 MiB, so this is state only (as under QEMU/KVM).
    pub fn a20_enabled(&self) -> bool {
        self.port92.load(Ordering::Relaxed) & PORT92_A20 != 0
    }

    /// A guest `out` to `port`.
    pub fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> PioOutcome {
        match port {
            PROGRESS_PORT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                self.stats.record_progress(vcpu, u64::from(u32::from_le_bytes(b)));
                PioOutcome::Done
            }
            ERROR_PORT => PioOutcome::GuestError,
            COUNTER_ERROR_PORT => PioOutcome::CounterError,
            PAGES_PORT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                self.stats.record_pages(vcpu, u32::from_le_bytes(b));
                PioOutcome::Done
            }
            PORT_SYSTEM_CONTROL_A => {
                let v = data.first().copied().unwrap_or(0);
                self.port92.store(v & PORT92_A20, Ordering::Relaxed);
                if v & PORT92_RESET != 0 {
                    PioOutcome::ResetRequested
                } else {
                    PioOutcome::Done
                }
            }
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_COUNT).contains(&p) => {
                let offset = (p - SERIAL_PORT_BASE) as u8;
                let mut serial = lock(&self.serial);
                for &byte in data {
                    if let Err(e) = serial.write(offset, byte) {
                        tracing::debug!(?e, "serial write failed");
                    }
                }
                PioOutcome::Done
            }
            _ => {
                tracing::trace!(port, ?data, "write to an unhandled port");
                PioOutcome::Done
            }
        }
    }

    /// A guest `in` from `port`.
    pub fn pio_read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        match port {
            PORT_SYSTEM_CONTROL_A => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = self.port92.load(Ordering::Relaxed);
                }
            }
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_COUNT).contains(&p) => {
                let offset = (p - SERIAL_PORT_BASE) as u8;
                let mut serial = lock(&self.serial);
                for b in data.iter_mut() {
                    *b = serial.read(offset);
                }
            }
            _ => data.fill(0xff),
        }
    }

    /// Snapshot of the device registers.
    pub fn save_state(&self) -> DevicesState {
        DevicesState { serial: lock(&self.serial).state().into(), port92: self.port92.load(Ordering::Relaxed) }
    }

    /// Loads device registers saved by [`Devices::save_state`]; the output
    /// and interrupt line stay this VM's.
    pub fn restore_state(&self, state: &DevicesState) -> crate::error::Result<()> {
        let mut serial = lock(&self.serial);
        let trigger = SerialIrq(match &serial.interrupt_evt().0 {
            Some(evt) => Some(evt.try_clone().map_err(|e| crate::error::Error::State(format!("serial irq: {e}")))?),
            None => None,
        });
        let out = serial.writer().clone();
        *serial = Serial::from_state(&SerialState::from(&state.serial), trigger, NoEvents, out)
            .map_err(|e| crate::error::Error::State(format!("serial state: {e:?}")))?;
        self.port92.store(state.port92 & PORT92_A20, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_output_and_port92() {
        let (out, buf) = SerialOutput::buffer();
        let d = Devices::new(1, out, SerialIrq(None));
        for &c in b"hi" {
            assert_eq!(d.pio_write(0, SERIAL_PORT_BASE, &[c]), PioOutcome::Done);
        }
        assert_eq!(&*lock(&buf), b"hi");
        let mut lsr = [0u8];
        d.pio_read(0, SERIAL_PORT_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
        assert!(!d.a20_enabled());
        assert_eq!(d.pio_write(0, 0x92, &[PORT92_A20]), PioOutcome::Done);
        assert!(d.a20_enabled());
        let mut v = [0u8];
        d.pio_read(0, 0x92, &mut v);
        assert_eq!(v[0], PORT92_A20);
        assert_eq!(d.pio_write(0, 0x92, &[PORT92_RESET]), PioOutcome::ResetRequested);
        let mut unk = [0u8; 2];
        d.pio_read(0, 0x1234, &mut unk);
        assert_eq!(unk, [0xff, 0xff]);
    }

    #[test]
    fn progress_and_errors_are_counted() {
        let d = Devices::new(2, SerialOutput::Sink, SerialIrq(None));
        let s0 = d.stats().snapshot();
        d.pio_write(1, PROGRESS_PORT, &7u32.to_le_bytes());
        d.pio_write(1, PROGRESS_PORT, &8u32.to_le_bytes());
        assert_eq!(d.pio_write(0, ERROR_PORT, &[0]), PioOutcome::GuestError);
        assert_eq!(d.pio_write(0, COUNTER_ERROR_PORT, &[0]), PioOutcome::CounterError);
        let s1 = d.stats().snapshot();
        assert_eq!(s1.reports, vec![0, 2]);
        assert_eq!(s1.last_pass, vec![0, 8]);
        assert!(s1.rates_since(&s0)[1] > 0.0);
        d.stats().record_error(GuestErrorReport { vcpu: 0, gpa: 1, expected: 2, found: 3 });
        assert_eq!(d.stats().error_count(), 1);
    }

    #[test]
    fn state_round_trip() {
        let d = Devices::new(1, SerialOutput::Sink, SerialIrq(None));
        d.pio_write(0, SERIAL_PORT_BASE + 7, &[0x5a]); // scratch
        d.pio_write(0, 0x92, &[PORT92_A20]);
        let st = d.save_state();
        let e = Devices::new(1, SerialOutput::Sink, SerialIrq(None));
        e.restore_state(&st).unwrap();
        let mut v = [0u8];
        e.pio_read(0, SERIAL_PORT_BASE + 7, &mut v);
        assert_eq!(v[0], 0x5a);
        assert!(e.a20_enabled());
        assert_eq!(e.save_state(), st);
    }
}
