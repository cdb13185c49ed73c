//! `postcopy-model`: exhaustive model checking of the real postcopy core.
//!
//! ```text
//! cargo run --release -p postcopy-model -- check                 # the CI configuration
//! cargo run --release -p postcopy-model -- check --pages 2 --losses 1 --plant early-eoc
//! cargo run --release -p postcopy-model -- check --list-plants
//! cargo run --release -p postcopy-model -- check --fallback       # leases, checkpoints, crashes
//! cargo run --release -p postcopy-model -- check --fallback --plant takeover-without-lease
//! cargo run --release -p postcopy-model -- check --fallback --abandons 2   # two abandoned checkpoints
//! cargo run --release -p postcopy-model -- explore --port 3000   # stateright's Explorer
//! ```

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use postcopy_core::PlantedBug;
use postcopy_model::{check, find_cycle, MigrationModel, ModelConfig};
use stateright::Model;

#[derive(Parser)]
#[command(about = "Model checking of postcopy migration over the real postcopy-core state machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explore every reachable state (BFS) and check every property.
    Check {
        #[command(flatten)]
        bounds: Bounds,
        /// Checker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Also search for a cycle (a run that never ends; part 2 of the liveness argument).
        #[arg(long)]
        cycles: bool,
        /// Print the planted bugs and exit.
        #[arg(long)]
        list_plants: bool,
    },
    /// Serve stateright's Explorer on 127.0.0.1 to step through the model.
    Explore {
        #[command(flatten)]
        bounds: Bounds,
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
}

/// The bounds of the model. Unset bounds take the CI configuration's
/// values (`check --help` shows them in `ModelConfig::default`), or with
/// `--fallback` the fallback configuration's (`ModelConfig::fallback`).
#[derive(Args)]
struct Bounds {
    /// Guest pages.
    #[arg(long)]
    pages: Option<u64>,
    /// Pages of a second block of huge pages (four times the size of the
    /// others); 0 for none.
    #[arg(long)]
    huge_pages: Option<u64>,
    /// Guest vCPUs.
    #[arg(long)]
    vcpus: Option<u32>,
    /// Precopy rounds (0: pure postcopy).
    #[arg(long)]
    precopy_rounds: Option<u32>,
    /// Lost connections (and failed reconnection attempts), at most.
    #[arg(long)]
    losses: Option<u8>,
    /// Guest writes, at most.
    #[arg(long)]
    writes: Option<u8>,
    /// Timer firings, at most.
    #[arg(long)]
    timers: Option<u8>,
    /// Batches in flight per channel, at most.
    #[arg(long)]
    window: Option<usize>,
    /// No urgent channel: requested pages share the main channel.
    #[arg(long)]
    no_urgent: bool,
    /// The destination's device-state load touches the last page.
    #[arg(long)]
    device_page: bool,
    /// The user never cancels.
    #[arg(long)]
    no_cancel: bool,
    /// The user never switches to postcopy early.
    #[arg(long)]
    no_switch: bool,
    /// Do not merge states that differ only in which vCPU waits.
    #[arg(long)]
    no_symmetry: bool,
    /// Skip the fair run from every state (liveness part 1; for measuring).
    #[arg(long)]
    no_liveness: bool,
    /// No strangers (peers of another migration connecting).
    #[arg(long)]
    no_strangers: bool,
    /// Connections the background push is spread over (main and push channels).
    #[arg(long)]
    push_streams: Option<u8>,
    /// A planted bug to switch on (see --list-plants).
    #[arg(long, value_name = "NAME")]
    plant: Option<PlantedBug>,
    /// Fallback on (docs/fallback.md): leases, fencing, checkpoints, a
    /// destination that may crash after StartGuest, its clock slow by the
    /// drift bound; the fallback configuration's bounds (2 pages, pure
    /// postcopy, 1 loss, 1 write, 4 timers, window 1, 1 abandoned
    /// checkpoint, no cancel, no strangers).
    #[arg(long)]
    fallback: bool,
    /// Fallback: checkpoints the destination's driver may abandon, at most
    /// (the fallback configuration: 1).
    #[arg(long)]
    abandons: Option<u8>,
}

impl Bounds {
    fn config(&self) -> ModelConfig {
        let base = if self.fallback { ModelConfig::fallback() } else { ModelConfig::default() };
        ModelConfig {
            pages: self.pages.unwrap_or(base.pages),
            huge_pages: self.huge_pages.unwrap_or(base.huge_pages),
            vcpus: self.vcpus.unwrap_or(base.vcpus),
            precopy_rounds: self.precopy_rounds.unwrap_or(base.precopy_rounds),
            losses: self.losses.unwrap_or(base.losses),
            writes: self.writes.unwrap_or(base.writes),
            timers: self.timers.unwrap_or(base.timers),
            window: self.window.unwrap_or(base.window),
            urgent_channel: !self.no_urgent && base.urgent_channel,
            push_streams: self.push_streams.unwrap_or(base.push_streams),
            device_page: self.device_page || base.device_page,
            cancel: !self.no_cancel && base.cancel,
            switch: !self.no_switch && base.switch,
            symmetry: !self.no_symmetry && base.symmetry,
            liveness: !self.no_liveness && base.liveness,
            strangers: !self.no_strangers && base.strangers,
            plant: self.plant,
            abandons: self.abandons.unwrap_or(base.abandons),
            ..base
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { list_plants: true, .. } => {
            for bug in PlantedBug::ALL {
                println!("{bug}");
            }
            for bug in PlantedBug::FALLBACK {
                if bug == PlantedBug::EocUnannounced {
                    // A split of the return path between writers, which the
                    // model does not have.
                    println!("{bug} (not visible here: the simulator's)");
                } else {
                    println!("{bug} (with --fallback)");
                }
            }
            ExitCode::SUCCESS
        }
        Command::Check { bounds, threads, cycles, .. } => run_check(&bounds.config(), threads, cycles),
        Command::Explore { bounds, port } => {
            let address = format!("127.0.0.1:{port}");
            println!("Explorer on http://{address}/ ({})", bounds.config().summary());
            MigrationModel::new(bounds.config()).checker().serve(address);
            ExitCode::SUCCESS
        }
    }
}

fn run_check(cfg: &ModelConfig, threads: usize, cycles: bool) -> ExitCode {
    println!("model: {}", cfg.summary());
    let report = check(cfg, threads);
    println!(
        "explored {} states ({} generated, max depth {}) in {:.1} s",
        report.unique_states,
        report.generated_states,
        report.max_depth,
        report.elapsed.as_secs_f64()
    );
    for (name, trace) in &report.failures {
        println!("FAILED: {name}");
        println!("{trace}");
    }
    if report.failures.is_empty() {
        for name in &report.reached {
            println!("reached: {name}");
        }
        for name in &report.unreached {
            println!("NEVER REACHED: {name}");
        }
    }
    let mut ok = report.passed();
    if cycles && report.failures.is_empty() {
        let cycle = find_cycle(&MigrationModel::new(cfg.clone()));
        println!("cycle search: {} states in {:.1} s", cycle.states, cycle.elapsed.as_secs_f64());
        if let Some(path) = cycle.cycle {
            ok = false;
            println!("FAILED: a run can go round forever; path into and round the cycle:");
            for (i, action) in path.iter().enumerate() {
                println!("{:4}. {action}", i + 1);
            }
        } else {
            println!("no cycle: every run of the model is finite");
        }
    }
    println!("{}", if ok { "model check passed" } else { "model check FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
