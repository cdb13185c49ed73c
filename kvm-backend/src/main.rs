//! `postcopy`: postcopy live migration of KVM guests.
//!
//! - `postcopy dest --listen ADDR`: wait for a migration, run the guest.
//! - `postcopy source --connect ADDR`: start a guest, migrate it.
//! - `postcopy demo`: both as two processes over loopback, then the statistics.
//! - `postcopy run --qmp PATH`: a long-running VMM driven over QMP.
//! - `postcopy ctl --qmp PATH COMMAND [ARGS]`: a small QMP client.
//! - `postcopy bench`: latency, bandwidth, downtime and progress against their floors.
//! - `postcopy certs --out DIR --name HOST...`: credentials for a first run.
//!
//! Modules depend downwards only: `main` -> `commands`, `bench` -> `pair`
//! -> `args`.

mod args;
mod bench;
mod commands;
mod ctl;
mod pair;
mod run;
mod tls;
mod vmm_pair;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// The environment variable that sets what is logged.
const LOG_ENV: &str = "POSTCOPY_LOG";
/// What is logged when `POSTCOPY_LOG` is unset.
const DEFAULT_LOG: &str = "warn";

#[derive(Parser, Debug)]
#[command(
    name = "postcopy",
    version,
    about = "Postcopy live migration of KVM guests",
    after_help = "Logging: POSTCOPY_LOG sets what goes to stderr, as a tracing env filter: \
                  error, warn (the default), info, debug, trace, or per module \
                  (POSTCOPY_LOG=postcopy_kvm::driver=debug). `demo` and `bench` pass it to \
                  the processes they start."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Wait for a migration on ADDR, run the migrated guest, check it.
    ///
    /// A connection that is not the source's (garbage, a wrong version, a
    /// bad frame, half a hello, another migration's hello) is refused alone
    /// and logged; the destination keeps waiting for its source. Exits 0
    /// only if the migrated guest is intact; 1 with the reason if the
    /// migration fails.
    #[command(name = "dest", visible_alias = "destination")]
    Destination(commands::DestinationArgs),
    /// Start a guest and migrate it to the destination at ADDR.
    Source(commands::SourceArgs),
    /// Run a source and a destination as two processes over loopback and
    /// print the statistics.
    Demo(commands::DemoArgs),
    /// A long-running VMM: a guest (booted, or arriving with --incoming)
    /// kept running until `quit`, driven over QMP on --qmp PATH.
    Run(run::RunArgs),
    /// Send a QMP command to a `postcopy run` process and print the reply
    /// (`watch`: a live progress line of its migration).
    Ctl(ctl::CtlArgs),
    /// Measure fault latency, bandwidth, downtime and guest progress
    /// against their floors, in one run.
    Bench(bench::BenchArgs),
    /// Make a CA and host certificates for a first run (--tls-creds).
    Certs(tls::CertsArgs),
}

fn main() -> ExitCode {
    init_logging();
    let args = Cli::parse();
    let result = match args.command {
        Command::Destination(a) => commands::destination(a).map_err(Box::<dyn std::error::Error>::from),
        Command::Source(a) => commands::source(a).map_err(Into::into),
        Command::Demo(a) => commands::demo(a).map_err(Into::into),
        Command::Bench(a) => bench::run(a).map_err(Into::into),
        Command::Run(a) => run::run(a).map_err(Into::into),
        Command::Ctl(a) => ctl::ctl(a).map_err(Into::into),
        Command::Certs(a) => tls::certs(a).map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("postcopy: error: {}", postcopy_kvm::driver::error_chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr what `POSTCOPY_LOG` selects (warnings and errors when it
/// is unset or not a valid filter). Child processes inherit the variable.
fn init_logging() {
    let filter = match std::env::var(LOG_ENV) {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("postcopy: {LOG_ENV}={spec} is not a log filter ({e}); logging {DEFAULT_LOG}");
            EnvFilter::new(DEFAULT_LOG)
        }),
        _ => EnvFilter::new(DEFAULT_LOG),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_thread_names(true)
        .init();
}
