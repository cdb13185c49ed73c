//! The only source of randomness: a seeded PRNG (fastrand's wyrand), split
//! into independent streams so that drawing one thing never shifts another.

/// Streams of one seed. Each is its own generator.
pub mod stream {
    /// Drawing the scenario (options printed for replay).
    pub const SCENARIO: u64 = 1;
    /// Event tie-breaks, jitter, fault choices during the run.
    pub const WORLD: u64 = 2;
    /// Initial guest content.
    pub const CONTENT: u64 = 3;
    /// Strangers' times and bytes.
    pub const STRANGERS: u64 = 4;
    /// vCPU `i` uses `VCPU + i`: its access sequence depends on the seed and
    /// on nothing else, so `compare` gives each policy the same workload.
    pub const VCPU: u64 = 1 << 32;
}

/// splitmix64: turns (seed, stream) into well-spread generator seeds.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A seeded generator with the helpers the simulator needs.
#[derive(Clone, Debug)]
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64, stream: u64) -> Self {
        Rng(fastrand::Rng::with_seed(mix(seed ^ mix(stream))))
    }

    pub fn u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.0.u64(..n)
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            self.0.u64(lo..=hi)
        }
    }

    /// Uniform in `[0, 1)`.
    pub fn f64(&mut self) -> f64 {
        self.0.f64()
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.0.f64() < p
    }

    /// Log-uniform in `lo..=hi` (both at least 1): every decade equally likely.
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (lo, hi) = (lo.max(1) as f64, hi.max(lo).max(1) as f64);
        let x = (lo.ln() + self.0.f64() * (hi.ln() - lo.ln())).exp();
        (x.round() as u64).clamp(lo as u64, hi as u64)
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.0.usize(..items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, stream::WORLD).u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::new(7, stream::WORLD).u64(), Rng::new(7, stream::SCENARIO).u64());
        assert_ne!(Rng::new(7, stream::WORLD).u64(), Rng::new(8, stream::WORLD).u64());
        let mut r = Rng::new(1, 1);
        for _ in 0..1000 {
            let x = r.log_uniform(10, 1000);
            assert!((10..=1000).contains(&x));
            assert!(r.below(5) < 5);
        }
    }
}
