//! What the server drives: a [`Vmm`] runs the commands, an [`EventSink`]
//! takes the events it raises.
//!
//! State checks are the VMM's ("migrate while a migration runs", "cont
//! while waiting for an incoming migration"): it answers them with a
//! [`QmpError`], for which [`QmpError`]'s constructors carry QEMU's wording.

use serde_json::Value;

use crate::command::{Command, MigrateArgs, MigrateIncomingArgs};
use crate::error::QmpError;
use crate::objects::ObjectAddArgs;
use crate::types::{Event, MigrationCapabilityStatus, MigrationInfo, MigrationParameters, StatusInfo};

/// The VMM behind a QMP server: one method per command. Called from the
/// clients' threads, possibly at once; a method must not wait on the
/// migration's fault path (QMP must cost the guest nothing), and it runs
/// to its end even if its client has gone.
pub trait Vmm: Send + Sync {
    /// `query-status`.
    fn query_status(&self) -> Result<StatusInfo, QmpError>;
    /// `stop`: pause the guest (a `STOP` event follows).
    fn stop(&self) -> Result<(), QmpError>;
    /// `cont`: resume the guest (a `RESUME` event follows).
    fn cont(&self) -> Result<(), QmpError>;
    /// `quit`: the process is to exit after replying (a `SHUTDOWN` event
    /// with reason `host-qmp-quit` follows).
    fn quit(&self) -> Result<(), QmpError>;
    /// `migrate-set-capabilities`: all or nothing.
    fn migrate_set_capabilities(&self, capabilities: &[MigrationCapabilityStatus]) -> Result<(), QmpError>;
    /// `query-migrate-capabilities`: every capability and its state.
    fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapabilityStatus>, QmpError>;
    /// `migrate-set-parameters`: the members present change; all or
    /// nothing.
    fn migrate_set_parameters(&self, parameters: &MigrationParameters) -> Result<(), QmpError>;
    /// `query-migrate-parameters`: every member present.
    fn query_migrate_parameters(&self) -> Result<MigrationParameters, QmpError>;
    /// `migrate`: start an outgoing migration (or resume a paused one) and
    /// return at once; progress shows in `query-migrate` and events.
    fn migrate(&self, args: &MigrateArgs) -> Result<(), QmpError>;
    /// `migrate-incoming`: listen for a migration (process started with
    /// `--incoming defer`).
    fn migrate_incoming(&self, args: &MigrateIncomingArgs) -> Result<(), QmpError>;
    /// `migrate-start-postcopy`: switch the running precopy to postcopy.
    fn migrate_start_postcopy(&self) -> Result<(), QmpError>;
    /// `migrate_cancel`: before the switchover the guest keeps running here.
    fn migrate_cancel(&self) -> Result<(), QmpError>;
    /// `migrate-pause`: drop the connection of a postcopy migration
    /// (`postcopy-paused`).
    fn migrate_pause(&self) -> Result<(), QmpError>;
    /// `migrate-recover`: the destination listens on `uri` for the resumed
    /// migration.
    fn migrate_recover(&self, uri: &str) -> Result<(), QmpError>;
    /// `query-migrate`.
    fn query_migrate(&self) -> Result<MigrationInfo, QmpError>;
    /// `x-postcopy-verify` (ours): check the guest now and return the
    /// report. A VMM without a guest to check does not have the command.
    fn x_postcopy_verify(&self) -> Result<Value, QmpError> {
        Err(QmpError::command_not_found("x-postcopy-verify"))
    }
    /// `object-add`: TLS credentials or an authorization list (a VMM
    /// without TLS refuses it).
    fn object_add(&self, object: &ObjectAddArgs) -> Result<(), QmpError> {
        Err(QmpError::generic(format!("object type of '{}' is not supported here", object.id())))
    }
    /// `object-del`.
    fn object_del(&self, id: &str) -> Result<(), QmpError> {
        Err(QmpError::generic(format!("object '{id}' not found")))
    }
}

/// Where a VMM's events go. The server's [`crate::server::EventBus`]
/// timestamps and broadcasts them; `emit` never blocks.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

fn to_value<T: serde::Serialize>(value: T) -> Result<Value, QmpError> {
    serde_json::to_value(value).map_err(|e| QmpError::generic(format!("reply does not encode: {e}")))
}

/// Runs one command on the VMM; the reply's `return` value.
///
/// The control commands (`qmp_capabilities`, `query-version`,
/// `query-commands`) belong to the session, which never hands them here;
/// given one anyway, this answers `CommandNotFound`.
pub fn dispatch(vmm: &dyn Vmm, command: &Command) -> Result<Value, QmpError> {
    let empty = || Value::Object(Default::default());
    match command {
        Command::QueryStatus => to_value(vmm.query_status()?),
        Command::Stop => vmm.stop().map(|()| empty()),
        Command::Cont => vmm.cont().map(|()| empty()),
        Command::Quit => vmm.quit().map(|()| empty()),
        Command::MigrateSetCapabilities { capabilities } => {
            vmm.migrate_set_capabilities(capabilities).map(|()| empty())
        }
        Command::QueryMigrateCapabilities => to_value(vmm.query_migrate_capabilities()?),
        Command::MigrateSetParameters(parameters) => vmm.migrate_set_parameters(parameters).map(|()| empty()),
        Command::QueryMigrateParameters => to_value(vmm.query_migrate_parameters()?),
        Command::Migrate(args) => vmm.migrate(args).map(|()| empty()),
        Command::MigrateIncoming(args) => vmm.migrate_incoming(args).map(|()| empty()),
        Command::MigrateStartPostcopy => vmm.migrate_start_postcopy().map(|()| empty()),
        Command::MigrateCancel => vmm.migrate_cancel().map(|()| empty()),
        Command::MigratePause => vmm.migrate_pause().map(|()| empty()),
        Command::MigrateRecover { uri } => vmm.migrate_recover(uri).map(|()| empty()),
        Command::QueryMigrate => to_value(vmm.query_migrate()?),
        Command::XPostcopyVerify => vmm.x_postcopy_verify(),
        Command::ObjectAdd(object) => vmm.object_add(object).map(|()| empty()),
        Command::ObjectDel { id } => vmm.object_del(id).map(|()| empty()),
        Command::QmpCapabilities { .. } | Command::QueryVersion | Command::QueryCommands => {
            Err(QmpError::command_not_found(command.name()))
        }
    }
}
