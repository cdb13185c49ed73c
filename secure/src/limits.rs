//! Bounds on connections in their handshake: how many at once (a slot
//! each, refused beyond the limit) and how long each may take (the
//! handshake's deadline, enforced with socket timeouts).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Refusal;

/// The limits a listener applies to connections before they authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Connections in their handshake at once; more are refused at once.
    pub max_in_handshake: usize,
    /// The longest a handshake may take, first byte to acceptance.
    pub timeout: Duration,
}

impl Default for HandshakeLimits {
    /// 16 at once (a migration needs 3, plus reconnections), 2 s each (a
    /// loopback handshake takes about a millisecond).
    fn default() -> Self {
        Self { max_in_handshake: 16, timeout: Duration::from_secs(2) }
    }
}

/// Counts the connections in their handshake against a limit.
#[derive(Debug)]
pub struct HandshakeGate {
    limits: HandshakeLimits,
    in_handshake: Arc<AtomicUsize>,
}

/// A connection's place among those in their handshake; freed on drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    in_handshake: Arc<AtomicUsize>,
    timeout: Duration,
}

impl HandshakeSlot {
    /// The time this handshake may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.in_handshake.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HandshakeGate {
    /// A gate with `limits`.
    pub fn new(limits: HandshakeLimits) -> Self {
        Self { limits, in_handshake: Arc::new(AtomicUsize::new(0)) }
    }

    /// Takes a slot, or refuses when `max_in_handshake` are taken.
    pub fn try_enter(&self) -> Result<HandshakeSlot, Refusal> {
        let max = self.limits.max_in_handshake;
        self.in_handshake
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| Refusal::TooManyHandshakes(max))?;
        Ok(HandshakeSlot { in_handshake: self.in_handshake.clone(), timeout: self.limits.timeout })
    }

    /// Connections in their handshake now.
    pub fn in_handshake(&self) -> usize {
        self.in_handshake.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_refuses_beyond_its_limit_and_frees_slots_on_drop() {
        let gate = HandshakeGate::new(HandshakeLimits { max_in_handshake: 2, timeout: Duration::from_millis(5) });
        let a = gate.try_enter().unwrap();
        let b = gate.try_enter().unwrap();
        assert_eq!(gate.in_handshake(), 2);
        assert!(matches!(gate.try_enter(), Err(Refusal::TooManyHandshakes(2))));
        drop(a);
        assert_eq!(gate.in_handshake(), 1);
        let c = gate.try_enter().unwrap();
        assert_eq!(c.timeout(), Duration::from_millis(5));
        drop((b, c));
        assert_eq!(gate.in_handshake(), 0);
    }

    #[test]
    fn gate_counts_exactly_under_contention() {
        let gate = Arc::new(HandshakeGate::new(HandshakeLimits { max_in_handshake: 3, timeout: Duration::ZERO }));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || {
                    let mut most = 0;
                    for _ in 0..2000 {
                        if let Ok(slot) = gate.try_enter() {
                            most = most.max(gate.in_handshake());
                            drop(slot);
                        }
                    }
                    most
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap() <= 3);
        }
        assert_eq!(gate.in_handshake(), 0);
    }
}
