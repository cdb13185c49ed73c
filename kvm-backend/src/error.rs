//! The crate's error type.

use std::io;

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
    /// The RAM layout is not valid.
    #[error("invalid RAM layout: {0}")]
    Layout(String),
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    /// An access to guest memory failed (address outside RAM).
    #[error("guest memory access at {gpa:#x} (+{len}) failed: {reason}")]
    GuestMemory {
        /// Guest-physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
        /// What went wrong.
        reason: String,
    },
    /// A page reference names no page of the layout.
    #[error("page {page} of block {block} is out of range")]
    PageOutOfRange {
        /// Block index.
        block: usize,
        /// Page index in the block.
        page: u64,
    },
    /// A buffer did not have the size the call requires.
    #[error("buffer of {got} bytes where {want} are required")]
    BadLength {
        /// Required length.
        want: usize,
        /// Given length.
        got: usize,
    },
    /// Installing pages stopped part-way (which pages, and why, inside).
    #[error(transparent)]
    Install(Box<crate::uffd::InstallError>),
    /// A userfaultfd operation failed.
    #[error("userfaultfd {op} failed: {reason}")]
    Uffd {
        /// Which operation.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
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
