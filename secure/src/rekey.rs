//! TLS 1.3 key updates for the split record layer (RFC 8446 4.6.3, 7.2):
//! the next application traffic secret, and the key and IV derived from a
//! secret, with the suite's own HKDF. The first traffic secrets come from
//! rustls through a per-connection key log ([`TrafficSecrets`]).

use std::sync::{Arc, Mutex};

use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::crypto::tls13::OkmBlock;
use rustls::Tls13CipherSuite;
use zeroize::{Zeroize, Zeroizing};

/// A traffic secret (wiped when dropped).
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    #[cfg(test)]
    pub(crate) fn new(bytes: &[u8]) -> Self {
        Self(Zeroizing::new(bytes.to_vec()))
    }
}

/// HKDF-Expand-Label(secret, label, "", out.len()) (RFC 8446 7.1).
fn expand_label(suite: &Tls13CipherSuite, secret: &Secret, label: &[u8], out: &mut [u8]) -> Result<(), rustls::Error> {
    let expander = suite.hkdf_provider.expander_for_okm(&OkmBlock::new(&secret.0));
    let length = u16::try_from(out.len()).map_err(|_| rustls::Error::General("HKDF output too long".into()))?;
    let label_len = [u8::try_from(6 + label.len()).map_err(|_| rustls::Error::General("label too long".into()))?];
    let info: [&[u8]; 5] = [&length.to_be_bytes(), &label_len, b"tls13 ", label, &[0]];
    expander.expand_slice(&info, out).map_err(|_| rustls::Error::General("HKDF output too long".into()))
}

/// The next generation's secret: HKDF-Expand-Label(secret, "traffic upd").
pub(crate) fn next_secret(suite: &Tls13CipherSuite, secret: &Secret) -> Result<Secret, rustls::Error> {
    let mut next = Zeroizing::new(vec![0u8; secret.0.len()]);
    expand_label(suite, secret, b"traffic upd", &mut next)?;
    Ok(Secret(next))
}

/// The record key and IV of a traffic secret. Only 32-byte keys can be
/// built outside rustls, so the suites used are AES-256-GCM and
/// ChaCha20-Poly1305.
pub(crate) fn key_and_iv(suite: &Tls13CipherSuite, secret: &Secret) -> Result<(AeadKey, Iv), rustls::Error> {
    if suite.aead_alg.key_len() != 32 {
        return Err(rustls::Error::General("key updates need a suite with 32-byte keys".into()));
    }
    let mut key = [0u8; 32];
    expand_label(suite, secret, b"key", &mut key)?;
    let mut iv = [0u8; 12];
    expand_label(suite, secret, b"iv", &mut iv)?;
    let aead_key = AeadKey::from(key);
    key.zeroize();
    Ok((aead_key, Iv::from(iv)))
}

/// Keeps one connection's first application traffic secrets as rustls
/// derives them (rustls hands them to a key log, and to nothing else).
#[derive(Debug, Default, Clone)]
pub struct TrafficSecrets {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    client: Option<Zeroizing<Vec<u8>>>,
    server: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Captured(..)")
    }
}

impl rustls::KeyLog for TrafficSecrets {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match label {
            "CLIENT_TRAFFIC_SECRET_0" => c.client = Some(Zeroizing::new(secret.to_vec())),
            "SERVER_TRAFFIC_SECRET_0" => c.server = Some(Zeroizing::new(secret.to_vec())),
            _ => {}
        }
    }
}

impl TrafficSecrets {
    /// Takes (client's, server's) secrets.
    pub(crate) fn take(&self) -> Option<(Secret, Secret)> {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match (c.client.take(), c.server.take()) {
            (Some(client), Some(server)) => Some((Secret(client), Secret(server))),
            _ => None,
        }
    }
}
