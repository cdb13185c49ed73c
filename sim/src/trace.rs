//! The event trace: a hash of everything that happened (two runs of one
//! seed must give the same hash) and the last records, printed when a seed
//! fails. Records are small and `Copy`; text is made only when printed.

use std::collections::VecDeque;

/// What a trace record says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Event(&'static str),
    SourceAction(&'static str),
    DestAction(&'static str),
    SourceState(postcopy_core::SourceState),
    DestState(postcopy_core::DestinationState),
    Fault(&'static str),
    Note(&'static str),
}

/// One record: when, what, and two numbers whose meaning depends on `what`
/// (a channel, a connection, a page, a byte count).
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub at_ns: u64,
    pub what: What,
    pub a: u64,
    pub b: u64,
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.at_ns as f64 / 1e6;
        match self.what {
            What::Event(name) => write!(f, "{ms:12.6} ms  event   {name} {} {}", self.a, self.b),
            What::SourceAction(name) => write!(f, "{ms:12.6} ms  src     {name} {} {}", self.a, self.b),
            What::DestAction(name) => write!(f, "{ms:12.6} ms  dst     {name} {} {}", self.a, self.b),
            What::SourceState(state) => write!(f, "{ms:12.6} ms  src  -> {state}"),
            What::DestState(state) => write!(f, "{ms:12.6} ms  dst  -> {state}"),
            What::Fault(name) => write!(f, "{ms:12.6} ms  FAULT   {name} {} {}", self.a, self.b),
            What::Note(name) => write!(f, "{ms:12.6} ms  note    {name} {} {}", self.a, self.b),
        }
    }
}

/// The running hash and the tail.
#[derive(Clone, Debug)]
pub struct Trace {
    hash: u64,
    tail: VecDeque<Record>,
    keep: usize,
    pub records: u64,
}

fn fold(hash: u64, x: u64) -> u64 {
    (hash ^ x).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29) ^ (x >> 17)
}

impl Trace {
    pub fn new(keep: usize) -> Self {
        Self { hash: 0xcbf2_9ce4_8422_2325, tail: VecDeque::with_capacity(keep), keep, records: 0 }
    }

    pub fn record(&mut self, at_ns: u64, what: What, a: u64, b: u64) {
        let tag = match what {
            What::Event(s) | What::SourceAction(s) | What::DestAction(s) | What::Fault(s) | What::Note(s) => {
                s.bytes().fold(s.len() as u64, |h, c| h.wrapping_mul(31).wrapping_add(u64::from(c)))
            }
            What::SourceState(state) => 1000 + state as u64,
            What::DestState(state) => 2000 + state as u64,
        };
        self.hash = fold(fold(fold(fold(self.hash, at_ns), tag), a), b);
        self.records += 1;
        if self.keep > 0 {
            if self.tail.len() == self.keep {
                self.tail.pop_front();
            }
            self.tail.push_back(Record { at_ns, what, a, b });
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn tail(&self) -> Vec<String> {
        self.tail.iter().map(ToString::to_string).collect()
    }
}
