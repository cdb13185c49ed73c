//! The simulated network, a sans-IO component of its own (after str0m's
//! `netem`): the simulation feeds it inputs with the time ([`Network::handle_input`],
//! [`Network::receive`]) and carries out its outputs ([`Network::poll_output`]):
//! timers to schedule, data that became readable, connections that arrived,
//! were established, failed or were lost, chunks it dropped. It knows nothing
//! of the hosts: which connection a host uses for a channel, whether the
//! host's process is alive and whether its core wants the bytes are the
//! host's business.
//!
//! Connections have bounded socket buffers. A writer hands its socket a
//! chunk of frames (one `poll_transmit` call) only while the socket buffer
//! has room ([`Network::room`]), so a slow link pushes back on the core
//! (which chooses pages as late as possible). Bytes count against the buffer
//! from the write until delivery. The transmitter of a direction sends one
//! chunk at a time, taking turns between the connections that have data
//! (like a fair-queueing NIC), so the urgent channel waits for at most the
//! chunk on the wire, never for the main channel's buffer. A chunk arrives
//! after its serialisation, the latency and a jitter; arrivals keep their
//! order within a connection. A partition holds every chunk and SYN until
//! it ends; TCP then retransmits what it held.
//!
//! Randomness, like time, is an input: every call that may draw takes the
//! simulation's generator, and each timer output carries the tie-break drawn
//! for it, so one seed orders everything the same way on every run.

use bytes::Bytes;
use std::collections::VecDeque;

use postcopy_core::wire::{FrameKind, HEADER_LEN};
use postcopy_core::{Channel, Side};

use crate::rng::Rng;

/// A connection, for its whole life (ids are never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u32);

impl ConnId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// What shapes the network, fixed for a run.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    pub latency_ns: u64,
    /// Each SYN, SYN-ACK and chunk takes up to this much longer (uniform).
    pub jitter_ns: u64,
    pub bandwidth_mbps: u64,
    /// A SYN lost in a partition fails the connect after this long.
    pub connect_timeout_ns: u64,
    /// Socket buffer per connection, in charged bytes.
    pub buffer_bytes: u64,
    /// The simulation's page sizes on the wire, and what pages cost.
    pub charge: PageCharge,
}

/// The network's timers: the simulation schedules each at its time and
/// hands it back as [`NetInput::Timer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NetTimer {
    /// The transmitter of a direction (0 from the source, 1 to it) finished
    /// serialising a chunk.
    TransmitterFree {
        dir: u8,
    },
    /// The first chunk in flight on the connection arrives.
    Deliver {
        conn: ConnId,
    },
    /// The SYN reaches the destination.
    SynArrive {
        conn: ConnId,
    },
    /// The SYN-ACK reaches the source.
    SynAck {
        conn: ConnId,
    },
    /// The source's connect fails: refused (nothing listened, the reset came
    /// back) or timed out.
    ConnectFail {
        conn: ConnId,
        refused: bool,
    },
    /// One end learns that the connection was reset.
    Lost {
        conn: ConnId,
        to_source: bool,
    },
    PartitionEnd,
}

impl NetTimer {
    /// The name and two numbers the simulation's trace records.
    pub fn name(&self) -> &'static str {
        match self {
            NetTimer::TransmitterFree { .. } => "link-free",
            NetTimer::Deliver { .. } => "deliver",
            NetTimer::SynArrive { .. } => "syn-arrive",
            NetTimer::SynAck { .. } => "syn-ack",
            NetTimer::ConnectFail { .. } => "connect-fail",
            NetTimer::Lost { .. } => "lost",
            NetTimer::PartitionEnd => "partition-end",
        }
    }

    pub fn args(&self) -> (u64, u64) {
        match *self {
            NetTimer::TransmitterFree { dir } => (u64::from(dir), 0),
            NetTimer::Deliver { conn }
            | NetTimer::SynArrive { conn }
            | NetTimer::SynAck { conn }
            | NetTimer::ConnectFail { conn, .. } => (u64::from(conn.0), 0),
            NetTimer::Lost { conn, to_source } => (u64::from(conn.0), u64::from(to_source)),
            NetTimer::PartitionEnd => (0, 0),
        }
    }
}

/// What the simulation tells the network.
#[derive(Clone, Debug)]
pub enum NetInput {
    /// A timer the network asked for is due.
    Timer(NetTimer),
    /// The source opens a connection for `channel` ([`NetOutput::Connecting`]
    /// names it).
    Connect {
        channel: Channel,
    },
    /// The writer hands its socket a chunk; `charged` is what it costs on
    /// the network (see [`scan_chunk`]).
    Write {
        conn: ConnId,
        bytes: Bytes,
        charged: u64,
    },
    /// One end closes. The writer's close is graceful (its farewell, then
    /// the end of the stream) or, by chance, abortive (a reset); the
    /// reader's close resets the connection and the writer learns one
    /// latency later. A farewell carries no page frames.
    Close {
        conn: ConnId,
        end: Side,
        farewell: Option<Bytes>,
    },
    /// One end forgets the connection without closing it: its process died,
    /// or a newer connection of the channel replaced it. Nobody is told.
    Abandon {
        conn: ConnId,
        end: Side,
    },
    /// The connection is gone and what it carried is lost; each end still
    /// open learns after its delay (`None`: it is not told).
    Reset {
        conn: ConnId,
        tell_source_after_ns: Option<u64>,
        tell_destination_after_ns: Option<u64>,
    },
    /// Every connection is gone, nobody is told (the hosts start over).
    ResetAll,
    /// The destination refuses an incoming connection: nothing listens.
    Refuse {
        conn: ConnId,
    },
    /// The destination accepts an incoming connection...
    Accept {
        conn: ConnId,
    },
    /// ...and its SYN-ACK leaves for the source.
    Acknowledge {
        conn: ConnId,
    },
    /// Nothing crosses the network until `until_ns` (or [`NetInput::EndPartition`]).
    Partition {
        until_ns: u64,
    },
    EndPartition,
}

/// What the network asks of the simulation. An output the hosts answer by
/// calling their cores (`Readable`, `Incoming`, `Established`,
/// `ConnectFailed`, `Lost`) is the only output of its input, so carrying
/// outputs out as they come, inputs they cause included, keeps cause before
/// effect.
#[derive(Clone, Debug)]
pub enum NetOutput {
    /// Schedule `timer` at `at_ns`, ordered among the events of that instant
    /// by `tie`.
    Timer {
        at_ns: u64,
        tie: u64,
        timer: NetTimer,
    },
    /// The source's new connection for `channel`.
    Connecting {
        conn: ConnId,
        channel: Channel,
    },
    /// Chunks reached the reader's end: read them with [`Network::receive`].
    Readable {
        conn: ConnId,
        channel: Channel,
    },
    /// A SYN reached the destination: it answers with [`NetInput::Refuse`],
    /// or [`NetInput::Accept`] then [`NetInput::Acknowledge`].
    Incoming {
        conn: ConnId,
        channel: Channel,
    },
    /// The SYN-ACK reached the source: the connection is up on its side.
    Established {
        conn: ConnId,
        channel: Channel,
    },
    ConnectFailed {
        conn: ConnId,
        channel: Channel,
        refused: bool,
    },
    /// One end learns that the connection was reset.
    Lost {
        conn: ConnId,
        channel: Channel,
        end: Side,
    },
    /// Bytes written that will never be read.
    Dropped {
        bytes: Bytes,
    },
    /// A writer's close turned out abortive.
    AbortiveClose {
        conn: ConnId,
    },
    PartitionEnded,
}

/// What [`Network::receive`] hands the reader.
#[derive(Clone, Debug)]
pub enum Received {
    Data(Bytes),
    /// The writer closed gracefully: the stream ends here.
    End,
}

/// Bytes written to a socket in one go (or the end of the stream).
#[derive(Clone, Debug)]
struct Chunk {
    bytes: Bytes,
    /// What the chunk costs on the network (pages charged at 4 KiB).
    charged: u64,
    /// When it reaches the reader (set when it leaves the transmitter).
    arrival: u64,
    /// The writer closed gracefully: the reader sees the end here.
    fin: bool,
}

/// One connection of one channel.
#[derive(Clone, Debug)]
struct Connection {
    channel: Channel,
    /// The source's end exists (connecting or connected) and was not closed.
    src_open: bool,
    /// The destination accepted it and did not close it.
    dst_open: bool,
    /// Reset or fully closed: nothing more is delivered.
    dead: bool,
    /// The writer closed (after a last chunk, maybe): it writes no more.
    writer_closed: bool,
    /// Charged bytes written and not yet delivered (or dropped unnoticed).
    buffered: u64,
    /// In the socket buffer, not yet on the transmitter.
    waiting: VecDeque<Chunk>,
    /// Being serialised or propagating, in arrival order.
    in_flight: VecDeque<Chunk>,
    last_arrival: u64,
    /// A delivery timer is scheduled at this time.
    deliver_at: Option<u64>,
    /// Listed in its transmitter's round-robin.
    in_ready: bool,
}

impl Connection {
    fn new(channel: Channel) -> Self {
        Self {
            channel,
            src_open: true,
            dst_open: false,
            dead: false,
            writer_closed: false,
            buffered: 0,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            last_arrival: 0,
            deliver_at: None,
            in_ready: false,
        }
    }

    /// Direction: 0 carries source-to-destination channels, 1 the return path.
    fn dir(&self) -> usize {
        usize::from(!self.channel.is_from_source())
    }
}

/// One direction's transmitter: one chunk on the wire at a time.
#[derive(Clone, Debug, Default)]
struct Transmitter {
    busy: bool,
    /// Connections with chunks waiting, in turn order.
    ready: VecDeque<ConnId>,
}

/// The network between the two hosts.
#[derive(Clone, Debug)]
pub struct Network {
    config: NetConfig,
    now: u64,
    conns: Vec<Connection>,
    transmitters: [Transmitter; 2],
    partition_until: Option<u64>,
    outputs: VecDeque<NetOutput>,
    /// Charged bytes written, over the run.
    charged_bytes: u64,
}

impl Network {
    pub fn new(config: NetConfig) -> Self {
        Self {
            config,
            now: 0,
            conns: Vec::new(),
            transmitters: Default::default(),
            partition_until: None,
            outputs: VecDeque::new(),
            charged_bytes: 0,
        }
    }

    /// Feeds one input at `now_ns`; `rng` is the simulation's generator.
    pub fn handle_input(&mut self, now_ns: u64, input: NetInput, rng: &mut Rng) {
        self.now = now_ns;
        match input {
            NetInput::Timer(timer) => self.on_timer(timer, rng),
            NetInput::Connect { channel } => {
                let conn = ConnId(self.conns.len() as u32);
                self.conns.push(Connection::new(channel));
                self.outputs.push_back(NetOutput::Connecting { conn, channel });
                let t = self.now + self.config.latency_ns + self.jitter(rng);
                self.timer(rng, t, NetTimer::SynArrive { conn });
            }
            NetInput::Write { conn, bytes, charged } => self.write(conn, bytes, charged, false, rng),
            NetInput::Close { conn, end, farewell } => self.close(conn, end, farewell, rng),
            NetInput::Abandon { conn, end } => {
                let c = &mut self.conns[conn.index()];
                match end {
                    Side::Source => c.src_open = false,
                    Side::Destination => c.dst_open = false,
                }
            }
            NetInput::Reset { conn, tell_source_after_ns, tell_destination_after_ns } => {
                self.reset(conn, tell_source_after_ns, tell_destination_after_ns, rng)
            }
            NetInput::ResetAll => {
                for c in 0..self.conns.len() {
                    self.kill(ConnId(c as u32));
                }
            }
            NetInput::Refuse { conn } => {
                // The reset comes back one latency later.
                let t = self.now + self.config.latency_ns;
                self.timer(rng, t, NetTimer::ConnectFail { conn, refused: true });
            }
            NetInput::Accept { conn } => self.conns[conn.index()].dst_open = true,
            NetInput::Acknowledge { conn } => {
                let t = self.now + self.config.latency_ns + self.jitter(rng);
                self.timer(rng, t, NetTimer::SynAck { conn });
            }
            NetInput::Partition { until_ns } => {
                self.partition_until = Some(self.partition_until.map_or(until_ns, |u| u.max(until_ns)));
                self.timer(rng, until_ns, NetTimer::PartitionEnd);
            }
            NetInput::EndPartition => {
                if self.partitioned() {
                    self.end_partition(rng);
                }
            }
        }
    }

    /// The next thing the simulation must do for the network.
    pub fn poll_output(&mut self) -> Option<NetOutput> {
        self.outputs.pop_front()
    }

    /// Reads the next chunk that has arrived at the reader's end of `conn`
    /// (after [`NetOutput::Readable`]); `None` when nothing more is there
    /// now (a timer output then announces the next arrival).
    pub fn receive(&mut self, now_ns: u64, conn: ConnId, rng: &mut Rng) -> Option<Received> {
        self.now = now_ns;
        if self.partitioned() {
            return None;
        }
        let c = &mut self.conns[conn.index()];
        if c.dead {
            return None;
        }
        let head = c.in_flight.front()?;
        if head.arrival > self.now {
            let t = head.arrival;
            c.deliver_at = Some(t);
            self.timer(rng, t, NetTimer::Deliver { conn });
            return None;
        }
        let chunk = c.in_flight.pop_front()?;
        c.buffered = c.buffered.saturating_sub(chunk.charged);
        if chunk.fin {
            c.dead = true;
            return Some(Received::End);
        }
        Some(Received::Data(chunk.bytes))
    }

    /// Charged bytes the writer of `conn` may still put in its socket
    /// buffer (none once it closed).
    pub fn room(&self, conn: ConnId) -> u64 {
        let c = &self.conns[conn.index()];
        if c.writer_closed {
            0
        } else {
            self.config.buffer_bytes.saturating_sub(c.buffered)
        }
    }

    /// Whether `conn` was reset or fully closed.
    pub fn is_dead(&self, conn: ConnId) -> bool {
        self.conns[conn.index()].dead
    }

    /// Connections not reset or closed, in the order they were opened.
    pub fn live_connections(&self) -> Vec<ConnId> {
        (0..self.conns.len()).filter(|&c| !self.conns[c].dead).map(|c| ConnId(c as u32)).collect()
    }

    /// The fullest socket buffer of a live connection, in charged bytes.
    pub fn max_buffered(&self) -> u64 {
        self.conns.iter().filter(|c| !c.dead).map(|c| c.buffered).max().unwrap_or(0)
    }

    /// Charged bytes written over the run (what the network carried or
    /// would have).
    pub fn charged_bytes(&self) -> u64 {
        self.charged_bytes
    }

    pub fn partitioned(&self) -> bool {
        self.partition_until.is_some()
    }

    fn timer(&mut self, rng: &mut Rng, at_ns: u64, timer: NetTimer) {
        let tie = rng.u64();
        self.outputs.push_back(NetOutput::Timer { at_ns, tie, timer });
    }

    fn jitter(&self, rng: &mut Rng) -> u64 {
        if self.config.jitter_ns == 0 {
            0
        } else {
            rng.below(self.config.jitter_ns + 1)
        }
    }

    fn on_timer(&mut self, timer: NetTimer, rng: &mut Rng) {
        match timer {
            NetTimer::TransmitterFree { dir } => {
                self.transmitters[dir as usize].busy = false;
                self.kick(dir as usize, rng);
            }
            NetTimer::Deliver { conn } => {
                let c = &mut self.conns[conn.index()];
                c.deliver_at = None;
                if !c.dead && self.partition_until.is_none() {
                    let channel = c.channel;
                    self.outputs.push_back(NetOutput::Readable { conn, channel });
                }
            }
            NetTimer::SynArrive { conn } => {
                let c = &self.conns[conn.index()];
                if c.dead || !c.src_open {
                    return;
                }
                if self.partitioned() {
                    // The SYN is lost; the source's connect times out.
                    let t = self.now + self.config.connect_timeout_ns;
                    self.timer(rng, t, NetTimer::ConnectFail { conn, refused: false });
                    return;
                }
                let channel = c.channel;
                self.outputs.push_back(NetOutput::Incoming { conn, channel });
            }
            NetTimer::SynAck { conn } => {
                let c = &self.conns[conn.index()];
                if !c.dead {
                    let channel = c.channel;
                    self.outputs.push_back(NetOutput::Established { conn, channel });
                }
            }
            NetTimer::ConnectFail { conn, refused } => {
                let channel = self.conns[conn.index()].channel;
                self.outputs.push_back(NetOutput::ConnectFailed { conn, channel, refused });
            }
            NetTimer::Lost { conn, to_source } => {
                let channel = self.conns[conn.index()].channel;
                let end = if to_source { Side::Source } else { Side::Destination };
                self.outputs.push_back(NetOutput::Lost { conn, channel, end });
            }
            NetTimer::PartitionEnd => {
                if self.partition_until.is_some_and(|until| self.now >= until) {
                    self.end_partition(rng);
                }
            }
        }
    }

    fn write(&mut self, conn: ConnId, bytes: Bytes, charged: u64, fin: bool, rng: &mut Rng) {
        self.charged_bytes += charged;
        let c = &mut self.conns[conn.index()];
        c.buffered += charged;
        let chunk = Chunk { bytes, charged, arrival: 0, fin };
        if c.dead {
            // Written into a connection that is gone and the writer does not
            // know yet: lost.
            self.drop_chunk(chunk);
            return;
        }
        c.waiting.push_back(chunk);
        let dir = c.dir();
        if !c.in_ready {
            c.in_ready = true;
            self.transmitters[dir].ready.push_back(conn);
        }
        self.kick(dir, rng);
    }

    fn drop_chunk(&mut self, chunk: Chunk) {
        if !chunk.fin {
            self.outputs.push_back(NetOutput::Dropped { bytes: chunk.bytes });
        }
    }

    /// Puts the next waiting chunk on an idle transmitter.
    fn kick(&mut self, dir: usize, rng: &mut Rng) {
        if self.transmitters[dir].busy || self.partitioned() {
            return;
        }
        while let Some(conn) = self.transmitters[dir].ready.pop_front() {
            let c = &mut self.conns[conn.index()];
            c.in_ready = false;
            if c.dead {
                continue;
            }
            let Some(mut chunk) = c.waiting.pop_front() else { continue };
            let serialise = serialise_ns(chunk.charged.max(1), self.config.bandwidth_mbps);
            let flight = self.config.latency_ns + self.jitter(rng);
            let c = &mut self.conns[conn.index()];
            let arrival = (self.now + serialise + flight).max(c.last_arrival);
            c.last_arrival = arrival;
            chunk.arrival = arrival;
            c.in_flight.push_back(chunk);
            let schedule_delivery = c.deliver_at.is_none();
            if schedule_delivery {
                c.deliver_at = Some(arrival);
            }
            if !c.waiting.is_empty() {
                c.in_ready = true;
                self.transmitters[dir].ready.push_back(conn);
            }
            if schedule_delivery {
                self.timer(rng, arrival, NetTimer::Deliver { conn });
            }
            self.transmitters[dir].busy = true;
            let t = self.now + serialise;
            self.timer(rng, t, NetTimer::TransmitterFree { dir: dir as u8 });
            return;
        }
    }

    fn close(&mut self, conn: ConnId, end: Side, farewell: Option<Bytes>, rng: &mut Rng) {
        let c = &mut self.conns[conn.index()];
        match end {
            Side::Source => c.src_open = false,
            Side::Destination => c.dst_open = false,
        }
        if c.dead {
            return;
        }
        let writer_is_source = c.channel.is_from_source();
        let latency = self.config.latency_ns;
        if (end == Side::Source) == writer_is_source {
            let graceful = farewell.is_some() || rng.chance(0.7);
            if let Some(bytes) = farewell {
                let charged = scan_chunk(&bytes, self.config.charge, |_| {});
                self.write(conn, bytes, charged, false, rng);
            }
            if graceful {
                self.write(conn, Bytes::new(), 0, true, rng);
            } else {
                self.outputs.push_back(NetOutput::AbortiveClose { conn });
                self.reset(conn, Some(latency), Some(latency), rng);
            }
            self.conns[conn.index()].writer_closed = true;
        } else {
            self.reset(conn, Some(latency), Some(latency), rng);
        }
    }

    fn reset(&mut self, conn: ConnId, source_after: Option<u64>, destination_after: Option<u64>, rng: &mut Rng) {
        self.kill(conn);
        let c = &self.conns[conn.index()];
        let (src_open, dst_open) = (c.src_open, c.dst_open);
        if let Some(delay) = source_after.filter(|_| src_open) {
            self.timer(rng, self.now + delay, NetTimer::Lost { conn, to_source: true });
        }
        if let Some(delay) = destination_after.filter(|_| dst_open) {
            self.timer(rng, self.now + delay, NetTimer::Lost { conn, to_source: false });
        }
    }

    fn kill(&mut self, conn: ConnId) {
        let c = &mut self.conns[conn.index()];
        if c.dead {
            return;
        }
        c.dead = true;
        let chunks: Vec<Chunk> = c.waiting.drain(..).chain(c.in_flight.drain(..)).collect();
        for chunk in chunks {
            self.drop_chunk(chunk);
        }
    }

    fn end_partition(&mut self, rng: &mut Rng) {
        self.partition_until = None;
        self.outputs.push_back(NetOutput::PartitionEnded);
        // TCP retransmits what the partition held: it arrives one latency on.
        let base = self.now + self.config.latency_ns;
        for index in 0..self.conns.len() {
            let c = &mut self.conns[index];
            if c.dead || c.in_flight.is_empty() {
                continue;
            }
            for chunk in c.in_flight.iter_mut() {
                chunk.arrival = chunk.arrival.max(base);
            }
            c.last_arrival = c.last_arrival.max(base);
            if c.deliver_at.is_none() {
                let t = c.in_flight.front().map_or(base, |h| h.arrival);
                c.deliver_at = Some(t);
                self.timer(rng, t, NetTimer::Deliver { conn: ConnId(index as u32) });
            }
        }
        self.kick(0, rng);
        self.kick(1, rng);
    }
}

/// A page frame found in a chunk.
#[derive(Clone, Copy, Debug)]
pub struct ScannedPage {
    pub block: u32,
    pub index: u32,
    /// The wire's kind code: 0 precopy, 1 background, 2 requested.
    pub kind: u8,
    pub zero: bool,
    /// For a page part frame: which part of its page.
    pub part: Option<u32>,
}

/// Bytes a page is charged on the network, whatever its size in the
/// simulation: the wire carries small pages (a content version and a check
/// word) so that a 4 GiB guest fits in memory and runs fast, while bandwidth
/// is spent as if every non-zero page were 4 KiB.
pub const CHARGED_PAGE_BYTES: u64 = 4096;

/// Bytes a page of the huge-page block (`huge_pages`) is charged on the
/// network: a 2 MiB huge page (pushed in parts, each its share of it).
pub const HUGE_CHARGED_PAGE_BYTES: u64 = 2 << 20;

/// What a page frame costs on the network, whatever its size in the
/// simulation: a small page [`CHARGED_PAGE_BYTES`], a page of the huge-page
/// block (`huge_wire_bytes` long in the simulation) [`HUGE_CHARGED_PAGE_BYTES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCharge {
    /// Bytes of a small page in the simulation.
    pub wire_page_bytes: u64,
    /// Bytes of a huge page in the simulation (0: none).
    pub huge_wire_bytes: u64,
}

impl PageCharge {
    /// Bytes charged beyond the frame's own for a part of `data_len` bytes of
    /// a huge page: its share of the page's real 2 MiB.
    fn part_extra(&self, data_len: u64) -> u64 {
        if self.huge_wire_bytes == 0 {
            return 0;
        }
        (HUGE_CHARGED_PAGE_BYTES * data_len / self.huge_wire_bytes).saturating_sub(data_len)
    }

    /// Bytes charged beyond the frame's own for a page of `data_len` bytes.
    fn extra(&self, data_len: u64) -> u64 {
        if self.huge_wire_bytes > 0 && data_len == self.huge_wire_bytes {
            HUGE_CHARGED_PAGE_BYTES.saturating_sub(data_len)
        } else {
            CHARGED_PAGE_BYTES.saturating_sub(self.wire_page_bytes)
        }
    }
}

/// Walks the frames of a chunk (chunks always hold whole frames), calling
/// `page` for each page frame; returns the chunk's charged size: non-zero
/// pages cost what [`PageCharge`] says whatever the simulation's page size.
pub fn scan_chunk(bytes: &[u8], charge: PageCharge, mut page: impl FnMut(ScannedPage)) -> u64 {
    // Page frame flags (see `postcopy_core::wire`): bit 0 zero, bits 1-2 kind.
    const ZERO: u8 = 0x01;
    let mut charged = bytes.len() as u64;
    let mut at = 0;
    while at + HEADER_LEN <= bytes.len() {
        let header = &bytes[at..at + HEADER_LEN];
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let checkpoint_page = header[0] == FrameKind::CheckpointPage.code();
        if checkpoint_page && header[1] & ZERO == 0 {
            // Fallback: a page of a checkpoint costs what a page costs.
            charged += charge.extra(len.saturating_sub(8) as u64);
        }
        if header[0] == FrameKind::Page.code() && at + HEADER_LEN + 8 <= bytes.len() {
            let p = &bytes[at + HEADER_LEN..];
            let zero = header[1] & ZERO != 0;
            if !zero {
                charged += charge.extra(len.saturating_sub(8) as u64);
            }
            page(ScannedPage {
                block: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                index: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                kind: (header[1] >> 1) & 0x3,
                zero,
                part: None,
            });
        } else if header[0] == FrameKind::PagePart.code() && at + HEADER_LEN + 12 <= bytes.len() {
            let p = &bytes[at + HEADER_LEN..];
            let data_len = len.saturating_sub(12) as u64;
            charged += charge.part_extra(data_len);
            let offset = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
            page(ScannedPage {
                block: u32::from_be_bytes([p[0], p[1], p[2], p[3]]),
                index: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                kind: (header[1] >> 1) & 0x3,
                zero: false,
                part: Some(offset / (data_len.max(1) as u32)),
            });
        }
        at += HEADER_LEN + len;
    }
    charged
}

/// Nanoseconds to serialise `bytes` at `mbps` (at least 1).
pub fn serialise_ns(bytes: u64, mbps: u64) -> u64 {
    ((u128::from(bytes) * 8000).div_ceil(u128::from(mbps.max(1))) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postcopy_core::wire::{encode, encode_page_frame, Frame, PageKind};
    use postcopy_core::PageAddress;

    #[test]
    fn scans_pages_and_charges_them_as_4k() {
        let mut out = Vec::new();
        encode(&Frame::Ping, &mut out);
        encode_page_frame(&mut out, PageAddress { block: 1, index: 7 }, PageKind::Requested, 32, |b| b.fill(3));
        encode_page_frame(&mut out, PageAddress { block: 0, index: 9 }, PageKind::Background, 32, |b| b.fill(0));
        let mut pages = Vec::new();
        let charge = PageCharge { wire_page_bytes: 32, huge_wire_bytes: 128 };
        let charged = scan_chunk(&out, charge, |p| pages.push((p.block, p.index, p.kind, p.zero)));
        assert_eq!(pages, vec![(1, 7, 2, false), (0, 9, 1, true)]);
        assert_eq!(charged, out.len() as u64 + 4096 - 32);
        // A huge page costs its real 2 MiB.
        let mut huge = Vec::new();
        encode_page_frame(&mut huge, PageAddress { block: 2, index: 0 }, PageKind::Requested, 128, |b| b.fill(5));
        assert_eq!(scan_chunk(&huge, charge, |_| {}), huge.len() as u64 + (2 << 20) - 128);
        assert_eq!(serialise_ns(1250, 10_000), 1000);
        assert_eq!(serialise_ns(1, 100_000), 1);
    }

    const LATENCY: u64 = 1_000;

    fn network() -> Network {
        Network::new(NetConfig {
            latency_ns: LATENCY,
            jitter_ns: 0,
            bandwidth_mbps: 8_000, // one byte per nanosecond
            connect_timeout_ns: 50_000,
            buffer_bytes: 1 << 20,
            charge: PageCharge { wire_page_bytes: 4096, huge_wire_bytes: 0 },
        })
    }

    /// The outputs the network has for us now, timers apart (returned
    /// second, as `(time, timer)`).
    fn drain(net: &mut Network) -> (Vec<NetOutput>, Vec<(u64, NetTimer)>) {
        let (mut outputs, mut timers) = (Vec::new(), Vec::new());
        while let Some(output) = net.poll_output() {
            match output {
                NetOutput::Timer { at_ns, timer, .. } => timers.push((at_ns, timer)),
                other => outputs.push(other),
            }
        }
        (outputs, timers)
    }

    /// Opens a main-channel connection and carries it through the handshake.
    fn connected(net: &mut Network, rng: &mut Rng) -> ConnId {
        net.handle_input(0, NetInput::Connect { channel: Channel::Main }, rng);
        let (outputs, timers) = drain(net);
        let [NetOutput::Connecting { conn, .. }] = outputs[..] else { panic!("{outputs:?}") };
        assert_eq!(timers, vec![(LATENCY, NetTimer::SynArrive { conn })]);
        net.handle_input(LATENCY, NetInput::Timer(NetTimer::SynArrive { conn }), rng);
        assert!(matches!(drain(net).0[..], [NetOutput::Incoming { conn: c, .. }] if c == conn));
        net.handle_input(LATENCY, NetInput::Accept { conn }, rng);
        net.handle_input(LATENCY, NetInput::Acknowledge { conn }, rng);
        assert_eq!(drain(net).1, vec![(2 * LATENCY, NetTimer::SynAck { conn })]);
        net.handle_input(2 * LATENCY, NetInput::Timer(NetTimer::SynAck { conn }), rng);
        assert!(matches!(drain(net).0[..], [NetOutput::Established { conn: c, .. }] if c == conn));
        conn
    }

    #[test]
    fn a_chunk_arrives_after_its_serialisation_and_the_latency() {
        let (mut net, mut rng) = (network(), Rng::new(1, 2));
        let conn = connected(&mut net, &mut rng);
        let now = 2 * LATENCY;
        net.handle_input(now, NetInput::Write { conn, bytes: Bytes::from_static(b"hello"), charged: 500 }, &mut rng);
        let (_, timers) = drain(&mut net);
        let arrival = now + 500 + LATENCY;
        assert_eq!(
            timers,
            vec![(arrival, NetTimer::Deliver { conn }), (now + 500, NetTimer::TransmitterFree { dir: 0 })]
        );
        assert_eq!(net.room(conn), (1 << 20) - 500);
        // Not there yet: a reader that looks early finds nothing.
        assert!(net.receive(arrival - 1, conn, &mut rng).is_none());
        net.handle_input(arrival, NetInput::Timer(NetTimer::Deliver { conn }), &mut rng);
        assert!(matches!(drain(&mut net).0[..], [NetOutput::Readable { .. }]));
        let Some(Received::Data(bytes)) = net.receive(arrival, conn, &mut rng) else { panic!() };
        assert_eq!(&bytes[..], b"hello");
        assert!(net.receive(arrival, conn, &mut rng).is_none());
        assert_eq!(net.room(conn), 1 << 20);
        assert_eq!(net.charged_bytes(), 500);
    }

    #[test]
    fn a_partition_holds_chunks_and_syns_until_it_ends() {
        let (mut net, mut rng) = (network(), Rng::new(1, 2));
        let conn = connected(&mut net, &mut rng);
        let now = 2 * LATENCY;
        net.handle_input(now, NetInput::Partition { until_ns: now + 10_000 }, &mut rng);
        assert_eq!(drain(&mut net).1, vec![(now + 10_000, NetTimer::PartitionEnd)]);
        net.handle_input(now, NetInput::Write { conn, bytes: Bytes::from_static(b"x"), charged: 100 }, &mut rng);
        assert_eq!(drain(&mut net).1, vec![], "nothing leaves during a partition");
        net.handle_input(now, NetInput::Connect { channel: Channel::Urgent }, &mut rng);
        let (outputs, _) = drain(&mut net);
        let [NetOutput::Connecting { conn: urgent, .. }] = outputs[..] else { panic!() };
        net.handle_input(now + LATENCY, NetInput::Timer(NetTimer::SynArrive { conn: urgent }), &mut rng);
        assert_eq!(
            drain(&mut net).1,
            vec![(now + LATENCY + 50_000, NetTimer::ConnectFail { conn: urgent, refused: false })],
            "a SYN lost in a partition times the connect out"
        );
        let end = now + 10_000;
        net.handle_input(end, NetInput::Timer(NetTimer::PartitionEnd), &mut rng);
        let (outputs, timers) = drain(&mut net);
        assert!(matches!(outputs[..], [NetOutput::PartitionEnded]));
        assert_eq!(
            timers,
            vec![(end + 100 + LATENCY, NetTimer::Deliver { conn }), (end + 100, NetTimer::TransmitterFree { dir: 0 })]
        );
    }

    #[test]
    fn a_reset_drops_what_was_in_flight_and_tells_the_open_ends() {
        let (mut net, mut rng) = (network(), Rng::new(1, 2));
        let conn = connected(&mut net, &mut rng);
        let now = 2 * LATENCY;
        net.handle_input(now, NetInput::Write { conn, bytes: Bytes::from_static(b"lost"), charged: 100 }, &mut rng);
        drain(&mut net);
        net.handle_input(now, NetInput::Abandon { conn, end: Side::Destination }, &mut rng);
        let reset = NetInput::Reset { conn, tell_source_after_ns: Some(7), tell_destination_after_ns: Some(9) };
        net.handle_input(now, reset, &mut rng);
        let (outputs, timers) = drain(&mut net);
        assert!(matches!(&outputs[..], [NetOutput::Dropped { bytes }] if &bytes[..] == b"lost"));
        assert_eq!(timers, vec![(now + 7, NetTimer::Lost { conn, to_source: true })], "the abandoned end is not told");
        assert!(net.is_dead(conn));
        assert_eq!(net.live_connections(), vec![]);
        // A chunk written after the reset, before the writer knows, is lost too.
        net.handle_input(now, NetInput::Write { conn, bytes: Bytes::from_static(b"late"), charged: 1 }, &mut rng);
        assert!(matches!(&drain(&mut net).0[..], [NetOutput::Dropped { bytes }] if &bytes[..] == b"late"));
    }

    #[test]
    fn the_readers_close_resets_and_the_writers_close_ends_the_stream() {
        let (mut net, mut rng) = (network(), Rng::new(1, 2));
        let conn = connected(&mut net, &mut rng);
        let now = 2 * LATENCY;
        // The destination reads the main channel: its close is a reset.
        net.handle_input(now, NetInput::Close { conn, end: Side::Destination, farewell: None }, &mut rng);
        assert_eq!(drain(&mut net).1, vec![(now + LATENCY, NetTimer::Lost { conn, to_source: true })]);
        // The source writes it: a close with a farewell is graceful.
        let conn = connected(&mut net, &mut rng);
        let farewell = Some(Bytes::from_static(b"bye"));
        net.handle_input(now, NetInput::Close { conn, end: Side::Source, farewell }, &mut rng);
        assert_eq!(net.room(conn), 0, "a closed writer writes no more");
        let (_, timers) = drain(&mut net);
        let (arrival, deliver) = timers[0];
        assert_eq!(deliver, NetTimer::Deliver { conn });
        net.handle_input(now + 10_000, NetInput::Timer(NetTimer::TransmitterFree { dir: 0 }), &mut rng);
        drain(&mut net);
        let later = now + 10_000 + 2 * LATENCY;
        assert!(arrival < later);
        let Some(Received::Data(bytes)) = net.receive(later, conn, &mut rng) else { panic!() };
        assert_eq!(&bytes[..], b"bye");
        assert!(matches!(net.receive(later, conn, &mut rng), Some(Received::End)));
        assert!(net.is_dead(conn));
        assert!(net.receive(later, conn, &mut rng).is_none());
    }
}
