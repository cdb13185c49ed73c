//! Populating a destination's shared guest RAM in the background, so that
//! the destination listens at once instead of after allocating every page
//! (0.6-3 s per GiB on the machines of docs/machine.md).
//!
//! [`Population::start`] runs a thread that allocates the pages of a
//! [`GuestRam::new_unpopulated`] RAM a chunk at a time
//! ([`GuestRam::populate_pages`], `MADV_POPULATE_WRITE` through the placement
//! mapping), in layout order: the order of the source's background push, so
//! that the push finds its pages allocated as long as the population stays
//! ahead of it. Correctness never depends on it: a page placed before the
//! population reached it is allocated by the write that places it, and
//! populating a page already written keeps its contents; a page the guest
//! touches before either is a missing fault (the RAM is registered for
//! missing and minor faults) served as any other. [`Population::stop`] ends
//! it early (the migration ended or failed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::error_chain;
use crate::layout::PageRef;
use crate::memory::GuestRam;

/// Pages allocated per call: 2 MiB, about 1 ms with backed memory; the
/// thread checks for a stop between chunks.
pub const CHUNK_PAGES: u64 = 512;

/// What a population did, for the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PopulationSummary {
    /// Pages the population allocated or found allocated (4 KiB).
    pub pages: u64,
    /// Pages of the RAM.
    pub total_pages: u64,
    /// It went through all of the RAM.
    pub complete: bool,
    /// From its start to its end (or to now, while it runs), in ms.
    pub ms: f64,
    /// Why it stopped early, if a call failed (the pages left are allocated
    /// as they are placed).
    pub error: Option<String>,
    /// Guest faults on pages it had not reached yet (missing faults: the
    /// page was not allocated, unless a placement was writing it).
    #[serde(default)]
    pub faults_ahead: u64,
}

#[derive(Debug)]
struct Progress {
    stop: AtomicBool,
    pages: AtomicU64,
    total_pages: u64,
    started: Instant,
    /// ns from `started` to the thread's end (0: still running).
    ended_ns: AtomicU64,
    complete: AtomicBool,
    error: Mutex<Option<String>>,
    /// Each block's first page, counted over the whole RAM in layout order.
    block_starts: Vec<u64>,
    faults_ahead: AtomicU64,
}

/// A background population of shared guest RAM.
#[derive(Debug)]
pub struct Population {
    progress: Arc<Progress>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Population {
    /// Starts populating `ram` (shared memory: [`GuestRam::new_unpopulated`])
    /// in a thread named `dst-populate`, pinned to `cpu` when given (the
    /// destination's bulk CPU: the population runs ahead of the bulk path,
    /// and never delays the fault path or the vCPUs).
    pub fn start(ram: Arc<GuestRam>, cpu: Option<usize>) -> std::io::Result<Self> {
        let total_pages = ram.layout().blocks().iter().map(|b| b.pages()).sum();
        let block_starts = ram
            .layout()
            .blocks()
            .iter()
            .scan(0, |next, b| {
                let start = *next;
                *next += b.pages();
                Some(start)
            })
            .collect();
        let progress = Arc::new(Progress {
            stop: AtomicBool::new(false),
            pages: AtomicU64::new(0),
            total_pages,
            started: Instant::now(),
            ended_ns: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            error: Mutex::new(None),
            block_starts,
            faults_ahead: AtomicU64::new(0),
        });
        let p = progress.clone();
        let thread = std::thread::Builder::new().name("dst-populate".into()).spawn(move || {
            super::placement::pin_self(cpu, "dst-populate");
            populate(&ram, &p);
            p.ended_ns.store(p.started.elapsed().as_nanos().max(1) as u64, Ordering::SeqCst);
        })?;
        Ok(Self { progress, thread: Mutex::new(Some(thread)) })
    }

    /// Stops the population (between two chunks) and waits for its thread;
    /// returns what it did.
    pub fn stop(&self) -> PopulationSummary {
        self.progress.stop.store(true, Ordering::SeqCst);
        self.join();
        self.summary()
    }

    /// Waits until the population went through all the RAM (or stopped).
    pub fn wait(&self) -> PopulationSummary {
        self.join();
        self.summary()
    }

    fn join(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the population thread panicked");
            }
        }
    }

    /// Whether the population has gone past `page` (it goes in layout
    /// order): then the page is allocated.
    pub fn has_reached(&self, page: PageRef) -> bool {
        let p = &self.progress;
        p.block_starts.get(page.block).is_some_and(|start| start + page.page < p.pages.load(Ordering::Relaxed))
            || p.complete.load(Ordering::Relaxed)
    }

    /// Counts a guest fault on `page` if the population has not reached it.
    pub fn note_fault(&self, page: PageRef) {
        if !self.has_reached(page) {
            self.progress.faults_ahead.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What it did so far.
    pub fn summary(&self) -> PopulationSummary {
        let p = &self.progress;
        let ended = p.ended_ns.load(Ordering::SeqCst);
        let ns = if ended > 0 { ended } else { p.started.elapsed().as_nanos() as u64 };
        PopulationSummary {
            pages: p.pages.load(Ordering::SeqCst),
            total_pages: p.total_pages,
            complete: p.complete.load(Ordering::SeqCst),
            ms: ns as f64 / 1e6,
            error: p.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            faults_ahead: p.faults_ahead.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Population {
    fn drop(&mut self) {
        self.progress.stop.store(true, Ordering::SeqCst);
        self.join();
    }
}

fn populate(ram: &GuestRam, p: &Progress) {
    let t0 = Instant::now();
    for (block, b) in ram.layout().blocks().iter().enumerate() {
        let mut page = 0;
        while page < b.pages() {
            if p.stop.load(Ordering::Relaxed) {
                tracing::debug!(pages = p.pages.load(Ordering::Relaxed), "population stopped");
                return;
            }
            let count = CHUNK_PAGES.min(b.pages() - page);
            if let Err(e) = ram.populate_pages(PageRef { block, page }, count) {
                let text = error_chain(&e);
                tracing::warn!(
                    e = text,
                    block,
                    page,
                    "populating guest RAM failed; pages are allocated as they arrive"
                );
                *p.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
                return;
            }
            p.pages.fetch_add(count, Ordering::Relaxed);
            page += count;
        }
    }
    p.complete.store(true, Ordering::SeqCst);
    tracing::info!(
        mib = (p.total_pages * crate::layout::PAGE_SIZE) >> 20,
        ms = t0.elapsed().as_secs_f64() * 1e3,
        "guest RAM populated"
    );
}

/// Guest RAM for `layout` allocated ahead of a migration, for a destination
/// (`dest --prealloc`, `run --incoming --prealloc`): on 4 KiB pages, shared
/// memory whose population runs in the background (this returns at once),
/// with that population; on huge pages `huge`, or when `before_listening`,
/// every page allocated now (as long as touching that much memory takes).
pub fn preallocate(
    layout: crate::layout::MemoryMap,
    huge: Option<crate::hugepages::HugePageSize>,
    before_listening: bool,
    cpu: Option<usize>,
) -> Result<(Arc<GuestRam>, Option<Arc<Population>>), crate::memory::MemoryError> {
    if huge.is_some() || before_listening {
        return Ok((Arc::new(GuestRam::new_preallocated_with(layout, huge)?), None));
    }
    let ram = Arc::new(GuestRam::new_unpopulated(layout)?);
    let population = Population::start(ram.clone(), cpu)
        .map_err(|source| crate::memory::MemoryError::Os { op: "spawn the population thread", source })?;
    Ok((ram, Some(Arc::new(population))))
}
