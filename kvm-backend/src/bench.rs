//! `postcopy bench`: in one run, the floors (a 4 KiB request/reply over
//! loopback TCP plus a `UFFDIO_COPY`; loopback bandwidth) and two 1 GiB
//! migrations between two processes, each figure printed as a ratio to its
//! floor and checked against the goals of issue 5; and the same migrations
//! over mutual TLS, compared with plaintext (issue 14's goals).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use postcopy_core::Channel;
use postcopy_kvm::driver::report::RunReport;
use postcopy_kvm::driver::Tuning;
use postcopy_kvm::layout::MIB;
use postcopy_kvm::{GuestRam, HugePageSize, MemoryMap, MemoryRegion, PageRef, UffdRam, PAGE_SIZE};
use serde::Serialize;

use crate::args::{parse_size, Common, FallbackArg, GuestArgs, ModeArg};
use crate::pair::{run_pair, run_pair_timed, DestinationStart, PairError, PairReports};
use crate::tls::PairCredentials;

/// How long the push of the held fallback runs (the takeover, the many
/// checkpoints) lasts at least: time for checkpoints to be committed and
/// the next asked for before the migration ends.
const HELD_PUSH_SECONDS: u64 = 4;

/// Why the benchmark could not measure.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// No KVM.
    #[error("/dev/kvm is not usable here")]
    NoKvm,
    /// A socket or thread operation of a floor failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Setting up memory for a floor failed.
    #[error("{what}")]
    Memory {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: postcopy_kvm::Error,
    },
    /// A floor's thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    /// A migration could not be run.
    #[error("cannot run a migration")]
    Pair(#[source] PairError),
    /// A side of a migration gave no report.
    #[error("a side of the migration ended without a report")]
    MissingReport,
    /// The report could not be encoded.
    #[error("cannot encode the report")]
    Json(#[source] serde_json::Error),
    /// The TLS runs' credentials could not be made.
    #[error("cannot make the TLS runs' credentials")]
    Credentials(#[source] postcopy_secure::CredentialError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

fn memory<E: Into<postcopy_kvm::Error>>(what: &'static str) -> impl FnOnce(E) -> BenchError {
    move |source| BenchError::Memory { what, source: source.into() }
}

/// Benchmark settings.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Guest RAM of the migrations.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub mem: u64,
    /// Request/reply round trips for the floor.
    #[arg(long, default_value_t = 3000)]
    pub round_trips: usize,
    /// Migrations of each kind; figures are medians (the range is shown).
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Leave thread placement to the scheduler. By default, when no
    /// --*-cpu option is given and there are two CPUs or more, the vCPU and
    /// the fault path share the last CPU and the bulk path takes CPU 0
    /// (measured best here; see docs/performance.md).
    #[arg(long)]
    pub unpinned: bool,
    /// Only plaintext migrations (by default each migration also runs over
    /// mutual TLS, and the two are compared).
    #[arg(long)]
    pub no_tls: bool,
    /// No fallback section (by default each default-settings migration
    /// also runs with `--fallback checkpoint`, and one more has its
    /// destination die after its first checkpoint).
    #[arg(long)]
    pub no_fallback: bool,
    /// Guest sizes of the scaling section (destination started when the
    /// source is ready: time to accept, total time, total per GiB). A size
    /// whose two sides do not fit in the memory available is skipped.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "1G,2G,4G,8G")]
    pub scaling_sizes: Vec<u64>,
    /// Migrations per scaling size; figures are medians.
    #[arg(long, default_value_t = 3)]
    pub scaling_repeat: usize,
    /// No scaling section.
    #[arg(long)]
    pub no_scaling: bool,
    /// Also run each scaling size with the destination's RAM populated
    /// before it listens (--prealloc-before-listening), to compare.
    #[arg(long)]
    pub scaling_compare: bool,
    /// Only the scaling section.
    #[arg(long, conflicts_with = "no_scaling")]
    pub scaling_only: bool,
    /// Fewer repeats: one migration of each kind, and one per scaling size.
    #[arg(long)]
    pub quick: bool,
    /// Also run the migrations of each kind with the background push on
    /// this many streams (--push-streams) and compare them with the runs
    /// on one (0: no such runs).
    #[arg(long, default_value_t = 2)]
    pub streams_compare: u8,
    #[command(flatten)]
    pub common: Common,
}

impl BenchArgs {
    /// The settings of the migrations, with the bench's default placement
    /// applied; and that placement, in words.
    fn placed(&self) -> (Common, String) {
        let mut common = self.common.clone();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if !self.unpinned && !common.pins_threads() && cpus >= 2 {
            common.latency_cpu = Some(cpus - 1);
            common.vcpu_cpu = Some(cpus - 1);
            common.bulk_cpu = Some(0);
        }
        let cpu = |c: Option<usize>| c.map_or("any CPU".to_string(), |c| format!("CPU {c}"));
        let placement = format!(
            "vCPU on {}, fault path on {}, bulk path on {}",
            cpu(common.vcpu_cpu),
            cpu(common.latency_cpu),
            cpu(common.bulk_cpu)
        );
        (common, placement)
    }
}

#[derive(Debug, Default, Serialize)]
struct Floor {
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    load_average: String,
    /// Where the migrations' threads ran (the floor's two ends ran where
    /// the fault path did).
    placement: String,
    /// TCP congestion control of floors and migrations (None: the system's).
    tcp_congestion: Option<String>,
    /// With the driver's placement of the fault path (the goals' floor).
    floor: Floor,
    /// Both ends on one CPU: what the fault path costs without a
    /// cross-CPU wake-up.
    floor_same_cpu: Floor,
    loopback_gb_per_s: f64,
    ram_over_bandwidth_ms: f64,
    /// The RAM over loopback with both ends on one CPU, nothing installed:
    /// what the push's transfer alone costs on the CPU the guest leaves.
    loopback_one_cpu_ms: f64,
    /// The RAM over loopback into place as the destination places it, both
    /// ends on one CPU (the guest's vCPU holds the other during postcopy).
    push_on_one_cpu_ms: f64,
    /// The first touch of as much fresh anonymous memory as the RAM, one
    /// write per page, as the allocator hands it out: what backing the
    /// destination's pages costs here now. It varies with how much of this
    /// VM's free memory the host has reclaimed (see docs/machine.md, "Memory").
    fresh_memory_touch_ms: f64,
    /// The same again at once, in memory just freed (still backed).
    fresh_memory_retouch_ms: f64,
    default_runs: Vec<RunReport>,
    fault_heavy_runs: Vec<RunReport>,
    /// The same two kinds with no thread pinned (the demo's placement);
    /// empty when the runs above are unpinned too.
    unpinned_default_runs: Vec<RunReport>,
    unpinned_fault_heavy_runs: Vec<RunReport>,
    /// `--hugepages`: the same migrations on 2 MiB pages (the runs above
    /// are on 4 KiB pages), and their fault floor.
    huge: Option<HugeRuns>,
    ratios: Vec<Ratio>,
    /// The same migrations with the push on `streams` push streams (empty
    /// with --streams-compare 0).
    streams: u8,
    streams_default_runs: Vec<RunReport>,
    streams_fault_heavy_runs: Vec<RunReport>,
    /// The same migrations over mutual TLS (empty with --no-tls).
    tls_default_runs: Vec<RunReport>,
    tls_fault_heavy_runs: Vec<RunReport>,
    /// TLS against plaintext.
    tls_comparison: Vec<Comparison>,
    /// The scaling section (empty with --no-scaling).
    scaling: Vec<ScalingRow>,
    /// The default migrations with `--fallback checkpoint` (empty with
    /// --no-fallback), and one whose destination died after checkpoint 1.
    fallback_runs: Vec<RunReport>,
    fallback_takeover: Option<postcopy_kvm::driver::report::SourceReport>,
    /// A default migration with fallback whose push is held to
    /// `HELD_PUSH_SECONDS`, so that it takes many checkpoints.
    fallback_held: Option<RunReport>,
}

/// A figure with TLS against plaintext (medians of the runs).
#[derive(Debug, Serialize)]
struct Comparison {
    what: String,
    plaintext: String,
    tls: String,
    /// TLS / plaintext, or TLS - plaintext, as `goal` says.
    change: String,
    goal: String,
    /// Whether the goal is met; None for a figure shown for information.
    met: Option<bool>,
}

/// The migrations on huge pages and their floor.
#[derive(Debug, Serialize)]
struct HugeRuns {
    size: String,
    /// An 8-byte request, a 2 MiB reply over loopback TCP, and its placement
    /// (a copy through the placement mapping and one `UFFDIO_CONTINUE`).
    floor: Floor,
    default_runs: Vec<RunReport>,
    fault_heavy_runs: Vec<RunReport>,
}

/// One size of the scaling section.
#[derive(Debug, Serialize)]
struct ScalingRow {
    mem_mib: u64,
    /// How the destination's RAM was allocated: "background" (listening at
    /// once) or "before listening".
    allocation: &'static str,
    runs: Vec<ScalingRun>,
    /// Why the size was not run.
    skipped: Option<String>,
}

/// One migration of the scaling section.
#[derive(Debug, Serialize)]
struct ScalingRun {
    /// Destination started to listening (connections accepted from then).
    listening_ms: f64,
    run: RunReport,
}

impl ScalingRow {
    fn median(&self, f: impl Fn(&ScalingRun) -> f64) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(f).collect();
        v.sort_by(|x, y| x.total_cmp(y));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn gib(&self) -> f64 {
        self.mem_mib as f64 / 1024.0
    }
}

/// Bytes of memory available (`MemAvailable`), if known.
fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// The scaling section: for each size, migrations whose destination starts
/// when the source's guest is ready, so that what it does before and after
/// listening is part of the migration's wall time.
fn scaling(a: &BenchArgs, common: &Common, repeat: usize) -> Result<Vec<ScalingRow>, BenchError> {
    let mut rows = Vec::new();
    let kinds: &[(&'static str, &[&str])] = if a.scaling_compare {
        &[("background", &[]), ("before listening", &["--prealloc-before-listening"])]
    } else {
        &[("background", &[])]
    };
    for &mem in &a.scaling_sizes {
        for &(allocation, dest_args) in kinds {
            let mut row = ScalingRow { mem_mib: mem / MIB, allocation, runs: Vec::new(), skipped: None };
            // Both sides hold the guest's RAM, plus room for everything else.
            let need = 2 * mem + 1024 * MIB;
            match memory_available() {
                Some(avail) if avail < need => {
                    row.skipped = Some(format!("needs {} MiB, {} MiB available", need / MIB, avail / MIB));
                    rows.push(row);
                    continue;
                }
                _ => {}
            }
            for i in 0..repeat {
                eprintln!("bench: scaling {} MiB ({allocation}), run {}/{repeat}...", mem / MIB, i + 1);
                let guest = GuestArgs {
                    mode: ModeArg::Postcopy,
                    precopy_rounds: 0,
                    mem,
                    vcpus: 1,
                    guest_image: None,
                    run_before_ms: 500,
                };
                let mut common = common.clone();
                common.json = true;
                let timed =
                    run_pair_timed(&guest, &common, 500, &[], None, DestinationStart::WhenSourceReady, dest_args)
                        .map_err(BenchError::Pair)?;
                let PairReports { source, destination } = timed.reports;
                match (source, destination) {
                    (Some(s), Some(d)) => {
                        row.runs.push(ScalingRun { listening_ms: timed.listening_ms, run: RunReport::new(s, d) })
                    }
                    _ => return Err(BenchError::MissingReport),
                }
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

fn print_scaling(rows: &[ScalingRow], repeat: usize) {
    println!(
        "\nscaling: 1 vCPU, default settings, plaintext; the destination starts when the source's guest is ready \
         (time to accept: destination started -> listening); medians of {repeat}:"
    );
    println!(
        "{:>8} {:<17} {:>15} {:>12} {:>11} {:>16} {:>14} {:>24}  verified",
        "RAM",
        "RAM allocated",
        "time to accept",
        "total time",
        "total/GiB",
        "fault p50/p99",
        "placing pages",
        "population at the end"
    );
    for r in rows {
        if let Some(why) = &r.skipped {
            println!("{:>5} MiB {:<17} skipped: {why}", r.mem_mib, r.allocation);
            continue;
        }
        let total = r.median(|x| x.run.total_ms);
        let population = r.runs.last().and_then(|x| x.run.destination.population.as_ref()).map_or_else(
            || "-".to_string(),
            |p| format!("{:.0}% in {:.0} ms", 100.0 * p.pages as f64 / p.total_pages.max(1) as f64, p.ms),
        );
        let verified = r.runs.iter().all(|x| x.run.destination.ok && x.run.digests_match && x.run.integrity_ok);
        println!(
            "{:>5} MiB {:<17} {:>12.0} ms {:>9.0} ms {:>8.0} ms {:>7.0}/{:<4.0} us {:>11.0} ms {:>24}  {}",
            r.mem_mib,
            r.allocation,
            r.median(|x| x.listening_ms),
            total,
            total / r.gib(),
            r.median(|x| x.run.destination.fault_latency.p50_us),
            r.median(|x| x.run.destination.fault_latency.p99_us),
            r.median(|x| x.run.destination.install_busy_ns as f64 / 1e6),
            population,
            if verified { "yes" } else { "NO" }
        );
    }
}

#[derive(Debug, Serialize)]
struct Ratio {
    what: String,
    measured: String,
    range: String,
    floor: String,
    ratio: f64,
    goal: String,
    /// Whether the goal is met; None for a figure shown for information.
    met: Option<bool>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The server end of a request/reply floor: answers each 8-byte request
/// with `reply_bytes` bytes, on `latency_cpu`, until the client leaves.
fn spawn_floor_server(
    listener: TcpListener,
    reply_bytes: usize,
    latency_cpu: Option<usize>,
    net: Tuning,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(cpu) = latency_cpu {
            let _ = postcopy_kvm::pin_thread(0, cpu);
        }
        let (mut s, _) = listener.accept()?;
        net.tune_socket(&s, CHANNEL_OF_FLOOR);
        s.set_nodelay(true)?;
        let reply = vec![0x5au8; reply_bytes];
        let mut req = [0u8; 8];
        loop {
            if s.read_exact(&mut req).is_err() {
                return Ok(());
            }
            s.write_all(&reply)?;
        }
    })
}

impl Floor {
    /// The percentiles of round-trip `samples` (us).
    fn of(mut samples: Vec<f64>) -> Floor {
        samples.sort_by(|a, b| a.total_cmp(b));
        Floor {
            p50_us: percentile(&samples, 0.5),
            p99_us: percentile(&samples, 0.99),
            max_us: samples.last().copied().unwrap_or(0.0),
        }
    }
}

/// The floor of a remote fault: an 8-byte request, a 4 KiB reply over
/// loopback TCP, and the `UFFDIO_COPY` of the reply into registered memory,
/// with both ends on `latency_cpu` (None: where the scheduler puts them).
fn measure_floor(round_trips: usize, latency_cpu: Option<usize>, net: &Tuning) -> Result<Floor, BenchError> {
    let (accept_net, connect_net) = (net.clone(), net.clone());
    let pages = (round_trips as u64 + 1).next_multiple_of(512);
    let layout = MemoryMap::pc(pages * PAGE_SIZE).map_err(memory("lay out the floor's memory"))?;
    let ram = Arc::new(GuestRam::new(layout).map_err(memory("allocate the floor's memory"))?);
    let uffd = UffdRam::register(ram).map_err(memory("register the floor's memory"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listen for the floor"))?;
    let addr = listener.local_addr().map_err(io("read the floor's address"))?;
    let server = spawn_floor_server(listener, PAGE_SIZE as usize, latency_cpu, accept_net);
    // The client runs in a thread of its own: pinning the calling thread
    // would pin the migrations' processes too (affinity is inherited).
    let client = std::thread::spawn(move || -> Result<Vec<f64>, BenchError> {
        if let Some(cpu) = latency_cpu {
            let _ = postcopy_kvm::pin_thread(0, cpu);
        }
        let mut c = TcpStream::connect(addr).map_err(io("connect to the floor's server"))?;
        connect_net.tune_socket(&c, CHANNEL_OF_FLOOR);
        c.set_nodelay(true).map_err(io("turn Nagle off"))?;
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut samples = Vec::with_capacity(round_trips);
        for i in 0..round_trips as u64 {
            let t0 = Instant::now();
            c.write_all(&i.to_le_bytes()).map_err(io("send a floor request"))?;
            c.read_exact(&mut buf).map_err(io("receive a floor reply"))?;
            uffd.install_page(PageRef::new(0, i), &buf).map_err(memory("install a floor page"))?;
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(samples)
    });
    let samples = client.join().map_err(|_| BenchError::Panicked("floor client"));
    let _ = server.join();
    Ok(Floor::of(samples??))
}

/// Huge pages the huge-page floor places (each discarded after use): 8 of
/// 2 MiB, or one of 1 GiB (a physically contiguous GiB each is scarce:
/// the migrations after the floor need two).
fn huge_floor_pages(size: HugePageSize) -> u64 {
    match size {
        HugePageSize::Size2M => 8,
        HugePageSize::Size1G => 1,
    }
}

/// Round trips of the huge-page floor: each of a 1 GiB page moves a GiB.
fn huge_floor_round_trips(size: HugePageSize, asked: usize) -> usize {
    match size {
        HugePageSize::Size2M => asked.min(300),
        HugePageSize::Size1G => asked.min(5),
    }
}

/// The floor of a remote fault on a huge page: an 8-byte request, a reply of
/// one huge page over loopback TCP, and its placement as the destination
/// places it (a copy through the placement mapping, one `UFFDIO_CONTINUE`),
/// both ends on `latency_cpu`. The pages are discarded between round trips
/// (outside the timing) and placed again.
fn measure_huge_floor(
    round_trips: usize,
    size: HugePageSize,
    latency_cpu: Option<usize>,
    net: &Tuning,
) -> Result<Floor, BenchError> {
    let (accept_net, connect_net) = (net.clone(), net.clone());
    let page_bytes = size.bytes() as usize;
    let floor_pages = huge_floor_pages(size);
    let block = MemoryRegion { name: "huge-floor".into(), gpa: 0, size: floor_pages * size.bytes() };
    let layout = MemoryMap::new(vec![block]).map_err(memory("lay out the huge-page floor's memory"))?;
    let ram = GuestRam::new_preallocated_with(layout, Some(size)).map_err(memory("allocate the huge-page floor"))?;
    let uffd = UffdRam::register(Arc::new(ram)).map_err(memory("register the huge-page floor's memory"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listen for the huge-page floor"))?;
    let addr = listener.local_addr().map_err(io("read the huge-page floor's address"))?;
    let server = spawn_floor_server(listener, page_bytes, latency_cpu, accept_net);
    let client = std::thread::spawn(move || -> Result<Vec<f64>, BenchError> {
        if let Some(cpu) = latency_cpu {
            let _ = postcopy_kvm::pin_thread(0, cpu);
        }
        let mut c = TcpStream::connect(addr).map_err(io("connect to the huge-page floor's server"))?;
        connect_net.tune_socket(&c, CHANNEL_OF_FLOOR);
        c.set_nodelay(true).map_err(io("turn Nagle off"))?;
        let mut buf = vec![0u8; page_bytes];
        let mut samples = Vec::with_capacity(round_trips);
        for i in 0..round_trips as u64 {
            let page = PageRef::new(0, (i % floor_pages) * size.small_pages());
            if i >= floor_pages {
                uffd.discard_pages(page, size.small_pages()).map_err(memory("discard a huge floor page"))?;
            }
            let t0 = Instant::now();
            c.write_all(&i.to_le_bytes()).map_err(io("send a huge-page floor request"))?;
            c.read_exact(&mut buf).map_err(io("receive a huge-page floor reply"))?;
            uffd.install_page(page, &buf).map_err(memory("place a huge floor page"))?;
            samples.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(samples)
    });
    let samples = client.join().map_err(|_| BenchError::Panicked("huge-page floor client"));
    let _ = server.join();
    Ok(Floor::of(samples??))
}

/// The floors' sockets get the migration's congestion control but keep
/// autotuned buffers, as the urgent channel does: the bandwidth is then the
/// best this loopback gives (the main channel's bounded buffers, which cap
/// the slowest faults, would lower it, and flatter the ratio).
const CHANNEL_OF_FLOOR: Channel = Channel::Urgent;

/// Loopback TCP bandwidth, one connection, 1 MiB writes, `bytes` in all;
/// both ends on `cpu` when given (in threads of their own: the migrations'
/// processes inherit the calling thread's affinity).
fn measure_bandwidth(bytes: u64, net: &Tuning, cpu: Option<usize>) -> Result<f64, BenchError> {
    let (accept_net, connect_net) = (net.clone(), net.clone());
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listen for the bandwidth floor"))?;
    let addr = listener.local_addr().map_err(io("read the bandwidth floor's address"))?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        if let Some(cpu) = cpu {
            let _ = postcopy_kvm::pin_thread(0, cpu);
        }
        let (mut s, _) = listener.accept()?;
        accept_net.tune_socket(&s, CHANNEL_OF_FLOOR);
        let mut buf = vec![0u8; MIB as usize];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let writer = std::thread::spawn(move || -> Result<f64, BenchError> {
        if let Some(cpu) = cpu {
            let _ = postcopy_kvm::pin_thread(0, cpu);
        }
        let mut c = TcpStream::connect(addr).map_err(io("connect to the bandwidth floor's reader"))?;
        connect_net.tune_socket(&c, CHANNEL_OF_FLOOR);
        let chunk = vec![0xa5u8; MIB as usize];
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            c.write_all(&chunk).map_err(io("write to the bandwidth floor's reader"))?;
            sent += MIB;
        }
        drop(c);
        Ok(t0.elapsed().as_secs_f64())
    });
    let got =
        reader.join().map_err(|_| BenchError::Panicked("bandwidth reader"))?.map_err(io("read the bandwidth floor"))?;
    let secs = writer.join().map_err(|_| BenchError::Panicked("bandwidth writer"))??;
    Ok(got as f64 / secs / 1e9)
}

/// The copy floor of the push when the guest holds the other CPU: `mem`
/// bytes over loopback TCP (1 MiB writes) and into place as the destination
/// places them (preallocated RAM, runs of 64 pages: a copy through the
/// placement mapping and one `UFFDIO_CONTINUE`; no framing, no hashing, no
/// guest), sender and receiver on one CPU; returns the milliseconds
/// (preallocation excluded).
fn measure_push_on_one_cpu(mem: u64, net: &Tuning) -> Result<f64, BenchError> {
    let (accept_net, connect_net) = (net.clone(), net.clone());
    // One block, so that page numbers run from 0 to the end.
    let block = MemoryRegion { name: "push-floor".into(), gpa: 0, size: mem };
    let layout = MemoryMap::new(vec![block]).map_err(memory("lay out the push floor's memory"))?;
    let pages = layout.total_pages();
    let ram = Arc::new(GuestRam::new_preallocated(layout).map_err(memory("preallocate the push floor's memory"))?);
    let uffd = UffdRam::register(ram).map_err(memory("register the push floor's memory"))?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listen for the push floor"))?;
    let addr = listener.local_addr().map_err(io("read the push floor's address"))?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let _ = postcopy_kvm::pin_thread(0, 0);
        let (mut s, _) = listener.accept()?;
        accept_net.tune_socket(&s, CHANNEL_OF_FLOOR);
        let chunk = vec![0xa5u8; MIB as usize];
        let mut sent = 0;
        while sent < pages * PAGE_SIZE {
            s.write_all(&chunk)?;
            sent += MIB;
        }
        Ok(())
    });
    let receiver = std::thread::spawn(move || -> Result<f64, BenchError> {
        let _ = postcopy_kvm::pin_thread(0, 0);
        let mut c = TcpStream::connect(addr).map_err(io("connect to the push floor's sender"))?;
        connect_net.tune_socket(&c, CHANNEL_OF_FLOOR);
        // 256 KiB reads, like the driver's receiver.
        const BATCH: u64 = 64;
        let mut buf = vec![0u8; (BATCH * PAGE_SIZE) as usize];
        let t0 = Instant::now();
        for first in (0..pages).step_by(BATCH as usize) {
            let n = BATCH.min(pages - first);
            let chunk = &mut buf[..(n * PAGE_SIZE) as usize];
            c.read_exact(chunk).map_err(io("receive pushed pages"))?;
            uffd.install_pages(PageRef::new(0, first), chunk).map_err(memory("place pushed pages"))?;
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    });
    let ms = receiver.join().map_err(|_| BenchError::Panicked("push floor receiver"));
    let _ = sender.join();
    ms?
}

/// Writes one byte in every page of `mem` bytes of fresh anonymous memory;
/// returns the milliseconds.
fn touch_fresh_memory(mem: u64) -> f64 {
    // calloc'd: mapped on first touch, like pages placed by UFFDIO_COPY.
    let mut fresh = vec![0u8; mem as usize];
    let t0 = Instant::now();
    for byte in fresh.iter_mut().step_by(PAGE_SIZE as usize) {
        *byte = 1;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    std::hint::black_box(&fresh);
    ms
}

fn migration(
    mem: u64,
    common: &Common,
    fault_heavy: bool,
    creds: Option<&PairCredentials>,
) -> Result<RunReport, BenchError> {
    let guest =
        GuestArgs { mode: ModeArg::Postcopy, precopy_rounds: 0, mem, vcpus: 1, guest_image: None, run_before_ms: 500 };
    let mut common = common.clone();
    common.json = true;
    common.no_prepaging = fault_heavy;
    let PairReports { source, destination } = run_pair(&guest, &common, 500, &[], creds).map_err(BenchError::Pair)?;
    match (source, destination) {
        (Some(s), Some(d)) => Ok(RunReport::new(s, d)),
        _ => Err(BenchError::MissingReport),
    }
}

/// `postcopy bench`.
pub fn run(a: BenchArgs) -> Result<ExitCode, BenchError> {
    if !postcopy_kvm::kvm_available() {
        return Err(BenchError::NoKvm);
    }
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    let (mut common, placement) = a.placed();
    if a.scaling_only {
        let repeat = if a.quick { 1 } else { a.scaling_repeat.max(1) };
        eprintln!("bench: load average {load_average}; the scaling section only...");
        let rows = scaling(&a, &common, repeat)?;
        if a.common.json {
            println!("{}", serde_json::to_string_pretty(&rows).map_err(BenchError::Json)?);
        } else {
            println!("postcopy bench --scaling-only: load average at start {load_average}; placement: {placement}");
            print_scaling(&rows, repeat);
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("bench: load average {load_average}; measuring the floors...");
    // The runs on 4 KiB pages, and with --hugepages the same on huge pages.
    let huge_size = common.hugepages.take();
    let net = common.tuning();
    let floor = measure_floor(a.round_trips, common.latency_cpu, &net)?;
    let floor_same_cpu = measure_floor(a.round_trips, Some(0), &net)?;
    let loopback_gb_per_s = measure_bandwidth(a.mem.max(256 * MIB), &net, None)?;
    let loopback_one_cpu_ms = a.mem as f64 / (measure_bandwidth(a.mem.max(256 * MIB), &net, Some(0))? * 1e9) * 1e3;
    let ram_over_bandwidth_ms = a.mem as f64 / (loopback_gb_per_s * 1e9) * 1e3;
    let push_on_one_cpu_ms = measure_push_on_one_cpu(a.mem, &net)?;
    let fresh_memory_touch_ms = touch_fresh_memory(a.mem);
    let fresh_memory_retouch_ms = touch_fresh_memory(a.mem);
    eprintln!(
        "bench: floor p50 {:.1} us p99 {:.1} us; loopback {:.2} GB/s; a {} MiB migration (default settings)...",
        floor.p50_us,
        floor.p99_us,
        loopback_gb_per_s,
        a.mem / MIB
    );
    let repeat = if a.quick { 1 } else { a.repeat.max(1) };
    let creds = if a.no_tls { None } else { Some(PairCredentials::new("bench").map_err(BenchError::Credentials)?) };
    let mut default_runs = Vec::new();
    let mut fault_heavy_runs = Vec::new();
    let mut tls_default_runs = Vec::new();
    let mut tls_fault_heavy_runs = Vec::new();
    let streams = a.streams_compare.min(postcopy_core::MAX_PUSH_STREAMS);
    let mut streams_common = common.clone();
    streams_common.push_streams = streams.max(1);
    let (mut streams_default_runs, mut streams_fault_heavy_runs) = (Vec::new(), Vec::new());
    // The demo's placement (none: the scheduler's), when the runs above are
    // pinned: the total-time goal holds for both.
    let unpinned_common =
        common.pins_threads().then(|| Common { latency_cpu: None, bulk_cpu: None, vcpu_cpu: None, ..common.clone() });
    let (mut unpinned_default_runs, mut unpinned_fault_heavy_runs) = (Vec::new(), Vec::new());
    for i in 0..repeat {
        eprintln!("bench: run {}/{repeat}: default settings...", i + 1);
        default_runs.push(migration(a.mem, &common, false, None)?);
        eprintln!("bench: run {}/{repeat}: fault-heavy workload (no pre-paging)...", i + 1);
        fault_heavy_runs.push(migration(a.mem, &common, true, None)?);
        if let Some(unpinned) = &unpinned_common {
            eprintln!("bench: run {}/{repeat}: default settings, unpinned (the demo's placement)...", i + 1);
            unpinned_default_runs.push(migration(a.mem, unpinned, false, None)?);
            eprintln!("bench: run {}/{repeat}: fault-heavy workload, unpinned...", i + 1);
            unpinned_fault_heavy_runs.push(migration(a.mem, unpinned, true, None)?);
        }
        if streams > 0 {
            eprintln!("bench: run {}/{repeat}: default settings on {streams} push streams...", i + 1);
            streams_default_runs.push(migration(a.mem, &streams_common, false, None)?);
            eprintln!("bench: run {}/{repeat}: fault-heavy workload on {streams} push streams...", i + 1);
            streams_fault_heavy_runs.push(migration(a.mem, &streams_common, true, None)?);
        }
        if let Some(creds) = &creds {
            eprintln!("bench: run {}/{repeat}: default settings over TLS...", i + 1);
            tls_default_runs.push(migration(a.mem, &common, false, Some(creds))?);
            eprintln!("bench: run {}/{repeat}: fault-heavy workload over TLS...", i + 1);
            tls_fault_heavy_runs.push(migration(a.mem, &common, true, Some(creds))?);
        }
    }
    let mut fallback_common = common.clone();
    fallback_common.fallback = FallbackArg::Checkpoint;
    let mut fallback_runs = Vec::new();
    let mut fallback_takeover = None;
    let mut fallback_held = None;
    if !a.no_fallback {
        for i in 0..repeat {
            eprintln!("bench: run {}/{repeat}: default settings with --fallback checkpoint...", i + 1);
            fallback_runs.push(migration(a.mem, &fallback_common, false, None)?);
        }
        eprintln!("bench: the destination dies after its first checkpoint...");
        let guest = GuestArgs {
            mode: ModeArg::Postcopy,
            precopy_rounds: 0,
            mem: a.mem,
            vcpus: 1,
            guest_image: None,
            run_before_ms: 500,
        };
        // The push held to the RAM over HELD_PUSH_SECONDS: unthrottled, a
        // 1 GiB migration ended before its second checkpoint was asked for,
        // and the destination never died. The figure (death to the guest
        // running on the source) does not depend on the push.
        let mut held = fallback_common.clone();
        held.max_postcopy_bandwidth = a.mem / HELD_PUSH_SECONDS;
        let json_common = Common { json: true, ..held.clone() };
        let die = [(postcopy_kvm::driver::DIE_AFTER_CHECKPOINT_ENV, "1")];
        fallback_takeover = run_pair(&guest, &json_common, 500, &die, None).map_err(BenchError::Pair)?.source;
        // The runs above take one or two checkpoints each (the migration is
        // short); this one lasts long enough for tens, to show their spread.
        eprintln!("bench: a fallback migration whose push is held to {HELD_PUSH_SECONDS} s (many checkpoints)...");
        fallback_held = Some(migration(a.mem, &held, false, None)?);
    }
    let huge = match huge_size {
        None => None,
        Some(size) => {
            let round_trips = huge_floor_round_trips(size, a.round_trips);
            let floor = measure_huge_floor(round_trips, size, common.latency_cpu, &net)?;
            eprintln!("bench: {size} floor p50 {:.1} us p99 {:.1} us", floor.p50_us, floor.p99_us);
            let mut huge_common = common.clone();
            huge_common.hugepages = Some(size);
            let (mut default_runs, mut fault_heavy_runs) = (Vec::new(), Vec::new());
            for i in 0..repeat {
                eprintln!("bench: run {}/{repeat} on {size} pages: default settings...", i + 1);
                default_runs.push(migration(a.mem, &huge_common, false, None)?);
                eprintln!("bench: run {}/{repeat} on {size} pages: fault-heavy workload...", i + 1);
                fault_heavy_runs.push(migration(a.mem, &huge_common, true, None)?);
            }
            Some(HugeRuns { size: size.to_string(), floor, default_runs, fault_heavy_runs })
        }
    };
    // Median and range of a figure over the runs.
    let stat = |runs: &[RunReport], f: &dyn Fn(&RunReport) -> f64| -> (f64, f64, f64) {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|x, y| x.total_cmp(y));
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let mut ratios = Vec::new();
    let mut add = |what: &str,
                   (measured, lo, hi): (f64, f64, f64),
                   unit: &str,
                   floor_v: f64,
                   floor_what: &str,
                   goal: &str,
                   limit: f64,
                   higher_is_better: bool| {
        let ratio = if floor_v > 0.0 { measured / floor_v } else { f64::INFINITY };
        let met = limit.is_finite().then_some(if higher_is_better { ratio >= limit } else { ratio <= limit });
        ratios.push(Ratio {
            what: what.into(),
            measured: format!("{measured:.2} {unit}"),
            range: format!("{lo:.1}-{hi:.1}"),
            floor: format!("{floor_v:.2} {unit} ({floor_what})"),
            ratio,
            goal: goal.into(),
            met,
        });
    };
    let floor_what = "request/reply + UFFDIO_COPY p50";
    let p50 = stat(&fault_heavy_runs, &|r| r.destination.fault_latency.p50_us);
    let p99 = stat(&fault_heavy_runs, &|r| r.destination.fault_latency.p99_us);
    add("fault latency p50 (fault-heavy)", p50, "us", floor.p50_us, floor_what, "<= 2x", 2.0, false);
    add("fault latency p99 (fault-heavy)", p99, "us", floor.p50_us, floor_what, "<= 5x", 5.0, false);
    let same_what = "request/reply + UFFDIO_COPY p50, one CPU";
    add("fault latency p50 vs the same-CPU floor", p50, "us", floor_same_cpu.p50_us, same_what, "<= 2x", 2.0, false);
    add("fault latency p99 vs the same-CPU floor", p99, "us", floor_same_cpu.p50_us, same_what, "<= 5x", 5.0, false);
    add(
        "fault latency p99 vs the floor's own p99 (info)",
        p99,
        "us",
        floor.p99_us,
        "request/reply + UFFDIO_COPY p99",
        "-",
        f64::INFINITY,
        false,
    );
    let total = stat(&default_runs, &|r| r.total_ms);
    let one_cpu_what = "RAM over loopback into place, one CPU";
    add("total time vs the one-CPU push", total, "ms", push_on_one_cpu_ms, one_cpu_what, "<= 1.25x", 1.25, false);
    add(
        "total time vs RAM / loopback bandwidth (info)",
        total,
        "ms",
        ram_over_bandwidth_ms,
        "RAM / loopback bandwidth",
        "-",
        f64::INFINITY,
        false,
    );
    if !unpinned_default_runs.is_empty() {
        let what = |figure: &str| format!("unpinned (demo's placement): {figure}");
        let unpinned_total = stat(&unpinned_default_runs, &|r| r.total_ms);
        add(
            &what("total vs the one-CPU push"),
            unpinned_total,
            "ms",
            push_on_one_cpu_ms,
            one_cpu_what,
            "<= 1.25x",
            1.25,
            false,
        );
        let unpinned_p50 = stat(&unpinned_fault_heavy_runs, &|r| r.destination.fault_latency.p50_us);
        let unpinned_p99 = stat(&unpinned_fault_heavy_runs, &|r| r.destination.fault_latency.p99_us);
        add(&what("fault p50 (info)"), unpinned_p50, "us", floor.p50_us, floor_what, "-", f64::INFINITY, false);
        add(&what("fault p99 (info)"), unpinned_p99, "us", floor.p50_us, floor_what, "-", f64::INFINITY, false);
    }
    let placing = stat(&default_runs, &|r| r.destination.install_busy_ns as f64 / 1e6);
    add(
        "time placing pages vs fresh memory (info)",
        placing,
        "ms",
        fresh_memory_touch_ms,
        "first touch of fresh memory, one write per page",
        "-",
        f64::INFINITY,
        false,
    );
    if !streams_default_runs.is_empty() {
        let n = streams_common.push_streams;
        let streams_p50 = stat(&streams_fault_heavy_runs, &|r| r.destination.fault_latency.p50_us);
        let streams_p99 = stat(&streams_fault_heavy_runs, &|r| r.destination.fault_latency.p99_us);
        let streams_total = stat(&streams_default_runs, &|r| r.total_ms);
        let what = |figure: &str| format!("{n} push streams: {figure}");
        add(
            &what("total vs the one-CPU push"),
            streams_total,
            "ms",
            push_on_one_cpu_ms,
            one_cpu_what,
            "<= 1.25x",
            1.25,
            false,
        );
        add(
            &what("total vs 1 stream (info)"),
            streams_total,
            "ms",
            total.0,
            "1 stream, median",
            "-",
            f64::INFINITY,
            false,
        );
        add(&what("fault p50 (fault-heavy)"), streams_p50, "us", floor.p50_us, floor_what, "<= 2x", 2.0, false);
        add(&what("fault p99 (fault-heavy)"), streams_p99, "us", floor.p50_us, floor_what, "<= 5x", 5.0, false);
        add(
            &what("fault p50 vs 1 stream (info)"),
            streams_p50,
            "us",
            p50.0,
            "1 stream, median",
            "-",
            f64::INFINITY,
            false,
        );
        add(
            &what("fault p99 vs 1 stream (info)"),
            streams_p99,
            "us",
            p99.0,
            "1 stream, median",
            "-",
            f64::INFINITY,
            false,
        );
    }
    let downtime = stat(&default_runs, &|r| r.downtime_ms);
    add("downtime", downtime, "ms", 5.0, "goal", "< 5 ms", 1.0, false);
    let progress = |r: &RunReport| {
        let before = r.source.progress_before_pages_per_s.unwrap_or(0.0);
        let during = r.destination.progress_during_pages_per_s.unwrap_or(0.0);
        if before > 0.0 {
            during / before
        } else {
            0.0
        }
    };
    let p = stat(&default_runs, &progress);
    add("guest progress during postcopy / before", p, "", 1.0, "", ">= 0.6x", 0.6, true);
    let p = stat(&fault_heavy_runs, &progress);
    add("same, fault-heavy", p, "", 1.0, "", ">= 0.6x", 0.6, true);
    if !fallback_runs.is_empty() {
        let summary = |r: &RunReport| r.destination.fallback.clone().unwrap_or_default();
        let stop = stat(&fallback_runs, &|r| summary(r).stop_us_p50 / 1e3);
        add("fallback: vCPU stop per checkpoint, p50", stop, "ms", 1.0, "goal", "< 1 ms", 1.0, false);
        let stop_max = stat(&fallback_runs, &|r| summary(r).stop_us_max / 1e3);
        add("fallback: longest vCPU stop (info)", stop_max, "ms", 1.0, "1 ms", "-", f64::INFINITY, false);
        let per_checkpoint = |r: &RunReport| {
            let f = summary(r);
            f.checkpoint_bytes as f64 / f.checkpoints.max(1) as f64 / MIB as f64
        };
        let mib = stat(&fallback_runs, &per_checkpoint);
        add(
            "fallback: MiB sent back per checkpoint (info)",
            mib,
            "MiB",
            a.mem as f64 / MIB as f64,
            "guest RAM",
            "-",
            f64::INFINITY,
            false,
        );
        let (without, ..) = stat(&default_runs, &progress);
        let with = stat(&fallback_runs, &progress);
        add(
            "fallback: guest progress during postcopy",
            with,
            "",
            without,
            "the same without fallback",
            ">= 0.5x",
            0.5,
            true,
        );
        let (without, ..) = total;
        let with = stat(&fallback_runs, &|r| r.total_ms);
        add("fallback: total migration time", with, "ms", without, "the same without fallback", "<= 1.3x", 1.3, false);
    }
    if let Some(f) = fallback_held.as_ref().and_then(|r| r.destination.fallback.clone()) {
        let what = |figure: &str| format!("fallback, push held to {HELD_PUSH_SECONDS} s: {figure}");
        let one = |v: f64| (v, v, v);
        let n = f.checkpoints as f64;
        add(&what("checkpoints (info)"), one(n), "", 1.0, "", "-", f64::INFINITY, true);
        add(&what("vCPU stop p50"), one(f.stop_us_p50 / 1e3), "ms", 1.0, "goal", "< 1 ms", 1.0, false);
        add(&what("vCPU stop p99 (info)"), one(f.stop_us_p99 / 1e3), "ms", 1.0, "1 ms", "-", f64::INFINITY, false);
        add(&what("longest vCPU stop (info)"), one(f.stop_us_max / 1e3), "ms", 1.0, "1 ms", "-", f64::INFINITY, false);
    }
    if let Some(takeover) = fallback_takeover.as_ref().and_then(|r| r.fallback.as_ref()?.takeover.clone()) {
        // The destination dies right after its last frame left: from the
        // source's last word to the guest running there again.
        let ms = takeover.running_ns.saturating_sub(takeover.last_heard_ns) as f64 / 1e6;
        let goal = fallback_common.lease_ms as f64 + 50.0;
        add(
            "fallback: destination's death to the guest running on the source",
            (ms, ms, ms),
            "ms",
            goal,
            "lease + 50 ms",
            "<= 1x",
            1.0,
            false,
        );
    } else if !a.no_fallback {
        eprintln!("bench: the fallback takeover run did not take over: {fallback_takeover:?}");
    }
    if let Some(h) = &huge {
        let floor_what = format!("{} request/reply + placement p50", h.size);
        let p50 = stat(&h.fault_heavy_runs, &|r| r.destination.fault_latency.p50_us);
        let p99 = stat(&h.fault_heavy_runs, &|r| r.destination.fault_latency.p99_us);
        add(
            &format!("{} fault latency p50 (fault-heavy)", h.size),
            p50,
            "us",
            h.floor.p50_us,
            &floor_what,
            "<= 2x",
            2.0,
            false,
        );
        add(
            &format!("{} fault latency p99 (fault-heavy)", h.size),
            p99,
            "us",
            h.floor.p50_us,
            &floor_what,
            "<= 5x",
            5.0,
            false,
        );
        let (small_total, ..) = total;
        let huge_total = stat(&h.default_runs, &|r| r.total_ms);
        add(
            &format!("{} total time vs 4 KiB", h.size),
            huge_total,
            "ms",
            small_total,
            "4 KiB run, median",
            "<= 1x",
            1.0,
            false,
        );
        let (small_heavy, ..) = stat(&fault_heavy_runs, &|r| r.total_ms);
        let huge_heavy = stat(&h.fault_heavy_runs, &|r| r.total_ms);
        add(
            &format!("{} total time vs 4 KiB, fault-heavy", h.size),
            huge_heavy,
            "ms",
            small_heavy,
            "4 KiB run, median",
            "<= 1x",
            1.0,
            false,
        );
        let (small_progress, ..) = stat(&default_runs, &progress);
        let huge_progress = stat(&h.default_runs, &progress);
        add(
            &format!("{} guest progress vs 4 KiB (info)", h.size),
            huge_progress,
            "",
            small_progress,
            "4 KiB run's progress ratio",
            "-",
            f64::INFINITY,
            true,
        );
        let (small_progress, ..) = stat(&fault_heavy_runs, &progress);
        let huge_progress = stat(&h.fault_heavy_runs, &progress);
        add(
            &format!("{} same, fault-heavy (info)", h.size),
            huge_progress,
            "",
            small_progress,
            "4 KiB run's progress ratio",
            "-",
            f64::INFINITY,
            true,
        );
    }
    let scaling_repeat = if a.quick { 1 } else { a.scaling_repeat.max(1) };
    let scaling_rows = if a.no_scaling { Vec::new() } else { scaling(&a, &common, scaling_repeat)? };
    let ran: Vec<&ScalingRow> =
        scaling_rows.iter().filter(|r| r.allocation == "background" && !r.runs.is_empty()).collect();
    let range = |r: &ScalingRow, f: &dyn Fn(&ScalingRun) -> f64| {
        let v: Vec<f64> = r.runs.iter().map(f).collect();
        (r.median(f), v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max))
    };
    if let (Some(small), Some(large)) = (ran.first(), ran.last()) {
        add(
            &format!("time to accept, {} MiB guest", large.mem_mib),
            range(large, &|x| x.listening_ms),
            "ms",
            2000.0,
            "goal",
            "< 2 s",
            1.0,
            false,
        );
        if large.mem_mib > small.mem_mib {
            let (large_gib, small_gib) = (large.gib(), small.gib());
            add(
                &format!("total time per GiB, {} vs {} MiB", large.mem_mib, small.mem_mib),
                range(large, &|x| x.run.total_ms / large_gib),
                "ms",
                small.median(|x| x.run.total_ms / small_gib),
                "smallest size's total per GiB",
                "<= 1.25x",
                1.25,
                false,
            );
        }
    }
    let tls_comparison = if tls_default_runs.is_empty() {
        Vec::new()
    } else {
        compare_tls(&default_runs, &fault_heavy_runs, &tls_default_runs, &tls_fault_heavy_runs)
    };
    let report = BenchReport {
        load_average,
        placement,
        tcp_congestion: common.tcp_congestion(),
        floor,
        floor_same_cpu,
        loopback_gb_per_s,
        ram_over_bandwidth_ms,
        loopback_one_cpu_ms,
        push_on_one_cpu_ms,
        fresh_memory_touch_ms,
        fresh_memory_retouch_ms,
        default_runs,
        fault_heavy_runs,
        unpinned_default_runs,
        unpinned_fault_heavy_runs,
        huge,
        ratios,
        streams,
        streams_default_runs,
        streams_fault_heavy_runs,
        tls_default_runs,
        tls_fault_heavy_runs,
        tls_comparison,
        fallback_runs,
        fallback_takeover,
        fallback_held,
        scaling: scaling_rows,
    };
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(BenchError::Json)?);
    } else {
        println!(
            "postcopy bench: {} MiB guest, 1 vCPU, {repeat} migrations of each kind; load average at start {}",
            a.mem / MIB,
            report.load_average
        );
        println!(
            "placement: {}; TCP congestion control: {}",
            report.placement,
            report.tcp_congestion.as_deref().unwrap_or("the system's")
        );
        if let (Some(d), Some(f)) = (report.default_runs.last(), report.fault_heavy_runs.last()) {
            println!("\nlast run, default settings (pre-paging on):\n{}", d.table());
            println!("last run, fault-heavy workload (pre-paging off: the guest faults on every page the push has not reached):");
            println!("{}", f.table());
        }
        println!(
            "floor: 4 KiB request/reply + UFFDIO_COPY p50 {:.1} us, p99 {:.1} us (driver's placement), p50 {:.1} us, p99 {:.1} us (one CPU); loopback TCP {:.2} GB/s ({:.0} ms for the RAM; {:.0} ms on one CPU); the RAM over loopback into place on one CPU {:.0} ms; first touch of as much fresh memory {:.0} ms ({:.0} ms again just after freeing it)\n",
            report.floor.p50_us,
            report.floor.p99_us,
            report.floor_same_cpu.p50_us,
            report.floor_same_cpu.p99_us,
            report.loopback_gb_per_s,
            report.ram_over_bandwidth_ms,
            report.loopback_one_cpu_ms,
            report.push_on_one_cpu_ms,
            report.fresh_memory_touch_ms,
            report.fresh_memory_retouch_ms
        );
        if let Some(h) = &report.huge {
            if let Some(f) = h.fault_heavy_runs.last() {
                println!("last run on {} pages, fault-heavy workload:\n{}", h.size, f.table());
            }
            println!(
                "floor on {} pages: request/reply + placement p50 {:.1} us, p99 {:.1} us, max {:.1} us\n",
                h.size, h.floor.p50_us, h.floor.p99_us, h.floor.max_us
            );
        }
        println!(
            "{:<42} {:>14} {:>14} {:>8} {:>9}  met",
            "figure (median of runs)", "measured", "range", "ratio", "goal"
        );
        for r in &report.ratios {
            println!(
                "{:<42} {:>14} {:>14} {:>7.2}x {:>9}  {}",
                r.what,
                r.measured,
                r.range,
                r.ratio,
                r.goal,
                met_text(r.met)
            );
        }
        if !report.scaling.is_empty() {
            print_scaling(&report.scaling, scaling_repeat);
        }
        if !report.tls_comparison.is_empty() {
            println!("\nmutual TLS against plaintext (medians of {repeat} runs each):");
            println!("{:<46} {:>12} {:>12} {:>12} {:>12}  met", "figure", "plaintext", "TLS", "change", "goal");
            for c in &report.tls_comparison {
                println!(
                    "{:<46} {:>12} {:>12} {:>12} {:>12}  {}",
                    c.what,
                    c.plaintext,
                    c.tls,
                    c.change,
                    c.goal,
                    met_text(c.met)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn met_text(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

fn median(runs: &[RunReport], f: impl Fn(&RunReport) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(|x, y| x.total_cmp(y));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Guest progress during postcopy over progress before the migration.
fn progress(r: &RunReport) -> f64 {
    let before = r.source.progress_before_pages_per_s.unwrap_or(0.0);
    let during = r.destination.progress_during_pages_per_s.unwrap_or(0.0);
    if before > 0.0 {
        during / before
    } else {
        0.0
    }
}

/// Time spent opening connections between the source's stop and the
/// guest's resume on the destination, in ms.
fn handshake_in_downtime_ms(r: &RunReport) -> f64 {
    if r.source.stop_ns == 0 || r.destination.resume_ns == 0 {
        return 0.0;
    }
    r.source.handshake_ms_within(r.source.stop_ns, r.destination.resume_ns)
}

/// Median time to open one connection (TCP, TLS, preamble), in ms.
fn connection_opening_ms(r: &RunReport) -> f64 {
    let mut v: Vec<f64> = r.source.handshakes_ns.iter().map(|&(a, b)| b.saturating_sub(a) as f64 / 1e6).collect();
    v.sort_by(|x, y| x.total_cmp(y));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Issue 14's goals: total time within 1.25x of plaintext, fault p50 within
/// +5 us, handshakes adding under 5 ms to the downtime.
fn compare_tls(
    plain: &[RunReport],
    plain_faulty: &[RunReport],
    tls: &[RunReport],
    tls_faulty: &[RunReport],
) -> Vec<Comparison> {
    let mut rows = Vec::new();
    let mut ratio = |what: &str, p: f64, t: f64, unit: &str, limit: Option<f64>| {
        let r = if p > 0.0 { t / p } else { f64::INFINITY };
        rows.push(Comparison {
            what: what.into(),
            plaintext: format!("{p:.2} {unit}"),
            tls: format!("{t:.2} {unit}"),
            change: format!("{r:.2}x"),
            goal: limit.map_or("-".into(), |l| format!("<= {l}x")),
            met: limit.map(|l| r <= l),
        });
    };
    ratio("total migration time", median(plain, |r| r.total_ms), median(tls, |r| r.total_ms), "ms", Some(1.25));
    let progress_p = median(plain, progress);
    ratio("guest progress during postcopy / before", progress_p, median(tls, progress), "", None);
    ratio("same, fault-heavy", median(plain_faulty, progress), median(tls_faulty, progress), "", None);
    let mut diff = |what: &str, p: f64, t: f64, unit: &str, limit: Option<f64>| {
        let d = t - p;
        rows.push(Comparison {
            what: what.into(),
            plaintext: format!("{p:.2} {unit}"),
            tls: format!("{t:.2} {unit}"),
            change: format!("{d:+.2} {unit}"),
            goal: limit.map_or("-".into(), |l| format!("<= +{l} {unit}")),
            met: limit.map(|l| d <= l),
        });
    };
    let p50 = |r: &RunReport| r.destination.fault_latency.p50_us;
    let p99 = |r: &RunReport| r.destination.fault_latency.p99_us;
    diff("fault latency p50 (fault-heavy)", median(plain_faulty, p50), median(tls_faulty, p50), "us", Some(5.0));
    diff("fault latency p99 (fault-heavy)", median(plain_faulty, p99), median(tls_faulty, p99), "us", None);
    diff("downtime", median(plain, |r| r.downtime_ms), median(tls, |r| r.downtime_ms), "ms", None);
    diff(
        "opening one connection (p50)",
        median(plain, connection_opening_ms),
        median(tls, connection_opening_ms),
        "ms",
        None,
    );
    let worst = |runs: &[RunReport]| runs.iter().map(handshake_in_downtime_ms).fold(0.0, f64::max);
    let (p, t) = (worst(plain).max(worst(plain_faulty)), worst(tls).max(worst(tls_faulty)));
    rows.push(Comparison {
        what: "connection opening inside the downtime (worst run)".into(),
        plaintext: format!("{p:.2} ms"),
        tls: format!("{t:.2} ms"),
        change: format!("{:+.2} ms", t - p),
        goal: "< 5 ms".into(),
        met: Some(t < 5.0),
    });
    rows
}
