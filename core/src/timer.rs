//! Every deadline of one side in one table, after quinn-proto's
//! `TimerTable`: `poll_timeout` is the earliest armed timer, and
//! `handle_timeout` acts on the first one that expired.

use crate::time::Timestamp;

/// Declares [`Timer`] and its list: adding a timer is one line here.
macro_rules! timers {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// A deadline one side may arm. When several expired at once, the
        /// first in this order is handled first.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub(crate) enum Timer {
            $($(#[$doc])* $name,)*
        }

        impl Timer {
            const ALL: &'static [Timer] = &[$(Timer::$name,)*];
        }
    };
}

timers! {
    /// The channels must be up and the handshake (or a recovery) done by then.
    Handshake,
    /// Source: the next reconnection attempt.
    Retry,
    /// Destination, paused before the source may have started the guest:
    /// drop the guest if no recovery came by then.
    Start,
    /// Nothing received from the peer for the peer timeout.
    PeerTimeout,
    /// Nothing written to the peer for the keep-alive interval: send a ping.
    Keepalive,
    /// Source, fallback: nothing heard from the destination for the
    /// takeover wait: take the guest back.
    Takeover,
    /// Destination, fallback: the lease lapses: stop the vCPUs.
    Lease,
    /// Destination, fallback: ask for the lease to be renewed.
    Renew,
    /// Destination, fallback: take the next checkpoint.
    Checkpoint,
}

/// When each timer expires, if armed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct TimerTable {
    deadlines: [Option<Timestamp>; Timer::ALL.len()],
}

impl TimerTable {
    pub fn set(&mut self, timer: Timer, deadline: Timestamp) {
        self.deadlines[timer as usize] = Some(deadline);
    }

    pub fn stop(&mut self, timer: Timer) {
        self.deadlines[timer as usize] = None;
    }

    pub fn stop_all(&mut self) {
        *self = TimerTable::default();
    }

    pub fn is_armed(&self, timer: Timer) -> bool {
        self.deadlines[timer as usize].is_some()
    }

    /// The earliest armed deadline.
    pub fn next(&self) -> Option<Timestamp> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Disarms and returns the first timer (in [`Timer`] order) that expired at `now`.
    pub fn take_expired(&mut self, now: Timestamp) -> Option<Timer> {
        let timer = *Timer::ALL.iter().find(|&&t| self.deadlines[t as usize].is_some_and(|d| d <= now))?;
        self.stop(timer);
        Some(timer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_the_earliest_armed_deadline() {
        let mut timers = TimerTable::default();
        assert_eq!(timers.next(), None);
        timers.set(Timer::Keepalive, Timestamp(30));
        timers.set(Timer::Retry, Timestamp(20));
        assert_eq!(timers.next(), Some(Timestamp(20)));
        timers.stop(Timer::Retry);
        assert_eq!(timers.next(), Some(Timestamp(30)));
    }

    #[test]
    fn expired_timers_come_out_in_table_order_and_disarmed() {
        let mut timers = TimerTable::default();
        timers.set(Timer::Keepalive, Timestamp(5));
        timers.set(Timer::Handshake, Timestamp(10));
        timers.set(Timer::Start, Timestamp(11));
        assert_eq!(timers.take_expired(Timestamp(4)), None);
        assert_eq!(timers.take_expired(Timestamp(10)), Some(Timer::Handshake));
        assert_eq!(timers.take_expired(Timestamp(10)), Some(Timer::Keepalive));
        assert_eq!(timers.take_expired(Timestamp(10)), None);
        assert!(timers.is_armed(Timer::Start));
    }
}
