//! `postcopy bench`: in one run, the floors (a 4 KiB request/reply over
//! loopback TCP plus a `UFFDIO_COPY`; loopback bandwidth) and two 1 GiB
//! migrations between two processes, each figure printed as a ratio to its
//! floor and checked against the goals of issue 5.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use postcopy_kvm::driver::report::RunReport;
use postcopy_kvm::layout::MIB;
use postcopy_kvm::{GuestRam, PageRef, RamLayout, UffdRam, PAGE_SIZE};
use serde::Serialize;

use crate::cli::{self, Common, GuestArgs, ModeArg};

/// Benchmark settings.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Guest RAM of the migrations.
    #[arg(long, default_value = "1G", value_parser = cli::parse_size)]
    pub mem: u64,
    /// Request/reply round trips for the floor.
    #[arg(long, default_value_t = 3000)]
    pub round_trips: usize,
    #[command(flatten)]
    pub common: Common,
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
    floor: Floor,
    loopback_gb_per_s: f64,
    ram_over_bandwidth_ms: f64,
    default_run: RunReport,
    fault_heavy_run: RunReport,
    ratios: Vec<Ratio>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    what: String,
    measured: String,
    floor: String,
    ratio: f64,
    goal: String,
    met: bool,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// The floor of a remote fault: an 8-byte request, a 4 KiB reply over
/// loopback TCP, and the `UFFDIO_COPY` of the reply into registered memory,
/// with the driver's placement of the fault path.
fn measure_floor(round_trips: usize, common: &Common) -> Result<Floor, String> {
    let pages = (round_trips as u64 + 1).next_multiple_of(512);
    let layout = RamLayout::pc(pages * PAGE_SIZE).map_err(|e| e.to_string())?;
    let ram = Arc::new(GuestRam::new(layout).map_err(|e| e.to_string())?);
    let uffd = UffdRam::register(ram).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let latency_cpu = common.latency_cpu;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(cpu) = latency_cpu {
            let _ = postcopy_kvm::pin_thread(0, cpu);
        }
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let page = vec![0x5au8; PAGE_SIZE as usize];
        let mut req = [0u8; 8];
        loop {
            if s.read_exact(&mut req).is_err() {
                return Ok(());
            }
            s.write_all(&page)?;
        }
    });
    if let Some(cpu) = latency_cpu {
        let _ = postcopy_kvm::pin_thread(0, cpu);
    }
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..round_trips as u64 {
        let t0 = Instant::now();
        c.write_all(&i.to_le_bytes()).map_err(|e| e.to_string())?;
        c.read_exact(&mut buf).map_err(|e| e.to_string())?;
        uffd.install_page(PageRef::new(0, i), &buf).map_err(|e| e.to_string())?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    drop(c);
    let _ = server.join();
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(Floor {
        p50_us: percentile(&samples, 0.5),
        p99_us: percentile(&samples, 0.99),
        max_us: samples.last().copied().unwrap_or(0.0),
    })
}

/// Loopback TCP bandwidth, one connection, 1 MiB writes, `bytes` in all.
fn measure_bandwidth(bytes: u64) -> Result<f64, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
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
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let chunk = vec![0xa5u8; MIB as usize];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        c.write_all(&chunk).map_err(|e| e.to_string())?;
        sent += MIB;
    }
    drop(c);
    let got = reader.join().map_err(|_| "reader panicked".to_string())?.map_err(|e| e.to_string())?;
    let secs = t0.elapsed().as_secs_f64();
    Ok(got as f64 / secs / 1e9)
}

fn migration(mem: u64, common: &Common, fault_heavy: bool) -> Result<RunReport, String> {
    let guest =
        GuestArgs { mode: ModeArg::Postcopy, precopy_rounds: 0, mem, vcpus: 1, guest_image: None, run_before_ms: 500 };
    let mut common = common.clone();
    common.json = true;
    common.no_prepaging = fault_heavy;
    let (source, destination, _, _) = cli::run_pair(&guest, &common, 500, &[])?;
    match (source, destination) {
        (Some(s), Some(d)) => Ok(RunReport::new(s, d)),
        _ => Err("a side of the migration ended without a report".into()),
    }
}

pub fn run(a: BenchArgs) -> Result<ExitCode, String> {
    if !postcopy_kvm::kvm_available() {
        return Err("/dev/kvm is not usable here".into());
    }
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    eprintln!("bench: load average {load_average}; measuring the floors...");
    let floor = measure_floor(a.round_trips, &a.common)?;
    let loopback_gb_per_s = measure_bandwidth(a.mem.max(256 * MIB))?;
    let ram_over_bandwidth_ms = a.mem as f64 / (loopback_gb_per_s * 1e9) * 1e3;
    eprintln!(
        "bench: floor p50 {:.1} us p99 {:.1} us; loopback {:.2} GB/s; a {} MiB migration (default settings)...",
        floor.p50_us,
        floor.p99_us,
        loopback_gb_per_s,
        a.mem / MIB
    );
    let default_run = migration(a.mem, &a.common, false)?;
    eprintln!("bench: a {} MiB migration with the fault-heavy workload (no pre-paging)...", a.mem / MIB);
    let fault_heavy_run = migration(a.mem, &a.common, true)?;

    let mut ratios = Vec::new();
    let mut add = |what: &str,
                   measured: f64,
                   unit: &str,
                   floor_v: f64,
                   floor_what: &str,
                   goal: &str,
                   limit: f64,
                   higher_is_better: bool| {
        let ratio = if floor_v > 0.0 { measured / floor_v } else { f64::INFINITY };
        let met = if higher_is_better { ratio >= limit } else { ratio <= limit };
        ratios.push(Ratio {
            what: what.into(),
            measured: format!("{measured:.2} {unit}"),
            floor: format!("{floor_v:.2} {unit} ({floor_what})"),
            ratio,
            goal: goal.into(),
            met,
        });
    };
    let fl = &fault_heavy_run.destination.fault_latency;
    add("fault latency p50", fl.p50_us, "us", floor.p50_us, "request/reply + UFFDIO_COPY p50", "<= 2x", 2.0, false);
    add("fault latency p99", fl.p99_us, "us", floor.p50_us, "request/reply + UFFDIO_COPY p50", "<= 5x", 5.0, false);
    add(
        "total migration time",
        default_run.total_ms,
        "ms",
        ram_over_bandwidth_ms,
        "RAM / loopback bandwidth",
        "<= 1.5x",
        1.5,
        false,
    );
    add("downtime", default_run.downtime_ms, "ms", 5.0, "goal", "< 5 ms", 1.0, false);
    let before = default_run.source.progress_before_pages_per_s.unwrap_or(0.0);
    let during = default_run.destination.progress_during_pages_per_s.unwrap_or(0.0);
    add("guest progress during postcopy", during, "pages/s", before, "before the migration", ">= 0.6x", 0.6, true);
    let before_h = fault_heavy_run.source.progress_before_pages_per_s.unwrap_or(0.0);
    let during_h = fault_heavy_run.destination.progress_during_pages_per_s.unwrap_or(0.0);
    add(
        "guest progress during postcopy, fault-heavy",
        during_h,
        "pages/s",
        before_h,
        "before the migration",
        ">= 0.6x",
        0.6,
        true,
    );
    let report = BenchReport {
        load_average,
        floor,
        loopback_gb_per_s,
        ram_over_bandwidth_ms,
        default_run,
        fault_heavy_run,
        ratios,
    };
    if a.common.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        println!("postcopy bench ({} MiB guest, 1 vCPU; load average at start {})", a.mem / MIB, report.load_average);
        println!("\ndefault settings (pre-paging on):\n{}", report.default_run.table());
        println!("fault-heavy workload (pre-paging off: the guest faults on every page the push has not reached):");
        println!("{}", report.fault_heavy_run.table());
        println!("{:<44} {:>16} {:>48} {:>8} {:>9}  met", "figure", "measured", "floor", "ratio", "goal");
        for r in &report.ratios {
            println!(
                "{:<44} {:>16} {:>48} {:>7.2}x {:>9}  {}",
                r.what,
                r.measured,
                r.floor,
                r.ratio,
                r.goal,
                if r.met { "yes" } else { "NO" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
