//! Two hosts on one machine: two network namespaces joined by a veth pair
//! (removed on drop, even when a test fails), and `postcopy run` processes
//! started in them (or here) and driven over their QMP Unix sockets, which
//! live on the shared filesystem.
#![allow(dead_code)]

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common::{binary, REQUIRE_KVM_ENV};
use postcopy_qmp::{
    Command as Qmp, MigrateArgs, MigrateIncomingArgs, MigrationCapability, MigrationCapabilityStatus,
    MigrationParameters, MigrationStatus, QmpClient,
};
use serde_json::Value;

/// A command of the `ip` / `tc` tools that failed.
#[derive(Debug)]
pub struct NetError {
    command: String,
    detail: String,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.command, self.detail)
    }
}

/// Runs `tool args`; its stdout, or what went wrong.
fn tool(tool: &str, args: &[&str]) -> Result<String, NetError> {
    let command = format!("{tool} {}", args.join(" "));
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| NetError { command: command.clone(), detail: format!("cannot run: {e}") })?;
    if !out.status.success() {
        let detail = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        return Err(NetError { command, detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One side of the pair: a namespace, its end of the veth, its address.
#[derive(Clone, Debug)]
pub struct Host {
    pub netns: String,
    pub dev: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// `ip -n NETNS args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        tool("ip", &all)
    }

    /// `tc -n NETNS args...`.
    pub fn tc(&self, args: &[&str]) -> Result<String, NetError> {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        tool("tc", &all)
    }

    /// Takes this side's end of the link down (the cable pulled) or up.
    pub fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        if let Err(e) = self.ip(&["link", "set", "dev", &self.dev, state]) {
            panic!("link {state}: {e}");
        }
    }

    /// Shapes what this side sends to `rate` (a `tc` rate such as `1gbit`)
    /// with a token bucket filter.
    pub fn shape(&self, rate: &str, burst: &str) {
        let args =
            ["qdisc", "replace", "dev", &self.dev, "root", "tbf", "rate", rate, "burst", burst, "latency", "20ms"];
        if let Err(e) = self.tc(&args) {
            panic!("shaping: {e}");
        }
    }

    /// Bytes this side's end of the veth has sent so far.
    pub fn tx_bytes(&self) -> u64 {
        let json = self.ip(&["-j", "-s", "link", "show", "dev", &self.dev]).unwrap_or_else(|e| panic!("{e}"));
        let links: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("ip -j: {e}: {json}"));
        links[0]["stats64"]["tx"]["bytes"].as_u64().unwrap_or_else(|| panic!("no tx bytes in {json}"))
    }

    /// A `tcp:` URI on this side's address.
    pub fn uri(&self, port: u16) -> String {
        format!("tcp:{}:{port}", self.addr)
    }
}

/// Two namespaces joined by a veth pair, each end with its own address in
/// 10.253.0.0/16, which exists only inside these namespaces. Deleting the
/// namespaces on drop deletes the veth pair with them.
pub struct TwoHosts {
    pub source: Host,
    pub dest: Host,
    created: Vec<String>,
}

impl TwoHosts {
    /// Creates the pair, or says why it cannot be made here.
    pub fn create() -> Result<TwoHosts, NetError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names have at most 15 bytes.
        let tag = format!("{}{n}", pid % 10_000_000);
        let subnet = 4 * (n % 64);
        let source = Host {
            netns: format!("postcopy-{tag}-src"),
            dev: format!("pc{tag}s"),
            addr: Ipv4Addr::new(10, 253, (pid % 250) as u8, subnet as u8 + 1),
        };
        let dest = Host {
            netns: format!("postcopy-{tag}-dst"),
            dev: format!("pc{tag}d"),
            addr: Ipv4Addr::new(10, 253, (pid % 250) as u8, subnet as u8 + 2),
        };
        let mut hosts = TwoHosts { source, dest, created: Vec::new() };
        for netns in [hosts.source.netns.clone(), hosts.dest.netns.clone()] {
            tool("ip", &["netns", "add", &netns])?;
            hosts.created.push(netns);
        }
        let (s, d) = (&hosts.source, &hosts.dest);
        // Both ends are made inside their namespaces: the machine's own
        // namespace never holds them.
        tool(
            "ip",
            &[
                "link", "add", "dev", &s.dev, "netns", &s.netns, "type", "veth", "peer", "name", &d.dev, "netns",
                &d.netns,
            ],
        )?;
        for host in [s, d] {
            host.ip(&["addr", "add", &format!("{}/30", host.addr), "dev", &host.dev])?;
            host.ip(&["link", "set", "dev", &host.dev, "up"])?;
            host.ip(&["link", "set", "dev", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// The pair, or None after printing why the test is skipped; panics
    /// under `POSTCOPY_REQUIRE_KVM=1` (CI runs as root and can make them).
    pub fn create_or_skip(test: &str) -> Option<TwoHosts> {
        match TwoHosts::create() {
            Ok(hosts) => Some(hosts),
            Err(e) if std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1") => {
                panic!("{test}: cannot make network namespaces ({e}) and {REQUIRE_KVM_ENV}=1")
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: cannot make network namespaces (needs root and iproute2): {e}");
                None
            }
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for netns in self.created.drain(..) {
            if let Err(e) = tool("ip", &["netns", "delete", &netns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// How long one migration may take on this shared, loaded machine.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

/// A `postcopy run` process (in a namespace, or here) and a QMP client on
/// its socket. Killed on drop.
pub struct Vmm {
    pub name: &'static str,
    pub child: Child,
    pub stderr: PathBuf,
    pub socket: PathBuf,
    pub qmp: QmpClient,
}

impl Vmm {
    /// Starts `postcopy run --qmp DIR/NAME.sock ARGS` inside `netns` (with
    /// `ip netns exec`, which execs the binary: the child is `postcopy`
    /// itself) or, without one, here.
    pub fn start(dir: &Path, name: &'static str, netns: Option<&str>, args: &[&str]) -> Vmm {
        let socket = dir.join(format!("{name}.sock"));
        let stderr = dir.join(format!("{name}.err"));
        let mut command = match netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .arg("run")
            .arg("--qmp")
            .arg(&socket)
            .args(args)
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

    pub fn status(&mut self) -> Option<MigrationStatus> {
        self.qmp.query_migrate().expect("query-migrate").status
    }

    pub fn enable_events(&mut self) {
        let capabilities = vec![MigrationCapabilityStatus { capability: MigrationCapability::Events, state: true }];
        self.execute(Qmp::MigrateSetCapabilities { capabilities });
    }

    pub fn set_parameters(&mut self, parameters: MigrationParameters) {
        self.execute(Qmp::MigrateSetParameters(parameters));
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
            std::thread::sleep(Duration::from_millis(20));
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

/// Checks the guest that arrived at `dest` against what `source` sent:
/// the digests of the pages sent and installed, and the guest's pattern.
pub fn assert_hop_verified(source: &mut Vmm, dest: &mut Vmm) {
    let info = source.qmp.query_migrate().expect("query-migrate");
    let sent = info.x_postcopy.and_then(|x| x.memory_digest).expect("the source reports its digest once completed");
    let report = dest.execute(Qmp::XPostcopyVerify);
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["guest"], "pattern");
    assert_eq!(report["arrived-digest"]["missing-pages"], 0, "{report:#}");
    assert_eq!(report["arrived-digest"]["digest"], Value::String(sent), "digests differ: {report:#}");
    let pattern = &report["pattern"];
    assert!(pattern["pages_checked"].as_u64().unwrap_or(0) > 0, "{report:#}");
    assert_eq!(pattern["bad_pages"], 0, "{report:#}");
}
