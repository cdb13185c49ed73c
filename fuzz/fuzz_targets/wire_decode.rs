//! cargo-fuzz binary for `wire_decode`; the logic, and what it asserts, are in
//! `postcopy_fuzz_targets::wire_decode`, which `cargo test` also runs on every
//! saved corpus file and crash artifact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy_fuzz_targets::wire_decode::{self, WireInput};

fuzz_target!(|input: WireInput| {
    wire_decode::run(&input);
});
