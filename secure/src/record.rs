//! The TLS 1.3 record layer after the handshake, split in two halves that
//! share nothing but the socket: the send half (its own key and sequence
//! number) and the receive half (likewise). This is what kernel TLS offload
//! does in the kernel; here it runs in the calling thread, with the
//! record protection itself done by rustls's provider (aws-lc-rs), so the
//! socket stays a plain fd that a reader and writers use at once.
//!
//! Each record is protected by rustls's `MessageEncrypter` and
//! `MessageDecrypter` for the negotiated suite, built from the session's
//! extracted keys; this module frames records (RFC 8446 5.1-5.2), counts
//! sequence numbers, handles alerts and runs key updates (4.6.3): the send
//! half moves to the next traffic secret every `update_every` records
//! (well inside AES-GCM's 2^24.5-record limit), and the receive half
//! follows the peer's updates.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::{AlertDescription, ConnectionTrafficSecrets, ContentType, ProtocolVersion, Tls13CipherSuite};

use crate::error::ChannelError;
use crate::rekey::{self, Secret};

/// The largest plaintext of one record (RFC 8446 5.1).
pub const MAX_FRAGMENT: usize = 16 * 1024;
/// The largest ciphertext of one record (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
const HEADER: usize = 5;
/// Records encrypted before one vectored send.
const RECORDS_PER_SEND: usize = 64;
/// The receive buffer: several records per receive call.
const RX_BUFFER: usize = 256 * 1024;
/// Records sent under one key before a key update (2^23: 128 GiB of full
/// records, a third of AES-GCM's limit).
pub const DEFAULT_UPDATE_EVERY: u64 = 1 << 23;
/// A KeyUpdate handshake message's type (RFC 8446 4).
const KEY_UPDATE: u8 = 24;

/// The generation-0 key and IV: rustls's extracted ones, checked against
/// those derived from the captured traffic secret (so later generations,
/// derived the same way, are right too).
fn first_key(
    suite: &Tls13CipherSuite,
    extracted: ConnectionTrafficSecrets,
    secret: &Secret,
) -> Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv), ChannelError> {
    let (key, iv) = match extracted {
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (key, iv)
        }
        _ => {
            return Err(ChannelError::Tls(rustls::Error::General("a suite without key updates was negotiated".into())))
        }
    };
    let (derived_key, derived_iv) = rekey::key_and_iv(suite, secret)?;
    if derived_key.as_ref() != key.as_ref() || derived_iv.as_ref() != iv.as_ref() {
        return Err(ChannelError::Tls(rustls::Error::General(
            "the captured traffic secret does not give the session's keys".into(),
        )));
    }
    Ok((key, iv))
}

/// The sending half.
pub struct SendHalf {
    suite: &'static Tls13CipherSuite,
    encrypter: Box<dyn MessageEncrypter>,
    secret: Secret,
    seq: u64,
    limit: u64,
    update_every: u64,
    /// Set by the receive half when the peer asked for our key update.
    update_requested: Arc<AtomicBool>,
    closed: bool,
}

impl SendHalf {
    pub(crate) fn new(
        suite: &'static Tls13CipherSuite,
        seq: u64,
        extracted: ConnectionTrafficSecrets,
        secret: Secret,
        update_requested: Arc<AtomicBool>,
    ) -> Result<Self, ChannelError> {
        let (key, iv) = first_key(suite, extracted, &secret)?;
        Ok(Self {
            suite,
            encrypter: suite.aead_alg.encrypter(key, iv),
            secret,
            seq,
            limit: suite.common.confidentiality_limit,
            update_every: DEFAULT_UPDATE_EVERY,
            update_requested,
            closed: false,
        })
    }

    /// Sets the records sent under one key (at least 1, capped below the
    /// suite's confidentiality limit).
    pub fn set_update_every(&mut self, records: u64) {
        self.update_every = records.clamp(1, self.limit.saturating_sub(1).max(1));
    }

    fn seal(&mut self, typ: ContentType, fragment: &[u8]) -> Result<Vec<u8>, ChannelError> {
        if self.seq >= self.limit {
            return Err(ChannelError::KeyLimit { records: self.seq });
        }
        let msg =
            OutboundPlainMessage { typ, version: ProtocolVersion::TLSv1_2, payload: OutboundChunks::Single(fragment) };
        let sealed = self.encrypter.encrypt(msg, self.seq)?;
        self.seq += 1;
        Ok(sealed.encode())
    }

    /// Appends a KeyUpdate record to `records` and moves to the next key,
    /// when due or asked for.
    fn update_key_if_due(&mut self, records: &mut Vec<Vec<u8>>) -> Result<(), ChannelError> {
        let asked = self.update_requested.swap(false, Ordering::AcqRel);
        if !asked && self.seq < self.update_every {
            return Ok(());
        }
        // update_not_requested: the peer's sending keys are its own affair.
        records.push(self.seal(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0])?);
        let next = rekey::next_secret(self.suite, &self.secret)?;
        let (key, iv) = rekey::key_and_iv(self.suite, &next)?;
        self.encrypter = self.suite.aead_alg.encrypter(key, iv);
        self.secret = next;
        self.seq = 0;
        Ok(())
    }

    /// Encrypts `bytes` into records and sends them.
    pub fn write_all(&mut self, stream: &TcpStream, bytes: &[u8]) -> Result<(), ChannelError> {
        if self.closed {
            return Err(ChannelError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "the channel was closed")));
        }
        let mut records = Vec::with_capacity(RECORDS_PER_SEND + 1);
        for batch in bytes.chunks(MAX_FRAGMENT * RECORDS_PER_SEND) {
            records.clear();
            for fragment in batch.chunks(MAX_FRAGMENT) {
                self.update_key_if_due(&mut records)?;
                records.push(self.seal(ContentType::ApplicationData, fragment)?);
            }
            send_all(stream, &records)?;
        }
        Ok(())
    }

    /// Sends a close_notify alert; nothing more can be sent.
    pub fn close(&mut self, stream: &TcpStream) -> Result<(), ChannelError> {
        if self.closed {
            return Ok(());
        }
        let mut records = Vec::with_capacity(2);
        self.update_key_if_due(&mut records)?;
        records.push(self.seal(ContentType::Alert, &[1, AlertDescription::CloseNotify.into()])?);
        self.closed = true;
        send_all(stream, &records)
    }
}

/// Sends every record, in order, with vectored writes.
fn send_all(stream: &TcpStream, records: &[Vec<u8>]) -> Result<(), ChannelError> {
    let mut slices: Vec<IoSlice<'_>> = records.iter().map(|r| IoSlice::new(r)).collect();
    let mut rest = &mut slices[..];
    let mut s = stream;
    while !rest.is_empty() {
        match s.write_vectored(rest) {
            Ok(0) => return Err(ChannelError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether a receive may block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until data, end of stream or an error.
    Block,
    /// Return `WouldBlock` (as `ChannelError::Io`) when nothing is there.
    NoWait,
}

/// The receiving half.
pub struct RecvHalf {
    suite: &'static Tls13CipherSuite,
    decrypter: Box<dyn MessageDecrypter>,
    secret: Secret,
    /// Tells the send half the peer asked for its key update.
    update_requested: Arc<AtomicBool>,
    seq: u64,
    limit: u64,
    buf: Vec<u8>,
    /// Received bytes not yet decrypted: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Decrypted bytes not yet delivered: `buf[plain_start..plain_end]`.
    plain_start: usize,
    plain_end: usize,
    closed: bool,
}

impl RecvHalf {
    pub(crate) fn new(
        suite: &'static Tls13CipherSuite,
        seq: u64,
        extracted: ConnectionTrafficSecrets,
        secret: Secret,
        update_requested: Arc<AtomicBool>,
    ) -> Result<Self, ChannelError> {
        let (key, iv) = first_key(suite, extracted, &secret)?;
        Ok(Self {
            suite,
            decrypter: suite.aead_alg.decrypter(key, iv),
            secret,
            update_requested,
            seq,
            limit: suite.common.confidentiality_limit,
            buf: vec![0; RX_BUFFER],
            start: 0,
            end: 0,
            plain_start: 0,
            plain_end: 0,
            closed: false,
        })
    }

    /// Follows the peer's KeyUpdate (its record holds exactly that message).
    fn follow_key_update(&mut self, message: &[u8]) -> Result<(), ChannelError> {
        let requested = match message {
            [KEY_UPDATE, 0, 0, 1, r @ (0 | 1)] => *r == 1,
            _ => {
                return Err(ChannelError::Tls(rustls::Error::General(format!(
                    "unexpected handshake message after the handshake ({} bytes, type {:?})",
                    message.len(),
                    message.first()
                ))))
            }
        };
        let next = rekey::next_secret(self.suite, &self.secret)?;
        let (key, iv) = rekey::key_and_iv(self.suite, &next)?;
        self.decrypter = self.suite.aead_alg.decrypter(key, iv);
        self.secret = next;
        self.seq = 0;
        if requested {
            self.update_requested.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Receives decrypted bytes into `out`: Ok(n > 0), or Ok(0) once the
    /// peer sent close_notify. A close without it is `Truncated`.
    pub fn recv(&mut self, stream: &TcpStream, out: &mut [u8], wait: Wait) -> Result<usize, ChannelError> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut filled = 0;
        loop {
            // Deliver decrypted bytes, then decrypt whole records already here.
            let n = (self.plain_end - self.plain_start).min(out.len() - filled);
            out[filled..filled + n].copy_from_slice(&self.buf[self.plain_start..self.plain_start + n]);
            self.plain_start += n;
            filled += n;
            if filled == out.len() {
                return Ok(filled);
            }
            if self.open_next_record()? {
                continue;
            }
            if filled > 0 {
                return Ok(filled);
            }
            if self.closed {
                return Ok(0);
            }
            self.receive_more(stream, wait)?;
        }
    }

    /// As [`RecvHalf::recv`], but hands the decrypted bytes (at most `max`,
    /// in one or more slices) to `deliver` instead of copying them into a
    /// buffer the caller must initialise first: the caller appends them
    /// where it wants them, with one copy.
    pub fn recv_with(
        &mut self,
        stream: &TcpStream,
        max: usize,
        wait: Wait,
        mut deliver: impl FnMut(&[u8]),
    ) -> Result<usize, ChannelError> {
        if max == 0 {
            return Ok(0);
        }
        let mut delivered = 0;
        loop {
            let n = (self.plain_end - self.plain_start).min(max - delivered);
            if n > 0 {
                deliver(&self.buf[self.plain_start..self.plain_start + n]);
                self.plain_start += n;
                delivered += n;
            }
            if delivered == max {
                return Ok(delivered);
            }
            if self.open_next_record()? {
                continue;
            }
            if delivered > 0 {
                return Ok(delivered);
            }
            if self.closed {
                return Ok(0);
            }
            self.receive_more(stream, wait)?;
        }
    }

    /// Decrypts the next whole record in the buffer, if there is one.
    fn open_next_record(&mut self) -> Result<bool, ChannelError> {
        if self.closed || self.end - self.start < HEADER {
            return Ok(false);
        }
        let head = &self.buf[self.start..self.start + HEADER];
        let outer = head[0];
        let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
        if outer != u8::from(ContentType::ApplicationData) || len > MAX_CIPHERTEXT {
            return Err(ChannelError::Tls(rustls::Error::General(format!(
                "bad record header (type {outer}, {len} bytes)"
            ))));
        }
        if self.end - self.start < HEADER + len {
            return Ok(false);
        }
        if self.seq >= self.limit {
            return Err(ChannelError::KeyLimit { records: self.seq });
        }
        let body_start = self.start + HEADER;
        self.start = body_start + len;
        let base = self.buf.as_ptr() as usize;
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut self.buf[body_start..body_start + len],
        );
        let plain = self.decrypter.decrypt(msg, self.seq)?;
        self.seq += 1;
        let (typ, offset, plain_len) = (plain.typ, plain.payload.as_ptr() as usize - base, plain.payload.len());
        match typ {
            ContentType::ApplicationData => {
                self.plain_start = offset;
                self.plain_end = offset + plain_len;
                Ok(true)
            }
            ContentType::Alert => {
                let alert = &self.buf[offset..offset + plain_len];
                match alert {
                    [_, 0] => {
                        self.closed = true;
                        Ok(false)
                    }
                    [_, desc] => Err(ChannelError::Tls(rustls::Error::AlertReceived(AlertDescription::from(*desc)))),
                    _ => Err(ChannelError::Tls(rustls::Error::General("malformed alert".into()))),
                }
            }
            ContentType::Handshake => {
                let message = self.buf[offset..offset + plain_len].to_vec();
                self.follow_key_update(&message)?;
                Ok(true)
            }
            other => Err(ChannelError::Tls(rustls::Error::General(format!(
                "unexpected {other:?} record after the handshake"
            )))),
        }
    }

    /// Receives more bytes from the socket (the buffer's plaintext has all
    /// been delivered, so the undecrypted rest can move to the front).
    fn receive_more(&mut self, stream: &TcpStream, wait: Wait) -> Result<(), ChannelError> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            self.plain_start = 0;
            self.plain_end = 0;
        }
        let flags = match wait {
            Wait::Block => rustix::net::RecvFlags::empty(),
            Wait::NoWait => rustix::net::RecvFlags::DONTWAIT,
        };
        let received = loop {
            match rustix::net::recv(stream, &mut self.buf[self.end..], flags) {
                Ok((n, _)) => break n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
        };
        if received == 0 {
            return Err(ChannelError::Truncated);
        }
        self.end += received;
        Ok(())
    }
}

/// Feeds rustls one record at a time during the handshake, so no byte past
/// the last handshake record is taken from the socket (what follows belongs
/// to [`RecvHalf`] once the keys are extracted).
pub(crate) struct RecordAtATime<'a> {
    pub(crate) stream: &'a TcpStream,
    header: [u8; HEADER],
    header_len: usize,
    body_left: usize,
}

impl<'a> RecordAtATime<'a> {
    pub(crate) fn new(stream: &'a TcpStream) -> Self {
        Self { stream, header: [0; HEADER], header_len: 0, body_left: 0 }
    }
}

impl Read for RecordAtATime<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.stream;
        if self.header_len < HEADER {
            let want = (HEADER - self.header_len).min(buf.len());
            let n = s.read(&mut buf[..want])?;
            self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
            self.header_len += n;
            if self.header_len == HEADER {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                if self.body_left == 0 {
                    self.header_len = 0;
                }
            }
            return Ok(n);
        }
        let want = self.body_left.min(buf.len());
        let n = s.read(&mut buf[..want])?;
        self.body_left -= n;
        if self.body_left == 0 {
            self.header_len = 0;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    use rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384;

    use super::*;

    fn suite() -> &'static Tls13CipherSuite {
        TLS13_AES_256_GCM_SHA384.tls13().unwrap()
    }

    fn secret() -> Secret {
        Secret::new(&[5u8; 48])
    }

    /// The extracted form of `secret()`'s keys.
    fn extracted() -> ConnectionTrafficSecrets {
        let (key, iv) = rekey::key_and_iv(suite(), &secret()).unwrap();
        ConnectionTrafficSecrets::Aes256Gcm { key, iv }
    }

    /// A loopback pair: (sending socket, receiving socket).
    fn sockets() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        (tx, rx)
    }

    fn halves() -> (SendHalf, RecvHalf) {
        let flag = Arc::new(AtomicBool::new(false));
        (
            SendHalf::new(suite(), 0, extracted(), secret(), flag.clone()).unwrap(),
            RecvHalf::new(suite(), 0, extracted(), secret(), flag).unwrap(),
        )
    }

    fn recv_exactly(rx: &mut RecvHalf, sock: &TcpStream, len: usize) -> Result<Vec<u8>, ChannelError> {
        let mut out = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match rx.recv(sock, &mut out[got..], Wait::Block)? {
                0 => return Err(ChannelError::Truncated),
                n => got += n,
            }
        }
        Ok(out)
    }

    #[test]
    fn halves_carry_bytes_across_record_and_buffer_boundaries() {
        let (tx_sock, rx_sock) = sockets();
        let (mut tx, mut rx) = halves();
        let data: Vec<u8> = (0..3 * RX_BUFFER + 12_345).map(|i| (i % 241) as u8).collect();
        let sender = std::thread::spawn(move || {
            tx.write_all(&tx_sock, &data[..1]).unwrap();
            tx.write_all(&tx_sock, &data[1..]).unwrap();
            tx.close(&tx_sock).unwrap();
            data
        });
        let got = recv_exactly(&mut rx, &rx_sock, 3 * RX_BUFFER + 12_345).unwrap();
        let data = sender.join().unwrap();
        assert_eq!(got, data);
        let mut tail = [0u8; 8];
        assert_eq!(rx.recv(&rx_sock, &mut tail, Wait::Block).unwrap(), 0, "close_notify");
    }

    #[test]
    fn recv_with_delivers_the_same_bytes_in_bounded_pieces() {
        let (tx_sock, rx_sock) = sockets();
        let (mut tx, mut rx) = halves();
        let data: Vec<u8> = (0..5 * MAX_FRAGMENT + 99).map(|i| (i % 233) as u8).collect();
        let sender = std::thread::spawn(move || {
            tx.write_all(&tx_sock, &data).unwrap();
            tx.close(&tx_sock).unwrap();
            data
        });
        let mut got = Vec::new();
        loop {
            let before = got.len();
            let n = rx.recv_with(&rx_sock, 10_000, Wait::Block, |piece| got.extend_from_slice(piece)).unwrap();
            assert_eq!(got.len() - before, n);
            assert!(n <= 10_000, "{n} bytes in one call");
            if n == 0 {
                break;
            }
        }
        assert_eq!(got, sender.join().unwrap());
    }

    #[test]
    fn a_flipped_bit_fails_authentication() {
        let (mut tx_sock, rx_sock) = sockets();
        let (mut tx, mut rx) = halves();
        let mut record = tx.seal(ContentType::ApplicationData, b"a page of guest memory").unwrap();
        record[HEADER + 3] ^= 0x10;
        tx_sock.write_all(&record).unwrap();
        let err = recv_exactly(&mut rx, &rx_sock, 1).unwrap_err();
        assert!(matches!(err, ChannelError::Tls(rustls::Error::DecryptError)), "{err:?}");
    }

    #[test]
    fn a_replayed_or_reordered_record_fails_authentication() {
        let (mut tx_sock, rx_sock) = sockets();
        let (mut tx, mut rx) = halves();
        let first = tx.seal(ContentType::ApplicationData, b"first").unwrap();
        let second = tx.seal(ContentType::ApplicationData, b"second").unwrap();
        // In order, then the first again: the replay is refused.
        tx_sock.write_all(&first).unwrap();
        tx_sock.write_all(&second).unwrap();
        tx_sock.write_all(&first).unwrap();
        assert_eq!(recv_exactly(&mut rx, &rx_sock, 11).unwrap(), b"firstsecond");
        assert!(matches!(recv_exactly(&mut rx, &rx_sock, 1), Err(ChannelError::Tls(rustls::Error::DecryptError))));
        // Out of order from the start: refused too.
        let (mut tx_sock, rx_sock) = sockets();
        let (_, mut rx) = halves();
        tx_sock.write_all(&second).unwrap();
        assert!(matches!(recv_exactly(&mut rx, &rx_sock, 1), Err(ChannelError::Tls(rustls::Error::DecryptError))));
    }

    #[test]
    fn keys_are_updated_every_n_records_and_followed_by_the_receiver() {
        let (tx_sock, rx_sock) = sockets();
        let (mut tx, mut rx) = halves();
        tx.set_update_every(3);
        let data: Vec<u8> = (0..20 * MAX_FRAGMENT + 7).map(|i| (i % 239) as u8).collect();
        let sender = std::thread::spawn(move || {
            tx.write_all(&tx_sock, &data).unwrap();
            (tx, data)
        });
        let got = recv_exactly(&mut rx, &rx_sock, 20 * MAX_FRAGMENT + 7).unwrap();
        let (tx, data) = sender.join().unwrap();
        assert_eq!(got, data);
        // 21 records, a new key every 3: the last key has sealed 3 (or fewer).
        assert!(tx.seq <= 3 && rx.seq == tx.seq, "tx {} rx {}", tx.seq, rx.seq);
    }

    #[test]
    fn a_receiver_that_misses_a_key_update_cannot_read_on() {
        let (mut tx_sock, rx_sock) = sockets();
        let (mut tx, mut rx) = halves();
        tx.set_update_every(1);
        let mut records = Vec::new();
        records.push(tx.seal(ContentType::ApplicationData, b"one").unwrap());
        tx.update_key_if_due(&mut records).unwrap();
        records.push(tx.seal(ContentType::ApplicationData, b"two").unwrap());
        // Drop the KeyUpdate record: the next record is under a key the
        // receiver does not have.
        tx_sock.write_all(&records[0]).unwrap();
        tx_sock.write_all(&records[2]).unwrap();
        assert_eq!(recv_exactly(&mut rx, &rx_sock, 3).unwrap(), b"one");
        assert!(matches!(recv_exactly(&mut rx, &rx_sock, 1), Err(ChannelError::Tls(rustls::Error::DecryptError))));
    }

    #[test]
    fn neither_half_goes_past_the_confidentiality_limit() {
        let (tx_sock, rx_sock) = sockets();
        let (mut tx, mut rx) = halves();
        tx.limit = 3;
        tx.update_every = u64::MAX;
        tx.write_all(&tx_sock, &[1u8; 3 * MAX_FRAGMENT]).unwrap();
        assert!(matches!(tx.write_all(&tx_sock, &[2u8]), Err(ChannelError::KeyLimit { records: 3 })));
        rx.limit = 2;
        assert_eq!(recv_exactly(&mut rx, &rx_sock, 2 * MAX_FRAGMENT).unwrap(), vec![1u8; 2 * MAX_FRAGMENT]);
        assert!(matches!(recv_exactly(&mut rx, &rx_sock, 1), Err(ChannelError::KeyLimit { records: 2 })));
    }

    #[test]
    fn a_record_header_that_is_not_application_data_is_refused() {
        let (mut tx_sock, rx_sock) = sockets();
        let (_, mut rx) = halves();
        // A plaintext alert header (type 21) where only encrypted records may come.
        tx_sock.write_all(&[21, 3, 3, 0, 2, 2, 40]).unwrap();
        assert!(matches!(recv_exactly(&mut rx, &rx_sock, 1), Err(ChannelError::Tls(rustls::Error::General(_)))));
    }
}
