//! Helpers: find (or build) the `postcopy` binary, run a destination and a
//! source as processes, a relay that cuts connections, KVM skip logic.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use postcopy_core::wire::{self, FrameKind};
use postcopy_core::wire::{Frame, Hello, WireMode};
use postcopy_core::{Channel, RamBlock};
use postcopy_kvm::driver::report::{DestinationReport, RunReport, SourceReport};

/// Env var that turns a skip (no /dev/kvm or userfaultfd) into a failure.
pub const REQUIRE_KVM_ENV: &str = "POSTCOPY_REQUIRE_KVM";

/// True if KVM and userfaultfd can be used; otherwise prints why the test
/// is skipped, or panics when `POSTCOPY_REQUIRE_KVM=1` (CI).
pub fn kvm_or_skip(test: &str) -> bool {
    let required = std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1");
    let problem = if !postcopy_kvm::kvm_available() {
        Some("/dev/kvm is not usable".to_string())
    } else {
        postcopy_kvm::uffd::probe_features().err().map(|e| format!("userfaultfd is unusable: {e}"))
    };
    match problem {
        None => true,
        Some(p) if required => panic!("{test}: {p} and {REQUIRE_KVM_ENV}=1"),
        Some(p) => {
            eprintln!("SKIPPED {test}: {p} (set {REQUIRE_KVM_ENV}=1 to fail instead)");
            false
        }
    }
}

/// True if KVM and userfaultfd can be used and `pages` 2 MiB huge pages are
/// free (scripts/test reserves them); otherwise prints why the test is
/// skipped, or panics when `POSTCOPY_REQUIRE_KVM=1` (CI).
pub fn huge_pages_or_skip(test: &str, pages: u64) -> bool {
    huge_pages_of_size_or_skip(test, postcopy_kvm::HugePageSize::Size2M, pages)
}

/// As [`huge_pages_or_skip`], for `pages` free huge pages of `size`
/// (1 GiB pages: scripts/test reserves them with
/// `scripts/hugepages --size 1G`).
pub fn huge_pages_of_size_or_skip(test: &str, size: postcopy_kvm::HugePageSize, pages: u64) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    let required = std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1");
    match size.check_free(pages) {
        Ok(()) => true,
        Err(e) if required => panic!("{test}: {e} and {REQUIRE_KVM_ENV}=1"),
        Err(e) => {
            eprintln!("SKIPPED {test}: {e} (set {REQUIRE_KVM_ENV}=1 to fail instead)");
            false
        }
    }
}

/// Migrations run one at a time: the machine has 2 CPUs, and guests of
/// parallel tests would starve each other.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `postcopy` binary of this build profile, built if needed.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("POSTCOPY_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/<this test> -> target/<profile>/postcopy
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target profile dir").to_path_buf();
        let bin = profile_dir.join("postcopy");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        // `cargo test --workspace` builds it (postcopy-kvm has integration
        // tests); build it here too, so `-p postcopy-e2e` alone is not stale.
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args(["build", "--quiet", "-p", "postcopy-kvm", "--bin", "postcopy"]);
        if release {
            cargo.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            cargo.arg("--target-dir").arg(target_dir);
        }
        let status = cargo.status();
        assert!(bin.exists(), "cannot find or build {} ({status:?})", bin.display());
        bin
    })
    .clone()
}

/// A fresh temporary directory for one test.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("postcopy-e2e-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A destination process listening on a free loopback port.
pub struct Dest {
    pub child: Child,
    pub addr: SocketAddr,
}

/// Starts `postcopy dest --json` with `extra` arguments and `env`.
pub fn start_dest(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Dest {
    let ready = dir.join("dest.addr");
    let _ = std::fs::remove_file(&ready);
    let mut cmd = Command::new(binary());
    cmd.args(["dest", "--listen", "127.0.0.1:0", "--json", "--run-after-ms", "300", "--ready-file"])
        .arg(&ready)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start the destination");
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(&ready) {
            return Dest { child, addr: s.trim().parse().expect("address") };
        }
        if let Ok(Some(status)) = child.try_wait() {
            let out = collect(child, Duration::from_secs(1));
            panic!("destination exited early ({status}): {}", out.stderr);
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "destination did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `postcopy source --json --connect addr` with `extra` arguments.
pub fn start_source(addr: SocketAddr, extra: &[&str]) -> Child {
    Command::new(binary())
        .args(["source", "--json", "--run-before-ms", "100", "--connect"])
        .arg(addr.to_string())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source")
}

/// A finished process: exit status, stdout, stderr.
pub struct Finished {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The JSON report (the last line of stdout that is JSON).
    pub fn json_line(&self) -> Option<&str> {
        self.stdout.lines().rev().find(|l| l.starts_with('{'))
    }
}

/// Waits for `child` at most `timeout` (then kills it) and collects output.
pub fn collect(mut child: Child, timeout: Duration) -> Finished {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if t0.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if status.is_none() {
        eprintln!("process killed after {timeout:?}; stderr:\n{stderr}");
    }
    Finished { success: status.is_some_and(|s| s.success()), code: status.and_then(|s| s.code()), stdout, stderr }
}

/// Both sides of one migration, finished.
pub struct Run {
    pub source: Finished,
    pub dest: Finished,
    pub report: Option<RunReport>,
}

impl Run {
    /// Both finished sides, with the report their JSON lines make (None
    /// when either is missing or not a report: `assert_verified` fails).
    pub fn of(source: Finished, dest: Finished) -> Run {
        let report = match (source.json_line(), dest.json_line()) {
            (Some(s), Some(d)) => match (serde_json::from_str(s), serde_json::from_str(d)) {
                (Ok(s), Ok(d)) => Some(RunReport::new(s, d)),
                _ => None,
            },
            _ => None,
        };
        Run { source, dest, report }
    }

    pub fn source_report(&self) -> SourceReport {
        serde_json::from_str(self.source.json_line().expect("source JSON")).expect("source report")
    }

    pub fn dest_report(&self) -> DestinationReport {
        serde_json::from_str(self.dest.json_line().expect("destination JSON")).expect("destination report")
    }

    /// Prints both sides' messages (shown when a test fails).
    pub fn dump(&self) {
        eprintln!("--- source stderr ---\n{}\n--- destination stderr ---\n{}", self.source.stderr, self.dest.stderr);
        if let Some(r) = &self.report {
            eprintln!("{}", r.table());
        }
    }

    /// Asserts the migration completed and both integrity checks passed.
    pub fn assert_verified(&self) {
        let r = self.report.as_ref().unwrap_or_else(|| {
            self.dump();
            panic!("no reports")
        });
        if !(self.source.success && self.dest.success && r.integrity_ok) {
            self.dump();
        }
        assert!(self.source.success, "source exit {:?}", self.source.code);
        assert!(self.dest.success, "destination exit {:?}", self.dest.code);
        assert!(r.source.ok && r.destination.ok);
        assert_eq!(r.source.digest, r.destination.digest, "page digests: sent vs installed");
        assert_eq!(r.source.digest.missing_pages, 0);
        if let Some(p) = &r.destination.pattern {
            assert!(p.ok(), "guest pattern: {p:?}");
            assert!(p.pages_checked > 0);
        }
        assert!(r.integrity_ok);
        eprintln!("{}", r.table());
    }
}

/// Runs a destination and a source (through `relay` when given) to the end.
pub fn migrate(
    dir: &Path,
    source_args: &[&str],
    dest_args: &[&str],
    env: &[(&str, &str)],
    relay: Option<&Relay>,
) -> Run {
    let dest = start_dest(dir, dest_args, env);
    let target = relay.map_or(dest.addr, |r| {
        r.set_target(dest.addr);
        r.addr
    });
    let source = start_source(target, source_args);
    let source = collect(source, Duration::from_secs(180));
    let dest = collect(dest.child, Duration::from_secs(60));
    Run::of(source, dest)
}

/// A relay between source and destination. It reads each connection's
/// preamble, may hold the main channel back (`main_delay`) so that the other
/// channels arrive first, and cuts every connection once the main channel
/// (preamble code 0) has carried `cut_after` bytes, or (`start_at_ready_to_run`)
/// instead of passing on the destination's `ReadyToRun`; later connections
/// pass untouched.
pub struct Relay {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    pub cut_done: Arc<AtomicBool>,
    /// Channel codes in the order their connections reached the destination.
    pub order: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    /// Close the listener once the cut is done.
    refuse_after_cut: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(cut_after: u64) -> Relay {
        Self::start_with(cut_after, Duration::ZERO)
    }

    /// Cuts every connection when the destination says `ReadyToRun` (which
    /// never reaches the source): the source has sent the whole device
    /// state, the destination has loaded it, and `StartGuest` never leaves.
    pub fn start_at_ready_to_run() -> Relay {
        Self::start_inner(u64::MAX, Duration::ZERO, true, None)
    }

    /// As [`Relay::start_at_ready_to_run`], and the relay stops listening
    /// at the cut: every later connection to it is refused.
    pub fn start_at_ready_to_run_then_refuse() -> Relay {
        let relay = Self::start_at_ready_to_run();
        relay.refuse_after_cut.store(true, Ordering::SeqCst);
        relay
    }

    pub fn start_with(cut_after: u64, main_delay: Duration) -> Relay {
        Self::start_inner(cut_after, main_delay, false, None)
    }

    /// Never cuts; the main channel carries at most `bytes_per_s` (a slow
    /// link: a migration stays in postcopy long enough to act on it).
    pub fn start_throttled(bytes_per_s: u64) -> Relay {
        Self::start_inner(u64::MAX, Duration::ZERO, false, Some(bytes_per_s))
    }

    fn start_inner(cut_after: u64, main_delay: Duration, cut_at_ready: bool, main_rate: Option<u64>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listen");
        let addr = listener.local_addr().expect("relay addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let cut_done = Arc::new(AtomicBool::new(false));
        let order = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let main_bytes = Arc::new(AtomicU64::new(0));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let refuse_after_cut = Arc::new(AtomicBool::new(false));
        let (t, c, s, o, r) = (target.clone(), cut_done.clone(), stop.clone(), order.clone(), refuse_after_cut.clone());
        std::thread::spawn(move || {
            // Dropping the listener when this loop ends makes connects fail
            // with "connection refused".
            let refusing = || r.load(Ordering::SeqCst) && c.load(Ordering::SeqCst);
            while !s.load(Ordering::SeqCst) && !refusing() {
                let (mut client, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let Some(to) = *t.lock().unwrap() else { continue };
                let (c, mb, lv, o) = (c.clone(), main_bytes.clone(), live.clone(), o.clone());
                std::thread::spawn(move || {
                    let _ = client.set_nonblocking(false);
                    let mut preamble = [0u8; 8];
                    if client.read_exact(&mut preamble).is_err() {
                        return;
                    }
                    let channel = preamble[4];
                    if channel == 0 && !main_delay.is_zero() {
                        std::thread::sleep(main_delay);
                    }
                    let Ok(mut server) = TcpStream::connect(to) else { return };
                    if server.write_all(&preamble).is_err() {
                        return;
                    }
                    o.lock().unwrap().push(channel);
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let cut_now = !c.load(Ordering::SeqCst);
                    if cut_now {
                        let mut l = lv.lock().unwrap();
                        l.push(client.try_clone().unwrap());
                        l.push(server.try_clone().unwrap());
                    }
                    let (cl, sv) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    if cut_at_ready && cut_now && channel == Channel::Return.code() {
                        let (c, lv) = (c.clone(), lv.clone());
                        std::thread::spawn(move || {
                            pump_until_frame(server, client, FrameKind::ReadyToRun);
                            cut_all(&c, &lv);
                        });
                    } else {
                        std::thread::spawn(move || pump(server, client, |_| false));
                    }
                    // Source -> destination, counting the main channel's bytes.
                    pump(cl, sv, move |n| {
                        if let (0, Some(rate)) = (channel, main_rate) {
                            std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
                        }
                        if !cut_now || channel != 0 || c.load(Ordering::SeqCst) {
                            return false;
                        }
                        if mb.fetch_add(n, Ordering::SeqCst) + n >= cut_after {
                            cut_all(&c, &lv);
                            return true;
                        }
                        false
                    });
                });
            }
        });
        Relay { addr, target, cut_done, order, stop, refuse_after_cut }
    }

    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = Some(to);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`; `on_bytes(n)` returns true to stop.
fn pump(mut from: TcpStream, mut to: TcpStream, mut on_bytes: impl FnMut(u64) -> bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() || on_bytes(n as u64) {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Marks the cut done and shuts down every connection the relay holds.
fn cut_all(cut_done: &AtomicBool, live: &Mutex<Vec<TcpStream>>) {
    cut_done.store(true, Ordering::SeqCst);
    for s in live.lock().unwrap().drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Passes whole frames from `from` to `to` (decoded and re-encoded with the
/// core's codec) until a frame of type `kind` arrives, which is not passed
/// on; then returns.
fn pump_until_frame(mut from: TcpStream, mut to: TcpStream, kind: FrameKind) {
    let mut decoder = wire::Decoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(bytes::Bytes::copy_from_slice(&buf[..n]));
        let mut out = Vec::new();
        while let Ok(Some(frame)) = decoder.next_frame() {
            if frame.kind() == kind {
                let _ = to.write_all(&out);
                return;
            }
            wire::encode(&frame, &mut out);
        }
        if to.write_all(&out).is_err() {
            return;
        }
    }
}

/// Runs a process to the end (helper for the bad-input tests).
pub fn run_to_end(mut cmd: Command, timeout: Duration) -> Finished {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    collect(child, timeout)
}

pub fn output_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The frame of a fresh hello for migration `session` (a 16 MiB guest of
/// 4 KiB pages in pure postcopy), as a source or a stranger sends it first.
pub fn fresh_hello_frame(session: u64) -> Vec<u8> {
    let mut v = Vec::new();
    wire::encode(
        &Frame::Hello(Hello {
            resume: false,
            urgent_channel: false,
            session,
            epoch: 0,
            page_size: 4096,
            mode: WireMode::Postcopy,
            precopy_rounds: 0,
            blocks: vec![RamBlock { name: "ram-below-4g".into(), page_count: 4096, page_size: 4096 }],
            machine: bytes::Bytes::new(),
            push_streams: 1,
        }),
        &mut v,
    );
    v
}
