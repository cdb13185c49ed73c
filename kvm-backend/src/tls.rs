//! The command line of secure channels: `--tls-creds DIR`, `--tls-name`,
//! `--tls-hostname`, `--tls-authz`, `--migration-secret`, `--insecure`
//! (on `source`, `dest` and `run`), and `postcopy certs`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use postcopy_kvm::driver::security::{host_name, load_credentials_dir, CredentialsDirError, QemuEnd};
use postcopy_kvm::driver::{ChannelSecurity, TlsSettings};
use postcopy_secure::creds::write_first_run_credentials;
use postcopy_secure::MigrationSecret;
use postcopy_secure::{Allowlist, BindingError, CredentialError, HandshakeLimits, Identity, IdentityError};

/// How this process secures its migrations' connections.
#[derive(Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// Mutual TLS 1.3 on every connection, with the credentials in DIR (what
    /// `postcopy certs` writes): ca.pem (the CA a peer must chain to),
    /// NAME.pem and NAME-key.pem (this host's certificate and key); or
    /// QEMU's layout: ca-cert.pem, server-cert.pem and server-key.pem (a
    /// destination), client-cert.pem and client-key.pem (a source).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Which certificate of --tls-creds is this host's: NAME.pem and
    /// NAME-key.pem (default: the only key in DIR).
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_name: Option<String>,
    /// The name the source checks in the destination's certificate
    /// (default: the host of --connect, when it is a name).
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_hostname: Option<String>,
    /// Identities accepted from the peer (DNS names, `dns:NAME` or
    /// `uri:URI`, as its certificate's subject alternative names), like
    /// QEMU's tls-authz. Required on a destination; a source defaults to
    /// --tls-hostname.
    #[arg(long, value_name = "NAME", num_args = 1.., requires = "tls_creds")]
    pub tls_authz: Vec<String>,
    /// A one-time secret (at least 32 bytes) both sides were given: every
    /// connection proves it, bound to its TLS session.
    #[arg(long, value_name = "FILE", requires = "tls_creds")]
    pub migration_secret: Option<PathBuf>,
    /// Plain TCP: no authentication, no encryption. Anyone who reaches the
    /// port can read the guest's memory and try to talk to the destination.
    #[arg(long, conflicts_with = "tls_creds")]
    pub insecure: bool,
}

/// Bad security settings.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// The credentials directory cannot be used.
    #[error("--tls-creds")]
    CredentialsDir(#[from] CredentialsDirError),
    /// The TLS configuration cannot be built from the credentials.
    #[error("TLS credentials")]
    Credentials(#[source] CredentialError),
    /// An identity of --tls-authz or --tls-hostname is malformed.
    #[error("TLS identity")]
    Identity(#[source] IdentityError),
    /// The migration secret cannot be used.
    #[error("--migration-secret")]
    Secret(#[source] BindingError),
    /// A destination needs to know whom to accept.
    #[error("--tls-creds needs --tls-authz NAME... (the identities of the peers to accept) on a destination")]
    NoAllowlist,
    /// A source needs a name to check in the destination's certificate.
    #[error("--tls-creds needs --tls-hostname NAME (the name in the destination's certificate): {0} is not a name")]
    NoHostname(String),
}

/// What a process does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    /// Connects to a destination at this address (`host:port`).
    Source {
        /// The address as given.
        connect: &'a str,
    },
    /// Accepts a source.
    Destination,
    /// Either (a `run` process).
    Either,
}

impl SecurityArgs {
    /// The channel security these arguments ask for, for `role`, with
    /// handshakes bounded by `handshake_timeout` at most.
    pub fn security(&self, role: Role<'_>, handshake_timeout: Duration) -> Result<ChannelSecurity, SecurityError> {
        let Some(dir) = &self.tls_creds else {
            if self.insecure {
                eprintln!(
                    "postcopy: --insecure: migration connections are plain TCP, neither authenticated nor encrypted"
                );
            } else {
                eprintln!(
                    "postcopy: WARNING: no --tls-creds: migration connections are plain TCP, neither authenticated \
                     nor encrypted (give --tls-creds DIR, or --insecure to say you mean it)"
                );
            }
            return Ok(ChannelSecurity::Plain);
        };
        let end = if matches!(role, Role::Source { .. }) { QemuEnd::Client } else { QemuEnd::Server };
        let creds = load_credentials_dir(dir, self.tls_name.as_deref(), end)?;
        let hostname = match (&self.tls_hostname, role) {
            (Some(h), _) => Some(h.clone()),
            (None, Role::Source { connect }) => {
                Some(host_name(connect).ok_or_else(|| SecurityError::NoHostname(connect.to_string()))?)
            }
            (None, _) => None,
        };
        if let Some(h) = &hostname {
            Identity::parse(h).map_err(SecurityError::Identity)?;
        }
        let allowed = if !self.tls_authz.is_empty() {
            Allowlist::parse(&self.tls_authz).map_err(SecurityError::Identity)?
        } else {
            match (role, &hostname) {
                (Role::Source { .. } | Role::Either, Some(h)) => {
                    Allowlist::parse([h]).map_err(SecurityError::Identity)?
                }
                _ => return Err(SecurityError::NoAllowlist),
            }
        };
        let secret = match &self.migration_secret {
            Some(path) => Some(MigrationSecret::load(path).map_err(SecurityError::Secret)?),
            None => None,
        };
        let defaults = HandshakeLimits::default();
        let limits = HandshakeLimits { timeout: defaults.timeout.min(handshake_timeout), ..defaults };
        let tls = TlsSettings::new(&creds, allowed, hostname, secret, limits).map_err(SecurityError::Credentials)?;
        Ok(ChannelSecurity::Tls(Arc::new(tls)))
    }

    /// These settings as arguments for a child process.
    pub fn forward(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(dir) = &self.tls_creds {
            out.push(format!("--tls-creds={}", dir.display()));
        }
        if let Some(name) = &self.tls_name {
            out.push(format!("--tls-name={name}"));
        }
        if let Some(name) = &self.tls_hostname {
            out.push(format!("--tls-hostname={name}"));
        }
        for name in &self.tls_authz {
            out.push(format!("--tls-authz={name}"));
        }
        if let Some(path) = &self.migration_secret {
            out.push(format!("--migration-secret={}", path.display()));
        }
        if self.insecure {
            out.push("--insecure".into());
        }
        out
    }
}

/// `postcopy certs`: a CA and host certificates for a first run.
#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Write the files here (created if needed): ca.pem, and NAME.pem and
    /// NAME-key.pem for each --name.
    #[arg(long)]
    pub out: PathBuf,
    /// Host names (each its certificate's DNS identity; `uri:URI` for a URI
    /// identity).
    #[arg(long, num_args = 1.., required = true)]
    pub name: Vec<String>,
    /// How long the certificates are valid, in days.
    #[arg(long, default_value_t = 365)]
    pub days: i64,
}

/// `postcopy certs`.
pub fn certs(a: CertsArgs) -> Result<ExitCode, CredentialError> {
    let written = write_first_run_credentials(&a.out, &a.name, a.days)?;
    println!("CA certificate: {} (its key was not kept)", written.ca_cert.display());
    for (name, cert, key) in &written.hosts {
        println!("{name}: {} and {}", cert.display(), key.display());
    }
    println!(
        "use: postcopy dest --tls-creds {dir} --tls-name DST --tls-authz SRC ...; \
         postcopy source --tls-creds {dir} --tls-name SRC --tls-hostname DST ...",
        dir = a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The names the demo and the bench give their two sides.
pub const DEMO_SOURCE: &str = "source.postcopy.test";
/// See [`DEMO_SOURCE`].
pub const DEMO_DESTINATION: &str = "destination.postcopy.test";

/// Credentials for a demo or bench pair, in a fresh directory: the
/// arguments of each side.
pub struct PairCredentials {
    /// The directory (removed on drop).
    pub dir: PathBuf,
}

impl PairCredentials {
    /// Makes a CA and one certificate per side in a temporary directory.
    pub fn new(tag: &str) -> Result<Self, CredentialError> {
        let dir = std::env::temp_dir().join(format!("postcopy-{tag}-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_first_run_credentials(&dir, &[DEMO_SOURCE.to_string(), DEMO_DESTINATION.to_string()], 1)?;
        Ok(Self { dir })
    }

    /// The source's arguments.
    pub fn source(&self) -> SecurityArgs {
        SecurityArgs {
            tls_creds: Some(self.dir.clone()),
            tls_name: Some(DEMO_SOURCE.into()),
            tls_hostname: Some(DEMO_DESTINATION.into()),
            tls_authz: vec![DEMO_DESTINATION.into()],
            ..SecurityArgs::default()
        }
    }

    /// The destination's arguments.
    pub fn destination(&self) -> SecurityArgs {
        SecurityArgs {
            tls_creds: Some(self.dir.clone()),
            tls_name: Some(DEMO_DESTINATION.into()),
            tls_authz: vec![DEMO_SOURCE.into()],
            ..SecurityArgs::default()
        }
    }
}

impl Drop for PairCredentials {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_credentials_give_each_side_a_working_tls_configuration() {
        let pair = PairCredentials::new("unit").unwrap();
        let timeout = Duration::from_secs(1);
        let source = pair.source().security(Role::Source { connect: "127.0.0.1:1" }, timeout).unwrap();
        assert!(matches!(&source, ChannelSecurity::Tls(t) if t.server_name() == Some(DEMO_DESTINATION)));
        let destination = pair.destination().security(Role::Destination, timeout).unwrap();
        assert!(matches!(destination, ChannelSecurity::Tls(_)));
        // Two keys in the directory: a side must say which is its own.
        let ambiguous = SecurityArgs { tls_name: None, ..pair.destination() };
        assert!(matches!(
            ambiguous.security(Role::Destination, timeout),
            Err(SecurityError::CredentialsDir(CredentialsDirError::WhichCertificate { .. }))
        ));
        let no_allowlist = SecurityArgs { tls_authz: vec![], ..pair.destination() };
        assert!(matches!(no_allowlist.security(Role::Destination, timeout), Err(SecurityError::NoAllowlist)));
        let no_hostname = SecurityArgs { tls_hostname: None, ..pair.source() };
        assert!(matches!(
            no_hostname.security(Role::Source { connect: "127.0.0.1:1" }, timeout),
            Err(SecurityError::NoHostname(_))
        ));
    }
}
