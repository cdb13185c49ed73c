//! Secure channels for postcopy migration connections.
//!
//! - [`config`]: rustls configurations for both ends (TLS 1.3, aws-lc-rs,
//!   AES-256-GCM first, no resumption), each checking the peer's chain
//!   against its CA and the peer's identity against an [`Allowlist`].
//! - [`channel`]: [`connect`] and [`accept`] handshake over blocking
//!   `TcpStream`s within a deadline and give a [`SecureChannel`] that one
//!   reader thread and many writer threads use through `&self`.
//! - [`record`]: the record layer after the handshake, split into a send
//!   half and a receive half that share no lock (the socket stays a plain
//!   fd, as with kernel TLS offload).
//! - [`error`]: typed errors; each refusal (expired, not yet valid, wrong
//!   CA, wrong name, not allowed, no certificate, not TLS) has its own
//!   variant on both ends.
//! - [`creds`]: a CA and host certificates for a first run, and loaders.
//! - [`binding`]: the per-connection channel binding and the proof that
//!   binds a one-time migration secret to it.
//! - [`limits`]: how many connections may be in their handshake, how long.
//! - [`ktls`]: whether the kernel can take over the record layer.

pub mod binding;
pub mod channel;
pub mod config;
pub mod creds;
pub mod error;
pub mod identity;
pub mod ktls;
pub mod limits;
pub mod record;
mod rekey;

pub use binding::{ChannelBinding, MigrationSecret, Role};
pub use channel::{accept, connect, SecureChannel};
pub use config::{ClientSide, ServerSide};
pub use creds::{write_first_run_credentials, CertificateAuthority, Credentials, HostCertificate, Lifetime};
pub use error::{BindingError, ChannelError, CredentialError, HandshakeError, Refusal};
pub use identity::{Allowlist, Identity, IdentityError};
pub use limits::{HandshakeGate, HandshakeLimits, HandshakeSlot};
pub use record::Wait;
