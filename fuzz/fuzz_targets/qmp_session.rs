//! cargo-fuzz binary for `qmp_session`; the logic, and what it asserts, are
//! in `postcopy_fuzz_targets::qmp_session`, which `cargo test` also runs on
//! every saved corpus file and crash artifact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postcopy_fuzz_targets::qmp_session::{self, QmpInput};

fuzz_target!(|input: QmpInput| {
    qmp_session::run(&input);
});
