//! Connections that have not yet shown this migration's identity.
//!
//! A connection accepted while its channel already has a live one is
//! *provisional*: the core keeps it beside the current connection and lets
//! it change nothing until its first frame authenticates it (a hello of this
//! migration, with a valid epoch). Only then does it replace the current
//! one; anything else closes it alone, with a notice.

use serde::{Deserialize, Serialize};

use crate::channel::Channel;
use crate::link::Link;
use crate::wire::Frame;

/// Most provisional connections kept per channel; a newer one drops the
/// oldest, so a peer opening connections in a loop costs bounded memory.
pub const MAX_PROVISIONAL_PER_CHANNEL: usize = 2;

/// Names one accepted connection for as long as it is provisional.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnectionId(pub u64);

/// What the destination made of an accepted connection.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Admission {
    /// The channel had no live connection: this one is its current
    /// connection (use `handle_input` / `handle_connection_lost`).
    Current,
    /// The channel has a live connection, which stays current: deliver this
    /// one's bytes with `handle_provisional_input` until the core answers
    /// [`PromoteConnection`](crate::DestinationAction::PromoteConnection) or
    /// [`CloseConnection`](crate::DestinationAction::CloseConnection).
    Provisional(ConnectionId),
}

/// A provisional connection and its receive state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Provisional {
    pub id: ConnectionId,
    pub channel: Channel,
    pub link: Link,
    /// Its first frame, waiting for a migration to be bound before it can
    /// be judged (an urgent hello that arrives before the main hello).
    pub first: Option<Frame>,
}
