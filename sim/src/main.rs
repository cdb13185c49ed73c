//! `postcopy-sim`: run, swarm, compare, bench. See the crate docs and the
//! README's `sim/` section.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use postcopy_sim::report::table;
use postcopy_sim::swarm::{compare, compare_table, failure_report, run_line, swarm, swarm_for};
use postcopy_sim::{run, Scenario};

#[derive(Parser)]
#[command(name = "postcopy-sim", about = "Deterministic simulator of postcopy live migration", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Overrides {
    /// Override an option drawn from the seed: `--set pages=1048576` (repeatable;
    /// `run --seed S` prints every option).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run the core with a planted bug (needs the `planted-bugs` feature).
    #[arg(long, value_name = "BUG")]
    plant: Option<String>,
}

impl Overrides {
    fn pairs(&self) -> Result<Vec<(String, String)>, String> {
        let mut pairs = Vec::new();
        for item in &self.set {
            let (key, value) = item.split_once('=').ok_or_else(|| format!("--set {item:?}: expected KEY=VALUE"))?;
            pairs.push((key.trim().to_owned(), value.trim().to_owned()));
        }
        if let Some(bug) = &self.plant {
            pairs.push(("plant".into(), bug.clone()));
        }
        Ok(pairs)
    }
}

#[derive(Subcommand)]
enum Command {
    /// One migration; `--seed S` alone replays it exactly.
    Run {
        #[arg(long)]
        seed: u64,
        #[command(flatten)]
        overrides: Overrides,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Trace records to keep and print on failure.
        #[arg(long, default_value_t = 40)]
        tail: usize,
        /// Print the kept trace records even when the run passes.
        #[arg(long)]
        print_trace: bool,
    },
    /// A configuration per seed: faults, then healing; every run must pass.
    Swarm {
        #[arg(long, default_value_t = 200)]
        seeds: u64,
        /// The first seed (default: 0; with `--for`, a random one).
        #[arg(long)]
        first: Option<u64>,
        /// Instead of `--seeds`: run consecutive seeds until this much time
        /// has passed (`90s`, `30m`, `2h`) or a seed fails.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        for_duration: Option<Duration>,
        #[command(flatten)]
        overrides: Overrides,
        /// Simulation threads.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        #[arg(long)]
        json: bool,
        /// Print a line for every seed, not only failures.
        #[arg(long)]
        verbose: bool,
        #[arg(long, default_value_t = 40)]
        tail: usize,
    },
    /// The same seeds under each policy (fault-free), side by side.
    Compare {
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        first: u64,
        #[command(flatten)]
        overrides: Overrides,
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Speed: a fault-free 4 GiB (1M pages) postcopy migration; prints page transfers per second.
    Bench {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        overrides: Overrides,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("postcopy-sim: {error}");
            ExitCode::from(2)
        }
    }
}

/// A duration of whole seconds, minutes or hours: `90s`, `30m`, `2h` (a
/// bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit_secs) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1),
        Some((i, 'm')) => (&text[..i], 60),
        Some((i, 'h')) => (&text[..i], 3600),
        _ => (text, 1),
    };
    let count: u64 = number.parse().map_err(|_| format!("{text:?}: expected a duration like 90s, 30m or 2h"))?;
    count.checked_mul(unit_secs).map(Duration::from_secs).ok_or_else(|| format!("{text:?}: too long"))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, String> {
    serde_json::to_string_pretty(value).map_err(|e| e.to_string())
}

fn real_main() -> Result<ExitCode, String> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { seed, overrides, json, tail, print_trace } => {
            let scenario = Scenario::with_overrides(seed, &overrides.pairs()?)?;
            if !json {
                println!("options: {}", scenario.options_line());
                println!("replay:  {}", scenario.replay_command());
            }
            let result = run(scenario, tail);
            if json {
                println!("{}", to_json(&result)?);
            } else {
                print!("{}", table(&result));
                for note in &result.notes {
                    println!("  note: {note}");
                }
                if !result.passed() {
                    print!("{}", failure_report(&result));
                } else if print_trace {
                    for line in &result.tail {
                        println!("    {line}");
                    }
                }
            }
            Ok(if result.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Swarm { seeds, first, for_duration, overrides, jobs, json, verbose, tail } => {
            let (results, summary, first) = match for_duration {
                Some(duration) => {
                    // A random start, printed first, so that every long
                    // search covers new seeds and any of them replays.
                    let first = first.unwrap_or_else(|| fastrand::u64(1 << 20..1 << 40));
                    eprintln!(
                        "swarm: seeds from {first} for {}s (replay one: postcopy-sim run --seed S)",
                        duration.as_secs()
                    );
                    let (failures, summary) = swarm_for(first, duration, &overrides.pairs()?, jobs, tail, |so_far| {
                        eprintln!(
                            "swarm: {} seeds in {:.0} s, {} failed",
                            so_far.seeds,
                            so_far.real_secs,
                            so_far.failed.len()
                        );
                    })?;
                    (failures, summary, first)
                }
                None => {
                    let first = first.unwrap_or(0);
                    let (results, summary) = swarm(first, seeds, &overrides.pairs()?, jobs, tail)?;
                    (results, summary, first)
                }
            };
            if json {
                println!("{}", to_json(&serde_json::json!({ "summary": summary, "runs": results }))?);
            } else {
                for r in &results {
                    if verbose {
                        println!("{}", run_line(r));
                    }
                    if !r.passed() {
                        print!("{}", failure_report(r));
                    }
                }
                println!(
                    "swarm: {} seeds from {first}, {} passed, {} failed {:?}; {} with faults, {} recovered, {} retried, \
                     {} fell back, {} abandoned a checkpoint; {:.1} s real, {:.1} s simulated, {:.2} M page transfers/s",
                    summary.seeds,
                    summary.passed,
                    summary.failed.len(),
                    summary.failed,
                    summary.faulted_runs,
                    summary.recovered_runs,
                    summary.retried_runs,
                    summary.fell_back_runs,
                    summary.abandoned_runs,
                    summary.real_secs,
                    summary.sim_secs,
                    summary.transfers_per_sec / 1e6
                );
            }
            Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Compare { seeds, first, overrides, jobs, json } => {
            let start = Instant::now();
            let (rows, _) = compare(first, seeds, &overrides.pairs()?, jobs)?;
            if json {
                println!("{}", to_json(&rows)?);
            } else {
                println!(
                    "compare: seeds {first}..{}, fault-free, {:.1} s",
                    first + seeds,
                    start.elapsed().as_secs_f64()
                );
                print!("{}", compare_table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { seed, overrides } => {
            let mut pairs: Vec<(String, String)> = [
                ("pages", "1048576"),
                ("faults", "false"),
                ("mode", "postcopy"),
                ("urgent", "true"),
                ("prepaging", "true"),
                ("batch_pages", "64"),
                ("vcpus", "4"),
                ("workload", "uniform"),
                ("access_ns", "5000"),
                ("bandwidth_mbps", "25000"),
                ("buffer_kib", "4096"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            pairs.extend(overrides.pairs()?);
            let scenario = Scenario::with_overrides(seed, &pairs)?;
            println!("options: {}", scenario.options_line());
            let result = run(scenario, 40);
            print!("{}", table(&result));
            println!(
                "bench: {} page transfers in {:.3} s real ({:.1} ms simulated): {:.2} M page transfers/s",
                result.page_transfers,
                result.real_ms / 1e3,
                result.sim_ms,
                result.transfers_per_sec / 1e6
            );
            if !result.passed() {
                print!("{}", failure_report(&result));
            }
            Ok(if result.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
