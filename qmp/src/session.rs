//! One client's QMP session, sans-IO: bytes in, bytes out, commands for the
//! VMM as typed values. No socket, thread or clock here: the caller moves
//! bytes, runs the commands and passes event timestamps.
//!
//! What it does, in QEMU's order (monitor/qmp.c, qapi/qmp-dispatch.c):
//! 1. The greeting, first: `{"QMP": {"version": ..., "capabilities": []}}`.
//! 2. Each message: not JSON gives `GenericError` "JSON parse error, ..."
//!    (no `id`: there is no request to take it from); not an object gives
//!    "QMP input must be a JSON object"; then the members: `execute` must be a
//!    string, `arguments` an object, `id` anything (echoed as it came, a
//!    number or an object as well as a string), nothing else ("QMP input
//!    member 'x' is unexpected"; `exec-oob` too, as oob is not offered).
//! 3. Before `qmp_capabilities`, any other command gives `CommandNotFound`
//!    "Expecting capabilities negotiation with 'qmp_capabilities'"; after it,
//!    `qmp_capabilities` again gives `CommandNotFound`.
//! 4. An unknown command gives `CommandNotFound` "The command X has not been
//!    found"; bad arguments give QEMU's `GenericError`s ([`crate::schema`]).
//! 5. `qmp_capabilities`, `query-version` and `query-commands` are answered
//!    here; every other command goes to the caller as [`Step::Execute`],
//!    whose result [`Session::respond`] turns into the reply.
//!
//! Events go only to sessions past negotiation, as in QEMU.
//!
//! Out-of-band execution is not offered: QEMU offers `oob` so that
//! `migrate-pause` and `migrate-recover` get through while its main loop is
//! stuck (on a postcopy fault, for one); here every client is served by its
//! own thread and the VMM's command handlers never wait on the fault path,
//! so in-band commands already get through, and clients keep the simpler
//! in-order replies. A client asking for `oob` gets QEMU's "Capability oob
//! not available".

use serde_json::{json, Map, Value};

use crate::command::{Command, COMMANDS};
use crate::error::QmpError;
use crate::framing::{Frame, Framer};
use crate::types::{CommandInfo, Event, Timestamp, VersionInfo, VersionTriple};

/// What a session is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Sent in the greeting and by `query-version`.
    pub version: VersionInfo,
    /// Longest message accepted, in bytes.
    pub max_message_bytes: usize,
}

impl SessionConfig {
    /// QEMU 10.1, whose migration schema (with `postcopy-latency-dist`) this
    /// crate follows: clients that gate features on the version see the one
    /// whose members they get. `package` names this VMM.
    pub fn default_version() -> VersionInfo {
        VersionInfo {
            qemu: VersionTriple { major: 10, minor: 1, micro: 0 },
            package: format!("postcopy {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { version: SessionConfig::default_version(), max_message_bytes: 1 << 20 }
    }
}

/// A command for the VMM, and the `id` its reply echoes.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub command: Command,
}

/// What the session needs done next.
// One step a command, taken at once: boxing the request (past clippy's
// size limit since `x-push-streams`) would only add an allocation a command.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Send these bytes (a reply the session made itself).
    Reply(Vec<u8>),
    /// Run this command, then send [`Session::respond`]'s bytes.
    Execute(Request),
}

#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    framer: Framer,
    negotiated: bool,
}

/// A message as it goes on the wire: one JSON line, CRLF-terminated as
/// QEMU's monitor writes it.
fn line(value: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    out.extend_from_slice(b"\r\n");
    out
}

/// An event's line: `{"event": NAME, "data": ..., "timestamp": {...}}`
/// (`data` left out for events without it, as QEMU does).
pub fn event_line(event: &Event, timestamp: Timestamp) -> Vec<u8> {
    let mut message = Map::new();
    message.insert("event".into(), Value::String(event.name().into()));
    if let Some(data) = event.data() {
        message.insert("data".into(), data);
    }
    message.insert("timestamp".into(), json!({ "seconds": timestamp.seconds, "microseconds": timestamp.microseconds }));
    line(&Value::Object(message))
}

/// A reply's line.
pub fn reply_line(id: Option<&Value>, result: Result<Value, QmpError>) -> Vec<u8> {
    let mut message = Map::new();
    match result {
        Ok(value) => message.insert("return".into(), value),
        Err(error) => message.insert("error".into(), json!({ "class": error.class.as_str(), "desc": error.desc })),
    };
    if let Some(id) = id {
        message.insert("id".into(), id.clone());
    }
    line(&Value::Object(message))
}

impl Session {
    pub fn new(config: SessionConfig) -> Session {
        let framer = Framer::new(config.max_message_bytes);
        Session { config, framer, negotiated: false }
    }

    /// The first bytes to send.
    pub fn greeting(&self) -> Vec<u8> {
        line(&json!({ "QMP": { "version": self.config.version, "capabilities": [] } }))
    }

    /// Whether `qmp_capabilities` succeeded (events go out from then on).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Feeds bytes from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        self.framer.push(bytes);
    }

    /// The next thing to do, or `None` until more bytes arrive.
    pub fn poll(&mut self) -> Option<Step> {
        let frame = self.framer.next_frame()?;
        Some(match frame {
            Frame::TooLong => Step::Reply(reply_line(None, Err(QmpError::too_long(self.config.max_message_bytes)))),
            Frame::Message(bytes) => self.handle(&bytes),
        })
    }

    /// The reply to a request the caller executed.
    pub fn respond(&self, id: Option<&Value>, result: Result<Value, QmpError>) -> Vec<u8> {
        reply_line(id, result)
    }

    fn handle(&mut self, bytes: &[u8]) -> Step {
        let request: Value = match serde_json::from_slice(bytes) {
            Ok(value) => value,
            Err(e) => return Step::Reply(reply_line(None, Err(QmpError::json_parse(e)))),
        };
        let Value::Object(request) = request else {
            return Step::Reply(reply_line(None, Err(QmpError::generic("QMP input must be a JSON object"))));
        };
        let id = request.get("id").cloned();
        match self.dispatch(&request) {
            Ok(Dispatch::Answer(value)) => Step::Reply(reply_line(id.as_ref(), Ok(value))),
            Ok(Dispatch::Execute(command)) => Step::Execute(Request { id, command }),
            Err(error) => Step::Reply(reply_line(id.as_ref(), Err(error))),
        }
    }

    fn dispatch(&mut self, request: &Map<String, Value>) -> Result<Dispatch, QmpError> {
        for (key, value) in request {
            match key.as_str() {
                "execute" if !value.is_string() => {
                    return Err(QmpError::generic("QMP input member 'execute' must be a string"))
                }
                "arguments" if !value.is_object() => {
                    return Err(QmpError::generic("QMP input member 'arguments' must be an object"))
                }
                "execute" | "arguments" | "id" => {}
                other => return Err(QmpError::generic(format!("QMP input member '{other}' is unexpected"))),
            }
        }
        let Some(name) = request.get("execute").and_then(Value::as_str) else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let arguments = request.get("arguments").and_then(Value::as_object);
        if !self.negotiated && name != "qmp_capabilities" {
            return Err(QmpError::expecting_negotiation());
        }
        let command = Command::parse(name, arguments)?;
        match command {
            Command::QmpCapabilities { enable } => {
                if self.negotiated {
                    return Err(QmpError::negotiation_complete());
                }
                if !enable.is_empty() {
                    // The greeting offers none; QEMU lists every one asked for.
                    let names: Vec<&str> = enable.iter().map(|c| c.as_str()).collect();
                    return Err(QmpError::generic(format!("Capability {} not available", names.join(", "))));
                }
                self.negotiated = true;
                Ok(Dispatch::Answer(json!({})))
            }
            Command::QueryVersion => Ok(Dispatch::Answer(json!(self.config.version))),
            Command::QueryCommands => {
                let list: Vec<CommandInfo> = COMMANDS.iter().map(|c| CommandInfo { name: c.name.into() }).collect();
                Ok(Dispatch::Answer(json!(list)))
            }
            command => Ok(Dispatch::Execute(command)),
        }
    }
}

enum Dispatch {
    Answer(Value),
    Execute(Command),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use crate::types::{MigrationStatus, ShutdownCause};

    fn parse_line(bytes: &[u8]) -> Value {
        assert!(bytes.ends_with(b"\r\n"), "a line ends with CRLF: {:?}", String::from_utf8_lossy(bytes));
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        serde_json::from_slice(bytes).unwrap()
    }

    /// Feeds `input`; what came out (replies the session made; Execute steps
    /// answered with `{"ran": NAME}`).
    fn exchange(session: &mut Session, input: &str) -> Vec<Value> {
        session.push(input.as_bytes());
        std::iter::from_fn(|| session.poll())
            .map(|step| match step {
                Step::Reply(bytes) => parse_line(&bytes),
                Step::Execute(request) => {
                    parse_line(&reply_line(request.id.as_ref(), Ok(json!({ "ran": request.command.name() }))))
                }
            })
            .collect()
    }

    fn one(session: &mut Session, input: &str) -> Value {
        let mut out = exchange(session, input);
        assert_eq!(out.len(), 1, "{out:?}");
        out.remove(0)
    }

    fn negotiated() -> Session {
        let mut session = Session::new(SessionConfig::default());
        assert_eq!(one(&mut session, r#"{"execute": "qmp_capabilities"}"#), json!({"return": {}}));
        session
    }

    fn error(class: &str, desc: &str) -> Value {
        json!({"error": {"class": class, "desc": desc}})
    }

    #[test]
    fn greeting_is_qemus_without_oob() {
        let session = Session::new(SessionConfig::default());
        let greeting = parse_line(&session.greeting());
        assert_eq!(greeting["QMP"]["capabilities"], json!([]));
        assert_eq!(greeting["QMP"]["version"]["qemu"], json!({"major": 10, "minor": 1, "micro": 0}));
        assert!(greeting["QMP"]["version"]["package"].as_str().unwrap().starts_with("postcopy "));
    }

    #[test]
    fn commands_before_negotiation_are_not_found() {
        let mut session = Session::new(SessionConfig::default());
        let reply = one(&mut session, r#"{"execute": "query-status", "id": "a"}"#);
        let mut expected = error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
        expected["id"] = json!("a");
        assert_eq!(reply, expected);
        // Unknown commands too, and the input checks still come first.
        assert_eq!(one(&mut session, r#"{"execute": "nope"}"#)["error"]["class"], "CommandNotFound");
        assert_eq!(one(&mut session, r#"{"id": 1}"#)["error"]["desc"], "QMP input lacks member 'execute'");
        assert!(!session.is_negotiated());
    }

    #[test]
    fn oob_is_not_available_and_negotiation_happens_once() {
        let mut session = Session::new(SessionConfig::default());
        let reply = one(&mut session, r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#);
        assert_eq!(reply, error("GenericError", "Capability oob not available"));
        assert!(!session.is_negotiated());
        assert_eq!(one(&mut session, r#"{"execute": "qmp_capabilities", "id": 7}"#), json!({"return": {}, "id": 7}));
        assert!(session.is_negotiated());
        assert_eq!(
            one(&mut session, r#"{"execute": "qmp_capabilities"}"#),
            error("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        );
    }

    #[test]
    fn vm_commands_go_to_the_caller_with_their_id() {
        let mut session = negotiated();
        session.push(br#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}, "id": {"n": [1]}}"#);
        let Some(Step::Execute(request)) = session.poll() else { panic!("an Execute step") };
        assert_eq!(request.id, Some(json!({"n": [1]})));
        assert_eq!(request.command.name(), "migrate");
        assert_eq!(session.poll(), None);
    }

    #[test]
    fn ids_are_echoed_whatever_their_type() {
        let mut session = negotiated();
        for id in [json!("s"), json!(42), json!(-1.5), json!({"a": [null]}), json!([1, "x"]), json!(null), json!(true)]
        {
            let request = json!({"execute": "query-status", "id": id});
            assert_eq!(one(&mut session, &request.to_string()), json!({"return": {"ran": "query-status"}, "id": id}));
            // And on errors.
            let bad = json!({"execute": "no-such", "id": id});
            assert_eq!(one(&mut session, &bad.to_string())["id"], id);
        }
        // No id, none in the reply.
        assert_eq!(one(&mut session, r#"{"execute": "stop"}"#), json!({"return": {"ran": "stop"}}));
    }

    #[test]
    fn malformed_requests_get_qemus_errors() {
        let mut session = negotiated();
        let cases = [
            (r#"{"execute": 1, "id": 1}"#, "QMP input member 'execute' must be a string"),
            (r#"{"execute": "stop", "arguments": [], "id": 1}"#, "QMP input member 'arguments' must be an object"),
            (r#"{"execute": "stop", "foo": 0, "id": 1}"#, "QMP input member 'foo' is unexpected"),
            (r#"{"exec-oob": "migrate-pause", "id": 1}"#, "QMP input member 'exec-oob' is unexpected"),
            (r#"{"arguments": {}, "id": 1}"#, "QMP input lacks member 'execute'"),
            (r#"{"execute": "migrate", "id": 1}"#, "Parameter 'uri' is missing"),
            (r#"{"execute": "stop", "arguments": {"x": 1}, "id": 1}"#, "Parameter 'x' is unexpected"),
        ];
        for (input, desc) in cases {
            let mut expected = error("GenericError", desc);
            expected["id"] = json!(1);
            assert_eq!(one(&mut session, input), expected, "{input}");
        }
        assert_eq!(one(&mut session, "[1, 2]"), error("GenericError", "QMP input must be a JSON object"));
        assert_eq!(
            one(&mut session, r#"{"execute": "x-no", "id": 2}"#),
            json!({"error": {"class": "CommandNotFound", "desc": "The command x-no has not been found"}, "id": 2})
        );
    }

    #[test]
    fn non_json_gets_a_parse_error_and_the_session_goes_on() {
        let mut session = negotiated();
        for garbage in ["hello\n", "{\"execute\": }", "{\"a\" 1}", "\"unterminated\n", "\u{1}\n", "]\n"] {
            let reply = one(&mut session, garbage);
            assert_eq!(reply["error"]["class"], "GenericError", "{garbage:?}");
            assert!(reply["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "), "{reply}");
            assert!(reply.get("id").is_none());
        }
        // Invalid UTF-8 inside a string.
        session.push(b"{\"execute\": \"st\xffop\"}");
        let Some(Step::Reply(bytes)) = session.poll() else { panic!("a reply") };
        assert!(parse_line(&bytes)["error"]["desc"].as_str().unwrap().starts_with("JSON parse error, "));
        assert_eq!(one(&mut session, r#"{"execute": "cont"}"#), json!({"return": {"ran": "cont"}}));
    }

    #[test]
    fn requests_may_share_a_line_or_span_several() {
        let mut session = negotiated();
        let out = exchange(&mut session, "{\"execute\": \"stop\"}{\"execute\": \"cont\"}\n{\"execute\":\n\"quit\"}\n");
        let ran: Vec<&Value> = out.iter().map(|r| &r["return"]["ran"]).collect();
        assert_eq!(ran, [&json!("stop"), &json!("cont"), &json!("quit")]);
    }

    #[test]
    fn a_huge_message_gets_one_error_and_the_session_survives() {
        let mut session = Session::new(SessionConfig { max_message_bytes: 1024, ..SessionConfig::default() });
        one(&mut session, r#"{"execute": "qmp_capabilities"}"#);
        let huge = format!("{{\"execute\": \"stop\", \"id\": \"{}\"}}\n", "x".repeat(100_000));
        let reply = one(&mut session, &huge);
        assert_eq!(reply["error"]["class"], "GenericError");
        assert!(reply["error"]["desc"].as_str().unwrap().starts_with("JSON token size limit exceeded"));
        assert_eq!(one(&mut session, r#"{"execute": "cont", "id": 3}"#), json!({"return": {"ran": "cont"}, "id": 3}));
    }

    #[test]
    fn session_answers_version_and_commands() {
        let mut session = negotiated();
        let version = one(&mut session, r#"{"execute": "query-version"}"#);
        assert_eq!(version["return"]["qemu"]["major"], 10);
        let commands = one(&mut session, r#"{"execute": "query-commands"}"#);
        let names: Vec<&str> =
            commands["return"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        for name in
            ["qmp_capabilities", "query-status", "migrate", "migrate_cancel", "migrate-recover", "query-migrate"]
        {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert_eq!(names.len(), COMMANDS.len());
    }

    #[test]
    fn every_error_class_goes_out_under_its_name() {
        let session = negotiated();
        for class in ErrorClass::ALL {
            let reply = parse_line(&session.respond(Some(&json!(1)), Err(QmpError::new(class, "why"))));
            assert_eq!(reply, json!({"error": {"class": class.as_str(), "desc": "why"}, "id": 1}));
            assert_eq!(serde_json::from_value::<QmpError>(reply["error"].clone()).unwrap().class, class);
        }
    }

    #[test]
    fn events_carry_their_data_and_the_given_time() {
        let at = Timestamp { seconds: 1_700_000_000, microseconds: 123_456 };
        assert_eq!(
            parse_line(&event_line(&Event::Stop, at)),
            json!({"event": "STOP", "timestamp": {"seconds": 1_700_000_000u64, "microseconds": 123_456}})
        );
        let shutdown =
            parse_line(&event_line(&Event::Shutdown { guest: false, reason: ShutdownCause::HostQmpQuit }, at));
        assert_eq!(shutdown["data"], json!({"guest": false, "reason": "host-qmp-quit"}));
        let migration = parse_line(&event_line(&Event::Migration { status: MigrationStatus::PostcopyActive }, at));
        assert_eq!(migration["data"], json!({"status": "postcopy-active"}));
        let pass = parse_line(&event_line(&Event::MigrationPass { pass: 2 }, at));
        assert_eq!(pass["data"], json!({"pass": 2}));
    }
}
