//! cargo-fuzz binary for `destination_events`; the logic, and what it asserts, are in
//! `postcopy_fuzz_targets::destination_events`, which `cargo test` also runs on every
//! saved corpus file and crash artifact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy_fuzz_targets::destination_events::{self, DestinationInput};

fuzz_target!(|input: DestinationInput| {
    destination_events::run(&input);
});
