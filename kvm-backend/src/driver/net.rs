//! Connections: one TCP connection per channel, opened by the source, which
//! first writes the 8-byte preamble naming the channel.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use postcopy_core::wire::{self, Preamble, PREAMBLE_LEN};
use postcopy_core::Channel;

/// One accepted or opened connection.
#[derive(Debug)]
pub struct Connection {
    /// Unique in the process: tells a replaced connection from its successor.
    pub id: u64,
    /// Which channel it carries.
    pub channel: Channel,
    /// The socket.
    pub stream: TcpStream,
    /// Where it goes (or comes from).
    pub peer: Option<SocketAddr>,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

impl Connection {
    /// Wraps a connected socket (Nagle off: requests and pages must not wait).
    pub fn new(channel: Channel, stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        Self { id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed), channel, stream, peer }
    }

    /// Ends the connection both ways (unblocks its reader and writer).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Writes all of `bytes`.
    pub fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        (&self.stream).write_all(bytes)
    }

    /// Receives at most `max` bytes into `buf`, spinning (non-blocking
    /// receives) for up to `spin` before blocking. Ok(0): the peer closed.
    pub fn recv(&self, buf: &mut BytesMut, max: usize, spin: Duration) -> io::Result<usize> {
        if !spin.is_zero() {
            let until = Instant::now() + spin;
            loop {
                match crate::sys::recv_into(&self.stream, buf, max, true) {
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
        crate::sys::recv_into(&self.stream, buf, max, false)
    }
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

/// Opens a connection for `channel` (with `tuning`'s socket settings) and
/// writes its preamble.
pub fn connect(
    addr: SocketAddr,
    channel: Channel,
    timeout: Duration,
    tuning: &super::placement::Tuning,
) -> io::Result<Connection> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    tuning.tune_socket(&stream, channel);
    let conn = Connection::new(channel, stream);
    let mut preamble = Vec::with_capacity(PREAMBLE_LEN);
    wire::encode_preamble(&mut preamble, channel);
    conn.write_all(&preamble)?;
    Ok(conn)
}

/// Why an accepted connection did not name its channel.
#[derive(Debug, thiserror::Error)]
pub enum PreambleReadError {
    /// The read timeout could not be set.
    #[error("cannot set a read timeout")]
    SetTimeout(#[source] io::Error),
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
pub fn read_preamble(stream: &mut TcpStream, timeout: Duration) -> Result<Channel, PreambleReadError> {
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1)))).map_err(PreambleReadError::SetTimeout)?;
    let mut bytes = [0u8; PREAMBLE_LEN];
    let result = stream.read_exact(&mut bytes);
    let _ = stream.set_read_timeout(None);
    match result {
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
