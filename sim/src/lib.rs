//! `postcopy-sim`: a deterministic simulator that runs the real
//! `postcopy_core::Source` and `Destination` through whole migrations under a
//! simulated clock, network and guest, with checkers for docs/protocol.md's
//! invariants (after TigerBeetle's VOPR, FoundationDB's simulation and
//! turmoil).
//!
//! - [`scenario`]: every option of a run, drawn from its seed.
//! - [`sim`]: the event queue and dispatch, the hosts that drive the cores
//!   (and own their sockets), the fault injector.
//! - [`net`]: the network, sans-IO like the cores: connections, socket
//!   buffers, transmitters, resets and partitions, driven by inputs and polled
//!   for outputs.
//! - [`guest`]: guest RAM with content versions, vCPU workloads.
//! - [`check`]: the invariant checkers, separate from the simulation.
//! - [`trace`]: the trace hash and the tail printed on failure.
//! - [`swarm`]: many seeds; the policy comparison.

#![forbid(unsafe_code)]

pub mod check;
pub mod guest;
pub mod net;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod sim;
pub mod swarm;
pub mod trace;

pub use report::RunResult;
pub use scenario::Scenario;
pub use swarm::run;
