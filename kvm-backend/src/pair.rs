//! A migration between two child processes of this program over loopback
//! (`postcopy dest` and `postcopy source`), for `demo` and `bench`. The
//! children inherit the environment, `POSTCOPY_LOG` included, and write
//! their messages to this process's stderr.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use postcopy_kvm::driver::report::{DestinationReport, SourceReport};

use crate::args::{Common, GuestArgs, ModeArg};
use crate::tls::PairCredentials;

/// How long the source may run.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the destination may run after the source ended.
const DESTINATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the pair could not be run.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// The path of this program is unknown.
    #[error("cannot find this program")]
    CurrentExe(#[source] std::io::Error),
    /// A child could not be started.
    #[error("cannot start the {side}")]
    Spawn {
        /// "source" or "destination".
        side: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The destination ended before it listened.
    #[error("the destination exited early ({0})")]
    DestinationExited(ExitStatus),
    /// The source ended before its guest was ready.
    #[error("the source exited early ({0})")]
    SourceExited(ExitStatus),
    /// The source's guest was not ready in time.
    #[error("the source's guest was not ready within {0:?}")]
    SourceNotReady(Duration),
    /// The destination did not write its address in time.
    #[error("the destination did not start listening within {0:?} (ready file {1})")]
    NotListening(Duration, PathBuf),
}

/// What each side reported (None: it ended without a report).
#[derive(Debug)]
pub struct PairReports {
    /// The source's report.
    pub source: Option<SourceReport>,
    /// The destination's report.
    pub destination: Option<DestinationReport>,
}

/// When the pair starts the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationStart {
    /// First, then the source once the destination listens (the demo's
    /// order: the destination prepares while the source boots its guest).
    First,
    /// Once the source's guest is ready to migrate: the source connects as
    /// soon as the destination listens, so whatever the destination still
    /// does then (populating its RAM) overlaps with the migration.
    WhenSourceReady,
}

/// A pair's reports, with how long the destination took to listen.
#[derive(Debug)]
pub struct TimedPair {
    /// Both reports.
    pub reports: PairReports,
    /// From the destination's start (process spawned) to its listening
    /// socket's address written (connections are accepted from then), ms.
    pub listening_ms: f64,
}

/// Runs a destination and a source as child processes of this binary over
/// loopback and gathers both reports.
pub fn run_pair(
    guest: &GuestArgs,
    common: &Common,
    run_after_ms: u64,
    extra_env: &[(&str, &str)],
    creds: Option<&PairCredentials>,
) -> Result<PairReports, PairError> {
    run_pair_timed(guest, common, run_after_ms, extra_env, creds, DestinationStart::First, &[]).map(|t| t.reports)
}

/// [`run_pair`], starting the destination at `start` with the extra
/// arguments `destination_args`, and timing how long it took to listen.
pub fn run_pair_timed(
    guest: &GuestArgs,
    common: &Common,
    run_after_ms: u64,
    extra_env: &[(&str, &str)],
    creds: Option<&PairCredentials>,
    start: DestinationStart,
    destination_args: &[&str],
) -> Result<TimedPair, PairError> {
    let (source_security, destination_security) = match creds {
        Some(c) => (c.source().forward(), c.destination().forward()),
        None => (vec!["--insecure".to_string()], vec!["--insecure".to_string()]),
    };
    let exe = std::env::current_exe().map_err(PairError::CurrentExe)?;
    let tag = format!("{}-{}", std::process::id(), rand_tag());
    let ready = std::env::temp_dir().join(format!("postcopy-demo-{tag}.addr"));
    let source_ready = std::env::temp_dir().join(format!("postcopy-demo-{tag}.source"));
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&source_ready);
    let mut source = Command::new(&exe);
    source
        .args(["source", "--json", "--mode"])
        .arg(match guest.mode {
            ModeArg::Postcopy => "postcopy",
            ModeArg::Hybrid => "hybrid",
        })
        .arg(format!("--precopy-rounds={}", guest.precopy_rounds))
        .arg(format!("--mem={}", guest.mem))
        .arg(format!("--vcpus={}", guest.vcpus))
        .arg(format!("--run-before-ms={}", guest.run_before_ms))
        .args(common.forward())
        .args(&source_security)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(image) = &guest.guest_image {
        source.arg("--guest-image").arg(image);
    }
    let mut early_source = None;
    if start == DestinationStart::WhenSourceReady {
        source.arg("--connect-file").arg(&ready).arg("--ready-file").arg(&source_ready);
        let mut child = source.spawn().map_err(|source| PairError::Spawn { side: "source", source })?;
        let t0 = Instant::now();
        while std::fs::metadata(&source_ready).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(PairError::SourceExited(status));
            }
            if t0.elapsed() > SOURCE_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PairError::SourceNotReady(SOURCE_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&source_ready);
        early_source = Some(child);
    }
    let mut destination = Command::new(&exe);
    destination
        .args(["dest", "--listen", "127.0.0.1:0", "--json", "--run-after-ms"])
        .arg(run_after_ms.to_string())
        .arg(format!("--prealloc={}", guest.mem))
        .arg("--ready-file")
        .arg(&ready)
        .args(common.forward())
        .args(destination_args)
        .args(&destination_security)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        destination.env(k, v);
    }
    let t0 = Instant::now();
    let mut destination = match destination.spawn() {
        Ok(d) => d,
        Err(source) => {
            if let Some(mut s) = early_source {
                let _ = s.kill();
                let _ = s.wait();
            }
            return Err(PairError::Spawn { side: "destination", source });
        }
    };
    // Preallocating takes up to ~3 s per GiB here.
    let listen_timeout = Duration::from_secs(30 + 5 * guest.mem.div_ceil(1 << 30));
    let failed = |destination: &mut Child, early_source: Option<Child>| {
        let _ = destination.kill();
        let _ = destination.wait();
        if let Some(mut s) = early_source {
            let _ = s.kill();
            let _ = s.wait();
        }
    };
    let (addr, listening_ms) = loop {
        // Polled at 1 ms: the time to listen is a figure of the bench.
        if let Ok(s) = std::fs::read_to_string(&ready) {
            break (s, t0.elapsed().as_secs_f64() * 1e3);
        }
        if let Ok(Some(status)) = destination.try_wait() {
            failed(&mut destination, early_source);
            return Err(PairError::DestinationExited(status));
        }
        if t0.elapsed() > listen_timeout {
            failed(&mut destination, early_source);
            return Err(PairError::NotListening(listen_timeout, ready));
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let source = match early_source {
        // It reads the address from the ready file itself.
        Some(s) => s,
        None => {
            source.arg("--connect").arg(addr.trim());
            source.spawn().map_err(|source| {
                let _ = destination.kill();
                PairError::Spawn { side: "source", source }
            })?
        }
    };
    let source_out = wait_json(source, SOURCE_TIMEOUT);
    let _ = std::fs::remove_file(&ready);
    let destination_out = wait_json(destination, DESTINATION_TIMEOUT);
    Ok(TimedPair {
        reports: PairReports {
            source: source_out.and_then(|s| serde_json::from_str(&s).ok()),
            destination: destination_out.and_then(|s| serde_json::from_str(&s).ok()),
        },
        listening_ms,
    })
}

fn rand_tag() -> u64 {
    postcopy_kvm::monotonic_ns() % 1_000_000_007
}

/// Waits for a child (killing it after `timeout`) and returns the last JSON
/// line of its stdout.
fn wait_json(mut child: Child, timeout: Duration) -> Option<String> {
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
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if t0.elapsed() > timeout => {
                tracing::warn!(pid = child.id(), ?timeout, "a child ran too long: killed");
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    reader.join().ok().flatten()
}
