//! Log sequence numbers, timelines, segment numbers, segment sizes and system ids.
//!
//! These mirror `XLogRecPtr`, `TimeLineID`, `XLogSegNo` and the `wal_segment_size`
//! GUC of PostgreSQL's `xlogdefs.h` / `xlog_internal.h`.

use std::fmt;
use std::str::FromStr;

use super::ParseError;

/// A position in the write-ahead log, in bytes from its very beginning.
///
/// Mirrors `XLogRecPtr`. Displayed and parsed as PostgreSQL does: two hexadecimal
/// halves of at most eight digits each, `16/B374D848`.
///
/// Serialized as that text in human-readable formats (JSON, TOML) and as the
/// plain number in binary ones (postcard: the repository's stored formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(u64);

impl Lsn {
    /// `InvalidXLogRecPtr`.
    pub const INVALID: Lsn = Lsn(0);

    /// The position `bytes` from the beginning of the log.
    pub const fn new(bytes: u64) -> Lsn {
        Lsn(bytes)
    }

    /// Bytes from the beginning of the log (the `XLogRecPtr` value).
    pub const fn get(self) -> u64 {
        self.0
    }

    /// True for `0/0`, which PostgreSQL uses for "no position".
    pub fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// This position moved forward by `bytes`, or `None` past `FFFFFFFF/FFFFFFFF`.
    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    /// Bytes from `earlier` to `self`, or `None` when `earlier` is after `self`.
    pub fn checked_sub(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// The segment that holds the byte at this position.
    pub fn segment(self, seg_size: WalSegSize) -> SegmentNo {
        SegmentNo(self.0 / seg_size.bytes())
    }

    /// Byte offset of this position inside its segment.
    pub fn segment_offset(self, seg_size: WalSegSize) -> u64 {
        self.0 % seg_size.bytes()
    }

    /// True when this position is the first byte of a segment.
    pub fn is_segment_start(self, seg_size: WalSegSize) -> bool {
        self.segment_offset(seg_size) == 0
    }
}

/// `Lsn - Lsn` is a byte count. It saturates at zero; use [`Lsn::checked_sub`]
/// where the order of the two positions is not already known.
impl std::ops::Sub for Lsn {
    type Output = u64;
    fn sub(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// serde for a `u64` newtype that has text in human-readable formats (its
/// `Display` / `FromStr`) and the number in binary ones.
macro_rules! text_or_number_serde {
    ($t:ident) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    s.serialize_u64(self.0)
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                if d.is_human_readable() {
                    let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    text.parse().map_err(serde::de::Error::custom)
                } else {
                    u64::deserialize(d).map($t)
                }
            }
        }
    };
}

text_or_number_serde!(Lsn);

impl FromStr for Lsn {
    type Err = ParseError;

    /// Accepts what `pg_lsn_in` accepts: `hex/hex`, each half 1 to 8 hex digits.
    fn from_str(s: &str) -> Result<Lsn, ParseError> {
        let bad = |why: &str| ParseError::new("LSN", s, why);
        let (hi, lo) = s.split_once('/').ok_or_else(|| {
            bad("expected two hexadecimal halves separated by '/', e.g. 16/B374D848")
        })?;
        let half = |part: &str| -> Result<u64, ParseError> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("each half must be 1 to 8 hexadecimal digits"));
            }
            u64::from_str_radix(part, 16).map_err(|e| bad(&e.to_string()))
        };
        Ok(Lsn((half(hi)? << 32) | half(lo)?))
    }
}

/// A timeline, mirrors `TimeLineID`. Timeline 0 does not exist; the first is 1.
///
/// Serialized as its number; deserializing 0 is an error.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u32")]
pub struct TimelineId(u32);

impl TryFrom<u32> for TimelineId {
    type Error = ParseError;
    fn try_from(n: u32) -> Result<TimelineId, ParseError> {
        TimelineId::new(n)
            .ok_or_else(|| ParseError::new("timeline", "0", "timeline 0 does not exist"))
    }
}

impl From<TimelineId> for u32 {
    fn from(t: TimelineId) -> u32 {
        t.0
    }
}

impl TimelineId {
    /// The timeline every cluster starts on.
    pub const FIRST: TimelineId = TimelineId(1);

    /// A timeline id; `None` for 0, which PostgreSQL never uses.
    pub fn new(id: u32) -> Option<TimelineId> {
        (id != 0).then_some(TimelineId(id))
    }

    /// The number PostgreSQL shows (`timeline_id` in `pg_control_checkpoint()`).
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for TimelineId {
    type Err = ParseError;
    /// Decimal, as `IDENTIFY_SYSTEM` and `recovery_target_timeline` write it.
    fn from_str(s: &str) -> Result<TimelineId, ParseError> {
        let n: u32 = s
            .parse()
            .map_err(|_| ParseError::new("timeline", s, "expected a decimal number from 1"))?;
        TimelineId::new(n)
            .ok_or_else(|| ParseError::new("timeline", s, "timeline 0 does not exist"))
    }
}

/// A WAL segment number counted from the start of the log, mirrors `XLogSegNo`.
///
/// Its meaning depends on the segment size: segment 3 of a 16 MiB cluster starts
/// at `0/3000000`, of a 64 MiB cluster at `0/C000000`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    /// The LSN of the first byte of this segment.
    pub fn start_lsn(self, seg_size: WalSegSize) -> Option<Lsn> {
        self.0.checked_mul(seg_size.bytes()).map(Lsn)
    }

    /// The following segment.
    pub fn next(self) -> SegmentNo {
        SegmentNo(self.0.saturating_add(1))
    }
}

impl fmt::Display for SegmentNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The WAL segment size of a cluster (`wal_segment_size`, fixed at initdb).
///
/// Always a power of two from 1 MiB to 1 GiB, as `IsValidWalSegSize` demands. It is
/// read from the server or from a segment's long page header, never assumed.
///
/// Serialized as its size in bytes; deserializing an invalid size is an error.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u64", into = "u64")]
pub struct WalSegSize(u32);

impl TryFrom<u64> for WalSegSize {
    type Error = ParseError;
    fn try_from(bytes: u64) -> Result<WalSegSize, ParseError> {
        WalSegSize::new(bytes)
    }
}

impl From<WalSegSize> for u64 {
    fn from(s: WalSegSize) -> u64 {
        s.bytes()
    }
}

impl WalSegSize {
    /// The default of `initdb`: 16 MiB.
    pub const DEFAULT: WalSegSize = WalSegSize(16 * 1024 * 1024);
    /// Smallest size PostgreSQL accepts.
    pub const MIN_BYTES: u32 = 1024 * 1024;
    /// Largest size PostgreSQL accepts.
    pub const MAX_BYTES: u32 = 1024 * 1024 * 1024;

    /// A segment size in bytes; an error unless a power of two in 1 MiB ..= 1 GiB.
    pub fn new(bytes: u64) -> Result<WalSegSize, ParseError> {
        let ok = bytes.is_power_of_two()
            && bytes >= u64::from(Self::MIN_BYTES)
            && bytes <= u64::from(Self::MAX_BYTES);
        if !ok {
            return Err(ParseError::new(
                "WAL segment size",
                &bytes.to_string(),
                "must be a power of two from 1 MiB to 1 GiB",
            ));
        }
        Ok(WalSegSize(bytes as u32))
    }

    /// Size in bytes.
    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// Segments per 4 GiB "log id", the middle part of a segment file name
    /// (`XLogSegmentsPerXLogId`).
    pub fn segments_per_xlog_id(self) -> u64 {
        0x1_0000_0000 / self.bytes()
    }
}

impl fmt::Display for WalSegSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1024 * 1024 * 1024 {
            write!(f, "{}GB", self.0 >> 30)
        } else {
            write!(f, "{}MB", self.0 >> 20)
        }
    }
}

impl FromStr for WalSegSize {
    type Err = ParseError;
    /// Accepts plain bytes (`16777216`) or `SHOW wal_segment_size` output (`16MB`, `1GB`).
    fn from_str(s: &str) -> Result<WalSegSize, ParseError> {
        let bad = || ParseError::new("WAL segment size", s, "expected bytes or a size like 16MB");
        let t = s.trim();
        let (digits, mult) = if let Some(d) = t.strip_suffix("GB") {
            (d, 1u64 << 30)
        } else if let Some(d) = t.strip_suffix("MB") {
            (d, 1 << 20)
        } else if let Some(d) = t.strip_suffix("kB") {
            (d, 1 << 10)
        } else {
            (t, 1)
        };
        let n: u64 = digits.trim().parse().map_err(|_| bad())?;
        WalSegSize::new(n.checked_mul(mult).ok_or_else(bad)?)
    }
}

/// The database system identifier from `pg_control` (`IDENTIFY_SYSTEM`'s `systemid`).
///
/// A backup or WAL segment of one cluster must never be applied to another: this
/// is the value that tells them apart.
///
/// Serialized as decimal text in human-readable formats (a JSON number would
/// lose digits in JavaScript), as the number in binary ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SystemId(pub u64);

text_or_number_serde!(SystemId);

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for SystemId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<SystemId, ParseError> {
        s.parse().map(SystemId).map_err(|_| {
            ParseError::new("system identifier", s, "expected a decimal 64-bit number")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lsn_display_matches_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("0/1".parse::<Lsn>().unwrap(), Lsn(1));
        assert_eq!("ffffffff/ffffffff".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn lsn_rejects_malformed() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "1",
            "123456789/0",
            "0/123456789",
            "g/0",
            "1/2/3",
            " 1/2",
            "-1/0",
            "+1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn segment_math() {
        let s16 = WalSegSize::DEFAULT;
        let lsn: Lsn = "1/3000028".parse().unwrap();
        assert_eq!(lsn.segment(s16), SegmentNo(0x103));
        assert_eq!(lsn.segment_offset(s16), 0x28);
        assert_eq!(
            SegmentNo(0x103).start_lsn(s16),
            Some("1/3000000".parse().unwrap())
        );
        let s64 = WalSegSize::new(64 << 20).unwrap();
        assert_eq!(SegmentNo(3).start_lsn(s64), Some(Lsn(0xC00_0000)));
        assert_eq!(s64.segments_per_xlog_id(), 64);
        assert_eq!(Lsn(100) - Lsn(40), 60);
        assert_eq!(Lsn(40).checked_sub(Lsn(100)), None);
    }

    #[test]
    fn seg_size_validation() {
        assert!(WalSegSize::new(1 << 20).is_ok());
        assert!(WalSegSize::new(1 << 30).is_ok());
        for bad in [0, 1, 1 << 19, 3 << 20, 1 << 31, u64::MAX] {
            assert!(WalSegSize::new(bad).is_err(), "{bad} accepted");
        }
        assert_eq!("16MB".parse::<WalSegSize>().unwrap(), WalSegSize::DEFAULT);
        assert_eq!("1GB".parse::<WalSegSize>().unwrap().bytes(), 1 << 30);
        assert_eq!(
            "16777216".parse::<WalSegSize>().unwrap(),
            WalSegSize::DEFAULT
        );
        assert!("17MB".parse::<WalSegSize>().is_err());
        assert!("99999999999999999999GB".parse::<WalSegSize>().is_err());
    }

    #[test]
    fn timeline_zero_is_invalid() {
        assert!(TimelineId::new(0).is_none());
        assert!("0".parse::<TimelineId>().is_err());
        assert_eq!("7".parse::<TimelineId>().unwrap().get(), 7);
    }

    #[test]
    fn serde_text_in_json_numbers_in_postcard() {
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(serde_json::to_string(&lsn).unwrap(), "\"16/B374D848\"");
        assert_eq!(serde_json::from_str::<Lsn>("\"16/B374D848\"").unwrap(), lsn);
        assert!(serde_json::from_str::<Lsn>("\"16\"").is_err());
        // the stored formats keep the number: a u64 written by an older
        // build reads as the same Lsn
        let old = postcard::to_stdvec(&0x16_B374_D848u64).unwrap();
        assert_eq!(postcard::to_stdvec(&lsn).unwrap(), old);
        assert_eq!(postcard::from_bytes::<Lsn>(&old).unwrap(), lsn);

        let tli = TimelineId::new(3).unwrap();
        assert_eq!(
            postcard::to_stdvec(&tli).unwrap(),
            postcard::to_stdvec(&3u32).unwrap()
        );
        assert!(postcard::from_bytes::<TimelineId>(&postcard::to_stdvec(&0u32).unwrap()).is_err());
        let seg = WalSegSize::DEFAULT;
        assert_eq!(
            postcard::from_bytes::<WalSegSize>(&postcard::to_stdvec(&(16u32 << 20)).unwrap())
                .unwrap(),
            seg
        );
        assert!(
            postcard::from_bytes::<WalSegSize>(&postcard::to_stdvec(&12345u32).unwrap()).is_err()
        );
        assert_eq!(
            serde_json::to_string(&SystemId(7_400_000_000_000_000_001)).unwrap(),
            "\"7400000000000000001\""
        );
    }

    proptest! {
        #[test]
        fn lsn_round_trips(v: u64) {
            let lsn = Lsn(v);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
            prop_assert_eq!(lsn.to_string().to_lowercase().parse::<Lsn>().unwrap(), lsn);
        }

        #[test]
        fn lsn_parse_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<Lsn>();
        }

        #[test]
        fn segment_and_offset_recompose(v in 0u64..(u64::MAX / 2), shift in 20u32..=30) {
            let size = WalSegSize::new(1 << shift).unwrap();
            let lsn = Lsn(v);
            let start = lsn.segment(size).start_lsn(size).unwrap();
            prop_assert_eq!(start.checked_add(lsn.segment_offset(size)), Some(lsn));
        }

        #[test]
        fn seg_size_round_trips(shift in 20u32..=30) {
            let size = WalSegSize::new(1 << shift).unwrap();
            prop_assert_eq!(size.to_string().parse::<WalSegSize>().unwrap(), size);
        }

        #[test]
        fn system_id_round_trips(v: u64) {
            prop_assert_eq!(SystemId(v).to_string().parse::<SystemId>().unwrap(), SystemId(v));
        }
    }
}
