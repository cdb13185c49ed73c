//! QMP costs nothing on the fault path: a 1 GiB pure-postcopy migration of
//! a 1-vCPU guest without pre-paging (the bench's fault-heavy workload:
//! the guest faults on the pages it touches before the push brings them)
//! between two `postcopy run` processes, with and without a client
//! polling `query-migrate` every 10 ms on both sides. Prints the
//! destination's fault latency p50/p99 and the total time of each run,
//! their medians, and the ratios (polled / quiet).
//!
//! A measurement, not a pass/fail check of a shared machine's noise:
//! ignored by default. Run it with `scripts/qmp-polling-cost` (or
//! `cargo test --release -p postcopy-e2e --test qmp_polling_cost --
//! --ignored --nocapture`); `POSTCOPY_QMP_COST_REPEAT` (default 3) runs of
//! each kind alternate, `POSTCOPY_QMP_COST_MEM` (default 1G) is the RAM,
//! `POSTCOPY_QMP_COST_ARGS` adds `postcopy run` options to both processes
//! (for example the bench's placement: `--vcpu-cpu 1 --latency-cpu 1
//! --bulk-cpu 0`).

mod common;
mod hosts;
mod vmm;

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{kvm_or_skip, serial, temp_dir};
use postcopy_qmp::{Command as Qmp, MigrationCapability, MigrationCapabilityStatus, MigrationStatus, QmpClient};
use vmm::{assert_hop_verified, Vmm};

/// The polling period of an orchestrator watching closely.
const POLL_PERIOD: Duration = Duration::from_millis(10);

/// What one migration measured.
#[derive(Clone, Copy, Debug)]
struct Figures {
    fault_p50_us: f64,
    fault_p99_us: f64,
    total_ms: u64,
    faults: u64,
    polls: u64,
    /// Mean round trip of a `query-migrate`, microseconds (0: quiet).
    poll_us: f64,
}

/// A client on `socket` asking `query-migrate` every 10 ms until the
/// migration ended or `stop` is set; how many replies it got, and the sum
/// of their round trips. It runs on `cpu` when given: an orchestrator's
/// place is with the bulk work, not beside the fault path.
fn poller(socket: &Path, cpu: Option<usize>, stop: Arc<AtomicBool>) -> JoinHandle<(u64, Duration)> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        postcopy_kvm::driver::pin_self(cpu, "qmp-poller");
        let mut client = QmpClient::connect_negotiated(&socket).expect("the poller connects");
        let (mut polls, mut busy) = (0, Duration::ZERO);
        let mut next = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let asked = Instant::now();
            let info = client.query_migrate().expect("query-migrate");
            busy += asked.elapsed();
            polls += 1;
            if info.status.is_some_and(|s| !s.is_running()) {
                break;
            }
            next += POLL_PERIOD;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (polls, busy)
    })
}

/// The `--bulk-cpu` among the `run` options, if any.
fn bulk_cpu(run_options: &[&str]) -> Option<usize> {
    let at = run_options.iter().position(|o| *o == "--bulk-cpu")?;
    run_options.get(at + 1)?.parse().ok()
}

/// One migration of `mem` RAM over loopback, polled or quiet.
fn migrate_once(dir: &Path, mem: &str, extra: &[&str], polled: bool) -> Figures {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("run dir");
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let source_args = [&["--mem", mem, "--vcpus", "1"], extra].concat();
    let mut source = Vmm::start(dir, "source", &source_args);
    // Preallocated, as the bench's destination: first touches of fresh
    // memory during the migration cost the host's reclaim, which varies
    // run to run far more than what is measured here.
    let mut dest = Vmm::start(dir, "dest", &[&["--incoming", "defer", "--prealloc", mem], extra].concat());
    // Both wait for the end on MIGRATION events, not by asking; no
    // pre-paging around faults, as the bench's fault-heavy workload.
    let capabilities = vec![
        MigrationCapabilityStatus { capability: MigrationCapability::Events, state: true },
        MigrationCapabilityStatus { capability: MigrationCapability::XPostcopyPrepaging, state: false },
    ];
    for vmm in [&mut source, &mut dest] {
        vmm.execute(Qmp::MigrateSetCapabilities { capabilities: capabilities.clone() });
    }
    dest.listen(format!("tcp:127.0.0.1:{port}"));
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = if polled {
        [&source, &dest].iter().map(|v| poller(&v.socket, bulk_cpu(extra), stop.clone())).collect()
    } else {
        Vec::new()
    };
    source.migrate(format!("tcp:127.0.0.1:{port}"));
    let source_end = source.wait_ended_by_events();
    let dest_end = dest.wait_ended_by_events();
    stop.store(true, Ordering::SeqCst);
    let (polls, busy) = pollers
        .into_iter()
        .map(|p| p.join().expect("poller"))
        .fold((0, Duration::ZERO), |(n, t), (polls, busy)| (n + polls, t + busy));
    assert_eq!(source_end, MigrationStatus::Completed, "{}", source.stderr_text());
    assert_eq!(dest_end, MigrationStatus::Completed, "{}", dest.stderr_text());
    let sent = source.qmp.query_migrate().expect("query-migrate");
    let arrived = dest.qmp.query_migrate().expect("query-migrate");
    let x = arrived.x_postcopy.expect("the destination's x-postcopy");
    let figures = Figures {
        fault_p50_us: x.fault_latency_p50_us.expect("p50"),
        fault_p99_us: x.fault_latency_p99_us.expect("p99"),
        total_ms: sent.total_time.expect("total-time"),
        faults: x.pages_requested.unwrap_or(0),
        polls,
        poll_us: if polls == 0 { 0.0 } else { busy.as_secs_f64() * 1e6 / polls as f64 },
    };
    assert_hop_verified(&mut source, &mut dest, 1);
    source.quit();
    dest.quit();
    figures
}

/// Picks one figure of a run (None: the run has none, such as a fault
/// latency when the guest never faulted).
type Pick = fn(&Figures) -> Option<f64>;

/// The median of `runs`' figure, and its range as "min-max".
fn median_and_range(runs: &[Figures], pick: Pick) -> (f64, String) {
    let mut values: Vec<f64> = runs.iter().filter_map(pick).collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return (f64::NAN, "-".into());
    }
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    (median, format!("{:.0}-{:.0}", values[0], values[n - 1]))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture (scripts/qmp-polling-cost)"]
fn polling_query_migrate_every_10_ms_does_not_slow_the_fault_path() {
    if !kvm_or_skip("polling_query_migrate_every_10_ms_does_not_slow_the_fault_path") {
        return;
    }
    let _one = serial();
    let repeat: usize = std::env::var("POSTCOPY_QMP_COST_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mem = std::env::var("POSTCOPY_QMP_COST_MEM").unwrap_or_else(|_| "1G".into());
    let extra = std::env::var("POSTCOPY_QMP_COST_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let dir = temp_dir("qmp-polling-cost");
    println!(
        "QMP polling cost: {repeat} x ({mem} pure postcopy quiet, and polled every 10 ms on both sides); run options {extra:?}"
    );
    println!("load average before: {}", load_average());
    let (mut quiet, mut polled) = (Vec::new(), Vec::new());
    println!(
        "{:>6} {:>4} {:>12} {:>12} {:>10} {:>9} {:>6} {:>8}",
        "kind", "run", "fault p50us", "fault p99us", "total ms", "faults", "polls", "poll us"
    );
    for run in 1..=repeat {
        // Alternating which kind goes first spreads any drift of the
        // machine's load over both.
        let order = if run % 2 == 1 { [false, true] } else { [true, false] };
        for is_polled in order {
            let f = migrate_once(&dir.join(format!("run{run}-{is_polled}")), &mem, &extra, is_polled);
            let kind = if is_polled { "polled" } else { "quiet" };
            println!(
                "{kind:>6} {run:>4} {:>12.1} {:>12.1} {:>10} {:>9} {:>6} {:>8.0}",
                f.fault_p50_us, f.fault_p99_us, f.total_ms, f.faults, f.polls, f.poll_us
            );
            if is_polled {
                // About one poll per side per 10 ms: the polling happened.
                assert!(f.polls as f64 >= f.total_ms as f64 / 10.0, "too few polls: {f:?}");
                polled.push(f);
            } else {
                assert_eq!(f.polls, 0);
                quiet.push(f);
            }
        }
    }
    println!("load average after: {}", load_average());
    println!("(fault latencies: medians over the runs whose guest faulted at least once)");
    let rows: [(&str, Pick); 4] = [
        ("fault latency p50 (us)", |f| (f.faults > 0).then_some(f.fault_p50_us)),
        ("fault latency p99 (us)", |f| (f.faults > 0).then_some(f.fault_p99_us)),
        ("total time (ms)", |f| Some(f.total_ms as f64)),
        ("pages faulted for", |f| Some(f.faults as f64)),
    ];
    println!(
        "{:<24} {:>10} {:>10} {:>8}   {:>13} {:>13}",
        "median", "quiet", "polled", "ratio", "quiet range", "polled range"
    );
    for (name, pick) in rows {
        let ((q, q_range), (p, p_range)) = (median_and_range(&quiet, pick), median_and_range(&polled, pick));
        println!("{name:<24} {q:>10.1} {p:>10.1} {:>8.3}   {q_range:>13} {p_range:>13}", p / q);
    }
}
