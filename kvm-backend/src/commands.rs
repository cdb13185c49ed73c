//! The commands `dest`, `source` and `demo`.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use postcopy_core::Mode;
use postcopy_kvm::driver::checkpoint_memory::CheckpointMemory;
use postcopy_kvm::driver::machine::GuestKind;
use postcopy_kvm::driver::populate;
use postcopy_kvm::driver::report::{DestinationReport, RunReport};
use postcopy_kvm::driver::{self, Damage, DamageError, DestinationOptions, SourceError, SourceOptions, Tuning};
use postcopy_kvm::layout::MIB;
use postcopy_kvm::vmm::{BootError, GuestSpec, LiveGuest};
use postcopy_kvm::{MemoryMap, SerialOutput};

use crate::args::{parse_size, Common, GuestArgs};
use crate::pair::PairReports;
use crate::tls::{PairCredentials, Role, SecurityArgs, SecurityError};
use crate::vmm_pair::{run_vmm_pair, VmmPairError};

/// How long the built-in guest may take for its first pass.
const FIRST_PASS_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a source waits for its --connect-file.
const CONNECT_FILE_TIMEOUT: Duration = Duration::from_secs(300);

/// The address written to `path` (a destination's ready file, written
/// whole by a rename), waiting up to `timeout` for it.
fn wait_for_address(path: &std::path::Path, timeout: Duration) -> Result<String, CommandError> {
    let t0 = Instant::now();
    loop {
        if let Ok(addr) = std::fs::read_to_string(path) {
            return Ok(addr.trim().to_string());
        }
        if t0.elapsed() > timeout {
            return Err(CommandError::NoConnectFile { path: path.to_path_buf(), timeout });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Why a command could not run (a migration that ran and failed is
/// reported, not an error).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No KVM.
    #[error("/dev/kvm is not usable here")]
    NoKvm,
    /// `--prealloc` on a kernel without minor faults on shared memory.
    #[error(
        "--prealloc needs userfaultfd minor faults on shared memory (Linux 5.14 or later); \
         run without it to allocate RAM as pages arrive"
    )]
    PreallocUnsupported,
    /// A step of the VMM failed.
    #[error("cannot {step}")]
    Vmm {
        /// What was being done.
        step: &'static str,
        /// Why.
        #[source]
        source: postcopy_kvm::Error,
    },
    /// An address that does not resolve.
    #[error("address {addr}")]
    Resolve {
        /// As given.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An address that resolves to nothing.
    #[error("address {0} resolves to nothing")]
    Unresolved(String),
    /// A file or socket operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what (a file or an address).
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not boot.
    #[error("cannot boot the guest")]
    Boot(#[source] BootError),
    /// Huge pages that cannot serve these settings.
    #[error(transparent)]
    HugePages(#[from] postcopy_kvm::HugePageError),
    /// A bad test-only damage switch.
    #[error("bad test-only damage switch")]
    Damage(#[source] DamageError),
    /// The destination's address did not come.
    #[error("no destination address in {} within {timeout:?}", path.display())]
    NoConnectFile {
        /// The file waited for.
        path: PathBuf,
        /// How long.
        timeout: Duration,
    },
    /// The built-in guest did not write its pattern once.
    #[error("the guest did not complete a pass in {0:?}")]
    NoFirstPass(Duration),
    /// The source could not run the migration.
    #[error("the source cannot migrate")]
    Source(#[source] SourceError),
    /// The two processes of the demo could not run.
    #[error("cannot run the migration's two processes")]
    VmmPair(#[source] VmmPairError),
    /// A side of the demo gave no report.
    #[error("a side ended without a report (see its messages above)")]
    MissingReport,
    /// A report could not be encoded.
    #[error("cannot encode the report")]
    Json(#[source] serde_json::Error),
    /// Bad TLS settings.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The demo's credentials could not be made.
    #[error("cannot make the demo's TLS credentials")]
    DemoCredentials(#[source] postcopy_secure::CredentialError),
}

fn vmm<E: Into<postcopy_kvm::Error>>(step: &'static str) -> impl FnOnce(E) -> CommandError {
    move |source| CommandError::Vmm { step, source: source.into() }
}

fn io_error(what: &'static str, path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CommandError {
    let path = path.to_string();
    move |source| CommandError::Io { what, path, source }
}

#[derive(Args, Debug)]
pub struct DestinationArgs {
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
    /// Allocate this much guest RAM (the source's --mem) ahead of the
    /// migration, every page in shared memory: the migration then only
    /// copies pages into place (UFFDIO_CONTINUE) instead of allocating each
    /// one as it arrives, which costs up to ~10 us a page on a host that
    /// reclaims this machine's free memory (see the README). On 4 KiB pages
    /// the destination listens at once and a thread (on --bulk-cpu)
    /// allocates the pages in the background, in the order the source
    /// pushes them; with --hugepages every page is allocated before
    /// listening. A source with other RAM is refused.
    #[arg(long, value_parser = parse_size)]
    pub prealloc: Option<u64>,
    /// With --prealloc: allocate every page before listening (as long as
    /// touching that much memory takes) instead of in the background; for
    /// comparison.
    #[arg(long, requires = "prealloc")]
    pub prealloc_before_listening: bool,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct SourceArgs {
    /// The destination's address.
    #[arg(long, required_unless_present = "connect_file")]
    pub connect: Option<String>,
    /// Once the guest is ready, wait for this file (a destination's
    /// --ready-file) and connect to the address in it, instead of
    /// --connect: the destination can be started when the source is ready.
    #[arg(long, hide = true, conflicts_with = "connect")]
    pub connect_file: Option<PathBuf>,
    /// Write this (empty) file once the guest is ready to migrate.
    #[arg(long, hide = true)]
    pub ready_file: Option<PathBuf>,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Where the guest's serial port writes: a file, or - for stdout.
    #[arg(long)]
    pub serial: Option<String>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// How long the guest runs on the destination before it is checked, in ms.
    #[arg(long, default_value_t = 500)]
    pub run_after_ms: u64,
    /// Plain TCP instead of mutual TLS (made for the demo in a temporary
    /// directory), to compare.
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub common: Common,
}

pub fn serial_output(arg: &Option<String>) -> Result<SerialOutput, CommandError> {
    match arg.as_deref() {
        None => Ok(SerialOutput::Sink),
        Some("-") => Ok(SerialOutput::Stdout),
        Some(path) => {
            SerialOutput::file(std::path::Path::new(path)).map_err(io_error("cannot create the serial file", path))
        }
    }
}

/// Reserves `bytes` of checkpoint memory now (fallback on: call it before
/// the guest runs, when first touches are cheapest).
pub fn reserve_checkpoint_memory(memory: &CheckpointMemory, bytes: u64) {
    if bytes == 0 {
        return;
    }
    let took = memory.reserve(usize::try_from(bytes).unwrap_or(usize::MAX));
    tracing::info!(mib = bytes >> 20, ms = took.as_millis() as u64, "checkpoint memory reserved");
}

fn resolve(addr: &str) -> Result<SocketAddr, CommandError> {
    addr.to_socket_addrs()
        .map_err(|source| CommandError::Resolve { addr: addr.into(), source })?
        .next()
        .ok_or_else(|| CommandError::Unresolved(addr.into()))
}

fn to_json(value: &impl serde::Serialize, pretty: bool) -> Result<String, CommandError> {
    if pretty { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) }.map_err(CommandError::Json)
}

/// `postcopy dest`.
pub fn destination(a: DestinationArgs) -> Result<ExitCode, CommandError> {
    if !postcopy_kvm::kvm_available() {
        return Err(CommandError::NoKvm);
    }
    let config = a.common.config(Mode::Postcopy);
    a.common.check_hugepages(&config)?;
    let security = a.security.security(Role::Destination, config.handshake_timeout)?;
    let checkpoint_memory = CheckpointMemory::default();
    if config.fallback.is_some() {
        reserve_checkpoint_memory(&checkpoint_memory, a.common.checkpoint_reserve_bytes(a.prealloc));
    }
    let (preallocated, population) = match a.prealloc {
        Some(bytes) => {
            let features = postcopy_kvm::uffd::probe_features().map_err(vmm("probe userfaultfd for --prealloc"))?;
            let huge = a.common.hugepages;
            if !features.has(if huge.is_some() { "MINOR_HUGETLBFS" } else { "MINOR_SHMEM" }) {
                return Err(CommandError::PreallocUnsupported);
            }
            let layout = MemoryMap::pc(bytes).map_err(vmm("lay out the RAM of --prealloc"))?;
            let t0 = Instant::now();
            let (ram, population) =
                populate::preallocate(layout, huge, a.prealloc_before_listening, a.common.tuning().bulk_cpu)
                    .map_err(vmm("preallocate the RAM of --prealloc"))?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            match population {
                Some(_) => tracing::info!(mib = bytes >> 20, ms, "guest RAM allocated, populating in the background"),
                None => tracing::info!(mib = bytes >> 20, ms, "guest RAM preallocated"),
            }
            (Some(ram), population)
        }
        None => (None, None),
    };
    let listener = TcpListener::bind(resolve(&a.listen)?).map_err(io_error("cannot listen on", &a.listen))?;
    let addr = listener.local_addr().map_err(io_error("cannot read the address listened on", &a.listen))?;
    eprintln!("destination: listening on {addr} ({})", security.describe());
    if let Some(path) = &a.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io_error("cannot write the ready file", path.display()))?;
    }
    let opts = DestinationOptions {
        blocktime: None,
        config,
        tuning: a.common.tuning(),
        serial: serial_output(&a.serial)?,
        run_after: Duration::from_millis(a.run_after_ms),
        dump_memory: a.dump_memory.clone(),
        damage: Damage::from_env().map_err(CommandError::Damage)?,
        progress_bar: !a.no_progress && !a.common.json,
        preallocated,
        population,
        security,
        checkpoint_memory,
    };
    let outcome = driver::run_destination(listener, &opts);
    let r = outcome.report;
    if a.common.json {
        println!("{}", to_json(&r, false)?);
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
    if let Some(f) = &r.fallback {
        println!(
            "  fallback: {} checkpoints ({} pages, {:.1} MiB), vCPUs stopped p50 {:.0} us max {:.0} us; {} fences{}",
            f.checkpoints,
            f.checkpoint_pages,
            f.checkpoint_bytes as f64 / MIB as f64,
            f.stop_us_p50,
            f.stop_us_max,
            f.fences,
            if f.discarded { "; the source took the guest back: this copy was dropped" } else { "" }
        );
    }
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

/// Boots the guest a source migrates.
fn start_guest(g: &GuestArgs, serial: SerialOutput, tuning: &Tuning) -> Result<LiveGuest, CommandError> {
    if !postcopy_kvm::kvm_available() {
        return Err(CommandError::NoKvm);
    }
    let spec = GuestSpec { mem_bytes: g.mem, vcpus: g.vcpus, image: g.guest_image.clone() };
    LiveGuest::boot(&spec, serial, tuning).map_err(CommandError::Boot)
}

/// `postcopy source`.
pub fn source(a: SourceArgs) -> Result<ExitCode, CommandError> {
    let config = a.common.config(a.guest.core_mode());
    a.common.check_hugepages(&config)?;
    // Checked before the guest boots when the address is known.
    let target = |connect: &str| -> Result<_, CommandError> {
        Ok((resolve(connect)?, a.security.security(Role::Source { connect }, config.handshake_timeout)?))
    };
    let known = a.connect.as_deref().map(target).transpose()?;
    let tuning = a.common.tuning();
    let checkpoint_memory = CheckpointMemory::default();
    if config.fallback.is_some() {
        reserve_checkpoint_memory(&checkpoint_memory, a.common.checkpoint_reserve_bytes(Some(a.guest.mem)));
    }
    let guest = start_guest(&a.guest, serial_output(&a.serial)?, &tuning)?;
    let stats = guest.vm.devices().stats().clone();
    if guest.machine.guest == GuestKind::Pattern {
        // Let every vCPU write its whole share once, so that memory holds
        // the pattern (not zeros) when it moves.
        let t0 = Instant::now();
        while stats.snapshot().reports.iter().any(|&r| r < 1) {
            if t0.elapsed() > FIRST_PASS_TIMEOUT {
                return Err(CommandError::NoFirstPass(FIRST_PASS_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let t_a = postcopy_kvm::monotonic_ns();
    std::thread::sleep(Duration::from_millis(a.guest.run_before_ms));
    let progress_before = stats.pages_rate(t_a, postcopy_kvm::monotonic_ns());
    let passes_before: u64 = stats.snapshot().reports.iter().sum();
    if let Some(path) = &a.ready_file {
        std::fs::write(path, b"").map_err(io_error("cannot write the ready file", path.display()))?;
    }
    let (addr, security) = match (known, &a.connect_file) {
        (Some(known), _) => known,
        (None, Some(path)) => target(&wait_for_address(path, CONNECT_FILE_TIMEOUT)?)?,
        (None, None) => return Err(CommandError::Unresolved("(no --connect)".into())),
    };
    eprintln!(
        "source: {} MiB guest with {} vCPUs running; migrating to {addr} ({:?} mode, {})",
        a.guest.mem / MIB,
        guest.machine.vcpus,
        a.guest.mode,
        security.describe()
    );
    let opts = SourceOptions {
        connect: addr,
        config,
        tuning,
        security,
        checkpoint_memory,
        checkpoint_counters: Default::default(),
    };
    let session = driver::new_session_id();
    let outcome =
        driver::run_source(&guest.vm, &guest.vcpus, &guest.machine, session, &opts).map_err(CommandError::Source)?;
    let ok = outcome.finished.result.is_ok();
    let mut report = outcome.report(driver::ReportedGuest {
        mem_bytes: a.guest.mem,
        vcpus: guest.machine.vcpus,
        mode: format!("{:?}", a.guest.mode).to_lowercase(),
        progress_before_pages_per_s: progress_before,
        passes_before,
        fallback: opts.config.fallback.is_some(),
    });
    if ok {
        // The guest lives on the destination now; its vCPUs here stay stopped.
        drop(guest);
    } else {
        let t = postcopy_kvm::monotonic_ns();
        std::thread::sleep(Duration::from_millis(300));
        report.progress_after_failure_pages_per_s = stats.pages_rate(t, postcopy_kvm::monotonic_ns());
        if outcome.fallback.takeover.is_some() {
            // The guest restarted here from a checkpoint and ran on: its
            // memory must match where its vCPUs stand now.
            report.pattern_after_takeover = driver::check_running_guest(&guest.vm, &guest.vcpus, &guest.machine, true)
                .map_err(|e| {
                    report.error = Some(format!(
                        "{}; after the takeover: {}",
                        report.error.clone().unwrap_or_default(),
                        driver::error_chain(&e)
                    ));
                })
                .ok()
                .flatten();
        }
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
        println!("{}", to_json(&report, false)?);
    } else if ok {
        println!("source: migration COMPLETED; the guest runs on the destination");
        println!("  digest of sent pages {:016x} ({} missing)", report.digest.digest, report.digest.missing_pages);
    } else {
        println!("source: migration FAILED: {}", report.error.as_deref().unwrap_or("?"));
    }
    if let (false, Some(f)) = (a.common.json, &report.fallback) {
        println!(
            "  fallback: {} checkpoints committed ({} pages, {:.1} MiB), {} dropped",
            f.checkpoints_committed,
            f.checkpoint_pages,
            f.checkpoint_bytes as f64 / MIB as f64,
            f.checkpoints_discarded
        );
        if let Some(t) = &f.takeover {
            println!(
                "  the destination was lost: the guest runs here again from checkpoint {}, {:.0} ms after its last word{}",
                t.checkpoint,
                t.running_ns.saturating_sub(t.last_heard_ns) as f64 / 1e6,
                t.error.as_deref().map(|e| format!(" (FAILED: {e})")).unwrap_or_default()
            );
        }
        if let Some(p) = &report.pattern_after_takeover {
            println!(
                "  guest pattern after the takeover: {} pages checked, {} bad: {}",
                p.pages_checked,
                p.bad_pages,
                if p.ok() { "ok" } else { "FAILED" }
            );
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `postcopy demo`: two `postcopy run` processes driven over QMP.
pub fn demo(a: DemoArgs) -> Result<ExitCode, CommandError> {
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
    let creds =
        if a.insecure { None } else { Some(PairCredentials::new("demo").map_err(CommandError::DemoCredentials)?) };
    if !a.common.json {
        println!(
            "connections: {}",
            if a.insecure { "plain TCP (--insecure)" } else { "mutual TLS 1.3 (credentials made for the demo)" }
        );
    }
    let PairReports { source, destination } =
        run_vmm_pair(&a.guest, &a.common, a.run_after_ms, &env, creds.as_ref()).map_err(CommandError::VmmPair)?;
    let (Some(source), Some(destination)) = (source, destination) else {
        return Err(CommandError::MissingReport);
    };
    let run = RunReport::new(source, destination);
    if a.common.json {
        println!("{}", to_json(&run, true)?);
    } else {
        println!("{}", run.table());
    }
    Ok(if run.integrity_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
