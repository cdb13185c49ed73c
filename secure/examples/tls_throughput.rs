//! Loopback costs of the secure channel against plain TCP: bulk throughput
//! (1 GiB in 1 MiB writes), a fault-like round trip (a 32-byte request
//! answered by a 4 KiB page; p50/p99) and the handshake time. Each number
//! is the best of `--repeat` runs (default 3): the machine may be shared.
//!
//! ```text
//! cargo run --release -p postcopy-secure --example tls_throughput
//! cargo run --release -p postcopy-secure --features compare-ring --example tls_throughput   # also ring
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use postcopy_secure::creds::Lifetime;
use postcopy_secure::{
    accept, connect, Allowlist, CertificateAuthority, ClientSide, Credentials, Identity, SecureChannel, ServerSide,
    Wait,
};
use rustls::crypto::CryptoProvider;

const TOTAL_BYTES: usize = 1 << 30;
const WRITE_BYTES: usize = 1 << 20;
const READ_BYTES: usize = 256 << 10;
const REQUEST_BYTES: usize = 32;
const PAGE_BYTES: usize = 4096;
const ROUND_TRIPS: usize = 20_000;
const HANDSHAKES: usize = 200;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Either end of a connection, plain or secure.
trait Endpoint: Send + Sync {
    fn send(&self, bytes: &[u8]);
    /// Receives into `buf`; 0 at the end.
    fn recv(&self, buf: &mut [u8]) -> usize;
}

impl Endpoint for TcpStream {
    fn send(&self, bytes: &[u8]) {
        let mut s = self;
        s.write_all(bytes).expect("plain send");
    }
    fn recv(&self, buf: &mut [u8]) -> usize {
        let mut s = self;
        s.read(buf).expect("plain receive")
    }
}

impl Endpoint for SecureChannel {
    fn send(&self, bytes: &[u8]) {
        self.write_all(bytes).expect("TLS send");
    }
    fn recv(&self, buf: &mut [u8]) -> usize {
        SecureChannel::recv(self, buf, Wait::Block).expect("TLS receive")
    }
}

fn recv_exact(end: &dyn Endpoint, buf: &mut [u8]) {
    let mut got = 0;
    while got < buf.len() {
        let n = end.recv(&mut buf[got..]);
        assert!(n > 0, "closed early");
        got += n;
    }
}

/// How the two ends talk.
#[derive(Clone)]
enum Mode {
    Plain,
    Tls { name: &'static str, server: ServerSide, client: ClientSide },
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Self::Plain => "plaintext",
            Self::Tls { name, .. } => name,
        }
    }

    /// A connected (server end, client end) pair.
    fn pair(&self) -> (Box<dyn Endpoint>, Box<dyn Endpoint>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let _ = server.set_nodelay(true);
        let _ = client.set_nodelay(true);
        match self {
            Self::Plain => (Box::new(server), Box::new(client)),
            Self::Tls { server: s, client: c, .. } => {
                let s = s.clone();
                let t = thread::spawn(move || accept(server, &s, TIMEOUT).expect("TLS accept"));
                let c = connect(client, c, "dst.test", TIMEOUT).expect("TLS connect");
                (Box::new(t.join().expect("server thread")), Box::new(c))
            }
        }
    }
}

/// This process's CPU time (user + system) in seconds, from /proc (10 ms
/// resolution): unlike wall time, it hardly depends on other load.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the
    // 12th, stime the 13th, in clock ticks (100 per second on Linux).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// (wall seconds, CPU seconds of both ends) to move `TOTAL_BYTES` from the
/// client end to the server end.
fn bulk_seconds(mode: &Mode) -> (f64, f64) {
    let (server, client) = mode.pair();
    let server: Arc<dyn Endpoint> = Arc::from(server);
    let receiver = {
        let server = server.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; READ_BYTES];
            let mut got = 0;
            while got < TOTAL_BYTES {
                let n = server.recv(&mut buf);
                assert!(n > 0, "closed after {got} bytes");
                got += n;
            }
            server.send(&[1]);
        })
    };
    let chunk = vec![0x5Au8; WRITE_BYTES];
    let cpu_started = cpu_seconds();
    let started = Instant::now();
    for _ in 0..TOTAL_BYTES / WRITE_BYTES {
        client.send(&chunk);
    }
    let mut ack = [0u8; 1];
    recv_exact(&*client, &mut ack);
    let took = started.elapsed();
    let cpu = cpu_seconds() - cpu_started;
    receiver.join().expect("receiver");
    (took.as_secs_f64(), cpu)
}

/// A request/page round-trip histogram (nanoseconds).
fn round_trips(mode: &Mode) -> Histogram<u64> {
    let (server, client) = mode.pair();
    let responder = thread::spawn(move || {
        let mut request = [0u8; REQUEST_BYTES];
        let page = vec![0x33u8; PAGE_BYTES];
        for _ in 0..ROUND_TRIPS {
            recv_exact(&*server, &mut request);
            server.send(&page);
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram");
    let request = [7u8; REQUEST_BYTES];
    let mut page = vec![0u8; PAGE_BYTES];
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        client.send(&request);
        recv_exact(&*client, &mut page);
        let _ = hist.record(t.elapsed().as_nanos() as u64);
    }
    responder.join().expect("responder");
    hist
}

/// A handshake-time histogram (nanoseconds): TCP connect to acceptance.
fn handshakes(server: &ServerSide, client: &ClientSide) -> Histogram<u64> {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = server.clone();
    let acceptor = thread::spawn(move || {
        for _ in 0..HANDSHAKES {
            let (stream, _) = listener.accept().expect("accept");
            accept(stream, &server, TIMEOUT).expect("TLS accept");
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("histogram");
    for _ in 0..HANDSHAKES {
        let t = Instant::now();
        let stream = TcpStream::connect(addr).expect("connect");
        let channel = connect(stream, client, "dst.test", TIMEOUT).expect("TLS connect");
        let _ = hist.record(t.elapsed().as_nanos() as u64);
        drop(channel);
    }
    acceptor.join().expect("acceptor");
    hist
}

fn sides(provider: Arc<CryptoProvider>) -> (ServerSide, ClientSide) {
    let ca = CertificateAuthority::new("bench CA", Lifetime::days_from_now(1)).expect("CA");
    let creds = |name: &str| {
        let host = ca.issue(&[Identity::Dns(name.into())], Lifetime::days_from_now(1)).expect("certificate");
        Credentials::from_pem(&host.cert_pem, &host.key_pem, &ca.cert_pem()).expect("credentials")
    };
    let allow = |name: &str| Allowlist::new([Identity::Dns(name.into())]);
    (
        ServerSide::with_provider(&creds("dst.test"), allow("src.test"), provider.clone()).expect("server side"),
        ClientSide::with_provider(&creds("src.test"), allow("dst.test"), provider).expect("client side"),
    )
}

#[cfg(feature = "compare-ring")]
fn ring_provider() -> Option<Arc<CryptoProvider>> {
    use rustls::crypto::ring;
    let mut p = ring::default_provider();
    // The suites the split record layer can update keys for.
    p.cipher_suites =
        vec![ring::cipher_suite::TLS13_AES_256_GCM_SHA384, ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    Some(Arc::new(p))
}

#[cfg(not(feature = "compare-ring"))]
fn ring_provider() -> Option<Arc<CryptoProvider>> {
    None
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() {
    let repeat: usize =
        std::env::args().skip_while(|a| a != "--repeat").nth(1).map(|r| r.parse().expect("--repeat N")).unwrap_or(3);
    println!(
        "kernel TLS offload (ktls): {}",
        match postcopy_secure::ktls::kernel_tls_available() {
            Ok(true) => "available".to_string(),
            Ok(false) => "not available (no `tls` ULP in this kernel): not measured".to_string(),
            Err(e) => format!("probe failed: {e}"),
        }
    );
    let mut modes = vec![Mode::Plain];
    let mut providers = vec![("TLS aws-lc-rs", postcopy_secure::config::provider())];
    if let Some(ring) = ring_provider() {
        providers.push(("TLS ring", ring));
    }
    for (name, provider) in providers {
        let (server, client) = sides(provider);
        modes.push(Mode::Tls { name, server, client });
    }

    println!(
        "best of {repeat}; 1 GiB in 1 MiB writes; {ROUND_TRIPS} round trips of {REQUEST_BYTES} B -> {PAGE_BYTES} B"
    );
    let mut plain_s = f64::NAN;
    let mut plain_p50 = f64::NAN;
    for mode in &modes {
        let runs: Vec<(f64, f64)> = (0..repeat).map(|_| bulk_seconds(mode)).collect();
        let best_s = runs.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
        let best_cpu_s = runs.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
        let rt =
            (0..repeat).map(|_| round_trips(mode)).min_by_key(|h| h.value_at_quantile(0.5)).expect("at least one run");
        let (p50, p99) = (us(rt.value_at_quantile(0.5)), us(rt.value_at_quantile(0.99)));
        if matches!(mode, Mode::Plain) {
            plain_s = best_s;
            plain_p50 = p50;
        }
        print!(
            "{:<14} bulk {:6.3} s ({:5.2} GiB/s, {:4.2}x plaintext, CPU {:5.2} s)  round trip p50 {:6.1} us (+{:4.1}) p99 {:6.1} us",
            mode.name(),
            best_s,
            1.0 / best_s,
            best_s / plain_s,
            best_cpu_s,
            p50,
            p50 - plain_p50,
            p99,
        );
        if let Mode::Tls { server, client, .. } = mode {
            let hs = (0..repeat)
                .map(|_| handshakes(server, client))
                .min_by_key(|h| h.value_at_quantile(0.5))
                .expect("at least one run");
            print!(
                "  handshake p50 {:.2} ms p99 {:.2} ms",
                us(hs.value_at_quantile(0.5)) / 1000.0,
                us(hs.value_at_quantile(0.99)) / 1000.0
            );
        }
        println!();
    }
}
