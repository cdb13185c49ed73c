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
use crate::wire::{PageData, MAX_DEVICE_STATE_CHUNK};

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
    /// The digest `CheckpointEnd` carries (the destination folds it frame
    /// by frame as it sends them; this is the same in one go).
    pub fn digest(&self) -> u64 {
        let mut digest = Digest::new(self.seq);
        for (page, data) in &self.pages {
            digest.page(*page, data);
        }
        for chunk in self.device_state.chunks(MAX_DEVICE_STATE_CHUNK) {
            digest.device(chunk);
        }
        digest.finish()
    }
}

/// A checkpoint's digest over its sequence number, pages (number and bytes,
/// a zero page as a marker) and device state, in the order they cross: the
/// source computes it as the frames arrive and compares. Each page and
/// device-state chunk is hashed whole with XXH3 (a checkpoint may carry the
/// whole RAM: a byte-at-a-time hash cost 0.3 s per 250 MB on each side),
/// and the pieces' hashes are folded in order, so both sides must cut the
/// device state into the same chunks (its frames).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(u64);

impl Digest {
    pub fn new(seq: u64) -> Self {
        let mut digest = Digest(0xcbf2_9ce4_8422_2325);
        digest.word(seq);
        digest
    }

    /// Folds one word in (splitmix64's finaliser over the xor: order and
    /// every bit of each word count).
    fn word(&mut self, word: u64) {
        let mut x = (self.0 ^ word).wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.0 = x ^ (x >> 31);
    }

    /// Folds in a piece of bytes: its length and its XXH3 hash.
    fn bytes(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        self.word(xxhash_rust::xxh3::xxh3_64(bytes));
    }

    pub fn page(&mut self, page: PageNumber, data: &PageData) {
        self.word(page.0);
        match data {
            PageData::Zero => self.word(0),
            PageData::Bytes(bytes) => {
                self.word(1);
                self.bytes(bytes);
            }
        }
    }

    /// One device-state chunk, as one `CheckpointDevice` frame carries it.
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
        let mut zero = base.clone();
        zero.pages[0].1 = PageData::Zero;
        // The same bytes cut differently between the pages.
        let mut shifted = base.clone();
        shifted.pages[0].1 = PageData::Bytes(Bytes::from(vec![7; 15]));
        shifted.pages[1].1 = PageData::Bytes(Bytes::from([vec![7], vec![9; 16]].concat()));
        for other in [missing, changed, device, seq, zero, shifted] {
            assert_ne!(base.digest(), other.digest());
        }
    }
}
