//! Checking a WAL segment before it is archived or after it is fetched:
//! every page that holds WAL must carry the magic of a supported
//! PostgreSQL major and the address its position implies (a page of zeros
//! ends the WAL: the unwritten tail of a `.partial`), and every record must
//! pass its CRC-32C.

use crate::pg::{Lsn, SegmentNo, WalSegSize};

/// XLOG_PAGE_MAGIC of PostgreSQL 13 to 18.
pub const KNOWN_PAGE_MAGICS: [(u16, u32); 6] = [
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// Page size of WAL (XLOG_BLCKSZ).
pub const WAL_PAGE: usize = 8192;

/// Check the page headers and every record of segment `segno` (`data` is
/// the whole segment).
pub fn verify_segment(data: &[u8], segno: SegmentNo, seg: WalSegSize) -> Result<(), String> {
    verify_pages(data, segno, seg)?;
    records(data, segno, seg)
}

/// Check the page headers of segment `segno` only.
pub fn verify_pages(data: &[u8], segno: SegmentNo, seg: WalSegSize) -> Result<(), String> {
    if data.len() as u64 != seg.bytes() {
        return Err(format!("{} bytes, expected {seg}", data.len()));
    }
    let base = segno
        .start_lsn(seg)
        .ok_or_else(|| "segment number out of range".to_owned())?;
    for (i, page) in data.chunks_exact(WAL_PAGE).enumerate() {
        let at = Lsn(base.0 + (i * WAL_PAGE) as u64);
        let magic = u16::from_le_bytes([page[0], page[1]]);
        if magic == 0 && first_nonzero(page).is_none() {
            if i == 0 {
                return Err(format!("no WAL at all: the first page at {at} is zeros"));
            }
            // the rest must be zeros too: WAL never resumes after a hole
            let rest = &data[i * WAL_PAGE..];
            if let Some(p) = first_nonzero(rest) {
                return Err(format!(
                    "WAL resumes after a page of zeros at {}",
                    Lsn(at.0 + p as u64)
                ));
            }
            return Ok(());
        }
        if !KNOWN_PAGE_MAGICS.iter().any(|(m, _)| *m == magic) {
            return Err(format!(
                "page at {at} has magic {magic:#06X}, not WAL of PostgreSQL 13-18"
            ));
        }
        let pageaddr = u64::from_le_bytes([
            page[8], page[9], page[10], page[11], page[12], page[13], page[14], page[15],
        ]);
        if pageaddr != at.0 {
            return Err(format!(
                "page at {at} says it is at {}: the file is misnamed or damaged",
                Lsn(pageaddr)
            ));
        }
    }
    Ok(())
}

/// Offset of the first byte that is not zero. A segment switched early is
/// mostly zeros and every archive call scans them: whole 4 KiB chunks are
/// OR-folded (vectorized), and only a chunk with a set bit is searched.
fn first_nonzero(data: &[u8]) -> Option<usize> {
    const CHUNK: usize = 4096;
    data.chunks(CHUNK).enumerate().find_map(|(i, c)| {
        if c.iter().fold(0u8, |a, &b| a | b) == 0 {
            None
        } else {
            c.iter().position(|&b| b != 0).map(|p| i * CHUNK + p)
        }
    })
}

/// Every record's CRC and structure.
fn records(data: &[u8], segno: SegmentNo, seg: WalSegSize) -> Result<(), String> {
    crate::wal::summary::check_records(data, segno, seg).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn first_nonzero_is_the_naive_search(len in 0usize..20_000, at in proptest::option::of(0usize..20_000), v in 1u8..) {
            let mut data = vec![0u8; len];
            if let Some(a) = at.filter(|&a| a < len) {
                data[a] = v;
            }
            prop_assert_eq!(first_nonzero(&data), data.iter().position(|&b| b != 0));
        }
    }
}
