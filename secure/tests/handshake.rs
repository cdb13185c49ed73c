//! Real loopback mutual-TLS handshakes: the accepted case with data both
//! ways, and every refusal, checked on both ends.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use postcopy_secure::creds::Lifetime;
use postcopy_secure::{
    accept, connect, Allowlist, CertificateAuthority, ChannelError, ClientSide, Credentials, HandshakeError,
    HandshakeGate, HandshakeLimits, Identity, MigrationSecret, Refusal, Role, SecureChannel, ServerSide, Wait,
};
use time::macros::datetime;

const TIMEOUT: Duration = Duration::from_secs(5);
const SOURCE: &str = "src.test";
const DESTINATION: &str = "dst.test";

fn dns(name: &str) -> Identity {
    Identity::Dns(name.to_owned())
}

/// Two CAs and certificates signed by them, valid or not.
struct Pki {
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
}

impl Pki {
    fn new() -> Self {
        Self {
            ca: CertificateAuthority::new("test CA", Lifetime::days_from_now(10)).unwrap(),
            other_ca: CertificateAuthority::new("another CA", Lifetime::days_from_now(10)).unwrap(),
        }
    }

    /// Credentials for `name` signed by `signer`, trusting our CA.
    fn creds_from(&self, signer: &CertificateAuthority, name: &str, lifetime: Lifetime) -> Credentials {
        let host = signer.issue(&[dns(name)], lifetime).unwrap();
        Credentials::from_pem(&host.cert_pem, &host.key_pem, &self.ca.cert_pem()).unwrap()
    }

    fn creds(&self, name: &str) -> Credentials {
        self.creds_from(&self.ca, name, Lifetime::days_from_now(1))
    }

    fn expired(&self, name: &str) -> Credentials {
        let lifetime =
            Lifetime { not_before: datetime!(2001-01-01 0:00 UTC), not_after: datetime!(2002-01-01 0:00 UTC) };
        self.creds_from(&self.ca, name, lifetime)
    }

    fn not_yet_valid(&self, name: &str) -> Credentials {
        let lifetime =
            Lifetime { not_before: datetime!(2090-01-01 0:00 UTC), not_after: datetime!(2091-01-01 0:00 UTC) };
        self.creds_from(&self.ca, name, lifetime)
    }

    fn signed_by_other_ca(&self, name: &str) -> Credentials {
        self.creds_from(&self.other_ca, name, Lifetime::days_from_now(1))
    }
}

fn server(creds: &Credentials, allow: &[&str]) -> ServerSide {
    ServerSide::new(creds, Allowlist::parse(allow).unwrap()).unwrap()
}

fn client(creds: &Credentials, allow: &[&str]) -> ClientSide {
    ClientSide::new(creds, Allowlist::parse(allow).unwrap()).unwrap()
}

type Ends = (Result<SecureChannel, HandshakeError>, Result<SecureChannel, HandshakeError>);

/// Handshakes a client (dialling `dial`) with a server over loopback:
/// (server's result, client's result).
fn pair(server_side: ServerSide, client_side: &ClientSide, dial: &str) -> Ends {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        accept(stream, &server_side, TIMEOUT)
    });
    let client = connect(TcpStream::connect(addr).unwrap(), client_side, dial, TIMEOUT);
    (server.join().unwrap(), client)
}

fn good_pair(pki: &Pki) -> (SecureChannel, SecureChannel) {
    let (s, c) =
        pair(server(&pki.creds(DESTINATION), &[SOURCE]), &client(&pki.creds(SOURCE), &[DESTINATION]), DESTINATION);
    (s.unwrap(), c.unwrap())
}

fn refusal(end: Result<SecureChannel, HandshakeError>, side: &str) -> Refusal {
    match end {
        Ok(_) => panic!("the {side} accepted"),
        Err(e) => {
            eprintln!("{side}: {e}");
            e.refusal
        }
    }
}

fn read_exactly(ch: &SecureChannel, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = ch.recv(&mut out[got..], Wait::Block).unwrap();
        assert!(n > 0, "closed after {got} of {len} bytes");
        got += n;
    }
    out
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn mutual_handshake_carries_data_both_ways_and_names_the_peers() {
    let pki = Pki::new();
    let (dst, src) = good_pair(&pki);
    assert_eq!(dst.peer_identities(), &[dns(SOURCE)]);
    assert_eq!(src.peer_identities(), &[dns(DESTINATION)]);

    src.write_all(b"request").unwrap();
    assert_eq!(read_exactly(&dst, 7), b"request");
    dst.write_all(b"reply!").unwrap();
    assert_eq!(read_exactly(&src, 6), b"reply!");

    // Several MiB each way at once: no deadlock while both ends write.
    let big = 8 << 20;
    let (src, dst) = (Arc::new(src), Arc::new(dst));
    let writers: Vec<_> = [(src.clone(), 1u8), (dst.clone(), 2u8)]
        .into_iter()
        .map(|(ch, seed)| thread::spawn(move || ch.write_all(&pattern(seed, big)).unwrap()))
        .collect();
    assert_eq!(read_exactly(&dst, big), pattern(1, big));
    assert_eq!(read_exactly(&src, big), pattern(2, big));
    for w in writers {
        w.join().unwrap();
    }

    // Nothing pending: a non-blocking receive says so.
    let mut buf = [0u8; 16];
    match dst.recv(&mut buf, Wait::NoWait) {
        Err(ChannelError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        other => panic!("expected WouldBlock, got {other:?}"),
    }

    // A close_notify ends the peer's reads cleanly.
    src.close().unwrap();
    assert_eq!(dst.recv(&mut buf, Wait::Block).unwrap(), 0);
}

#[test]
fn one_reader_and_several_writers_share_a_channel() {
    let pki = Pki::new();
    let (dst, src) = good_pair(&pki);
    let (dst, src) = (Arc::new(dst), Arc::new(src));
    // Four writer threads on the source, each sending framed messages
    // (a 1-byte writer id, a 4-byte length, the body); the destination's
    // reader thread checks every frame arrives whole; meanwhile the
    // destination writes back and the source's reader checks that too.
    let writers: Vec<_> = (0..4u8)
        .map(|id| {
            let src = src.clone();
            thread::spawn(move || {
                for i in 0..200u32 {
                    let body = pattern(id.wrapping_add(i as u8), 1 + (i as usize * 997) % 70_000);
                    let mut frame = vec![id];
                    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    frame.extend_from_slice(&body);
                    src.write_all(&frame).unwrap();
                }
            })
        })
        .collect();
    let back = {
        let dst = dst.clone();
        thread::spawn(move || dst.write_all(&pattern(9, 3 << 20)).unwrap())
    };
    let mut next = [0u32; 4];
    for _ in 0..800 {
        let head = read_exactly(&dst, 5);
        let id = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let i = next[id as usize];
        assert_eq!(len, 1 + (i as usize * 997) % 70_000);
        assert_eq!(read_exactly(&dst, len), pattern(id.wrapping_add(i as u8), len), "writer {id} frame {i}");
        next[id as usize] += 1;
    }
    assert_eq!(next, [200; 4]);
    assert_eq!(read_exactly(&src, 3 << 20), pattern(9, 3 << 20));
    for w in writers {
        w.join().unwrap();
    }
    back.join().unwrap();
}

#[test]
fn channel_binding_is_equal_on_both_ends_and_differs_across_connections() {
    let pki = Pki::new();
    let (dst1, src1) = good_pair(&pki);
    let (dst2, src2) = good_pair(&pki);
    assert_eq!(dst1.binding(), src1.binding());
    assert_eq!(dst2.binding(), src2.binding());
    assert_ne!(src1.binding(), src2.binding());

    // A proof made on connection 1 passes there and fails on connection 2:
    // a recorded hello cannot be replayed on another connection.
    let secret = MigrationSecret::new(&[42u8; 32]).unwrap();
    let proof = secret.proof(src1.binding(), Role::Source);
    secret.verify(dst1.binding(), Role::Source, &proof).unwrap();
    assert!(secret.verify(dst2.binding(), Role::Source, &proof).is_err());
}

#[test]
fn expired_certificates_are_refused_on_both_ends() {
    let pki = Pki::new();
    // The server's certificate expired.
    let (s, c) =
        pair(server(&pki.expired(DESTINATION), &[SOURCE]), &client(&pki.creds(SOURCE), &[DESTINATION]), DESTINATION);
    assert!(matches!(refusal(c, "client"), Refusal::PeerCertificateExpired));
    assert!(matches!(refusal(s, "server"), Refusal::OurCertificateExpired));
    // The client's certificate expired.
    let (s, c) =
        pair(server(&pki.creds(DESTINATION), &[SOURCE]), &client(&pki.expired(SOURCE), &[DESTINATION]), DESTINATION);
    assert!(matches!(refusal(s, "server"), Refusal::PeerCertificateExpired));
    assert!(matches!(refusal(c, "client"), Refusal::OurCertificateExpired));
}

#[test]
fn not_yet_valid_certificates_are_refused_on_both_ends() {
    let pki = Pki::new();
    let (s, c) = pair(
        server(&pki.not_yet_valid(DESTINATION), &[SOURCE]),
        &client(&pki.creds(SOURCE), &[DESTINATION]),
        DESTINATION,
    );
    assert!(matches!(refusal(c, "client"), Refusal::PeerCertificateNotYetValid));
    assert!(matches!(refusal(s, "server"), Refusal::OurCertificateNotYetValid));
    let (s, c) = pair(
        server(&pki.creds(DESTINATION), &[SOURCE]),
        &client(&pki.not_yet_valid(SOURCE), &[DESTINATION]),
        DESTINATION,
    );
    assert!(matches!(refusal(s, "server"), Refusal::PeerCertificateNotYetValid));
    assert!(matches!(refusal(c, "client"), Refusal::OurCertificateNotYetValid));
}

#[test]
fn certificates_from_another_ca_are_refused_on_both_ends() {
    let pki = Pki::new();
    let (s, c) = pair(
        server(&pki.signed_by_other_ca(DESTINATION), &[SOURCE]),
        &client(&pki.creds(SOURCE), &[DESTINATION]),
        DESTINATION,
    );
    assert!(matches!(refusal(c, "client"), Refusal::PeerCertificateUnknownCa));
    assert!(matches!(refusal(s, "server"), Refusal::OurCaNotTrusted));
    let (s, c) = pair(
        server(&pki.creds(DESTINATION), &[SOURCE]),
        &client(&pki.signed_by_other_ca(SOURCE), &[DESTINATION]),
        DESTINATION,
    );
    assert!(matches!(refusal(s, "server"), Refusal::PeerCertificateUnknownCa));
    assert!(matches!(refusal(c, "client"), Refusal::OurCaNotTrusted));
}

#[test]
fn a_server_certificate_for_another_name_is_refused_on_both_ends() {
    let pki = Pki::new();
    // The client dials dst.test; the server's certificate names only
    // elsewhere.test (even though the client's allowlist has both).
    let (s, c) = pair(
        server(&pki.creds("elsewhere.test"), &[SOURCE]),
        &client(&pki.creds(SOURCE), &[DESTINATION, "elsewhere.test"]),
        DESTINATION,
    );
    assert!(matches!(refusal(c, "client"), Refusal::PeerCertificateWrongName));
    assert!(matches!(refusal(s, "server"), Refusal::OurNameRejected));
}

#[test]
fn identities_outside_the_allowlist_are_refused_on_both_ends() {
    let pki = Pki::new();
    // A client with a good certificate from the right CA, but not allowed.
    let (s, c) = pair(
        server(&pki.creds(DESTINATION), &[SOURCE]),
        &client(&pki.creds("stranger.test"), &[DESTINATION]),
        DESTINATION,
    );
    match refusal(s, "server") {
        Refusal::PeerNotAllowed { presented } => assert_eq!(presented, vec![dns("stranger.test")]),
        other => panic!("server: {other:?}"),
    }
    assert!(matches!(refusal(c, "client"), Refusal::OurIdentityNotAllowed));
    // A server whose name matches what was dialled but that the client's
    // allowlist does not have.
    let (s, c) = pair(
        server(&pki.creds(DESTINATION), &[SOURCE]),
        &client(&pki.creds(SOURCE), &["other-destination.test"]),
        DESTINATION,
    );
    assert!(matches!(refusal(c, "client"), Refusal::PeerNotAllowed { .. }));
    assert!(matches!(refusal(s, "server"), Refusal::OurIdentityNotAllowed));
}

#[test]
fn a_client_without_a_certificate_is_refused_on_both_ends() {
    let pki = Pki::new();
    let with_cert = client(&pki.creds(SOURCE), &[DESTINATION]);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.creds(SOURCE).ca[0].clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(postcopy_secure::config::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_secret_extraction = true;
    let no_cert = ClientSide { config: Arc::new(config), own_validity: with_cert.own_validity };
    let (s, c) = pair(server(&pki.creds(DESTINATION), &[SOURCE]), &no_cert, DESTINATION);
    assert!(matches!(refusal(s, "server"), Refusal::PeerPresentedNoCertificate));
    assert!(matches!(refusal(c, "client"), Refusal::OurCertificateRequired));
}

#[test]
fn plain_tcp_garbage_and_preambles_are_not_tls() {
    let pki = Pki::new();
    let side = server(&pki.creds(DESTINATION), &[SOURCE]);
    // A plaintext 8-byte preamble (magic "PCPC", channel 1) and 64 zero
    // bytes (what stopped a plaintext destination), an HTTP request, and
    // random-looking bytes.
    let mut preamble_and_zeros = b"PCPC\x01\x00\x00\x00".to_vec();
    preamble_and_zeros.extend_from_slice(&[0u8; 64]);
    for garbage in [preamble_and_zeros, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), pattern(77, 300)] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let side = side.clone();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let started = Instant::now();
            (accept(stream, &side, TIMEOUT), started.elapsed())
        });
        let mut stranger = TcpStream::connect(addr).unwrap();
        stranger.write_all(&garbage).unwrap();
        let (result, took) = server.join().unwrap();
        assert!(matches!(refusal(result, "server"), Refusal::NotTls(_)));
        assert!(took < Duration::from_secs(1), "refusing garbage took {took:?}");
        // The server answered (an alert) or closed; it did not wait.
        stranger.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut rest = Vec::new();
        let _ = stranger.read_to_end(&mut rest);
    }
}

#[test]
fn a_silent_or_trickling_peer_times_out_at_the_deadline() {
    let pki = Pki::new();
    let side = server(&pki.creds(DESTINATION), &[SOURCE]);
    let timeout = Duration::from_millis(300);
    for trickle in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let side = side.clone();
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let started = Instant::now();
            (accept(stream, &side, timeout), started.elapsed())
        });
        let mut slow = TcpStream::connect(addr).unwrap();
        if trickle {
            // A valid record header, then one byte every 50 ms: each read
            // gets something, but the deadline still holds.
            let _ = slow.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]);
            // 2 s of trickle: a per-read timeout alone would wait it out.
            for _ in 0..40 {
                thread::sleep(Duration::from_millis(50));
                if slow.write_all(&[1]).is_err() {
                    break;
                }
            }
        }
        let (result, took) = server.join().unwrap();
        assert!(matches!(refusal(result, "server"), Refusal::Timeout(t) if t == timeout));
        assert!(took >= timeout && took < timeout + Duration::from_millis(700), "trickle {trickle}: {took:?}");
        drop(slow);
    }
}

#[test]
fn the_gate_refuses_handshakes_beyond_its_limit_while_slow_peers_hold_slots() {
    let pki = Pki::new();
    let side = server(&pki.creds(DESTINATION), &[SOURCE]);
    let gate =
        Arc::new(HandshakeGate::new(HandshakeLimits { max_in_handshake: 2, timeout: Duration::from_millis(400) }));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Two silent peers take both slots.
    let silent: Vec<_> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut handshakes = Vec::new();
    for _ in 0..2 {
        let (stream, _) = listener.accept().unwrap();
        let slot = gate.try_enter().unwrap();
        let side = side.clone();
        handshakes.push(thread::spawn(move || accept(stream, &side, slot.timeout()).map(|_| ())));
    }
    // A third connection, even a good one, is refused while they wait.
    let _third = TcpStream::connect(addr).unwrap();
    let _ = listener.accept().unwrap();
    assert!(matches!(gate.try_enter(), Err(Refusal::TooManyHandshakes(2))));
    // They time out and free their slots; a real source gets in.
    for h in handshakes {
        assert!(matches!(h.join().unwrap(), Err(HandshakeError { refusal: Refusal::Timeout(_), .. })));
    }
    drop(silent);
    assert_eq!(gate.in_handshake(), 0);
    let slot = gate.try_enter().unwrap();
    let server_thread = {
        let side = side.clone();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            accept(stream, &side, slot.timeout())
        })
    };
    let src =
        connect(TcpStream::connect(addr).unwrap(), &client(&pki.creds(SOURCE), &[DESTINATION]), DESTINATION, TIMEOUT);
    assert!(src.is_ok() && server_thread.join().unwrap().is_ok());
}

#[test]
fn a_cut_connection_is_truncated_not_a_clean_end() {
    let pki = Pki::new();
    let (dst, src) = good_pair(&pki);
    src.write_all(b"partial").unwrap();
    src.shutdown();
    assert_eq!(read_exactly(&dst, 7), b"partial");
    let mut buf = [0u8; 8];
    assert!(matches!(dst.recv(&mut buf, Wait::Block), Err(ChannelError::Truncated)));
}

#[test]
fn first_run_credentials_written_to_files_authenticate_both_hosts() {
    let dir = std::env::temp_dir().join(format!("postcopy-secure-first-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let written =
        postcopy_secure::write_first_run_credentials(&dir, &[SOURCE.to_owned(), DESTINATION.to_owned()], 7).unwrap();
    let load = |name: &str| {
        let (_, cert, key) = written.hosts.iter().find(|(n, _, _)| n == name).unwrap();
        Credentials::load(cert, key, &written.ca_cert).unwrap()
    };
    let (s, c) = pair(server(&load(DESTINATION), &[SOURCE]), &client(&load(SOURCE), &[DESTINATION]), DESTINATION);
    let (dst, src) = (s.unwrap(), c.unwrap());
    src.write_all(b"hello").unwrap();
    assert_eq!(read_exactly(&dst, 5), b"hello");
    std::fs::remove_dir_all(&dir).unwrap();
}
