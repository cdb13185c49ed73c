//! TLS over QMP, as QEMU does it: `object-add` creates `tls-creds-x509`
//! (a credentials directory) and `authz-list` (the identities accepted
//! from a peer) objects; `migrate-set-parameters` names them with
//! `tls-creds`, `tls-authz`, and `tls-hostname` (the name a source checks
//! in the destination's certificate, by default the host of the URI).
//! `tls-creds` unset: the process's command-line security (`--tls-creds`
//! or `--insecure`); an empty string: plain TCP.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postcopy_qmp::{Endpoint, MigrationParameters, ObjectAddArgs, QmpError};
use postcopy_secure::{Allowlist, HandshakeLimits, Identity};

use crate::devices::lock;
use crate::driver::security::{host_name, load_credentials_dir, QemuEnd};
use crate::driver::{error_chain, ChannelSecurity, TlsSettings};

/// The objects `object-add` created, by id.
#[derive(Debug, Default)]
pub struct TlsObjects {
    objects: Mutex<BTreeMap<String, ObjectAddArgs>>,
}

/// Which way a migration goes, for its TLS role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way<'a> {
    /// To the destination at this URI (`tcp:HOST:PORT`): the TLS client.
    Outgoing {
        /// The URI.
        uri: &'a str,
    },
    /// From a source: the TLS server.
    Incoming,
}

impl TlsObjects {
    /// `object-add`: checks the object (its credentials load, its
    /// identities parse) and keeps it.
    pub fn add(&self, object: &ObjectAddArgs) -> Result<(), QmpError> {
        match object {
            ObjectAddArgs::TlsCredsX509 { dir, endpoint, .. } => {
                load_credentials_dir(Path::new(dir), None, qemu_end(*endpoint))
                    .map_err(|e| QmpError::generic(format!("Unable to load TLS credentials: {}", error_chain(&e))))?;
            }
            ObjectAddArgs::AuthzList { allow, .. } => {
                Allowlist::parse(allow).map_err(|e| QmpError::generic(error_chain(&e)))?;
            }
        }
        let mut objects = lock(&self.objects);
        if objects.contains_key(object.id()) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                object.id()
            )));
        }
        objects.insert(object.id().to_string(), object.clone());
        Ok(())
    }

    /// `object-del`.
    pub fn remove(&self, id: &str) -> Result<(), QmpError> {
        lock(&self.objects).remove(id).map(drop).ok_or_else(|| QmpError::generic(format!("object '{id}' not found")))
    }

    /// The security of a migration going `way` with `parameters`: None to
    /// keep the process's own (`tls-creds` unset).
    pub fn security(
        &self,
        parameters: &MigrationParameters,
        way: Way<'_>,
        handshake_timeout: Duration,
    ) -> Result<Option<ChannelSecurity>, QmpError> {
        let Some(creds_id) = parameters.tls_creds.as_deref() else { return Ok(None) };
        if creds_id.is_empty() {
            return Ok(Some(ChannelSecurity::Plain));
        }
        let objects = lock(&self.objects);
        let Some(ObjectAddArgs::TlsCredsX509 { dir, endpoint, .. }) = objects.get(creds_id) else {
            return Err(QmpError::generic(format!("No TLS credentials with id '{creds_id}'")));
        };
        let wanted = match way {
            Way::Outgoing { .. } => Endpoint::Client,
            Way::Incoming => Endpoint::Server,
        };
        if *endpoint != wanted {
            return Err(QmpError::generic(format!(
                "Expected TLS credentials for a {} endpoint",
                if wanted == Endpoint::Client { "client" } else { "server" }
            )));
        }
        let creds = load_credentials_dir(Path::new(dir), None, qemu_end(*endpoint))
            .map_err(|e| QmpError::generic(format!("Unable to load TLS credentials: {}", error_chain(&e))))?;
        let hostname = match (parameters.tls_hostname.as_deref().filter(|h| !h.is_empty()), way) {
            (Some(h), _) => Some(h.to_string()),
            (None, Way::Outgoing { uri }) => Some(host_name(uri).ok_or_else(|| {
                QmpError::generic(format!(
                    "{uri} names no host to check the destination's certificate against: set tls-hostname"
                ))
            })?),
            (None, Way::Incoming) => None,
        };
        if let Some(h) = &hostname {
            Identity::parse(h).map_err(|e| QmpError::invalid_parameter_value("tls-hostname", &e.to_string()))?;
        }
        let allowed = match (parameters.tls_authz.as_deref().filter(|a| !a.is_empty()), &hostname) {
            (Some(id), _) => match objects.get(id) {
                Some(ObjectAddArgs::AuthzList { allow, .. }) => {
                    Allowlist::parse(allow).map_err(|e| QmpError::generic(error_chain(&e)))?
                }
                _ => return Err(QmpError::generic(format!("No authorization list with id '{id}'"))),
            },
            // A source accepts the host it dialled.
            (None, Some(h)) if matches!(way, Way::Outgoing { .. }) => {
                Allowlist::parse([h]).map_err(|e| QmpError::generic(error_chain(&e)))?
            }
            _ => {
                return Err(QmpError::generic(
                    "an incoming migration over TLS needs tls-authz (the identities of the sources to accept)",
                ))
            }
        };
        let defaults = HandshakeLimits::default();
        let limits = HandshakeLimits { timeout: defaults.timeout.min(handshake_timeout), ..defaults };
        let settings = TlsSettings::new(&creds, allowed, hostname, None, limits)
            .map_err(|e| QmpError::generic(format!("Unable to use TLS credentials: {}", error_chain(&e))))?;
        Ok(Some(ChannelSecurity::Tls(Arc::new(settings))))
    }
}

fn qemu_end(endpoint: Endpoint) -> QemuEnd {
    match endpoint {
        Endpoint::Client => QemuEnd::Client,
        Endpoint::Server => QemuEnd::Server,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    fn creds_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("postcopy-vmm-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        postcopy_secure::creds::write_first_run_credentials(&dir, &["src.test".into()], 1).unwrap();
        dir
    }

    fn params(creds: Option<&str>, authz: Option<&str>, hostname: Option<&str>) -> MigrationParameters {
        MigrationParameters {
            tls_creds: creds.map(str::to_string),
            tls_authz: authz.map(str::to_string),
            tls_hostname: hostname.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn parameters_name_objects_and_each_missing_piece_is_a_clear_error() {
        let dir = creds_dir("params");
        let objects = TlsObjects::default();
        let client = ObjectAddArgs::TlsCredsX509 {
            id: "tls0".into(),
            dir: dir.display().to_string(),
            endpoint: Endpoint::Client,
        };
        objects.add(&client).unwrap();
        assert!(objects.add(&client).unwrap_err().desc.contains("duplicate"));
        objects.add(&ObjectAddArgs::AuthzList { id: "auth0".into(), allow: vec!["dst.test".into()] }).unwrap();
        let out = Way::Outgoing { uri: "tcp:127.0.0.1:4444" };
        assert!(objects.security(&params(None, None, None), out, TIMEOUT).unwrap().is_none());
        assert!(matches!(
            objects.security(&params(Some(""), None, None), out, TIMEOUT),
            Ok(Some(ChannelSecurity::Plain))
        ));
        let tls = objects.security(&params(Some("tls0"), Some("auth0"), Some("dst.test")), out, TIMEOUT).unwrap();
        assert!(matches!(tls, Some(ChannelSecurity::Tls(t)) if t.server_name() == Some("dst.test")));
        let by_uri = Way::Outgoing { uri: "tcp:dst.test:4444" };
        assert!(matches!(objects.security(&params(Some("tls0"), None, None), by_uri, TIMEOUT), Ok(Some(_))));
        let err = |p, way| objects.security(&p, way, TIMEOUT).unwrap_err().desc;
        assert!(err(params(Some("tls0"), None, None), out).contains("set tls-hostname"));
        assert!(err(params(Some("nope"), None, None), out).contains("No TLS credentials"));
        assert!(err(params(Some("tls0"), Some("nope"), Some("h")), out).contains("No authorization list"));
        assert!(err(params(Some("tls0"), Some("auth0"), None), Way::Incoming).contains("server endpoint"));
        objects.remove("tls0").unwrap();
        assert!(objects.remove("tls0").is_err());
        let bad =
            ObjectAddArgs::TlsCredsX509 { id: "x".into(), dir: "/nonexistent".into(), endpoint: Endpoint::Server };
        assert!(objects.add(&bad).unwrap_err().desc.contains("Unable to load TLS credentials"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
