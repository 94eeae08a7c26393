//! Checking a WAL segment before it is archived or after it is fetched:
//! every page that holds WAL must carry the magic of a supported
//! PostgreSQL major and the address its position implies (a page of zeros
//! ends the WAL: the unwritten tail of a `.partial`), and every record must
//! pass its CRC-32C.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use crate::pg::{Lsn, SegmentNo, WalSegSize};
use crate::reader::ByteReader;
use crate::wal::decode::DecodeError;

/// What is wrong with a WAL segment; every variant says where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not the segment size.
    #[error("{len} bytes, expected {expected}")]
    WrongSize {
        /// Bytes found.
        len: u64,
        /// The segment size.
        expected: WalSegSize,
    },
    /// A segment number whose LSN does not fit 64 bits.
    #[error("segment number {segno:?} is out of range for {seg} segments")]
    SegmentOutOfRange {
        /// The segment.
        segno: SegmentNo,
        /// The segment size.
        seg: WalSegSize,
    },
    /// A piece that is not whole pages, or runs past the segment.
    #[error("{len} bytes at offset {offset} do not fit {seg} segment pages")]
    NotPages {
        /// Bytes in the piece.
        len: usize,
        /// Offset of the piece in the segment.
        offset: u64,
        /// The segment size.
        seg: WalSegSize,
    },
    /// The first page is zeros.
    #[error("no WAL at all: the first page at {at} is zeros")]
    NoWal {
        /// The first page.
        at: Lsn,
    },
    /// A page with an unknown magic.
    #[error("page at {at} has magic {magic:#06X}, not WAL of PostgreSQL 13-18")]
    BadMagic {
        /// The page.
        at: Lsn,
        /// xlp_magic.
        magic: u16,
    },
    /// A page whose xlp_pageaddr is not its position.
    #[error("page at {at} says it is at {says}: the file is misnamed or damaged")]
    Misplaced {
        /// Where the page is.
        at: Lsn,
        /// Its xlp_pageaddr.
        says: Lsn,
    },
    /// Non-zero bytes after a page of zeros.
    #[error("WAL resumes after a page of zeros at {at}")]
    ResumesAfterZeros {
        /// The first non-zero byte.
        at: Lsn,
    },
    /// A record fails to decode.
    #[error(transparent)]
    Record(#[from] DecodeError),
}

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
pub fn verify_segment(data: &[u8], segno: SegmentNo, seg: WalSegSize) -> Result<(), VerifyError> {
    verify_pages(data, segno, seg)?;
    records(data, segno, seg)
}

/// Check the page headers of segment `segno` only.
pub fn verify_pages(data: &[u8], segno: SegmentNo, seg: WalSegSize) -> Result<(), VerifyError> {
    if data.len() as u64 != seg.bytes() {
        return Err(VerifyError::WrongSize {
            len: data.len() as u64,
            expected: seg,
        });
    }
    let mut c = PageChecker::new(segno, seg)?;
    c.check(data)?;
    c.finish()
}

/// [`verify_pages`] on a segment that arrives in pieces of whole pages (as
/// it is read: the check overlaps with the reading).
pub struct PageChecker {
    base: Lsn,
    seg: WalSegSize,
    /// Bytes checked so far.
    checked: u64,
    /// Where the WAL ended (a page of zeros): everything after must be zeros.
    ended: bool,
}

impl PageChecker {
    /// A checker for segment `segno`.
    pub fn new(segno: SegmentNo, seg: WalSegSize) -> Result<PageChecker, VerifyError> {
        let base = segno
            .start_lsn(seg)
            .ok_or(VerifyError::SegmentOutOfRange { segno, seg })?;
        Ok(PageChecker {
            base,
            seg,
            checked: 0,
            ended: false,
        })
    }

    /// Check the next `data` (whole pages) of the segment.
    pub fn check(&mut self, data: &[u8]) -> Result<(), VerifyError> {
        if data.len() % WAL_PAGE != 0 || self.checked + data.len() as u64 > self.seg.bytes() {
            return Err(VerifyError::NotPages {
                len: data.len(),
                offset: self.checked,
                seg: self.seg,
            });
        }
        let first = Lsn::new(self.base.get() + self.checked);
        self.checked += data.len() as u64;
        if self.ended {
            return zeros_after_end(data, first);
        }
        for (i, page) in data.chunks_exact(WAL_PAGE).enumerate() {
            let at = Lsn::new(first.get() + (i * WAL_PAGE) as u64);
            // XLogPageHeaderData: xlp_magic, xlp_info, xlp_tli, xlp_pageaddr
            let mut r = ByteReader::new(page);
            let (magic, pageaddr) = match (r.u16_le(), r.skip(6), r.u64_le()) {
                (Ok(m), Ok(()), Ok(a)) => (m, a),
                // chunks_exact: every page is WAL_PAGE bytes
                _ => {
                    return Err(VerifyError::NotPages {
                        len: page.len(),
                        offset: at.get() - self.base.get(),
                        seg: self.seg,
                    })
                }
            };
            if magic == 0 && first_nonzero(page).is_none() {
                if at == self.base {
                    return Err(VerifyError::NoWal { at });
                }
                // the rest must be zeros too: WAL never resumes after a hole
                self.ended = true;
                let rest = data.get(i * WAL_PAGE..).unwrap_or_default();
                return zeros_after_end(rest, at);
            }
            if !KNOWN_PAGE_MAGICS.iter().any(|(m, _)| *m == magic) {
                return Err(VerifyError::BadMagic { at, magic });
            }
            if pageaddr != at.get() {
                return Err(VerifyError::Misplaced {
                    at,
                    says: Lsn::new(pageaddr),
                });
            }
        }
        Ok(())
    }

    /// Every page was checked.
    pub fn finish(&self) -> Result<(), VerifyError> {
        if self.checked != self.seg.bytes() {
            return Err(VerifyError::WrongSize {
                len: self.checked,
                expected: self.seg,
            });
        }
        Ok(())
    }
}

/// `data`, starting at `at`, lies after the end of the WAL: all zeros.
fn zeros_after_end(data: &[u8], at: Lsn) -> Result<(), VerifyError> {
    match first_nonzero(data) {
        Some(p) => Err(VerifyError::ResumesAfterZeros {
            at: Lsn::new(at.get() + p as u64),
        }),
        None => Ok(()),
    }
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
fn records(data: &[u8], segno: SegmentNo, seg: WalSegSize) -> Result<(), VerifyError> {
    Ok(crate::wal::summary::check_records(data, segno, seg)?)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pages_in_pieces_check_as_whole() {
        let seg = WalSegSize::new(1 << 20).unwrap();
        let segno = SegmentNo(3);
        let base = segno.start_lsn(seg).unwrap().get();
        // five pages of WAL, then the zeros of a switched segment
        let mut data = vec![0u8; 1 << 20];
        for i in 0..5 {
            let p = &mut data[i * WAL_PAGE..];
            p[..2].copy_from_slice(&0xD110u16.to_le_bytes());
            p[8..16].copy_from_slice(&(base + (i * WAL_PAGE) as u64).to_le_bytes());
        }
        let pieces = |d: &[u8], n: usize| {
            let mut c = PageChecker::new(segno, seg)?;
            for p in d.chunks(n) {
                c.check(p)?;
            }
            c.finish()
        };
        assert_eq!(verify_pages(&data, segno, seg), Ok(()));
        for n in [WAL_PAGE, 3 * WAL_PAGE, 1 << 20] {
            assert_eq!(pieces(&data, n), Ok(()), "{n}");
        }
        // WAL after the zeros, in a later piece than the first zero page
        let mut bad = data.clone();
        bad[700_001] = 1;
        let whole = verify_pages(&bad, segno, seg).unwrap_err();
        assert_eq!(
            whole,
            VerifyError::ResumesAfterZeros {
                at: Lsn::new(base + 700_001)
            }
        );
        for n in [WAL_PAGE, 3 * WAL_PAGE, 1 << 20] {
            assert_eq!(pieces(&bad, n), Err(whole.clone()), "{n}");
        }
        // a misaddressed page, a short segment, a piece that is not pages
        let mut moved = data.clone();
        moved[2 * WAL_PAGE + 8] ^= 1;
        assert!(matches!(
            pieces(&moved, WAL_PAGE).unwrap_err(),
            VerifyError::Misplaced { .. }
        ));
        assert!(pieces(&data[..1 << 19], WAL_PAGE).is_err());
        assert!(pieces(&data, 1000).is_err());
    }

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
