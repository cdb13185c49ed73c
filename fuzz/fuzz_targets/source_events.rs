//! cargo-fuzz binary for `source_events`; the logic, and what it asserts, are in
//! `postcopy_fuzz_targets::source_events`, which `cargo test` also runs on every
//! saved corpus file and crash artifact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy_fuzz_targets::source_events::{self, SourceInput};

fuzz_target!(|input: SourceInput| {
    source_events::run(&input);
});
