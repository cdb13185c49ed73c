//! One side's view of one channel's connection.

use crate::time::Timestamp;
use crate::wire::Decoder;

/// Whether a channel's connection is usable, and its receive state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Link {
    /// Connected and not known to be lost.
    pub up: bool,
    /// A connection attempt is under way (source only).
    pub connecting: bool,
    /// Frames received on this connection (one decoder per connection).
    pub decoder: Decoder,
    /// When this connection came up (zero while down).
    pub connected_at: Timestamp,
}

impl Link {
    /// A fresh connection is up: nothing of the old one may leak into it.
    pub fn connected(&mut self, now: Timestamp) {
        *self = Link { up: true, connecting: false, decoder: Default::default(), connected_at: now };
    }

    /// The connection is gone (lost, closed or never made).
    pub fn down(&mut self) {
        *self = Link::default();
    }
}
