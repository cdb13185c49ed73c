//! The logic of postcopy's fuzz targets.
//!
//! Each target is a function taking the raw input bytes, so that the
//! cargo-fuzz binaries in `fuzz/fuzz_targets/` (which need libFuzzer and are
//! built only by `cargo fuzz`) and the replay tests of this crate (plain
//! `cargo test` on stable, over every file in `fuzz/corpus/<target>/` and
//! `fuzz/artifacts/<target>/`) run exactly the same code on exactly the same
//! input. Inputs are decoded the way libfuzzer-sys's `fuzz_target!` decodes
//! a typed input: skip inputs shorter than `size_hint`, then
//! `Arbitrary::arbitrary_take_rest(Unstructured::new(bytes))`; see [`decode`].
//!
//! - [`wire_decode`]: bytes in any chunks through the incremental decoder.
//! - [`source_events`]: a real `Source` driven by arbitrary events.
//! - [`destination_events`]: a real `Destination` driven by arbitrary events.
//! - [`pair`]: both cores over an adversarial network, then healed.
//! - [`qmp_session`]: a QMP client's bytes through the QMP session, its
//!   commands run on the fake VMM.
//!
//! The input formats are ours (see [`input`]) and have writers, which
//! [`seeds`] uses to build the checked-in seed corpus.

pub mod alloc_guard;
pub mod destination_events;
pub mod frames;
pub mod input;
pub mod pair;
pub mod qmp_session;
pub mod seeds;
pub mod source_events;
pub mod trace;
pub mod wire_decode;

use arbitrary::{Arbitrary, Unstructured};

/// Every binary that links this crate counts its allocations (see
/// [`alloc_guard`]).
#[global_allocator]
static ALLOCATOR: alloc_guard::GuardedAlloc = alloc_guard::GuardedAlloc;

/// Decodes a typed input exactly as libfuzzer-sys's `fuzz_target!` does;
/// `None` where it would skip the input.
pub fn decode<'a, T: Arbitrary<'a>>(bytes: &'a [u8]) -> Option<T> {
    if bytes.len() < T::size_hint(0).0 {
        return None;
    }
    T::arbitrary_take_rest(Unstructured::new(bytes)).ok()
}

/// A fuzz target: its name (the cargo-fuzz binary and corpus directory) and
/// the function that runs one input.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target, in the order CI fuzzes them.
pub const TARGETS: [Target; 5] = [
    Target { name: "wire_decode", run: run_wire_decode },
    Target { name: "source_events", run: run_source_events },
    Target { name: "destination_events", run: run_destination_events },
    Target { name: "pair", run: run_pair },
    Target { name: "qmp_session", run: run_qmp_session },
];

pub fn run_wire_decode(bytes: &[u8]) {
    if let Some(input) = decode::<wire_decode::WireInput>(bytes) {
        wire_decode::run(&input);
    }
}

pub fn run_source_events(bytes: &[u8]) {
    if let Some(input) = decode::<source_events::SourceInput>(bytes) {
        source_events::run(&input);
    }
}

pub fn run_destination_events(bytes: &[u8]) {
    if let Some(input) = decode::<destination_events::DestinationInput>(bytes) {
        destination_events::run(&input);
    }
}

pub fn run_pair(bytes: &[u8]) {
    if let Some(input) = decode::<pair::PairInput>(bytes) {
        pair::run(&input);
    }
}

pub fn run_qmp_session(bytes: &[u8]) {
    if let Some(input) = decode::<qmp_session::QmpInput>(bytes) {
        qmp_session::run(&input);
    }
}
