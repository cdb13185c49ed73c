//! The driver's clock.

use postcopy_core::Timestamp;

/// The driver's clock: `CLOCK_MONOTONIC`, shared by every process of a host.
pub fn now() -> Timestamp {
    Timestamp(crate::sys::monotonic_ns())
}
