//! rustls configurations for both ends: TLS 1.3 only, AES-256-GCM first,
//! no session resumption, peer chains checked against our CA and peer
//! identities against our allowlist.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::creds::Credentials;
use crate::error::CredentialError;
use crate::identity::{identities_of, Allowlist, Identity, Validity};

/// The provider: aws-lc-rs (AES-GCM with AES-NI/VAES, X25519), held to
/// the suites with 32-byte keys, AES-256-GCM first: the split record layer
/// derives the keys of a key update itself, and rustls lets only 32-byte
/// keys be built outside it. (Measured on this machine's VAES AVX-512,
/// AES-256-GCM costs the same CPU per GiB as AES-128-GCM.)
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Runs once what a handshake runs (random numbers, a key exchange, a
/// signature with our key), so that the provider's one-time set-up (its
/// random generator's seeding, its self-checks: tens of milliseconds on a
/// busy machine) happens now, not in the first connection's handshake.
pub fn warm_up(creds: &Credentials) -> Result<(), rustls::Error> {
    let p = provider();
    let mut random = [0u8; 32];
    p.secure_random.fill(&mut random)?;
    if let Some(group) = p.kx_groups.first() {
        let ours = group.start()?;
        let theirs = group.start()?;
        let _ = ours.complete(theirs.pub_key())?;
    }
    let key = p.key_provider.load_private_key(creds.key.clone_key())?;
    let schemes = [SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::ED25519, SignatureScheme::RSA_PSS_SHA256];
    if let Some(signer) = key.choose_scheme(&schemes) {
        signer.sign(b"warm-up")?;
    }
    Ok(())
}

/// The certificate error an allowlist refusal carries inside rustls, so the
/// handshake can report the identities presented.
#[derive(Debug, thiserror::Error)]
#[error("identities {presented:?} are not in the allowlist")]
pub struct NotInAllowlist {
    /// The identities the refused certificate names.
    pub presented: Vec<Identity>,
}

fn check_allowlist(allow: &Allowlist, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let presented =
        identities_of(end_entity).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    if allow.permits(&presented) {
        Ok(())
    } else {
        tracing::warn!(?presented, "refusing a peer: its certificate's identities are not in the allowlist");
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NotInAllowlist {
            presented,
        })))))
    }
}

/// Checks a server's chain and name with webpki, then its identity against
/// an allowlist.
#[derive(Debug)]
struct AllowlistServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    allow: Allowlist,
}

impl ServerCertVerifier for AllowlistServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        check_allowlist(&self.allow, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a client's chain with webpki (a certificate is mandatory), then
/// its identity against an allowlist.
#[derive(Debug)]
struct AllowlistClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: Allowlist,
}

impl ClientCertVerifier for AllowlistClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_allowlist(&self.allow, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn roots(creds: &Credentials) -> Result<Arc<RootCertStore>, CredentialError> {
    let mut roots = RootCertStore::empty();
    for (i, ca) in creds.ca.iter().enumerate() {
        roots.add(ca.clone()).map_err(|e| CredentialError::BadCertificate {
            what: format!("CA certificate {}", i + 1),
            detail: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn own_validity(creds: &Credentials) -> Result<Validity, CredentialError> {
    let leaf = creds.chain.first().ok_or_else(|| CredentialError::BadCertificate {
        what: "own certificate".into(),
        detail: "the chain is empty".into(),
    })?;
    Validity::of(leaf)
        .map_err(|e| CredentialError::BadCertificate { what: "own certificate".into(), detail: e.to_string() })
}

/// The destination's side (the TLS server): accepts clients whose chain
/// leads to its CA and whose identity is in its allowlist.
#[derive(Clone)]
pub struct ServerSide {
    /// The rustls configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// Our certificate's validity (to explain a peer's refusal of it).
    pub own_validity: Validity,
}

impl ServerSide {
    /// Builds the server configuration from `creds`, accepting client
    /// identities in `allow`.
    pub fn new(creds: &Credentials, allow: Allowlist) -> Result<Self, CredentialError> {
        Self::with_provider(creds, allow, provider())
    }

    /// As [`ServerSide::new`] with another crypto provider (to compare).
    pub fn with_provider(
        creds: &Credentials,
        allow: Allowlist,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, CredentialError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots(creds)?, provider.clone())
            .build()
            .map_err(|e| CredentialError::BadCertificate { what: "CA certificates".into(), detail: e.to_string() })?;
        let verifier = Arc::new(AllowlistClientVerifier { inner, allow });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(CredentialError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(creds.chain.clone(), creds.key.clone_key())
            .map_err(CredentialError::Config)?;
        // Every connection authenticates in full: no tickets, no resumption.
        config.send_tls13_tickets = 0;
        // The record layer runs outside rustls once the handshake is done.
        config.enable_secret_extraction = true;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self { config: Arc::new(config), own_validity: own_validity(creds)? })
    }
}

/// The source's side (the TLS client): accepts a server whose chain leads
/// to its CA, whose certificate names the host dialled and whose identity
/// is in its allowlist.
#[derive(Clone)]
pub struct ClientSide {
    /// The rustls configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// Our certificate's validity (to explain a peer's refusal of it).
    pub own_validity: Validity,
}

impl ClientSide {
    /// Builds the client configuration from `creds`, accepting server
    /// identities in `allow`.
    pub fn new(creds: &Credentials, allow: Allowlist) -> Result<Self, CredentialError> {
        Self::with_provider(creds, allow, provider())
    }

    /// As [`ClientSide::new`] with another crypto provider (to compare).
    pub fn with_provider(
        creds: &Credentials,
        allow: Allowlist,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, CredentialError> {
        let inner = WebPkiServerVerifier::builder_with_provider(roots(creds)?, provider.clone())
            .build()
            .map_err(|e| CredentialError::BadCertificate { what: "CA certificates".into(), detail: e.to_string() })?;
        let verifier = Arc::new(AllowlistServerVerifier { inner, allow });
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(CredentialError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
            .map_err(CredentialError::Config)?;
        config.resumption = rustls::client::Resumption::disabled();
        config.enable_secret_extraction = true;
        Ok(Self { config: Arc::new(config), own_validity: own_validity(creds)? })
    }
}
