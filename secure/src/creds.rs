//! Credentials: a CA and host certificates made with `rcgen` for a first
//! run (what `postcopy certs --out DIR --name HOST...` writes), and loaders
//! for certificate, key and CA PEM files.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::error::CredentialError;
use crate::identity::Identity;

/// One side's credentials: its certificate chain and key, and the CA
/// certificates it checks its peer against.
#[derive(Debug)]
pub struct Credentials {
    /// Our certificate first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: PrivateKeyDer<'static>,
    /// The CA certificates a peer's chain must lead to.
    pub ca: Vec<CertificateDer<'static>>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key(), ca: self.ca.clone() }
    }
}

impl Credentials {
    /// Loads PEM files: our certificate chain, our key, the CA certificates.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, CredentialError> {
        Ok(Self { chain: load_certificates(cert)?, key: load_key(key)?, ca: load_certificates(ca)? })
    }

    /// Parses PEM text (what [`HostCertificate`] and [`CertificateAuthority`] hold).
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, CredentialError> {
        let what = |name: &str| PathBuf::from(format!("<{name} PEM text>"));
        Ok(Self {
            chain: parse_certificates(cert_pem.as_bytes(), &what("certificate"))?,
            key: parse_key(key_pem.as_bytes(), &what("key"))?,
            ca: parse_certificates(ca_pem.as_bytes(), &what("CA"))?,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CredentialError> {
    fs::read(path).map_err(|source| CredentialError::Io { path: path.to_owned(), source })
}

/// Loads every certificate of a PEM file (at least one).
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    parse_certificates(&read(path)?, path)
}

/// Loads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CredentialError> {
    parse_key(&read(path)?, path)
}

fn parse_certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CredentialError::BadPem { path: path.to_owned(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(CredentialError::NoCertificate { path: path.to_owned() });
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| CredentialError::BadCertificate { what: path.display().to_string(), detail: e.to_string() })?;
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, CredentialError> {
    use rustls_pki_types::pem::Error as PemError;
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        PemError::NoItemsFound => CredentialError::NoKey { path: path.to_owned() },
        e => CredentialError::BadPem { path: path.to_owned(), detail: e.to_string() },
    })
}

/// A validity period for a new certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Start.
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

impl Lifetime {
    /// From an hour ago (tolerates a little clock skew) for `days` days.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { not_before: now - TimeDuration::hours(1), not_after: now + TimeDuration::days(days) }
    }
}

/// A certificate authority that signs host certificates.
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").finish_non_exhaustive()
    }
}

/// A host's certificate and key, in PEM.
#[derive(Clone)]
pub struct HostCertificate {
    /// The identities it names.
    pub identities: Vec<Identity>,
    /// The certificate.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

impl std::fmt::Debug for HostCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCertificate").field("identities", &self.identities).finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA (ECDSA P-256) named `common_name`.
    pub fn new(common_name: &str, lifetime: Lifetime) -> Result<Self, CredentialError> {
        let gen = |source| CredentialError::Generate { name: common_name.to_owned(), source };
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = lifetime.not_before;
        params.not_after = lifetime.not_after;
        let key = KeyPair::generate().map_err(gen)?;
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, key).map_err(gen)? })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Signs a host certificate naming `identities` (the first DNS one is
    /// also its common name), usable as both TLS server and client.
    pub fn issue(&self, identities: &[Identity], lifetime: Lifetime) -> Result<HostCertificate, CredentialError> {
        let label = identities.first().map(|i| i.to_string()).unwrap_or_default();
        let gen = |source| CredentialError::Generate { name: label.clone(), source };
        let mut params = CertificateParams::default();
        for id in identities {
            let san = match id {
                Identity::Dns(n) => SanType::DnsName(n.clone().try_into().map_err(gen)?),
                Identity::Uri(u) => SanType::URI(u.clone().try_into().map_err(gen)?),
            };
            params.subject_alt_names.push(san);
        }
        params.distinguished_name.push(DnType::CommonName, label.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = lifetime.not_before;
        params.not_after = lifetime.not_after;
        let key = KeyPair::generate().map_err(gen)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen)?;
        Ok(HostCertificate { identities: identities.to_vec(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// The files [`write_first_run_credentials`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenCredentials {
    /// The CA certificate (`ca.pem`); the CA key is not kept.
    pub ca_cert: PathBuf,
    /// Per host: its name, certificate (`NAME.pem`) and key (`NAME-key.pem`).
    pub hosts: Vec<(String, PathBuf, PathBuf)>,
}

/// Makes a CA and one certificate per host name (each names the host as a
/// DNS identity; `uri:...` names make URI identities) valid for `days`,
/// and writes them as PEM files into `out_dir` (keys with mode 0600). The
/// CA's key is thrown away: a new host needs a new run (and a new CA).
pub fn write_first_run_credentials(
    out_dir: &Path,
    names: &[String],
    days: i64,
) -> Result<WrittenCredentials, CredentialError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CredentialError::Io { path, source }
    };
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let lifetime = Lifetime::days_from_now(days);
    let ca = CertificateAuthority::new("postcopy migration CA", lifetime)?;
    let ca_cert = out_dir.join("ca.pem");
    write_file(&ca_cert, ca.cert_pem().as_bytes(), 0o644)?;
    let mut hosts = Vec::new();
    for name in names {
        let identity = Identity::parse(name)?;
        let file_stem = match &identity {
            Identity::Dns(n) => n.clone(),
            Identity::Uri(u) => u.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect(),
        };
        let host = ca.issue(&[identity], lifetime)?;
        let cert = out_dir.join(format!("{file_stem}.pem"));
        let key = out_dir.join(format!("{file_stem}-key.pem"));
        write_file(&cert, host.cert_pem.as_bytes(), 0o644)?;
        write_file(&key, host.key_pem.as_bytes(), 0o600)?;
        hosts.push((name.clone(), cert, key));
    }
    Ok(WrittenCredentials { ca_cert, hosts })
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CredentialError> {
    let err = |source| CredentialError::Io { path: path.to_owned(), source };
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("postcopy-secure-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn first_run_files_load_back_with_their_identities() {
        let dir = temp_dir("first-run");
        let names = vec!["src.example".to_owned(), "dst.example".to_owned()];
        let written = write_first_run_credentials(&dir, &names, 30).unwrap();
        assert_eq!(written.hosts.len(), 2);
        for (name, cert, key) in &written.hosts {
            let creds = Credentials::load(cert, key, &written.ca_cert).unwrap();
            assert_eq!(crate::identity::identities_of(&creds.chain[0]).unwrap(), vec![Identity::Dns(name.clone())]);
            let mode = fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loaders_name_the_file_in_each_error() {
        let dir = temp_dir("loaders");
        fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let err = load_certificates(&missing).unwrap_err();
        assert!(matches!(&err, CredentialError::Io { path, .. } if path == &missing));
        assert!(err.to_string().contains("missing.pem"));

        let empty = dir.join("empty.pem");
        fs::write(&empty, "no pem here\n").unwrap();
        assert!(matches!(load_certificates(&empty), Err(CredentialError::NoCertificate { path }) if path == empty));
        assert!(matches!(load_key(&empty), Err(CredentialError::NoKey { path }) if path == empty));

        let broken = dir.join("broken.pem");
        fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").unwrap();
        assert!(matches!(load_certificates(&broken), Err(CredentialError::BadPem { path, .. }) if path == broken));

        // Valid base64 that is not a certificate.
        let not_x509 = dir.join("not-x509.pem");
        fs::write(&not_x509, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let err = load_certificates(&not_x509).unwrap_err();
        assert!(matches!(&err, CredentialError::BadCertificate { what, .. } if what.contains("not-x509.pem")), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
