//! Segment summaries: for every archived segment, what its records say —
//! so "which segment holds the first commit after 14:05" or "where did
//! transaction 91234 end" is answered without downloading WAL.
//!
//! A summary covers the records that *start* in its segment. A record that
//! continues into the next segment is decoded from both when the next one
//! is given; otherwise it is reported as `trailing_incomplete` and belongs
//! to no summary until the next segment arrives (`summarize` is run again).

use serde::{Deserialize, Serialize};

use super::decode::{DecodeError, Next, WalReader};
use super::records::{interpret, RecordKind, XactEnd};
use crate::pg::{Lsn, SegmentNo, TimelineId, WalSegSize};

/// Format version of [`SegmentSummary`] this build writes. Version 3 has
/// version 2's layout with PostgreSQL types (timeline, segment number and
/// size) checked when read; version 4 appends [`Since4`] after it (so
/// versions 2 and 3 still read, without what it adds).
pub const SUMMARY_VERSION: u32 = 4;
/// The oldest summary version this build reads (older ones are recomputed
/// from the WAL).
pub const SUMMARY_OLDEST: u32 = 2;
/// Most WAL bytes a summary carries to decode a record that crosses into
/// the next segment (commits, aborts and restore points are far smaller).
pub const MAX_CARRY: usize = 1 << 20;
/// Bytes handed to the reader at a time.
const FEED: usize = 1 << 20;

/// A transaction end, where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XactAt {
    /// Start of the commit/abort record.
    pub lsn: Lsn,
    /// Its end.
    pub end: Lsn,
    /// The transaction.
    pub xact: XactEnd,
}

/// A restore point, where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePointAt {
    /// Start of the record.
    pub lsn: Lsn,
    /// Its end.
    pub end: Lsn,
    /// The name.
    pub name: String,
    /// When, µs since 2000-01-01 UTC.
    pub time: i64,
}

/// What one segment holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    /// [`SUMMARY_VERSION`].
    pub version: u32,
    /// Timeline.
    pub timeline: TimelineId,
    /// Segment number.
    pub segno: SegmentNo,
    /// Segment size.
    pub seg_size: WalSegSize,
    /// PostgreSQL major of the WAL (from the page magic).
    pub major: Option<u32>,
    /// Records that start here.
    pub records: u64,
    /// First and last record start.
    pub first_lsn: Option<Lsn>,
    /// Start of the last record.
    pub last_lsn: Option<Lsn>,
    /// End of the last whole record: valid WAL reaches this far.
    pub end_lsn: Option<Lsn>,
    /// Commits and aborts, in WAL order.
    pub xacts: Vec<XactAt>,
    /// Restore points.
    pub restore_points: Vec<RestorePointAt>,
    /// Checkpoint records (start LSNs).
    pub checkpoints: Vec<Lsn>,
    /// Ends with XLOG_SWITCH.
    pub switch: bool,
    /// End-of-recovery records: (LSN, new timeline).
    pub end_of_recovery: Vec<(Lsn, TimelineId)>,
    /// A record starts here but its end was not given.
    pub trailing_incomplete: Option<Lsn>,
    /// When a record continues into the next segment: the WAL from the start
    /// of the page where it begins to the end of this segment (at most
    /// [`MAX_CARRY`]), so it can be decoded with the next summary's `head`.
    pub tail: Option<(Lsn, Vec<u8>)>,
    /// When this segment begins with the continuation of a record: its bytes
    /// up to where this segment's first record starts (at most [`MAX_CARRY`]).
    pub head: Vec<u8>,
    /// The first record that failed to decode, with why (`None`: all valid).
    pub error: Option<String>,
    /// BLAKE3 of the whole file as stored, when the writer computed it
    /// (`wal-push` does): a second push of the same name is compared with
    /// it instead of downloading the stored copy.
    pub content_blake3: Option<[u8; 32]>,
    /// Records that say `full_page_writes` is off: a change to off, or a
    /// checkpoint taken with it off. `None`: not recorded (a summary older
    /// than version 4). Stored in [`Since4`].
    #[serde(skip)]
    pub fpw_off: Option<Vec<Lsn>>,
}

/// What version 4 adds, stored as a second postcard value after the
/// version 3 fields (postcard has no optional trailing fields).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Since4 {
    /// [`SegmentSummary::fpw_off`].
    pub fpw_off: Vec<Lsn>,
}

impl SegmentSummary {
    /// The stored form: the version 3 fields, then [`Since4`].
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        let mut body = postcard::to_stdvec(self)?;
        if let Some(fpw_off) = &self.fpw_off {
            body.extend(postcard::to_stdvec(&Since4 {
                fpw_off: fpw_off.clone(),
            })?);
        }
        Ok(body)
    }

    /// Read a stored summary of any version (`None`: not one).
    pub fn decode(body: &[u8]) -> Option<SegmentSummary> {
        let (mut s, rest) = postcard::take_from_bytes::<SegmentSummary>(body).ok()?;
        if s.version >= 4 {
            s.fpw_off = Some(postcard::from_bytes::<Since4>(rest).ok()?.fpw_off);
        }
        Some(s)
    }

    /// Count and interpret one record of this segment.
    fn absorb(&mut self, rec: &super::decode::RawRecord, major: u32) -> Result<(), DecodeError> {
        self.records += 1;
        self.first_lsn.get_or_insert(rec.lsn);
        self.last_lsn = Some(rec.lsn);
        self.end_lsn = Some(rec.end);
        match interpret(rec, major)? {
            RecordKind::Xact(x) => self.xacts.push(XactAt {
                lsn: rec.lsn,
                end: rec.end,
                xact: x,
            }),
            RecordKind::RestorePoint { name, time } => self.restore_points.push(RestorePointAt {
                lsn: rec.lsn,
                end: rec.end,
                name,
                time,
            }),
            RecordKind::Checkpoint {
                full_page_writes, ..
            } => {
                self.checkpoints.push(rec.lsn);
                if !full_page_writes {
                    self.fpw_off.get_or_insert_with(Vec::new).push(rec.lsn);
                }
            }
            RecordKind::FpwChange(false) => self.fpw_off.get_or_insert_with(Vec::new).push(rec.lsn),
            RecordKind::Switch => self.switch = true,
            RecordKind::EndOfRecovery { timeline, .. } => {
                self.end_of_recovery.push((rec.lsn, timeline))
            }
            _ => {}
        }
        Ok(())
    }

    /// Complete the record that continues from this segment into the next
    /// (whose summary is `next`): decoded from this summary's `tail` and the
    /// next one's `head`, and counted here. Does nothing when there is none.
    pub fn complete_with(&mut self, next: &SegmentSummary) {
        let (Some(at), Some((page, tail))) = (self.trailing_incomplete, self.tail.clone()) else {
            return;
        };
        let seg = self.seg_size;
        // the reader starts on the record; its buffer starts at `page`
        debug_assert_eq!(page.get(), at.get() - at.get() % super::decode::PAGE);
        let mut r = WalReader::new(at, seg);
        r.feed(&tail);
        r.feed(&next.head);
        if let Ok(Next::Record(rec)) = r.next_record() {
            let major = self.major.unwrap_or(15);
            if self.absorb(&rec, major).is_ok() {
                self.trailing_incomplete = None;
            }
        }
    }

    /// First and last commit time (µs since 2000-01-01), commits only.
    pub fn commit_times(&self) -> Option<(i64, i64)> {
        let mut t = self
            .xacts
            .iter()
            .filter(|x| {
                matches!(
                    x.xact.kind,
                    super::records::XactKind::Commit | super::records::XactKind::CommitPrepared
                )
            })
            .map(|x| x.xact.time);
        let first = t.next()?;
        let last = t.next_back().unwrap_or(first);
        Some((first, last))
    }
}

/// Summarize segment `segno` of `tli` from its bytes (`data`, a whole
/// segment, zero-padded when partial), with the next segment's bytes when
/// available (to finish a record that crosses into it).
pub fn summarize(
    data: &[u8],
    next: Option<&[u8]>,
    tli: TimelineId,
    segno: SegmentNo,
    seg: WalSegSize,
) -> SegmentSummary {
    let mut s = Summarizer::new(data.len(), tli, segno, seg);
    // fed a piece at a time: the reader keeps what it has not consumed, so
    // it never holds a copy of the whole segment (16 MiB of fresh memory
    // per archive call, a third of its page faults)
    for piece in data.chunks(FEED) {
        s.push(piece);
    }
    s.finish(next)
}

/// [`summarize`] on a segment that arrives in pieces (as it is read: the
/// decoding overlaps with the reading). Keeps only what a summary carries:
/// the first and the last [`MAX_CARRY`] bytes.
pub struct Summarizer {
    s: SegmentSummary,
    r: WalReader,
    start: Lsn,
    seg_end: Lsn,
    /// Bytes pushed.
    fed: usize,
    /// Offset of the first byte kept in `tail`.
    tail_from: usize,
    /// The first bytes of the segment, for the summary's `head`.
    head: Vec<u8>,
    /// The last bytes (from `tail_from`), for the summary's `tail`.
    tail: Vec<u8>,
    /// No more records of this segment to decode (or an error).
    done: bool,
}

impl Summarizer {
    /// A summarizer for segment `segno` of `tli`, `len` bytes long.
    pub fn new(len: usize, tli: TimelineId, segno: SegmentNo, seg: WalSegSize) -> Summarizer {
        let start = segno.start_lsn(seg).unwrap_or_default();
        Summarizer {
            s: SegmentSummary {
                version: SUMMARY_VERSION,
                timeline: tli,
                segno,
                seg_size: seg,
                major: None,
                records: 0,
                first_lsn: None,
                last_lsn: None,
                end_lsn: None,
                xacts: Vec::new(),
                restore_points: Vec::new(),
                checkpoints: Vec::new(),
                switch: false,
                end_of_recovery: Vec::new(),
                trailing_incomplete: None,
                tail: None,
                head: Vec::new(),
                error: None,
                content_blake3: None,
                fpw_off: Some(Vec::new()),
            },
            r: WalReader::new(start, seg).headers_only_for_other_records(),
            start,
            seg_end: Lsn::new(start.get() + seg.bytes()),
            fed: 0,
            tail_from: len.saturating_sub(MAX_CARRY),
            head: Vec::new(),
            tail: Vec::new(),
            done: false,
        }
    }

    /// Decode the next `piece` of the segment.
    pub fn push(&mut self, piece: &[u8]) {
        let at = self.fed;
        if at < MAX_CARRY {
            self.head
                .extend_from_slice(&piece[..piece.len().min(MAX_CARRY - at)]);
        }
        if at + piece.len() > self.tail_from {
            self.tail
                .extend_from_slice(&piece[self.tail_from.saturating_sub(at)..]);
        }
        self.fed += piece.len();
        if !self.done {
            self.r.feed(piece);
            self.run();
        }
    }

    /// Decode records until the reader needs more bytes (false) or the
    /// segment's records are done (true).
    fn run(&mut self) -> bool {
        while !self.done {
            match self.r.next_record() {
                Err(e) => {
                    self.s.error = Some(e.to_string());
                    self.done = true;
                }
                Ok(Next::Record(rec)) => {
                    if rec.lsn >= self.seg_end {
                        self.done = true; // belongs to the next segment
                        break;
                    }
                    let major = self.r.major().unwrap_or(15);
                    self.s.major = Some(major);
                    if let Err(e) = self.s.absorb(&rec, major) {
                        self.s.error = Some(e.to_string());
                        self.done = true;
                    } else if self.r.position() >= self.seg_end {
                        self.done = true;
                    }
                }
                Ok(Next::NeedMore) => return false,
                Ok(Next::End(_)) => self.done = true,
            }
        }
        true
    }

    /// The summary, once every piece was pushed; `next` is the next
    /// segment's bytes when available (to finish a record that crosses
    /// into it).
    pub fn finish(mut self, next: Option<&[u8]>) -> SegmentSummary {
        let finished = self.run()
            || next.is_some_and(|n| {
                self.r.feed(n);
                self.run()
            });
        if !finished {
            let at = self.r.position();
            self.s.trailing_incomplete = Some(at);
            let page = at.get() - at.get() % super::decode::PAGE;
            let from = (page - self.start.get()) as usize;
            if from < self.fed && self.fed - from <= MAX_CARRY && from >= self.tail_from {
                self.s.tail = Some((Lsn::new(page), self.tail.split_off(from - self.tail_from)));
            }
        }
        // the continuation this segment begins with, for the previous summary
        let first = self
            .s
            .first_lsn
            .map(|l| (l.get() - self.start.get()) as usize)
            .unwrap_or(self.fed);
        if first <= MAX_CARRY {
            self.head.truncate(first);
            self.s.head = self.head;
        }
        self.s
    }
}

/// Hand the reader the next [`FEED`] bytes of `data` after `fed`; false when
/// all of it was handed over already.
fn feed_more(r: &mut WalReader, data: &[u8], fed: &mut usize) -> bool {
    if *fed >= data.len() {
        return false;
    }
    let to = (*fed + FEED).min(data.len());
    r.feed(&data[*fed..to]);
    *fed = to;
    true
}

/// Check every record of a segment: the first decoding error, with its LSN.
pub fn check_records(data: &[u8], segno: SegmentNo, seg: WalSegSize) -> Result<(), DecodeError> {
    let start = segno.start_lsn(seg).unwrap_or_default();
    let mut r = WalReader::new(start, seg).headers_only_for_other_records();
    let mut fed = 0;
    loop {
        match r.next_record()? {
            Next::Record(rec) => {
                if r.position().get() >= start.get() + seg.bytes() {
                    return Ok(());
                }
                let _ = rec;
            }
            Next::NeedMore if feed_more(&mut r, data, &mut fed) => {}
            Next::NeedMore | Next::End(_) => return Ok(()),
        }
    }
}
