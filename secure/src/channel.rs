//! Mutually authenticated TLS channels over blocking `TcpStream`s, shaped
//! for the driver: one reader thread and any number of writer threads per
//! connection, all through `&self`.
//!
//! rustls runs the handshake, reading one record at a time so that it
//! takes nothing past it from the socket; then the session's keys are
//! extracted into a send half and a receive half ([`crate::record`]) that
//! share no lock, so a writer blocked on a full socket never stops the
//! reader and the socket stays a plain fd.
//!
//! After its handshake a server sends one confirmation record; the client
//! waits for it, so a client learns of the server's refusal of its
//! certificate (a TLS 1.3 client finishes its handshake before the server
//! has checked that certificate) as a typed error, not as a later
//! connection reset.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls::{AlertDescription, CertificateError, Connection};
use rustls_pki_types::ServerName;

use crate::binding::ChannelBinding;
use crate::config::{ClientSide, NotInAllowlist, ServerSide};
use crate::error::{ChannelError, HandshakeError, PeerAddr, Refusal};
use crate::identity::{identities_of, Identity, Validity, ValidityCheck};
use crate::record::{RecordAtATime, RecvHalf, SendHalf, Wait};
use crate::rekey::TrafficSecrets;

/// The confirmation a server sends once it has accepted a client: the
/// first application-data byte on every channel.
pub const ACCEPTED: u8 = 0xA5;

/// An established, mutually authenticated channel.
pub struct SecureChannel {
    stream: TcpStream,
    send: Mutex<SendHalf>,
    recv: Mutex<RecvHalf>,
    peer: PeerAddr,
    peer_identities: Vec<Identity>,
    binding: ChannelBinding,
}

impl std::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("peer", &self.peer)
            .field("peer_identities", &self.peer_identities)
            .finish_non_exhaustive()
    }
}

/// Opens the client end over a connected `stream`: handshakes within
/// `timeout`, checking that the server's certificate names `server_name`
/// and an identity in the client's allowlist, then waits for the server's
/// acceptance of our certificate.
pub fn connect(
    stream: TcpStream,
    side: &ClientSide,
    server_name: &str,
    timeout: Duration,
) -> Result<SecureChannel, HandshakeError> {
    let peer = PeerAddr(stream.peer_addr().ok());
    let fail = |refusal| HandshakeError { peer, refusal };
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| fail(Refusal::Tls(rustls::Error::General(format!("bad server name {server_name:?}")))))?;
    // A key log per connection keeps its traffic secrets for key updates.
    let secrets = TrafficSecrets::default();
    let mut config = (*side.config).clone();
    config.key_log = Arc::new(secrets.clone());
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| fail(Refusal::Tls(e)))?;
    let mut conn = Connection::Client(conn);
    let deadline = Instant::now() + timeout;
    let validity = side.own_validity;
    handshake(&mut conn, &mut RecordAtATime::new(&stream), deadline, timeout, &validity).map_err(fail)?;
    let channel = SecureChannel::established(stream, conn, peer, &secrets)?;
    await_acceptance(&channel, deadline, timeout, &validity).map_err(fail)?;
    Ok(channel)
}

/// Opens the server end over an accepted `stream`: handshakes within
/// `timeout`, checking the client's chain and identity, then confirms.
pub fn accept(stream: TcpStream, side: &ServerSide, timeout: Duration) -> Result<SecureChannel, HandshakeError> {
    let peer = PeerAddr(stream.peer_addr().ok());
    let fail = |refusal| HandshakeError { peer, refusal };
    let secrets = TrafficSecrets::default();
    let mut config = (*side.config).clone();
    config.key_log = Arc::new(secrets.clone());
    let conn = rustls::ServerConnection::new(Arc::new(config)).map_err(|e| fail(Refusal::Tls(e)))?;
    let mut conn = Connection::Server(conn);
    let deadline = Instant::now() + timeout;
    handshake(&mut conn, &mut RecordAtATime::new(&stream), deadline, timeout, &side.own_validity).map_err(fail)?;
    let channel = SecureChannel::established(stream, conn, peer, &secrets)?;
    // The confirmation goes through the extracted keys (sequence 0), as all
    // records after the handshake do.
    channel.write_all(&[ACCEPTED]).map_err(|e| fail(Refusal::Io(e.into())))?;
    Ok(channel)
}

fn remaining(deadline: Instant, timeout: Duration) -> Result<Duration, Refusal> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(Refusal::Timeout(timeout))
    } else {
        Ok(left)
    }
}

fn io_refusal(e: io::Error, timeout: Duration) -> Refusal {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Refusal::Timeout(timeout),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Refusal::Closed,
        _ => Refusal::Io(e),
    }
}

fn flush_blocking(
    conn: &mut Connection,
    mut stream: &TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Refusal> {
    while conn.wants_write() {
        stream.set_write_timeout(Some(remaining(deadline, timeout)?)).map_err(Refusal::Io)?;
        conn.write_tls(&mut stream).map_err(|e| io_refusal(e, timeout))?;
    }
    Ok(())
}

/// Reads once from the socket into rustls and processes what came; on a
/// TLS error sends rustls's alert (best effort) and classifies the error.
fn read_and_process(
    conn: &mut Connection,
    records: &mut RecordAtATime<'_>,
    deadline: Instant,
    timeout: Duration,
    validity: &Validity,
) -> Result<(), Refusal> {
    let mut stream = records.stream;
    stream.set_read_timeout(Some(remaining(deadline, timeout)?)).map_err(Refusal::Io)?;
    if conn.read_tls(records).map_err(|e| io_refusal(e, timeout))? == 0 {
        return Err(Refusal::Closed);
    }
    if let Err(e) = conn.process_new_packets() {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = conn.write_tls(&mut stream);
        return Err(classify(e, validity, conn.is_handshaking()));
    }
    Ok(())
}

fn handshake(
    conn: &mut Connection,
    records: &mut RecordAtATime<'_>,
    deadline: Instant,
    timeout: Duration,
    validity: &Validity,
) -> Result<(), Refusal> {
    while conn.is_handshaking() {
        flush_blocking(conn, records.stream, deadline, timeout)?;
        if conn.is_handshaking() {
            read_and_process(conn, records, deadline, timeout, validity)?;
        }
    }
    flush_blocking(conn, records.stream, deadline, timeout)
}

/// Waits for the server's confirmation (or its alert refusing us).
fn await_acceptance(
    channel: &SecureChannel,
    deadline: Instant,
    timeout: Duration,
    validity: &Validity,
) -> Result<(), Refusal> {
    channel.stream.set_read_timeout(Some(remaining(deadline, timeout)?)).map_err(Refusal::Io)?;
    let mut byte = [0u8; 1];
    let got = channel.recv(&mut byte, Wait::Block);
    channel.stream.set_read_timeout(None).map_err(Refusal::Io)?;
    match got {
        Ok(1) if byte[0] == ACCEPTED => Ok(()),
        Ok(0) | Err(ChannelError::Truncated) => Err(Refusal::Closed),
        Ok(_) => Err(Refusal::Tls(rustls::Error::General(format!(
            "the server's first byte is {:#04x}, not its acceptance",
            byte[0]
        )))),
        Err(ChannelError::Tls(e)) => Err(classify(e, validity, false)),
        Err(ChannelError::Io(e)) => Err(io_refusal(e, timeout)),
        Err(e @ ChannelError::KeyLimit { .. }) => Err(Refusal::Tls(rustls::Error::General(e.to_string()))),
    }
}

/// Maps a rustls error to a refusal: our checks of the peer's certificate
/// (`Peer*`) or the peer's alert about ours (`Our*`).
fn classify(e: rustls::Error, own: &Validity, handshaking: bool) -> Refusal {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Refusal::PeerCertificateExpired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Refusal::PeerCertificateNotYetValid
            }
            CertificateError::UnknownIssuer => Refusal::PeerCertificateUnknownCa,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Refusal::PeerCertificateWrongName
            }
            CertificateError::Other(other) => match other.0.downcast_ref::<NotInAllowlist>() {
                Some(n) => Refusal::PeerNotAllowed { presented: n.presented.clone() },
                None => Refusal::Tls(E::InvalidCertificate(CertificateError::Other(other))),
            },
            c => Refusal::Tls(E::InvalidCertificate(c)),
        },
        E::NoCertificatesPresented => Refusal::PeerPresentedNoCertificate,
        E::AlertReceived(alert) => match alert {
            AlertDescription::CertificateExpired => match own.check(SystemTime::now()) {
                ValidityCheck::Expired => Refusal::OurCertificateExpired,
                ValidityCheck::NotYetValid => Refusal::OurCertificateNotYetValid,
                ValidityCheck::Valid => Refusal::OurCertificateValidityDisputed,
            },
            AlertDescription::UnknownCA => Refusal::OurCaNotTrusted,
            AlertDescription::BadCertificate => Refusal::OurNameRejected,
            AlertDescription::CertificateUnknown | AlertDescription::AccessDenied => Refusal::OurIdentityNotAllowed,
            AlertDescription::CertificateRequired => Refusal::OurCertificateRequired,
            a => Refusal::PeerAlert(a),
        },
        e @ (E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. })
            if handshaking =>
        {
            Refusal::NotTls(e)
        }
        e => Refusal::Tls(e),
    }
}

impl SecureChannel {
    fn established(
        stream: TcpStream,
        conn: Connection,
        peer: PeerAddr,
        traffic: &TrafficSecrets,
    ) -> Result<Self, HandshakeError> {
        let fail = |refusal| HandshakeError { peer, refusal };
        let peer_identities = match conn.peer_certificates().and_then(|c| c.first()) {
            Some(leaf) => identities_of(leaf)
                .map_err(|d| fail(Refusal::Tls(rustls::Error::General(format!("peer certificate: {d}")))))?,
            None => return Err(fail(Refusal::PeerPresentedNoCertificate)),
        };
        let binding = ChannelBinding::export(&conn).map_err(|e| fail(Refusal::Tls(e)))?;
        let suite = match conn.negotiated_cipher_suite() {
            Some(rustls::SupportedCipherSuite::Tls13(suite)) => suite,
            _ => return Err(fail(Refusal::Tls(rustls::Error::General("not a TLS 1.3 suite".into())))),
        };
        let is_client = matches!(conn, Connection::Client(_));
        let secrets = conn.dangerous_extract_secrets().map_err(|e| fail(Refusal::Tls(e)))?;
        let (client_secret, server_secret) = traffic
            .take()
            .ok_or_else(|| fail(Refusal::Tls(rustls::Error::General("no traffic secrets were logged".into()))))?;
        let (tx_secret, rx_secret) =
            if is_client { (client_secret, server_secret) } else { (server_secret, client_secret) };
        let half_err = |e: ChannelError| fail(Refusal::Tls(rustls::Error::General(e.to_string())));
        let update_requested = Arc::new(AtomicBool::new(false));
        let send =
            SendHalf::new(suite, secrets.tx.0, secrets.tx.1, tx_secret, update_requested.clone()).map_err(half_err)?;
        let recv = RecvHalf::new(suite, secrets.rx.0, secrets.rx.1, rx_secret, update_requested).map_err(half_err)?;
        stream.set_read_timeout(None).map_err(|e| fail(Refusal::Io(e)))?;
        stream.set_write_timeout(None).map_err(|e| fail(Refusal::Io(e)))?;
        let _ = stream.set_nodelay(true);
        Ok(Self { stream, send: Mutex::new(send), recv: Mutex::new(recv), peer, peer_identities, binding })
    }

    /// The identities the peer's (verified) certificate names.
    pub fn peer_identities(&self) -> &[Identity] {
        &self.peer_identities
    }

    /// The peer's address.
    pub fn peer(&self) -> PeerAddr {
        self.peer
    }

    /// This connection's channel binding (equal on both ends, unique to
    /// this TLS session).
    pub fn binding(&self) -> &ChannelBinding {
        &self.binding
    }

    /// The socket (for socket options; reading or writing it directly
    /// would corrupt the channel).
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    /// Encrypts and sends all of `bytes`. Any number of threads may write;
    /// each call's bytes stay together.
    pub fn write_all(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        lock(&self.send).write_all(&self.stream, bytes)
    }

    /// Receives decrypted bytes into `out`: Ok(n > 0) bytes, or Ok(0) when
    /// the peer closed with a TLS close_notify. A close without it is
    /// `ChannelError::Truncated`. One reader at a time (others wait).
    pub fn recv(&self, out: &mut [u8], wait: Wait) -> Result<usize, ChannelError> {
        lock(&self.recv).recv(&self.stream, out, wait)
    }

    /// Receives at most `max` decrypted bytes, handing them to `deliver`
    /// (in one or more pieces) rather than into a buffer: Ok(n) as
    /// [`SecureChannel::recv`]. With `Wait::NoWait`, `WouldBlock` (as
    /// `ChannelError::Io`) when no whole record is there.
    pub fn recv_with(&self, max: usize, wait: Wait, deliver: impl FnMut(&[u8])) -> Result<usize, ChannelError> {
        lock(&self.recv).recv_with(&self.stream, max, wait, deliver)
    }

    /// Sets how many records are sent under one key before a key update
    /// (default [`crate::record::DEFAULT_UPDATE_EVERY`]).
    pub fn set_key_update_interval(&self, records: u64) {
        lock(&self.send).set_update_every(records);
    }

    /// Sends a TLS close_notify: the peer's reads end with Ok(0).
    pub fn close(&self) -> Result<(), ChannelError> {
        lock(&self.send).close(&self.stream)
    }

    /// Ends the connection both ways (unblocks its reader and writers).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
