//! Identities named by certificates (SAN DNS names and URIs) and the
//! allowlist of identities a side accepts from its peer (like QEMU's
//! `tls-authz`).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// A malformed identity text, or a certificate whose identities or validity
/// cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// An identity given on the command line is malformed.
    #[error("bad identity {text:?}: {detail}")]
    Malformed {
        /// The text.
        text: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// A certificate does not parse as X.509 (or its SAN extension is bad).
    #[error("cannot parse the certificate: {detail}")]
    Unparsable {
        /// The parser's words.
        detail: String,
    },
}

fn unparsable(e: impl fmt::Display) -> IdentityError {
    IdentityError::Unparsable { detail: e.to_string() }
}

/// One identity a certificate can name in its subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A DNS name, kept in lower case (DNS names compare case-insensitively).
    Dns(String),
    /// A URI (for example `spiffe://cluster/host-a`), compared exactly.
    Uri(String),
}

impl Identity {
    /// Parses `dns:NAME`, `uri:URI`, or a bare name (a DNS name; a bare
    /// text containing `://` is a URI).
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let bad = |detail| IdentityError::Malformed { text: text.to_owned(), detail };
        let (uri, body) = if let Some(rest) = text.strip_prefix("dns:") {
            (false, rest)
        } else if let Some(rest) = text.strip_prefix("uri:") {
            (true, rest)
        } else {
            (text.contains("://"), text)
        };
        if body.is_empty() {
            return Err(bad("empty"));
        }
        if body.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }
        if uri {
            if !body.contains(':') {
                return Err(bad("a URI needs a scheme"));
            }
            Ok(Self::Uri(body.to_owned()))
        } else {
            if !body.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
                return Err(bad("a DNS name has only letters, digits, '-', '.' and '_'"));
            }
            Ok(Self::Dns(body.to_ascii_lowercase()))
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(n) => write!(f, "dns:{n}"),
            Self::Uri(u) => write!(f, "uri:{u}"),
        }
    }
}

/// The identities a side accepts from its peer. A peer passes when its
/// certificate names at least one of them. Empty: nobody passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    entries: Vec<Identity>,
}

impl Allowlist {
    /// An allowlist of `entries`.
    pub fn new(entries: impl IntoIterator<Item = Identity>) -> Self {
        Self { entries: entries.into_iter().collect() }
    }

    /// Parses each text with [`Identity::parse`].
    pub fn parse<S: AsRef<str>>(texts: impl IntoIterator<Item = S>) -> Result<Self, IdentityError> {
        texts.into_iter().map(|t| Identity::parse(t.as_ref())).collect::<Result<Vec<_>, _>>().map(Self::new)
    }

    /// Whether any of `presented` is allowed.
    pub fn permits(&self, presented: &[Identity]) -> bool {
        presented.iter().any(|p| self.entries.contains(p))
    }

    /// The allowed identities.
    pub fn entries(&self) -> &[Identity] {
        &self.entries
    }
}

/// The identities (SAN DNS names and URIs) a certificate names.
pub fn identities_of(cert: &CertificateDer<'_>) -> Result<Vec<Identity>, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(unparsable)?;
    let mut out = Vec::new();
    if let Some(san) = parsed.subject_alternative_name().map_err(unparsable)? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => out.push(Identity::Dns(n.to_ascii_lowercase())),
                GeneralName::URI(u) => out.push(Identity::Uri((*u).to_owned())),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// A certificate's validity period, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before this.
    pub not_before_s: i64,
    /// Not valid after this.
    pub not_after_s: i64,
}

impl Validity {
    /// Reads `cert`'s validity period.
    pub fn of(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(unparsable)?;
        let v = parsed.validity();
        Ok(Self { not_before_s: v.not_before.timestamp(), not_after_s: v.not_after.timestamp() })
    }

    /// Where `now` falls: before, within or after the period.
    pub fn check(&self, now: SystemTime) -> ValidityCheck {
        let now_s = match now.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        };
        if now_s < self.not_before_s {
            ValidityCheck::NotYetValid
        } else if now_s > self.not_after_s {
            ValidityCheck::Expired
        } else {
            ValidityCheck::Valid
        }
    }
}

/// Where a time falls in a validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidityCheck {
    /// Before it.
    NotYetValid,
    /// Within it.
    Valid,
    /// After it.
    Expired,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dns_and_uri_identities() {
        assert_eq!(Identity::parse("Host-A.example").unwrap(), Identity::Dns("host-a.example".into()));
        assert_eq!(Identity::parse("dns:b").unwrap(), Identity::Dns("b".into()));
        assert_eq!(Identity::parse("spiffe://c/d").unwrap(), Identity::Uri("spiffe://c/d".into()));
        assert_eq!(Identity::parse("uri:urn:x").unwrap(), Identity::Uri("urn:x".into()));
        for bad in ["", "dns:", "a b", "uri:nocolon", "host/with/slash"] {
            assert!(matches!(Identity::parse(bad), Err(IdentityError::Malformed { .. })), "{bad:?}");
        }
    }

    #[test]
    fn allowlist_needs_one_match_and_empty_permits_nobody() {
        let list = Allowlist::parse(["a", "uri:spiffe://x/y"]).unwrap();
        assert!(list.permits(&[Identity::Dns("z".into()), Identity::Dns("a".into())]));
        assert!(list.permits(&[Identity::Uri("spiffe://x/y".into())]));
        assert!(!list.permits(&[Identity::Dns("b".into()), Identity::Uri("spiffe://x/z".into())]));
        assert!(!list.permits(&[]));
        assert!(!Allowlist::default().permits(&[Identity::Dns("a".into())]));
    }
}
