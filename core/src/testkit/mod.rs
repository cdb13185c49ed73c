//! A reusable harness: a fake guest with a content version in every page,
//! hosts that carry out each core's actions, in-memory links, and an oracle
//! that checks docs/protocol.md's invariants at every step (quinn-proto's `Pair`
//! idea). The unit tests, the property tests, the model checker and the
//! fuzzers use it; the simulator reuses its guest and oracle.

mod content;
mod hosts;
mod oracle;
mod pair;

pub use content::{fill_page, page_version};
pub use hosts::{checkpoint_device_state, DestHost, SourceGuest, SourceHost};
pub use oracle::{Oracle, Violation};
pub use pair::{Outcome, Pair, PairConfig, Pipe};
