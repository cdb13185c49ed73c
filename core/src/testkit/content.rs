//! Page content encodes `(page, version)`: version 0 is an all-zero page,
//! any other version fills the page with a pattern derived from both, so a
//! page installed at the wrong place or with an old version is caught.

use crate::layout::PageNumber;

/// Writes the content of `page` at `version` into `out`.
pub fn fill_page(out: &mut [u8], page: PageNumber, version: u64) {
    if version == 0 {
        out.fill(0);
        return;
    }
    let mut word = version ^ page.0.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let value = if i == 0 { version } else { word };
        chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
        word = word.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(page.0 | 1);
    }
}

/// The version a page's content encodes, or `None` if the bytes are not a
/// valid content of `page` at any version (corrupt or misplaced).
pub fn page_version(bytes: &[u8], page: PageNumber) -> Option<u64> {
    if bytes.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let mut first = [0u8; 8];
    let n = bytes.len().min(8);
    first[..n].copy_from_slice(&bytes[..n]);
    let version = u64::from_le_bytes(first);
    if version == 0 {
        return None;
    }
    let mut expected = vec![0; bytes.len()];
    fill_page(&mut expected, page, version);
    (expected == bytes).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_round_trips_and_detects_misplacement() {
        let mut buf = vec![0u8; 64];
        fill_page(&mut buf, PageNumber(7), 42);
        assert_eq!(page_version(&buf, PageNumber(7)), Some(42));
        assert_eq!(page_version(&buf, PageNumber(8)), None);
        buf[20] ^= 1;
        assert_eq!(page_version(&buf, PageNumber(7)), None);
        fill_page(&mut buf, PageNumber(7), 0);
        assert_eq!(page_version(&buf, PageNumber(7)), Some(0));
    }
}
