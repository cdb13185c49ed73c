//! The destination driver's errors: its own failures ([`DestinationError`])
//! and a machine it cannot build ([`BuildError`]). Reported, never a panic.

use std::net::SocketAddr;

use crate::driver::machine::MachineError;

/// A failure of the destination's driver (beside the core's own verdict).
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The fault path's histogram could not be made.
    #[error("cannot create the fault latency histogram")]
    Histogram(#[source] hdrhistogram::CreationError),
    /// The listener could not be polled.
    #[error("cannot make the listener non-blocking")]
    Listener(#[source] std::io::Error),
    /// A peer that does not speak the protocol (refused alone, never fatal).
    #[error("connection from {peer} refused")]
    Refused {
        /// The peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        reason: crate::driver::security::AdmissionError,
    },
    /// The machine could not be built.
    #[error("cannot build the machine")]
    Build(#[source] BuildError),
    /// The vCPUs could not be started after StartGuest.
    #[error("cannot start the vCPUs")]
    StartVcpus(#[source] crate::error::Error),
    /// A page the core handed out is not in guest memory (after the
    /// retries a transient failure gets): the core hears of it.
    #[error("page {page} could not be installed")]
    InstallFailed {
        /// The page's global number.
        page: u64,
        /// Why the last attempt failed.
        #[source]
        source: crate::error::Error,
    },
    /// A page failed to install when nothing could bring it back any more
    /// (the end of copy was sent): the guest is not run on the hole.
    #[error("page {page} is missing from the guest for good")]
    PageLost {
        /// The page's global number.
        page: u64,
        /// The core's refusal.
        #[source]
        source: postcopy_core::EventError,
    },
}

/// Why the machine could not be built from the source's description.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The description is not valid.
    #[error("bad machine description")]
    Description(#[source] MachineError),
    /// The core has no layout (no hello) yet.
    #[error("no RAM layout from the source yet")]
    NoLayout,
    /// The description's RAM cannot be described to the core.
    #[error("the machine description's RAM does not fit the protocol")]
    CoreLayout(#[source] postcopy_core::LayoutError),
    /// The description's RAM is not the hello's.
    #[error("the machine description's RAM differs from the hello's layout")]
    LayoutMismatch,
    /// `--prealloc` prepared other RAM.
    #[error(
        "the source's guest RAM ({source_mib} MiB) is not the RAM preallocated here ({preallocated_mib} MiB, --prealloc)"
    )]
    PreallocatedMismatch {
        /// The source's RAM.
        source_mib: u64,
        /// This side's preallocated RAM.
        preallocated_mib: u64,
    },
    /// A step of the build failed.
    #[error("cannot {step}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: crate::error::Error,
    },
}
