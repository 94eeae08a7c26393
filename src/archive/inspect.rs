//! What happened in the archived WAL (`wal-inspect`): transaction ends with
//! their times, xids, LSNs, databases and dropped tables (named from the
//! backups' catalogs), and restore points, read from the segment summaries.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::catalog::WalCatalog;
use super::ArchiveError;
use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileName};
use crate::repo::{Manifest, Repository, StanzaPaths};
use crate::wal::records::{pg_time, XactKind};

/// What to look for: events inside `[from, to]` (either end open), or one
/// transaction.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Earliest time shown.
    pub from: Option<DateTime<Utc>>,
    /// Latest time shown.
    pub to: Option<DateTime<Utc>>,
    /// Only this transaction (times are then ignored).
    pub xid: Option<u32>,
    /// Timeline to read along (default: the newest).
    pub timeline: Option<TimelineId>,
}

/// One event in the WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A transaction ended.
    Xact {
        /// COMMIT, ABORT, COMMIT PREPARED, ABORT PREPARED.
        kind: &'static str,
        /// When (RFC 3339).
        time: String,
        /// The transaction.
        xid: u32,
        /// Its commit or abort record.
        lsn: Lsn,
        /// The record's end (a target LSN just after it).
        end_lsn: Lsn,
        /// Its database, when the record names it.
        database_oid: Option<u32>,
        /// Tables it dropped, by name when a backup's catalog knew them.
        dropped: Vec<String>,
        /// Subtransactions.
        subtransactions: usize,
        /// Timeline of the segment it is in.
        timeline: TimelineId,
    },
    /// `pg_create_restore_point`.
    RestorePoint {
        /// When (RFC 3339).
        time: String,
        /// The name.
        name: String,
        /// The record.
        lsn: Lsn,
        /// Timeline of the segment it is in.
        timeline: TimelineId,
    },
}

/// The events found, in WAL order.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// What matched.
    pub events: Vec<Event>,
    /// Segments read.
    pub segments: usize,
    /// The timeline read along.
    pub timeline: TimelineId,
}

/// Errors of [`inspect`] beyond the archive's.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Reading the archive failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Nothing to read along.
    #[error("stanza {0} has no backups")]
    NoBackups(String),
}

impl From<crate::repo::RepoError> for InspectError {
    fn from(e: crate::repo::RepoError) -> InspectError {
        InspectError::Archive(e.into())
    }
}

/// Search the stanza's archived WAL.
pub async fn inspect(
    repo: &Repository,
    stanza: &str,
    query: &Query,
) -> Result<Inspection, InspectError> {
    let paths = StanzaPaths::new(stanza);
    let backups = Manifest::load_all_headers(repo, &paths).await?;
    let Some(newest) = backups.last() else {
        return Err(InspectError::NoBackups(stanza.to_owned()));
    };
    let cat = WalCatalog::load(repo, &paths, newest.wal_segment_size).await?;
    let tli = query.timeline.unwrap_or_else(|| cat.newest_timeline());
    let path = cat.path_to(tli)?;
    // every segment on the path that the repository holds
    let first = path
        .steps
        .iter()
        .filter_map(|(t, _, _)| {
            cat.full
                .get(t)
                .and_then(|s| s.first())
                .into_iter()
                .chain(cat.partial.get(t).and_then(|s| s.first()))
                .min()
                .copied()
        })
        .min()
        .unwrap_or(SegmentNo(0));
    let last = cat.newest_segment(path.last()).unwrap_or(first);
    let names: Vec<WalFileName> = (first.0..=last.0)
        .map(SegmentNo)
        .filter_map(|s| cat.stored_name(s, path.timeline_of(s)))
        .collect();
    let sums = super::summaries::load_path(repo, &paths, &names, 16).await?;

    // relfilenode → name, newest backup first
    let mut names_by_file: HashMap<(u32, u32), String> = HashMap::new();
    for b in backups.iter().rev() {
        for r in &b.relnames {
            names_by_file
                .entry((r.db, r.relfilenode))
                .or_insert_with(|| r.name.clone());
        }
    }
    let in_window = |us: i64| {
        let Some(t) = pg_time(us) else { return false };
        query.from.is_none_or(|f| t >= f) && query.to.is_none_or(|e| t <= e)
    };
    let text_time = |us: i64| pg_time(us).map(|t| t.to_rfc3339()).unwrap_or_default();
    let mut events = Vec::new();
    for s in &sums {
        for x in &s.xacts {
            let wanted = match query.xid {
                Some(id) => id == x.xact.xid,
                None => in_window(x.xact.time),
            };
            if !wanted {
                continue;
            }
            events.push(Event::Xact {
                kind: match x.xact.kind {
                    XactKind::Commit => "COMMIT",
                    XactKind::Abort => "ABORT",
                    XactKind::CommitPrepared => "COMMIT PREPARED",
                    XactKind::AbortPrepared => "ABORT PREPARED",
                },
                time: text_time(x.xact.time),
                xid: x.xact.xid,
                lsn: x.lsn,
                end_lsn: x.end,
                database_oid: x.xact.db,
                dropped: x
                    .xact
                    .dropped
                    .iter()
                    .map(|d| {
                        names_by_file
                            .get(&(d.db, d.rel))
                            .cloned()
                            .unwrap_or_else(|| format!("relfilenode {} (db {})", d.rel, d.db))
                    })
                    .collect(),
                subtransactions: x.xact.subxacts.len(),
                timeline: s.timeline,
            });
        }
        for r in &s.restore_points {
            if query.xid.is_some() || !in_window(r.time) {
                continue;
            }
            events.push(Event::RestorePoint {
                time: text_time(r.time),
                name: r.name.clone(),
                lsn: r.lsn,
                timeline: s.timeline,
            });
        }
    }
    Ok(Inspection {
        events,
        segments: names.len(),
        timeline: tli,
    })
}
