//! Two hosts on one machine: two network namespaces joined by a veth pair
//! (removed on drop, even when a test fails). `vmm::Vmm::start_in` starts
//! `postcopy run` in one; its QMP socket lives on the shared filesystem.
#![allow(dead_code)]

use std::fmt;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::common::REQUIRE_KVM_ENV;

/// Set to `1`, a test that cannot make its network namespaces fails
/// instead of skipping.
const REQUIRE_NETNS_ENV: &str = "POSTCOPY_REQUIRE_NETNS";
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
    /// under `POSTCOPY_REQUIRE_NETNS=1` or `POSTCOPY_REQUIRE_KVM=1` (CI
    /// sets both: it runs as root and can make them).
    pub fn create_or_skip(test: &str) -> Option<TwoHosts> {
        let required =
            [REQUIRE_NETNS_ENV, REQUIRE_KVM_ENV].into_iter().find(|name| std::env::var(name).is_ok_and(|v| v == "1"));
        match TwoHosts::create() {
            Ok(hosts) => Some(hosts),
            Err(e) if required.is_some() => {
                panic!("{test}: cannot make network namespaces ({e}) and {}=1", required.unwrap_or_default())
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
