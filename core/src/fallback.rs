//! Fallback: the guest survives the loss of the destination during
//! postcopy (docs/fallback.md). What both cores share: the settings, the
//! takeover wait, a checkpoint and its digest.
//!
//! The rules, in short:
//! - the destination runs the guest only while it holds a lease, counted
//!   from the moment it *sent* the request a grant answers (the grant
//!   echoes its sequence number); when the lease lapses it stops its vCPUs;
//! - the source takes the guest back only after `lease * (1 + drift) +
//!   margin` by its own clock without a frame from the destination,
//!   counted from the last frame it received: by then the destination's
//!   lease has lapsed, if the two clocks' rates differ by at most `drift`;
//! - the destination streams checkpoints (device state and the pages it
//!   dirtied since the previous one, taken at one instant); the source
//!   stages each and commits it only whole, so it restarts the guest from
//!   exactly the last committed one.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::layout::PageNumber;
use crate::wire::PageData;

/// Fallback settings of the source (the destination follows the source's
/// lease, announced in `FallbackTerms`, and takes checkpoints at its own
/// `checkpoint_interval`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct FallbackConfig {
    /// How long the destination may run the guest after sending a lease
    /// request the source granted.
    pub lease: Duration,
    /// Bound on how much the two hosts' monotonic clocks' rates may differ,
    /// in parts per million: while one measures `d`, the other measures at
    /// most `d * (1 + drift_ppm / 10^6)`. The one timing assumption.
    pub drift_ppm: u32,
    /// Added to the source's wait: the time the destination's driver may
    /// take to stop its vCPUs once the lease lapsed.
    pub takeover_margin: Duration,
    /// The destination takes a checkpoint this often.
    pub checkpoint_interval: Duration,
    /// The destination asks to renew its lease this many times per lease
    /// (at least 1; more survive more lost requests).
    pub renewals_per_lease: u32,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_millis(1000),
            // Crystal oscillators are specified within 100 ppm; ten times that.
            drift_ppm: 1000,
            takeover_margin: Duration::from_millis(20),
            checkpoint_interval: Duration::from_millis(100),
            renewals_per_lease: 4,
        }
    }
}

impl FallbackConfig {
    /// The source's wait after the last frame from the destination before
    /// it takes the guest back: `lease * (1 + drift) + margin`.
    pub fn takeover_wait(&self) -> Duration {
        let lease_ns = self.lease.as_nanos();
        let drifted = lease_ns + lease_ns * u128::from(self.drift_ppm) / 1_000_000;
        Duration::from_nanos(u64::try_from(drifted).unwrap_or(u64::MAX)).saturating_add(self.takeover_margin)
    }

    /// How often the destination asks to renew a lease of `lease`.
    pub fn renew_interval(&self, lease: Duration) -> Duration {
        (lease / self.renewals_per_lease.max(1)).max(Duration::from_millis(1))
    }
}

/// A checkpoint as the destination's driver took it: the device state and
/// every page the guest dirtied here since the previous checkpoint, all at
/// one instant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Checkpoint {
    pub seq: u64,
    pub device_state: Bytes,
    pub pages: Vec<(PageNumber, PageData)>,
}

impl Checkpoint {
    /// The digest `CheckpointEnd` carries.
    pub fn digest(&self) -> u64 {
        let mut digest = Digest::new(self.seq);
        for (page, data) in &self.pages {
            digest.page(*page, data);
        }
        digest.device(&self.device_state);
        digest.finish()
    }
}

/// FNV-1a over a checkpoint's sequence number, pages (number and bytes, a
/// zero page as a marker) and device state, in the order they cross: the
/// source computes it as the frames arrive and compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(u64);

impl Digest {
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new(seq: u64) -> Self {
        let mut digest = Digest(0xcbf2_9ce4_8422_2325);
        digest.bytes(&seq.to_be_bytes());
        digest
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(Self::PRIME);
        }
    }

    pub fn page(&mut self, page: PageNumber, data: &PageData) {
        self.bytes(&page.0.to_be_bytes());
        match data {
            PageData::Zero => self.bytes(&[0]),
            PageData::Bytes(bytes) => {
                self.bytes(&[1]);
                self.bytes(bytes);
            }
        }
    }

    pub fn device(&mut self, chunk: &[u8]) {
        self.bytes(chunk);
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_takeover_wait_covers_the_lease_at_the_worst_drift() {
        let config = FallbackConfig {
            lease: Duration::from_secs(1),
            drift_ppm: 1000,
            takeover_margin: Duration::from_millis(20),
            ..FallbackConfig::default()
        };
        assert_eq!(config.takeover_wait(), Duration::from_millis(1021));
    }

    #[test]
    fn the_digest_sees_every_page_and_byte() {
        let page = |n, b: u8| (PageNumber(n), PageData::Bytes(Bytes::from(vec![b; 16])));
        let base =
            Checkpoint { seq: 3, device_state: Bytes::from_static(b"regs"), pages: vec![page(1, 7), page(2, 9)] };
        let mut missing = base.clone();
        missing.pages.pop();
        let mut changed = base.clone();
        changed.pages[1] = page(2, 8);
        let mut device = base.clone();
        device.device_state = Bytes::from_static(b"regz");
        let mut seq = base.clone();
        seq.seq = 4;
        for other in [missing, changed, device, seq] {
            assert_ne!(base.digest(), other.digest());
        }
    }
}
