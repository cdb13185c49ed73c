//! `postcopy run` processes (here, or in a network namespace) driven over
//! their QMP Unix sockets as an orchestrator drives QEMU, and the check of
//! a guest that arrived: shared by the QMP, two-hosts and polling-cost tests.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::binary;
use postcopy_qmp::{
    Command as Qmp, MigrateArgs, MigrateIncomingArgs, MigrationCapability, MigrationCapabilityStatus,
    MigrationParameters, MigrationStatus, QmpClient, RunState,
};
use serde_json::Value;

/// How long one migration may take on this shared, loaded machine.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

/// A `postcopy run` process and a QMP client on its socket. Killed on drop.
pub struct Vmm {
    pub name: &'static str,
    pub child: Child,
    pub stderr: PathBuf,
    pub socket: PathBuf,
    pub qmp: QmpClient,
}

impl Vmm {
    /// Starts `postcopy run --qmp DIR/NAME.sock ARGS` here.
    pub fn start(dir: &Path, name: &'static str, args: &[&str]) -> Vmm {
        Vmm::start_in(dir, name, None, args, &[])
    }

    pub fn start_with_env(dir: &Path, name: &'static str, args: &[&str], env: &[(&str, &str)]) -> Vmm {
        Vmm::start_in(dir, name, None, args, env)
    }

    /// Starts the process in network namespace `netns` (with `ip netns
    /// exec`, which execs the binary: the child is `postcopy` itself) or,
    /// without one, here. Its QMP socket is a file: reachable from here.
    pub fn start_in(dir: &Path, name: &'static str, netns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Vmm {
        let socket = dir.join(format!("{name}.sock"));
        let stderr = dir.join(format!("{name}.err"));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .arg("run")
            .arg("--qmp")
            .arg(&socket)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start postcopy run");
        let t0 = Instant::now();
        let qmp = loop {
            if let Ok(client) = QmpClient::connect_negotiated(&socket) {
                break client;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{name}: no QMP socket; {}", read(&stderr));
            std::thread::sleep(Duration::from_millis(20));
        };
        Vmm { name, child, stderr, socket, qmp }
    }

    pub fn execute(&mut self, command: Qmp) -> Value {
        match self.qmp.execute(&command) {
            Ok(value) => value,
            Err(e) => panic!("{}: {e}\n{}", self.name, read(&self.stderr)),
        }
    }

    pub fn run_state(&mut self) -> RunState {
        self.qmp.query_status().expect("query-status").status
    }

    pub fn status(&mut self) -> Option<MigrationStatus> {
        self.qmp.query_migrate().expect("query-migrate").status
    }

    pub fn enable_events(&mut self) {
        self.set_capability(MigrationCapability::Events, true);
    }

    pub fn set_capability(&mut self, capability: MigrationCapability, state: bool) {
        let capabilities = vec![MigrationCapabilityStatus { capability, state }];
        self.execute(Qmp::MigrateSetCapabilities { capabilities });
    }

    pub fn set_parameters(&mut self, parameters: MigrationParameters) {
        self.execute(Qmp::MigrateSetParameters(parameters));
    }

    pub fn precopy_rounds(&mut self, rounds: u64) {
        self.set_parameters(MigrationParameters { x_precopy_rounds: Some(rounds), ..Default::default() });
    }

    /// `migrate-incoming`: listen for the migration on `uri`.
    pub fn listen(&mut self, uri: String) {
        self.execute(Qmp::MigrateIncoming(MigrateIncomingArgs { uri, exit_on_error: None }));
    }

    pub fn migrate(&mut self, uri: String) {
        self.execute(Qmp::Migrate(MigrateArgs { uri, resume: false }));
    }

    /// Polls until the migration ended; its last status.
    pub fn wait_ended(&mut self) -> MigrationStatus {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.status().filter(|s| !s.is_running()) {
                return status;
            }
            assert!(t0.elapsed() < MIGRATION_TIMEOUT, "{}: migration did not end; {}", self.name, read(&self.stderr));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The MIGRATION statuses received so far, in order.
    pub fn migration_events(&mut self) -> Vec<MigrationStatus> {
        let mut out = Vec::new();
        while let Some(event) = self.qmp.next_event(Some(Duration::ZERO)).expect("events") {
            if let Some(postcopy_qmp::Event::Migration { status }) = event.event() {
                out.push(status);
            }
        }
        out
    }

    /// Blocks on MIGRATION events (no `query-migrate`) until the migration
    /// ended; its last status.
    pub fn wait_ended_by_events(&mut self) -> MigrationStatus {
        let t0 = Instant::now();
        loop {
            let left = MIGRATION_TIMEOUT.saturating_sub(t0.elapsed());
            assert!(!left.is_zero(), "{}: migration did not end; {}", self.name, read(&self.stderr));
            let event = self.qmp.next_event(Some(left)).expect("events");
            if let Some(postcopy_qmp::Event::Migration { status }) = event.and_then(|e| e.event()) {
                if !status.is_running() {
                    return status;
                }
            }
        }
    }

    /// `x-postcopy-verify`: the arrived guest's digests and pattern check.
    pub fn verify(&mut self) -> Value {
        self.execute(Qmp::XPostcopyVerify)
    }

    pub fn stderr_text(&self) -> String {
        read(&self.stderr)
    }

    pub fn quit(mut self) {
        self.execute(Qmp::Quit);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "{}: exit {status}", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{}: did not exit after quit", self.name);
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A loopback migration address.
pub fn uri(port: u16) -> String {
    format!("tcp:127.0.0.1:{port}")
}

/// A loopback port free now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The source's digest of the pages as sent, from `query-migrate`.
pub fn sent_digest(vmm: &mut Vmm) -> String {
    let info = vmm.qmp.query_migrate().expect("query-migrate");
    info.x_postcopy.and_then(|x| x.memory_digest).expect("the source reports its digest once completed")
}

/// Checks the guest that arrived at `dest` against what `source` sent (hop
/// `hop` of a guest's journey): the digests of the pages sent and
/// installed, and the guest's pattern.
pub fn assert_hop_verified(source: &mut Vmm, dest: &mut Vmm, hop: usize) {
    let sent = sent_digest(source);
    let report = dest.verify();
    assert_eq!(report["ok"], true, "hop {hop}: {report:#}");
    assert_eq!(report["guest"], "pattern", "hop {hop}");
    assert_eq!(report["arrived-digest"]["missing-pages"], 0, "hop {hop}: {report:#}");
    assert_eq!(report["arrived-digest"]["digest"], Value::String(sent), "hop {hop}: digests differ: {report:#}");
    let pattern = &report["pattern"];
    assert!(pattern["pages_checked"].as_u64().unwrap_or(0) > 0, "hop {hop}: {report:#}");
    assert_eq!(pattern["bad_pages"], 0, "hop {hop}: {report:#}");
}
