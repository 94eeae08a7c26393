//! Physical streaming replication, sans-IO: the CopyData messages of
//! START_REPLICATION (XLogData 'w', keepalive 'k'), the standby status update
//! the client sends ('r'), and the assembly of streamed bytes into WAL
//! segments.
//!
//! Message layouts follow the protocol documentation ("Streaming Replication
//! Protocol"): all integers big-endian; times are microseconds since
//! 2000-01-01 00:00 UTC.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use bytes::Bytes;

use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegSize};
use crate::reader::{ByteReader, Truncated};

/// What is wrong with the replication stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    /// A CopyData message without even a type byte.
    #[error("empty replication message")]
    Empty,
    /// A message shorter than its fixed header.
    #[error("replication message {kind:?} ({name}) is cut short: {source}")]
    Truncated {
        /// Its type byte.
        kind: char,
        /// What the type means.
        name: &'static str,
        /// Where (offsets after the type byte).
        source: Truncated,
    },
    /// A type byte other than 'w' and 'k'.
    #[error("unknown replication message type {0:?}")]
    UnknownType(char),
    /// Streaming asked to begin inside a segment.
    #[error("streaming must start at a segment boundary, not {start}")]
    NotSegmentStart {
        /// The LSN asked for.
        start: Lsn,
    },
    /// Bytes that do not follow those received before.
    #[error("WAL gap or overlap: expected {expected}, the server sent {sent}")]
    Gap {
        /// The next LSN expected.
        expected: Lsn,
        /// Where the server's bytes start.
        sent: Lsn,
    },
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A message from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// WAL bytes starting at `start`.
    XLogData {
        /// LSN of the first byte of `data`.
        start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The bytes.
        data: Bytes,
    },
    /// A keepalive; answer at once when `reply_requested`.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Whether the server wants a status update now.
        reply_requested: bool,
    },
}

/// Parse one CopyData payload of a START_REPLICATION stream.
pub fn parse_message(b: Bytes) -> Result<WalMessage, ReceiveError> {
    let (&kind, body) = b.split_first().ok_or(ReceiveError::Empty)?;
    let mut r = ByteReader::new(body);
    let cut = |name: &'static str| {
        move |source| ReceiveError::Truncated {
            kind: kind as char,
            name,
            source,
        }
    };
    match kind {
        b'w' => {
            let cut = cut("XLogData");
            let start = Lsn::new(r.u64_be().map_err(cut)?);
            let wal_end = Lsn::new(r.u64_be().map_err(cut)?);
            let _send_time = r.i64_be().map_err(cut)?;
            let data = b.slice_ref(r.rest());
            Ok(WalMessage::XLogData {
                start,
                wal_end,
                data,
            })
        }
        b'k' => {
            let cut = cut("keepalive");
            let wal_end = Lsn::new(r.u64_be().map_err(cut)?);
            let _send_time = r.i64_be().map_err(cut)?;
            let reply_requested = r.u8().map_err(cut)? != 0;
            Ok(WalMessage::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        t => Err(ReceiveError::UnknownType(t as char)),
    }
}

/// A standby status update ('r'): how far WAL is written, flushed (durable —
/// the server may recycle WAL up to here when a slot is used) and applied.
pub fn status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now_unix_us: i64,
    reply_requested: bool,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(34);
    v.push(b'r');
    v.extend_from_slice(&write.get().to_be_bytes());
    v.extend_from_slice(&flush.get().to_be_bytes());
    v.extend_from_slice(&apply.get().to_be_bytes());
    v.extend_from_slice(&(now_unix_us - PG_EPOCH_OFFSET_US).to_be_bytes());
    v.push(u8::from(reply_requested));
    v
}

/// A whole segment, or the received prefix of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Its file name (`Segment` or `Partial`).
    pub name: WalFileName,
    /// The bytes; a full segment is exactly the segment size.
    pub data: Vec<u8>,
}

/// Assembles streamed WAL into segments, checking continuity.
#[derive(Debug)]
pub struct SegmentAssembler {
    seg_size: WalSegSize,
    timeline: TimelineId,
    next: Lsn,
    current: Vec<u8>,
}

impl SegmentAssembler {
    /// Expect WAL from `start` (the first byte of a segment) on `timeline`.
    pub fn new(
        start: Lsn,
        timeline: TimelineId,
        seg_size: WalSegSize,
    ) -> Result<SegmentAssembler, ReceiveError> {
        if !start.is_segment_start(seg_size) {
            return Err(ReceiveError::NotSegmentStart { start });
        }
        Ok(SegmentAssembler {
            seg_size,
            timeline,
            next: start,
            current: Vec::with_capacity(seg_size.bytes() as usize),
        })
    }

    /// The next LSN expected.
    pub fn position(&self) -> Lsn {
        self.next
    }

    /// Add bytes that start at `start`; returns the segments they completed.
    pub fn push(&mut self, start: Lsn, mut data: &[u8]) -> Result<Vec<Segment>, ReceiveError> {
        if start != self.next {
            return Err(ReceiveError::Gap {
                expected: self.next,
                sent: start,
            });
        }
        let seg = self.seg_size.bytes() as usize;
        let mut done = Vec::new();
        while !data.is_empty() {
            let room = seg - self.current.len();
            let (head, tail) = data.split_at_checked(room).unwrap_or((data, &[]));
            let take = head.len();
            self.current.extend_from_slice(head);
            data = tail;
            self.next = Lsn::new(self.next.get() + take as u64);
            if self.current.len() == seg {
                let segno = SegmentNo(self.next.get() / self.seg_size.bytes() - 1);
                done.push(Segment {
                    name: self.name(segno, false),
                    data: std::mem::replace(&mut self.current, Vec::with_capacity(seg)),
                });
            }
        }
        Ok(done)
    }

    /// The incomplete current segment as a `.partial`, if it holds any bytes:
    /// zero-padded to the segment size, as pg_receivewal writes it, because
    /// PostgreSQL refuses a restored segment of any other size; replay stops
    /// at the zeros.
    pub fn partial(&self) -> Option<Segment> {
        if self.current.is_empty() {
            return None;
        }
        let mut data = self.current.clone();
        data.resize(self.seg_size.bytes() as usize, 0);
        Some(Segment {
            name: self.name(self.next.segment(self.seg_size), true),
            data,
        })
    }

    /// Bytes received of the current, incomplete segment.
    pub fn partial_len(&self) -> usize {
        self.current.len()
    }

    /// The bytes of the current, incomplete segment received from `from` on
    /// (from its start when `from` lies before it): its file, the offset of
    /// the first byte, the bytes. `None` when there are none.
    pub fn since(&self, from: Lsn) -> Option<(crate::pg::SegmentFile, u32, Vec<u8>)> {
        if self.current.is_empty() {
            return None;
        }
        let seg = self.seg_size.bytes();
        let start = self.next.get() - self.current.len() as u64;
        let from = from.get().max(start);
        if from >= self.next.get() {
            return None;
        }
        let off = (from - start) as usize;
        let f = crate::pg::SegmentFile {
            timeline: self.timeline,
            segno: SegmentNo(start / seg),
            seg_size: self.seg_size,
        };
        Some((f, off as u32, self.current.get(off..)?.to_vec()))
    }

    fn name(&self, segno: SegmentNo, partial: bool) -> WalFileName {
        let f = crate::pg::SegmentFile {
            timeline: self.timeline,
            segno,
            seg_size: self.seg_size,
        };
        if partial {
            WalFileName::Partial(f)
        } else {
            WalFileName::Segment(f)
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn segments_complete_across_messages() {
        let size = WalSegSize::new(1 << 20).unwrap();
        let mut a = SegmentAssembler::new(Lsn::new(0), TimelineId::FIRST, size).unwrap();
        let wal: Vec<u8> = (0..(2 << 20) + 100).map(|i| (i % 251) as u8).collect();
        let mut segs = Vec::new();
        let mut at = 0;
        for chunk in wal.chunks(70_000) {
            segs.extend(a.push(Lsn::new(at), chunk).unwrap());
            at += chunk.len() as u64;
        }
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].name.to_string(), "000000010000000000000000");
        assert_eq!(segs[1].name.to_string(), "000000010000000000000001");
        assert_eq!(segs[1].data, wal[1 << 20..2 << 20]);
        let p = a.partial().unwrap();
        assert_eq!(p.name.to_string(), "000000010000000000000002.partial");
        assert_eq!(p.data.len(), 1 << 20, "padded to the segment size");
        assert_eq!(&p.data[..100], &wal[2 << 20..]);
        assert!(p.data[100..].iter().all(|&b| b == 0));
        assert_eq!(a.partial_len(), 100);
        assert_eq!(
            a.push(Lsn::new(5), b"x").unwrap_err(),
            ReceiveError::Gap {
                expected: Lsn::new((2 << 20) + 100),
                sent: Lsn::new(5)
            }
        );
        assert!(SegmentAssembler::new(Lsn::new(1), TimelineId::FIRST, size).is_err());
    }

    #[test]
    fn messages_round_trip() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x0100_0028u64.to_be_bytes());
        w.extend_from_slice(&0x0200_0000u64.to_be_bytes());
        w.extend_from_slice(&7i64.to_be_bytes());
        w.extend_from_slice(b"wal");
        assert_eq!(
            parse_message(Bytes::from(w)).unwrap(),
            WalMessage::XLogData {
                start: Lsn::new(0x0100_0028),
                wal_end: Lsn::new(0x0200_0000),
                data: Bytes::from_static(b"wal")
            }
        );
        let r = status_update(
            Lsn::new(1),
            Lsn::new(2),
            Lsn::new(3),
            PG_EPOCH_OFFSET_US + 5,
            true,
        );
        assert_eq!(r.len(), 34);
        assert_eq!(&r[25..33], &5i64.to_be_bytes());
    }

    #[test]
    fn short_messages_say_where_they_end() {
        assert_eq!(parse_message(Bytes::new()), Err(ReceiveError::Empty));
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&1i64.to_be_bytes());
        let e = parse_message(Bytes::from(k)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "replication message 'k' (keepalive) is cut short: \
             input ends at byte 16: 1 byte(s) needed at byte 16"
        );
        assert_eq!(
            parse_message(Bytes::from_static(b"q")),
            Err(ReceiveError::UnknownType('q'))
        );
    }

    proptest! {
        #[test]
        fn random_messages_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_message(Bytes::from(data));
        }
    }
}
