//! The command line: `dest`, `source`, `demo` (and `bench`, in bench.rs).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command as Process, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use postcopy_core::{Config, Mode};
use postcopy_kvm::driver::machine::{GuestKind, MachineDescription, MACHINE_FORMAT};
use postcopy_kvm::driver::report::{DestinationReport, RunReport, SourceReport};
use postcopy_kvm::driver::{self, Damage, DestinationOptions, SourceOptions, Tuning};
use postcopy_kvm::layout::MIB;
use postcopy_kvm::{BootSector, GuestRam, RamLayout, SerialOutput, TestGuest, VcpuSet, Vm, VmConfig};

#[derive(Parser, Debug)]
#[command(name = "postcopy", version, about = "Postcopy live migration of KVM guests")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Wait for a migration on ADDR, run the migrated guest, check it.
    Dest(DestArgs),
    /// Start a guest and migrate it to the destination at ADDR.
    Source(SourceArgs),
    /// Run a source and a destination as two processes over loopback and
    /// print the statistics.
    Demo(DemoArgs),
    /// Measure fault latency, bandwidth, downtime and guest progress
    /// against their floors, in one run.
    Bench(crate::bench::BenchArgs),
}

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
    /// Pin the bulk path's threads to this CPU.
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
}

impl Common {
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

    fn config(&self, mode: Mode) -> Config {
        Config {
            mode,
            urgent_channel: !self.no_urgent,
            prepaging: !self.no_prepaging,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            destination_gone_timeout: Duration::from_secs(self.destination_gone_timeout_s),
            ..Config::default()
        }
    }

    fn forward(&self) -> Vec<String> {
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
        out
    }
}

#[derive(Args, Debug)]
pub struct DestArgs {
    /// Address to listen on (port 0: any free port; see --ready-file).
    #[arg(long)]
    pub listen: String,
    /// Write guest RAM here after the migration (guest stopped).
    #[arg(long)]
    pub dump_memory: Option<PathBuf>,
    /// Where the guest's serial port writes: a file, or - for stdout.
    #[arg(long)]
    pub serial: Option<String>,
    /// How long the guest runs here after the migration before it is checked.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    /// Write the address actually listened on to this file once ready.
    #[arg(long, hide = true)]
    pub ready_file: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Allocate this much guest RAM (the source's --mem) before listening,
    /// every page in shared memory: the migration then only copies pages
    /// into place (UFFDIO_CONTINUE) instead of allocating each one as it
    /// arrives, which costs up to ~10 us a page on a host that reclaims this
    /// machine's free memory (see the README). Takes as long as touching
    /// that much memory. A source with other RAM is refused.
    #[arg(long, value_parser = parse_size)]
    pub prealloc: Option<u64>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct SourceArgs {
    /// The destination's address.
    #[arg(long)]
    pub connect: String,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Where the guest's serial port writes: a file, or - for stdout.
    #[arg(long)]
    pub serial: Option<String>,
    #[command(flatten)]
    pub common: Common,
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

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// How long the guest runs on the destination before it is checked, in ms.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    #[command(flatten)]
    pub common: Common,
}

/// Parses 4096, 64K, 256M, 1G, 2GiB...
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &lower[digits.len()..];
    let n: u64 = digits.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("bad size unit in {s:?} (use K, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))
}

fn serial_output(arg: &Option<String>) -> Result<SerialOutput, String> {
    match arg.as_deref() {
        None => Ok(SerialOutput::Sink),
        Some("-") => Ok(SerialOutput::Stdout),
        Some(path) => SerialOutput::file(std::path::Path::new(path)).map_err(|e| format!("serial file {path}: {e}")),
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("address {addr} resolves to nothing"))
}

fn mode(g: &GuestArgs) -> Mode {
    match g.mode {
        ModeArg::Postcopy => Mode::Postcopy,
        ModeArg::Hybrid => Mode::Hybrid { precopy_rounds: g.precopy_rounds.max(1) },
    }
}

pub fn dest(a: DestArgs) -> Result<ExitCode, String> {
    if !postcopy_kvm::kvm_available() {
        return Err("/dev/kvm is not usable here".into());
    }
    let preallocated = match a.prealloc {
        Some(bytes) => {
            let features = postcopy_kvm::uffd::probe_features().map_err(|e| format!("--prealloc: {e}"))?;
            if !features.has("MINOR_SHMEM") {
                return Err("--prealloc needs userfaultfd minor faults on shared memory (Linux 5.14 or later); \
                            run without it to allocate RAM as pages arrive"
                    .into());
            }
            let layout = RamLayout::pc(bytes).map_err(|e| format!("--prealloc: {e}"))?;
            let t0 = Instant::now();
            let ram = GuestRam::new_preallocated(layout).map_err(|e| format!("--prealloc: {e}"))?;
            eprintln!(
                "destination: {} MiB of guest RAM preallocated in {:.0} ms",
                bytes >> 20,
                t0.elapsed().as_secs_f64() * 1e3
            );
            Some(Arc::new(ram))
        }
        None => None,
    };
    let listener = TcpListener::bind(resolve(&a.listen)?).map_err(|e| format!("listen on {}: {e}", a.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("destination: listening on {addr}");
    if let Some(path) = &a.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string()).and_then(|()| std::fs::rename(&tmp, path)).map_err(|e| e.to_string())?;
    }
    let opts = DestinationOptions {
        config: a.common.config(Mode::Postcopy),
        tuning: a.common.tuning(),
        serial: serial_output(&a.serial)?,
        run_after: Duration::from_millis(a.run_after_ms),
        dump_memory: a.dump_memory.clone(),
        damage: Damage::from_env()?,
        progress_bar: !a.no_progress && !a.common.json,
        preallocated,
    };
    let outcome = driver::run_destination(listener, &opts);
    let r = outcome.report;
    if a.common.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    } else {
        print_destination(&r);
    }
    let pattern_ok = r.pattern.as_ref().is_none_or(|p| p.ok());
    Ok(if r.ok && pattern_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_destination(r: &DestinationReport) {
    if r.ok {
        println!("destination: migration COMPLETED; the guest runs here");
    } else {
        println!("destination: migration FAILED: {}", r.error.as_deref().unwrap_or("unknown error"));
    }
    println!(
        "  remote faults {}, fault latency p50 {:.0} us p99 {:.0} us, pages installed {}",
        r.stats.remote_faults, r.fault_latency.p50_us, r.fault_latency.p99_us, r.pages_installed
    );
    println!("  digest of installed pages {:016x} ({} missing)", r.digest.digest, r.digest.missing_pages);
    if let Some(p) = &r.pattern {
        println!(
            "  guest pattern: {} pages checked, {} bad, {} errors reported by the guest: {}",
            p.pages_checked,
            p.bad_pages,
            p.guest_reported_errors,
            if p.ok() { "ok" } else { "FAILED" }
        );
        for b in &p.first_bad {
            println!("    {b}");
        }
    }
}

/// A guest running on the source.
struct RunningGuest {
    vm: Vm,
    set: VcpuSet,
    machine: MachineDescription,
}

fn start_guest(g: &GuestArgs, serial: SerialOutput, tuning: &Tuning) -> Result<RunningGuest, String> {
    if !postcopy_kvm::kvm_available() {
        return Err("/dev/kvm is not usable here".into());
    }
    let layout = RamLayout::pc(g.mem).map_err(|e| e.to_string())?;
    let ram = Arc::new(GuestRam::new(layout.clone()).map_err(|e| e.to_string())?);
    let (kind, vcpus) = match &g.guest_image {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("guest image {}: {e}", path.display()))?;
            let sector = BootSector::from_bytes(&bytes).map_err(|e| e.to_string())?;
            sector.load(&ram).map_err(|e| e.to_string())?;
            (GuestKind::BootSector, g.vcpus)
        }
        None => {
            let guest = TestGuest::new(&layout, g.vcpus).map_err(|e| e.to_string())?;
            guest.load(&ram).map_err(|e| e.to_string())?;
            (GuestKind::Pattern, g.vcpus)
        }
    };
    let vm = Vm::new(ram.clone(), VmConfig { vcpus, irqchip: true, serial }).map_err(|e| e.to_string())?;
    let v = vm.create_vcpus().map_err(|e| e.to_string())?;
    match kind {
        GuestKind::Pattern => {
            TestGuest::new(&layout, vcpus).and_then(|t| t.configure_vcpus(&v)).map_err(|e| e.to_string())?
        }
        GuestKind::BootSector => BootSector::configure_vcpus(&v, true).map_err(|e| e.to_string())?,
    }
    let set = VcpuSet::start(v, vm.devices().clone()).map_err(|e| e.to_string())?;
    if let Some(cpu) = tuning.vcpu_cpu {
        for tid in set.thread_ids() {
            let _ = postcopy_kvm::pin_thread(tid, cpu);
        }
    }
    let machine = MachineDescription { format: MACHINE_FORMAT, vcpus, irqchip: true, ram: layout, guest: kind };
    Ok(RunningGuest { vm, set, machine })
}

pub fn source(a: SourceArgs) -> Result<ExitCode, String> {
    let addr = resolve(&a.connect)?;
    let tuning = a.common.tuning();
    let guest = start_guest(&a.guest, serial_output(&a.serial)?, &tuning)?;
    let stats = guest.vm.devices().stats().clone();
    if guest.machine.guest == GuestKind::Pattern {
        // Let every vCPU write its whole share once, so that memory holds
        // the pattern (not zeros) when it moves.
        let t0 = Instant::now();
        while stats.snapshot().reports.iter().any(|&r| r < 1) {
            if t0.elapsed() > Duration::from_secs(300) {
                return Err("the guest did not complete a pass in 300 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let t_a = postcopy_kvm::monotonic_ns();
    std::thread::sleep(Duration::from_millis(a.guest.run_before_ms));
    let progress_before = stats.pages_rate(t_a, postcopy_kvm::monotonic_ns());
    let passes_before: u64 = stats.snapshot().reports.iter().sum();
    eprintln!(
        "source: {} MiB guest with {} vCPUs running; migrating to {addr} ({:?} mode)",
        a.guest.mem / MIB,
        guest.machine.vcpus,
        a.guest.mode
    );
    let opts = SourceOptions { connect: addr, config: a.common.config(mode(&a.guest)), tuning };
    let session = driver::new_session_id();
    let outcome = driver::run_source(&guest.vm, &guest.set, &guest.machine, session, &opts)?;
    let ok = outcome.finished.result.is_ok();
    let mut report = SourceReport {
        ok,
        error: outcome.finished.result.as_ref().err().map(|e| e.to_string()),
        guest_on: format!("{:?}", outcome.finished.guest_on).to_lowercase(),
        mem_bytes: a.guest.mem,
        vcpus: guest.machine.vcpus,
        mode: format!("{:?}", a.guest.mode).to_lowercase(),
        stats: outcome.finished.stats.clone(),
        start_ns: outcome.start_ns,
        stop_ns: outcome.stop_ns,
        end_ns: outcome.end_ns,
        stop_capture_us: outcome.stop_capture_us,
        pause_us: outcome.pause_us,
        digest: outcome.digests.fold(),
        progress_before_pages_per_s: progress_before,
        passes_before,
        progress_after_failure_pages_per_s: None,
        notices: outcome.notices.clone(),
    };
    if ok {
        // The guest lives on the destination now; its vCPUs here stay stopped.
        let _ = guest.set.stop();
    } else {
        let t = postcopy_kvm::monotonic_ns();
        std::thread::sleep(Duration::from_millis(300));
        report.progress_after_failure_pages_per_s = stats.pages_rate(t, postcopy_kvm::monotonic_ns());
        eprintln!(
            "source: migration FAILED: {}; {} ({})",
            report.error.as_deref().unwrap_or("?"),
            match outcome.finished.guest_on {
                postcopy_core::Side::Destination => "the guest is the destination's, stopped here",
                postcopy_core::Side::Source => "the guest keeps running here",
            },
            report
                .progress_after_failure_pages_per_s
                .map_or("no progress report".into(), |r| format!("{:.0}k pages/s", r / 1e3))
        );
    }
    if a.common.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else if ok {
        println!("source: migration COMPLETED; the guest runs on the destination");
        println!("  digest of sent pages {:016x} ({} missing)", report.digest.digest, report.digest.missing_pages);
    } else {
        println!("source: migration FAILED: {}", report.error.as_deref().unwrap_or("?"));
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Runs a destination and a source as child processes of this binary over
/// loopback and gathers both reports.
pub fn run_pair(
    guest: &GuestArgs,
    common: &Common,
    run_after_ms: u64,
    extra_env: &[(&str, &str)],
) -> Result<(Option<SourceReport>, Option<DestinationReport>, bool, bool), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let ready = std::env::temp_dir().join(format!("postcopy-demo-{}-{}.addr", std::process::id(), rand_tag()));
    let _ = std::fs::remove_file(&ready);
    let mut dest = Process::new(&exe);
    dest.args(["dest", "--listen", "127.0.0.1:0", "--json", "--run-after-ms"])
        .arg(run_after_ms.to_string())
        .arg(format!("--prealloc={}", guest.mem))
        .arg("--ready-file")
        .arg(&ready)
        .args(common.forward())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        dest.env(k, v);
    }
    let mut dest = dest.spawn().map_err(|e| format!("cannot start the destination: {e}"))?;
    let t0 = Instant::now();
    let addr = loop {
        if let Ok(s) = std::fs::read_to_string(&ready) {
            break s;
        }
        if let Ok(Some(status)) = dest.try_wait() {
            return Err(format!("the destination exited early ({status})"));
        }
        // Preallocating takes up to ~3 s per GiB here.
        if t0.elapsed() > Duration::from_secs(30 + 5 * guest.mem.div_ceil(1 << 30)) {
            let _ = dest.kill();
            return Err("the destination did not start listening".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = std::fs::remove_file(&ready);
    let mut src = Process::new(&exe);
    src.args(["source", "--connect", addr.trim(), "--json", "--mode"])
        .arg(match guest.mode {
            ModeArg::Postcopy => "postcopy",
            ModeArg::Hybrid => "hybrid",
        })
        .arg(format!("--precopy-rounds={}", guest.precopy_rounds))
        .arg(format!("--mem={}", guest.mem))
        .arg(format!("--vcpus={}", guest.vcpus))
        .arg(format!("--run-before-ms={}", guest.run_before_ms))
        .args(common.forward())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(image) = &guest.guest_image {
        src.arg("--guest-image").arg(image);
    }
    let src = src.spawn().map_err(|e| {
        let _ = dest.kill();
        format!("cannot start the source: {e}")
    })?;
    let (src_out, src_ok) = wait_json(src, Duration::from_secs(600));
    let (dst_out, dst_ok) = wait_json(dest, Duration::from_secs(120));
    let source = src_out.and_then(|s| serde_json::from_str::<SourceReport>(&s).ok());
    let destination = dst_out.and_then(|s| serde_json::from_str::<DestinationReport>(&s).ok());
    Ok((source, destination, src_ok, dst_ok))
}

fn rand_tag() -> u64 {
    postcopy_kvm::monotonic_ns() % 1_000_000_007
}

/// Waits for a child (killing it after `timeout`) and returns the last line
/// of its stdout and whether it exited with success.
fn wait_json(mut child: Child, timeout: Duration) -> (Option<String>, bool) {
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut last = None;
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with('{') {
                    last = Some(line);
                }
            }
        }
        last
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if t0.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    let out = reader.join().ok().flatten();
    (out, status.is_some_and(|s| s.success()))
}

pub fn demo(a: DemoArgs) -> Result<ExitCode, String> {
    if !a.common.json {
        println!(
            "postcopy demo: a {} MiB {} with {} vCPUs migrates between two processes over loopback ({} mode)",
            a.guest.mem / MIB,
            if a.guest.guest_image.is_some() { "boot-sector guest" } else { "pattern guest" },
            a.guest.vcpus,
            format!("{:?}", a.guest.mode).to_lowercase()
        );
    }
    let damage = std::env::var(driver::DAMAGE_ENV).unwrap_or_default();
    let env: Vec<(&str, &str)> = if damage.is_empty() { vec![] } else { vec![(driver::DAMAGE_ENV, damage.as_str())] };
    let (source, destination, _, _) = run_pair(&a.guest, &a.common, a.run_after_ms, &env)?;
    let (Some(source), Some(destination)) = (source, destination) else {
        return Err("a side ended without a report (see its messages above)".into());
    };
    let run = RunReport::new(source, destination);
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&run).map_err(|e| e.to_string())?);
    } else {
        println!("{}", run.table());
    }
    Ok(if run.integrity_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[allow(dead_code)]
fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
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
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
