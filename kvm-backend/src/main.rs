//! `postcopy`: postcopy live migration of KVM guests.
//!
//! - `postcopy dest --listen ADDR`: wait for a migration, run the guest.
//! - `postcopy source --connect ADDR`: start a guest, migrate it.
//! - `postcopy demo`: both as two processes over loopback, then the statistics.
//! - `postcopy bench`: latency, bandwidth, downtime and progress against their floors.

mod bench;
mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_init();
    let args = cli::Cli::parse();
    let result = match args.command {
        cli::Command::Dest(a) => cli::dest(a),
        cli::Command::Source(a) => cli::source(a),
        cli::Command::Demo(a) => cli::demo(a),
        cli::Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("postcopy: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr at the level in `POSTCOPY_LOG` (warnings by default).
fn tracing_init() {
    // No subscriber crate: the driver's own messages go to stderr directly;
    // tracing events stay available to embedders.
}
