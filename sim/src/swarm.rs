//! Many seeds: the swarm (a configuration per seed, faults then healing)
//! and `compare` (the same seeds under different policies).

use serde::Serialize;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::report::RunResult;
use crate::scenario::Scenario;
use crate::sim::Sim;

/// Runs one scenario.
pub fn run(scenario: Scenario, tail: usize) -> RunResult {
    Sim::new(scenario, tail).run()
}

/// Runs `seeds` scenarios (each the seed's draw plus `overrides`) on `jobs`
/// threads; results come back in seed order whatever the threads did.
pub fn run_many(
    seeds: impl Iterator<Item = u64>,
    overrides: &[(String, String)],
    jobs: usize,
    tail: usize,
) -> Result<Vec<RunResult>, String> {
    let scenarios: Vec<Scenario> =
        seeds.map(|seed| Scenario::with_overrides(seed, overrides)).collect::<Result<_, _>>()?;
    let next = AtomicU64::new(0);
    let results = Mutex::new(Vec::with_capacity(scenarios.len()));
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(scenario) = scenarios.get(i) else { break };
                let result = run(scenario.clone(), tail);
                if let Ok(mut results) = results.lock() {
                    results.push((i, result));
                }
            });
        }
    });
    let mut results = results.into_inner().map_err(|_| "a simulation thread panicked".to_owned())?;
    if results.len() != scenarios.len() {
        return Err("a simulation thread panicked".into());
    }
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

/// What a swarm found.
#[derive(Clone, Debug, Serialize)]
pub struct SwarmSummary {
    pub seeds: u64,
    pub passed: u64,
    pub failed: Vec<u64>,
    pub real_secs: f64,
    pub sim_secs: f64,
    pub page_transfers: u64,
    pub transfers_per_sec: f64,
    pub faulted_runs: u64,
    pub recovered_runs: u64,
    pub retried_runs: u64,
    /// Fallback: runs where the source took the guest back.
    pub fell_back_runs: u64,
    /// Fallback: runs where the destination abandoned a checkpoint.
    pub abandoned_runs: u64,
}

pub fn summarise(results: &[RunResult], real_secs: f64) -> SwarmSummary {
    let transfers: u64 = results.iter().map(|r| r.page_transfers).sum();
    SwarmSummary {
        seeds: results.len() as u64,
        passed: results.iter().filter(|r| r.passed()).count() as u64,
        failed: results.iter().filter(|r| !r.passed()).map(|r| r.seed).collect(),
        real_secs,
        sim_secs: results.iter().map(|r| r.sim_ms).sum::<f64>() / 1e3,
        page_transfers: transfers,
        transfers_per_sec: transfers as f64 / real_secs.max(1e-9),
        faulted_runs: results.iter().filter(|r| r.options.contains(" faults=true")).count() as u64,
        recovered_runs: results.iter().filter(|r| r.report.recoveries > 0).count() as u64,
        retried_runs: results.iter().filter(|r| r.attempts > 1).count() as u64,
        fell_back_runs: results.iter().filter(|r| r.outcome == "fell-back").count() as u64,
        abandoned_runs: results.iter().filter(|r| r.report.checkpoints_abandoned > 0).count() as u64,
    }
}

/// Runs a swarm and returns its results and summary.
pub fn swarm(
    first: u64,
    seeds: u64,
    overrides: &[(String, String)],
    jobs: usize,
    tail: usize,
) -> Result<(Vec<RunResult>, SwarmSummary), String> {
    let start = Instant::now();
    let results = run_many(first..first + seeds, overrides, jobs, tail)?;
    let summary = summarise(&results, start.elapsed().as_secs_f64());
    Ok((results, summary))
}

/// Runs consecutive seeds from `first`, a batch at a time, until `duration`
/// has passed or a seed fails; returns the failing runs and the summary of
/// every seed run. `progress` sees each batch's summary as it ends.
pub fn swarm_for(
    first: u64,
    duration: Duration,
    overrides: &[(String, String)],
    jobs: usize,
    tail: usize,
    mut progress: impl FnMut(&SwarmSummary),
) -> Result<(Vec<RunResult>, SwarmSummary), String> {
    let start = Instant::now();
    // Enough seeds per batch to keep every thread busy, few enough that the
    // time limit is kept to within a batch.
    let batch = 8 * jobs.max(1) as u64;
    let mut next = first;
    let mut failures = Vec::new();
    let mut total = summarise(&[], 0.0);
    while start.elapsed() < duration && failures.is_empty() {
        let results = run_many(next..next.saturating_add(batch), overrides, jobs, tail)?;
        next = next.saturating_add(batch);
        let batch_summary = summarise(&results, 0.0);
        total.merge(&batch_summary);
        total.real_secs = start.elapsed().as_secs_f64();
        total.transfers_per_sec = total.page_transfers as f64 / total.real_secs.max(1e-9);
        progress(&total);
        failures.extend(results.into_iter().filter(|r| !r.passed()));
    }
    Ok((failures, total))
}

impl SwarmSummary {
    /// Adds another set of runs' counts (the times are the caller's).
    fn merge(&mut self, other: &SwarmSummary) {
        self.seeds += other.seeds;
        self.passed += other.passed;
        self.failed.extend(&other.failed);
        self.sim_secs += other.sim_secs;
        self.page_transfers += other.page_transfers;
        self.faulted_runs += other.faulted_runs;
        self.recovered_runs += other.recovered_runs;
        self.retried_runs += other.retried_runs;
        self.fell_back_runs += other.fell_back_runs;
        self.abandoned_runs += other.abandoned_runs;
    }
}

/// One line per run, for the swarm's log.
pub fn run_line(r: &RunResult) -> String {
    let field = |key: &str| {
        r.options.split(' ').find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('='))).unwrap_or("?")
    };
    format!(
        "seed {:>6}  {:<10} pages={:<8} mode={:<9} urgent={:<5} faults={:<5} attempts={} recoveries={} sim={:.1}ms real={:.0}ms",
        r.seed,
        r.outcome,
        field("pages"),
        field("mode"),
        field("urgent"),
        field("faults"),
        r.attempts,
        r.report.recoveries,
        r.sim_ms,
        r.real_ms
    )
}

/// What to print for a failing seed: the replay command, the violations
/// and the tail of the trace.
pub fn failure_report(r: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "FAILED seed {}: replay with: {}", r.seed, r.replay);
    for v in &r.violations {
        let _ = writeln!(out, "  violation: {v}");
    }
    for n in &r.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    let _ = writeln!(out, "  options: {}", r.options);
    if !r.tail.is_empty() {
        let _ = writeln!(out, "  last {} trace records:", r.tail.len());
        for line in &r.tail {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}

/// The policies `compare` puts side by side: each a name and its overrides.
pub fn policies() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    let base = [
        ("mode", "postcopy"),
        ("urgent", "true"),
        ("prepaging", "true"),
        ("batch_pages", "64"),
        ("push_streams", "1"),
        ("stream_page_ns", "0"),
    ];
    let with = |changes: &[(&'static str, &'static str)]| {
        let mut list = base.to_vec();
        for &(key, value) in changes {
            match list.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => list.push((key, value)),
            }
        }
        list
    };
    // Several push streams where one stream's CPU is the bottleneck: 2 us
    // of sender/receiver CPU per 4 KiB page (16 Gbit/s a stream) on a
    // 40 Gbit/s link.
    let cpu_bound = |streams: &'static str| {
        with(&[("push_streams", streams), ("stream_page_ns", "2000"), ("bandwidth_mbps", "40000")])
    };
    vec![
        ("postcopy", with(&[])),
        ("no-urgent", with(&[("urgent", "false")])),
        ("no-prepaging", with(&[("prepaging", "false")])),
        ("batch-1", with(&[("batch_pages", "1")])),
        ("batch-1024", with(&[("batch_pages", "1024")])),
        ("hybrid:1", with(&[("mode", "hybrid:1")])),
        ("hybrid:2", with(&[("mode", "hybrid:2")])),
        ("fast-link,free-cpu", with(&[("bandwidth_mbps", "40000")])),
        ("cpu-bound,1-stream", cpu_bound("1")),
        ("cpu-bound,2-streams", cpu_bound("2")),
        ("cpu-bound,3-streams", cpu_bound("3")),
    ]
}

/// Means over the seeds of one policy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyRow {
    pub policy: String,
    pub runs: u64,
    pub passed: u64,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub remote_faults: f64,
    pub fault_p50_us: f64,
    pub fault_p99_us: f64,
    pub fault_max_us: f64,
    pub vcpu_blocked_ms: f64,
    pub postcopy_vs_before: f64,
    pub network_mib: f64,
    pub pages_sent: f64,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0u64), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Runs every policy on the same seeds (fault-free, `pages` pages each).
pub fn compare(
    first: u64,
    seeds: u64,
    extra: &[(String, String)],
    jobs: usize,
) -> Result<(Vec<PolicyRow>, Vec<Vec<RunResult>>), String> {
    let mut rows = Vec::new();
    let mut all = Vec::new();
    for (name, overrides) in policies() {
        let mut list: Vec<(String, String)> = vec![
            ("faults".into(), "false".into()),
            ("switch_after_ms".into(), "0".into()),
            ("pages".into(), "65536".into()),
        ];
        list.extend(extra.iter().cloned());
        list.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let results = run_many(first..first + seeds, &list, jobs, 0)?;
        let ok: Vec<&RunResult> = results.iter().filter(|r| r.passed()).collect();
        let pick = |f: &dyn Fn(&RunResult) -> f64| mean(ok.iter().map(|r| f(r)));
        rows.push(PolicyRow {
            policy: name.into(),
            runs: results.len() as u64,
            passed: ok.len() as u64,
            total_ms: pick(&|r| r.report.total_ms.unwrap_or(0.0)),
            downtime_ms: pick(&|r| r.report.downtime_ms.unwrap_or(0.0)),
            remote_faults: pick(&|r| r.report.remote_faults as f64),
            fault_p50_us: pick(&|r| r.report.fault_latency.p50_us),
            fault_p99_us: pick(&|r| r.report.fault_latency.p99_us),
            fault_max_us: pick(&|r| r.report.fault_latency.max_us),
            vcpu_blocked_ms: pick(&|r| r.report.vcpu_blocked_ms_total),
            postcopy_vs_before: pick(&|r| r.report.guest.postcopy_vs_before.unwrap_or(0.0)),
            network_mib: pick(&|r| r.report.network_bytes as f64 / 1048576.0),
            pages_sent: pick(&|r| r.report.pages_sent.total() as f64),
        });
        all.push(results);
    }
    Ok((rows, all))
}

/// The side-by-side table: a column per policy.
pub fn compare_table(rows: &[PolicyRow]) -> String {
    let mut out = String::new();
    let _ = write!(out, "| metric (mean over seeds) |");
    for row in rows {
        let _ = write!(out, " {} |", row.policy);
    }
    let _ = write!(out, "\n|---|");
    for _ in rows {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    type Metric<'a> = (&'a str, &'a dyn Fn(&PolicyRow) -> String);
    let metrics: [Metric; 11] = [
        ("runs passed", &|r| format!("{}/{}", r.passed, r.runs)),
        ("total time (ms)", &|r| format!("{:.1}", r.total_ms)),
        ("downtime (ms)", &|r| format!("{:.2}", r.downtime_ms)),
        ("remote faults", &|r| format!("{:.0}", r.remote_faults)),
        ("fault latency p50 (us)", &|r| format!("{:.0}", r.fault_p50_us)),
        ("fault latency p99 (us)", &|r| format!("{:.0}", r.fault_p99_us)),
        ("fault latency max (us)", &|r| format!("{:.0}", r.fault_max_us)),
        ("vCPU blocked, all vCPUs (ms)", &|r| format!("{:.1}", r.vcpu_blocked_ms)),
        ("guest progress in postcopy vs before", &|r| format!("{:.2}", r.postcopy_vs_before)),
        ("pages sent", &|r| format!("{:.0}", r.pages_sent)),
        ("network (MiB, 4 KiB pages)", &|r| format!("{:.0}", r.network_mib)),
    ];
    for (name, f) in metrics {
        let _ = write!(out, "| {name} |");
        for row in rows {
            let _ = write!(out, " {} |", f(row));
        }
        out.push('\n');
    }
    out
}
