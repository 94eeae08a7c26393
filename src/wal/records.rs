//! What a record means, for the records walvault reads: transaction ends
//! (`access/xact.h`: xl_xact_commit / xl_xact_abort with their xinfo
//! sections, xl_xact_prepare), restore points, checkpoints, XLOG_SWITCH,
//! `full_page_writes` changes, end of recovery (`catalog/pg_control.h`).

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::decode::{main_data, DecodeError, RawRecord};
use crate::pg::{Lsn, TimelineId};
use crate::reader::ByteReader;

const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// A TimestampTz (µs since 2000-01-01 UTC) as a UTC time.
pub fn pg_time(ts: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(ts.checked_add(PG_EPOCH_US)?)
}

/// A relation file (RelFileLocator: tablespace, database, relfilenode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelFile {
    /// Tablespace OID.
    pub spc: u32,
    /// Database OID.
    pub db: u32,
    /// Relfilenode.
    pub rel: u32,
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XactKind {
    /// COMMIT.
    Commit,
    /// ROLLBACK (or an error).
    Abort,
    /// COMMIT PREPARED.
    CommitPrepared,
    /// ROLLBACK PREPARED.
    AbortPrepared,
}

/// A transaction's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XactEnd {
    /// Commit or abort, plain or prepared.
    pub kind: XactKind,
    /// The transaction (for prepared ones, the prepared transaction's xid).
    pub xid: u32,
    /// xact_time, µs since 2000-01-01 UTC.
    pub time: i64,
    /// Database, when the record names it.
    pub db: Option<u32>,
    /// Subtransactions.
    pub subxacts: Vec<u32>,
    /// Relation files dropped by it.
    pub dropped: Vec<RelFile>,
}

/// What walvault reads from a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    /// A transaction ended.
    Xact(XactEnd),
    /// PREPARE TRANSACTION.
    Prepare {
        /// The transaction.
        xid: u32,
        /// prepared_at, µs since 2000-01-01.
        time: i64,
    },
    /// pg_create_restore_point.
    RestorePoint {
        /// Its name.
        name: String,
        /// rp_time, µs since 2000-01-01.
        time: i64,
    },
    /// A checkpoint record.
    Checkpoint {
        /// Shutdown (true) or online.
        shutdown: bool,
        /// Its redo point.
        redo: Lsn,
        /// Its timeline.
        timeline: TimelineId,
        /// `full_page_writes` when it was taken (the setting, not what a
        /// running base backup forces).
        full_page_writes: bool,
    },
    /// XLOG_FPW_CHANGE: `full_page_writes` was switched to this value.
    FpwChange(bool),
    /// XLOG_SWITCH: the rest of the segment is unused.
    Switch,
    /// End of recovery: a new timeline began.
    EndOfRecovery {
        /// The new timeline.
        timeline: TimelineId,
        /// The one before.
        prev_timeline: TimelineId,
        /// When, µs since 2000-01-01.
        time: i64,
    },
    /// End of a base backup's WAL.
    BackupEnd,
    /// Anything else.
    Other,
}

/// The main data of a record, read field by field; a field past its end
/// is [`DecodeError::Truncated`] at the record's LSN.
struct Cursor<'a> {
    r: ByteReader<'a>,
    lsn: Lsn,
}

impl<'a> Cursor<'a> {
    fn new(main: &'a [u8], lsn: Lsn) -> Cursor<'a> {
        Cursor {
            r: ByteReader::new(main),
            lsn,
        }
    }
    fn cut(&self) -> impl FnOnce(crate::reader::Truncated) -> DecodeError {
        let lsn = self.lsn;
        move |source| DecodeError::Truncated {
            lsn,
            what: "main data",
            source,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.r.bytes(n).map_err(self.cut())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.r.u32_le().map_err(self.cut())
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        Ok(self.r.u8().map_err(self.cut())? != 0)
    }
    /// A `TimeLineID`: 0 never names a timeline, so it makes the record malformed.
    fn timeline(&mut self) -> Result<TimelineId, DecodeError> {
        let n = self.u32()?;
        TimelineId::new(n).ok_or_else(|| DecodeError::Malformed {
            lsn: self.lsn,
            reason: "timeline 0".to_owned(),
        })
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.r.i64_le().map_err(self.cut())
    }
    /// A count of items of `each` bytes that follow; refused when they
    /// cannot fit (a corrupt count must not make a huge allocation).
    fn count(&mut self, each: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(each) > self.r.remaining() {
            return Err(DecodeError::Malformed {
                lsn: self.lsn,
                reason: format!("a count of {n} does not fit the record"),
            });
        }
        Ok(n)
    }
}

/// Interpret `rec` (WAL of PostgreSQL `major`).
pub fn interpret(rec: &RawRecord, major: u32) -> Result<RecordKind, DecodeError> {
    let info = rec.info & 0xF0;
    match rec.rmid {
        RM_XLOG_ID => {
            let mut c = Cursor::new(main_data(rec, major)?, rec.lsn);
            Ok(match info {
                0x00 | 0x10 => {
                    // CheckPoint: redo, ThisTimeLineID, PrevTimeLineID,
                    // fullPageWrites (the same on 13 to 18)
                    let redo = Lsn::new(c.i64()? as u64);
                    let timeline = c.timeline()?;
                    c.u32()?;
                    let full_page_writes = c.bool()?;
                    RecordKind::Checkpoint {
                        shutdown: info == 0x00,
                        redo,
                        timeline,
                        full_page_writes,
                    }
                }
                0x40 => RecordKind::Switch,
                0x50 => RecordKind::BackupEnd,
                0x80 => RecordKind::FpwChange(c.bool()?),
                0x70 => {
                    let time = c.i64()?;
                    // rp_name: char[MAXFNAMELEN], NUL-terminated
                    let raw = c.take(64)?;
                    let name = raw.split(|&b| b == 0).next().unwrap_or(raw);
                    RecordKind::RestorePoint {
                        name: String::from_utf8_lossy(name).into_owned(),
                        time,
                    }
                }
                0x90 => {
                    let time = c.i64()?;
                    let timeline = c.timeline()?;
                    let prev_timeline = c.timeline()?;
                    RecordKind::EndOfRecovery {
                        timeline,
                        prev_timeline,
                        time,
                    }
                }
                _ => RecordKind::Other,
            })
        }
        RM_XACT_ID => {
            let op = rec.info & 0x70;
            let kind = match op {
                0x00 => XactKind::Commit,
                0x20 => XactKind::Abort,
                0x30 => XactKind::CommitPrepared,
                0x40 => XactKind::AbortPrepared,
                0x10 => {
                    // xl_xact_prepare: magic, total_len, xid, database, prepared_at
                    let mut c = Cursor::new(main_data(rec, major)?, rec.lsn);
                    c.take(8)?;
                    let xid = c.u32()?;
                    c.take(4)?;
                    let time = c.i64()?;
                    return Ok(RecordKind::Prepare { xid, time });
                }
                _ => return Ok(RecordKind::Other),
            };
            let d = main_data(rec, major)?;
            xact_end(rec, kind, d, major).map(RecordKind::Xact)
        }
        _ => Ok(RecordKind::Other),
    }
}

/// Parse xl_xact_commit / xl_xact_abort and their xinfo sections, in the
/// order ParseCommitRecord / ParseAbortRecord read them.
fn xact_end(rec: &RawRecord, kind: XactKind, d: &[u8], major: u32) -> Result<XactEnd, DecodeError> {
    let mut c = Cursor::new(d, rec.lsn);
    let time = c.i64()?;
    let xinfo = if rec.info & 0x80 != 0 { c.u32()? } else { 0 };
    let mut x = XactEnd {
        kind,
        xid: rec.xid,
        time,
        db: None,
        subxacts: Vec::new(),
        dropped: Vec::new(),
    };
    if xinfo & (1 << 0) != 0 {
        x.db = Some(c.u32()?);
        c.u32()?; // tablespace
    }
    if xinfo & (1 << 1) != 0 {
        let n = c.count(4)?;
        for _ in 0..n {
            x.subxacts.push(c.u32()?);
        }
    }
    if xinfo & (1 << 2) != 0 {
        let n = c.count(12)?;
        for _ in 0..n {
            x.dropped.push(RelFile {
                spc: c.u32()?,
                db: c.u32()?,
                rel: c.u32()?,
            });
        }
    }
    if xinfo & (1 << 8) != 0 {
        // dropped statistics (15+): kind, dboid, object id (64 bits from 18)
        let each = if major >= 18 { 16 } else { 12 };
        let n = c.count(each)?;
        c.take(n * each)?;
    }
    let is_commit = matches!(kind, XactKind::Commit | XactKind::CommitPrepared);
    if is_commit && xinfo & (1 << 3) != 0 {
        let n = c.count(16)?;
        c.take(n * 16)?; // invalidation messages
    }
    if xinfo & (1 << 4) != 0 {
        x.xid = c.u32()?; // the prepared transaction's xid
    }
    Ok(x)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn pg_epoch() {
        assert_eq!(
            pg_time(0).unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
    }
}
