//! The split record layer against rustls's own: each end of our channel
//! talks to a plain rustls connection (which keeps its record layer), so a
//! framing, sequencing or key-update mistake that both of our halves share
//! would show. Both ends update their keys often: ours every few records,
//! rustls's before each of its messages.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use postcopy_secure::channel::ACCEPTED;
use postcopy_secure::creds::Lifetime;
use postcopy_secure::{
    accept, connect, Allowlist, CertificateAuthority, ClientSide, Credentials, Identity, SecureChannel, ServerSide,
    Wait,
};
use rustls_pki_types::ServerName;

const TIMEOUT: Duration = Duration::from_secs(5);

fn sides() -> (ServerSide, ClientSide) {
    let ca = CertificateAuthority::new("interop CA", Lifetime::days_from_now(1)).unwrap();
    let creds = |name: &str| {
        let host = ca.issue(&[Identity::Dns(name.into())], Lifetime::days_from_now(1)).unwrap();
        Credentials::from_pem(&host.cert_pem, &host.key_pem, &ca.cert_pem()).unwrap()
    };
    (
        ServerSide::new(&creds("dst.test"), Allowlist::parse(["src.test"]).unwrap()).unwrap(),
        ClientSide::new(&creds("src.test"), Allowlist::parse(["dst.test"]).unwrap()).unwrap(),
    )
}

/// Sizes around the record size and across many records.
const SIZES: [usize; 7] = [1, 16_383, 16_384, 16_385, 65_537, 1 << 20, (3 << 20) + 5];

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + seed) % 253) as u8).collect()
}

fn read_exactly_channel(ch: &SecureChannel, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = ch.recv(&mut out[got..], Wait::Block).unwrap();
        assert!(n > 0);
        got += n;
    }
    out
}

/// Our channel as client, rustls's stream as server.
#[test]
fn our_client_with_a_rustls_server() {
    let (server_side, client_side) = sides();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(server_side.config.clone()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(&[ACCEPTED]).unwrap();
        for (i, &len) in SIZES.iter().enumerate() {
            let mut got = vec![0u8; len];
            tls.read_exact(&mut got).unwrap();
            assert_eq!(got, pattern(i, len), "rustls server: message {i}");
            tls.conn.refresh_traffic_keys().unwrap();
            tls.write_all(&pattern(i + 100, len)).unwrap();
        }
        // Our close_notify ends rustls's reads cleanly.
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        tls.conn.send_close_notify();
        tls.flush().unwrap();
    });
    let ch = connect(TcpStream::connect(addr).unwrap(), &client_side, "dst.test", TIMEOUT).unwrap();
    ch.set_key_update_interval(2);
    for (i, &len) in SIZES.iter().enumerate() {
        ch.write_all(&pattern(i, len)).unwrap();
        assert_eq!(read_exactly_channel(&ch, len), pattern(i + 100, len), "our client: message {i}");
    }
    ch.close().unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(ch.recv(&mut buf, Wait::Block).unwrap(), 0, "rustls's close_notify");
    peer.join().unwrap();
}

/// Our channel as server, rustls's stream as client.
#[test]
fn our_server_with_a_rustls_client() {
    let (server_side, client_side) = sides();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let ours = thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let ch = Arc::new(accept(sock, &server_side, TIMEOUT).unwrap());
        ch.set_key_update_interval(3);
        for (i, &len) in SIZES.iter().enumerate() {
            assert_eq!(read_exactly_channel(&ch, len), pattern(i, len), "our server: message {i}");
            ch.write_all(&pattern(i + 100, len)).unwrap();
        }
        let mut buf = [0u8; 4];
        assert_eq!(ch.recv(&mut buf, Wait::Block).unwrap(), 0, "rustls's close_notify");
        ch.close().unwrap();
    });
    let name = ServerName::try_from("dst.test").unwrap();
    let conn = rustls::ClientConnection::new(client_side.config.clone(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    let mut first = [0u8; 1];
    tls.read_exact(&mut first).unwrap();
    assert_eq!(first[0], ACCEPTED);
    for (i, &len) in SIZES.iter().enumerate() {
        tls.conn.refresh_traffic_keys().unwrap();
        tls.write_all(&pattern(i, len)).unwrap();
        let mut got = vec![0u8; len];
        tls.read_exact(&mut got).unwrap();
        assert_eq!(got, pattern(i + 100, len), "rustls client: message {i}");
    }
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    ours.join().unwrap();
}
