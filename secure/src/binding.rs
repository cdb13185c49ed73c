//! Binding a one-time migration secret to one TLS session.
//!
//! Both ends derive the same [`ChannelBinding`] from the session with the
//! TLS exporter (RFC 5705/8446 7.5, as RFC 9266's `tls-exporter`); it
//! differs for every connection. A side proves it holds the migration
//! secret by sending `HMAC-SHA256(secret, label || role || binding)`: the
//! proof is worthless on any other connection (another binding) and
//! cannot be reflected back (the role is in it).

use std::fmt;
use std::path::Path;

use aws_lc_rs::hmac;

use crate::error::BindingError;

/// The exporter label (RFC 8446 7.5: unique to this use).
const EXPORTER_LABEL: &[u8] = b"EXPORTER-postcopy-channel-binding";
/// What the HMAC covers first: names the construction and its version.
const PROOF_LABEL: &[u8] = b"postcopy migration-secret proof v1";
/// The shortest secret accepted (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// A value both ends of one TLS session share and no other session has.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelBinding([u8; 32]);

impl ChannelBinding {
    /// Exports the binding of an established connection.
    pub fn export(conn: &rustls::Connection) -> Result<Self, rustls::Error> {
        conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None).map(Self)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not secret (an observer cannot compute it, but it grants nothing);
        // shown short for logs.
        write!(f, "ChannelBinding({:02x}{:02x}{:02x}{:02x}..)", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// Which end proves: the two directions' proofs differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The migration's source (TLS client).
    Source,
    /// The migration's destination (TLS server).
    Destination,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::Source => b"source",
            Self::Destination => b"destination",
        }
    }
}

/// A one-time migration secret handed to both sides by the orchestrator.
pub struct MigrationSecret {
    key: hmac::Key,
}

impl fmt::Debug for MigrationSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MigrationSecret(..)")
    }
}

impl MigrationSecret {
    /// A secret of `bytes` (at least [`MIN_SECRET_BYTES`]).
    pub fn new(bytes: &[u8]) -> Result<Self, BindingError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(BindingError::SecretTooShort { len: bytes.len(), min: MIN_SECRET_BYTES });
        }
        Ok(Self { key: hmac::Key::new(hmac::HMAC_SHA256, bytes) })
    }

    /// Reads a secret file (for `--migration-secret FILE`); its bytes are
    /// the secret, trailing white space (a newline) dropped.
    pub fn load(path: &Path) -> Result<Self, BindingError> {
        let mut bytes = std::fs::read(path).map_err(|source| BindingError::Io { path: path.to_owned(), source })?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        Self::new(&bytes)
    }

    /// `role`'s proof of this secret on the connection with `binding`.
    pub fn proof(&self, binding: &ChannelBinding, role: Role) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(PROOF_LABEL);
        ctx.update(role.tag());
        ctx.update(&binding.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Checks the peer's (`role`'s) proof on the connection with `binding`,
    /// in constant time.
    pub fn verify(&self, binding: &ChannelBinding, role: Role, proof: &[u8]) -> Result<(), BindingError> {
        let mut msg = Vec::with_capacity(PROOF_LABEL.len() + 16 + 32);
        msg.extend_from_slice(PROOF_LABEL);
        msg.extend_from_slice(role.tag());
        msg.extend_from_slice(&binding.0);
        hmac::verify(&self.key, &msg, proof).map_err(|_| BindingError::ProofMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(byte: u8) -> ChannelBinding {
        ChannelBinding([byte; 32])
    }

    #[test]
    fn proof_verifies_only_for_its_secret_binding_and_role() {
        let secret = MigrationSecret::new(&[7u8; 32]).unwrap();
        let other_secret = MigrationSecret::new(&[8u8; 32]).unwrap();
        let proof = secret.proof(&binding(1), Role::Source);
        secret.verify(&binding(1), Role::Source, &proof).unwrap();
        for (s, b, r) in [
            (&secret, binding(2), Role::Source),
            (&secret, binding(1), Role::Destination),
            (&other_secret, binding(1), Role::Source),
        ] {
            assert!(matches!(s.verify(&b, r, &proof), Err(BindingError::ProofMismatch)));
        }
        let mut flipped = proof;
        flipped[31] ^= 1;
        assert!(matches!(secret.verify(&binding(1), Role::Source, &flipped), Err(BindingError::ProofMismatch)));
        assert!(matches!(secret.verify(&binding(1), Role::Source, &proof[..16]), Err(BindingError::ProofMismatch)));
    }

    #[test]
    fn short_secrets_and_missing_files_are_typed_errors() {
        assert!(matches!(MigrationSecret::new(&[1u8; 31]), Err(BindingError::SecretTooShort { len: 31, min: 32 })));
        let path = std::env::temp_dir().join(format!("postcopy-secret-{}", std::process::id()));
        std::fs::write(&path, format!("{}\n", "k".repeat(40))).unwrap();
        let from_file = MigrationSecret::load(&path).unwrap();
        let direct = MigrationSecret::new("k".repeat(40).as_bytes()).unwrap();
        assert_eq!(from_file.proof(&binding(3), Role::Destination), direct.proof(&binding(3), Role::Destination));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(MigrationSecret::load(&path), Err(BindingError::Io { .. })));
    }
}
