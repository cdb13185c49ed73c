//! The demo's migration between two `postcopy run` processes over
//! loopback, driven over their QMP sockets as an orchestrator would: the
//! source boots the guest, the destination waits with `--incoming`, the
//! source gets `migrate`, both are watched with `query-migrate`, the guest
//! that arrived runs a while and is checked with `x-postcopy-verify`, then
//! both get `quit`. The children inherit the environment (`POSTCOPY_LOG`)
//! and write their messages to this process's stderr.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postcopy_kvm::driver::report::{DestinationReport, SourceReport};
use postcopy_qmp::{ClientError, Command as Qmp, MigrateArgs, MigrationParameters, MigrationStatus, QmpClient};
use serde_json::Value;

use crate::args::{Common, GuestArgs, ModeArg};
use crate::pair::PairReports;
use crate::tls::PairCredentials;

/// How long the migration may run.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a process may take to serve QMP (the destination preallocates
/// its RAM first: up to ~3 s per GiB here).
const READY_TIMEOUT_BASE: Duration = Duration::from_secs(60);
/// How long a process may take to exit after `quit`.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the demo's processes could not run the migration.
#[derive(Debug, thiserror::Error)]
pub enum VmmPairError {
    /// The path of this program is unknown.
    #[error("cannot find this program")]
    CurrentExe(#[source] std::io::Error),
    /// No free loopback port.
    #[error("cannot find a free port")]
    Port(#[source] std::io::Error),
    /// A child could not be started.
    #[error("cannot start the {side}")]
    Spawn {
        /// "source" or "destination".
        side: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A child ended or never served QMP.
    #[error("the {side} did not serve QMP on {} within {timeout:?}", path.display())]
    NotReady {
        /// "source" or "destination".
        side: &'static str,
        /// Its socket.
        path: PathBuf,
        /// How long it had.
        timeout: Duration,
    },
    /// A QMP exchange failed.
    #[error("QMP with the {side}")]
    Qmp {
        /// "source" or "destination".
        side: &'static str,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// The migration did not end in time.
    #[error("the migration did not end within {0:?}")]
    Timeout(Duration),
}

/// A child `postcopy run` and a QMP client on it.
struct Process {
    side: &'static str,
    child: Child,
    qmp: QmpClient,
}

impl Process {
    fn start(side: &'static str, mut cmd: Command, socket: &Path, timeout: Duration) -> Result<Process, VmmPairError> {
        let mut child = cmd.spawn().map_err(|source| VmmPairError::Spawn { side, source })?;
        let t0 = Instant::now();
        loop {
            if let Ok(qmp) = QmpClient::connect_negotiated(socket) {
                return Ok(Process { side, child, qmp });
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(VmmPairError::NotReady { side, path: socket.to_path_buf(), timeout });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn execute(&mut self, command: &Qmp) -> Result<Value, VmmPairError> {
        self.qmp.execute(command).map_err(|source| VmmPairError::Qmp { side: self.side, source })
    }

    /// Polls `query-migrate` until the migration ended, within `deadline`.
    fn wait_ended(&mut self, deadline: Instant) -> Result<MigrationStatus, VmmPairError> {
        loop {
            let info = self.qmp.query_migrate().map_err(|source| VmmPairError::Qmp { side: self.side, source })?;
            if let Some(status) = info.status.filter(|s| !s.is_running()) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(VmmPairError::Timeout(MIGRATION_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `quit`, then waits for the process (killed if it does not exit).
    fn quit(mut self) {
        let _ = self.qmp.execute(&Qmp::Quit);
        let t0 = Instant::now();
        while t0.elapsed() < QUIT_TIMEOUT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(side = self.side, "did not exit after quit: killed");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the demo's migration between two `postcopy run` processes and
/// gathers both sides' reports (None: a side could not tell).
pub fn run_vmm_pair(
    guest: &GuestArgs,
    common: &Common,
    run_after_ms: u64,
    extra_env: &[(&str, &str)],
    creds: Option<&PairCredentials>,
) -> Result<PairReports, VmmPairError> {
    let (source_security, destination_security) = match creds {
        Some(c) => (c.source().forward(), c.destination().forward()),
        None => (vec!["--insecure".to_string()], vec!["--insecure".to_string()]),
    };
    let exe = std::env::current_exe().map_err(VmmPairError::CurrentExe)?;
    let dir = std::env::temp_dir().join(format!("postcopy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| VmmPairError::Spawn { side: "destination", source })?;
    let (source_socket, destination_socket) = (dir.join("source.qmp"), dir.join("destination.qmp"));
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(VmmPairError::Port)?.port();
    let ready_timeout = READY_TIMEOUT_BASE + Duration::from_secs(5 * guest.mem.div_ceil(1 << 30));

    let mut destination = Command::new(&exe);
    destination
        .arg("run")
        .arg("--qmp")
        .arg(&destination_socket)
        .arg(format!("--incoming=tcp:127.0.0.1:{port}"))
        .arg(format!("--prealloc={}", guest.mem))
        .args(common.forward())
        .args(&destination_security)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        destination.env(k, v);
    }
    let mut destination = Process::start("destination", destination, &destination_socket, ready_timeout)?;

    let mut source = Command::new(&exe);
    source
        .arg("run")
        .arg("--qmp")
        .arg(&source_socket)
        .arg(format!("--mem={}", guest.mem))
        .arg(format!("--vcpus={}", guest.vcpus))
        .args(common.forward())
        .args(&source_security)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(image) = &guest.guest_image {
        source.arg("--guest-image").arg(image);
    }
    let mut source = Process::start("source", source, &source_socket, ready_timeout)?;

    let rounds = match guest.mode {
        ModeArg::Postcopy => 0,
        ModeArg::Hybrid => u64::from(guest.precopy_rounds.max(1)),
    };
    source.execute(&Qmp::MigrateSetParameters(MigrationParameters {
        x_precopy_rounds: Some(rounds),
        ..Default::default()
    }))?;
    std::thread::sleep(Duration::from_millis(guest.run_before_ms));
    eprintln!("source: migrating to 127.0.0.1:{port} ({:?} mode)", guest.mode);
    source.execute(&Qmp::Migrate(MigrateArgs { uri: format!("tcp:127.0.0.1:{port}"), resume: false }))?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let source_status = source.wait_ended(deadline)?;
    let destination_status = destination.wait_ended(deadline)?;
    tracing::info!(%source_status, %destination_status, "the migration ended");
    if destination_status == MigrationStatus::Completed {
        // The guest runs on the destination a while before it is checked.
        std::thread::sleep(Duration::from_millis(run_after_ms));
    }
    let source_report = report::<SourceReport>(&source.execute(&Qmp::XPostcopyVerify)?, "last-outgoing");
    let destination_report = report::<DestinationReport>(&destination.execute(&Qmp::XPostcopyVerify)?, "last-incoming");
    source.quit();
    destination.quit();
    let _ = std::fs::remove_dir(&dir);
    Ok(PairReports { source: source_report, destination: destination_report })
}

/// A report member of an `x-postcopy-verify` reply.
fn report<T: serde::de::DeserializeOwned>(reply: &Value, member: &str) -> Option<T> {
    reply.get(member).cloned().and_then(|r| serde_json::from_value(r).ok())
}
