//! `postcopy ctl`: a small QMP client for people: one command and its reply
//! pretty-printed, or `watch`, a live progress line of the migration.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use postcopy_qmp::{ClientError, MigrationInfo, QmpClient};
use serde_json::Value;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The QMP socket of a `postcopy run` process.
    #[arg(long)]
    pub qmp: PathBuf,
    /// A QMP command (`query-migrate`, `migrate`, ...), or `watch`.
    pub command: String,
    /// The command's arguments as a JSON object, e.g. '{"uri": "tcp:127.0.0.1:4444"}'.
    pub arguments: Option<String>,
    /// `watch`: how often to poll `query-migrate`, in ms.
    #[arg(long, default_value_t = 100)]
    pub interval_ms: u64,
}

/// Why `ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The arguments are not a JSON object.
    #[error("the arguments are not a JSON object: {0}")]
    Arguments(String),
    /// QMP failed (the connection, or the command's error reply).
    #[error(transparent)]
    Qmp(#[from] ClientError),
    /// The terminal could not be written.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// `postcopy ctl`.
pub fn ctl(a: CtlArgs) -> Result<ExitCode, CtlError> {
    let mut client = QmpClient::connect_negotiated(&a.qmp)?;
    if a.command == "watch" {
        return watch(&mut client, Duration::from_millis(a.interval_ms.max(1)));
    }
    let arguments = match &a.arguments {
        None => None,
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Some(map),
            Ok(other) => return Err(CtlError::Arguments(other.to_string())),
            Err(e) => return Err(CtlError::Arguments(format!("{text}: {e}"))),
        },
    };
    match client.execute_raw(&a.command, arguments) {
        Ok(value) => {
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string()));
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Command { error, .. }) => {
            eprintln!("{}: {}", error.class.as_str(), error.desc);
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

/// One line of progress from a `query-migrate` reply.
pub fn progress_line(info: &MigrationInfo) -> String {
    let Some(status) = info.status else { return "no migration".into() };
    let mut line = format!("{status:<16}");
    if let Some(ram) = &info.ram {
        let done = ram.total.saturating_sub(ram.remaining);
        let percent = if ram.total == 0 { 0.0 } else { done as f64 * 100.0 / ram.total as f64 };
        line.push_str(&format!(
            " {percent:5.1}%  {} of {} MiB  remaining {} MiB  sent {} MiB  {:.0} Mbit/s  requests {}",
            done >> 20,
            ram.total >> 20,
            ram.remaining >> 20,
            ram.transferred >> 20,
            ram.mbps,
            ram.postcopy_requests
        ));
    }
    if let Some(ms) = info.total_time {
        line.push_str(&format!("  {ms} ms"));
    }
    if let Some(ms) = info.downtime {
        line.push_str(&format!("  downtime {ms} ms"));
    }
    if let Some(error) = &info.error_desc {
        line.push_str(&format!("  error: {error}"));
    }
    line
}

/// How long `watch` waits for events after it saw the migration end.
const FINAL_EVENTS_GRACE: Duration = Duration::from_millis(300);

/// Polls `query-migrate` and prints the events as they come, until the
/// migration ended.
fn watch(client: &mut QmpClient, interval: Duration) -> Result<ExitCode, CtlError> {
    let mut out = std::io::stdout();
    let mut last = String::new();
    loop {
        while let Some(event) = client.next_event(Some(Duration::ZERO))? {
            let data = event.data.as_ref().map(|d| format!(" {d}")).unwrap_or_default();
            writeln!(out, "\r\x1b[Kevent {}{data}", event.name).map_err(CtlError::Output)?;
        }
        let info = client.query_migrate()?;
        let line = progress_line(&info);
        if line != last {
            write!(out, "\r\x1b[K{line}").map_err(CtlError::Output)?;
            out.flush().map_err(CtlError::Output)?;
            last = line;
        }
        if info.status.is_none_or(|s| !s.is_running()) {
            writeln!(out).map_err(CtlError::Output)?;
            // The MIGRATION event of the end may come just after the reply
            // that showed it: wait a little for the events still on their way.
            while let Some(event) = client.next_event(Some(FINAL_EVENTS_GRACE))? {
                let data = event.data.as_ref().map(|d| format!(" {d}")).unwrap_or_default();
                writeln!(out, "event {}{data}", event.name).map_err(CtlError::Output)?;
                let status = event.data.as_ref().and_then(|d| d.get("status")).and_then(|s| s.as_str());
                if event.name == "MIGRATION" && status == info.status.map(|s| s.as_str()) {
                    break;
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(interval);
    }
}
