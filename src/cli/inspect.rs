//! `walvault wal-inspect`: what happened around a time, from the segment
//! summaries — transaction ends with their times, xids, LSNs, databases and
//! dropped tables (named from the backups' catalogs), and restore points.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::Args;

use super::duration::parse_duration;
use super::output::outln;
use super::Settings;
use crate::archive::catalog::WalCatalog;
use crate::pg::{SegmentNo, TimelineId, WalFileName};
use crate::repo::{Manifest, StanzaPaths};
use crate::restore::pitr::parse_target_time;
use crate::wal::records::{pg_time, XactKind};

/// Options of `walvault wal-inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Show what happened around this time (with --window).
    #[arg(long, conflicts_with_all = ["from", "xid"])]
    pub around: Option<String>,
    /// Half-width of the --around window (e.g. 5m, 30s, 1h).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub window: Duration,
    /// Start of the interval.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// End of the interval.
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// Show one transaction.
    #[arg(long)]
    pub xid: Option<u32>,
    /// Time zone of times given without one (+02:00, UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// Timeline to read along (default: the newest).
    #[arg(long)]
    pub timeline: Option<TimelineId>,
    /// One JSON object per event.
    #[arg(long)]
    pub json: bool,
}

/// `t` ± `window`; a window that reaches past the representable times is
/// an error, not a panic in the date arithmetic.
fn around(t: DateTime<Utc>, window: Duration) -> anyhow::Result<(DateTime<Utc>, DateTime<Utc>)> {
    let too_wide = || {
        anyhow::anyhow!(
            "--window {window:?} reaches past the times walvault can represent: give a shorter one"
        )
    };
    let w = chrono::Duration::from_std(window).map_err(|_| too_wide())?;
    Ok((
        t.checked_sub_signed(w).ok_or_else(too_wide)?,
        t.checked_add_signed(w).ok_or_else(too_wide)?,
    ))
}

pub(super) async fn run(settings: &Settings, args: InspectArgs) -> anyhow::Result<()> {
    let tz = args.timezone.as_deref();
    let time = |s: &str| parse_target_time(s, tz);
    let (from, to): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        match (&args.around, &args.from, &args.to) {
            (Some(a), _, _) => {
                let t = time(a)?;
                let (from, to) = around(t, args.window)?;
                (Some(from), Some(to))
            }
            (None, Some(f), Some(t)) => (Some(time(f)?), Some(time(t)?)),
            _ if args.xid.is_some() => (None, None),
            _ => bail!("give --around TIME, --from TIME --to TIME, or --xid XID"),
        };
    let repo = settings.open_repository().await?;
    let paths = StanzaPaths::new(&settings.stanza);
    let backups = Manifest::load_all(&repo, &paths).await?;
    let Some(newest) = backups.last() else {
        bail!("stanza {} has no backups", settings.stanza);
    };
    let seg = newest.wal_segment_size;
    let cat = WalCatalog::load(&repo, &paths, seg).await?;
    let tli = args.timeline.unwrap_or_else(|| cat.newest_timeline());
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
    let sums = crate::archive::summaries::load_path(&repo, &paths, &names, 16).await?;

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
        from.is_none_or(|f| t >= f) && to.is_none_or(|e| t <= e)
    };
    let mut shown = 0;
    for s in &sums {
        for x in &s.xacts {
            if args.xid.is_some_and(|id| id != x.xact.xid)
                || (args.xid.is_none() && !in_window(x.xact.time))
            {
                continue;
            }
            shown += 1;
            let kind = match x.xact.kind {
                XactKind::Commit => "COMMIT",
                XactKind::Abort => "ABORT",
                XactKind::CommitPrepared => "COMMIT PREPARED",
                XactKind::AbortPrepared => "ABORT PREPARED",
            };
            let dropped: Vec<String> = x
                .xact
                .dropped
                .iter()
                .map(|d| {
                    names_by_file
                        .get(&(d.db, d.rel))
                        .cloned()
                        .unwrap_or_else(|| format!("relfilenode {} (db {})", d.rel, d.db))
                })
                .collect();
            let t = pg_time(x.xact.time)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({
                        "event": kind, "time": t, "xid": x.xact.xid, "lsn": x.lsn.to_string(),
                        "end_lsn": x.end.to_string(), "database_oid": x.xact.db, "dropped": dropped,
                        "subtransactions": x.xact.subxacts.len(), "timeline": s.timeline,
                    })
                )?;
            } else {
                let mut line = format!(
                    "{t}  {kind:<15} xid {:<10} lsn {:<12}",
                    x.xact.xid,
                    x.lsn.to_string()
                );
                if let Some(db) = x.xact.db {
                    line.push_str(&format!(" db {db}"));
                }
                if !dropped.is_empty() {
                    line.push_str(&format!("  DROPPED {}", dropped.join(", ")));
                }
                outln!("{line}")?;
            }
        }
        for r in &s.restore_points {
            if args.xid.is_some() || !in_window(r.time) {
                continue;
            }
            shown += 1;
            let t = pg_time(r.time).map(|t| t.to_rfc3339()).unwrap_or_default();
            if args.json {
                outln!(
                    "{}",
                    serde_json::json!({"event": "RESTORE POINT", "time": t, "name": r.name, "lsn": r.lsn.to_string(), "timeline": s.timeline})
                )?;
            } else {
                outln!("{t}  RESTORE POINT   {:?} lsn {}", r.name, r.lsn)?;
            }
        }
    }
    if shown == 0 && !args.json {
        eprintln!(
            "nothing archived matches (the archive spans {} segment(s) on timeline {tli})",
            names.len()
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Regression: `--window` with a huge value overflowed a u64 multiply,
    /// and a window past chrono's range panicked in `t - w`.
    #[test]
    fn huge_windows_are_errors_not_panics() {
        let t = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for w in ["18446744073709551615m", "106751991167d", "9999999999w"] {
            match parse_duration(w) {
                Ok(d) => assert!(around(t, d).is_err(), "{w}"),
                Err(e) => assert!(e.to_string().contains("too long"), "{w}: {e}"),
            }
        }
        let (from, to) = around(t, parse_duration("5m").unwrap()).unwrap();
        assert_eq!((to - from).num_seconds(), 600);
    }
}
