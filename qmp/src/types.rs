//! QEMU's QAPI types for the commands and events this crate speaks, with
//! QEMU's member names (qapi/run-state.json, qapi/migration.json,
//! qapi/control.json). Optional members are `Option`s and are left out of
//! the JSON when `None`, as QEMU leaves them out.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Declares a QAPI enum: a Rust enum, its wire names in schema order, and
/// serde through those names.
macro_rules! qapi_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the schema's order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// Every wire name, in the schema's order.
            pub const NAMES: &'static [&'static str] = &[$($wire,)+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownEnumValue;
            fn from_str(s: &str) -> Result<Self, UnknownEnumValue> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownEnumValue { type_name: stringify!($name), value: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A string that is not one of a QAPI enum's values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{value}' is not a {type_name}")]
pub struct UnknownEnumValue {
    pub type_name: &'static str,
    pub value: String,
}

qapi_enum! {
    /// The VM's run state (`RunState`).
    RunState {
        Debug = "debug",
        /// Paused, waiting for an incoming migration.
        Inmigrate = "inmigrate",
        InternalError = "internal-error",
        IoError = "io-error",
        /// Paused by `stop`.
        Paused = "paused",
        /// Paused after a successful outgoing migration.
        Postmigrate = "postmigrate",
        Prelaunch = "prelaunch",
        /// Paused to finish a migration (the switchover).
        FinishMigrate = "finish-migrate",
        RestoreVm = "restore-vm",
        Running = "running",
        SaveVm = "save-vm",
        Shutdown = "shutdown",
        Suspended = "suspended",
        Watchdog = "watchdog",
        GuestPanicked = "guest-panicked",
        Colo = "colo",
    }
}

qapi_enum! {
    /// Why the VM shut down (`ShutdownCause`).
    ShutdownCause {
        None = "none",
        HostError = "host-error",
        HostQmpQuit = "host-qmp-quit",
        HostQmpSystemReset = "host-qmp-system-reset",
        HostSignal = "host-signal",
        HostUi = "host-ui",
        GuestShutdown = "guest-shutdown",
        GuestReset = "guest-reset",
        GuestPanic = "guest-panic",
        SubsystemReset = "subsystem-reset",
        SnapshotLoad = "snapshot-load",
    }
}

qapi_enum! {
    /// A migration's status (`MigrationStatus`).
    MigrationStatus {
        None = "none",
        Setup = "setup",
        Cancelling = "cancelling",
        Cancelled = "cancelled",
        Active = "active",
        PostcopyActive = "postcopy-active",
        PostcopyPaused = "postcopy-paused",
        PostcopyRecoverSetup = "postcopy-recover-setup",
        PostcopyRecover = "postcopy-recover",
        Completed = "completed",
        Failed = "failed",
        Colo = "colo",
        PreSwitchover = "pre-switchover",
        Device = "device",
        WaitUnplug = "wait-unplug",
    }
}

impl MigrationStatus {
    /// Whether a migration in this status is under way (QEMU's
    /// `migration_is_running`): a new `migrate`, `migrate-set-capabilities`
    /// or `migrate-incoming` is refused then.
    pub fn is_running(self) -> bool {
        use MigrationStatus::*;
        matches!(
            self,
            Setup
                | Cancelling
                | Active
                | PostcopyActive
                | PostcopyPaused
                | PostcopyRecoverSetup
                | PostcopyRecover
                | Colo
                | PreSwitchover
                | Device
                | WaitUnplug
        )
    }
}

qapi_enum! {
    /// Migration capabilities (`MigrationCapability`), QEMU's then ours
    /// (`x-` prefixed). A VMM refuses to turn on those it does not
    /// implement ([`crate::QmpError::capability_unsupported`]); knowing all
    /// of QEMU's names lets a client written for QEMU turn them off.
    MigrationCapability {
        Xbzrle = "xbzrle",
        RdmaPinAll = "rdma-pin-all",
        AutoConverge = "auto-converge",
        ZeroBlocks = "zero-blocks",
        /// MIGRATION events on every status change.
        Events = "events",
        /// Allow switching to postcopy (`migrate-start-postcopy`).
        PostcopyRam = "postcopy-ram",
        XColo = "x-colo",
        ReleaseRam = "release-ram",
        ReturnPath = "return-path",
        PauseBeforeSwitchover = "pause-before-switchover",
        Multifd = "multifd",
        DirtyBitmaps = "dirty-bitmaps",
        /// Measure vCPU blocktime and remote fault latency on the
        /// destination (`postcopy-blocktime`, `postcopy-latency*`).
        PostcopyBlocktime = "postcopy-blocktime",
        LateBlockActivate = "late-block-activate",
        XIgnoreShared = "x-ignore-shared",
        ValidateUuid = "validate-uuid",
        BackgroundSnapshot = "background-snapshot",
        ZeroCopySend = "zero-copy-send",
        /// Requested pages on their own connection (postcopy's urgent
        /// channel).
        PostcopyPreempt = "postcopy-preempt",
        SwitchoverAck = "switchover-ack",
        DirtyLimit = "dirty-limit",
        MappedRam = "mapped-ram",
        /// Ours: after serving a request, the background push continues just
        /// after the requested page.
        XPostcopyPrepaging = "x-postcopy-prepaging",
        /// Ours: a lost connection during postcopy is recovered without an
        /// operator (on by default); off, the migration goes to
        /// `postcopy-paused` and waits for `migrate-recover` / `migrate
        /// {resume: true}` as QEMU does.
        XPostcopyAutoRecover = "x-postcopy-auto-recover",
        /// Ours: the guest survives the loss of the destination during
        /// postcopy: the destination runs it under a lease and sends
        /// checkpoints back, from which the source restarts it if the
        /// destination is lost (both sides must turn it on).
        XPostcopyFallback = "x-postcopy-fallback",
    }
}

/// One capability and whether it is on (`MigrationCapabilityStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    pub capability: MigrationCapability,
    pub state: bool,
}

/// The run state (`StatusInfo`). QEMU before 9.1 also had `singlestep`,
/// deprecated in 8.1 and gone since; current QEMU sends these two members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// All vCPUs runnable.
    pub running: bool,
    pub status: RunState,
}

/// Migration parameters (`MigrationParameters` / `MigrateSetParameters`),
/// the subset this VMM has, plus ours. In `migrate-set-parameters` only the
/// members present change; `query-migrate-parameters` returns all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Precopy (background) bandwidth, bytes per second; 0: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Background bandwidth once in postcopy, bytes per second; 0:
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Longest pause of the guest tolerated at the switchover of a precopy
    /// migration, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Ours: precopy rounds before the switch to postcopy (0: pure
    /// postcopy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_precopy_rounds: Option<u64>,
    /// Ours: pages per request frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_request_batch_pages: Option<u64>,
    /// Ours: the connection is declared lost after this long without a
    /// byte from the peer, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_peer_timeout_ms: Option<u64>,
    /// Ours: the longest delay between reconnection attempts, in
    /// milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_reconnect_delay_max_ms: Option<u64>,
    /// Ours: connections the background push is spread over (1-8; set the
    /// same on both sides, the destination accepts at most its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_push_streams: Option<u64>,
    /// Ours, fallback on the source: how long the destination may run the
    /// guest without a renewal, in milliseconds (1 to 3600000; the source
    /// announces it, the destination follows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_fallback_lease_ms: Option<u64>,
    /// Ours, fallback on the destination: how often it takes a checkpoint,
    /// in milliseconds (1 to 3600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_checkpoint_interval_ms: Option<u64>,
    /// The `tls-creds-x509` object the migration's connections use; an
    /// empty string: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name a source checks in the destination's certificate (empty:
    /// the host of the migration URI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// The `authz-list` object of identities accepted from the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

impl MigrationParameters {
    /// Wire names of the members, in declaration order.
    pub const NAMES: [&'static str; 13] = [
        "max-bandwidth",
        "max-postcopy-bandwidth",
        "downtime-limit",
        "x-precopy-rounds",
        "x-request-batch-pages",
        "x-peer-timeout-ms",
        "x-reconnect-delay-max-ms",
        "x-push-streams",
        "x-fallback-lease-ms",
        "x-checkpoint-interval-ms",
        "tls-creds",
        "tls-hostname",
        "tls-authz",
    ];

    /// `self` with every member `other` has replaced.
    pub fn merged(&self, other: &MigrationParameters) -> MigrationParameters {
        MigrationParameters {
            max_bandwidth: other.max_bandwidth.or(self.max_bandwidth),
            max_postcopy_bandwidth: other.max_postcopy_bandwidth.or(self.max_postcopy_bandwidth),
            downtime_limit: other.downtime_limit.or(self.downtime_limit),
            x_precopy_rounds: other.x_precopy_rounds.or(self.x_precopy_rounds),
            x_request_batch_pages: other.x_request_batch_pages.or(self.x_request_batch_pages),
            x_peer_timeout_ms: other.x_peer_timeout_ms.or(self.x_peer_timeout_ms),
            x_reconnect_delay_max_ms: other.x_reconnect_delay_max_ms.or(self.x_reconnect_delay_max_ms),
            x_push_streams: other.x_push_streams.or(self.x_push_streams),
            x_fallback_lease_ms: other.x_fallback_lease_ms.or(self.x_fallback_lease_ms),
            x_checkpoint_interval_ms: other.x_checkpoint_interval_ms.or(self.x_checkpoint_interval_ms),
            tls_creds: other.tls_creds.clone().or_else(|| self.tls_creds.clone()),
            tls_hostname: other.tls_hostname.clone().or_else(|| self.tls_hostname.clone()),
            tls_authz: other.tls_authz.clone().or_else(|| self.tls_authz.clone()),
        }
    }
}

/// RAM statistics of a migration (`MigrationStats`); QEMU sends every
/// member, so do we (0 where a member means nothing here, such as
/// `multifd-bytes`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes of RAM left to send.
    pub remaining: u64,
    /// Bytes of RAM in all.
    pub total: u64,
    /// Zero pages (sent as a marker).
    pub duplicate: u64,
    /// Pages sent with their contents.
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_pages_rate: u64,
    /// Throughput, megabits per second.
    pub mbps: f64,
    /// Times the dirty bitmap was synchronized (precopy rounds).
    pub dirty_sync_count: u64,
    /// Page requests received from the destination.
    pub postcopy_requests: u64,
    pub page_size: u64,
    pub multifd_bytes: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
    pub dirty_sync_missed_zero_copy: u64,
}

/// Ours, under `x-postcopy` in `query-migrate`: what this engine measures
/// beyond QEMU's members. Every member is optional so that either side
/// reports what it knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XPostcopyInfo {
    /// Fault latency percentiles on the destination, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_latency_p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_latency_p90_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_latency_p99_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_latency_max_us: Option<f64>,
    /// Pages sent before the switchover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_precopy: Option<u64>,
    /// Pages pushed in the background after the switchover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_background: Option<u64>,
    /// Pages sent because the destination asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_requested: Option<u64>,
    /// Connection losses recovered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recoveries: Option<u64>,
    /// Digest of the guest's memory on this side, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_digest: Option<String>,
    /// Whether the destination's memory matched the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Estimated time to completion, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// Fallback, on the source: checkpoints committed into the fallback
    /// image (the guest would restart from the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints_committed: Option<u64>,
    /// Fallback, on the source: the committed checkpoints' page bytes
    /// (zero pages count none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_bytes: Option<u64>,
    /// Fallback, on the source: checkpoints cut off (a lost connection)
    /// and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints_discarded: Option<u64>,
    /// Fallback, on the source after a takeover: the checkpoint the guest
    /// restarted from here (0: the state it stopped in at the switchover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_from_checkpoint: Option<u64>,
    /// Fallback, on both sides: the lease in force, milliseconds (the
    /// source's setting; the destination follows what the source
    /// announced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// Fallback, on the destination: how often it takes a checkpoint,
    /// milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_ms: Option<u64>,
    /// Fallback, on the destination: checkpoints taken and sent back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints_taken: Option<u64>,
}

/// The answer to `query-migrate` (`MigrationInfo`): everything optional, as
/// in QEMU (`{}` before any migration).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// Milliseconds since the migration started (its whole length once it
    /// ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// While active: the expected pause of the guest, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Once completed: how long the guest did not run, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Milliseconds between the command and the first page sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_reasons: Option<Vec<String>>,
    /// Destination: total time all vCPUs were blocked at once, ms
    /// (`postcopy-blocktime` capability).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_blocktime: Option<u32>,
    /// Destination: blocked time per vCPU, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_vcpu_blocktime: Option<Vec<u32>>,
    /// Destination: average remote fault latency, nanoseconds (QEMU 10.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_latency: Option<u64>,
    /// Destination: remote faults per latency bucket; bucket N counts the
    /// faults resolved in [2^N, 2^(N+1)) microseconds (QEMU 10.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_latency_dist: Option<Vec<u64>>,
    /// Destination: average remote fault latency per vCPU, nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_vcpu_latency: Option<Vec<u64>>,
    /// Destination: average latency of faults not raised by a vCPU,
    /// nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_non_vcpu_latency: Option<u64>,
    /// Ours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_postcopy: Option<XPostcopyInfo>,
}

/// The bucket of `postcopy-latency-dist` a latency falls in: the N with
/// 2^N <= latency_us < 2^(N+1) (latencies under 1 us count in bucket 0).
pub fn latency_bucket(latency_us: u64) -> usize {
    (u64::BITS - 1).saturating_sub(latency_us.max(1).leading_zeros()) as usize
}

/// QEMU's version triple (`VersionTriple`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// The answer to `query-version` and the greeting's `version`
/// (`VersionInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    pub package: String,
}

/// One entry of `query-commands` (`CommandInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    pub name: String,
}

qapi_enum! {
    /// Protocol capabilities offered in the greeting (`QMPCapability`).
    QmpCapability {
        /// Out-of-band commands (`exec-oob`).
        Oob = "oob",
    }
}

/// An event's time (`{"seconds": ..., "microseconds": ...}`), since the
/// Unix epoch. An input of the protocol layer, never read from a clock
/// there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn from_system_time(time: std::time::SystemTime) -> Timestamp {
        // A clock before 1970 reads as the epoch rather than failing.
        let since = time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp { seconds: since.as_secs(), microseconds: since.subsec_micros() }
    }

    pub fn now() -> Timestamp {
        Timestamp::from_system_time(std::time::SystemTime::now())
    }
}

/// An asynchronous event, as QEMU names it and its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest stopped running.
    Stop,
    /// The guest runs again.
    Resume,
    /// The VM shut down; the process exits after it.
    Shutdown { guest: bool, reason: ShutdownCause },
    /// The migration's status changed (with the `events` capability on).
    Migration { status: MigrationStatus },
    /// A new pass over RAM began (a precopy round).
    MigrationPass { pass: u64 },
}

impl Event {
    pub const NAMES: [&'static str; 5] = ["STOP", "RESUME", "SHUTDOWN", "MIGRATION", "MIGRATION_PASS"];

    /// The event QEMU sends when the guest's run state goes from `was` to
    /// `now`: STOP when it stops running, RESUME when it starts, none when
    /// it only moves between states where it does not run.
    pub fn for_run_state_change(was: RunState, now: RunState) -> Option<Event> {
        match (was == RunState::Running, now == RunState::Running) {
            (true, false) => Some(Event::Stop),
            (false, true) => Some(Event::Resume),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Event::Stop => "STOP",
            Event::Resume => "RESUME",
            Event::Shutdown { .. } => "SHUTDOWN",
            Event::Migration { .. } => "MIGRATION",
            Event::MigrationPass { .. } => "MIGRATION_PASS",
        }
    }

    /// The event's `data` member; `None` where QEMU sends none.
    pub fn data(&self) -> Option<serde_json::Value> {
        match self {
            Event::Stop | Event::Resume => None,
            Event::Shutdown { guest, reason } => Some(serde_json::json!({ "guest": guest, "reason": reason })),
            Event::Migration { status } => Some(serde_json::json!({ "status": status })),
            Event::MigrationPass { pass } => Some(serde_json::json!({ "pass": pass })),
        }
    }

    /// The event back from its name and data (what a client receives).
    pub fn from_parts(name: &str, data: Option<&serde_json::Value>) -> Option<Event> {
        let member = |key: &str| data.and_then(|d| d.get(key));
        match name {
            "STOP" => Some(Event::Stop),
            "RESUME" => Some(Event::Resume),
            "SHUTDOWN" => Some(Event::Shutdown {
                guest: member("guest")?.as_bool()?,
                reason: member("reason")?.as_str()?.parse().ok()?,
            }),
            "MIGRATION" => Some(Event::Migration { status: member("status")?.as_str()?.parse().ok()? }),
            "MIGRATION_PASS" => Some(Event::MigrationPass { pass: member("pass")?.as_u64()? }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_leaving_or_entering_running_sends_stop_or_resume() {
        use RunState::*;
        assert_eq!(Event::for_run_state_change(Running, Postmigrate), Some(Event::Stop));
        assert_eq!(Event::for_run_state_change(Inmigrate, Running), Some(Event::Resume));
        assert_eq!(Event::for_run_state_change(Running, Running), None);
        assert_eq!(Event::for_run_state_change(FinishMigrate, Postmigrate), None);
    }

    #[test]
    fn enums_use_qemu_wire_names() {
        assert_eq!(serde_json::to_string(&RunState::FinishMigrate).unwrap(), "\"finish-migrate\"");
        assert_eq!(serde_json::to_string(&MigrationStatus::PostcopyRecover).unwrap(), "\"postcopy-recover\"");
        assert_eq!("postcopy-preempt".parse::<MigrationCapability>(), Ok(MigrationCapability::PostcopyPreempt));
        assert!("postcopy_ram".parse::<MigrationCapability>().is_err());
        for (value, name) in MigrationCapability::ALL.iter().zip(MigrationCapability::NAMES) {
            assert_eq!(value.as_str(), *name);
            assert_eq!(name.parse::<MigrationCapability>(), Ok(*value));
        }
    }

    #[test]
    fn empty_migration_info_is_an_empty_object() {
        assert_eq!(serde_json::to_value(MigrationInfo::default()).unwrap(), serde_json::json!({}));
    }

    #[test]
    fn migration_info_members_are_qemus() {
        let info = MigrationInfo {
            status: Some(MigrationStatus::PostcopyActive),
            ram: Some(MigrationStats { remaining: 5, postcopy_requests: 2, ..Default::default() }),
            total_time: Some(10),
            postcopy_latency_dist: Some(vec![0, 3]),
            x_postcopy: Some(XPostcopyInfo { recoveries: Some(1), ..Default::default() }),
            ..Default::default()
        };
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["status"], "postcopy-active");
        assert_eq!(json["total-time"], 10);
        assert_eq!(json["ram"]["postcopy-requests"], 2);
        assert_eq!(json["ram"]["dirty-sync-count"], 0);
        assert_eq!(json["postcopy-latency-dist"], serde_json::json!([0, 3]));
        assert_eq!(json["x-postcopy"], serde_json::json!({"recoveries": 1}));
        assert!(json.get("downtime").is_none());
        let fallback = XPostcopyInfo {
            checkpoints_committed: Some(3),
            checkpoint_bytes: Some(4096),
            checkpoints_discarded: Some(0),
            restarted_from_checkpoint: Some(3),
            checkpoints_taken: Some(4),
            lease_ms: Some(600),
            checkpoint_interval_ms: Some(50),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&fallback).unwrap(),
            serde_json::json!({"checkpoints-committed": 3, "checkpoint-bytes": 4096, "checkpoints-discarded": 0,
                "restarted-from-checkpoint": 3, "checkpoints-taken": 4, "lease-ms": 600,
                "checkpoint-interval-ms": 50})
        );
    }

    #[test]
    fn latency_buckets_are_log2_microseconds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(2), 1);
        assert_eq!(latency_bucket(3), 1);
        assert_eq!(latency_bucket(256), 8);
        assert_eq!(latency_bucket(511), 8);
        assert_eq!(latency_bucket(512), 9);
    }

    #[test]
    fn events_round_trip_through_their_parts() {
        let events = [
            Event::Stop,
            Event::Resume,
            Event::Shutdown { guest: false, reason: ShutdownCause::HostQmpQuit },
            Event::Migration { status: MigrationStatus::PostcopyPaused },
            Event::MigrationPass { pass: 3 },
        ];
        for event in events {
            assert_eq!(Event::from_parts(event.name(), event.data().as_ref()), Some(event.clone()));
        }
        assert_eq!(Event::from_parts("MIGRATION", None), None);
    }
}
