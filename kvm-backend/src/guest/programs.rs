//! Machine code assembled at build time (see `build.rs`): the pattern
//! guest's long-mode program and the test boot sector.

include!(concat!(env!("OUT_DIR"), "/guest_programs.rs"));
