//! One side's view of one channel's connection.

use std::time::Duration;

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
    /// When this side last wrote to the channel (for keep-alives).
    pub last_sent: Timestamp,
}

impl Link {
    /// A fresh connection is up: nothing of the old one may leak into it.
    pub fn connected(&mut self, now: Timestamp) {
        *self = Link { up: true, connecting: false, decoder: Default::default(), last_sent: now };
    }

    /// The connection is gone (lost, closed or never made).
    pub fn down(&mut self) {
        *self = Link::default();
    }

    /// Whether a keep-alive is due at `now`. When it is, the next one is due
    /// an interval from now even while this one waits for room: a deadline
    /// left in the past would spin a driver whose socket is full.
    pub fn keepalive_due(&mut self, now: Timestamp, interval: Duration) -> bool {
        if now < self.last_sent + interval {
            return false;
        }
        self.last_sent = now;
        true
    }
}
