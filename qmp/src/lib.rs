//! QMP, the QEMU Machine Protocol, for postcopy's long-running VMM process
//! (`postcopy run --qmp PATH`): the layer orchestrators (libvirt-style
//! tools, scripts, QEMU's own `qemu.qmp` Python library) drive it through.
//!
//! # Layers
//! - [`session`]: one client's protocol, sans-IO (bytes in, bytes and typed
//!   commands out): greeting, capabilities negotiation, framing, QEMU's
//!   dispatch checks and error replies, event lines with a given timestamp.
//! - [`command`] and [`types`]: the commands with typed arguments and the
//!   typed replies and events, under QEMU's names (qapi/control.json,
//!   qapi/run-state.json, qapi/migration.json); [`schema`] checks arguments
//!   with QEMU's wording; [`error`] has QEMU's error classes and messages.
//! - [`vmm`]: the [`Vmm`] trait the server calls, one method per command,
//!   and the [`EventSink`] a VMM raises events through.
//! - [`server`]: a Unix-socket server on std threads, several clients at
//!   once, events broadcast to every negotiated client.
//! - [`client`]: a blocking client ([`QmpClient`]).
//! - [`fake`]: a simulated VMM for tests and the `fake_vmm` example.
//!
//! # The commands
//! | command | arguments | returns |
//! | --- | --- | --- |
//! | `qmp_capabilities` | `enable` (none offered) | `{}` |
//! | `query-version` | | `{qemu: {major, minor, micro}, package}` |
//! | `query-commands` | | `[{name}]` |
//! | `query-status` | | `{running, status}` (`RunState`) |
//! | `stop`, `cont`, `quit` | | `{}`; events `STOP`, `RESUME`, `SHUTDOWN` |
//! | `migrate-set-capabilities` | `capabilities: [{capability, state}]` | `{}` |
//! | `query-migrate-capabilities` | | `[{capability, state}]` |
//! | `migrate-set-parameters` | `max-bandwidth`, `max-postcopy-bandwidth`, `downtime-limit`, `x-precopy-rounds`, `x-request-batch-pages`, `x-peer-timeout-ms`, `x-reconnect-delay-max-ms`, `x-push-streams`, `x-fallback-lease-ms`, `x-checkpoint-interval-ms` | `{}` |
//! | `query-migrate-parameters` | | the same members |
//! | `migrate` | `uri` (`tcp:HOST:PORT`), `resume`, `detach` (ignored) | `{}` |
//! | `migrate-incoming` | `uri`, `exit-on-error` | `{}` |
//! | `migrate-start-postcopy`, `migrate_cancel`, `migrate-pause` | | `{}` |
//! | `migrate-recover` | `uri` | `{}` |
//! | `query-migrate` | | `MigrationInfo`, with QEMU 10.1's `postcopy-latency*` and our `x-postcopy` |
//! | `x-postcopy-verify` | | ours: the VMM's check of the guest (digests, pattern), as JSON |
//!
//! Events: `STOP`, `RESUME`, `SHUTDOWN {guest, reason}`, and with the
//! `events` capability on (off by default, as in QEMU) `MIGRATION {status}`
//! and `MIGRATION_PASS {pass}`; each with `timestamp {seconds,
//! microseconds}`, and only to clients past negotiation.
//!
//! # Where this differs from QEMU
//! - No `oob` capability (see [`session`] for why); `migrate-pause` and
//!   `migrate-recover` work in-band.
//! - A message longer than [`SessionConfig::max_message_bytes`] (1 MiB by
//!   default; QEMU's limit is 64 MiB) gets one `GenericError` and the
//!   session goes on, as in QEMU ([`framing`]).
//! - `migrate` and `migrate-incoming` take `uri` only (no `channels`).
//! - A negative number for a `uint64`/`size` argument is refused (QEMU wraps
//!   it).
//! - `query-status` has no `singlestep` (current QEMU has none either).
//! - The server accepts several clients on one socket (QEMU: one per
//!   monitor socket).

#![forbid(unsafe_code)]

pub mod client;
pub mod command;
pub mod error;
pub mod fake;
pub mod framing;
pub mod objects;
pub mod schema;
pub mod server;
pub mod session;
pub mod types;
pub mod vmm;

pub use client::{ClientError, QmpClient, ReceivedEvent};
pub use command::{Command, MigrateArgs, MigrateIncomingArgs};
pub use error::{ErrorClass, QmpError};
pub use objects::{Endpoint, ObjectAddArgs};
pub use server::{EventBus, Server, ServerConfig, ServerError, ThreadStart};
pub use session::{Request, Session, SessionConfig, Step};
pub use types::*;
pub use vmm::{dispatch, EventSink, Vmm};
