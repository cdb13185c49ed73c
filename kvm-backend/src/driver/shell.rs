//! What both sides' drivers share: the core and its connections under one
//! lock, one event at a time, the timer thread, a lost connection, the
//! farewell, and the try-lock flush of the fault path's outgoing channel.
//!
//! A side plugs in through [`SideDriver`]: its core (a [`ProtocolCore`]),
//! how the core's actions become its operations, and how it carries them
//! out. Everything here is generic and monomorphised: no dynamic dispatch,
//! no allocation and no lock beyond the side's own on the fault path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Scope;
use std::time::Duration;

use bytes::Bytes;
use postcopy_core::{
    Admission, Channel, ConnectionId, DeferredPage, Destination, DestinationAction, DestinationState, EventError,
    Notice, Source, SourceAction, SourceState, Timestamp,
};

use super::clock::now;
use super::net::{lock_spin, Connection};
use super::placement::{set_policy, Boost, Tuning};
use super::watch::{UserRequest, Watch, SAMPLE_INTERVAL};
use crate::devices::lock;

/// How long a thread spins for the core lock before sleeping on it.
pub(super) const LOCK_SPIN: Duration = Duration::from_micros(10);
/// How long the timer thread sleeps at most between two looks at the core.
const TIMER_TICK: Duration = Duration::from_millis(10);
/// How long a farewell may take to write before its connection is cut.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the shell needs of a sans-IO core (`postcopy_core::Source` and
/// `Destination` both have it; this crate implements it for them).
pub(super) trait ProtocolCore: Send {
    /// What the core asks the driver to do.
    type Action;
    /// Where the core is in the migration.
    type State: Copy + PartialEq + Send;
    /// The core's state now.
    fn state(&self) -> Self::State;
    /// The user's request; an error if the core cannot take it now.
    fn handle_user_request(&mut self, now: Timestamp, request: UserRequest) -> Result<(), EventError>;
    /// The next action, if any.
    fn poll_action(&mut self) -> Option<Self::Action>;
    /// When [`ProtocolCore::handle_timeout`] is due next.
    fn poll_timeout(&self) -> Option<Timestamp>;
    /// A deadline passed.
    fn handle_timeout(&mut self, now: Timestamp);
    /// A connection for `channel` is up.
    fn handle_connected(&mut self, now: Timestamp, channel: Channel);
    /// The connection of `channel` closed or failed.
    fn handle_connection_lost(&mut self, now: Timestamp, channel: Channel);
    /// Bytes arrived on `channel`.
    fn handle_input(&mut self, now: Timestamp, channel: Channel, bytes: Bytes);
    /// The migration ended, one way or the other.
    fn is_terminal(&self) -> bool;
    /// The guest was told to run on the destination (the switchover is over).
    fn guest_started(&self) -> bool;
}

impl ProtocolCore for Source {
    type Action = SourceAction;
    type State = SourceState;
    fn state(&self) -> SourceState {
        Source::state(self)
    }
    fn handle_user_request(&mut self, now: Timestamp, request: UserRequest) -> Result<(), EventError> {
        match request {
            UserRequest::Cancel => self.handle_cancel(now),
            UserRequest::SwitchToPostcopy => self.handle_switch_to_postcopy(now),
            UserRequest::Pause => self.handle_pause(now),
            // The driver pointed its connections at the address first.
            UserRequest::Resume(_) => self.handle_resume(now),
        }
    }
    fn poll_action(&mut self) -> Option<SourceAction> {
        Source::poll_action(self)
    }
    fn poll_timeout(&self) -> Option<Timestamp> {
        Source::poll_timeout(self)
    }
    fn handle_timeout(&mut self, now: Timestamp) {
        Source::handle_timeout(self, now)
    }
    fn handle_connected(&mut self, now: Timestamp, channel: Channel) {
        Source::handle_connected(self, now, channel)
    }
    fn handle_connection_lost(&mut self, now: Timestamp, channel: Channel) {
        Source::handle_connection_lost(self, now, channel)
    }
    fn handle_input(&mut self, now: Timestamp, channel: Channel, bytes: Bytes) {
        Source::handle_input(self, now, channel, bytes)
    }
    fn is_terminal(&self) -> bool {
        self.state().is_terminal()
    }
    fn guest_started(&self) -> bool {
        self.state().after_start()
    }
}

impl ProtocolCore for Destination {
    type Action = DestinationAction;
    type State = DestinationState;
    fn state(&self) -> DestinationState {
        Destination::state(self)
    }
    fn handle_user_request(&mut self, now: Timestamp, request: UserRequest) -> Result<(), EventError> {
        match request {
            UserRequest::Cancel => self.handle_cancel(now),
            // Only the source decides when to switch.
            UserRequest::SwitchToPostcopy => Ok(()),
            UserRequest::Pause => self.handle_pause(now),
            // The source reconnects; the destination waits for it.
            UserRequest::Resume(_) => Err(EventError::WrongState { event: "resume", state: self.state().to_string() }),
        }
    }
    fn poll_action(&mut self) -> Option<DestinationAction> {
        Destination::poll_action(self)
    }
    fn poll_timeout(&self) -> Option<Timestamp> {
        Destination::poll_timeout(self)
    }
    fn handle_timeout(&mut self, now: Timestamp) {
        Destination::handle_timeout(self, now)
    }
    fn handle_connected(&mut self, now: Timestamp, channel: Channel) {
        Destination::handle_connected(self, now, channel)
    }
    fn handle_connection_lost(&mut self, now: Timestamp, channel: Channel) {
        Destination::handle_connection_lost(self, now, channel)
    }
    fn handle_input(&mut self, now: Timestamp, channel: Channel, bytes: Bytes) {
        Destination::handle_input(self, now, channel, bytes)
    }
    fn is_terminal(&self) -> bool {
        self.state().is_terminal()
    }
    fn guest_started(&self) -> bool {
        Destination::guest_started(self)
    }
}

/// The core and the current connection of each channel, under one lock:
/// a `Close` resolved under it names exactly the connection the core meant.
pub(super) struct LockedCore<C: ProtocolCore> {
    /// The side's core.
    pub(super) core: C,
    connections: [Option<Arc<Connection>>; Channel::COUNT],
    /// The destination's provisional connections (beside their channel's
    /// current one until the core promotes or closes them).
    provisional: Vec<(ConnectionId, Arc<Connection>)>,
    /// The state the watch last heard of.
    watched_state: Option<C::State>,
}

impl<C: ProtocolCore> LockedCore<C> {
    fn new(core: C) -> Self {
        Self { core, connections: Default::default(), provisional: Vec::new(), watched_state: None }
    }

    /// Whether `conn` is still its channel's connection (not replaced or closed).
    pub(super) fn is_current(&self, conn: &Connection) -> bool {
        self.connections[conn.channel.index()].as_ref().is_some_and(|c| c.id == conn.id)
    }

    /// The current connection of `channel`.
    pub(super) fn connection(&self, channel: Channel) -> Option<&Arc<Connection>> {
        self.connections[channel.index()].as_ref()
    }

    /// Makes `conn` its channel's connection (shutting down the one it
    /// replaces) and tells the core.
    pub(super) fn attach(&mut self, now: Timestamp, conn: Arc<Connection>) {
        let channel = conn.channel;
        if let Some(old) = self.connections[channel.index()].replace(conn) {
            old.shutdown();
        }
        self.core.handle_connected(now, channel);
    }

    /// Bytes read from `conn`, for the core if `conn` is still current.
    /// Returns whether it was (if not, its successor's reader goes on).
    pub(super) fn input(&mut self, now: Timestamp, conn: &Connection, bytes: Bytes) -> bool {
        if !self.is_current(conn) {
            return false;
        }
        self.core.handle_input(now, conn.channel, bytes);
        true
    }

    /// `conn` closed or failed: when it is still current, its channel has
    /// none now and the core hears of it. Returns whether it was current.
    pub(super) fn detach(&mut self, now: Timestamp, conn: &Connection) -> bool {
        if !self.is_current(conn) {
            return false;
        }
        self.connections[conn.channel.index()] = None;
        self.core.handle_connection_lost(now, conn.channel);
        true
    }

    /// The core's `Close(channel)`: the connection to shut down, if any.
    pub(super) fn close(&mut self, channel: Channel) -> Option<ConnectionOp> {
        self.connections[channel.index()].take().map(ConnectionOp::Shutdown)
    }

    /// The core's `Farewell { channel, bytes }`: the connection to write
    /// `bytes` on before shutting it down, if any.
    pub(super) fn farewell(&mut self, channel: Channel, bytes: Bytes) -> Option<ConnectionOp> {
        self.connections[channel.index()].take().map(|conn| ConnectionOp::Farewell(conn, bytes))
    }
}

impl LockedCore<Destination> {
    /// Hands an accepted connection to the core: its channel's current
    /// connection (replacing and shutting down an older one), or a
    /// provisional one the core judges by its first frame.
    pub(super) fn accept(&mut self, now: Timestamp, conn: Arc<Connection>) {
        match self.core.handle_accepted(now, conn.channel) {
            Admission::Current => {
                if let Some(old) = self.connections[conn.channel.index()].replace(conn) {
                    old.shutdown();
                }
            }
            Admission::Provisional(id) => self.provisional.push((id, conn)),
        }
    }

    fn provisional_position(&self, conn: &Connection) -> Option<usize> {
        self.provisional.iter().position(|(_, c)| c.id == conn.id)
    }

    /// Bytes read from `conn`, for the core as its channel's current
    /// connection or as a provisional one. Returns whether it was either
    /// (if not, it was closed or replaced: its reader stops).
    pub(super) fn accepted_input(&mut self, now: Timestamp, conn: &Connection, bytes: Bytes) -> bool {
        if self.is_current(conn) {
            self.core.handle_input(now, conn.channel, bytes);
            return true;
        }
        match self.provisional_position(conn) {
            Some(position) => {
                let id = self.provisional[position].0;
                self.core.handle_provisional_input(now, id, bytes);
                true
            }
            None => false,
        }
    }

    /// `conn` closed or failed: the core hears of it if it was current or
    /// provisional. Returns whether it was current.
    pub(super) fn accepted_lost(&mut self, now: Timestamp, conn: &Connection) -> bool {
        if self.detach(now, conn) {
            return true;
        }
        if let Some(position) = self.provisional_position(conn) {
            let (id, _) = self.provisional.remove(position);
            self.core.handle_provisional_lost(now, id);
        }
        false
    }

    /// The core's `PromoteConnection(id)`: the provisional connection
    /// becomes its channel's current one (the core closed the older one
    /// first); an older one still here is returned to shut down.
    pub(super) fn promote(&mut self, id: ConnectionId) -> Option<ConnectionOp> {
        let position = self.provisional.iter().position(|(p, _)| *p == id)?;
        let (_, conn) = self.provisional.remove(position);
        self.connections[conn.channel.index()].replace(conn).map(ConnectionOp::Shutdown)
    }

    /// The core's `CloseConnection(id)`: the provisional connection to shut down.
    pub(super) fn close_provisional(&mut self, id: ConnectionId) -> Option<ConnectionOp> {
        let position = self.provisional.iter().position(|(p, _)| *p == id)?;
        Some(ConnectionOp::Shutdown(self.provisional.remove(position).1))
    }

    /// Takes away every connection, current or provisional, that `keep`
    /// refuses (the core hears of each), for the caller to shut down.
    pub(super) fn drop_connections(
        &mut self,
        now: Timestamp,
        keep: impl Fn(&Connection) -> bool,
    ) -> Vec<Arc<Connection>> {
        let mut dropped = Vec::new();
        for channel in Channel::EVERY {
            if let Some(conn) = self.connections[channel.index()].clone() {
                if !keep(&conn) && self.detach(now, &conn) {
                    dropped.push(conn);
                }
            }
        }
        let (kept, refused): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.provisional).into_iter().partition(|(_, c)| keep(c));
        self.provisional = kept;
        for (id, conn) in refused {
            self.core.handle_provisional_lost(now, id);
            dropped.push(conn);
        }
        dropped
    }
}

/// What the driver does to a connection the core let go of.
pub(super) enum ConnectionOp {
    /// Shut it down.
    Shutdown(Arc<Connection>),
    /// Write these last bytes, then shut it down.
    Farewell(Arc<Connection>, Bytes),
}

/// The state every side's driver has: the locked core, a write lock and a
/// flush request per channel, the stop flag and the notices.
///
/// Lock order: a channel's write lock, then the core lock; nobody takes a
/// write lock while holding the core lock.
pub(super) struct Shell<C: ProtocolCore> {
    pub(super) locked: Mutex<LockedCore<C>>,
    pub(super) write_locks: [Mutex<()>; Channel::COUNT],
    flush_wanted: [AtomicBool; Channel::COUNT],
    /// Set when the side's threads should end.
    pub(super) stopping: AtomicBool,
    notices: Mutex<Vec<String>>,
    pub(super) tuning: Tuning,
    watch: Option<Arc<dyn Watch<C>>>,
}

impl<C: ProtocolCore> Shell<C> {
    /// The shell of `core`, which a VMM may watch.
    pub(super) fn new(core: C, tuning: Tuning, watch: Option<Arc<dyn Watch<C>>>) -> Self {
        Self {
            locked: Mutex::new(LockedCore::new(core)),
            write_locks: std::array::from_fn(|_| Mutex::new(())),
            flush_wanted: std::array::from_fn(|_| AtomicBool::new(false)),
            stopping: AtomicBool::new(false),
            notices: Mutex::new(Vec::new()),
            tuning,
            watch,
        }
    }

    /// Tells the watch (if any) when the core's state changed; under the
    /// core lock. Without a change this is one comparison.
    pub(super) fn observe(&self, l: &mut LockedCore<C>) {
        if let Some(watch) = &self.watch {
            let state = l.core.state();
            if l.watched_state != Some(state) {
                l.watched_state = Some(state);
                watch.state_changed(&l.core, now());
            }
        }
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Takes every connection away and shuts it down (unblocks every reader
    /// and writer still attached to one).
    pub(super) fn shutdown_all(&self) {
        let conns: Vec<Arc<Connection>> = {
            let mut l = lock(&self.locked);
            let provisional = std::mem::take(&mut l.provisional).into_iter().map(|(_, c)| c);
            l.connections.iter_mut().filter_map(Option::take).chain(provisional).collect()
        };
        for conn in conns {
            conn.shutdown();
        }
    }

    /// Whether any channel still has a connection.
    pub(super) fn any_connection(&self) -> bool {
        lock(&self.locked).connections.iter().any(Option::is_some)
    }

    /// Records a notice the driver itself raised (not the core's).
    pub(super) fn record_notice(&self, text: String) {
        lock(&self.notices).push(text);
    }

    /// The notices so far, as text.
    pub(super) fn notices(&self) -> Vec<String> {
        lock(&self.notices).clone()
    }
}

/// One side's driver, as the shell drives it.
pub(super) trait SideDriver: Sync + Sized {
    /// The side's core.
    type Core: ProtocolCore;
    /// What the side does for its core, resolved under the core lock.
    type Op;
    /// "source" or "destination", in logs.
    const SIDE: &'static str;
    /// Name of the timer thread.
    const TIMER_THREAD: &'static str;
    /// Name of the thread that writes a farewell.
    const FAREWELL_THREAD: &'static str;
    /// The channel the fault path writes on (flushed by [`SideDriver::flush_fault_path`]).
    const FAULT_PATH_CHANNEL: Channel;

    /// The shared state.
    fn shell(&self) -> &Shell<Self::Core>;

    /// Turns one of the core's actions into an operation (None: nothing to
    /// do), with the core lock held.
    fn to_op(
        &self,
        locked: &mut LockedCore<Self::Core>,
        action: <Self::Core as ProtocolCore>::Action,
    ) -> Option<Self::Op>;

    /// Carries out operations, with the core lock released.
    fn execute<'s>(&'s self, s: &'s Scope<'s, '_>, ops: Vec<Self::Op>);

    /// With the core lock held: the frames for [`SideDriver::FAULT_PATH_CHANNEL`]
    /// into `buf` (page contents may be left in `deferred`), and the
    /// connection they go on (None: nothing goes out now).
    fn poll_fault_path(
        &self,
        locked: &mut LockedCore<Self::Core>,
        buf: &mut Vec<u8>,
        deferred: &mut Vec<DeferredPage>,
    ) -> Option<Arc<Connection>>;

    /// With the core lock released: the contents of the pages left in
    /// `deferred`, into `buf`.
    fn fill_deferred(&self, deferred: &[DeferredPage], buf: &mut [u8]);

    /// Hands the user's `request` to the core (under the core lock); a side
    /// may first do its share (the source points its connections at a
    /// resume's address).
    fn user_request(
        &self,
        locked: &mut LockedCore<Self::Core>,
        now: Timestamp,
        request: UserRequest,
    ) -> Result<(), EventError> {
        locked.core.handle_user_request(now, request)
    }

    /// The core's pending actions as operations (under the core lock).
    fn drain(&self, locked: &mut LockedCore<Self::Core>) -> Vec<Self::Op> {
        self.shell().observe(locked);
        let mut ops = Vec::new();
        while let Some(action) = locked.core.poll_action() {
            if let Some(op) = self.to_op(locked, action) {
                ops.push(op);
            }
        }
        ops
    }

    /// One event: runs `f` on the core under the lock, drains its actions,
    /// then carries them out with the lock released.
    fn event<'s>(&'s self, s: &'s Scope<'s, '_>, f: impl FnOnce(&mut LockedCore<Self::Core>, Timestamp)) {
        let ops = {
            let mut l = lock_spin(&self.shell().locked, LOCK_SPIN);
            f(&mut l, now());
            self.drain(&mut l)
        };
        self.execute(s, ops);
    }

    /// `conn` failed: shut it down, and tell the core if it was current.
    fn lost<'s>(&'s self, s: &'s Scope<'s, '_>, conn: &Arc<Connection>) {
        conn.shutdown();
        self.event(s, |l, now| {
            l.detach(now, conn);
        });
    }

    /// Shuts a connection down, or writes its farewell first (in a thread
    /// of its own: it may wait for the channel's writer).
    fn close_connection<'s>(&'s self, s: &'s Scope<'s, '_>, op: ConnectionOp) {
        match op {
            ConnectionOp::Shutdown(conn) => conn.shutdown(),
            ConnectionOp::Farewell(conn, bytes) => spawn(s, Self::FAREWELL_THREAD, move || {
                set_policy(None, Self::FAREWELL_THREAD);
                let _w = lock(&self.shell().write_locks[conn.channel.index()]);
                conn.set_write_timeout(Some(FAREWELL_TIMEOUT));
                if let Err(e) = conn.write_all(&bytes) {
                    tracing::debug!(side = Self::SIDE, channel = %conn.channel, %e, "farewell not delivered");
                }
                conn.shutdown();
            }),
        }
    }

    /// A notice from the core: logged and kept for the report.
    fn notice(&self, notice: &Notice) {
        let text = notice_text(notice);
        tracing::warn!(side = Self::SIDE, "{text}");
        lock(&self.shell().notices).push(text);
    }

    /// The core's timers, until the side stops.
    fn timer_loop<'s>(&'s self, s: &'s Scope<'s, '_>) {
        let shell = self.shell();
        set_policy(None, Self::TIMER_THREAD);
        // It takes the core lock too: boosted with the switchover's threads,
        // it is never preempted while holding it (priority inversion).
        let mut boost = Boost::default();
        let mut last_sample: Option<Timestamp> = None;
        while !shell.is_stopping() {
            let (deadline, switchover, request) = {
                let mut l = lock(&shell.locked);
                let mut request = None;
                if let Some(watch) = &shell.watch {
                    let t = now();
                    if last_sample.is_none_or(|at| t.saturating_since(at) >= SAMPLE_INTERVAL) {
                        last_sample = Some(t);
                        shell.observe(&mut l);
                        watch.sample(&l.core, t);
                    }
                    request = watch.take_request();
                }
                (l.core.poll_timeout(), !l.core.guest_started() && !l.core.is_terminal(), request)
            };
            if let Some(request) = request {
                let mut result = Ok(());
                self.event(s, |l, now| result = self.user_request(l, now, request));
                if let Err(e) = &result {
                    tracing::warn!(side = Self::SIDE, %e, ?request, "the user's request was not taken");
                }
                if let Some(watch) = &shell.watch {
                    watch.request_handled(request, &result);
                }
            }
            boost.set(None, shell.tuning.rt_switchover, switchover, Self::TIMER_THREAD);
            let t = now();
            match deadline {
                Some(d) if d <= t => self.event(s, |l, now| l.core.handle_timeout(now)),
                Some(d) => std::thread::sleep(d.saturating_since(t).min(TIMER_TICK)),
                None => std::thread::sleep(TIMER_TICK),
            }
        }
    }

    /// Writes what the core has for the fault path's channel. Re-entrant
    /// and never blocks on another writer: one that holds the channel
    /// writes our frames too (`flush_wanted`).
    fn flush_fault_path<'s>(&'s self, s: &'s Scope<'s, '_>) {
        let shell = self.shell();
        let ch = Self::FAULT_PATH_CHANNEL.index();
        shell.flush_wanted[ch].store(true, Ordering::SeqCst);
        loop {
            let Ok(guard) = shell.write_locks[ch].try_lock() else { return };
            let mut buf = FAULT_PATH_BUF.take();
            let mut deferred = Vec::new();
            while shell.flush_wanted[ch].swap(false, Ordering::SeqCst) {
                loop {
                    buf.clear();
                    deferred.clear();
                    let (conn, ops) = {
                        let mut l = lock_spin(&shell.locked, LOCK_SPIN);
                        let conn = self.poll_fault_path(&mut l, &mut buf, &mut deferred);
                        (conn, self.drain(&mut l))
                    };
                    self.fill_deferred(&deferred, &mut buf);
                    if !ops.is_empty() {
                        shell.flush_wanted[ch].store(true, Ordering::SeqCst);
                        self.execute(s, ops);
                    }
                    let Some(conn) = conn else { break };
                    if buf.is_empty() {
                        break;
                    }
                    if conn.write_all(&buf).is_err() {
                        self.lost(s, &conn);
                        break;
                    }
                }
            }
            drop(guard);
            buf.clear();
            FAULT_PATH_BUF.set(buf);
            if !shell.flush_wanted[ch].load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

thread_local! {
    /// The fault path's write buffer, kept between flushes: a fresh buffer
    /// of a 2 MiB page costs 512 first touches (up to 0.8 ms measured) on
    /// the fault path.
    static FAULT_PATH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gives the calling thread's fault-path write buffer room for `bytes`,
/// touched now: a thread that will write requested huge pages calls it
/// before the first, which then does not wait for first touches of its
/// buffer (nor for the buffer's growth, a copy at each doubling).
pub(super) fn warm_fault_path_buffer(bytes: usize) {
    FAULT_PATH_BUF.with_borrow_mut(|buf| {
        if buf.capacity() < bytes {
            buf.reserve(bytes);
            buf.resize(bytes, 0);
            std::hint::black_box(&buf);
            buf.clear();
        }
    });
}

/// Starts a driver thread named `name` in scope `s` (a failure is logged).
pub(super) fn spawn<'s, 'e, F: FnOnce() + Send + 's>(s: &'s Scope<'s, 'e>, name: &str, f: F) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn_scoped(s, f) {
        tracing::error!(%e, name, "cannot spawn a driver thread");
    }
}

/// A notice in words.
pub(super) fn notice_text(notice: &Notice) -> String {
    match notice {
        Notice::Paused { reason } => format!("paused: {reason}"),
        Notice::RecoveryAttempt { attempt } => format!("recovery attempt {attempt}"),
        Notice::Withdrawing { reason } => {
            format!("the guest runs here again ({reason}); telling the destination to drop its copy")
        }
        Notice::RecoveryFailed { attempt, reason } => format!("recovery attempt {attempt} failed: {reason}"),
        Notice::Recovered { epoch } => format!("recovered (epoch {epoch})"),
        Notice::ConnectionRefused { channel, error } => format!("refused a {channel} connection: {error}"),
        Notice::StrangerRefused { channel, reason } => format!("refused a stranger's {channel} connection: {reason}"),
        Notice::Fenced => "the lease lapsed: the vCPUs are stopped until it is renewed".into(),
        Notice::LeaseRestored => "the lease is renewed: the vCPUs run again".into(),
        Notice::CheckpointCommitted { seq } => format!("checkpoint {seq} committed"),
        Notice::TookOver { checkpoint } => {
            format!("the destination was lost: the guest restarts here from checkpoint {checkpoint}")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A core that records what the shell tells it.
    #[derive(Default)]
    struct RecordingCore {
        events: Vec<String>,
    }

    impl ProtocolCore for RecordingCore {
        type Action = ();
        type State = ();
        fn state(&self) {}
        fn handle_user_request(&mut self, _now: Timestamp, request: UserRequest) -> Result<(), EventError> {
            self.events.push(format!("request {request:?}"));
            Ok(())
        }
        fn poll_action(&mut self) -> Option<()> {
            None
        }
        fn poll_timeout(&self) -> Option<Timestamp> {
            None
        }
        fn handle_timeout(&mut self, _now: Timestamp) {
            self.events.push("timeout".into());
        }
        fn handle_connected(&mut self, _now: Timestamp, channel: Channel) {
            self.events.push(format!("connected {channel}"));
        }
        fn handle_connection_lost(&mut self, _now: Timestamp, channel: Channel) {
            self.events.push(format!("lost {channel}"));
        }
        fn handle_input(&mut self, _now: Timestamp, channel: Channel, bytes: Bytes) {
            self.events.push(format!("input {channel} {}", bytes.len()));
        }
        fn is_terminal(&self) -> bool {
            false
        }
        fn guest_started(&self) -> bool {
            false
        }
    }

    /// A loopback connection for `channel` and the peer's end of it.
    fn connection(channel: Channel) -> (Arc<Connection>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (theirs, _) = listener.accept().expect("accept");
        (Arc::new(Connection::new(channel, ours)), theirs)
    }

    #[test]
    fn a_replaced_connection_is_shut_down_and_no_longer_heard() {
        let mut l = LockedCore::new(RecordingCore::default());
        let t = Timestamp(0);
        let (first, mut first_peer) = connection(Channel::Main);
        let (second, _second_peer) = connection(Channel::Main);
        first_peer.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        l.attach(t, first.clone());
        assert!(l.is_current(&first));
        l.attach(t, second.clone());
        assert!(!l.is_current(&first) && l.is_current(&second));
        // The replaced connection was shut down: its peer reads the end.
        assert_eq!(first_peer.read(&mut [0u8; 8]).expect("read"), 0);
        assert!(!l.input(t, &first, Bytes::from_static(b"late")), "a replaced connection's bytes are dropped");
        assert!(!l.detach(t, &first), "a replaced connection's loss is not the channel's");
        assert!(l.input(t, &second, Bytes::from_static(b"abc")));
        assert!(l.detach(t, &second));
        assert!(l.connection(Channel::Main).is_none());
        assert_eq!(l.core.events, ["connected main", "connected main", "input main 3", "lost main"]);
    }

    /// A core whose state is a number the test sets.
    struct NumberedCore(u32);

    impl ProtocolCore for NumberedCore {
        type Action = ();
        type State = u32;
        fn state(&self) -> u32 {
            self.0
        }
        fn handle_user_request(&mut self, _now: Timestamp, _request: UserRequest) -> Result<(), EventError> {
            Ok(())
        }
        fn poll_action(&mut self) -> Option<()> {
            None
        }
        fn poll_timeout(&self) -> Option<Timestamp> {
            None
        }
        fn handle_timeout(&mut self, _now: Timestamp) {}
        fn handle_connected(&mut self, _now: Timestamp, _channel: Channel) {}
        fn handle_connection_lost(&mut self, _now: Timestamp, _channel: Channel) {}
        fn handle_input(&mut self, _now: Timestamp, _channel: Channel, _bytes: Bytes) {}
        fn is_terminal(&self) -> bool {
            false
        }
        fn guest_started(&self) -> bool {
            false
        }
    }

    #[derive(Default)]
    struct SeenStates(Mutex<Vec<u32>>);

    impl Watch<NumberedCore> for SeenStates {
        fn state_changed(&self, core: &NumberedCore, _now: Timestamp) {
            self.0.lock().unwrap().push(core.0);
        }
        fn sample(&self, _core: &NumberedCore, _now: Timestamp) {}
        fn take_request(&self) -> Option<UserRequest> {
            None
        }
    }

    #[test]
    fn the_watch_hears_of_each_state_change_once() {
        let seen = Arc::new(SeenStates::default());
        let shell = Shell::new(NumberedCore(1), Tuning::default(), Some(seen.clone() as Arc<dyn Watch<_>>));
        let mut l = shell.locked.lock().unwrap();
        for state in [1, 1, 2, 2, 2, 3, 1] {
            l.core.0 = state;
            shell.observe(&mut l);
        }
        assert_eq!(*seen.0.lock().unwrap(), [1, 2, 3, 1]);
    }

    #[test]
    fn close_and_farewell_take_the_current_connection_once() {
        let mut l = LockedCore::new(RecordingCore::default());
        let (conn, _peer) = connection(Channel::Return);
        l.attach(Timestamp(0), conn.clone());
        assert!(matches!(l.farewell(Channel::Return, Bytes::from_static(b"bye")),
            Some(ConnectionOp::Farewell(c, b)) if c.id == conn.id && &b[..] == b"bye"));
        assert!(l.close(Channel::Return).is_none(), "the connection was taken already");
        assert!(!l.is_current(&conn));
    }
}
