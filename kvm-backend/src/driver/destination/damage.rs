//! The test-only damage switch (`POSTCOPY_TEST_DAMAGE`): one page
//! installed wrong on purpose, to show that both integrity checks catch it.

use bytes::Bytes;
use postcopy_core::wire::PageData;

/// Test-only damage on the destination (`POSTCOPY_TEST_DAMAGE=drop:PAGE` or
/// `corrupt:PAGE`): the page is installed as zeros, or with one bit flipped,
/// to prove that the integrity checks fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// Install zeros instead of the page.
    Drop(u64),
    /// Flip one bit of the page's first word.
    Corrupt(u64),
}

/// Name of the environment variable that asks for [`Damage`].
pub const DAMAGE_ENV: &str = "POSTCOPY_TEST_DAMAGE";

/// A [`DAMAGE_ENV`] value that is not `drop:N` or `corrupt:N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DamageError {
    /// Not `KIND:PAGE` with a known kind.
    #[error("{DAMAGE_ENV}={value}: expected drop:N or corrupt:N")]
    Form {
        /// The value given.
        value: String,
    },
    /// The page is not a number.
    #[error("{DAMAGE_ENV}={value}: bad page number")]
    Page {
        /// The value given.
        value: String,
    },
}

impl Damage {
    /// Parses `drop:N` or `corrupt:N`.
    pub fn parse(s: &str) -> Result<Self, DamageError> {
        let (kind, page) = s.split_once(':').ok_or_else(|| DamageError::Form { value: s.into() })?;
        let page: u64 = page.parse().map_err(|_| DamageError::Page { value: s.into() })?;
        match kind {
            "drop" => Ok(Damage::Drop(page)),
            "corrupt" => Ok(Damage::Corrupt(page)),
            _ => Err(DamageError::Form { value: s.into() }),
        }
    }

    /// From the environment, if set.
    pub fn from_env() -> Result<Option<Self>, DamageError> {
        match std::env::var(DAMAGE_ENV) {
            Ok(v) if !v.is_empty() => Self::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    pub(super) fn page(self) -> u64 {
        match self {
            Damage::Drop(p) | Damage::Corrupt(p) => p,
        }
    }

    /// `data` as this damage changes it.
    /// `data` (a page of `page_bytes`) as this damage changes it.
    pub(super) fn apply(self, data: PageData, page_bytes: usize) -> PageData {
        match (self, data) {
            (Damage::Drop(_), _) => PageData::Zero,
            (Damage::Corrupt(_), PageData::Bytes(b)) => {
                let mut v = b.to_vec();
                v[0] ^= 0x10;
                PageData::Bytes(Bytes::from(v))
            }
            (Damage::Corrupt(_), PageData::Zero) => {
                let mut v = vec![0u8; page_bytes];
                v[0] ^= 0x10;
                PageData::Bytes(Bytes::from(v))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PAGE_SIZE;

    #[test]
    fn damage_switch_parses() {
        assert_eq!(Damage::parse("drop:300"), Ok(Damage::Drop(300)));
        assert_eq!(Damage::parse("corrupt:7"), Ok(Damage::Corrupt(7)));
        assert_eq!(Damage::parse("drop"), Err(DamageError::Form { value: "drop".into() }));
        assert_eq!(Damage::parse("flip:3"), Err(DamageError::Form { value: "flip:3".into() }));
        assert_eq!(Damage::parse("drop:x"), Err(DamageError::Page { value: "drop:x".into() }));
        assert_eq!(Damage::Corrupt(7).page(), 7);
    }

    #[test]
    fn damage_changes_the_page() {
        let page = Bytes::from(vec![0x55u8; PAGE_SIZE as usize]);
        let len = PAGE_SIZE as usize;
        assert_eq!(Damage::Drop(1).apply(PageData::Bytes(page.clone()), len), PageData::Zero);
        let PageData::Bytes(flipped) = Damage::Corrupt(1).apply(PageData::Bytes(page.clone()), len) else {
            panic!("a corrupted page keeps bytes")
        };
        assert_eq!(flipped[0], 0x45);
        assert_eq!(flipped[1..], page[1..]);
        let PageData::Bytes(from_zero) = Damage::Corrupt(1).apply(PageData::Zero, 2 << 20) else {
            panic!("a corrupted zero page gets bytes")
        };
        assert_eq!(from_zero[0], 0x10);
        assert_eq!(from_zero.len(), 2 << 20, "a zero huge page gets a huge page of bytes");
    }
}
