//! `postcopy-model`: exhaustive model checking of the real postcopy core.
//!
//! ```text
//! cargo run --release -p postcopy-model -- check                 # the CI configuration
//! cargo run --release -p postcopy-model -- check --pages 2 --losses 1 --plant early-eoc
//! cargo run --release -p postcopy-model -- check --list-plants
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

/// The bounds of the model (defaults: the CI configuration).
#[derive(Args)]
struct Bounds {
    /// Guest pages.
    #[arg(long, default_value_t = ModelConfig::default().pages)]
    pages: u64,
    /// Pages of a second block of huge pages (four times the size of the
    /// others); 0 for none.
    #[arg(long, default_value_t = ModelConfig::default().huge_pages)]
    huge_pages: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = ModelConfig::default().vcpus)]
    vcpus: u32,
    /// Precopy rounds (0: pure postcopy).
    #[arg(long, default_value_t = ModelConfig::default().precopy_rounds)]
    precopy_rounds: u32,
    /// Lost connections (and failed reconnection attempts), at most.
    #[arg(long, default_value_t = ModelConfig::default().losses)]
    losses: u8,
    /// Guest writes, at most.
    #[arg(long, default_value_t = ModelConfig::default().writes)]
    writes: u8,
    /// Timer firings, at most.
    #[arg(long, default_value_t = ModelConfig::default().timers)]
    timers: u8,
    /// Batches in flight per channel, at most.
    #[arg(long, default_value_t = ModelConfig::default().window)]
    window: usize,
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
    #[arg(long, default_value_t = ModelConfig::default().push_streams)]
    push_streams: u8,
    /// A planted bug to switch on (see --list-plants).
    #[arg(long, value_name = "NAME")]
    plant: Option<PlantedBug>,
}

impl Bounds {
    fn config(&self) -> ModelConfig {
        ModelConfig {
            pages: self.pages,
            huge_pages: self.huge_pages,
            vcpus: self.vcpus,
            precopy_rounds: self.precopy_rounds,
            losses: self.losses,
            writes: self.writes,
            timers: self.timers,
            window: self.window,
            urgent_channel: !self.no_urgent,
            push_streams: self.push_streams,
            device_page: self.device_page,
            cancel: !self.no_cancel,
            switch: !self.no_switch,
            symmetry: !self.no_symmetry,
            liveness: !self.no_liveness,
            strangers: !self.no_strangers,
            plant: self.plant,
            ..ModelConfig::default()
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { list_plants: true, .. } => {
            for bug in PlantedBug::ALL {
                println!("{bug}");
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
