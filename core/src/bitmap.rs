//! Per-page state in bitmaps: one bit per page, no per-page heap objects.
//!
//! [`Bitmap`] is a flat bitset with a population count. [`SearchBitmap`] adds
//! summary levels (a bit per full word below it) so that "the next clear bit
//! at or after `i`" costs O(log64 n) words instead of a scan: the background
//! push asks that question once per page it sends.

use std::fmt;

const WORD_BITS: u64 = 64;

fn word_count(bits: u64) -> usize {
    bits.div_ceil(WORD_BITS) as usize
}

/// A fixed-length bitset that keeps its number of set bits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len <= 128 {
            let bits: String = (0..self.len).map(|i| if self.get(i) { '1' } else { '0' }).collect();
            write!(f, "Bitmap({bits})")
        } else {
            write!(f, "Bitmap({} of {} set)", self.ones, self.len)
        }
    }
}

impl Bitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: u64) -> Self {
        Self { words: vec![0; word_count(len)], len, ones: 0 }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    /// Bit `i`; bits past the end read as clear.
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / WORD_BITS) as usize] & (1 << (i % WORD_BITS)) != 0
    }

    /// Sets bit `i`; returns whether it was clear before. `i` must be in range.
    pub fn set(&mut self, i: u64) -> bool {
        debug_assert!(i < self.len, "bit {i} out of range {}", self.len);
        let word = &mut self.words[(i / WORD_BITS) as usize];
        let mask = 1 << (i % WORD_BITS);
        let was_clear = *word & mask == 0;
        *word |= mask;
        // A branch, not `ones += u64::from(was_clear)`: rustc 1.95 (and
        // nightly 1.97) miscompile that form in release builds when the call
        // sits in a loop (see the `counts_survive_release_optimisation` test).
        if was_clear {
            self.ones += 1;
        }
        was_clear
    }

    /// Clears bit `i`; returns whether it was set before. `i` must be in range.
    pub fn clear(&mut self, i: u64) -> bool {
        debug_assert!(i < self.len, "bit {i} out of range {}", self.len);
        let word = &mut self.words[(i / WORD_BITS) as usize];
        let mask = 1 << (i % WORD_BITS);
        let was_set = *word & mask != 0;
        *word &= !mask;
        // A branch on purpose: see `set`.
        if was_set {
            self.ones -= 1;
        }
        was_set
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
        self.ones = 0;
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut w = (from / WORD_BITS) as usize;
        let mut bits = self.words[w] & (!0u64 << (from % WORD_BITS));
        loop {
            if bits != 0 {
                let i = w as u64 * WORD_BITS + u64::from(bits.trailing_zeros());
                return (i < self.len).then_some(i);
            }
            w += 1;
            bits = *self.words.get(w)?;
        }
    }

    /// The 64-bit word holding bits `64 * index ..`; bits past the end are 0.
    pub fn word(&self, index: usize) -> u64 {
        self.words.get(index).copied().unwrap_or(0)
    }

    pub fn word_len(&self) -> usize {
        self.words.len()
    }

    /// Bytes of heap this bitmap holds.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
    }
}

/// A bitset that finds the next clear bit quickly, via summary levels.
///
/// Level 0 holds the bits. In level `k + 1`, bit `j` is set when word `j` of
/// level `k` is full. Padding bits past the end are kept set, so "full" needs
/// no special case and a clear bit found is always in range.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SearchBitmap {
    levels: Vec<Vec<u64>>,
    len: u64,
    ones: u64,
}

impl fmt::Debug for SearchBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len <= 128 {
            let bits: String = (0..self.len).map(|i| if self.get(i) { '1' } else { '0' }).collect();
            write!(f, "SearchBitmap({bits})")
        } else {
            write!(f, "SearchBitmap({} of {} set)", self.ones, self.len)
        }
    }
}

/// A word with the bits at and past `used` set (padding), the rest clear.
fn padding_word(used: u64) -> u64 {
    if used % WORD_BITS == 0 {
        0
    } else {
        !0u64 << (used % WORD_BITS)
    }
}

impl SearchBitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: u64) -> Self {
        let mut levels = Vec::new();
        let mut bits = len;
        loop {
            let mut words = vec![0u64; word_count(bits).max(1)];
            if let Some(last) = words.last_mut() {
                *last = if bits == 0 { !0 } else { padding_word(bits) };
            }
            let n = words.len() as u64;
            levels.push(words);
            if n == 1 {
                break;
            }
            bits = n;
        }
        let mut bitmap = Self { levels, len, ones: 0 };
        // A last word made only of padding is already full: tell the levels above.
        bitmap.propagate_full(0, (bitmap.levels[0].len() - 1) as u64);
        bitmap
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn count_ones(&self) -> u64 {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.levels[0][(i / WORD_BITS) as usize] & (1 << (i % WORD_BITS)) != 0
    }

    /// Sets bit `i`; returns whether it was clear before.
    pub fn set(&mut self, i: u64) -> bool {
        debug_assert!(i < self.len, "bit {i} out of range {}", self.len);
        let w = (i / WORD_BITS) as usize;
        let mask = 1 << (i % WORD_BITS);
        let word = &mut self.levels[0][w];
        if *word & mask != 0 {
            return false;
        }
        *word |= mask;
        self.ones += 1;
        self.propagate_full(0, w as u64);
        true
    }

    /// Marks word `w` of `level` full in the levels above, if it is full.
    fn propagate_full(&mut self, mut level: usize, mut w: u64) {
        while level + 1 < self.levels.len() && self.levels[level][w as usize] == !0 {
            let parent = &mut self.levels[level + 1][(w / WORD_BITS) as usize];
            *parent |= 1 << (w % WORD_BITS);
            level += 1;
            w /= WORD_BITS;
        }
    }

    /// Clears bit `i`; returns whether it was set before.
    pub fn clear(&mut self, i: u64) -> bool {
        debug_assert!(i < self.len, "bit {i} out of range {}", self.len);
        let mut w = i / WORD_BITS;
        let mut mask = 1u64 << (i % WORD_BITS);
        if self.levels[0][w as usize] & mask == 0 {
            return false;
        }
        self.ones -= 1;
        for level in 0..self.levels.len() {
            let word = &mut self.levels[level][w as usize];
            let was_full = *word == !0;
            *word &= !mask;
            if !was_full {
                break;
            }
            mask = 1 << (w % WORD_BITS);
            w /= WORD_BITS;
        }
        true
    }

    /// The first clear bit at or after `from`.
    pub fn next_clear(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        self.next_clear_in_level(0, from)
    }

    /// The first clear bit at or after `from`, wrapping to the start.
    pub fn next_clear_wrapping(&self, from: u64) -> Option<u64> {
        self.next_clear(from).or_else(|| self.next_clear(0))
    }

    fn next_clear_in_level(&self, level: usize, from: u64) -> Option<u64> {
        let words = &self.levels[level];
        let w = (from / WORD_BITS) as usize;
        let current = *words.get(w)?;
        let free = !current & (!0u64 << (from % WORD_BITS));
        if free != 0 {
            return Some(w as u64 * WORD_BITS + u64::from(free.trailing_zeros()));
        }
        if level + 1 == self.levels.len() {
            return None;
        }
        // The next word of this level that is not full.
        let next = self.next_clear_in_level(level + 1, w as u64 + 1)? as usize;
        let free = !words[next];
        Some(next as u64 * WORD_BITS + u64::from(free.trailing_zeros()))
    }

    /// The 64-bit word holding bits `64 * index ..`, padding bits cleared.
    pub fn word(&self, index: usize) -> u64 {
        let Some(&word) = self.levels[0].get(index) else {
            return 0;
        };
        let last = self.levels[0].len() - 1;
        if index == last {
            word & !padding_word(self.len)
        } else {
            word
        }
    }

    pub fn word_len(&self) -> usize {
        word_count(self.len)
    }

    pub fn heap_bytes(&self) -> usize {
        self.levels.iter().map(|l| l.capacity() * std::mem::size_of::<u64>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bitmap_counts_and_finds() {
        let mut b = Bitmap::new(130);
        assert!(b.set(3));
        assert!(!b.set(3));
        assert!(b.set(129));
        assert_eq!(b.count_ones(), 2);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(129));
        assert_eq!(b.next_set(130), None);
        assert!(b.clear(3));
        assert!(!b.clear(3));
        assert_eq!(b.next_set(0), Some(129));
        assert!(!b.get(500));
    }

    /// `ones -= u64::from(was_set)` after a set, with the clear in a loop,
    /// left `ones` at 1 in release builds of rustc 1.95: a miscompilation.
    /// This is the shape in which the destination drops stale pages.
    #[test]
    fn counts_survive_release_optimisation() {
        let mut b = Bitmap::new(1);
        b.set(std::hint::black_box(0));
        let first = std::hint::black_box(0u64);
        let count = std::hint::black_box(1u32);
        let mut cleared = 0;
        for page in first..first + u64::from(count) {
            if b.clear(page) {
                cleared += 1;
            }
        }
        assert_eq!(cleared, 1);
        assert_eq!(b.count_ones(), 0);
        for page in first..first + u64::from(count) {
            b.set(page);
        }
        assert_eq!(b.count_ones(), 1);
    }

    #[test]
    fn search_bitmap_small_and_empty() {
        let empty = SearchBitmap::new(0);
        assert_eq!(empty.next_clear(0), None);
        let mut b = SearchBitmap::new(3);
        assert_eq!(b.next_clear(0), Some(0));
        b.set(0);
        b.set(1);
        assert_eq!(b.next_clear(0), Some(2));
        b.set(2);
        assert!(b.is_full());
        assert_eq!(b.next_clear(0), None);
        b.clear(1);
        assert_eq!(b.next_clear_wrapping(2), Some(1));
        assert_eq!(b.word(0), 0b101);
    }

    #[test]
    fn search_bitmap_crosses_levels() {
        let n = 64 * 64 * 3 + 5;
        let mut b = SearchBitmap::new(n);
        for i in 0..n {
            b.set(i);
        }
        assert!(b.is_full());
        assert_eq!(b.next_clear(0), None);
        b.clear(n - 1);
        assert_eq!(b.next_clear(0), Some(n - 1));
        b.clear(64 * 64 + 7);
        assert_eq!(b.next_clear(5), Some(64 * 64 + 7));
        assert_eq!(b.next_clear(64 * 64 + 8), Some(n - 1));
        b.set(n - 1);
        assert_eq!(b.next_clear_wrapping(64 * 64 + 8), Some(64 * 64 + 7));
    }

    proptest! {
        #[test]
        fn search_bitmap_matches_naive(len in 1u64..20_000, ops in prop::collection::vec((any::<bool>(), any::<u64>()), 0..400), probes in prop::collection::vec(any::<u64>(), 1..20)) {
            let mut fast = SearchBitmap::new(len);
            let mut naive = vec![false; len as usize];
            // Fill most of it so that searches have to climb the levels.
            for i in 0..len { if i % 97 != 0 { fast.set(i); naive[i as usize] = true; } }
            for (set, x) in ops {
                let i = x % len;
                if set {
                    prop_assert_eq!(fast.set(i), !naive[i as usize]);
                    naive[i as usize] = true;
                } else {
                    prop_assert_eq!(fast.clear(i), naive[i as usize]);
                    naive[i as usize] = false;
                }
            }
            prop_assert_eq!(fast.count_ones(), naive.iter().filter(|&&b| b).count() as u64);
            for p in probes {
                let from = p % len;
                let expected = (from..len).find(|&i| !naive[i as usize]);
                prop_assert_eq!(fast.next_clear(from), expected);
            }
        }
    }
}
