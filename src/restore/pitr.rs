//! Point-in-time recovery planning: which backup, which timeline, which WAL
//! segments, proven present before anything is written.
//!
//! The plan follows PostgreSQL's own rules: a target must lie after the
//! chosen backup's consistency point (its stop LSN) on the timeline path
//! that leads to the target timeline; a segment is read from the newest
//! timeline of that path that began at or before it; the archive ends at the
//! newest segment of the path (a `.partial` only as its very end).

use chrono::{DateTime, Utc};

use crate::archive::catalog::WalCatalog;
use crate::archive::ArchiveError;
use crate::pg::{Lsn, ParseError, SegmentNo, TimelineId, WalFileName, WalSegSize};
use crate::repo::{Manifest, RepoError, Repository, StanzaPaths};
use crate::wal::history::TimelinePath;

/// Where recovery should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The first commit at or after this time (`recovery_target_time`).
    Time(DateTime<Utc>),
    /// An LSN (`recovery_target_lsn`).
    Lsn(Lsn),
    /// A transaction's commit (`recovery_target_xid`).
    Xid(u32),
    /// A restore point made with `pg_create_restore_point` (`recovery_target_name`).
    Name(String),
    /// The backup's consistency point (`recovery_target = 'immediate'`).
    Immediate,
    /// Everything archived, the newest `.partial` included.
    Latest,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "transaction {x}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
            Target::Immediate => write!(f, "the backup's consistency point"),
            Target::Latest => write!(f, "the end of the archive"),
        }
    }
}

/// `--target-timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimelineChoice {
    /// The newest timeline in the repository.
    #[default]
    Latest,
    /// The chosen backup's timeline.
    Current,
    /// This timeline.
    Id(TimelineId),
}

impl std::str::FromStr for TimelineChoice {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<TimelineChoice, ParseError> {
        match s {
            "latest" => Ok(TimelineChoice::Latest),
            "current" => Ok(TimelineChoice::Current),
            n => n.parse().map(TimelineChoice::Id).map_err(|_| {
                ParseError::new(
                    "timeline",
                    s,
                    "expected latest, current or a timeline number from 1",
                )
            }),
        }
    }
}

/// Why a recovery cannot be planned: refused before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Reading the archive failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Reading the repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The stanza has no backup.
    #[error("stanza {stanza} has no backups: nothing to recover from")]
    NoBackups {
        /// The stanza.
        stanza: String,
    },
    /// `--backup` names no backup of the stanza.
    #[error("no backup {id} in stanza {stanza}")]
    NoSuchBackup {
        /// The id asked for.
        id: String,
        /// The stanza.
        stanza: String,
    },
    /// No backup lies on the timeline path to the target's timeline.
    #[error("no backup lies on the path to timeline {timeline}")]
    NoBackupOnPath {
        /// The target timeline.
        timeline: TimelineId,
    },
    /// A time target after the last archived transaction end.
    #[error(
        "target {} is after the last archived transaction end at {} — the archive ends there; \
         use --latest or an earlier target", target.to_rfc3339(), last.to_rfc3339()
    )]
    AfterLastTransaction {
        /// The target time.
        target: DateTime<Utc>,
        /// The last transaction end in the archive.
        last: DateTime<Utc>,
    },
    /// A time target, but the archive holds no transaction end at all.
    #[error(
        "the archived WAL holds no transaction after the backups; use --latest or --immediate"
    )]
    NoTransactions,
    /// An xid target with no commit or abort in the archive.
    #[error(
        "transaction {xid} has no commit or abort in the archived WAL after the first backup \
         (still running, or a wrong xid); `walvault wal-inspect` lists transactions"
    )]
    UnknownXid {
        /// The transaction.
        xid: u32,
    },
    /// A name target with no such restore point in the archive.
    #[error("no restore point named {name:?} in the archived WAL after the first backup")]
    UnknownRestorePoint {
        /// The name.
        name: String,
    },
    /// The backup asked for cannot reach the target.
    #[error(
        "backup {id} cannot reach {target}: it becomes consistent at {stop_lsn} ({stop_time}) \
         on timeline {timeline}, which is {why}"
    )]
    BackupCannotReach {
        /// The backup.
        id: String,
        /// The target.
        target: Target,
        /// Where the backup becomes consistent.
        stop_lsn: Lsn,
        /// When (RFC 3339).
        stop_time: String,
        /// Its timeline.
        timeline: TimelineId,
        /// "after the target" or "not on the path to timeline N".
        why: String,
    },
    /// The target lies before every usable backup's consistency point.
    #[error(
        "{target} is before the first usable backup {id} became consistent ({stop_time} at {stop_lsn}): \
         no backup can restore to it"
    )]
    BeforeFirstBackup {
        /// The target.
        target: Target,
        /// The first backup on the path.
        id: String,
        /// When it became consistent (RFC 3339).
        stop_time: String,
        /// Where.
        stop_lsn: Lsn,
    },
    /// The target lies past the newest archived WAL.
    #[error(
        "{target} is beyond the archive: the newest WAL on the path to timeline {timeline} is {} — \
         use --latest or an earlier target", newest.map(|n| n.to_string()).unwrap_or_else(|| "nothing".into())
    )]
    BeyondArchive {
        /// The target.
        target: Target,
        /// The target timeline.
        timeline: TimelineId,
        /// The newest WAL file on the path, if any.
        newest: Option<WalFileName>,
    },
    /// A segment recovery must replay is missing.
    #[error(
        "WAL segment {segment} is not in the repository, and recovery must pass through it; \
         `walvault wal-verify` lists every gap — choose a target before it or a backup after it"
    )]
    MissingSegment {
        /// The missing segment.
        segment: WalFileName,
    },
}

/// Where a time, xid or name target lies in the archived WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTarget {
    /// LSN of the record recovery stops at (the commit, the restore point;
    /// for a time target, the first transaction end after the time).
    pub record_lsn: Option<Lsn>,
    /// End of that record: the WAL must reach it.
    pub end_lsn: Option<Lsn>,
}

/// Find a time, xid or name target in the summaries (in WAL order), or
/// explain why the archive cannot reach it.
pub fn locate(
    target: &Target,
    exclusive: bool,
    sums: &[crate::wal::summary::SegmentSummary],
) -> Result<ResolvedTarget, PlanError> {
    let xacts = || sums.iter().flat_map(|s| s.xacts.iter());
    let found = |lsn: Lsn, end: Lsn| ResolvedTarget {
        record_lsn: Some(lsn),
        end_lsn: Some(end),
    };
    match target {
        Target::Time(t) => {
            let t_pg = t.timestamp_micros() - 946_684_800_000_000;
            // PostgreSQL stops before the first transaction end after the
            // time (at or after it with --exclusive), so it must read it
            let stop = xacts().find(|x| {
                if exclusive {
                    x.xact.time >= t_pg
                } else {
                    x.xact.time > t_pg
                }
            });
            match stop {
                Some(x) => Ok(found(x.lsn, x.end)),
                None => Err(
                    match xacts()
                        .map(|x| x.xact.time)
                        .max()
                        .and_then(crate::wal::records::pg_time)
                    {
                        Some(last) => PlanError::AfterLastTransaction { target: *t, last },
                        None => PlanError::NoTransactions,
                    },
                ),
            }
        }
        Target::Xid(x) => xacts()
            .find(|e| e.xact.xid == *x)
            .map(|e| found(e.lsn, e.end))
            .ok_or(PlanError::UnknownXid { xid: *x }),
        Target::Name(n) => sums
            .iter()
            .flat_map(|s| s.restore_points.iter())
            .rfind(|r| &r.name == n)
            .map(|r| found(r.lsn, r.end))
            .ok_or_else(|| PlanError::UnknownRestorePoint { name: n.clone() }),
        _ => Ok(ResolvedTarget {
            record_lsn: None,
            end_lsn: None,
        }),
    }
}

/// Everything restore-pitr will do.
#[derive(Debug, Clone)]
pub struct PitrPlan {
    /// The backup restored, without its block lists
    /// ([`Manifest::load_all_headers`]).
    pub backup: Manifest,
    /// The target.
    pub target: Target,
    /// Stop just before the target instead of just after.
    pub exclusive: bool,
    /// Timeline recovery follows.
    pub timeline: TimelineId,
    /// WAL files to fetch, in replay order (the last may be a `.partial`).
    pub segments: Vec<WalFileName>,
    /// Segment size.
    pub seg: WalSegSize,
    /// Bytes of the backup's files.
    pub restore_bytes: u64,
}

impl PitrPlan {
    /// Bytes of WAL to download.
    pub fn wal_bytes(&self) -> u64 {
        self.segments.len() as u64 * self.seg.bytes()
    }
}

/// Plan a recovery to `target` (time, xid and name targets are located in
/// the archived WAL through the segment summaries).
pub async fn plan(
    repo: &Repository,
    stanza: &str,
    target: &Target,
    exclusive: bool,
    timeline: TimelineChoice,
    backup_id: Option<&str>,
) -> Result<PitrPlan, PlanError> {
    let paths = StanzaPaths::new(stanza);
    let backups = Manifest::load_all_headers(repo, &paths).await?;
    let Some(newest) = backups.last() else {
        return Err(PlanError::NoBackups {
            stanza: stanza.to_owned(),
        });
    };
    let seg = newest.wal_segment_size;
    let cat = WalCatalog::load(repo, &paths, seg).await?;
    let requested: Option<&Manifest> = match backup_id {
        Some(id) if id != "latest" => Some(backups.iter().find(|b| b.id == id).ok_or_else(
            || PlanError::NoSuchBackup {
                id: id.to_owned(),
                stanza: stanza.to_owned(),
            },
        )?),
        _ => None,
    };
    let tli = match timeline {
        TimelineChoice::Latest => cat.newest_timeline(),
        TimelineChoice::Current => requested.unwrap_or(newest).timeline,
        TimelineChoice::Id(n) => n,
    };
    let path = cat.path_to(tli)?;
    let on_path = |b: &Manifest| path.contains(b.timeline, b.start_lsn);

    // the LSN the WAL must reach, and the latest consistency point allowed
    let archive_end_seg = cat.newest_segment(path.last());
    let (need_until, stop_before): (Option<Lsn>, Option<Lsn>) = match target {
        Target::Lsn(l) => (Some(*l), Some(*l)),
        Target::Immediate | Target::Latest => (None, None),
        Target::Time(_) | Target::Xid(_) | Target::Name(_) => {
            let first = backups
                .iter()
                .filter(|b| on_path(b))
                .map(|b| b.start_lsn.segment(seg))
                .min()
                .ok_or(PlanError::NoBackupOnPath { timeline: tli })?;
            // what the archive holds from there (a gap only matters if it
            // lies between the chosen backup and the target: checked below)
            let names: Vec<WalFileName> = (first.0..=archive_end_seg.unwrap_or(first).0)
                .map(SegmentNo)
                .filter_map(|s| cat.stored_name(s, path.timeline_of(s)))
                .collect();
            let sums = crate::archive::summaries::load_path(repo, &paths, &names, 16).await?;
            let r = locate(target, exclusive, &sums)?;
            (r.end_lsn, r.record_lsn)
        }
    };
    let fits = |b: &Manifest| {
        on_path(b)
            && match (target, stop_before) {
                (Target::Time(t), _) => b.stop_time <= t.timestamp_micros(),
                (_, Some(l)) => b.stop_lsn <= l,
                _ => true,
            }
    };
    let backup = match requested {
        Some(b) => {
            if !fits(b) {
                return Err(PlanError::BackupCannotReach {
                    id: b.id.clone(),
                    target: target.clone(),
                    stop_lsn: b.stop_lsn,
                    stop_time: micros_to_text(b.stop_time),
                    timeline: b.timeline,
                    why: if on_path(b) {
                        "after the target".to_owned()
                    } else {
                        format!("not on the path to timeline {tli}")
                    },
                });
            }
            b.clone()
        }
        None => match backups.iter().rev().find(|b| fits(b)) {
            Some(b) => b.clone(),
            None => {
                return Err(match backups.iter().find(|b| on_path(b)) {
                    Some(f) => PlanError::BeforeFirstBackup {
                        target: target.clone(),
                        id: f.id.clone(),
                        stop_time: micros_to_text(f.stop_time),
                        stop_lsn: f.stop_lsn,
                    },
                    None => PlanError::NoBackupOnPath { timeline: tli },
                });
            }
        },
    };

    // the segments, from the backup's start through the target (or the end)
    let first = backup.start_lsn.segment(seg);
    let last = match (target, need_until) {
        (Target::Immediate, _) => backup.stop_lsn.segment(seg),
        (_, Some(l)) => l.segment(seg),
        _ => archive_end_seg.unwrap_or(first),
    };
    let end_seg = archive_end_seg.unwrap_or(SegmentNo(0));
    if last > end_seg && !matches!(target, Target::Immediate) {
        return Err(PlanError::BeyondArchive {
            target: target.clone(),
            timeline: tli,
            newest: archive_end_seg.map(|s| WalFileName::Segment(cat.segment(s, path.last()))),
        });
    }
    let segments = segments_between(&cat, &path, first, last)?;
    Ok(PitrPlan {
        restore_bytes: backup
            .files
            .iter()
            .filter(|f| f.kind == crate::repo::FileKind::File)
            .map(|f| f.size)
            .sum(),
        backup,
        target: target.clone(),
        exclusive,
        timeline: tli,
        segments,
        seg,
    })
}

/// Stored names of segments `first..=last` along `path`; a missing one is
/// a refusal naming it.
fn segments_between(
    cat: &WalCatalog,
    path: &TimelinePath,
    first: SegmentNo,
    last: SegmentNo,
) -> Result<Vec<WalFileName>, PlanError> {
    (first.0..=last.0)
        .map(SegmentNo)
        .map(|s| {
            let t = path.timeline_of(s);
            cat.stored_name(s, t).ok_or(PlanError::MissingSegment {
                segment: WalFileName::Segment(cat.segment(s, t)),
            })
        })
        .collect()
}

/// A backup time (µs since the Unix epoch) as RFC 3339.
pub fn micros_to_text(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

/// Parse a target time: RFC 3339 / ISO 8601, or PostgreSQL's timestamptz
/// text (`2026-11-23 14:05:00+00`, `2026-11-23 14:05:00.5 +01:00`). A time
/// without a zone needs `default_offset` (`--timezone`, e.g. `+02:00` or
/// `UTC`).
pub fn parse_target_time(
    s: &str,
    default_offset: Option<&str>,
) -> Result<DateTime<Utc>, ParseError> {
    let s = s.trim();
    let bad = |why: &str| ParseError::new("target time", s, why);
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // ISO 8601's date/time separator (only there: "UTC" has a T too)
    let norm = if s.as_bytes().get(10) == Some(&b'T') {
        format!("{} {}", &s[..10], &s[11..])
    } else {
        s.to_owned()
    };
    // the zone: a trailing UTC/GMT/Z, or a sign after the time of day
    let (base, zone) = if let Some(b) = ["UTC", "GMT", "utc", "Z"]
        .iter()
        .find_map(|z| norm.strip_suffix(z))
    {
        (b.trim_end(), Some("+00".to_owned()))
    } else {
        match norm.rfind(['+', '-']).filter(|&i| i > 10) {
            Some(i) => (norm[..i].trim_end(), Some(norm[i..].to_owned())),
            None => (norm.as_str(), None),
        }
    };
    let naive = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(base, f).ok())
        .ok_or_else(|| bad("expected 2026-11-23 14:05:00+00, or ISO 8601"))?;
    let zone = match (zone, default_offset) {
        (Some(z), _) => z,
        (None, Some(d)) if ["UTC", "GMT", "utc", "Z"].contains(&d) => "+00".to_owned(),
        (None, Some(d)) => d.to_owned(),
        (None, None) => {
            return Err(bad(
                "it has no time zone; add one (2026-11-23 14:05:00+00) or give --timezone",
            ))
        }
    };
    let offset = parse_offset(&zone)
        .ok_or_else(|| ParseError::new("time zone", &zone, "give an offset like +02:00, or UTC"))?;
    naive
        .and_local_timezone(offset)
        .single()
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| bad("not a valid time"))
}

/// `+hh`, `+hhmm`, `+hh:mm` (or `-`) as an offset.
fn parse_offset(z: &str) -> Option<chrono::FixedOffset> {
    let (sign, rest) = match z.trim().split_at_checked(1)? {
        ("+", r) => (1, r),
        ("-", r) => (-1, r),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !(digits.len() == 2 || digits.len() == 4) {
        return None;
    }
    let h: i32 = digits[..2].parse().ok()?;
    let m: i32 = if digits.len() == 4 {
        digits[2..].parse().ok()?
    } else {
        0
    };
    chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times() {
        let want = "2026-11-23T14:05:00Z".parse::<DateTime<Utc>>().unwrap();
        for s in [
            "2026-11-23T14:05:00Z",
            "2026-11-23 14:05:00+00",
            "2026-11-23 14:05:00+00:00",
            "2026-11-23 16:05:00+02",
            "2026-11-23 14:05:00 UTC",
            "2026-11-23 15:05:00 +01:00",
        ] {
            assert_eq!(parse_target_time(s, None).unwrap(), want, "{s}");
        }
        assert_eq!(
            parse_target_time("2026-11-23 16:05:00", Some("+02:00")).unwrap(),
            want
        );
        assert!(parse_target_time("2026-11-23 14:05:00", None)
            .unwrap_err()
            .to_string()
            .contains("no time zone"));
        let frac = parse_target_time("2026-11-23 14:05:00.123456+00", None).unwrap();
        assert_eq!(frac.timestamp_subsec_micros(), 123456);
        assert!("latest".parse::<TimelineChoice>().is_ok());
        assert_eq!(
            "3".parse::<TimelineChoice>().unwrap(),
            TimelineChoice::Id(TimelineId::new(3).unwrap())
        );
        assert!("0".parse::<TimelineChoice>().is_err());
    }
}
