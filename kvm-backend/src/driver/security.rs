//! How a migration's connections are opened and admitted: plain TCP
//! (`--insecure`), or mutual TLS 1.3 ([`postcopy_secure`]) on every channel
//! and every reconnection, optionally with a one-time migration secret
//! proved on each connection (bound to its TLS session by the exporter).
//!
//! The source ([`connect`]): TCP connect, TLS handshake (the destination's
//! certificate must chain to our CA, name `--tls-hostname` and be in our
//! allowlist), then the preamble and, with a secret, our proof; then it
//! reads and checks the destination's proof.
//!
//! The destination ([`Acceptor::accept`]): each accepted socket takes a
//! slot of the [`HandshakeGate`] (a bound on connections before they
//! authenticate, and on their time), the TLS handshake (the source's chain
//! and identity against the allowlist), the preamble and the proof within
//! the same deadline. Then the driver binds the migration to the TLS
//! identity of the source whose main hello the core accepted
//! ([`SourceIdentity`]) and refuses every connection from another identity;
//! the return channel, which carries no frame from the source, waits for
//! that binding before the core hears of it.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use postcopy_core::Channel;
use postcopy_secure::{
    Allowlist, BindingError, ClientSide, CredentialError, Credentials, HandshakeError, HandshakeGate, HandshakeLimits,
    Identity, MigrationSecret, Refusal, Role, ServerSide,
};

use super::net::{self, Connection, PreambleReadError, Transport};
use super::placement::Tuning;
use crate::devices::lock;

/// The bytes of a migration-secret proof.
const PROOF_LEN: usize = 32;

/// A credentials directory that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsDirError {
    /// The directory cannot be listed.
    #[error("{}", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No key in it, or several and no name to choose one.
    #[error("{}: {detail}", dir.display())]
    WhichCertificate {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

/// Which end of a QEMU-style credentials directory to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuEnd {
    /// `client-cert.pem` and `client-key.pem` (a source).
    Client,
    /// `server-cert.pem` and `server-key.pem` (a destination).
    Server,
}

/// Loads a credentials directory: ours (`ca.pem`, `NAME.pem` and
/// `NAME-key.pem`, as `postcopy certs` writes it; `name` chooses among
/// several, default the only key), or, when it holds `ca-cert.pem` and no
/// `name` is given, QEMU's layout (`ca-cert.pem`, and `server-cert.pem` /
/// `server-key.pem` or `client-cert.pem` / `client-key.pem` by `end`).
pub fn load_credentials_dir(dir: &Path, name: Option<&str>, end: QemuEnd) -> Result<Credentials, CredentialsDirError> {
    if name.is_none() && dir.join("ca-cert.pem").exists() {
        let prefix = match end {
            QemuEnd::Client => "client",
            QemuEnd::Server => "server",
        };
        return Ok(Credentials::load(
            &dir.join(format!("{prefix}-cert.pem")),
            &dir.join(format!("{prefix}-key.pem")),
            &dir.join("ca-cert.pem"),
        )?);
    }
    let name = match name {
        Some(name) => name.to_string(),
        None => {
            let entries =
                std::fs::read_dir(dir).map_err(|source| CredentialsDirError::ReadDir { dir: dir.into(), source })?;
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|f| f.strip_suffix("-key.pem")).map(str::to_string))
                .collect();
            names.sort();
            match names.as_slice() {
                [one] => one.clone(),
                [] => {
                    let detail = "no NAME-key.pem (nor QEMU's ca-cert.pem) in it".into();
                    return Err(CredentialsDirError::WhichCertificate { dir: dir.into(), detail });
                }
                many => {
                    let detail = format!("several keys ({}): choose one with --tls-name", many.join(", "));
                    return Err(CredentialsDirError::WhichCertificate { dir: dir.into(), detail });
                }
            }
        }
    };
    Ok(Credentials::load(&dir.join(format!("{name}.pem")), &dir.join(format!("{name}-key.pem")), &dir.join("ca.pem"))?)
}

/// The host part of `host:port` or `tcp:host:port` (brackets of an IPv6
/// address removed), when it is a name rather than an address: the name
/// a source checks in the destination's certificate by default.
pub fn host_name(addr: &str) -> Option<String> {
    let addr = addr.strip_prefix("tcp:").unwrap_or(addr);
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host.parse::<std::net::IpAddr>().is_err() && !host.is_empty()).then(|| host.to_string())
}

/// TLS settings of a process: its credentials for both ends, the
/// identities it accepts from a peer, the name it checks in a
/// destination's certificate, the migration secret and the handshake bounds.
pub struct TlsSettings {
    client: ClientSide,
    server: ServerSide,
    allowed: Allowlist,
    server_name: Option<String>,
    secret: Option<Arc<MigrationSecret>>,
    limits: HandshakeLimits,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("allowed", &self.allowed.entries())
            .field("server_name", &self.server_name)
            .field("secret", &self.secret.is_some())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Settings from `creds`, accepting peers whose certificate names one
    /// of `allowed`; a source checks that the destination's certificate
    /// names `server_name`.
    pub fn new(
        creds: &Credentials,
        allowed: Allowlist,
        server_name: Option<String>,
        secret: Option<MigrationSecret>,
        limits: HandshakeLimits,
    ) -> Result<Self, CredentialError> {
        let t0 = Instant::now();
        if let Err(e) = postcopy_secure::config::warm_up(creds) {
            tracing::warn!(%e, "warming up the TLS provider");
        }
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "TLS provider warmed up");
        Ok(Self {
            client: ClientSide::new(creds, allowed.clone())?,
            server: ServerSide::new(creds, allowed.clone())?,
            allowed,
            server_name,
            secret: secret.map(Arc::new),
            limits,
        })
    }

    /// The same settings checking `server_name` in a destination's
    /// certificate (a `run` process migrating to a host named later).
    pub fn with_server_name(&self, server_name: Option<String>) -> Self {
        Self {
            client: self.client.clone(),
            server: self.server.clone(),
            allowed: self.allowed.clone(),
            server_name,
            secret: self.secret.clone(),
            limits: self.limits,
        }
    }

    /// The name checked in a destination's certificate.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Whether a migration secret is proved on every connection.
    pub fn has_secret(&self) -> bool {
        self.secret.is_some()
    }
}

/// How a migration's connections are protected.
#[derive(Clone, Debug, Default)]
pub enum ChannelSecurity {
    /// Plain TCP: anyone who reaches the port can talk to the destination
    /// (strangers are refused by the core, but nothing is authenticated or
    /// encrypted). Only with `--insecure`.
    #[default]
    Plain,
    /// Mutual TLS on every connection.
    Tls(Arc<TlsSettings>),
}

impl ChannelSecurity {
    /// "TLS" or "plain TCP", for messages.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Plain => "plain TCP (insecure)",
            Self::Tls(t) if t.has_secret() => "mutual TLS 1.3 with a migration secret",
            Self::Tls(_) => "mutual TLS 1.3",
        }
    }
}

/// Why the source could not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection failed (refused: nothing listens there).
    #[error("cannot connect to {addr}")]
    Tcp {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No name to check the destination's certificate against.
    #[error("no TLS hostname to check the destination's certificate against (give --tls-hostname)")]
    NoServerName,
    /// The TLS handshake failed: the refusal says which side refused what.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// Writing the preamble (and proof) failed.
    #[error("sending the preamble")]
    Preamble(#[source] io::Error),
    /// The destination's migration-secret proof did not come.
    #[error("reading the destination's migration-secret proof (does it have the migration secret?)")]
    ProofRead(#[source] io::Error),
    /// The destination's migration-secret proof is wrong.
    #[error("the destination's migration-secret proof")]
    Proof(#[source] BindingError),
}

impl ConnectError {
    /// Nothing listens at the destination's address.
    pub fn is_refused(&self) -> bool {
        matches!(self, Self::Tcp { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused)
    }
}

/// Opens a connection for `channel` (with `tuning`'s socket settings),
/// secured as `security` says, and writes its preamble.
pub fn connect(
    addr: SocketAddr,
    channel: Channel,
    timeout: Duration,
    tuning: &Tuning,
    security: &ChannelSecurity,
) -> Result<Connection, ConnectError> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|source| ConnectError::Tcp { addr, source })?;
    tuning.tune_socket(&stream, channel);
    let _ = stream.set_nodelay(true);
    let mut first = net::preamble(channel);
    let (transport, secret) = match security {
        ChannelSecurity::Plain => (Transport::Plain(stream), None),
        ChannelSecurity::Tls(tls) => {
            let name = tls.server_name.as_deref().ok_or(ConnectError::NoServerName)?;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let channel = postcopy_secure::connect(stream, &tls.client, name, left)?;
            if let Some(secret) = &tls.secret {
                first.extend_from_slice(&secret.proof(channel.binding(), Role::Source));
            }
            (Transport::Tls(Box::new(channel)), tls.secret.as_ref())
        }
    };
    transport.write_all(&first).map_err(ConnectError::Preamble)?;
    if let (Some(secret), Transport::Tls(tls)) = (secret, &transport) {
        let mut proof = [0u8; PROOF_LEN];
        let left = deadline.saturating_duration_since(Instant::now());
        transport.read_exact_within(&mut proof, left).map_err(ConnectError::ProofRead)?;
        secret.verify(tls.binding(), Role::Destination, &proof).map_err(ConnectError::Proof)?;
    }
    Ok(Connection::over(channel, transport))
}

/// Why the destination refused a connection before its core heard of it.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The TLS handshake failed, or too many are under way.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// No valid preamble came.
    #[error("its preamble")]
    Preamble(#[source] PreambleReadError),
    /// Its migration-secret proof did not come.
    #[error("reading its migration-secret proof")]
    ProofRead(#[source] io::Error),
    /// Its migration-secret proof is wrong: another secret, or a proof
    /// made for another connection.
    #[error("its migration-secret proof")]
    Proof(#[source] BindingError),
    /// Our proof could not be sent.
    #[error("sending our migration-secret proof")]
    ProofWrite(#[source] io::Error),
    /// Its certificate is valid and allowed, but another identity than
    /// that of the source this migration is bound to.
    #[error("its certificate names {presented}, not this migration's source ({bound})")]
    OtherIdentity {
        /// What it presented.
        presented: Identities,
        /// The migration's source.
        bound: Identities,
    },
    /// A return connection waited for the main hello that binds the
    /// migration to a source, and none came.
    #[error("no source showed its hello within {} ms (a return connection waits for it)", .0.as_millis())]
    Unbound(Duration),
}

/// Identities, shown as a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities(pub Vec<Identity>);

impl std::fmt::Display for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no identity");
        }
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// Accepts connections on the destination: the handshake gate, TLS, the
/// preamble and the migration-secret proof.
pub struct Acceptor {
    security: ChannelSecurity,
    gate: HandshakeGate,
    /// Bound on the plain preamble (the core's handshake timeout).
    plain_timeout: Duration,
}

impl Acceptor {
    /// An acceptor for `security`; plain connections get `plain_timeout`
    /// for their preamble.
    pub fn new(security: ChannelSecurity, plain_timeout: Duration) -> Self {
        let limits = match &security {
            ChannelSecurity::Tls(tls) => tls.limits,
            ChannelSecurity::Plain => HandshakeLimits { timeout: plain_timeout, ..HandshakeLimits::default() },
        };
        Self { security, gate: HandshakeGate::new(limits), plain_timeout }
    }

    /// Whether connections are TLS (and identities are checked).
    pub fn is_secure(&self) -> bool {
        matches!(self.security, ChannelSecurity::Tls(_))
    }

    /// Takes an accepted socket through the gate, the handshake, its
    /// preamble and proof: the channel it names and its transport.
    pub fn accept(&self, stream: TcpStream, peer: SocketAddr) -> Result<(Channel, Transport), AdmissionError> {
        let refused = |refusal| HandshakeError { peer: postcopy_secure::error::PeerAddr(Some(peer)), refusal };
        // Held until the connection showed its preamble (and proof).
        let slot = self.gate.try_enter().map_err(refused)?;
        let deadline = Instant::now() + slot.timeout();
        let _ = stream.set_nonblocking(false);
        // The handshake's flights go out in several writes: with Nagle on,
        // each waits for the peer's delayed ACK (40 ms).
        let _ = stream.set_nodelay(true);
        let transport = match &self.security {
            ChannelSecurity::Plain => Transport::Plain(stream),
            ChannelSecurity::Tls(tls) => {
                Transport::Tls(Box::new(postcopy_secure::accept(stream, &tls.server, slot.timeout())?))
            }
        };
        let left = |floor: Duration| deadline.saturating_duration_since(Instant::now()).max(floor);
        let preamble_time = match &self.security {
            ChannelSecurity::Plain => self.plain_timeout,
            ChannelSecurity::Tls(_) => left(Duration::from_millis(1)),
        };
        let channel = net::read_preamble(&transport, preamble_time).map_err(AdmissionError::Preamble)?;
        if let (ChannelSecurity::Tls(tls), Transport::Tls(channel)) = (&self.security, &transport) {
            if let Some(secret) = &tls.secret {
                let mut proof = [0u8; PROOF_LEN];
                transport
                    .read_exact_within(&mut proof, left(Duration::from_millis(1)))
                    .map_err(AdmissionError::ProofRead)?;
                secret.verify(channel.binding(), Role::Source, &proof).map_err(AdmissionError::Proof)?;
                let ours = secret.proof(channel.binding(), Role::Destination);
                transport.write_all(&ours).map_err(AdmissionError::ProofWrite)?;
            }
        }
        drop(slot);
        Ok((channel, transport))
    }
}

/// The TLS identity of the source a migration is bound to: set once, by
/// the connection whose main hello the core accepted.
#[derive(Debug, Default)]
pub struct SourceIdentity {
    bound: Mutex<Option<Vec<Identity>>>,
    is_bound: AtomicBool,
    changed: Condvar,
}

fn sorted(ids: &[Identity]) -> Vec<Identity> {
    let mut v = ids.to_vec();
    v.sort_by_key(|i| i.to_string());
    v.dedup();
    v
}

impl SourceIdentity {
    /// Whether a migration is bound (one atomic load).
    pub fn is_bound(&self) -> bool {
        self.is_bound.load(Ordering::Acquire)
    }

    /// Binds the migration to `presented` (the first call wins); wakes the
    /// return connections waiting for it.
    pub fn bind(&self, presented: &[Identity]) {
        let mut bound = lock(&self.bound);
        if bound.is_none() {
            tracing::info!(source = %Identities(presented.to_vec()), "the migration is bound to its source's identity");
            *bound = Some(sorted(presented));
            self.is_bound.store(true, Ordering::Release);
            self.changed.notify_all();
        }
    }

    /// Refuses `presented` if a migration is bound to another identity.
    pub fn check(&self, presented: &[Identity]) -> Result<(), AdmissionError> {
        match lock(&self.bound).as_ref() {
            Some(bound) if *bound != sorted(presented) => Err(AdmissionError::OtherIdentity {
                presented: Identities(presented.to_vec()),
                bound: Identities(bound.clone()),
            }),
            _ => Ok(()),
        }
    }

    /// Whether `presented` is the bound identity (false before binding).
    pub fn matches(&self, presented: &[Identity]) -> bool {
        lock(&self.bound).as_ref().is_some_and(|bound| *bound == sorted(presented))
    }

    /// Waits up to `timeout` for a binding (or until `stop` says so);
    /// whether there is one.
    pub fn wait_bound(&self, timeout: Duration, stop: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut bound = lock(&self.bound);
        while bound.is_none() && !stop() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let step = left.min(Duration::from_millis(50));
            bound = self.changed.wait_timeout(bound, step).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
        bound.is_some()
    }
}

/// The refusal inside an admission error, if it was the TLS handshake's.
pub fn handshake_refusal(e: &AdmissionError) -> Option<&Refusal> {
    match e {
        AdmissionError::Handshake(h) => Some(&h.refusal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> Identity {
        Identity::Dns(name.into())
    }

    #[test]
    fn host_names_come_from_addresses_that_are_names() {
        assert_eq!(host_name("dst.example:4444").as_deref(), Some("dst.example"));
        assert_eq!(host_name("tcp:dst.example:4444").as_deref(), Some("dst.example"));
        assert_eq!(host_name("127.0.0.1:4444"), None);
        assert_eq!(host_name("tcp:[::1]:4444"), None);
    }

    #[test]
    fn credentials_directories_of_both_layouts_load() {
        let dir = std::env::temp_dir().join(format!("postcopy-creds-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written =
            postcopy_secure::creds::write_first_run_credentials(&dir, &["a.test".into(), "b.test".into()], 1).unwrap();
        assert!(matches!(
            load_credentials_dir(&dir, None, QemuEnd::Server),
            Err(CredentialsDirError::WhichCertificate { .. })
        ));
        load_credentials_dir(&dir, Some("b.test"), QemuEnd::Server).unwrap();
        // QEMU's names for the same files.
        let (_, cert, key) = &written.hosts[0];
        std::fs::copy(&written.ca_cert, dir.join("ca-cert.pem")).unwrap();
        std::fs::copy(cert, dir.join("server-cert.pem")).unwrap();
        std::fs::copy(key, dir.join("server-key.pem")).unwrap();
        let creds = load_credentials_dir(&dir, None, QemuEnd::Server).unwrap();
        assert_eq!(postcopy_secure::identity::identities_of(&creds.chain[0]).unwrap(), [id("a.test")]);
        assert!(matches!(
            load_credentials_dir(&dir, None, QemuEnd::Client),
            Err(CredentialsDirError::Credentials(CredentialError::Io { .. }))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_first_binding_wins_and_other_identities_are_refused() {
        let identity = SourceIdentity::default();
        assert!(!identity.is_bound());
        identity.check(&[id("anyone")]).expect("nothing bound: the core judges");
        identity.bind(&[id("src"), id("alias")]);
        identity.bind(&[id("intruder")]);
        assert!(identity.is_bound());
        identity.check(&[id("alias"), id("src")]).expect("the same identities in another order");
        assert!(identity.matches(&[id("src"), id("alias")]));
        let e = identity.check(&[id("intruder")]).unwrap_err();
        assert!(matches!(&e, AdmissionError::OtherIdentity { presented, .. } if presented.0 == [id("intruder")]));
        assert!(e.to_string().contains("dns:intruder") && e.to_string().contains("dns:src"), "{e}");
        assert!(identity.check(&[id("src")]).is_err(), "a subset is another identity");
    }

    #[test]
    fn a_waiting_return_connection_wakes_on_binding_or_gives_up() {
        let identity = Arc::new(SourceIdentity::default());
        assert!(!identity.wait_bound(Duration::from_millis(20), || false));
        let binder = {
            let identity = identity.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                identity.bind(&[id("src")]);
            })
        };
        let t0 = Instant::now();
        assert!(identity.wait_bound(Duration::from_secs(10), || false));
        assert!(t0.elapsed() < Duration::from_secs(5));
        binder.join().unwrap();
        let unbound = SourceIdentity::default();
        assert!(!unbound.wait_bound(Duration::from_secs(10), || true), "a stopping driver stops waiting");
    }
}
