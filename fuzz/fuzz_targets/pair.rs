//! cargo-fuzz binary for `pair`; the logic, and what it asserts, are in
//! `postcopy_fuzz_targets::pair`, which `cargo test` also runs on every
//! saved corpus file and crash artifact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy_fuzz_targets::pair::{self, PairInput};

fuzz_target!(|input: PairInput| {
    pair::run(&input);
});
