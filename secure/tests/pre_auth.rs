//! The pre-authentication path under arbitrary input: whatever a stranger
//! sends before authenticating, `accept` gives a typed refusal promptly,
//! never a channel and never a panic.

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use postcopy_secure::creds::Lifetime;
use postcopy_secure::{accept, Allowlist, CertificateAuthority, Credentials, Identity, Refusal, ServerSide};
use proptest::prelude::*;

const TIMEOUT: Duration = Duration::from_millis(500);

fn server_side() -> &'static ServerSide {
    static SIDE: OnceLock<ServerSide> = OnceLock::new();
    SIDE.get_or_init(|| {
        let ca = CertificateAuthority::new("fuzz CA", Lifetime::days_from_now(1)).unwrap();
        let host = ca.issue(&[Identity::Dns("dst.test".into())], Lifetime::days_from_now(1)).unwrap();
        let creds = Credentials::from_pem(&host.cert_pem, &host.key_pem, &ca.cert_pem()).unwrap();
        ServerSide::new(&creds, Allowlist::parse(["src.test"]).unwrap()).unwrap()
    })
}

/// Sends `bytes` then half-closes; returns the server's refusal and time.
fn refusal_for(bytes: Vec<u8>) -> (Refusal, Duration) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let started = Instant::now();
        (accept(stream, server_side(), TIMEOUT), started.elapsed())
    });
    let mut stranger = TcpStream::connect(addr).unwrap();
    let _ = stranger.write_all(&bytes);
    let _ = stranger.shutdown(Shutdown::Write);
    let (result, took) = server.join().unwrap();
    match result {
        Ok(ch) => panic!("a stranger got a channel: {ch:?}"),
        Err(e) => (e.refusal, took),
    }
}

/// Bytes shaped like the start of TLS: a handshake record header with a
/// ClientHello type byte, then anything.
fn tls_looking() -> impl Strategy<Value = Vec<u8>> {
    (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(len, body)| {
        let mut v = vec![0x16, 0x03, 0x01];
        v.extend_from_slice(&len.to_be_bytes());
        v.push(0x01);
        v.extend_from_slice(&body);
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_refused_promptly(bytes in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2000),
        tls_looking(),
    ]) {
        let (refusal, took) = refusal_for(bytes);
        // Every refusal is one of the pre-authentication kinds: the stream
        // ended (a header promising more bytes than were sent, then the
        // half-close), was not TLS, or failed TLS. The stranger half-closed,
        // so waiting out the timeout would be a bug.
        prop_assert!(
            matches!(refusal, Refusal::NotTls(_) | Refusal::Tls(_) | Refusal::Closed | Refusal::PeerAlert(_)),
            "unexpected refusal {refusal:?}"
        );
        prop_assert!(took < TIMEOUT, "took {took:?}");
    }
}
