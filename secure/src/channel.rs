//! Mutually authenticated TLS channels over blocking `TcpStream`s, shaped
//! for the driver: one reader thread and any number of writer threads per
//! connection, all through `&self`.
//!
//! The rustls state sits behind a mutex that is never held across a
//! blocking socket call: a writer takes the send lock first (which orders
//! records), encrypts under the state lock, releases it, then sends; the
//! reader receives ciphertext without any lock and takes the state lock
//! only to decrypt. So a writer blocked on a full socket never stops the
//! reader (no deadlock when both ends write at once), and the reader
//! waits at most one chunk's encryption (`WRITE_CHUNK` bytes, ~10 us).
//!
//! After its handshake a server sends one confirmation record; the client
//! waits for it, so a client learns of the server's refusal of its
//! certificate (a TLS 1.3 client finishes its handshake before the server
//! has checked that certificate) as a typed error, not as a later
//! connection reset.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls::{AlertDescription, CertificateError, Connection};
use rustls_pki_types::ServerName;

use crate::binding::ChannelBinding;
use crate::config::{ClientSide, NotInAllowlist, ServerSide};
use crate::error::{ChannelError, HandshakeError, PeerAddr, Refusal};
use crate::identity::{identities_of, Identity, Validity, ValidityCheck};

/// The confirmation a server sends once it has accepted a client.
const ACCEPTED: u8 = 0xA5;
/// Plaintext encrypted per state-lock hold by a writer.
const WRITE_CHUNK: usize = 64 * 1024;
/// Ciphertext received per socket call by the reader.
const RECV_CHUNK: usize = 128 * 1024;

/// An established, mutually authenticated channel.
pub struct SecureChannel {
    stream: TcpStream,
    state: Mutex<Connection>,
    /// The send lock; its buffer holds the ciphertext being sent.
    send: Mutex<Vec<u8>>,
    /// The reader's ciphertext not yet handed to rustls.
    rx: Mutex<RxBuffer>,
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

struct RxBuffer {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
}

/// Whether a receive may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until data, end of stream or an error.
    Block,
    /// Return `WouldBlock` (as `ChannelError::Io`) when nothing is there.
    NoWait,
}

/// Opens the client end over a connected `stream`: handshakes within
/// `timeout`, checking that the server's certificate names `server_name`
/// and an identity in the client's allowlist, then waits for the server's
/// acceptance of our certificate.
pub fn connect(
    mut stream: TcpStream,
    side: &ClientSide,
    server_name: &str,
    timeout: Duration,
) -> Result<SecureChannel, HandshakeError> {
    let peer = PeerAddr(stream.peer_addr().ok());
    let fail = |refusal| HandshakeError { peer, refusal };
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| fail(Refusal::Tls(rustls::Error::General(format!("bad server name {server_name:?}")))))?;
    let conn = rustls::ClientConnection::new(side.config.clone(), name).map_err(|e| fail(Refusal::Tls(e)))?;
    let mut conn = Connection::Client(conn);
    let deadline = Instant::now() + timeout;
    let validity = side.own_validity;
    handshake(&mut conn, &mut stream, deadline, timeout, &validity).map_err(fail)?;
    await_acceptance(&mut conn, &mut stream, deadline, timeout, &validity).map_err(fail)?;
    SecureChannel::established(stream, conn, peer)
}

/// Opens the server end over an accepted `stream`: handshakes within
/// `timeout`, checking the client's chain and identity, then confirms.
pub fn accept(mut stream: TcpStream, side: &ServerSide, timeout: Duration) -> Result<SecureChannel, HandshakeError> {
    let peer = PeerAddr(stream.peer_addr().ok());
    let fail = |refusal| HandshakeError { peer, refusal };
    let conn = rustls::ServerConnection::new(side.config.clone()).map_err(|e| fail(Refusal::Tls(e)))?;
    let mut conn = Connection::Server(conn);
    let deadline = Instant::now() + timeout;
    handshake(&mut conn, &mut stream, deadline, timeout, &side.own_validity).map_err(fail)?;
    let confirm = conn.writer().write_all(&[ACCEPTED]).map_err(Refusal::Io).and_then(|()| {
        flush_blocking(&mut conn, &mut stream, deadline, timeout)
    });
    confirm.map_err(fail)?;
    SecureChannel::established(stream, conn, peer)
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
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            Refusal::Closed
        }
        _ => Refusal::Io(e),
    }
}

fn flush_blocking(
    conn: &mut Connection,
    stream: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Refusal> {
    while conn.wants_write() {
        stream.set_write_timeout(Some(remaining(deadline, timeout)?)).map_err(Refusal::Io)?;
        conn.write_tls(stream).map_err(|e| io_refusal(e, timeout))?;
    }
    Ok(())
}

/// Reads once from the socket into rustls and processes what came; on a
/// TLS error sends rustls's alert (best effort) and classifies the error.
fn read_and_process(
    conn: &mut Connection,
    stream: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
    validity: &Validity,
) -> Result<(), Refusal> {
    stream.set_read_timeout(Some(remaining(deadline, timeout)?)).map_err(Refusal::Io)?;
    if conn.read_tls(stream).map_err(|e| io_refusal(e, timeout))? == 0 {
        return Err(Refusal::Closed);
    }
    if let Err(e) = conn.process_new_packets() {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
        let _ = conn.write_tls(stream);
        return Err(classify(e, validity, conn.is_handshaking()));
    }
    Ok(())
}

fn handshake(
    conn: &mut Connection,
    stream: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
    validity: &Validity,
) -> Result<(), Refusal> {
    while conn.is_handshaking() {
        flush_blocking(conn, stream, deadline, timeout)?;
        if conn.is_handshaking() {
            read_and_process(conn, stream, deadline, timeout, validity)?;
        }
    }
    flush_blocking(conn, stream, deadline, timeout)
}

fn await_acceptance(
    conn: &mut Connection,
    stream: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
    validity: &Validity,
) -> Result<(), Refusal> {
    let mut byte = [0u8; 1];
    loop {
        match conn.reader().read(&mut byte) {
            Ok(1) if byte[0] == ACCEPTED => return Ok(()),
            Ok(0) => return Err(Refusal::Closed),
            Ok(_) => {
                return Err(Refusal::Tls(rustls::Error::General(format!(
                    "the server's first byte is {:#04x}, not its acceptance",
                    byte[0]
                ))))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                read_and_process(conn, stream, deadline, timeout, validity)?
            }
            Err(e) => return Err(io_refusal(e, timeout)),
        }
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
    fn established(stream: TcpStream, mut conn: Connection, peer: PeerAddr) -> Result<Self, HandshakeError> {
        let fail = |refusal| HandshakeError { peer, refusal };
        let peer_identities = match conn.peer_certificates().and_then(|c| c.first()) {
            Some(leaf) => identities_of(leaf)
                .map_err(|d| fail(Refusal::Tls(rustls::Error::General(format!("peer certificate: {d}")))))?,
            None => return Err(fail(Refusal::PeerPresentedNoCertificate)),
        };
        let binding = ChannelBinding::export(&conn).map_err(|e| fail(Refusal::Tls(e)))?;
        conn.set_buffer_limit(None);
        stream.set_read_timeout(None).map_err(|e| fail(Refusal::Io(e)))?;
        stream.set_write_timeout(None).map_err(|e| fail(Refusal::Io(e)))?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream,
            state: Mutex::new(conn),
            send: Mutex::new(Vec::with_capacity(WRITE_CHUNK + 1024)),
            rx: Mutex::new(RxBuffer { bytes: vec![0; RECV_CHUNK], start: 0, end: 0, eof: false }),
            peer,
            peer_identities,
            binding,
        })
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

    fn state(&self) -> MutexGuard<'_, Connection> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Encrypts and sends all of `bytes`. Any number of threads may write;
    /// each call's bytes stay together.
    pub fn write_all(&self, bytes: &[u8]) -> Result<(), ChannelError> {
        let mut send = self.send.lock().unwrap_or_else(|e| e.into_inner());
        for chunk in bytes.chunks(WRITE_CHUNK) {
            send.clear();
            {
                let mut state = self.state();
                state.writer().write_all(chunk)?;
                while state.wants_write() {
                    state.write_tls(&mut *send)?;
                }
            }
            (&self.stream).write_all(&send)?;
        }
        Ok(())
    }

    /// Receives decrypted bytes into `out`: Ok(n > 0) bytes, or Ok(0) when
    /// the peer closed with a TLS close_notify. A close without it is
    /// `ChannelError::Truncated`. One reader at a time (others wait).
    pub fn recv(&self, out: &mut [u8], wait: Wait) -> Result<usize, ChannelError> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let filled = self.decrypt_pending(&mut rx, out)?;
            if let Some(n) = filled {
                return Ok(n);
            }
            // Nothing decrypted and no ciphertext left: receive more.
            let flags = match wait {
                Wait::Block => rustix::net::RecvFlags::empty(),
                Wait::NoWait => rustix::net::RecvFlags::DONTWAIT,
            };
            let received = loop {
                match rustix::net::recv(&self.stream, &mut rx.bytes[..], flags) {
                    Ok((n, _)) => break n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(ChannelError::Io(e.into())),
                }
            };
            rx.start = 0;
            rx.end = received;
            if received == 0 {
                rx.eof = true;
                let mut empty: &[u8] = &[];
                self.state().read_tls(&mut empty)?;
            }
        }
    }

    /// Hands pending ciphertext to rustls and moves plaintext into `out`.
    /// Some(n): return n (n > 0, or 0 at a clean close). None: nothing yet.
    fn decrypt_pending(&self, rx: &mut RxBuffer, out: &mut [u8]) -> Result<Option<usize>, ChannelError> {
        let mut state = self.state();
        let mut filled = 0;
        loop {
            match state.reader().read(&mut out[filled..]) {
                Ok(0) => return Ok(Some(filled)),
                Ok(n) => {
                    filled += n;
                    if filled == out.len() {
                        break;
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return if filled > 0 { Ok(Some(filled)) } else { Err(ChannelError::Truncated) };
                }
                Err(e) => return Err(e.into()),
            }
            if rx.start == rx.end {
                break;
            }
            let mut pending = &rx.bytes[rx.start..rx.end];
            let taken = state.read_tls(&mut pending)?;
            rx.start += taken;
            if let Err(e) = state.process_new_packets() {
                // Tell the peer why (rustls queued an alert).
                self.flush_queued(state);
                return Err(e.into());
            }
        }
        // rustls may have queued records of its own (a key update reply).
        if state.wants_write() {
            self.flush_queued(state);
        }
        Ok((filled > 0).then_some(filled))
    }

    /// Sends what rustls queued on its own, unless a writer is sending (it
    /// sends the queue with its next chunk). The state lock is released
    /// before the socket call, as everywhere.
    fn flush_queued(&self, mut state: MutexGuard<'_, Connection>) {
        if let Ok(mut send) = self.send.try_lock() {
            send.clear();
            while state.wants_write() {
                if state.write_tls(&mut *send).is_err() {
                    break;
                }
            }
            drop(state);
            let _ = (&self.stream).write_all(&send);
        }
    }

    /// Sends a TLS close_notify: the peer's reads end with Ok(0).
    pub fn close(&self) -> Result<(), ChannelError> {
        let mut send = self.send.lock().unwrap_or_else(|e| e.into_inner());
        send.clear();
        {
            let mut state = self.state();
            state.send_close_notify();
            while state.wants_write() {
                state.write_tls(&mut *send)?;
            }
        }
        (&self.stream).write_all(&send)?;
        Ok(())
    }

    /// Ends the connection both ways (unblocks its reader and writers).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
