//! Typed errors: credentials files, handshakes (one variant per refusal
//! reason, on both sides), established channels and migration binding.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::{Identity, IdentityError};

/// Reading, parsing or writing certificate and key files.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// A file holds no PEM certificate.
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A file holds no PEM private key.
    #[error("{}: no PEM private key in the file", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A file's PEM is malformed.
    #[error("{}: malformed PEM: {detail}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// The parser's words.
        detail: String,
    },
    /// A certificate could not be parsed as X.509 (or is not usable as a CA).
    #[error("{what}: not a usable certificate: {detail}")]
    BadCertificate {
        /// Which certificate (a file name or "own certificate").
        what: String,
        /// The parser's words.
        detail: String,
    },
    /// The certificate and key do not fit together or rustls refused them.
    #[error("building the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// Making a certificate failed.
    #[error("making a certificate for {name}: {source}")]
    Generate {
        /// The certificate's name.
        name: String,
        /// rcgen's words.
        source: rcgen::Error,
    },
    /// An identity given on the command line is malformed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Why a handshake did not give a channel, with the peer it was with.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with {peer}: {refusal}")]
pub struct HandshakeError {
    /// The peer's address (or "unknown" when the socket had none).
    pub peer: PeerAddr,
    /// What went wrong.
    pub refusal: Refusal,
}

/// A peer's address for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub Option<SocketAddr>);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("an unknown address"),
        }
    }
}

/// Every reason a handshake fails. The `Peer*` variants are found on this
/// side (checking the peer's certificate); the `Our*` variants are what the
/// peer refused of ours, learned from its alert, so each failure has a
/// distinct variant on both sides.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The peer's certificate has expired.
    #[error("the peer's certificate has expired")]
    PeerCertificateExpired,
    /// The peer's certificate is not valid yet.
    #[error("the peer's certificate is not valid yet")]
    PeerCertificateNotYetValid,
    /// The peer's certificate is not signed by our CA.
    #[error("the peer's certificate is not signed by our CA")]
    PeerCertificateUnknownCa,
    /// The peer's certificate does not name the host we dialled.
    #[error("the peer's certificate is not valid for the name we dialled")]
    PeerCertificateWrongName,
    /// The peer's certificate is valid but its identity is not allowed.
    #[error("the peer's identities {presented:?} are not in our allowlist")]
    PeerNotAllowed {
        /// The identities its certificate names.
        presented: Vec<Identity>,
    },
    /// The peer (a client) sent no certificate.
    #[error("the peer sent no certificate")]
    PeerPresentedNoCertificate,
    /// The peer refused our certificate as expired (our clock agrees).
    #[error("the peer refused our certificate: it has expired")]
    OurCertificateExpired,
    /// The peer refused our certificate as not valid yet (our clock agrees).
    #[error("the peer refused our certificate: it is not valid yet")]
    OurCertificateNotYetValid,
    /// The peer refused our certificate's validity period though our clock
    /// finds it valid: the clocks disagree.
    #[error("the peer refused our certificate's validity period, which our clock finds valid (clock skew?)")]
    OurCertificateValidityDisputed,
    /// The peer does not trust the CA that signed our certificate.
    #[error("the peer does not trust our CA")]
    OurCaNotTrusted,
    /// The peer refused our certificate's name (it dialled another name).
    #[error("the peer refused our certificate's name")]
    OurNameRejected,
    /// The peer's allowlist does not include our identity.
    #[error("the peer's allowlist does not include our identity")]
    OurIdentityNotAllowed,
    /// The peer (a server) requires a client certificate and we sent none.
    #[error("the peer requires a client certificate and we sent none")]
    OurCertificateRequired,
    /// The peer's bytes are not TLS (garbage, a plain-TCP preamble).
    #[error("the peer did not speak TLS: {0}")]
    NotTls(#[source] rustls::Error),
    /// The peer sent a fatal alert not listed above.
    #[error("the peer sent the alert {0:?}")]
    PeerAlert(rustls::AlertDescription),
    /// Any other TLS failure.
    #[error("TLS: {0}")]
    Tls(#[source] rustls::Error),
    /// The handshake took longer than its limit.
    #[error("no handshake within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// Too many connections are in their handshake already.
    #[error("{0} connections are in their handshake already")]
    TooManyHandshakes(usize),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[source] io::Error),
}

/// A failure on an established channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The peer's records are bad or it sent a fatal alert.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The peer closed the TCP connection without a TLS close_notify: the
    /// stream may have been cut short by an attacker.
    #[error("the connection closed without a TLS close_notify")]
    Truncated,
    /// The connection's keys protected as many records as their cipher
    /// allows (AES-GCM: 2^24.5). A guard: key updates come long before.
    #[error("the traffic keys reached their limit of {records} records; reconnect")]
    KeyLimit {
        /// Records protected with them.
        records: u64,
    },
}

impl From<ChannelError> for io::Error {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Io(e) => e,
            ChannelError::Truncated => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            ChannelError::Tls(_) | ChannelError::KeyLimit { .. } => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// Migration secrets and their proofs.
#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    /// The secret file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The secret is too short to be a secret.
    #[error("the migration secret has {len} bytes; at least {min} are needed")]
    SecretTooShort {
        /// Its length.
        len: usize,
        /// The least accepted.
        min: usize,
    },
    /// The peer's proof does not match: another secret or another connection.
    #[error("the peer's migration-secret proof does not match this connection")]
    ProofMismatch,
}
