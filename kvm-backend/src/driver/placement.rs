//! Where the driver's threads run and how they wait: CPU pinning,
//! scheduling policy and nice value ([`Tuning`], [`Boost`]), and the socket
//! settings of each connection. A failure to apply any of them is logged,
//! never fatal: the migration works with the system's defaults.

use std::time::Duration;

/// Where the driver's threads run and how they wait.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tuning {
    /// CPU for the fault path (destination fault thread and urgent reader,
    /// source return-path reader).
    pub latency_cpu: Option<usize>,
    /// CPU for the bulk path (source main writer, destination main reader).
    pub bulk_cpu: Option<usize>,
    /// CPU for every vCPU thread.
    pub vcpu_cpu: Option<usize>,
    /// How long fault-path readers spin before blocking, in microseconds.
    pub spin_us: u64,
    /// Run the fault path's threads in `SCHED_FIFO` at this priority, so
    /// that a wake-up never waits behind other work on the CPU.
    pub rt_priority: Option<i32>,
    /// Run the switchover's threads (source main writer until the guest
    /// starts on the destination; destination main and urgent readers and
    /// the device-state loader until then) in `SCHED_FIFO` at this
    /// priority, and in the normal policy after: the downtime then does not
    /// wait for other work on the CPUs.
    pub rt_switchover: Option<i32>,
    /// Nice value of the bulk path's threads (source main writer,
    /// destination main reader) in postcopy: above 0, the guest's vCPUs get
    /// the CPU first and the background push takes what is left.
    pub bulk_nice: i32,
    /// TCP congestion control of every connection (None: the system's).
    /// The pacing of BBR, a common system default, runs from timer
    /// interrupts that land on whichever thread holds the CPU, fault path
    /// included; see docs/performance.md.
    pub tcp_congestion: Option<String>,
    /// Send and receive buffer of the main channel's sockets, in bytes
    /// (None: the kernel autotunes them, up to megabytes). A page requested
    /// just after the background push sent it is not sent again: the fault
    /// waits for everything queued ahead of it on the main channel, so this
    /// bounds the slowest faults.
    pub main_socket_buffer: Option<usize>,
    /// Back guest RAM with huge pages of this size (None: 4 KiB pages). The
    /// migration then moves whole huge pages; both sides must agree.
    #[serde(default)]
    pub hugepages: Option<crate::hugepages::HugePageSize>,
    /// Bytes per second the source's background push may send in postcopy
    /// (None: as fast as it can), as QEMU's `max-postcopy-bandwidth`:
    /// requested pages are never held back.
    #[serde(default)]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Fallback: how the destination copies a checkpoint's pages.
    #[serde(default)]
    pub checkpoint_copy: CheckpointCopy,
}

/// How a fallback checkpoint's pages are copied at one instant (see
/// docs/fallback.md, "Checkpoints on KVM").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CheckpointCopy {
    /// Write-protect the dirty pages while the vCPUs are stopped, run them
    /// again, and copy each page before the guest's first write to it
    /// (userfaultfd write-protect faults), the rest in the background.
    #[default]
    WriteProtect,
    /// Copy every dirty page while the vCPUs are stopped.
    Stop,
}

impl Tuning {
    /// Bytes of the pages guest RAM is backed with and the migration moves.
    pub fn page_bytes(&self) -> u64 {
        self.hugepages.map_or(crate::layout::PAGE_SIZE, crate::hugepages::HugePageSize::bytes)
    }

    /// The largest page payload of one frame: a page on this RAM, or, for
    /// a page larger than a frame carries (1 GiB), its part (2 MiB). What
    /// buffers and socket buffers sized "a page" hold.
    pub fn frame_page_bytes(&self) -> u64 {
        self.page_bytes().min(u64::from(postcopy_core::layout::MAX_FRAME_PAGE_SIZE))
    }

    pub(crate) fn spin(&self) -> Duration {
        Duration::from_micros(self.spin_us)
    }

    /// Applies the socket settings to a new connection for `channel` (a
    /// failure is logged: the connection works with the system's settings).
    pub fn tune_socket(&self, stream: &std::net::TcpStream, channel: postcopy_core::Channel) {
        if let Some(name) = &self.tcp_congestion {
            if let Err(e) = crate::sys::set_tcp_congestion(stream, name) {
                tracing::warn!(%e, name, "cannot set the TCP congestion control");
            }
        }
        let bytes = match channel {
            postcopy_core::Channel::Main | postcopy_core::Channel::Push(_) => self.main_socket_buffer,
            postcopy_core::Channel::Return => Some(RETURN_SOCKET_BUFFER),
            // A requested huge page (or part) crosses in one go: room for
            // two, instead of buffers that grow from a few KiB with the
            // first pages after the switchover.
            postcopy_core::Channel::Urgent => {
                (self.page_bytes() > crate::layout::PAGE_SIZE).then(|| 2 * self.frame_page_bytes() as usize)
            }
        };
        if let Some(bytes) = bytes {
            if let Err(e) = crate::sys::set_socket_buffers(stream, bytes) {
                tracing::warn!(%e, bytes, %channel, "cannot set the socket buffers");
            }
        }
    }
}

/// Send and receive buffer of the return path's sockets. Page requests
/// and lease renewals share that path with fallback's checkpoints (tens of
/// MiB at a time): they wait behind what the two buffers hold, so those
/// are kept small; without fallback the path carries only small frames.
pub const RETURN_SOCKET_BUFFER: usize = 128 * 1024;

/// Pins the calling thread, when asked (a failure is logged, not fatal).
/// Besides the driver's own threads, `run` places its QMP server's threads
/// with it on the bulk CPU, and the QMP polling measurement its client.
pub fn pin_self(cpu: Option<usize>, what: &str) {
    if let Some(cpu) = cpu {
        if let Err(e) = crate::sys::pin_thread(0, cpu) {
            tracing::warn!(%e, cpu, what, "cannot pin thread");
        }
    }
}

/// Places a fault-path thread: its CPU, and real-time priority if asked.
pub(crate) fn latency_thread(tuning: &Tuning, what: &str) {
    pin_self(tuning.latency_cpu, what);
    set_policy(tuning.rt_priority, what);
}

/// Sets the calling thread's scheduling policy: `SCHED_FIFO` at `priority`,
/// or the normal policy (threads inherit their creator's policy, so every
/// driver thread sets its own).
pub(crate) fn set_policy(priority: Option<i32>, what: &str) {
    if let Err(e) = crate::sys::set_realtime(0, priority) {
        if priority.is_some() {
            tracing::warn!(%e, what, "cannot change the scheduling policy");
        }
    }
}

/// A thread's real-time boost during the switchover, changed only when it
/// must change.
#[derive(Debug)]
pub(crate) struct Boost {
    on: bool,
    first_nice: bool,
}

impl Default for Boost {
    fn default() -> Self {
        Self { on: false, first_nice: true }
    }
}

impl Boost {
    /// Runs the calling thread at `boosted` (when `Some`) while `want`, and
    /// at `base` otherwise.
    pub(crate) fn set(&mut self, base: Option<i32>, boosted: Option<i32>, want: bool, what: &str) {
        let want = want && boosted.is_some();
        if want != self.on {
            self.on = want;
            set_policy(if want { boosted } else { base }, what);
        }
    }

    /// As [`Boost::set`], and when not boosted, runs at nice value `nice`.
    pub(crate) fn set_nice(&mut self, boosted: Option<i32>, want: bool, nice: i32, what: &str) {
        let before = self.on;
        self.set(None, boosted, want, what);
        if before && !self.on || self.first_nice {
            self.first_nice = false;
            if let Err(e) = crate::sys::set_nice(if self.on { 0 } else { nice }) {
                tracing::warn!(%e, what, "cannot change the nice value");
            }
        }
    }
}
