//! `qmp_session`: any bytes, cut into any chunks, from a QMP client into a
//! real `postcopy_qmp::Session`, whose commands run on the fake VMM.
//!
//! Asserts: no panic; no allocation larger than a bounded message (plus the
//! input's own copies); every line out is one JSON object ending in CRLF,
//! a reply with exactly one of `return` / `error`, an error with one of
//! QEMU's classes and a description; exactly one reply per message the
//! framer cuts (checked against a framer run apart), with the message's
//! `id` echoed when it is a JSON object that has one and no `id` otherwise,
//! and "JSON parse error" for a message that is not JSON; no command reaches
//! the VMM before negotiation, and the control commands never do; the same
//! replies whatever the chunking (one chunk, the fuzzer's, one byte at a
//! time); every event the VMM raised formats to a valid event line.

use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use postcopy_qmp::fake::FakeVmm;
use postcopy_qmp::framing::{Frame, Framer};
use postcopy_qmp::session::event_line;
use postcopy_qmp::{dispatch, ErrorClass, Event, EventSink, Session, SessionConfig, Step, Timestamp};
use serde_json::Value;

use crate::alloc_guard::Scope;
use crate::input::{In, Out};

/// Small, so that the fuzzer reaches the limit.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// The negotiation a client does first.
pub const NEGOTIATE: &[u8] = b"{\"execute\":\"qmp_capabilities\"}\n";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpInput {
    /// Negotiate before the stream (so that mutations reach the commands).
    pub negotiate_first: bool,
    /// Advance the fake migration one step after every command.
    pub advance: bool,
    /// Sizes of the chunks pushed into the session, used in a cycle; 0
    /// means "everything left".
    pub chunks: Vec<u16>,
    pub stream: Vec<u8>,
}

const MAX_CHUNK_SIZES: usize = 8;

impl<'a> Arbitrary<'a> for QmpInput {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut r = In::new(u);
        let flags = r.u8();
        let count = r.u8() as usize % (MAX_CHUNK_SIZES + 1);
        let chunks = (0..count).map(|_| r.u16()).collect();
        Ok(QmpInput { negotiate_first: flags & 1 != 0, advance: flags & 2 != 0, chunks, stream: r.rest() })
    }
}

impl QmpInput {
    /// The bytes that decode to this input.
    pub fn to_bytes(&self) -> Vec<u8> {
        assert!(self.chunks.len() <= MAX_CHUNK_SIZES);
        let mut out = Out::default();
        out.u8(self.negotiate_first as u8 | (self.advance as u8) << 1);
        out.u8(self.chunks.len() as u8);
        for &c in &self.chunks {
            out.u16(c);
        }
        out.raw(&self.stream);
        out.0
    }
}

#[derive(Default)]
struct Collect(Mutex<Vec<Event>>);

impl EventSink for Collect {
    fn emit(&self, event: Event) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

/// What a run produced: the replies to the stream's messages, in order, and
/// the events the VMM raised.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpRunLog {
    pub replies: Vec<Value>,
    pub events: Vec<Event>,
    /// Commands the VMM ran.
    pub executed: usize,
}

fn parse_line(bytes: &[u8]) -> Value {
    assert!(bytes.ends_with(b"\r\n"), "a line ends with CRLF: {:?}", String::from_utf8_lossy(bytes));
    assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "one message, one line");
    let value: Value = serde_json::from_slice(bytes).expect("the session writes JSON");
    assert!(value.is_object(), "a message is an object: {value}");
    value
}

fn check_reply(reply: &Value) {
    let has_return = reply.get("return").is_some();
    let error = reply.get("error");
    assert!(has_return != error.is_some(), "exactly one of return and error: {reply}");
    if let Some(error) = error {
        let class = error["class"].as_str().expect("a class");
        assert!(ErrorClass::ALL.iter().any(|c| c.as_str() == class), "QEMU's class: {class}");
        assert!(!error["desc"].as_str().expect("a desc").is_empty(), "a description");
    }
}

fn drive(input: &QmpInput, sizes: &mut dyn Iterator<Item = usize>) -> QmpRunLog {
    let sink = Arc::new(Collect::default());
    let vmm = FakeVmm::running(sink.clone());
    let mut session = Session::new(SessionConfig { max_message_bytes: MAX_MESSAGE_BYTES, ..SessionConfig::default() });
    let greeting = parse_line(&session.greeting());
    assert!(greeting["QMP"]["version"]["qemu"].is_object(), "greeting: {greeting}");
    if input.negotiate_first {
        session.push(NEGOTIATE);
        match session.poll() {
            Some(Step::Reply(bytes)) => assert_eq!(parse_line(&bytes), serde_json::json!({"return": {}})),
            other => panic!("negotiation answered with {other:?}"),
        }
        assert!(session.is_negotiated());
    }
    let stream = &input.stream;
    let mut replies = Vec::new();
    let mut executed = 0;
    let mut at = 0;
    while at < stream.len() {
        let size = match sizes.next() {
            Some(0) | None => stream.len() - at,
            Some(n) => n.min(stream.len() - at),
        };
        session.push(&stream[at..at + size]);
        at += size;
        while let Some(step) = session.poll() {
            let bytes = match step {
                Step::Reply(bytes) => bytes,
                Step::Execute(request) => {
                    assert!(session.is_negotiated(), "{} reached the VMM before negotiation", request.command.name());
                    assert!(!request.command.is_control(), "the session answers {}", request.command.name());
                    executed += 1;
                    let result = dispatch(&vmm, &request.command);
                    if input.advance {
                        vmm.advance();
                    }
                    session.respond(request.id.as_ref(), result)
                }
            };
            let reply = parse_line(&bytes);
            check_reply(&reply);
            replies.push(reply);
        }
    }
    let events = std::mem::take(&mut *sink.0.lock().unwrap_or_else(|p| p.into_inner()));
    QmpRunLog { replies, events, executed }
}

/// Runs the target on one input; returns what the fuzzer's chunking did.
pub fn run(input: &QmpInput) -> QmpRunLog {
    let stream = &input.stream;
    let limit = (1 << 20) + 16 * stream.len();
    let scope = Scope::begin(limit);

    let sizes: Vec<usize> = input.chunks.iter().map(|&c| c as usize).collect();
    let chunked = if sizes.is_empty() {
        drive(input, &mut std::iter::empty())
    } else {
        drive(input, &mut sizes.iter().copied().cycle())
    };
    let whole = drive(input, &mut std::iter::empty());
    assert_eq!(chunked, whole, "chunking changed what the session did");
    if stream.len() <= 4096 {
        assert_eq!(drive(input, &mut std::iter::repeat(1)), whole, "byte-at-a-time differs");
    }

    // One reply per message, the id echoed.
    let mut framer = Framer::new(MAX_MESSAGE_BYTES);
    framer.push(stream);
    let frames: Vec<Frame> = std::iter::from_fn(|| framer.next_frame()).collect();
    assert_eq!(frames.len(), whole.replies.len(), "one reply per message");
    for (frame, reply) in frames.iter().zip(&whole.replies) {
        match frame {
            Frame::TooLong => {
                assert_eq!(reply["error"]["class"], "GenericError");
                assert!(reply.get("id").is_none());
            }
            Frame::Message(bytes) => match serde_json::from_slice::<Value>(bytes) {
                Ok(Value::Object(request)) => assert_eq!(reply.get("id"), request.get("id"), "the id is echoed"),
                Ok(_) => assert!(reply.get("id").is_none(), "no id to echo"),
                Err(_) => {
                    let desc = reply["error"]["desc"].as_str().unwrap_or_default();
                    assert!(desc.starts_with("JSON parse error, "), "not JSON: {desc}");
                    assert!(reply.get("id").is_none());
                }
            },
        }
    }
    for event in &whole.events {
        let line = parse_line(&event_line(event, Timestamp { seconds: 1, microseconds: 2 }));
        assert_eq!(line["event"], event.name());
        assert_eq!(Event::from_parts(event.name(), line.get("data")).as_ref(), Some(event));
    }

    let usage = scope.usage();
    assert!(usage.largest_bytes <= limit, "allocated {} bytes at once", usage.largest_bytes);
    drop(scope);
    whole
}
