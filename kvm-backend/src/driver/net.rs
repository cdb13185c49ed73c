//! Connections: one TCP connection per channel, opened by the source, which
//! first writes the 8-byte preamble naming the channel. A connection is
//! plain TCP or a mutually authenticated TLS channel
//! ([`postcopy_secure::SecureChannel`]); readers and writers use both
//! through the same calls. How connections are opened and admitted over
//! TLS is in [`super::security`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postcopy_core::wire::{self, Preamble, PREAMBLE_LEN};
use postcopy_core::Channel;
use postcopy_secure::{ChannelError, Identity, SecureChannel, Wait};

/// What carries a connection's bytes.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP (`--insecure`): nothing is authenticated.
    Plain(TcpStream),
    /// Mutual TLS 1.3 with our own record layer (one reader, many writers).
    Tls(Box<SecureChannel>),
}

impl Transport {
    /// The socket (for socket options).
    pub fn socket(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(c) => c.socket(),
        }
    }

    /// Writes all of `bytes` (over TLS: encrypted, each call's bytes
    /// together).
    pub fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::Plain(s) => (&*s).write_all(bytes),
            Self::Tls(c) => c.write_all(bytes).map_err(io::Error::from),
        }
    }

    /// Reads exactly `out.len()` bytes within `timeout` (the handshake's
    /// preamble and proofs); the socket is blocking again after.
    pub fn read_exact_within(&self, out: &mut [u8], timeout: Duration) -> io::Result<()> {
        let socket = self.socket();
        socket.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let result = match self {
            Self::Plain(s) => (&*s).read_exact(out),
            Self::Tls(c) => {
                let mut got = 0;
                let mut result = Ok(());
                while got < out.len() {
                    match c.recv(&mut out[got..], Wait::Block) {
                        Ok(0) => {
                            result = Err(io::ErrorKind::UnexpectedEof.into());
                            break;
                        }
                        Ok(n) => got += n,
                        Err(e) => {
                            result = Err(io::Error::from(e));
                            break;
                        }
                    }
                }
                result
            }
        };
        let _ = socket.set_read_timeout(None);
        result
    }

    /// The identities the peer's certificate names (none over plain TCP).
    pub fn peer_identities(&self) -> &[Identity] {
        match self {
            Self::Plain(_) => &[],
            Self::Tls(c) => c.peer_identities(),
        }
    }
}

/// One accepted or opened connection.
#[derive(Debug)]
pub struct Connection {
    /// Unique in the process: tells a replaced connection from its successor.
    pub id: u64,
    /// Which channel it carries.
    pub channel: Channel,
    /// The socket, or the TLS channel over it.
    transport: Transport,
    /// Where it goes (or comes from).
    pub peer: Option<SocketAddr>,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Wraps a connected plain socket (Nagle off: requests and pages must
    /// not wait).
    pub fn new(channel: Channel, stream: TcpStream) -> Self {
        Self::over(channel, Transport::Plain(stream))
    }

    /// Wraps a connected socket or an established TLS channel.
    pub fn over(channel: Channel, transport: Transport) -> Self {
        let _ = transport.socket().set_nodelay(true);
        let peer = transport.socket().peer_addr().ok();
        Self { id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed), channel, transport, peer }
    }

    /// The socket (for socket options; reading or writing it directly would
    /// corrupt a TLS channel).
    pub fn socket(&self) -> &TcpStream {
        self.transport.socket()
    }

    /// Bounds each write (None: unbounded).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) {
        let _ = self.socket().set_write_timeout(timeout);
    }

    /// Whether the connection is TLS.
    pub fn is_secure(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// The identities the peer's certificate names (none over plain TCP).
    pub fn peer_identities(&self) -> &[Identity] {
        self.transport.peer_identities()
    }

    /// Ends the connection both ways (unblocks its reader and writer).
    pub fn shutdown(&self) {
        let _ = self.socket().shutdown(Shutdown::Both);
    }

    /// Writes all of `bytes`.
    pub fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        self.transport.write_all(bytes)
    }

    /// Receives at most `max` bytes into `buf`, spinning (non-blocking
    /// receives) for up to `spin` before blocking. Ok(0): the peer closed.
    pub fn recv(&self, buf: &mut BytesMut, max: usize, spin: Duration) -> io::Result<usize> {
        match &self.transport {
            Transport::Plain(stream) => recv_plain(stream, buf, max, spin),
            Transport::Tls(channel) => recv_tls(channel, buf, max, spin),
        }
    }
}

/// The plaintext receive: straight into `buf`'s spare capacity.
fn recv_plain(stream: &TcpStream, buf: &mut BytesMut, max: usize, spin: Duration) -> io::Result<usize> {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        loop {
            match crate::sys::recv_into(stream, buf, max, true) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= until {
                        break;
                    }
                    std::hint::spin_loop();
                }
                other => return other,
            }
        }
    }
    crate::sys::recv_into(stream, buf, max, false)
}

/// The TLS receive: whole records decrypted in the channel's buffer, then
/// appended to `buf` (one copy; nothing to zero first). Spins as the plain
/// receive does: a non-blocking receive returns at once when no whole
/// record is there.
fn recv_tls(channel: &SecureChannel, buf: &mut BytesMut, max: usize, spin: Duration) -> io::Result<usize> {
    buf.reserve(max);
    let mut append = |piece: &[u8]| buf.extend_from_slice(piece);
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        loop {
            match channel.recv_with(max, Wait::NoWait, &mut append) {
                Err(ChannelError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= until {
                        break;
                    }
                    std::hint::spin_loop();
                }
                other => return other.map_err(io::Error::from),
            }
        }
    }
    channel.recv_with(max, Wait::Block, &mut append).map_err(io::Error::from)
}

/// Receives from `conn` (at most `max` bytes at a time, spinning `spin`
/// before each blocking receive) and hands every piece to `on_bytes`, until
/// the connection closes or fails (`on_closed` runs) or `on_bytes` returns
/// false (the connection was replaced: its successor's reader carries on).
pub fn read_until_closed(
    conn: &Connection,
    max: usize,
    spin: Duration,
    mut on_bytes: impl FnMut(Bytes) -> bool,
    on_closed: impl FnOnce(),
) {
    let mut buf = BytesMut::with_capacity(max);
    loop {
        match conn.recv(&mut buf, max, spin) {
            Ok(0) | Err(_) => {
                on_closed();
                return;
            }
            Ok(_) => {
                if !on_bytes(buf.split().freeze()) {
                    return;
                }
            }
        }
    }
}

/// The preamble naming `channel`.
pub fn preamble(channel: Channel) -> Vec<u8> {
    let mut preamble = Vec::with_capacity(PREAMBLE_LEN);
    wire::encode_preamble(&mut preamble, channel);
    preamble
}

/// Why an accepted connection did not name its channel.
#[derive(Debug, thiserror::Error)]
pub enum PreambleReadError {
    /// The peer closed first.
    #[error("closed before its preamble")]
    Closed,
    /// Nothing (or not all of it) came in time.
    #[error("no preamble within {timeout_ms} ms")]
    TimedOut {
        /// The bound.
        timeout_ms: u128,
    },
    /// The read failed.
    #[error("reading its preamble")]
    Read(#[source] io::Error),
    /// The bytes are not a preamble.
    #[error("bad preamble")]
    Decode(#[source] wire::PreambleError),
}

/// Reads an accepted connection's preamble within `timeout`.
pub fn read_preamble(transport: &Transport, timeout: Duration) -> Result<Channel, PreambleReadError> {
    let mut bytes = [0u8; PREAMBLE_LEN];
    match transport.read_exact_within(&mut bytes, timeout) {
        Ok(()) => Preamble::decode(&bytes).map(|p| p.channel).map_err(PreambleReadError::Decode),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(PreambleReadError::Closed),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(PreambleReadError::TimedOut { timeout_ms: timeout.as_millis() })
        }
        Err(e) => Err(PreambleReadError::Read(e)),
    }
}

/// Locks `m`, spinning on `try_lock` for up to `spin` first: a holder on the
/// other CPU releases within microseconds, and sleeping on the lock would
/// cost a cross-CPU wake-up (about 30 us here).
pub fn lock_spin<T>(m: &Mutex<T>, spin: Duration) -> MutexGuard<'_, T> {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        loop {
            match m.try_lock() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    if Instant::now() >= until {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
        }
    }
    m.lock().unwrap_or_else(|e| e.into_inner())
}
