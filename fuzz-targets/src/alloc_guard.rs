//! A global allocator that makes "no unbounded allocation" checkable.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks, so with
//! `--sanitizer none` (the stable-toolchain way of running) a huge
//! allocation would go unnoticed or kill the machine. This allocator, which
//! every binary that links this crate uses (the fuzz binaries and the replay
//! tests), keeps per-thread counts: the largest single request and the peak
//! of live bytes since [`Scope::begin`]. A request above the scope's hard
//! limit is refused, which aborts with Rust's "memory allocation of N bytes
//! failed": libFuzzer records that as a crash and saves the input.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct GuardedAlloc;

thread_local! {
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn on_alloc(size: usize) -> bool {
    if size > LIMIT.with(Cell::get) {
        // Refuse this one (Rust then reports it and aborts), but let the
        // reporting itself allocate.
        LIMIT.with(|l| l.set(usize::MAX));
        return false;
    }
    LARGEST.with(|l| l.set(l.get().max(size)));
    let live = LIVE.with(|l| {
        let v = l.get().wrapping_add(size as isize);
        l.set(v);
        v
    });
    PEAK.with(|p| p.set(p.get().max(live)));
    true
}

fn on_free(size: usize) {
    LIVE.with(|l| l.set(l.get().wrapping_sub(size as isize)));
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the bookkeeping only touches const-initialised thread-locals
// without destructors, which never allocate.
unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !on_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !on_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        on_free(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !on_alloc(new_size) {
            return std::ptr::null_mut();
        }
        on_free(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocation bookkeeping for one run of a target on this thread.
pub struct Scope {
    base: isize,
}

/// What one run allocated.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// The largest single allocation requested.
    pub largest_bytes: usize,
    /// The most bytes live at once, beyond what was live at the start.
    pub peak_live_bytes: usize,
}

impl Scope {
    /// Starts counting; any single request above `limit_bytes` aborts.
    pub fn begin(limit_bytes: usize) -> Scope {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            // A panic message and its backtrace may allocate more than a
            // target allows: lift the limit before reporting.
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                LIMIT.with(|l| l.set(usize::MAX));
                previous(info);
            }));
        });
        let base = LIVE.with(Cell::get);
        LARGEST.with(|l| l.set(0));
        PEAK.with(|p| p.set(base));
        LIMIT.with(|l| l.set(limit_bytes));
        Scope { base }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            largest_bytes: LARGEST.with(Cell::get),
            peak_live_bytes: PEAK.with(Cell::get).saturating_sub(self.base).max(0) as usize,
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        LIMIT.with(|l| l.set(usize::MAX));
    }
}
