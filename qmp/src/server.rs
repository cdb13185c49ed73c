//! The QMP server on a Unix socket, on std threads.
//!
//! Each client gets a reader thread (reads, runs the session, calls the
//! VMM, queues the replies) and a writer thread (drains the client's
//! bounded outbound queue into the socket), so that an event is queued for
//! every negotiated client without ever blocking the VMM thread that raised
//! it: a client that does not read until its queue is full is disconnected.
//! The number of clients is bounded; a connection beyond it is closed at
//! once (QEMU, with one monitor per socket, leaves it waiting instead).
//!
//! A client that disconnects while its command runs does not interrupt it:
//! the command runs to its end, its reply is dropped, the other clients and
//! the VMM carry on. Writing to a closed socket relies on Rust's runtime
//! ignoring SIGPIPE, as every Rust binary does.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::session::{event_line, Session, SessionConfig, Step};
use crate::types::{Event, Timestamp};
use crate::vmm::{dispatch, EventSink, Vmm};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("QMP socket {path}: cannot remove the stale socket: {source}")]
    RemoveStale { path: PathBuf, source: std::io::Error },
    #[error("QMP socket {path}: something that is not a socket is in the way")]
    NotASocket { path: PathBuf },
    #[error("QMP socket {path}: cannot listen: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("QMP socket {path}: cannot start a thread: {source}")]
    Thread { path: PathBuf, source: std::io::Error },
}

/// The server's limits, and where its threads run.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub session: SessionConfig,
    /// Clients connected at once, at most.
    pub max_clients: usize,
    /// Messages queued for a client that is not reading, at most; past it
    /// the client is disconnected.
    pub outbound_queue_messages: usize,
    /// Runs first in every thread of the server.
    pub thread_start: ThreadStart,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            session: SessionConfig::default(),
            max_clients: 16,
            outbound_queue_messages: 4096,
            thread_start: ThreadStart::default(),
        }
    }
}

/// What the server's threads (the accept loop, each client's reader and
/// writer) run first, given the thread's name: the VMM places them there,
/// for example on a CPU away from its page-fault path, so that a client
/// polling `query-migrate` does not wake threads where faults are served.
#[derive(Clone, Default)]
pub struct ThreadStart(Option<Arc<StartFn>>);

type StartFn = dyn Fn(&str) + Send + Sync;

impl ThreadStart {
    pub fn new(start: impl Fn(&str) + Send + Sync + 'static) -> Self {
        ThreadStart(Some(Arc::new(start)))
    }

    fn run(&self, thread: &str) {
        if let Some(start) = &self.0 {
            start(thread);
        }
    }
}

impl std::fmt::Debug for ThreadStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ThreadStart(set)" } else { "ThreadStart(none)" })
    }
}

type Message = Arc<[u8]>;

/// Whether a client is past negotiation. Its lock orders the reply to
/// `qmp_capabilities` before any event: the reader queues that reply and
/// sets the flag under it, `emit_at` reads the flag and queues under it
/// (both with `try_send`, so neither ever waits for the client).
type NegotiatedGate = Arc<Mutex<bool>>;

fn gate(negotiated: &NegotiatedGate) -> MutexGuard<'_, bool> {
    negotiated.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct ClientSlot {
    id: u64,
    negotiated: NegotiatedGate,
    outbound: SyncSender<Message>,
    /// For shutting the connection down from outside its threads.
    stream: UnixStream,
}

#[derive(Default)]
struct Registry {
    clients: Mutex<Vec<ClientSlot>>,
    next_id: AtomicU64,
}

/// Broadcasts events to every negotiated client of a server. Create it
/// first, give its [`EventSink`] to the VMM, then the bus to
/// [`Server::bind`].
#[derive(Clone, Default)]
pub struct EventBus {
    registry: Arc<Registry>,
}

impl EventBus {
    pub fn new() -> EventBus {
        EventBus::default()
    }

    fn clients(&self) -> MutexGuard<'_, Vec<ClientSlot>> {
        // The list stays consistent across a panic (pushes and removals).
        self.registry.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.clients().len()
    }

    /// Sends an event stamped with the given time.
    pub fn emit_at(&self, event: &Event, timestamp: Timestamp) {
        let message: Message = event_line(event, timestamp).into();
        for client in self.clients().iter() {
            let negotiated = gate(&client.negotiated);
            if !*negotiated {
                continue;
            }
            match client.outbound.try_send(message.clone()) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(
                        client = client.id,
                        event = event.name(),
                        "QMP client does not read; disconnecting it"
                    );
                    let _ = client.stream.shutdown(std::net::Shutdown::Both);
                }
            }
        }
    }

    fn unregister(&self, id: u64) {
        self.clients().retain(|c| c.id != id);
    }
}

impl EventSink for EventBus {
    fn emit(&self, event: Event) {
        self.emit_at(&event, Timestamp::now());
    }
}

/// A running QMP server. Dropping it (or [`Server::shutdown`]) stops
/// accepting, lets every client's queued replies and events out, closes the
/// connections and removes the socket.
pub struct Server {
    path: PathBuf,
    bus: EventBus,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    /// Listens on `path` (a stale socket there is replaced, as QEMU does)
    /// and serves clients until shut down.
    pub fn bind(
        path: impl AsRef<Path>,
        config: ServerConfig,
        vmm: Arc<dyn Vmm>,
        bus: EventBus,
    ) -> Result<Server, ServerError> {
        let path = path.as_ref().to_path_buf();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotASocket { path });
            }
            std::fs::remove_file(&path).map_err(|source| ServerError::RemoveStale { path: path.clone(), source })?;
        }
        let listener = UnixListener::bind(&path).map_err(|source| ServerError::Bind { path: path.clone(), source })?;
        let stopping = Arc::new(AtomicBool::new(false));
        let threads = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (bus, stopping, threads) = (bus.clone(), stopping.clone(), threads.clone());
            std::thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || accept_loop(listener, config, vmm, bus, stopping, threads))
                .map_err(|source| ServerError::Thread { path: path.clone(), source })?
        };
        Ok(Server { path, bus, stopping, accept: Some(accept), threads })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn events(&self) -> &EventBus {
        &self.bus
    }

    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.stopping.store(true, Ordering::Release);
        // Wake the accept loop; it sees the flag and ends. If the socket
        // file was removed under us nothing can wake it: leave it blocked
        // (it accepts nobody any more) rather than hang here.
        if UnixStream::connect(&self.path).is_ok() {
            let _ = accept.join();
        } else {
            tracing::warn!(path = %self.path.display(), "QMP socket gone; its accept thread stays blocked");
        }
        // Readers see end of input; writers then drain their queues and close.
        for client in self.bus.clients().iter() {
            let _ = client.stream.shutdown(std::net::Shutdown::Read);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    listener: UnixListener,
    config: ServerConfig,
    vmm: Arc<dyn Vmm>,
    bus: EventBus,
    stopping: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    config.thread_start.run("qmp-accept");
    for connection in listener.incoming() {
        if stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match connection {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "QMP accept failed");
                // Out of file descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut threads = threads.lock().unwrap_or_else(|p| p.into_inner());
        threads.retain(|t| !t.is_finished());
        if bus.client_count() >= config.max_clients {
            tracing::warn!(max = config.max_clients, "QMP client refused: too many clients");
            continue;
        }
        match spawn_client(stream, &config, vmm.clone(), &bus) {
            Ok(handles) => threads.extend(handles),
            Err(e) => tracing::warn!(error = %e, "QMP client dropped: cannot start its threads"),
        }
    }
}

fn spawn_client(
    stream: UnixStream,
    config: &ServerConfig,
    vmm: Arc<dyn Vmm>,
    bus: &EventBus,
) -> std::io::Result<[JoinHandle<()>; 2]> {
    let id = bus.registry.next_id.fetch_add(1, Ordering::Relaxed);
    let (outbound, queue) = sync_channel::<Message>(config.outbound_queue_messages);
    let negotiated: NegotiatedGate = Arc::new(Mutex::new(false));
    let mut writer_stream = stream.try_clone()?;
    bus.clients().push(ClientSlot {
        id,
        negotiated: negotiated.clone(),
        outbound: outbound.clone(),
        stream: stream.try_clone()?,
    });
    let writer_start = config.thread_start.clone();
    let writer = std::thread::Builder::new().name(format!("qmp-write-{id}")).spawn(move || {
        writer_start.run("qmp-write");
        for message in queue {
            if writer_stream.write_all(&message).is_err() {
                break;
            }
        }
        let _ = writer_stream.shutdown(std::net::Shutdown::Both);
    });
    let writer = match writer {
        Ok(writer) => writer,
        Err(e) => {
            bus.unregister(id);
            return Err(e);
        }
    };
    let session = Session::new(config.session.clone());
    let reader_bus = bus.clone();
    let reader_start = config.thread_start.clone();
    let reader = std::thread::Builder::new().name(format!("qmp-read-{id}")).spawn(move || {
        reader_start.run("qmp-read");
        serve(stream, session, &*vmm, &outbound, &negotiated);
        tracing::debug!(client = id, "QMP client gone");
        reader_bus.unregister(id);
    });
    match reader {
        Ok(reader) => Ok([reader, writer]),
        Err(e) => {
            bus.unregister(id);
            Err(e)
        }
    }
}

/// One client's requests until it closes (or its writer failed).
fn serve(
    mut stream: UnixStream,
    mut session: Session,
    vmm: &dyn Vmm,
    outbound: &SyncSender<Message>,
    negotiated: &NegotiatedGate,
) {
    if outbound.send(session.greeting().into()).is_err() {
        return;
    }
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        session.push(&buffer[..read]);
        loop {
            let was_negotiated = session.is_negotiated();
            let Some(step) = session.poll() else { break };
            let reply = match step {
                Step::Reply(bytes) => bytes,
                Step::Execute(request) => {
                    let result = dispatch(vmm, &request.command);
                    session.respond(request.id.as_ref(), result)
                }
            };
            if session.is_negotiated() && !was_negotiated {
                // The reply to qmp_capabilities, then the flag, with no
                // event between. A client whose queue is full before it
                // even negotiated is not reading: drop it.
                let mut negotiated = gate(negotiated);
                if outbound.try_send(reply.into()).is_err() {
                    return;
                }
                *negotiated = true;
            } else if outbound.send(reply.into()).is_err() {
                return;
            }
        }
    }
}
