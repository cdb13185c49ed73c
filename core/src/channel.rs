//! The three logical channels of a migration, each its own connection.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A one-way stream of frames, carried by its own connection.
///
/// Channels are independent: each keeps order, but nothing orders frames of
/// one channel against another's, and each may be lost alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Channel {
    /// Source to destination: setup, precopy pages, device state, background
    /// pages, end of stream.
    Main,
    /// Destination to source: page requests, end of copy, acknowledgements.
    Return,
    /// Source to destination, optional: requested pages only, so that they
    /// never queue behind bulk pages.
    Urgent,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Main, Channel::Return, Channel::Urgent];

    /// Position in per-channel arrays.
    pub fn index(self) -> usize {
        match self {
            Channel::Main => 0,
            Channel::Return => 1,
            Channel::Urgent => 2,
        }
    }

    /// Whether the source writes this channel (else the destination does).
    pub fn is_from_source(self) -> bool {
        !matches!(self, Channel::Return)
    }

    /// Wire code used in connection preambles.
    pub fn code(self) -> u8 {
        self.index() as u8
    }

    pub fn from_code(code: u8) -> Option<Channel> {
        Channel::ALL.get(code as usize).copied()
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Main => "main",
            Channel::Return => "return",
            Channel::Urgent => "urgent",
        })
    }
}
