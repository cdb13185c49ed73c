//! `object-add` and `object-del` for the two object types a migration's TLS
//! needs, in QEMU's shape:
//!
//! - `tls-creds-x509`: `{"qom-type": "tls-creds-x509", "id": ID, "dir": DIR,
//!   "endpoint": "client"|"server", "verify-peer": true}`: the directory of
//!   a host's certificate, key and CA. Peers are always verified here
//!   (mutual TLS): `verify-peer: false` is refused.
//! - `authz-list`: `{"qom-type": "authz-list", "id": ID, "policy": "deny",
//!   "rules": [{"match": "dns:src.example", "policy": "allow"}]}`: the
//!   identities (certificate subject alternative names) accepted from a
//!   peer. Only `deny` as the default policy and exact `allow` rules are
//!   accepted: an allowlist.
//!
//! `migrate-set-parameters` then names them: `tls-creds` (an empty string:
//! plain TCP), `tls-authz`, and `tls-hostname` (the name a source checks in
//! the destination's certificate).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::QmpError;
use crate::schema::{Member, Ty};

/// Which end of the TLS connection a credentials object serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// The migration's source.
    Client,
    /// The migration's destination.
    Server,
}

/// An object `object-add` creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectAddArgs {
    /// `tls-creds-x509`.
    TlsCredsX509 {
        /// Its id.
        id: String,
        /// The credentials directory.
        dir: String,
        /// Which end it serves.
        endpoint: Endpoint,
    },
    /// `authz-list`: the identities allowed.
    AuthzList {
        /// Its id.
        id: String,
        /// The `match` of each `allow` rule, in order.
        allow: Vec<String>,
    },
}

impl ObjectAddArgs {
    /// The object's id.
    pub fn id(&self) -> &str {
        match self {
            Self::TlsCredsX509 { id, .. } | Self::AuthzList { id, .. } => id,
        }
    }
}

/// The types `object-add` knows.
pub const QOM_TYPES: &[&str] = &["tls-creds-x509", "authz-list"];

const RULE: Ty = Ty::Object(&[
    Member::required("match", Ty::Str),
    Member::optional("policy", Ty::Enum(&["allow", "deny"])),
    Member::optional("format", Ty::Enum(&["exact", "glob"])),
]);

/// `object-add`'s members: those of every type (QEMU's flat union); which
/// belong to which type is checked in [`parse_object_add`].
pub const OBJECT_ADD_MEMBERS: &[Member] = &[
    Member::required("qom-type", Ty::Enum(QOM_TYPES)),
    Member::required("id", Ty::Str),
    Member::optional("dir", Ty::Str),
    Member::optional("endpoint", Ty::Enum(&["client", "server"])),
    Member::optional("verify-peer", Ty::Bool),
    Member::optional("policy", Ty::Enum(&["allow", "deny"])),
    Member::optional("rules", Ty::List(&RULE)),
];

fn unexpected_for(name: &str, qom_type: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is unexpected for qom-type '{qom_type}'"))
}

/// Decodes `object-add`'s checked arguments.
pub fn parse_object_add(args: &Map<String, Value>) -> Result<ObjectAddArgs, QmpError> {
    let text = |name: &str| args.get(name).and_then(Value::as_str).map(str::to_owned);
    let qom_type = text("qom-type").unwrap_or_default();
    let id = text("id").unwrap_or_default();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(QmpError::generic(format!("Invalid object id '{id}'")));
    }
    match qom_type.as_str() {
        "tls-creds-x509" => {
            for name in ["policy", "rules"] {
                if args.contains_key(name) {
                    return Err(unexpected_for(name, &qom_type));
                }
            }
            let dir = text("dir").ok_or_else(|| QmpError::generic("Parameter 'dir' is missing"))?;
            let endpoint = match text("endpoint").as_deref() {
                Some("server") => Endpoint::Server,
                // QEMU's default.
                Some("client") | None => Endpoint::Client,
                Some(other) => return Err(QmpError::enum_value("endpoint", other)),
            };
            if args.get("verify-peer").and_then(Value::as_bool) == Some(false) {
                return Err(QmpError::invalid_parameter_value(
                    "verify-peer",
                    "true (migrations use mutual TLS: both ends verify the other)",
                ));
            }
            Ok(ObjectAddArgs::TlsCredsX509 { id, dir, endpoint })
        }
        "authz-list" => {
            for name in ["dir", "endpoint", "verify-peer"] {
                if args.contains_key(name) {
                    return Err(unexpected_for(name, &qom_type));
                }
            }
            if text("policy").as_deref() == Some("allow") {
                return Err(QmpError::invalid_parameter_value("policy", "deny (the list allows, nothing else)"));
            }
            let mut allow = Vec::new();
            let rules = args.get("rules").and_then(Value::as_array).cloned().unwrap_or_default();
            for (i, rule) in rules.iter().enumerate() {
                let field = |name: &str| rule.get(name).and_then(Value::as_str);
                if field("format") == Some("glob") {
                    return Err(QmpError::invalid_parameter_value(&format!("rules[{i}].format"), "exact"));
                }
                if field("policy") == Some("deny") {
                    return Err(QmpError::invalid_parameter_value(&format!("rules[{i}].policy"), "allow"));
                }
                allow.push(field("match").unwrap_or_default().to_owned());
            }
            Ok(ObjectAddArgs::AuthzList { id, allow })
        }
        other => Err(QmpError::enum_value("qom-type", other)),
    }
}

/// `object-add`'s arguments for `object` (what a client sends).
pub fn object_add_arguments(object: &ObjectAddArgs) -> Value {
    match object {
        ObjectAddArgs::TlsCredsX509 { id, dir, endpoint } => serde_json::json!({
            "qom-type": "tls-creds-x509", "id": id, "dir": dir, "endpoint": endpoint, "verify-peer": true,
        }),
        ObjectAddArgs::AuthzList { id, allow } => serde_json::json!({
            "qom-type": "authz-list", "id": id, "policy": "deny",
            "rules": allow.iter().map(|m| serde_json::json!({"match": m, "policy": "allow", "format": "exact"}))
                .collect::<Vec<_>>(),
        }),
    }
}
