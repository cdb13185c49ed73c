//! How fuzz inputs are read from bytes, and the exact inverse used to write
//! the seed corpus.
//!
//! Every input type implements [`Arbitrary`](arbitrary::Arbitrary) by hand on
//! top of the few primitives here: a byte, a big-endian integer, a
//! length-capped byte string, a "number" that is either a small offset from a
//! value the target finds plausible or any raw value, and a loop "while bytes
//! remain". Each primitive reads a fixed, documented number of bytes, pads
//! with zeros when the input ends (as `Unstructured::fill_buffer` does), and
//! has a writer in [`Out`]. So a seed written with [`Out`] decodes to exactly
//! the input it was built from, whatever version of `arbitrary` is locked,
//! and a mutated seed still decodes to something close to it.

use arbitrary::Unstructured;

/// Reads primitives from an [`Unstructured`]; never fails, pads with zeros.
pub struct In<'a, 'b> {
    u: &'b mut Unstructured<'a>,
}

impl<'a, 'b> In<'a, 'b> {
    pub fn new(u: &'b mut Unstructured<'a>) -> Self {
        Self { u }
    }

    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }

    fn fill<const N: usize>(&mut self) -> [u8; N] {
        let mut buf = [0; N];
        // Pads with zeros when the input is exhausted; never fails.
        let _ = self.u.fill_buffer(&mut buf);
        buf
    }

    pub fn u8(&mut self) -> u8 {
        self.fill::<1>()[0]
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.fill())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.fill())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.fill())
    }

    /// A length byte (capped at `max`), then that many bytes (fewer if the
    /// input ends).
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.u8() as usize).min(max);
        let len = len.min(self.u.len());
        self.u.bytes(len).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// A length (u16, capped at `max`), then that many bytes.
    pub fn long_bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.u16() as usize).min(max);
        let len = len.min(self.u.len());
        self.u.bytes(len).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// Every remaining byte.
    pub fn rest(&mut self) -> Vec<u8> {
        let len = self.u.len();
        self.u.bytes(len).map(<[u8]>::to_vec).unwrap_or_default()
    }

    pub fn num(&mut self) -> Num {
        let tag = self.u8();
        if tag & 1 == 0 {
            Num::Near(tag >> 1)
        } else {
            Num::Raw(self.u64())
        }
    }

    /// A list of at most `max` items: a count byte, then the items.
    pub fn list<T>(&mut self, max: usize, mut item: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let count = (self.u8() as usize).min(max);
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            if self.is_empty() {
                break;
            }
            items.push(item(self));
        }
        items
    }
}

/// Writes what [`In`] reads, for building seeds.
#[derive(Clone, Debug, Default)]
pub struct Out(pub Vec<u8>);

impl Out {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u8::try_from(v.len()).expect("short byte strings only");
        self.u8(len);
        self.0.extend_from_slice(v);
        self
    }

    pub fn long_bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u16::try_from(v.len()).expect("byte strings under 64 KiB only");
        self.u16(len);
        self.0.extend_from_slice(v);
        self
    }

    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }

    pub fn num(&mut self, v: Num) -> &mut Self {
        match v {
            Num::Near(k) => self.u8(k.checked_mul(2).expect("Near offsets are below 128")),
            Num::Raw(x) => self.u8(1).u64(x),
        }
    }

    pub fn list<T>(&mut self, items: &[T], mut item: impl FnMut(&mut Self, &T)) -> &mut Self {
        let count = u8::try_from(items.len()).expect("short lists only");
        self.u8(count);
        for i in items {
            item(self, i);
        }
        self
    }
}

/// A number as the fuzzer chooses it: close to what the target would find
/// plausible (so that structured frames get past the first checks), or any
/// value at all (so that every bound is tried).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Num {
    /// The `k`-th plausible value; what that is depends on the field.
    Near(u8),
    Raw(u64),
}

impl Num {
    /// `base + k` for `Near(k)`, the raw value otherwise.
    pub fn offset_from(self, base: u64) -> u64 {
        match self {
            Num::Near(k) => base.wrapping_add(u64::from(k)),
            Num::Raw(x) => x,
        }
    }

    /// `k mod modulus` (a valid index) for `Near(k)`, the raw value otherwise.
    pub fn index_below(self, modulus: u64) -> u64 {
        match self {
            Num::Near(k) => u64::from(k) % modulus.max(1),
            Num::Raw(x) => x,
        }
    }

    pub fn as_u32(self, f: impl FnOnce(Num) -> u64) -> u32 {
        f(self) as u32
    }
}

/// The channel an input byte `ch` names: `order[ch % 3]`, except that a
/// byte from 0xf0 up names push stream `1 + ch % 3` (so that inputs written
/// before push streams keep their meaning).
pub fn pick_channel(order: &[postcopy_core::Channel; 3], ch: u8) -> postcopy_core::Channel {
    if ch >= 0xf0 {
        postcopy_core::Channel::Push(postcopy_core::PushStream::new(1 + ch % 3).unwrap_or_else(|| unreachable!()))
    } else {
        order[ch as usize % 3]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_is_the_inverse_of_in() {
        let mut out = Out::default();
        out.u8(7).bool(true).u16(0xbeef).u32(0xdead_beef).u64(u64::MAX - 3).bytes(b"abc").long_bytes(&[9; 300]);
        out.num(Num::Near(5)).num(Num::Raw(1 << 40)).list(&[1u8, 2, 3], |o, &x| {
            o.u8(x);
        });
        out.raw(b"tail");
        let data = out.0;
        let mut u = Unstructured::new(&data);
        let mut r = In::new(&mut u);
        assert_eq!(r.u8(), 7);
        assert!(r.bool());
        assert_eq!(r.u16(), 0xbeef);
        assert_eq!(r.u32(), 0xdead_beef);
        assert_eq!(r.u64(), u64::MAX - 3);
        assert_eq!(r.bytes(255), b"abc");
        assert_eq!(r.long_bytes(1000), vec![9; 300]);
        assert_eq!(r.num(), Num::Near(5));
        assert_eq!(r.num(), Num::Raw(1 << 40));
        assert_eq!(r.list(10, |r| r.u8()), vec![1, 2, 3]);
        assert_eq!(r.rest(), b"tail");
        assert!(r.is_empty());
        assert_eq!(r.u32(), 0, "reads past the end are zero");
    }
}
