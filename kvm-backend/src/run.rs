//! `postcopy run`: a long-running VMM process driven over QMP.

use postcopy_kvm::driver::checkpoint_memory::CheckpointMemory;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use postcopy_core::Mode;
use postcopy_kvm::driver::{pin_self, Damage};
use postcopy_kvm::vmm::{DumpError, GuestSpec, KvmVmm, LiveGuest, VmmConfig, VmmError};
use postcopy_qmp::{EventBus, Server, ServerConfig, ServerError, ThreadStart, Vmm};

use crate::args::{parse_size, Common};
use crate::commands::{serial_output, CommandError};
use crate::tls::{Role, SecurityArgs};

/// How long the built-in guest may take for its first pass.
const FIRST_PASS_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Serve QMP on this Unix socket.
    #[arg(long)]
    pub qmp: PathBuf,
    /// Wait for a migration instead of booting a guest: `tcp:HOST:PORT`, or
    /// `defer` to wait for the `migrate-incoming` command.
    #[arg(long)]
    pub incoming: Option<String>,
    /// Guest RAM (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// vCPUs (1 to 4 for the built-in guest).
    #[arg(long, default_value_t = 2)]
    pub vcpus: usize,
    /// Boot this 512-byte PC boot sector instead of the built-in guest.
    #[arg(long)]
    pub guest_image: Option<PathBuf>,
    /// Where the guest's serial port writes: a file, or - for stdout.
    #[arg(long)]
    pub serial: Option<String>,
    /// Allocate this much RAM for an arriving guest before each incoming
    /// migration listens (see `postcopy dest --prealloc`).
    #[arg(long, value_parser = parse_size)]
    pub prealloc: Option<u64>,
    /// At `quit`, stop the guest running in this process (booted here or
    /// arrived by migration) and write its RAM to this file, block after
    /// block; nothing is written when the guest left.
    #[arg(long)]
    pub dump_memory: Option<PathBuf>,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub common: Common,
}

/// Why `run` could not serve.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A shared setup step failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The VMM could not start.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The QMP socket could not be served.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The memory dump failed.
    #[error(transparent)]
    Dump(#[from] DumpError),
    /// The built-in guest did not write its pattern once.
    #[error("the guest did not complete a pass in {0:?}")]
    NoFirstPass(Duration),
}

/// `postcopy run`.
pub fn run(a: RunArgs) -> Result<ExitCode, RunError> {
    if !postcopy_kvm::kvm_available() {
        return Err(CommandError::NoKvm.into());
    }
    let serial = serial_output(&a.serial)?;
    let base = a.common.config(Mode::Postcopy);
    a.common.check_hugepages(&base).map_err(CommandError::from)?;
    let role = if a.incoming.is_some() { Role::Destination } else { Role::Either };
    let security = a.security.security(role, base.handshake_timeout).map_err(CommandError::from)?;
    // Fallback's checkpoints pass through memory reserved now, before the
    // guest runs (a first touch costs several times more after).
    let guest_ram = if a.incoming.is_some() { a.prealloc } else { Some(a.mem) };
    let checkpoint_reserve = a.common.checkpoint_reserve_bytes(guest_ram);
    let checkpoint_memory = CheckpointMemory::default();
    if base.fallback.is_some() {
        crate::commands::reserve_checkpoint_memory(&checkpoint_memory, checkpoint_reserve);
    }
    let config = VmmConfig {
        tuning: a.common.tuning(),
        base,
        serial: serial.clone(),
        prealloc_bytes: a.prealloc,
        damage: Damage::from_env().map_err(CommandError::Damage)?,
        security,
        checkpoint_memory,
        checkpoint_reserve,
        fallback_settings: a.common.fallback_settings(),
    };
    let bus = EventBus::new();
    let vmm = match a.incoming.as_deref() {
        Some("defer") => KvmVmm::incoming(config, Arc::new(bus.clone()), None)?,
        Some(uri) => KvmVmm::incoming(config, Arc::new(bus.clone()), Some(uri))?,
        None => {
            let spec = GuestSpec { mem_bytes: a.mem, vcpus: a.vcpus, image: a.guest_image.clone() };
            let guest = LiveGuest::boot(&spec, serial, &config.tuning).map_err(VmmError::Boot)?;
            // Memory holds the pattern (not zeros) before anyone migrates it.
            let t0 = Instant::now();
            while !guest.first_pass_done() {
                if t0.elapsed() > FIRST_PASS_TIMEOUT {
                    return Err(RunError::NoFirstPass(FIRST_PASS_TIMEOUT));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            KvmVmm::with_guest(config, Arc::new(bus.clone()), guest)
        }
    };
    let vmm = Arc::new(vmm);
    // QMP's threads wake for every poll of an orchestrator: they run with
    // the bulk path, never beside the fault path's threads.
    let bulk_cpu = a.common.bulk_cpu;
    let server_config = ServerConfig {
        thread_start: ThreadStart::new(move |name| pin_self(bulk_cpu, name)),
        ..ServerConfig::default()
    };
    let server = Server::bind(&a.qmp, server_config, vmm.clone() as Arc<dyn Vmm>, bus)?;
    eprintln!("postcopy run: QMP on {}", a.qmp.display());
    vmm.wait_for_quit();
    // Lets the replies (quit's included) and events out, removes the socket.
    server.shutdown();
    if let Some(path) = &a.dump_memory {
        if vmm.dump_memory(path)? {
            eprintln!("postcopy run: guest memory written to {}", path.display());
        } else {
            eprintln!("postcopy run: no guest here at quit; {} not written", path.display());
        }
    }
    Ok(if vmm.failed_exit() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
