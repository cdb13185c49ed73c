//! A small blocking QMP client (for `postcopy ctl` and tests): connect, read
//! the greeting, negotiate, execute commands, read events. Events that
//! arrive while waiting for a reply are kept for [`QmpClient::next_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::command::Command;
use crate::error::QmpError;
use crate::types::{Event, MigrationInfo, StatusInfo, Timestamp, VersionInfo};

/// Longest line accepted from a server.
const MAX_LINE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("QMP {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("QMP {path}: the server closed the connection")]
    Closed { path: PathBuf },
    #[error("QMP {path}: no message within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("QMP {path}: unexpected message from the server: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("QMP {path}: {command}: {error}")]
    Command { path: PathBuf, command: String, error: QmpError },
}

impl ClientError {
    /// The QMP error reply, when that is what this is.
    pub fn qmp_error(&self) -> Option<&QmpError> {
        match self {
            ClientError::Command { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// An event as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedEvent {
    pub name: String,
    pub data: Option<Value>,
    pub timestamp: Timestamp,
}

impl ReceivedEvent {
    /// The typed event, if it is one this crate knows.
    pub fn event(&self) -> Option<Event> {
        Event::from_parts(&self.name, self.data.as_ref())
    }
}

/// The greeting's contents.
#[derive(Clone, Debug, PartialEq)]
pub struct Greeting {
    pub version: VersionInfo,
    pub capabilities: Vec<String>,
}

pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    greeting: Greeting,
    events: VecDeque<ReceivedEvent>,
    /// Bytes of a line not complete yet (kept across timeouts).
    partial: Vec<u8>,
    next_id: u64,
}

impl QmpClient {
    /// Connects and reads the greeting (not negotiated yet).
    pub fn connect(path: impl AsRef<Path>) -> Result<QmpClient, ClientError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| ClientError::Io { path: path.clone(), source };
        let stream = UnixStream::connect(&path).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut client = QmpClient {
            path: path.clone(),
            reader: BufReader::new(stream),
            writer,
            greeting: Greeting { version: crate::session::SessionConfig::default_version(), capabilities: Vec::new() },
            events: VecDeque::new(),
            partial: Vec::new(),
            next_id: 1,
        };
        let message = client.read_message(None)?;
        let greeting = message
            .get("QMP")
            .and_then(|qmp| {
                let version = serde_json::from_value(qmp.get("version")?.clone()).ok()?;
                let capabilities = serde_json::from_value(qmp.get("capabilities")?.clone()).ok()?;
                Some(Greeting { version, capabilities })
            })
            .ok_or_else(|| client.protocol(format!("not a greeting: {message}")))?;
        client.greeting = greeting;
        Ok(client)
    }

    /// Connects and negotiates: ready for commands.
    pub fn connect_negotiated(path: impl AsRef<Path>) -> Result<QmpClient, ClientError> {
        let mut client = QmpClient::connect(path)?;
        client.execute(&Command::QmpCapabilities { enable: Vec::new() })?;
        Ok(client)
    }

    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol { path: self.path.clone(), detail }
    }

    /// Runs a command; its `return` value.
    pub fn execute(&mut self, command: &Command) -> Result<Value, ClientError> {
        self.execute_raw(command.name(), command.arguments())
    }

    /// Runs a command by name with raw arguments.
    pub fn execute_raw(&mut self, name: &str, arguments: Option<Map<String, Value>>) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": name, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = Value::Object(arguments);
        }
        let mut bytes = serde_json::to_vec(&request).map_err(|e| self.protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(|source| ClientError::Io { path: self.path.clone(), source })?;
        loop {
            let message = self.read_message(None)?;
            if message.get("event").is_some() {
                let event = self.parse_event(&message)?;
                self.events.push_back(event);
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                return Err(self.protocol(format!("reply to another request: {message}")));
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            let error: QmpError = message
                .get("error")
                .and_then(|e| serde_json::from_value(e.clone()).ok())
                .ok_or_else(|| self.protocol(format!("neither return nor error: {message}")))?;
            return Err(ClientError::Command { path: self.path.clone(), command: name.to_owned(), error });
        }
    }

    fn typed<T: serde::de::DeserializeOwned>(&mut self, command: Command) -> Result<T, ClientError> {
        let value = self.execute(&command)?;
        serde_json::from_value(value)
            .map_err(|e| self.protocol(format!("{} returned an unexpected shape: {e}", command.name())))
    }

    pub fn query_status(&mut self) -> Result<StatusInfo, ClientError> {
        self.typed(Command::QueryStatus)
    }

    pub fn query_migrate(&mut self) -> Result<MigrationInfo, ClientError> {
        self.typed(Command::QueryMigrate)
    }

    /// The next event: one already received, or one read within `timeout`
    /// (`None`: wait however long). `Ok(None)` when none came in time.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<ReceivedEvent>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        // A zero timeout still takes what has already arrived.
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        let message = match self.read_message(timeout) {
            Ok(message) => message,
            Err(ClientError::Timeout { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if message.get("event").is_some() {
            return self.parse_event(&message).map(Some);
        }
        Err(self.protocol(format!("a reply nobody asked for: {message}")))
    }

    /// Waits for an event with this name, keeping the others for later.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<ReceivedEvent, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(Some(left))? {
                Some(event) if event.name == name => break Ok(event),
                Some(event) => skipped.push(event),
                None => break Err(ClientError::Timeout { path: self.path.clone(), timeout }),
            }
        };
        for event in skipped.into_iter().rev() {
            self.events.push_front(event);
        }
        found
    }

    fn parse_event(&self, message: &Value) -> Result<ReceivedEvent, ClientError> {
        let name = message.get("event").and_then(Value::as_str);
        let timestamp = message.get("timestamp").and_then(|t| serde_json::from_value(t.clone()).ok());
        match (name, timestamp) {
            (Some(name), Some(timestamp)) => {
                Ok(ReceivedEvent { name: name.to_owned(), data: message.get("data").cloned(), timestamp })
            }
            _ => Err(self.protocol(format!("malformed event: {message}"))),
        }
    }

    /// One JSON line from the server.
    fn read_message(&mut self, timeout: Option<Duration>) -> Result<Value, ClientError> {
        let io = |path: &Path, source| ClientError::Io { path: path.to_path_buf(), source };
        self.reader.get_ref().set_read_timeout(timeout).map_err(|e| io(&self.path, e))?;
        loop {
            let before = self.partial.len();
            let room = MAX_LINE_BYTES.saturating_sub(before) as u64 + 1;
            match Read::take(&mut self.reader, room).read_until(b'\n', &mut self.partial) {
                Ok(0) if self.partial.len() == before => return Err(ClientError::Closed { path: self.path.clone() }),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout { path: self.path.clone(), timeout: timeout.unwrap_or_default() })
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(&self.path, e)),
            }
            if self.partial.len() > MAX_LINE_BYTES {
                return Err(self.protocol(format!("a line longer than {MAX_LINE_BYTES} bytes")));
            }
            if self.partial.last() != Some(&b'\n') {
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|e| self.protocol(format!("not JSON ({e})")));
        }
    }
}
