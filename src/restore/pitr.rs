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
use crate::pg::{Lsn, TimelineId, WalSegSize};
use crate::repo::{Manifest, Repository, StanzaPaths};
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
    Id(u32),
}

impl std::str::FromStr for TimelineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<TimelineChoice, String> {
        match s {
            "latest" => Ok(TimelineChoice::Latest),
            "current" => Ok(TimelineChoice::Current),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .map(TimelineChoice::Id)
                .ok_or_else(|| format!("{s:?}: expected latest, current or a timeline number")),
        }
    }
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
) -> Result<ResolvedTarget, ArchiveError> {
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
                None => {
                    let last = xacts().map(|x| x.xact.time).max();
                    Err(refuse(match last {
                        Some(l) => format!(
                            "target {} is after the last archived transaction end at {} — the archive ends there; use --latest or an earlier target",
                            t.to_rfc3339(),
                            crate::wal::records::pg_time(l).map(|t| t.to_rfc3339()).unwrap_or_default()
                        ),
                        None => "the archived WAL holds no transaction after the backups; use --latest or --immediate".into(),
                    }))
                }
            }
        }
        Target::Xid(x) => xacts()
            .find(|e| e.xact.xid == *x)
            .map(|e| found(e.lsn, e.end))
            .ok_or_else(|| {
                refuse(format!(
                    "transaction {x} has no commit or abort in the archived WAL after the first backup (still running, or a wrong xid); `walvault wal-inspect` lists transactions"
                ))
            }),
        Target::Name(n) => sums
            .iter()
            .flat_map(|s| s.restore_points.iter())
            .rfind(|r| &r.name == n)
            .map(|r| found(r.lsn, r.end))
            .ok_or_else(|| {
                refuse(format!(
                    "no restore point named {n:?} in the archived WAL after the first backup"
                ))
            }),
        _ => Ok(ResolvedTarget {
            record_lsn: None,
            end_lsn: None,
        }),
    }
}

/// Everything restore-pitr will do.
#[derive(Debug, Clone)]
pub struct PitrPlan {
    /// The backup restored.
    pub backup: Manifest,
    /// The target.
    pub target: Target,
    /// Stop just before the target instead of just after.
    pub exclusive: bool,
    /// Timeline recovery follows.
    pub timeline: u32,
    /// WAL files to fetch, in replay order (the last may be a `.partial`).
    pub segments: Vec<String>,
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

/// Why a target cannot be reached (refused before anything is written).
fn refuse(msg: String) -> ArchiveError {
    ArchiveError::Permanent(msg)
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
) -> Result<PitrPlan, ArchiveError> {
    let paths = StanzaPaths::new(stanza);
    let backups = Manifest::load_all(repo, &paths).await?;
    let Some(newest) = backups.last() else {
        return Err(refuse(format!(
            "stanza {stanza} has no backups: nothing to recover from"
        )));
    };
    let seg = WalSegSize::new(u64::from(newest.wal_segment_size))
        .map_err(|e| refuse(format!("backup {}: {e}", newest.id)))?;
    let cat = WalCatalog::load(repo, &paths, seg).await?;
    let requested: Option<&Manifest> = match backup_id {
        Some(id) if id != "latest" => Some(
            backups
                .iter()
                .find(|b| b.id == id)
                .ok_or_else(|| refuse(format!("no backup {id} in stanza {stanza}")))?,
        ),
        _ => None,
    };
    let tli = match timeline {
        TimelineChoice::Latest => cat.newest_timeline(),
        TimelineChoice::Current => requested.unwrap_or(newest).timeline,
        TimelineChoice::Id(n) => n,
    };
    let path = cat.path_to(tli)?;
    let on_path = |b: &Manifest| {
        path.contains(
            TimelineId::new(b.timeline).unwrap_or(TimelineId::FIRST),
            Lsn(b.start_lsn),
        )
    };

    // the LSN the WAL must reach, and the latest consistency point allowed
    let archive_end_seg = cat.newest_segment(path.last().get());
    let (need_until, stop_before): (Option<Lsn>, Option<Lsn>) = match target {
        Target::Lsn(l) => (Some(*l), Some(*l)),
        Target::Immediate | Target::Latest => (None, None),
        Target::Time(_) | Target::Xid(_) | Target::Name(_) => {
            let first = backups
                .iter()
                .filter(|b| on_path(b))
                .map(|b| Lsn(b.start_lsn).segment(seg).0)
                .min()
                .ok_or_else(|| refuse(format!("no backup lies on the path to timeline {tli}")))?;
            // what the archive holds from there (a gap only matters if it
            // lies between the chosen backup and the target: checked below)
            let names: Vec<String> = (first..=archive_end_seg.unwrap_or(first))
                .filter_map(|s| cat.stored_name(s, path.timeline_of(crate::pg::SegmentNo(s)).get()))
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
                (_, Some(l)) => Lsn(b.stop_lsn) <= l,
                _ => true,
            }
    };
    let backup = match requested {
        Some(b) => {
            if !fits(b) {
                return Err(refuse(format!(
                    "backup {} cannot reach {target}: it becomes consistent at {} ({}) on timeline {}, which is {}",
                    b.id,
                    Lsn(b.stop_lsn),
                    micros_to_text(b.stop_time),
                    b.timeline,
                    if on_path(b) { "after the target".to_owned() } else { format!("not on the path to timeline {tli}") }
                )));
            }
            b.clone()
        }
        None => match backups.iter().rev().find(|b| fits(b)) {
            Some(b) => b.clone(),
            None => {
                let first = backups.iter().find(|b| on_path(b));
                return Err(refuse(match first {
                    Some(f) => format!(
                        "{target} is before the first usable backup {} became consistent ({} at {}): no backup can restore to it",
                        f.id,
                        micros_to_text(f.stop_time),
                        Lsn(f.stop_lsn)
                    ),
                    None => format!("no backup lies on the path to timeline {tli}"),
                }));
            }
        },
    };

    // the segments, from the backup's start through the target (or the end)
    let first = Lsn(backup.start_lsn).segment(seg).0;
    let last = match (target, need_until) {
        (Target::Immediate, _) => Lsn(backup.stop_lsn).segment(seg).0,
        (_, Some(l)) => l.segment(seg).0,
        _ => archive_end_seg.unwrap_or(first),
    };
    let end_seg = archive_end_seg.unwrap_or(0);
    if last > end_seg && !matches!(target, Target::Immediate) {
        return Err(refuse(format!(
            "{target} is beyond the archive: the newest WAL on the path to timeline {tli} is {} — use --latest or an earlier target",
            archive_end_seg.map(|s| cat.name(s, path.last().get())).unwrap_or_else(|| "nothing".into())
        )));
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
    first: u64,
    last: u64,
) -> Result<Vec<String>, ArchiveError> {
    let mut out = Vec::new();
    for s in first..=last {
        let t = path.timeline_of(crate::pg::SegmentNo(s)).get();
        match cat.stored_name(s, t) {
            Some(n) => out.push(n),
            None => {
                return Err(refuse(format!(
                    "WAL segment {} is not in the repository, and recovery must pass through it; \
                     `walvault wal-verify` lists every gap — choose a target before it or a backup after it",
                    cat.name(s, t)
                )))
            }
        }
    }
    Ok(out)
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
pub fn parse_target_time(s: &str, default_offset: Option<&str>) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
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
        .ok_or_else(|| format!("{s:?} is not a time (2026-11-23 14:05:00+00, or ISO 8601)"))?;
    let zone = match (zone, default_offset) {
        (Some(z), _) => z,
        (None, Some(d)) if ["UTC", "GMT", "utc", "Z"].contains(&d) => "+00".to_owned(),
        (None, Some(d)) => d.to_owned(),
        (None, None) => {
            return Err(format!(
                "{s:?} has no time zone; add one (2026-11-23 14:05:00+00) or give --timezone"
            ))
        }
    };
    let offset = parse_offset(&zone)
        .ok_or_else(|| format!("time zone {zone:?}: give an offset like +02:00, or UTC"))?;
    naive
        .and_local_timezone(offset)
        .single()
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| format!("{s:?} is not a valid time"))
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
            .contains("no time zone"));
        let frac = parse_target_time("2026-11-23 14:05:00.123456+00", None).unwrap();
        assert_eq!(frac.timestamp_subsec_micros(), 123456);
        assert!("latest".parse::<TimelineChoice>().is_ok());
        assert_eq!(
            "3".parse::<TimelineChoice>().unwrap(),
            TimelineChoice::Id(3)
        );
        assert!("0".parse::<TimelineChoice>().is_err());
    }
}
