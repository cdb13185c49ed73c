//! The arguments several commands share: the guest, the migration mode,
//! thread placement and socket settings, and sizes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use postcopy_core::{Config, FallbackConfig, Mode};
use postcopy_kvm::driver::{CheckpointCopy, Tuning};
use postcopy_kvm::vmm::FALLBACK_MS_RANGE;

/// Migration mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Stop at once; every page follows on demand or in the background.
    Postcopy,
    /// Precopy rounds while the guest runs, then postcopy.
    Hybrid,
}

/// Settings both sides take.
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Pin the fault path's threads to this CPU (default: no pinning; the
    /// bench pins unless --unpinned; see the README).
    #[arg(long)]
    pub latency_cpu: Option<usize>,
    /// Pin the bulk path's threads to this CPU (with `run`, the QMP server's too).
    #[arg(long)]
    pub bulk_cpu: Option<usize>,
    /// Pin the vCPU threads to this CPU.
    #[arg(long)]
    pub vcpu_cpu: Option<usize>,
    /// Fault-path readers spin this long (us) before blocking.
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// Run the fault path's threads in SCHED_FIFO at this priority (1-99).
    #[arg(long)]
    pub rt_priority: Option<i32>,
    /// Run the switchover's threads in SCHED_FIFO at this priority until the
    /// guest runs on the destination (0: off).
    #[arg(long, default_value_t = 10)]
    pub rt_switchover: i32,
    /// Nice value of the background push's threads (above 0: the guest
    /// gets the CPU first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub bulk_nice: i32,
    /// TCP congestion control of the migration's connections ("system":
    /// leave the system's default). BBR's pacing timers interrupt the fault
    /// path and slow loopback transfers here; see the README.
    #[arg(long, default_value = "cubic")]
    pub tcp_congestion: String,
    /// Send and receive buffer of the main channel's sockets (0: let the
    /// kernel autotune them). A fault on a page the push just sent waits
    /// for what is queued ahead of it there. The default suits loopback and
    /// a LAN; on a long or slow link use about the bandwidth-delay product
    /// (or 0), or the push is capped. See the README.
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    pub main_socket_buffer: u64,
    /// Bound on connecting and on each handshake, in ms.
    #[arg(long, default_value_t = 10_000, hide = true)]
    pub handshake_timeout_ms: u64,
    /// A paused source whose reconnections are all refused this long (the
    /// destination finished and exited) leaves the guest to it and exits, in s.
    #[arg(long, default_value_t = 600, hide = true)]
    pub destination_gone_timeout_s: u64,
    /// Do not open the urgent channel (requested pages go on the main one).
    #[arg(long, hide = true)]
    pub no_urgent: bool,
    /// The background push does not jump to follow requests (more remote
    /// faults: the benchmark's fault-heavy workload).
    #[arg(long, hide = true)]
    pub no_prepaging: bool,
    /// Back guest RAM with huge pages of this size (2M or 1G; both sides
    /// must agree). Needs free huge pages (scripts/hugepages reserves them); see
    /// docs/hugepages.md.
    #[arg(long, value_name = "2M|1G")]
    pub hugepages: Option<postcopy_kvm::HugePageSize>,
    /// In postcopy, push pages larger than this (2 MiB huge pages) in parts
    /// of this size, so that a fault on the page being pushed gets the rest
    /// on the urgent channel at once (0: whole pages; try 128K on a link
    /// where a 2 MiB page takes long to cross). See docs/hugepages.md.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub page_part: u64,
    /// Survive the loss of the destination during postcopy: with
    /// `checkpoint`, the destination runs the guest only under a lease the
    /// source renews and streams checkpoints back; the source restarts the
    /// guest from the last one if the destination is lost. Both sides must
    /// say it. See docs/fallback.md.
    #[arg(long, value_enum, default_value_t = FallbackArg::Off)]
    pub fallback: FallbackArg,
    /// Fallback: how long the destination may run the guest without a
    /// renewal (the source's setting counts), in ms.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(FALLBACK_MS_RANGE))]
    pub lease_ms: u64,
    /// Fallback: how often the destination takes a checkpoint, in ms.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(FALLBACK_MS_RANGE))]
    pub checkpoint_interval_ms: u64,
    /// Fallback: copy a checkpoint's pages on write (write-protect them at
    /// the stop, copy each before the guest writes it) or during the stop.
    #[arg(long, value_enum, default_value_t = CheckpointCopyArg::WriteProtect)]
    pub checkpoint_copy: CheckpointCopyArg,
    /// Fallback: memory each side reserves for checkpoints when fallback is
    /// turned on, touched then and kept (a checkpoint passes through it;
    /// a larger one takes fresh memory, slow while a guest runs). Default:
    /// half the guest's RAM where it is known (a source's `--mem`, a
    /// destination's `--prealloc`). See docs/fallback.md.
    #[arg(long, value_parser = parse_size)]
    pub checkpoint_reserve: Option<u64>,
    /// Bytes per second the background push may send in postcopy (0: no
    /// limit); requested pages are never held back. As QEMU's
    /// `max-postcopy-bandwidth`.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub max_postcopy_bandwidth: u64,
    /// Spread the background push over this many connections (1-8), each
    /// with its own sender and receiver thread; requested pages keep to the
    /// urgent channel. The destination accepts at most its own value, so
    /// give both sides the same. See docs/performance.md.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=postcopy_core::MAX_PUSH_STREAMS as i64))]
    pub push_streams: u8,
}

/// How a checkpoint's pages are copied at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum CheckpointCopyArg {
    /// Write-protect at the stop, copy on write and in the background.
    #[default]
    WriteProtect,
    /// Copy every dirty page while the vCPUs are stopped.
    Stop,
}

/// Whether the guest survives the loss of the destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum FallbackArg {
    /// No fallback: after the switchover the guest is the destination's.
    #[default]
    Off,
    /// Reverse checkpoints under a lease (docs/fallback.md).
    Checkpoint,
}

impl Common {
    /// Whether any of the driver's threads is pinned to a CPU.
    pub fn pins_threads(&self) -> bool {
        self.latency_cpu.is_some() || self.bulk_cpu.is_some() || self.vcpu_cpu.is_some()
    }

    /// Thread placement and socket settings.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            latency_cpu: self.latency_cpu,
            bulk_cpu: self.bulk_cpu,
            vcpu_cpu: self.vcpu_cpu,
            spin_us: self.spin_us,
            rt_priority: self.rt_priority,
            rt_switchover: (self.rt_switchover > 0).then_some(self.rt_switchover),
            bulk_nice: self.bulk_nice,
            tcp_congestion: self.tcp_congestion(),
            main_socket_buffer: self.main_socket_buffer(),
            hugepages: self.hugepages,
            max_postcopy_bandwidth: (self.max_postcopy_bandwidth > 0).then_some(self.max_postcopy_bandwidth),
            checkpoint_copy: match self.checkpoint_copy {
                CheckpointCopyArg::WriteProtect => CheckpointCopy::WriteProtect,
                CheckpointCopyArg::Stop => CheckpointCopy::Stop,
            },
        }
    }

    /// The main channel's socket buffer size, None to let the kernel tune it.
    pub fn main_socket_buffer(&self) -> Option<usize> {
        usize::try_from(self.main_socket_buffer).ok().filter(|&b| b > 0)
    }

    /// The congestion control to set on sockets, None for the system's.
    pub fn tcp_congestion(&self) -> Option<String> {
        let name = self.tcp_congestion.trim();
        (!name.is_empty() && name != "system").then(|| name.to_string())
    }

    /// The core's settings for a migration in `mode`.
    pub fn config(&self, mode: Mode) -> Config {
        Config {
            mode,
            urgent_channel: !self.no_urgent,
            prepaging: !self.no_prepaging,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            destination_gone_timeout: Duration::from_secs(self.destination_gone_timeout_s),
            page_part_bytes: u32::try_from(self.page_part).unwrap_or(u32::MAX),
            fallback: self.fallback_config(),
            push_streams: self.push_streams,
            ..Config::default()
        }
    }

    /// Checks that the huge pages asked for work with `config` (fallback
    /// does not on 1 GiB pages).
    pub fn check_hugepages(&self, config: &Config) -> Result<(), postcopy_kvm::HugePageError> {
        self.hugepages.map_or(Ok(()), |size| size.check_fallback(config.fallback.is_some()))
    }

    /// Bytes of checkpoint memory to reserve for a guest of `guest_ram`
    /// bytes (None: not known) when fallback is turned on.
    pub fn checkpoint_reserve_bytes(&self, guest_ram: Option<u64>) -> u64 {
        self.checkpoint_reserve.unwrap_or_else(|| guest_ram.map_or(0, |bytes| bytes / 2))
    }

    /// The fallback settings, when fallback is on.
    pub fn fallback_config(&self) -> Option<FallbackConfig> {
        (self.fallback == FallbackArg::Checkpoint).then(|| self.fallback_settings())
    }

    /// The fallback settings of the command line (or their defaults),
    /// whether or not it turned fallback on: `run` uses them when QMP does.
    pub fn fallback_settings(&self) -> FallbackConfig {
        FallbackConfig {
            lease: Duration::from_millis(self.lease_ms),
            checkpoint_interval: Duration::from_millis(self.checkpoint_interval_ms),
            ..FallbackConfig::default()
        }
    }

    /// These settings as arguments for a child `postcopy dest` or `source`.
    pub fn forward(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut opt = |name: &str, v: Option<usize>| {
            if let Some(v) = v {
                out.push(format!("--{name}={v}"));
            }
        };
        opt("latency-cpu", self.latency_cpu);
        opt("bulk-cpu", self.bulk_cpu);
        opt("vcpu-cpu", self.vcpu_cpu);
        if let Some(p) = self.rt_priority {
            out.push(format!("--rt-priority={p}"));
        }
        out.push(format!("--rt-switchover={}", self.rt_switchover));
        out.push(format!("--bulk-nice={}", self.bulk_nice));
        out.push(format!("--tcp-congestion={}", self.tcp_congestion));
        out.push(format!("--main-socket-buffer={}", self.main_socket_buffer));
        out.push(format!("--spin-us={}", self.spin_us));
        out.push(format!("--handshake-timeout-ms={}", self.handshake_timeout_ms));
        out.push(format!("--destination-gone-timeout-s={}", self.destination_gone_timeout_s));
        if self.no_urgent {
            out.push("--no-urgent".into());
        }
        if self.no_prepaging {
            out.push("--no-prepaging".into());
        }
        if let Some(size) = self.hugepages {
            out.push(format!("--hugepages={size}"));
        }
        out.push(format!("--page-part={}", self.page_part));
        if self.fallback == FallbackArg::Checkpoint {
            out.push("--fallback=checkpoint".into());
        }
        out.push(format!("--lease-ms={}", self.lease_ms));
        out.push(format!("--checkpoint-interval-ms={}", self.checkpoint_interval_ms));
        if self.checkpoint_copy == CheckpointCopyArg::Stop {
            out.push("--checkpoint-copy=stop".into());
        }
        if let Some(bytes) = self.checkpoint_reserve {
            out.push(format!("--checkpoint-reserve={bytes}"));
        }
        out.push(format!("--max-postcopy-bandwidth={}", self.max_postcopy_bandwidth));
        out.push(format!("--push-streams={}", self.push_streams));
        out
    }
}

/// The guest and the migration mode.
#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Migration mode.
    #[arg(long, value_enum, default_value_t = ModeArg::Postcopy)]
    pub mode: ModeArg,
    /// Precopy rounds in hybrid mode.
    #[arg(long, default_value_t = 2)]
    pub precopy_rounds: u32,
    /// Guest RAM (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs (1 to 4 for the built-in guest).
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Boot this 512-byte PC boot sector instead of the built-in guest.
    #[arg(long)]
    pub guest_image: Option<PathBuf>,
    /// How long the guest runs before the migration starts, in ms (after
    /// the built-in guest's first pass).
    #[arg(long, default_value_t = 300)]
    pub run_before_ms: u64,
}

impl GuestArgs {
    /// The core's migration mode.
    pub fn core_mode(&self) -> Mode {
        match self.mode {
            ModeArg::Postcopy => Mode::Postcopy,
            ModeArg::Hybrid => Mode::Hybrid { precopy_rounds: self.precopy_rounds.max(1) },
        }
    }
}

/// A size that is not a number with an optional K, M or G unit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number.
    #[error("bad size {0:?}")]
    Number(String),
    /// An unknown unit.
    #[error("bad size unit in {0:?} (use K, M or G)")]
    Unit(String),
    /// More than 2^64 bytes.
    #[error("size {0:?} too large")]
    TooLarge(String),
}

/// Parses 4096, 64K, 256M, 1G, 2GiB...
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let n: u64 = digits.parse().map_err(|_| SizeError::Number(s.into()))?;
    let mult = match unit {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(SizeError::Unit(s.into())),
    };
    n.checked_mul(mult).ok_or_else(|| SizeError::TooLarge(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("12Q"), Err(SizeError::Unit("12Q".into())));
        assert_eq!(parse_size(""), Err(SizeError::Number(String::new())));
        assert_eq!(parse_size("99999999999999G"), Err(SizeError::TooLarge("99999999999999G".into())));
    }

    #[derive(clap::Parser)]
    struct WithCommon {
        #[command(flatten)]
        common: Common,
    }

    /// The lease and the checkpoint interval take what QMP takes.
    #[test]
    fn fallback_timing_is_refused_out_of_range() {
        use clap::Parser;
        let parse = |args: &[&str]| WithCommon::try_parse_from([&["postcopy"], args].concat());
        let settings = parse(&["--lease-ms", "600", "--checkpoint-interval-ms", "3600000"]).expect("in range");
        let fallback = settings.common.fallback_settings();
        assert_eq!((fallback.lease.as_millis(), fallback.checkpoint_interval.as_millis()), (600, 3_600_000));
        for bad in [["--lease-ms", "0"], ["--checkpoint-interval-ms", "0"], ["--lease-ms", "3600001"]] {
            assert!(parse(&bad).is_err(), "{bad:?} taken");
        }
    }
}
