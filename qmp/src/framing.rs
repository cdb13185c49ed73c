//! Splits a client's byte stream into messages, as QEMU's JSON streamer
//! does: a message ends where its top-level object or array closes (so
//! `{...}{...}` is two messages, and a request may span lines); anything else
//! at the top level (a bare scalar, garbage) ends at a newline, and so does
//! a string that a newline breaks (JSON forbids a raw newline in a string),
//! at any depth, so that a broken line costs one error. Blank lines are
//! ignored. The framer only tracks brackets and strings; the JSON parser
//! judges the message.
//!
//! A message longer than the limit is not buffered: the framer drops its
//! bytes, keeps following its structure to its end, and reports it once as
//! [`Frame::TooLong`]. QEMU replies with an error and keeps the session
//! too, but then parses the rest of the oversized value as new input (many
//! errors); here it costs one.

use std::collections::VecDeque;

/// A message cut from the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one message (without the newline that ended it, if any).
    Message(Vec<u8>),
    /// A message longer than the limit; its bytes were dropped.
    TooLong,
}

/// Incremental framer; push bytes in any chunks, take frames.
#[derive(Debug)]
pub struct Framer {
    max_message_bytes: usize,
    current: Vec<u8>,
    frames: VecDeque<Frame>,
    /// Unclosed `{` and `[` outside strings.
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// The current message has a byte that is not whitespace.
    started: bool,
    /// The current message went over the limit; its bytes are dropped.
    discarding: bool,
}

impl Framer {
    pub fn new(max_message_bytes: usize) -> Framer {
        Framer {
            max_message_bytes,
            current: Vec::new(),
            frames: VecDeque::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            started: false,
            discarding: false,
        }
    }

    /// Feeds bytes; completed frames queue up for [`Framer::next_frame`].
    pub fn push(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.scan(byte);
        }
    }

    pub fn next_frame(&mut self) -> Option<Frame> {
        self.frames.pop_front()
    }

    /// Bytes buffered for a message not yet complete (or being dropped).
    pub fn has_partial(&self) -> bool {
        self.started
    }

    fn scan(&mut self, byte: u8) {
        if self.in_string {
            if byte == b'\n' {
                // JSON strings cannot hold a raw newline: the message is
                // broken here; end it (the parser says why) and resync.
                self.complete();
                return;
            }
            if self.escaped {
                self.escaped = false;
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.in_string = false;
            }
            self.keep(byte);
            return;
        }
        match byte {
            b'\n' if self.depth == 0 => {
                if self.started {
                    self.complete();
                }
            }
            b' ' | b'\t' | b'\r' | b'\n' if !self.started => {}
            b'"' => {
                self.in_string = true;
                self.keep(byte);
            }
            b'{' | b'[' => {
                self.depth = self.depth.saturating_add(1);
                self.keep(byte);
            }
            b'}' | b']' => {
                self.keep(byte);
                // A stray closer at the top level ends the message too: the
                // parser then says what is wrong with it.
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 0 {
                    self.complete();
                }
            }
            _ => self.keep(byte),
        }
    }

    fn keep(&mut self, byte: u8) {
        self.started = true;
        if self.discarding {
            return;
        }
        if self.current.len() >= self.max_message_bytes {
            self.discarding = true;
            self.current = Vec::new();
            return;
        }
        self.current.push(byte);
    }

    fn complete(&mut self) {
        let frame = if self.discarding { Frame::TooLong } else { Frame::Message(std::mem::take(&mut self.current)) };
        self.frames.push_back(frame);
        self.current = Vec::new();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.started = false;
        self.discarding = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(max: usize, input: &[u8]) -> Vec<Frame> {
        let mut framer = Framer::new(max);
        framer.push(input);
        std::iter::from_fn(|| framer.next_frame()).collect()
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(s.as_bytes().to_vec())
    }

    #[test]
    fn objects_end_at_their_closing_brace() {
        assert_eq!(frames(100, b"{\"a\":1}{\"b\":[2]}"), [msg("{\"a\":1}"), msg("{\"b\":[2]}")]);
        assert_eq!(frames(100, b"{\"a\":\n 1}\r\n"), [msg("{\"a\":\n 1}")]);
        assert_eq!(frames(100, b"\n\r\n  {}"), [msg("{}")]);
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        assert_eq!(frames(100, br#"{"a":"}{\"]"}"#), [msg(r#"{"a":"}{\"]"}"#)]);
    }

    #[test]
    fn scalars_and_garbage_end_at_a_newline() {
        assert_eq!(frames(100, b"hello world\n42\r\n"), [msg("hello world"), msg("42\r")]);
        assert_eq!(frames(100, b"}\n"), [msg("}")]);
        assert_eq!(frames(100, b"nothing yet"), []);
    }

    #[test]
    fn a_newline_inside_a_string_ends_the_message() {
        assert_eq!(frames(100, b"{\"a\": \"open\n{}"), [msg("{\"a\": \"open"), msg("{}")]);
    }

    #[test]
    fn any_chunking_gives_the_same_frames() {
        let input = b"{\"execute\":\"x\",\"id\":\"}\"}\nbad\n[1,[2]]";
        let whole = frames(100, input);
        let mut framer = Framer::new(100);
        let mut bytewise = Vec::new();
        for b in input {
            framer.push(&[*b]);
            bytewise.extend(std::iter::from_fn(|| framer.next_frame()));
        }
        assert_eq!(bytewise, whole);
        assert_eq!(whole.len(), 3);
    }

    #[test]
    fn an_oversized_message_is_reported_once_and_the_stream_resyncs() {
        let mut input = b"{\"pad\":\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', 1000));
        input.extend(b"\"}{\"ok\":1}");
        assert_eq!(frames(64, &input), [Frame::TooLong, msg("{\"ok\":1}")]);
        // Exactly at the limit is fine.
        assert_eq!(frames(4, b"{}{}"), [msg("{}"), msg("{}")]);
        assert_eq!(frames(4, b"[[]]"), [msg("[[]]")]);
        assert_eq!(frames(4, b"[[[]]]"), [Frame::TooLong]);
    }

    #[test]
    fn an_oversized_scalar_line_ends_at_its_newline() {
        let mut input = vec![b'a'; 500];
        input.extend(b"\n{}");
        assert_eq!(frames(64, &input), [Frame::TooLong, msg("{}")]);
    }
}
