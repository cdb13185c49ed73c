//! `postcopy bench`.

use std::process::ExitCode;

/// Benchmark settings.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn run(_a: BenchArgs) -> Result<ExitCode, String> {
    Err("not yet".into())
}
