//! WAL file names exactly as PostgreSQL writes them in `pg_wal/` and passes to
//! `archive_command` / `restore_command` (`xlog_internal.h`: `XLogFileName`,
//! `TLHistoryFileName`, `BackupHistoryFileName`, and the `.partial` suffix that
//! pg_receivewal and end-of-recovery use).
//!
//! A segment file name encodes the segment number split by the segment size, so
//! parsing and display both need the cluster's [`WalSegSize`].

use std::fmt;

use super::{Lsn, ParseError, SegmentNo, TimelineId, WalSegSize};

/// One WAL segment of one timeline: the 24 hex digits of a segment file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentFile {
    /// Timeline the segment belongs to.
    pub timeline: TimelineId,
    /// Segment number counted from LSN 0.
    pub segno: SegmentNo,
    /// Segment size of the cluster, needed to split `segno` in the name.
    pub seg_size: WalSegSize,
}

impl SegmentFile {
    /// LSN of the segment's first byte.
    pub fn start_lsn(&self) -> Lsn {
        // segno came from a name whose parts are bounded (32 + 32 bits minus the
        // segment-size bits), so the product always fits in 64 bits.
        Lsn::new(self.segno.0.wrapping_mul(self.seg_size.bytes()))
    }

    /// The segment after this one on the same timeline.
    pub fn next(&self) -> SegmentFile {
        SegmentFile {
            segno: self.segno.next(),
            ..*self
        }
    }

    fn parse24(s: &str, seg_size: WalSegSize, whole: &str) -> Result<SegmentFile, ParseError> {
        let bad = |why: &str| ParseError::new("WAL file name", whole, why);
        if s.len() != 24 || !is_upper_hex(s) {
            return Err(bad("a segment name is 24 upper-case hexadecimal digits"));
        }
        let part = |r: std::ops::Range<usize>| {
            u32::from_str_radix(&s[r], 16).map_err(|e| bad(&e.to_string()))
        };
        let tli = TimelineId::new(part(0..8)?).ok_or_else(|| bad("timeline 0 does not exist"))?;
        let log = u64::from(part(8..16)?);
        let seg = u64::from(part(16..24)?);
        let per_id = seg_size.segments_per_xlog_id();
        if seg >= per_id {
            return Err(bad(&format!(
                "segment part {seg:08X} is too large for {seg_size} segments (at most {:08X})",
                per_id - 1
            )));
        }
        Ok(SegmentFile {
            timeline: tli,
            segno: SegmentNo(log * per_id + seg),
            seg_size,
        })
    }
}

impl fmt::Display for SegmentFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_id = self.seg_size.segments_per_xlog_id();
        write!(
            f,
            "{:08X}{:08X}{:08X}",
            self.timeline.get(),
            self.segno.0 / per_id,
            self.segno.0 % per_id
        )
    }
}

/// Any file PostgreSQL archives or asks to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalFileName {
    /// A complete segment, `000000010000000000000003`.
    Segment(SegmentFile),
    /// A segment not yet complete, `000000010000000000000003.partial`.
    Partial(SegmentFile),
    /// A backup history file, `000000010000000000000003.00000028.backup`: the
    /// segment and the offset inside it where a base backup started.
    Backup {
        /// Segment holding the backup's start LSN.
        segment: SegmentFile,
        /// Byte offset of the start LSN inside that segment.
        offset: u32,
    },
    /// A timeline history file, `00000002.history`.
    History(TimelineId),
}

impl WalFileName {
    /// Parse a file name (no directory) for a cluster with segments of `seg_size`.
    pub fn parse(name: &str, seg_size: WalSegSize) -> Result<WalFileName, ParseError> {
        let bad = |why: &str| ParseError::new("WAL file name", name, why);
        if let Some(tli) = name.strip_suffix(".history") {
            if tli.len() != 8 || !is_upper_hex(tli) {
                return Err(bad(
                    "a history file name is 8 upper-case hex digits + .history",
                ));
            }
            let n = u32::from_str_radix(tli, 16).map_err(|e| bad(&e.to_string()))?;
            return TimelineId::new(n)
                .map(WalFileName::History)
                .ok_or_else(|| bad("timeline 0 does not exist"));
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            return SegmentFile::parse24(seg, seg_size, name).map(WalFileName::Partial);
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, off) = rest
                .split_once('.')
                .ok_or_else(|| bad("a backup history name is SEGMENT.OFFSET.backup"))?;
            let segment = SegmentFile::parse24(seg, seg_size, name)?;
            if off.len() != 8 || !is_upper_hex(off) {
                return Err(bad(
                    "the offset of a backup history name is 8 upper-case hex digits",
                ));
            }
            let offset = u32::from_str_radix(off, 16).map_err(|e| bad(&e.to_string()))?;
            if u64::from(offset) >= seg_size.bytes() {
                return Err(bad("the offset is past the end of the segment"));
            }
            return Ok(WalFileName::Backup { segment, offset });
        }
        SegmentFile::parse24(name, seg_size, name).map(WalFileName::Segment)
    }

    /// Parse a file name whose cluster's segment size is not known here
    /// (`%f` of `archive_command` / `restore_command` before the file is
    /// read): the segment size in the result is the first under which the
    /// name is valid, 16 MiB first, then 1 MiB up to 1 GiB. The name, its
    /// timeline and its object key are exact; segment arithmetic (LSNs,
    /// the next segment) is not: re-parse with the real size for that.
    pub fn parse_any_size(name: &str) -> Result<WalFileName, ParseError> {
        let first = match WalFileName::parse(name, WalSegSize::DEFAULT) {
            Ok(n) => return Ok(n),
            Err(e) => e,
        };
        (20..=30)
            .filter_map(|shift| WalSegSize::new(1 << shift).ok())
            .find_map(|seg| WalFileName::parse(name, seg).ok())
            .ok_or(first)
    }

    /// The segment file this name is about (`None` for a history file).
    pub fn segment_file(&self) -> Option<SegmentFile> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(*s),
            WalFileName::Backup { segment, .. } => Some(*segment),
            WalFileName::History(_) => None,
        }
    }

    /// The segment for the byte at `lsn` on timeline `tli`.
    pub fn segment_of(tli: TimelineId, lsn: Lsn, seg_size: WalSegSize) -> WalFileName {
        WalFileName::Segment(SegmentFile {
            timeline: tli,
            segno: lsn.segment(seg_size),
            seg_size,
        })
    }

    /// The timeline named in the file.
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => s.timeline,
            WalFileName::Backup { segment, .. } => segment.timeline,
            WalFileName::History(t) => *t,
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::Backup { segment, offset } => write!(f, "{segment}.{offset:08X}.backup"),
            WalFileName::History(t) => write!(f, "{:08X}.history", t.get()),
        }
    }
}

/// Serialized as the file name (text); read back with [`WalFileName::parse`].
impl serde::Serialize for WalFileName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn is_upper_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S16: WalSegSize = WalSegSize::DEFAULT;

    fn seg(tli: u32, segno: u64, size: WalSegSize) -> SegmentFile {
        SegmentFile {
            timeline: TimelineId::new(tli).unwrap(),
            segno: SegmentNo(segno),
            seg_size: size,
        }
    }

    #[test]
    fn names_postgres_writes() {
        let n = WalFileName::parse("000000010000000100000003", S16).unwrap();
        assert_eq!(n, WalFileName::Segment(seg(1, 0x103, S16)));
        let WalFileName::Segment(s) = n else {
            unreachable!()
        };
        assert_eq!(s.start_lsn().to_string(), "1/3000000");
        assert_eq!(
            WalFileName::parse("00000002.history", S16).unwrap(),
            WalFileName::History(TimelineId::new(2).unwrap())
        );
        assert_eq!(
            WalFileName::parse("000000010000000000000002.00000028.backup", S16).unwrap(),
            WalFileName::Backup {
                segment: seg(1, 2, S16),
                offset: 0x28
            }
        );
        assert_eq!(
            WalFileName::parse("0000000A00000000000000FF.partial", S16).unwrap(),
            WalFileName::Partial(seg(10, 0xFF, S16))
        );
        // 64 MiB segments: 64 per log id, so the third part stops at 0x3F.
        let s64 = WalSegSize::new(64 << 20).unwrap();
        assert_eq!(
            WalFileName::parse("00000001000000020000003F", s64).unwrap(),
            WalFileName::Segment(seg(1, 2 * 64 + 63, s64))
        );
        assert!(WalFileName::parse("000000010000000200000040", s64).is_err());
        assert_eq!(
            WalFileName::segment_of(TimelineId::FIRST, "2/FF000000".parse().unwrap(), s64)
                .to_string(),
            "00000001000000020000003F"
        );
    }

    #[test]
    fn names_of_unknown_segment_size_round_trip() {
        for name in [
            "000000010000000000000003",
            "0000000100000002000000FF.partial",
            "00000003.history",
            "000000010000000000000002.03000028.backup",
        ] {
            let n = WalFileName::parse_any_size(name).unwrap();
            assert_eq!(n.to_string(), name);
        }
        // valid only for 1 MiB segments (4096 per log id)
        let n = WalFileName::parse_any_size("000000010000000000000FFF").unwrap();
        assert_eq!(n.to_string(), "000000010000000000000FFF");
        assert!(WalFileName::parse_any_size("00000001000000000000FFFF").is_err());
        assert!(WalFileName::parse_any_size("../../etc/passwd").is_err());
        assert!(WalFileName::parse_any_size("00000001000000000000000é").is_err());
    }

    #[test]
    fn rejects_what_postgres_would_not_write() {
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000001",
            "000000010000000000000001.part",
            "00000000000000000000000001",
            "000000000000000000000001",
            "000000010000000000000001.history",
            "00000000.history",
            "0000001.history",
            "000000010000000000000002.0000028.backup",
            "000000010000000000000002.01000000.backup",
            "000000010000000000000002.backup",
            "00000001000000000000000a",
            "00000001000000000000000G",
            "../00000001000000000000001",
            "0000000100000000000001000",
        ] {
            assert!(WalFileName::parse(bad, S16).is_err(), "{bad:?} accepted");
        }
    }

    fn any_name() -> impl Strategy<Value = WalFileName> {
        (1u32.., 0u64..(1 << 40), 20u32..=30, 0u32.., 0u8..4).prop_map(
            |(tli, segno, shift, off, kind)| {
                let size = WalSegSize::new(1 << shift).unwrap();
                // keep the segment number inside what a name can express for this size
                let segno = segno % (u64::from(u32::MAX) * size.segments_per_xlog_id());
                let s = seg(tli, segno, size);
                match kind {
                    0 => WalFileName::Segment(s),
                    1 => WalFileName::Partial(s),
                    2 => WalFileName::Backup {
                        segment: s,
                        offset: off % (1 << shift),
                    },
                    _ => WalFileName::History(s.timeline),
                }
            },
        )
    }

    proptest! {
        #[test]
        fn every_name_round_trips(name in any_name()) {
            let size = match name {
                WalFileName::Segment(s) | WalFileName::Partial(s) => s.seg_size,
                WalFileName::Backup { segment, .. } => segment.seg_size,
                WalFileName::History(_) => S16,
            };
            let text = name.to_string();
            prop_assert_eq!(WalFileName::parse(&text, size).unwrap(), name);
        }

        #[test]
        fn random_names_never_panic(s in "[0-9A-Fa-z./]{0,40}", shift in 20u32..=30) {
            let _ = WalFileName::parse(&s, WalSegSize::new(1 << shift).unwrap());
        }

        #[test]
        fn hex_like_names_never_panic(s in "[0-9A-F]{24}(\\.partial|\\.[0-9A-F]{8}\\.backup)?") {
            if let Ok(n) = WalFileName::parse(&s, S16) {
                prop_assert_eq!(n.to_string(), s);
            }
        }
    }
}
