//! The logical channels of a migration, each its own connection: main,
//! return, urgent, and the extra push streams ([`Channel::Push`]).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Most background-push streams a migration may use: the main channel and
/// up to seven [`Channel::Push`] channels.
pub const MAX_PUSH_STREAMS: u8 = 8;

/// A one-way stream of frames, carried by its own connection.
///
/// Channels are independent: each keeps order, but nothing orders frames of
/// one channel against another's, and each may be lost alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Channel {
    /// Source to destination: setup, precopy pages, device state, background
    /// pages, end of stream. Push stream 0.
    Main,
    /// Destination to source: page requests, end of copy, acknowledgements.
    Return,
    /// Source to destination, optional: requested pages only, so that they
    /// never queue behind bulk pages.
    Urgent,
    /// Source to destination, only with several push streams
    /// (`Config::push_streams`): its stream hello, then background pages
    /// (whole or in parts), spreading the push over several connections.
    Push(PushStream),
}

/// The number of an extra push stream: 1 to [`MAX_PUSH_STREAMS`] - 1 (the
/// main channel is stream 0). Only valid numbers can be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct PushStream(u8);

impl PushStream {
    /// Stream `number`, if it is 1 to [`MAX_PUSH_STREAMS`] - 1.
    pub const fn new(number: u8) -> Option<PushStream> {
        if number >= 1 && number < MAX_PUSH_STREAMS {
            Some(PushStream(number))
        } else {
            None
        }
    }

    pub const fn number(self) -> u8 {
        self.0
    }
}

impl TryFrom<u8> for PushStream {
    type Error = String;
    fn try_from(number: u8) -> Result<Self, Self::Error> {
        PushStream::new(number).ok_or_else(|| format!("push stream {number} is not 1 to {}", MAX_PUSH_STREAMS - 1))
    }
}

impl From<PushStream> for u8 {
    fn from(stream: PushStream) -> u8 {
        stream.0
    }
}

const fn push(number: u8) -> Channel {
    Channel::Push(PushStream(number))
}

impl Channel {
    /// The three channels of a migration with one push stream.
    pub const ALL: [Channel; 3] = [Channel::Main, Channel::Return, Channel::Urgent];

    /// Every channel, the extra push streams included.
    pub const EVERY: [Channel; Channel::COUNT] = [
        Channel::Main,
        Channel::Return,
        Channel::Urgent,
        push(1),
        push(2),
        push(3),
        push(4),
        push(5),
        push(6),
        push(7),
    ];

    /// Length of per-channel arrays.
    pub const COUNT: usize = 3 + MAX_PUSH_STREAMS as usize - 1;

    /// The extra push streams of a migration with `streams` push streams
    /// (the main channel is the first).
    pub fn push_streams(streams: u8) -> impl Iterator<Item = Channel> {
        (1..streams.min(MAX_PUSH_STREAMS)).map(push)
    }

    /// The push stream this channel is (main 0, `Push(k)` k), if any.
    pub fn push_stream(self) -> Option<u8> {
        match self {
            Channel::Main => Some(0),
            Channel::Push(stream) => Some(stream.0),
            Channel::Return | Channel::Urgent => None,
        }
    }

    /// Position in per-channel arrays.
    pub fn index(self) -> usize {
        match self {
            Channel::Main => 0,
            Channel::Return => 1,
            Channel::Urgent => 2,
            Channel::Push(stream) => 2 + stream.0 as usize,
        }
    }

    /// Whether the source writes this channel (else the destination does).
    pub fn is_from_source(self) -> bool {
        !matches!(self, Channel::Return)
    }

    /// Wire code used in connection preambles (0 main, 1 return, 2 urgent,
    /// 2 + k for push stream k).
    pub fn code(self) -> u8 {
        self.index() as u8
    }

    pub fn from_code(code: u8) -> Option<Channel> {
        Channel::EVERY.get(code as usize).copied()
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Main => f.write_str("main"),
            Channel::Return => f.write_str("return"),
            Channel::Urgent => f.write_str("urgent"),
            Channel::Push(stream) => write!(f, "push{}", stream.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_has_its_own_index_and_code() {
        for (position, channel) in Channel::EVERY.into_iter().enumerate() {
            assert_eq!(channel.index(), position);
            assert_eq!(Channel::from_code(channel.code()), Some(channel));
        }
        assert_eq!(Channel::from_code(Channel::COUNT as u8), None);
        assert_eq!(PushStream::new(0), None);
        assert_eq!(PushStream::new(MAX_PUSH_STREAMS), None);
        assert_eq!(Channel::push_streams(3).collect::<Vec<_>>(), vec![push(1), push(2)]);
        assert_eq!(Channel::push_streams(1).count(), 0);
    }
}
