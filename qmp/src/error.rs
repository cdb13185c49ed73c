//! QMP's error replies: `{"error": {"class": ..., "desc": ...}}`.
//!
//! The classes are QEMU's `QapiErrorClass` (qapi/error.json); almost every
//! error QEMU sends is `GenericError`, and clients are told not to parse
//! `desc`. The constructors below carry QEMU's wording for the errors this
//! crate or a VMM raises, so that logs and scripts written against QEMU read
//! the same.

use serde::{Deserialize, Serialize};

/// QEMU's error classes (`QapiErrorClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::GenericError,
        ErrorClass::CommandNotFound,
        ErrorClass::DeviceNotActive,
        ErrorClass::DeviceNotFound,
        ErrorClass::KVMMissingCap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A QMP error reply's body: what a command (or the protocol layer) answers
/// instead of `return`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class:?}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError { class, desc: desc.into() }
    }

    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    // --- The protocol layer (QEMU's monitor and qmp-dispatch). ---

    /// A command this server does not have.
    pub fn command_not_found(name: &str) -> Self {
        QmpError::new(ErrorClass::CommandNotFound, format!("The command {name} has not been found"))
    }

    /// Any command but `qmp_capabilities` before negotiation; QEMU replaces
    /// the `CommandNotFound` description by this one in that mode.
    pub fn expecting_negotiation() -> Self {
        QmpError::new(ErrorClass::CommandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'")
    }

    /// `qmp_capabilities` a second time.
    pub fn negotiation_complete() -> Self {
        QmpError::new(ErrorClass::CommandNotFound, "Capabilities negotiation is already complete, command ignored")
    }

    /// Input the JSON parser rejects; `detail` is the parser's message.
    pub fn json_parse(detail: impl std::fmt::Display) -> Self {
        QmpError::generic(format!("JSON parse error, {detail}"))
    }

    /// A message longer than the server accepts (QEMU's streamer has the
    /// same kind of limit, with this wording).
    pub fn too_long(limit_bytes: usize) -> Self {
        QmpError::generic(format!("JSON token size limit exceeded (at most {limit_bytes} bytes per message)"))
    }

    // --- Argument checking (QEMU's QObject input visitor). ---

    pub fn missing_parameter(name: &str) -> Self {
        QmpError::generic(format!("Parameter '{name}' is missing"))
    }

    pub fn unexpected_parameter(name: &str) -> Self {
        QmpError::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// `expected` is QEMU's word: string, boolean, integer, number, object,
    /// array.
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        QmpError::generic(format!("Invalid parameter type for '{name}', expected: {expected}"))
    }

    /// `expects` is QEMU's phrase, for example `uint64` or `an integer in
    /// the range of 0 to 2000 ms`.
    pub fn invalid_parameter_value(name: &str, expects: &str) -> Self {
        QmpError::generic(format!("Parameter '{name}' expects {expects}"))
    }

    pub fn enum_value(name: &str, value: &str) -> Self {
        QmpError::generic(format!("Parameter '{name}' does not accept value '{value}'"))
    }

    // --- State checks a VMM makes (QEMU's migration.c and cpus.c). ---

    /// `migrate`, `migrate-set-capabilities`, `migrate-incoming` while a
    /// migration runs.
    pub fn migration_active() -> Self {
        QmpError::generic("There's a migration process in progress")
    }

    /// `migrate {resume: true}` without a paused migration.
    pub fn no_paused_migration() -> Self {
        QmpError::generic("Cannot resume if there is no paused migration")
    }

    /// `migrate-start-postcopy` without the `postcopy-ram` capability.
    pub fn postcopy_not_enabled() -> Self {
        QmpError::generic("Enable postcopy with migrate_set_capability before the start of migration")
    }

    /// `migrate-start-postcopy` with no migration running.
    pub fn postcopy_before_migration() -> Self {
        QmpError::generic("postcopy must be started after migration has been started")
    }

    /// `migrate-pause` outside postcopy.
    pub fn pause_outside_postcopy() -> Self {
        QmpError::generic("migrate-pause is currently only supported during postcopy-active or postcopy-recover state")
    }

    /// `migrate-recover` while postcopy is not paused.
    pub fn recover_not_paused() -> Self {
        QmpError::generic("Migrate recover can only be run when postcopy is paused.")
    }

    /// `migrate-incoming` on a process not started with `--incoming defer`.
    pub fn incoming_not_deferred() -> Self {
        QmpError::generic("'-incoming' was not specified on the command line")
    }

    /// `migrate-incoming` a second time.
    pub fn incoming_already_started() -> Self {
        QmpError::generic("The incoming migration has already been started")
    }

    /// `migrate` on a process waiting for an incoming migration (or whose
    /// incoming migration has not completed).
    pub fn guest_inmigrate() -> Self {
        QmpError::generic("Guest is waiting for an incoming migration")
    }

    /// A migration URI whose scheme the VMM does not speak.
    pub fn unknown_migration_protocol(uri: &str) -> Self {
        QmpError::generic(format!("unknown migration protocol: {uri}"))
    }

    /// A migration capability this VMM cannot turn on.
    pub fn capability_unsupported(name: &str) -> Self {
        QmpError::generic(format!("Migration capability '{name}' is not supported by this VMM"))
    }
}
