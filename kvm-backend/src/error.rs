//! The crate-level error: the VMM layer's own failures (KVM, vCPUs,
//! configuration, device state) and, composed from below, the errors of
//! [`crate::layout`], [`crate::memory`] and [`crate::uffd`]. Those modules
//! own their errors and import nothing from here. [`error_chain`] shows any
//! error with its causes on one line (the driver's reports, the CLI).

use std::io;

use crate::layout::MemoryMapError;
use crate::memory::MemoryError;
use crate::uffd::UffdError;

/// Errors of the KVM backend's VMM layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("/dev/kvm is not available: {0}")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability this backend needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    /// The RAM layout is not valid, or a page is not in it.
    #[error(transparent)]
    Layout(#[from] MemoryMapError),
    /// Guest RAM could not be allocated, mapped or accessed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A userfaultfd operation (registering, installing, reading faults)
    /// failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// An operating-system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The guest configuration is not supported.
    #[error("unsupported guest configuration: {0}")]
    Config(String),
    /// A boot-sector image is not valid.
    #[error("invalid boot sector: {0}")]
    BootSector(String),
    /// Saved device state could not be encoded, decoded or applied.
    #[error("device state: {0}")]
    State(String),
    /// A vCPU thread did not answer in time or died.
    #[error("vCPU {vcpu}: {reason}")]
    Vcpu {
        /// vCPU index.
        vcpu: usize,
        /// What went wrong.
        reason: String,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Maps a kvm-ioctls error to [`Error::Kvm`] naming the operation.
pub(crate) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// Maps an `io::Error` to [`Error::Os`] naming the call.
pub(crate) fn os_err(op: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Os { op, source }
}

/// `error` and its sources, as one line ("a: b: c"). A source whose text
/// its parent already shows (errors that print their cause) is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: {0}")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn error_chain_shows_every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(error_chain(&e), "outer: middle: inner");
    }
}
