//! Secure channels end to end: real `postcopy dest` and `postcopy source`
//! processes over mutual TLS.
//!
//! - Each refusal (expired, not yet valid, wrong CA, wrong name, an
//!   identity not in the allowlist, a wrong migration secret) is a clear
//!   error on both sides; the guest keeps running on the source and the
//!   destination keeps waiting.
//! - Strangers (plain TCP garbage, a valid preamble alone, a TLS client of
//!   another CA, a TLS client with the source's certificate but another
//!   migration's id, an allowed TLS client of another identity, a silent
//!   peer) keep connecting through precopy, the switchover and postcopy of
//!   a real migration: it completes, verified, with no recovery.
//! - A real lost connection in postcopy is recovered over TLS.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use postcopy_core::wire;
use postcopy_core::Channel;
use postcopy_kvm::driver::report::RunReport;
use postcopy_secure::creds::Lifetime;
use postcopy_secure::{Allowlist, CertificateAuthority, ClientSide, Credentials, Identity};
use time::{Duration as TimeDuration, OffsetDateTime};

const SOURCE: &str = "src.test";
const DESTINATION: &str = "dst.test";
/// Another host the destination accepts, but not this migration's source.
const OTHER: &str = "other.test";

fn valid() -> Lifetime {
    Lifetime::days_from_now(1)
}

fn expired() -> Lifetime {
    let now = OffsetDateTime::now_utc();
    Lifetime { not_before: now - TimeDuration::days(30), not_after: now - TimeDuration::days(1) }
}

fn not_yet_valid() -> Lifetime {
    let now = OffsetDateTime::now_utc();
    Lifetime { not_before: now + TimeDuration::days(1), not_after: now + TimeDuration::days(30) }
}

/// A CA, and directories of credentials as `postcopy certs` writes them.
struct Pki {
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    root: PathBuf,
}

impl Pki {
    fn new(root: &Path) -> Pki {
        Pki {
            ca: CertificateAuthority::new("test CA", valid()).expect("CA"),
            other_ca: CertificateAuthority::new("another CA", valid()).expect("CA"),
            root: root.to_path_buf(),
        }
    }

    /// A directory `tag` holding our CA and `name`'s certificate signed by
    /// `signer` (our CA unless `other_ca`), valid for `lifetime`.
    fn dir(&self, tag: &str, name: &str, lifetime: Lifetime, other_ca: bool) -> PathBuf {
        let dir = self.root.join(tag);
        std::fs::create_dir_all(&dir).expect("creds dir");
        std::fs::write(dir.join("ca.pem"), self.ca.cert_pem()).expect("ca.pem");
        let signer = if other_ca { &self.other_ca } else { &self.ca };
        let host = signer.issue(&[Identity::Dns(name.into())], lifetime).expect("issue");
        std::fs::write(dir.join(format!("{name}.pem")), &host.cert_pem).expect("cert");
        std::fs::write(dir.join(format!("{name}-key.pem")), &host.key_pem).expect("key");
        dir
    }

    /// In-process client credentials (for strangers) for `name`.
    fn client(&self, name: &str, other_ca: bool) -> ClientSide {
        let signer = if other_ca { &self.other_ca } else { &self.ca };
        let host = signer.issue(&[Identity::Dns(name.into())], valid()).expect("issue");
        let creds = Credentials::from_pem(&host.cert_pem, &host.key_pem, &self.ca.cert_pem()).expect("creds");
        ClientSide::new(&creds, Allowlist::parse([DESTINATION]).expect("allowlist")).expect("client side")
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn dest_args(dir: &Path, authz: &[&str]) -> Vec<String> {
    let mut v = vec!["--tls-creds".to_string(), path(dir), "--tls-authz".into()];
    v.extend(authz.iter().map(|s| s.to_string()));
    v
}

fn source_args(dir: &Path, hostname: &str) -> Vec<String> {
    vec!["--tls-creds".into(), path(dir), "--tls-hostname".into(), hostname.into()]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A source whose credentials the destination (or it the destination's)
/// refuses: the source fails at once with `source_says`, its guest running
/// on; the destination logs `dest_says` and keeps waiting.
fn refused(dir: &Path, source_dir: &Path, hostname: &str, dest_dir: &Path, source_says: &str, dest_says: &str) {
    let dest = start_dest(dir, &strs(&dest_args(dest_dir, &[SOURCE])), &[]);
    let mut args = source_args(source_dir, hostname);
    args.extend(["--mem", "16M", "--vcpus", "1"].map(String::from));
    let source = collect(start_source(dest.addr, &strs(&args)), Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(200));
    let mut child = dest.child;
    let still_waiting = matches!(child.try_wait(), Ok(None));
    let dest = collect(child, Duration::from_millis(100));
    eprintln!("--- source ---\n{}\n--- destination ---\n{}", source.stderr, dest.stderr);
    assert!(still_waiting, "the destination keeps waiting for its source after a refusal");
    assert_eq!(source.code, Some(1), "the source fails");
    let json: serde_json::Value = serde_json::from_str(source.json_line().expect("source report")).expect("JSON");
    assert_eq!(json["guest_on"], "source");
    assert_eq!(json["stop_ns"], 0, "the source never stopped its guest");
    assert!(json["progress_after_failure_pages_per_s"].as_f64().unwrap_or(0.0) > 0.0, "the guest runs on: {json}");
    let error = json["error"].as_str().unwrap_or_default();
    assert!(error.contains(source_says), "the source's error {error:?} says {source_says:?}");
    assert!(source.stderr.contains(source_says), "and its stderr");
    assert!(
        dest.stderr.lines().any(|l| l.contains("refused a stranger") && l.contains(dest_says)),
        "the destination logs {dest_says:?}: {}",
        dest.stderr
    );
}

/// One side's credentials in a refusal case (see [`Pki::dir`]).
struct Side {
    name: &'static str,
    lifetime: Lifetime,
    other_ca: bool,
}

/// `name`'s certificate, valid, signed by our CA.
fn side(name: &'static str) -> Side {
    Side { name, lifetime: valid(), other_ca: false }
}

/// Test `test`: credentials made as `src` and `dst` say, the source
/// dialling `hostname`, and the migration [`refused`] with these words.
fn refusal_case(test: &str, src: Side, dst: Side, hostname: &str, source_says: &str, dest_says: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    let _one = serial();
    let dir = temp_dir(test);
    let pki = Pki::new(&dir);
    let src = pki.dir("src", src.name, src.lifetime, src.other_ca);
    let dst = pki.dir("dst", dst.name, dst.lifetime, dst.other_ca);
    refused(&dir, &src, hostname, &dst, source_says, dest_says);
}

#[test]
fn an_expired_source_certificate_is_refused_on_both_sides() {
    refusal_case(
        "an_expired_source_certificate_is_refused_on_both_sides",
        Side { lifetime: expired(), ..side(SOURCE) },
        side(DESTINATION),
        DESTINATION,
        "the peer refused our certificate: it has expired",
        "the peer's certificate has expired",
    );
}

#[test]
fn a_not_yet_valid_destination_certificate_is_refused_on_both_sides() {
    refusal_case(
        "a_not_yet_valid_destination_certificate_is_refused_on_both_sides",
        side(SOURCE),
        Side { lifetime: not_yet_valid(), ..side(DESTINATION) },
        DESTINATION,
        "the peer's certificate is not valid yet",
        "the peer refused our certificate: it is not valid yet",
    );
}

#[test]
fn a_certificate_of_another_ca_is_refused_on_both_sides() {
    refusal_case(
        "a_certificate_of_another_ca_is_refused_on_both_sides",
        Side { other_ca: true, ..side(SOURCE) },
        side(DESTINATION),
        DESTINATION,
        "the peer does not trust our CA",
        "the peer's certificate is not signed by our CA",
    );
}

#[test]
fn a_destination_of_another_name_is_refused_on_both_sides() {
    refusal_case(
        "a_destination_of_another_name_is_refused_on_both_sides",
        side(SOURCE),
        side(DESTINATION),
        "elsewhere.test",
        "the peer's certificate is not valid for the name we dialled",
        "the peer refused our certificate's name",
    );
}

#[test]
fn an_identity_not_in_the_allowlist_is_refused_on_both_sides() {
    refusal_case(
        "an_identity_not_in_the_allowlist_is_refused_on_both_sides",
        side("intruder.test"),
        side(DESTINATION),
        DESTINATION,
        "the peer's allowlist does not include our identity",
        "are not in our allowlist",
    );
}

/// With `--migration-secret`, a source holding another secret is refused
/// (the destination keeps waiting), then the one with the secret migrates.
#[test]
fn a_migration_secret_is_proved_on_every_connection() {
    if !kvm_or_skip("a_migration_secret_is_proved_on_every_connection") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("tls_secret");
    let pki = Pki::new(&dir);
    let src = pki.dir("src", SOURCE, valid(), false);
    let dst = pki.dir("dst", DESTINATION, valid(), false);
    let (secret, wrong) = (dir.join("secret"), dir.join("wrong"));
    std::fs::write(&secret, "s".repeat(40)).expect("secret");
    std::fs::write(&wrong, "w".repeat(40)).expect("secret");
    let mut dargs = dest_args(&dst, &[SOURCE]);
    dargs.extend(["--migration-secret".into(), path(&secret)]);
    let dest = start_dest(&dir, &strs(&dargs), &[]);
    let source_with = |file: &Path| {
        let mut args = source_args(&src, DESTINATION);
        args.extend(["--migration-secret".into(), path(file), "--mem".into(), "32M".into()]);
        collect(start_source(dest.addr, &strs(&args)), Duration::from_secs(120))
    };
    let refused = source_with(&wrong);
    eprintln!("--- refused source ---\n{}", refused.stderr);
    assert_eq!(refused.code, Some(1));
    let json: serde_json::Value = serde_json::from_str(refused.json_line().expect("report")).expect("JSON");
    assert_eq!(json["guest_on"], "source");
    assert!(json["error"].as_str().unwrap_or_default().contains("migration-secret proof"), "{json}");
    let source = source_with(&secret);
    let dest = collect(dest.child, Duration::from_secs(60));
    let report = RunReport::new(
        serde_json::from_str(source.json_line().expect("source JSON")).expect("source report"),
        serde_json::from_str(dest.json_line().expect("destination JSON")).expect("destination report"),
    );
    let run = Run { source, dest, report: Some(report) };
    run.assert_verified();
    let notices = run.dest_report().notices;
    assert!(
        notices.iter().any(|n| n.contains("refused a stranger") && n.contains("its migration-secret proof")),
        "{notices:?}"
    );
}

/// A process whose stderr is read as it comes (to wait for a line).
struct Watched {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Watched {
    fn new(mut child: Child) -> Watched {
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Watched { child, stderr, reader }
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.stderr.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    fn finish(self, timeout: Duration) -> Finished {
        let mut out = collect(self.child, timeout);
        let _ = self.reader.join();
        out.stderr = self.stderr.lock().unwrap().clone();
        out
    }
}

/// When each stranger connection was in flight (monotonic ns), by kind.
#[derive(Default)]
struct Visits(Mutex<Vec<(&'static str, u64, u64)>>);

impl Visits {
    fn during(&self, from: u64, to: u64) -> Vec<&'static str> {
        let mut kinds: Vec<_> =
            self.0.lock().unwrap().iter().filter(|(_, a, b)| *a < to && *b > from).map(|(k, _, _)| *k).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}

/// Reads until the destination closes `s` (or `limit` passes).
fn until_closed(mut s: TcpStream, limit: Duration) {
    let _ = s.set_read_timeout(Some(limit));
    let mut buf = [0u8; 256];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    let _ = s.shutdown(Shutdown::Both);
}

fn fresh_hello(session: u64) -> Vec<u8> {
    let mut v = Vec::new();
    wire::encode_preamble(&mut v, Channel::Main);
    v.extend(fresh_hello_frame(session));
    v
}

/// One stranger's visit of kind `kind` to `addr`.
fn visit(kind: &'static str, addr: SocketAddr, pki_clients: &StrangerClients) {
    let Ok(s) = TcpStream::connect(addr) else { return };
    let linger = Duration::from_secs(5);
    match kind {
        "garbage" => {
            let _ = (&s).write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            until_closed(s, linger);
        }
        "preamble" => {
            let mut v = Vec::new();
            wire::encode_preamble(&mut v, Channel::Main);
            let _ = (&s).write_all(&v);
            until_closed(s, linger);
        }
        "silent" => until_closed(s, linger),
        "other-ca" => {
            let _ = postcopy_secure::connect(s, &pki_clients.other_ca, DESTINATION, linger);
        }
        "other-migration" | "other-identity" => {
            let side = if kind == "other-migration" { &pki_clients.source } else { &pki_clients.other };
            if let Ok(channel) = postcopy_secure::connect(s, side, DESTINATION, linger) {
                let _ = channel.write_all(&fresh_hello(7));
                let _ = channel.socket().set_read_timeout(Some(linger));
                let mut buf = [0u8; 256];
                while matches!(channel.recv(&mut buf, postcopy_secure::Wait::Block), Ok(n) if n > 0) {}
                channel.shutdown();
            }
        }
        other => panic!("unknown stranger {other}"),
    }
}

struct StrangerClients {
    other_ca: ClientSide,
    source: ClientSide,
    other: ClientSide,
}

#[test]
fn strangers_through_precopy_switchover_and_postcopy_change_nothing() {
    if !kvm_or_skip("strangers_through_precopy_switchover_and_postcopy_change_nothing") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("tls_strangers");
    let pki = Pki::new(&dir);
    let src = pki.dir("src", SOURCE, valid(), false);
    let dst = pki.dir("dst", DESTINATION, valid(), false);
    let clients = Arc::new(StrangerClients {
        other_ca: pki.client(SOURCE, true),
        source: pki.client(SOURCE, false),
        other: pki.client(OTHER, false),
    });
    // The destination also accepts OTHER's identity (a second host), but
    // the migration is bound to the source's.
    let env = [("POSTCOPY_LOG", "warn,postcopy_kvm::driver::security=info")];
    // A handshake bound of 1 s (the source's hello comes within ms).
    let mut dargs = dest_args(&dst, &[SOURCE, OTHER]);
    dargs.extend(["--handshake-timeout-ms".into(), "1000".into()]);
    let dest = start_dest(&dir, &strs(&dargs), &env);
    let addr = dest.addr;
    let dest = Watched::new(dest.child);
    let stop = Arc::new(AtomicBool::new(false));
    let bound = Arc::new(AtomicBool::new(false));
    let visits = Arc::new(Visits::default());
    let mut threads = Vec::new();
    for kind in ["garbage", "preamble", "silent", "other-ca", "other-migration", "other-identity"] {
        let (stop, bound, visits, clients) = (stop.clone(), bound.clone(), visits.clone(), clients.clone());
        // A hello of another migration sent before the real one would bind
        // the destination to it (the first hello binds): those strangers
        // come once the real source's hello is in.
        let after_binding = kind.starts_with("other-m") || kind.starts_with("other-i");
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if after_binding && !bound.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let t0 = postcopy_kvm::monotonic_ns();
                visit(kind, addr, &clients);
                visits.0.lock().unwrap().push((kind, t0, postcopy_kvm::monotonic_ns()));
                std::thread::sleep(Duration::from_millis(15));
            }
        }));
    }
    let mut args = source_args(&src, DESTINATION);
    args.extend(["--mem", "256M", "--vcpus", "1", "--mode", "hybrid", "--precopy-rounds", "1"].map(String::from));
    // A silent peer was dropped at the handshake bound before the source
    // comes (its later ones overlap the migration).
    assert!(dest.wait_for("no handshake within", Duration::from_secs(30)), "a silent peer is dropped");
    let source = start_source(addr, &strs(&args));
    let saw_binding = dest.wait_for("bound to its source's identity", Duration::from_secs(60));
    bound.store(true, Ordering::SeqCst);
    let source = collect(source, Duration::from_secs(180));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("stranger thread");
    }
    let dest = dest.finish(Duration::from_secs(60));
    if !saw_binding {
        eprintln!("--- source ---\n{}\n{}", source.stderr, source.stdout);
    }
    assert!(saw_binding, "the destination bound the migration");
    let run = Run::of(source, dest);
    run.assert_verified();
    let r = run.report.as_ref().expect("report");
    assert_eq!(r.source.stats.recoveries, 0, "no recovery: {:?}", r.source.notices);
    assert_eq!(r.destination.stats.recoveries, 0, "no recovery: {:?}", r.destination.notices);
    assert!(!r.source.notices.iter().any(|n| n.starts_with("paused")), "{:?}", r.source.notices);
    // Strangers were there in each phase.
    let (stop_ns, resume_ns, end_ns) = (r.source.stop_ns, r.destination.resume_ns, r.destination.end_ns);
    let precopy = visits.during(r.source.start_ns, stop_ns);
    let switchover = visits.during(stop_ns, resume_ns);
    let postcopy = visits.during(resume_ns, end_ns);
    eprintln!("strangers in precopy {precopy:?}, in the switchover {switchover:?}, in postcopy {postcopy:?}");
    assert!(precopy.len() >= 4, "strangers during precopy: {precopy:?}");
    assert!(!switchover.is_empty(), "a stranger during the switchover");
    assert!(!postcopy.is_empty(), "strangers during postcopy: {postcopy:?}");
    // Each kind was refused, for its own reason.
    let notices = &r.destination.notices;
    for needle in [
        "did not speak TLS",
        "not signed by our CA",
        "session mismatch",
        "not this migration's source",
        "no handshake within",
    ] {
        assert!(
            notices.iter().any(|n| n.contains("refused a stranger") && n.contains(needle)),
            "a refusal for {needle:?} in {notices:?}"
        );
    }
}

/// A relay that passes bytes untouched (TLS or not) and cuts every live
/// connection once one has carried `cut_after` bytes towards the
/// destination; later connections pass untouched.
struct CuttingRelay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl CuttingRelay {
    fn start(target: SocketAddr, cut_after: u64) -> CuttingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listen");
        let addr = listener.local_addr().expect("relay addr");
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let c = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(target) else { continue };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let first_round = !c.load(Ordering::SeqCst);
                if first_round {
                    let mut l = live.lock().unwrap();
                    l.push(client.try_clone().expect("clone"));
                    l.push(server.try_clone().expect("clone"));
                }
                let (up_from, up_to) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                std::thread::spawn(move || copy(server, client, |_| false));
                let (c, live) = (c.clone(), live.clone());
                std::thread::spawn(move || {
                    let mut carried = 0u64;
                    copy(up_from, up_to, |n| {
                        carried += n;
                        if first_round && carried >= cut_after && !c.swap(true, Ordering::SeqCst) {
                            for s in live.lock().unwrap().drain(..) {
                                let _ = s.shutdown(Shutdown::Both);
                            }
                            return true;
                        }
                        false
                    })
                });
            }
        });
        CuttingRelay { addr, cut }
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream, mut stop_after: impl FnMut(u64) -> bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() || stop_after(n as u64) {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[test]
fn a_lost_connection_in_postcopy_is_recovered_over_tls() {
    if !kvm_or_skip("a_lost_connection_in_postcopy_is_recovered_over_tls") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("tls_recovery");
    let pki = Pki::new(&dir);
    let src = pki.dir("src", SOURCE, valid(), false);
    let dst = pki.dir("dst", DESTINATION, valid(), false);
    let mut dargs = dest_args(&dst, &[SOURCE]);
    dargs.extend(["--prealloc".into(), "128M".into()]);
    let dest = start_dest(&dir, &strs(&dargs), &[]);
    // 128 MiB of pages; every connection is cut once the main one carried
    // 24 MiB: well after the switchover, before the end.
    let relay = CuttingRelay::start(dest.addr, 24 << 20);
    let mut args = source_args(&src, DESTINATION);
    args.extend(["--mem", "128M", "--vcpus", "2"].map(String::from));
    let source = collect(start_source(relay.addr, &strs(&args)), Duration::from_secs(180));
    let dest = collect(dest.child, Duration::from_secs(60));
    let run = Run::of(source, dest);
    run.assert_verified();
    assert!(relay.cut.load(Ordering::SeqCst), "the relay never cut");
    let r = run.report.expect("report");
    assert!(r.source.stats.recoveries >= 1, "{:?}", r.source.notices);
    assert!(r.destination.stats.recoveries >= 1);
    assert!(r.source.notices.iter().any(|n| n.starts_with("paused")), "{:?}", r.source.notices);
    assert!(
        !r.destination.notices.iter().any(|n| n.contains("refused a stranger")),
        "the reconnections were the source's: {:?}",
        r.destination.notices
    );
}

/// A `postcopy run` process and a QMP client on it.
struct RunProcess {
    child: Child,
    stderr: PathBuf,
    qmp: postcopy_qmp::QmpClient,
}

impl RunProcess {
    fn start(dir: &Path, name: &str, args: &[&str]) -> RunProcess {
        let socket = dir.join(format!("{name}.sock"));
        let stderr = dir.join(format!("{name}.err"));
        let child = std::process::Command::new(binary())
            .arg("run")
            .arg("--qmp")
            .arg(&socket)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start postcopy run");
        let t0 = Instant::now();
        let qmp = loop {
            if let Ok(client) = postcopy_qmp::QmpClient::connect_negotiated(&socket) {
                break client;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{name}: no QMP socket");
            std::thread::sleep(Duration::from_millis(20));
        };
        RunProcess { child, stderr, qmp }
    }

    fn execute(&mut self, command: postcopy_qmp::Command) -> serde_json::Value {
        let name = command.name();
        match self.qmp.execute(&command) {
            Ok(v) => v,
            Err(e) => panic!("{name}: {e}\n{}", std::fs::read_to_string(&self.stderr).unwrap_or_default()),
        }
    }

    fn wait_ended(&mut self) -> postcopy_qmp::MigrationStatus {
        let t0 = Instant::now();
        loop {
            let status = self.qmp.query_migrate().expect("query-migrate").status;
            if let Some(status) = status.filter(|s| !s.is_running()) {
                return status;
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "the migration did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn quit(mut self) -> String {
        let _ = self.qmp.execute(&postcopy_qmp::Command::Quit);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// A directory in QEMU's layout (`ca-cert.pem`, `<end>-cert.pem`,
/// `<end>-key.pem`) for `name`.
fn qemu_dir(pki: &Pki, tag: &str, end: &str, name: &str) -> PathBuf {
    let dir = pki.root.join(tag);
    std::fs::create_dir_all(&dir).expect("creds dir");
    std::fs::write(dir.join("ca-cert.pem"), pki.ca.cert_pem()).expect("ca");
    let host = pki.ca.issue(&[Identity::Dns(name.into())], valid()).expect("issue");
    std::fs::write(dir.join(format!("{end}-cert.pem")), &host.cert_pem).expect("cert");
    std::fs::write(dir.join(format!("{end}-key.pem")), &host.key_pem).expect("key");
    dir
}

/// QEMU's way, over QMP: `object-add` of `tls-creds-x509` (QEMU's
/// directory layout) and `authz-list`, `migrate-set-parameters` with
/// `tls-creds`, `tls-authz` and `tls-hostname`: the migration runs over
/// TLS and completes.
#[test]
fn tls_set_up_over_qmp_as_qemu_does() {
    use postcopy_qmp::{
        Command as Qmp, Endpoint, MigrateArgs, MigrateIncomingArgs, MigrationParameters, ObjectAddArgs,
    };
    if !kvm_or_skip("tls_set_up_over_qmp_as_qemu_does") {
        return;
    }
    let _one = serial();
    let dir = temp_dir("tls_qmp");
    let pki = Pki::new(&dir);
    let src = qemu_dir(&pki, "src", "client", SOURCE);
    let dst = qemu_dir(&pki, "dst", "server", DESTINATION);
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let uri = format!("tcp:127.0.0.1:{port}");

    let mut dest = RunProcess::start(&dir, "dest", &["--incoming", "defer", "--insecure"]);
    dest.execute(Qmp::ObjectAdd(ObjectAddArgs::TlsCredsX509 {
        id: "tls0".into(),
        dir: path(&dst),
        endpoint: Endpoint::Server,
    }));
    dest.execute(Qmp::ObjectAdd(ObjectAddArgs::AuthzList { id: "auth0".into(), allow: vec![SOURCE.into()] }));
    dest.execute(Qmp::MigrateSetParameters(MigrationParameters {
        tls_creds: Some("tls0".into()),
        tls_authz: Some("auth0".into()),
        ..Default::default()
    }));
    dest.execute(Qmp::MigrateIncoming(MigrateIncomingArgs { uri: uri.clone(), exit_on_error: Some(false) }));

    let mut source = RunProcess::start(&dir, "source", &["--mem", "32M", "--vcpus", "1", "--insecure"]);
    source.execute(Qmp::ObjectAdd(ObjectAddArgs::TlsCredsX509 {
        id: "tls0".into(),
        dir: path(&src),
        endpoint: Endpoint::Client,
    }));
    source.execute(Qmp::MigrateSetParameters(MigrationParameters {
        tls_creds: Some("tls0".into()),
        tls_hostname: Some(DESTINATION.into()),
        ..Default::default()
    }));
    std::thread::sleep(Duration::from_millis(200));
    source.execute(Qmp::Migrate(MigrateArgs { uri, resume: false }));
    let source_status = source.wait_ended();
    let dest_status = dest.wait_ended();
    let verify = dest.execute(Qmp::XPostcopyVerify);
    let (source_err, dest_err) = (source.quit(), dest.quit());
    eprintln!("--- source ---\n{source_err}\n--- destination ---\n{dest_err}\n{verify}");
    assert_eq!(source_status, postcopy_qmp::MigrationStatus::Completed);
    assert_eq!(dest_status, postcopy_qmp::MigrationStatus::Completed);
    assert_eq!(verify["last-incoming"]["ok"], true, "{verify}");
    assert!(dest_err.contains("(mutual TLS 1.3)"), "the destination listened with TLS: {dest_err}");
}
