//! Property tests: typed replies survive JSON both ways, every typed command
//! survives the client's encoding and the server's parsing (through the
//! session, as bytes), and the session's framing does not depend on how the
//! bytes are chunked.

use postcopy_qmp::*;
use proptest::collection::vec;
use proptest::option::of;
use proptest::prelude::*;
use serde_json::Value;

fn any_of<T: Copy + std::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(all)
}

/// Finite floats only: JSON has no NaN or infinity (serde_json writes
/// `null` for them), and QEMU never sends them.
fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), -1e12f64..1e12, proptest::num::f64::NORMAL]
}

fn stats() -> impl Strategy<Value = MigrationStats> {
    (vec(any::<u64>(), 16), finite()).prop_map(|(n, mbps)| MigrationStats {
        transferred: n[0],
        remaining: n[1],
        total: n[2],
        duplicate: n[3],
        normal: n[4],
        normal_bytes: n[5],
        dirty_pages_rate: n[6],
        mbps,
        dirty_sync_count: n[7],
        postcopy_requests: n[8],
        page_size: n[9],
        multifd_bytes: n[10],
        pages_per_second: n[11],
        precopy_bytes: n[12],
        downtime_bytes: n[13],
        postcopy_bytes: n[14],
        dirty_sync_missed_zero_copy: n[15],
    })
}

fn x_postcopy() -> impl Strategy<Value = XPostcopyInfo> {
    (
        (of(finite()), of(finite()), of(finite()), of(finite())),
        (of(any::<u64>()), of(any::<u64>()), of(any::<u64>()), of(any::<u64>())),
        (of("[0-9a-f]{0,64}"), of(any::<bool>()), of(any::<u64>())),
        (of(any::<u64>()), of(any::<u64>()), of(any::<u64>()), of(any::<u64>()), of(any::<u64>())),
        (of(any::<u64>()), of(any::<u64>())),
    )
        .prop_map(|((p50, p90, p99, max), (pre, bg, req, rec), (digest, verified, eta), fallback, timing)| {
            XPostcopyInfo {
                fault_latency_p50_us: p50,
                fault_latency_p90_us: p90,
                fault_latency_p99_us: p99,
                fault_latency_max_us: max,
                pages_precopy: pre,
                pages_background: bg,
                pages_requested: req,
                recoveries: rec,
                memory_digest: digest,
                verified,
                eta_ms: eta,
                checkpoints_committed: fallback.0,
                checkpoint_bytes: fallback.1,
                checkpoints_discarded: fallback.2,
                restarted_from_checkpoint: fallback.3,
                checkpoints_taken: fallback.4,
                lease_ms: timing.0,
                checkpoint_interval_ms: timing.1,
            }
        })
}

fn migration_info() -> impl Strategy<Value = MigrationInfo> {
    (
        (of(any_of(MigrationStatus::ALL)), of(stats()), of(any::<u64>()), of(any::<u64>()), of(any::<u64>())),
        (
            of(any::<u64>()),
            of("\\PC{0,40}"),
            of(vec("\\PC{0,20}", 0..3)),
            of(any::<u32>()),
            of(vec(any::<u32>(), 0..8)),
        ),
        (
            of(any::<u64>()),
            of(vec(any::<u64>(), 0..24)),
            of(vec(any::<u64>(), 0..8)),
            of(any::<u64>()),
            of(x_postcopy()),
        ),
    )
        .prop_map(|(a, b, c)| MigrationInfo {
            status: a.0,
            ram: a.1,
            total_time: a.2,
            expected_downtime: a.3,
            downtime: a.4,
            setup_time: b.0,
            error_desc: b.1,
            blocked_reasons: b.2,
            postcopy_blocktime: b.3,
            postcopy_vcpu_blocktime: b.4,
            postcopy_latency: c.0,
            postcopy_latency_dist: c.1,
            postcopy_vcpu_latency: c.2,
            postcopy_non_vcpu_latency: c.3,
            x_postcopy: c.4,
        })
}

fn parameters() -> impl Strategy<Value = MigrationParameters> {
    (vec(of(any::<u64>()), 10), vec(of("[a-z0-9.-]{0,16}"), 3)).prop_map(|(p, t)| MigrationParameters {
        max_bandwidth: p[0],
        max_postcopy_bandwidth: p[1],
        downtime_limit: p[2],
        x_precopy_rounds: p[3],
        x_request_batch_pages: p[4],
        x_peer_timeout_ms: p[5],
        x_reconnect_delay_max_ms: p[6],
        x_push_streams: p[7],
        x_fallback_lease_ms: p[8],
        x_checkpoint_interval_ms: p[9],
        tls_creds: t[0].clone(),
        tls_hostname: t[1].clone(),
        tls_authz: t[2].clone(),
    })
}

fn capability_status() -> impl Strategy<Value = MigrationCapabilityStatus> {
    (any_of(MigrationCapability::ALL), any::<bool>())
        .prop_map(|(capability, state)| MigrationCapabilityStatus { capability, state })
}

/// Every command but the control ones, with arbitrary arguments.
fn vm_command() -> impl Strategy<Value = Command> {
    let uri = "tcp:[a-z0-9.]{1,12}:[0-9]{1,5}|\\PC{0,20}";
    prop_oneof![
        Just(Command::QueryStatus),
        Just(Command::Stop),
        Just(Command::Cont),
        Just(Command::Quit),
        vec(capability_status(), 0..6).prop_map(|capabilities| Command::MigrateSetCapabilities { capabilities }),
        Just(Command::QueryMigrateCapabilities),
        parameters().prop_map(Command::MigrateSetParameters),
        Just(Command::QueryMigrateParameters),
        (uri, any::<bool>()).prop_map(|(uri, resume)| Command::Migrate(MigrateArgs { uri, resume })),
        (uri, of(any::<bool>()))
            .prop_map(|(uri, exit_on_error)| Command::MigrateIncoming(MigrateIncomingArgs { uri, exit_on_error })),
        Just(Command::MigrateStartPostcopy),
        Just(Command::MigrateCancel),
        Just(Command::MigratePause),
        uri.prop_map(|uri| Command::MigrateRecover { uri }),
        Just(Command::QueryMigrate),
    ]
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let text = serde_json::to_string(value).unwrap();
    serde_json::from_str(&text).unwrap()
}

proptest! {
    #[test]
    fn migration_info_round_trips(info in migration_info()) {
        prop_assert_eq!(round_trip(&info), info.clone());
        // Absent members are left out, as QEMU leaves them out.
        let json = serde_json::to_value(&info).unwrap();
        prop_assert_eq!(json.get("downtime").is_some(), info.downtime.is_some());
        prop_assert!(json.as_object().unwrap().values().all(|v| !v.is_null()));
    }

    #[test]
    fn other_replies_round_trip(
        parameters in parameters(),
        capabilities in vec(capability_status(), 0..30),
        status in (any::<bool>(), any_of(RunState::ALL)),
    ) {
        prop_assert_eq!(round_trip(&parameters), parameters);
        prop_assert_eq!(round_trip(&capabilities), capabilities);
        let status = StatusInfo { running: status.0, status: status.1 };
        prop_assert_eq!(round_trip(&status), status);
    }

    #[test]
    fn commands_survive_the_wire(command in vm_command(), id in any::<u32>()) {
        // As the client sends it, as bytes through a negotiated session.
        let mut request = serde_json::json!({ "execute": command.name(), "id": id });
        if let Some(arguments) = command.arguments() {
            request["arguments"] = Value::Object(arguments);
        }
        let mut session = Session::new(SessionConfig::default());
        session.push(b"{\"execute\":\"qmp_capabilities\"}\n");
        prop_assert!(matches!(session.poll(), Some(Step::Reply(_))));
        session.push(request.to_string().as_bytes());
        match session.poll() {
            Some(Step::Execute(got)) => {
                prop_assert_eq!(got.command, command);
                prop_assert_eq!(got.id, Some(serde_json::json!(id)));
            }
            other => prop_assert!(false, "expected an Execute step, got {:?}", other),
        }
    }

    #[test]
    fn chunking_does_not_change_what_the_session_does(
        requests in vec(vm_command(), 1..6),
        cuts in vec(1usize..64, 1..16),
    ) {
        let mut stream = b"{\"execute\":\"qmp_capabilities\"}".to_vec();
        for (id, command) in requests.iter().enumerate() {
            let mut request = serde_json::json!({ "execute": command.name(), "id": id });
            if let Some(arguments) = command.arguments() {
                request["arguments"] = Value::Object(arguments);
            }
            stream.extend(request.to_string().as_bytes());
            stream.extend(b"\r\n");
        }
        let run = |sizes: &mut dyn Iterator<Item = usize>| {
            let mut session = Session::new(SessionConfig::default());
            let mut steps = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let size = sizes.next().unwrap_or(stream.len()).min(stream.len() - at);
                session.push(&stream[at..at + size]);
                at += size;
                steps.extend(std::iter::from_fn(|| session.poll()));
            }
            steps
        };
        let whole = run(&mut std::iter::empty());
        let chunked = run(&mut cuts.iter().copied().cycle());
        prop_assert_eq!(whole.len(), requests.len() + 1);
        prop_assert_eq!(chunked, whole);
    }
}
