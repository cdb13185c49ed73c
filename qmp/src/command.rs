//! The commands: their QEMU names, their argument schemas, and the typed
//! [`Command`] both sides use (the server parses into it, the client
//! serializes from it).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::QmpError;
use crate::objects::{self, ObjectAddArgs};
use crate::schema::{self, Member, Ty};
use crate::types::{MigrationCapability, MigrationCapabilityStatus, MigrationParameters, QmpCapability};

/// `migrate`'s arguments (the `uri` form; QEMU's `channels` list is not
/// supported, and `detach`, which QEMU ignores, is accepted and ignored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateArgs {
    /// `tcp:HOST:PORT`.
    pub uri: String,
    /// Resume a paused postcopy migration over a new connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// `migrate-incoming`'s arguments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateIncomingArgs {
    /// `tcp:HOST:PORT` to listen on.
    pub uri: String,
    /// Exit the process when the incoming migration fails (QEMU's default:
    /// true); false keeps it, reporting the failure in `query-migrate`.
    #[serde(rename = "exit-on-error", default, skip_serializing_if = "Option::is_none")]
    pub exit_on_error: Option<bool>,
}

/// A command with its typed arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Leave capabilities negotiation (answered by the session).
    QmpCapabilities {
        enable: Vec<QmpCapability>,
    },
    /// Answered by the session.
    QueryVersion,
    /// Answered by the session.
    QueryCommands,
    QueryStatus,
    Stop,
    Cont,
    Quit,
    MigrateSetCapabilities {
        capabilities: Vec<MigrationCapabilityStatus>,
    },
    QueryMigrateCapabilities,
    MigrateSetParameters(MigrationParameters),
    QueryMigrateParameters,
    Migrate(MigrateArgs),
    MigrateIncoming(MigrateIncomingArgs),
    MigrateStartPostcopy,
    MigrateCancel,
    MigratePause,
    MigrateRecover {
        uri: String,
    },
    QueryMigrate,
    /// Ours: check the guest now (page digests, pattern) and return the
    /// report (a JSON object whose members the VMM defines).
    XPostcopyVerify,
    /// `object-add` (TLS credentials and authorization lists).
    ObjectAdd(ObjectAddArgs),
    /// `object-del`.
    ObjectDel {
        id: String,
    },
}

const CAPABILITY_STATUS: Ty = Ty::Object(&[
    Member::required("capability", Ty::Enum(MigrationCapability::NAMES)),
    Member::required("state", Ty::Bool),
]);

const PARAMETERS: [Member; 13] = {
    let n = MigrationParameters::NAMES;
    [
        Member::optional(n[0], Ty::Uint64),
        Member::optional(n[1], Ty::Uint64),
        Member::optional(n[2], Ty::Uint64),
        Member::optional(n[3], Ty::Uint64),
        Member::optional(n[4], Ty::Uint64),
        Member::optional(n[5], Ty::Uint64),
        Member::optional(n[6], Ty::Uint64),
        Member::optional(n[7], Ty::Uint64),
        Member::optional(n[8], Ty::Uint64),
        Member::optional(n[9], Ty::Uint64),
        Member::optional(n[10], Ty::Str),
        Member::optional(n[11], Ty::Str),
        Member::optional(n[12], Ty::Str),
    ]
};

/// A command's name and argument members.
#[derive(Clone, Copy, Debug)]
pub struct CommandSpec {
    pub name: &'static str,
    pub members: &'static [Member],
}

/// Every command, in the order `query-commands` lists them.
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec {
        name: "qmp_capabilities",
        members: &[Member::optional("enable", Ty::List(&Ty::Enum(QmpCapability::NAMES)))],
    },
    CommandSpec { name: "query-version", members: &[] },
    CommandSpec { name: "query-commands", members: &[] },
    CommandSpec { name: "query-status", members: &[] },
    CommandSpec { name: "stop", members: &[] },
    CommandSpec { name: "cont", members: &[] },
    CommandSpec { name: "quit", members: &[] },
    CommandSpec {
        name: "migrate-set-capabilities",
        members: &[Member::required("capabilities", Ty::List(&CAPABILITY_STATUS))],
    },
    CommandSpec { name: "query-migrate-capabilities", members: &[] },
    CommandSpec { name: "migrate-set-parameters", members: &PARAMETERS },
    CommandSpec { name: "query-migrate-parameters", members: &[] },
    CommandSpec {
        name: "migrate",
        members: &[
            Member::required("uri", Ty::Str),
            Member::optional("detach", Ty::Bool),
            Member::optional("resume", Ty::Bool),
        ],
    },
    CommandSpec {
        name: "migrate-incoming",
        members: &[Member::required("uri", Ty::Str), Member::optional("exit-on-error", Ty::Bool)],
    },
    CommandSpec { name: "migrate-start-postcopy", members: &[] },
    CommandSpec { name: "migrate_cancel", members: &[] },
    CommandSpec { name: "migrate-pause", members: &[] },
    CommandSpec { name: "migrate-recover", members: &[Member::required("uri", Ty::Str)] },
    CommandSpec { name: "query-migrate", members: &[] },
    CommandSpec { name: "x-postcopy-verify", members: &[] },
    CommandSpec { name: "object-add", members: objects::OBJECT_ADD_MEMBERS },
    CommandSpec { name: "object-del", members: &[Member::required("id", Ty::Str)] },
];

/// Decodes checked arguments into their type. The schema check ran first,
/// so this fails only if the schema and the type disagree: still a typed
/// error, never a panic.
fn decode<T: serde::de::DeserializeOwned>(name: &str, args: &Map<String, Value>) -> Result<T, QmpError> {
    serde_json::from_value(Value::Object(args.clone()))
        .map_err(|e| QmpError::generic(format!("Arguments of '{name}' do not decode: {e}")))
}

impl Command {
    /// Parses a command from its name and `arguments` (absent: `{}`), with
    /// QEMU's errors: `CommandNotFound` for an unknown name, `GenericError`
    /// for arguments that do not fit.
    pub fn parse(name: &str, args: Option<&Map<String, Value>>) -> Result<Command, QmpError> {
        let spec = COMMANDS.iter().find(|c| c.name == name).ok_or_else(|| QmpError::command_not_found(name))?;
        let empty = Map::new();
        let args = args.unwrap_or(&empty);
        schema::check_arguments(spec.members, args)?;
        Ok(match name {
            "qmp_capabilities" => {
                #[derive(Deserialize)]
                struct Enable {
                    #[serde(default)]
                    enable: Vec<QmpCapability>,
                }
                Command::QmpCapabilities { enable: decode::<Enable>(name, args)?.enable }
            }
            "query-version" => Command::QueryVersion,
            "query-commands" => Command::QueryCommands,
            "query-status" => Command::QueryStatus,
            "stop" => Command::Stop,
            "cont" => Command::Cont,
            "quit" => Command::Quit,
            "migrate-set-capabilities" => {
                #[derive(Deserialize)]
                struct Capabilities {
                    capabilities: Vec<MigrationCapabilityStatus>,
                }
                Command::MigrateSetCapabilities { capabilities: decode::<Capabilities>(name, args)?.capabilities }
            }
            "query-migrate-capabilities" => Command::QueryMigrateCapabilities,
            "migrate-set-parameters" => Command::MigrateSetParameters(decode(name, args)?),
            "query-migrate-parameters" => Command::QueryMigrateParameters,
            "migrate" => {
                let mut args = args.clone();
                args.remove("detach");
                Command::Migrate(decode(name, &args)?)
            }
            "migrate-incoming" => Command::MigrateIncoming(decode(name, args)?),
            "migrate-start-postcopy" => Command::MigrateStartPostcopy,
            "migrate_cancel" => Command::MigrateCancel,
            "migrate-pause" => Command::MigratePause,
            "migrate-recover" => {
                #[derive(Deserialize)]
                struct Uri {
                    uri: String,
                }
                Command::MigrateRecover { uri: decode::<Uri>(name, args)?.uri }
            }
            "query-migrate" => Command::QueryMigrate,
            "x-postcopy-verify" => Command::XPostcopyVerify,
            "object-add" => Command::ObjectAdd(objects::parse_object_add(args)?),
            "object-del" => {
                #[derive(Deserialize)]
                struct Id {
                    id: String,
                }
                Command::ObjectDel { id: decode::<Id>(name, args)?.id }
            }
            _ => return Err(QmpError::command_not_found(name)),
        })
    }

    /// The command's QMP name.
    pub fn name(&self) -> &'static str {
        match self {
            Command::QmpCapabilities { .. } => "qmp_capabilities",
            Command::QueryVersion => "query-version",
            Command::QueryCommands => "query-commands",
            Command::QueryStatus => "query-status",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
            Command::MigrateSetCapabilities { .. } => "migrate-set-capabilities",
            Command::QueryMigrateCapabilities => "query-migrate-capabilities",
            Command::MigrateSetParameters(_) => "migrate-set-parameters",
            Command::QueryMigrateParameters => "query-migrate-parameters",
            Command::Migrate(_) => "migrate",
            Command::MigrateIncoming(_) => "migrate-incoming",
            Command::MigrateStartPostcopy => "migrate-start-postcopy",
            Command::MigrateCancel => "migrate_cancel",
            Command::MigratePause => "migrate-pause",
            Command::MigrateRecover { .. } => "migrate-recover",
            Command::QueryMigrate => "query-migrate",
            Command::XPostcopyVerify => "x-postcopy-verify",
            Command::ObjectAdd(_) => "object-add",
            Command::ObjectDel { .. } => "object-del",
        }
    }

    /// The command's `arguments` object (`None` for a command without
    /// arguments).
    pub fn arguments(&self) -> Option<Map<String, Value>> {
        let value = match self {
            Command::QmpCapabilities { enable } if enable.is_empty() => return None,
            Command::QmpCapabilities { enable } => serde_json::json!({ "enable": enable }),
            Command::MigrateSetCapabilities { capabilities } => serde_json::json!({ "capabilities": capabilities }),
            Command::MigrateSetParameters(parameters) => serde_json::to_value(parameters).ok()?,
            Command::Migrate(args) => serde_json::to_value(args).ok()?,
            Command::MigrateIncoming(args) => serde_json::to_value(args).ok()?,
            Command::MigrateRecover { uri } => serde_json::json!({ "uri": uri }),
            Command::ObjectAdd(object) => objects::object_add_arguments(object),
            Command::ObjectDel { id } => serde_json::json!({ "id": id }),
            _ => return None,
        };
        match value {
            Value::Object(map) => Some(map),
            _ => None,
        }
    }

    /// Whether the session answers this command itself (the VMM never sees
    /// it).
    pub fn is_control(&self) -> bool {
        matches!(self, Command::QmpCapabilities { .. } | Command::QueryVersion | Command::QueryCommands)
    }
}

/// The address of a `tcp:HOST:PORT` migration URI (QEMU also takes
/// `unix:`, `fd:`, `exec:`, `file:` and `rdma:`; postcopy speaks TCP).
pub fn parse_tcp_uri(uri: &str) -> Result<(String, u16), QmpError> {
    let Some(rest) = uri.strip_prefix("tcp:") else {
        return Err(QmpError::unknown_migration_protocol(uri));
    };
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| QmpError::generic(format!("address resolution failed for {rest}: missing port")))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port =
        port.parse().map_err(|_| QmpError::generic(format!("address resolution failed for {rest}: bad port")))?;
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(name: &str, args: Value) -> Result<Command, QmpError> {
        Command::parse(name, Some(args.as_object().unwrap()))
    }

    #[test]
    fn parses_qemu_shaped_arguments() {
        assert_eq!(
            parse("migrate", json!({"uri": "tcp:127.0.0.1:4444", "resume": true, "detach": true})),
            Ok(Command::Migrate(MigrateArgs { uri: "tcp:127.0.0.1:4444".into(), resume: true }))
        );
        assert_eq!(
            parse("migrate-set-capabilities", json!({"capabilities": [{"capability": "postcopy-ram", "state": true}]})),
            Ok(Command::MigrateSetCapabilities {
                capabilities: vec![MigrationCapabilityStatus {
                    capability: MigrationCapability::PostcopyRam,
                    state: true
                }]
            })
        );
        assert_eq!(
            parse("migrate-set-parameters", json!({"max-postcopy-bandwidth": 1000, "x-precopy-rounds": 2})),
            Ok(Command::MigrateSetParameters(MigrationParameters {
                max_postcopy_bandwidth: Some(1000),
                x_precopy_rounds: Some(2),
                ..Default::default()
            }))
        );
        assert_eq!(
            parse("migrate-set-parameters", json!({"x-push-streams": 2})),
            Ok(Command::MigrateSetParameters(MigrationParameters { x_push_streams: Some(2), ..Default::default() }))
        );
        assert_eq!(
            parse("migrate-set-parameters", json!({"x-fallback-lease-ms": 500, "x-checkpoint-interval-ms": 50})),
            Ok(Command::MigrateSetParameters(MigrationParameters {
                x_fallback_lease_ms: Some(500),
                x_checkpoint_interval_ms: Some(50),
                ..Default::default()
            }))
        );
        assert_eq!(Command::parse("query-migrate", None), Ok(Command::QueryMigrate));
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        let err = Command::parse("migrate-now", None).unwrap_err();
        assert_eq!(err, QmpError::command_not_found("migrate-now"));
        assert_eq!(parse("migrate", json!({})).unwrap_err().desc, "Parameter 'uri' is missing");
        assert_eq!(
            parse("migrate", json!({"uri": 5})).unwrap_err().desc,
            "Invalid parameter type for 'uri', expected: string"
        );
        assert_eq!(parse("stop", json!({"now": true})).unwrap_err().desc, "Parameter 'now' is unexpected");
        assert_eq!(
            parse("migrate-set-parameters", json!({"downtime-limit": "fast"})).unwrap_err().desc,
            "Parameter 'downtime-limit' expects uint64"
        );
        assert_eq!(
            parse("qmp_capabilities", json!({"enable": ["turbo"]})).unwrap_err().desc,
            "Parameter 'null' does not accept value 'turbo'"
        );
    }

    #[test]
    fn every_command_round_trips_through_name_and_arguments() {
        for spec in COMMANDS {
            if spec.members.iter().all(|m| m.optional) {
                let command = Command::parse(spec.name, None).unwrap();
                assert_eq!(command.name(), spec.name);
                assert_eq!(Command::parse(command.name(), command.arguments().as_ref()), Ok(command));
            }
        }
    }

    #[test]
    fn tcp_uris() {
        assert_eq!(parse_tcp_uri("tcp:127.0.0.1:4444"), Ok(("127.0.0.1".into(), 4444)));
        assert_eq!(parse_tcp_uri("tcp:[::1]:80"), Ok(("::1".into(), 80)));
        assert_eq!(parse_tcp_uri("unix:/x").unwrap_err().desc, "unknown migration protocol: unix:/x");
        assert!(parse_tcp_uri("tcp:host").is_err());
        assert!(parse_tcp_uri("tcp:host:http").is_err());
    }
}

#[cfg(test)]
/// `object-add` parsing, here because the objects module does not import
/// the command module back.
mod object_add_tests {
    use super::*;
    use crate::objects::{object_add_arguments, Endpoint, ObjectAddArgs};
    use serde_json::json;
    use serde_json::Value;

    fn parse(args: Value) -> Result<Command, QmpError> {
        Command::parse("object-add", Some(args.as_object().unwrap()))
    }

    #[test]
    fn parses_qemus_tls_objects_and_round_trips() {
        let creds =
            ObjectAddArgs::TlsCredsX509 { id: "tls0".into(), dir: "/etc/pki".into(), endpoint: Endpoint::Server };
        let authz = ObjectAddArgs::AuthzList { id: "auth0".into(), allow: vec!["dns:src.example".into()] };
        for object in [creds, authz] {
            assert_eq!(parse(object_add_arguments(&object)), Ok(Command::ObjectAdd(object.clone())));
            let command = Command::ObjectAdd(object);
            assert_eq!(Command::parse(command.name(), command.arguments().as_ref()), Ok(command));
        }
        // QEMU's default endpoint is the client.
        assert!(matches!(
            parse(json!({"qom-type": "tls-creds-x509", "id": "c", "dir": "/d"})),
            Ok(Command::ObjectAdd(ObjectAddArgs::TlsCredsX509 { endpoint: Endpoint::Client, .. }))
        ));
    }

    #[test]
    fn refuses_what_would_weaken_or_misread_the_checks() {
        let err = |args: Value| parse(args).unwrap_err().desc;
        assert!(err(json!({"qom-type": "tls-creds-x509", "id": "c"})).contains("'dir' is missing"));
        assert!(err(json!({"qom-type": "tls-creds-x509", "id": "c", "dir": "/d", "verify-peer": false}))
            .contains("verify-peer"));
        assert!(err(json!({"qom-type": "authz-list", "id": "a", "policy": "allow"})).contains("policy"));
        assert!(err(json!({"qom-type": "authz-list", "id": "a", "rules": [{"match": "*", "format": "glob"}]}))
            .contains("rules[0].format"));
        assert!(err(json!({"qom-type": "authz-list", "id": "a", "dir": "/d"})).contains("unexpected"));
        assert!(err(json!({"qom-type": "memory-backend-ram", "id": "m"})).contains("qom-type"));
        assert!(err(json!({"qom-type": "authz-list", "id": "bad id"})).contains("Invalid object id"));
    }
}
