//! What QEMU's `postcopy-blocktime` capability measures on the destination,
//! measured the same way: how long each vCPU was blocked on remote faults,
//! how long every vCPU was blocked at once, and the latency of remote
//! faults (average and log2-microsecond buckets).
//!
//! The fault thread tells [`Blocktime::blocked`] which vCPU faulted on
//! which page (the faulting thread's id, from userfaultfd's
//! `UFFD_FEATURE_THREAD_ID`, names the vCPU); an installer tells
//! [`Blocktime::resolved`] when a faulted page is in place, with the wait of
//! the page's first fault (the driver's fault clock), and a wake of a page
//! that was present already unblocks its vCPUs too. A VMM creates one only
//! when asked (QEMU's capability), so the fault path pays nothing without
//! it; with it, one uncontended lock per batch of faults read and per
//! faulted page installed, and a scan of the vCPUs on each.

use std::sync::Mutex;

use crate::devices::lock;

/// Buckets of the latency distribution: bucket N counts latencies in
/// [2^N, 2^(N+1)) microseconds (under 1 us in bucket 0, 2^23 us and above
/// in the last), as QEMU 10.1's `postcopy-latency-dist`.
pub const LATENCY_BUCKETS: usize = 24;

/// One vCPU's account.
#[derive(Clone, Copy, Debug, Default)]
struct VcpuAccount {
    /// The page it waits for and since when (ns), if blocked.
    blocked_on: Option<(u64, u64)>,
    blocked_ns: u64,
    faults: u64,
}

#[derive(Debug, Default)]
struct Accounts {
    vcpus: Vec<VcpuAccount>,
    /// vCPUs blocked now.
    blocked: usize,
    /// Every vCPU blocked since (ns).
    all_blocked_since: Option<u64>,
    all_blocked_ns: u64,
    /// Remote faults resolved, their summed latency (ns) and distribution.
    faults: u64,
    latency_ns: u64,
    buckets: [u64; LATENCY_BUCKETS],
}

/// The figures so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlocktimeFigures {
    /// Per vCPU: time blocked on remote faults, ns.
    pub vcpu_blocked_ns: Vec<u64>,
    /// Per vCPU: remote faults it waited for.
    pub vcpu_faults: Vec<u64>,
    /// Time every vCPU was blocked at once, ns (QEMU's `postcopy-blocktime`).
    pub all_blocked_ns: u64,
    /// Remote faults resolved (each faulted page counts once).
    pub faults: u64,
    /// Their summed latency, ns.
    pub latency_ns: u64,
    /// Their latency distribution (see [`LATENCY_BUCKETS`]).
    pub latency_buckets: [u64; LATENCY_BUCKETS],
}

/// The bucket of a latency of `ns` nanoseconds.
pub fn latency_bucket(ns: u64) -> usize {
    let us = ns / 1000;
    let index = if us == 0 { 0 } else { (u64::BITS - 1 - us.leading_zeros()) as usize };
    index.min(LATENCY_BUCKETS - 1)
}

/// The accounts of one incoming migration (shared by the driver, which
/// records, and the VMM, which reads).
#[derive(Debug, Default)]
pub struct Blocktime {
    accounts: Mutex<Accounts>,
}

impl Blocktime {
    /// Empty accounts (no vCPU until [`Blocktime::set_vcpus`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// The guest has `vcpus` vCPUs (known once they start).
    pub fn set_vcpus(&self, vcpus: usize) {
        let mut a = lock(&self.accounts);
        if a.vcpus.len() < vcpus {
            a.vcpus.resize(vcpus, VcpuAccount::default());
        }
    }

    /// vCPU `vcpu` faulted on `page` (read at `at_ns`) and waits for it.
    /// A vCPU already blocked on that page keeps its first start.
    pub fn blocked(&self, vcpu: usize, page: u64, at_ns: u64) {
        let mut a = lock(&self.accounts);
        let Some(account) = a.vcpus.get_mut(vcpu) else { return };
        match account.blocked_on {
            Some((p, _)) if p == page => return,
            // A vCPU blocks on one page at a time: its earlier wait ended
            // unseen (a wake the driver did not hear of). Close it now.
            Some((_, since)) => account.blocked_ns += at_ns.saturating_sub(since),
            None => {}
        }
        let was_blocked = account.blocked_on.is_some();
        account.blocked_on = Some((page, at_ns));
        account.faults += 1;
        if !was_blocked {
            a.blocked += 1;
            if a.blocked == a.vcpus.len() {
                a.all_blocked_since = Some(at_ns);
            }
        }
    }

    /// `page` is in place at `at_ns` (or was present already: `waited_ns`
    /// None): the vCPUs blocked on it run again. `waited_ns` is the wait of
    /// the page's first fault, counted as one remote fault's latency.
    pub fn resolved(&self, page: u64, at_ns: u64, waited_ns: Option<u64>) {
        let mut a = lock(&self.accounts);
        if let Some(waited) = waited_ns {
            a.faults += 1;
            a.latency_ns += waited;
            a.buckets[latency_bucket(waited)] += 1;
        }
        let all_blocked = a.all_blocked_since;
        let mut unblocked = 0;
        for account in &mut a.vcpus {
            if let Some((p, since)) = account.blocked_on {
                if p == page {
                    account.blocked_on = None;
                    account.blocked_ns += at_ns.saturating_sub(since);
                    unblocked += 1;
                }
            }
        }
        if unblocked > 0 {
            a.blocked -= unblocked;
            if let Some(since) = all_blocked {
                a.all_blocked_ns += at_ns.saturating_sub(since);
                a.all_blocked_since = None;
            }
        }
    }

    /// The figures at `now_ns` (waits still under way count up to now).
    pub fn figures(&self, now_ns: u64) -> BlocktimeFigures {
        let a = lock(&self.accounts);
        let ongoing = |since: u64| now_ns.saturating_sub(since);
        BlocktimeFigures {
            vcpu_blocked_ns: a
                .vcpus
                .iter()
                .map(|v| v.blocked_ns + v.blocked_on.map_or(0, |(_, since)| ongoing(since)))
                .collect(),
            vcpu_faults: a.vcpus.iter().map(|v| v.faults).collect(),
            all_blocked_ns: a.all_blocked_ns + a.all_blocked_since.map_or(0, ongoing),
            faults: a.faults,
            latency_ns: a.latency_ns,
            latency_buckets: a.buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_microseconds_as_qemu_counts_them() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(999), 0, "under 1 us");
        assert_eq!(latency_bucket(1_999), 0, "[1, 2) us");
        assert_eq!(latency_bucket(2_000), 1);
        assert_eq!(latency_bucket(256_000), 8, "the 8th bucket is [256, 512) us");
        assert_eq!(latency_bucket(511_999), 8);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1, "the last bucket takes the rest");
    }

    #[test]
    fn vcpu_blocktime_and_all_blocked_time_add_up() {
        let b = Blocktime::new();
        b.set_vcpus(2);
        // vCPU 0 waits for page 7 from 100 to 400; vCPU 1 for page 9 from
        // 200 to 300: both blocked from 200 to 300.
        b.blocked(0, 7, 100);
        b.blocked(0, 7, 150); // the same wait read again
        b.blocked(1, 9, 200);
        b.resolved(9, 300, Some(100_000));
        b.resolved(7, 400, Some(2_500_000));
        // A wake of a page that was present: vCPU 1 waited 10 ns, no
        // remote fault.
        b.blocked(1, 3, 500);
        b.resolved(3, 510, None);
        let f = b.figures(1_000);
        assert_eq!(f.vcpu_blocked_ns, [300, 110]);
        assert_eq!(f.vcpu_faults, [1, 2]);
        assert_eq!(f.all_blocked_ns, 100);
        assert_eq!(f.faults, 2);
        assert_eq!(f.latency_ns, 2_600_000);
        assert_eq!(f.latency_buckets.iter().sum::<u64>(), 2);
        assert_eq!((f.latency_buckets[6], f.latency_buckets[11]), (1, 1), "100 us and 2.5 ms");
        // A wait still under way counts up to now.
        b.blocked(0, 8, 2_000);
        assert_eq!(b.figures(2_500).vcpu_blocked_ns[0], 800);
        // An unknown vCPU is ignored.
        b.blocked(5, 1, 3_000);
        assert_eq!(b.figures(3_000).vcpu_faults.len(), 2);
    }
}
