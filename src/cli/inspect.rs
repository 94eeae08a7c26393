//! `walvault wal-inspect`: the options and the printing; the search is
//! `archive::inspect`.

use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::Args;

use super::duration::parse_duration;
use super::output::outln;
use super::Settings;
use crate::archive::inspect::{inspect, Event, Query};
use crate::pg::TimelineId;
use crate::restore::pitr::parse_target_time;

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
    let query = Query {
        from,
        to,
        xid: args.xid,
        timeline: args.timeline,
    };
    let found = inspect(&repo, &settings.stanza, &query).await?;
    for e in &found.events {
        if args.json {
            outln!("{}", event_json(e))?;
        } else {
            outln!("{}", event_line(e))?;
        }
    }
    if found.events.is_empty() && !args.json {
        eprintln!(
            "nothing archived matches (the archive spans {} segment(s) on timeline {})",
            found.segments, found.timeline
        );
    }
    Ok(())
}

/// One event as a JSON object (`event` is COMMIT, ABORT, … or RESTORE POINT).
pub(super) fn event_json(e: &Event) -> serde_json::Value {
    match e {
        Event::Xact {
            kind,
            time,
            xid,
            lsn,
            end_lsn,
            database_oid,
            dropped,
            subtransactions,
            timeline,
        } => serde_json::json!({
            "event": kind, "time": time, "xid": xid, "lsn": lsn.to_string(),
            "end_lsn": end_lsn.to_string(), "database_oid": database_oid, "dropped": dropped,
            "subtransactions": subtransactions, "timeline": timeline,
        }),
        Event::RestorePoint {
            time,
            name,
            lsn,
            timeline,
        } => serde_json::json!({
            "event": "RESTORE POINT", "time": time, "name": name, "lsn": lsn.to_string(), "timeline": timeline,
        }),
    }
}

/// One event as a line of text.
pub(super) fn event_line(e: &Event) -> String {
    match e {
        Event::Xact {
            kind,
            time,
            xid,
            lsn,
            database_oid,
            dropped,
            ..
        } => {
            let mut line = format!(
                "{time}  {kind:<15} xid {xid:<10} lsn {:<12}",
                lsn.to_string()
            );
            if let Some(db) = database_oid {
                line.push_str(&format!(" db {db}"));
            }
            if !dropped.is_empty() {
                line.push_str(&format!("  DROPPED {}", dropped.join(", ")));
            }
            line.trim_end().to_owned()
        }
        Event::RestorePoint {
            time, name, lsn, ..
        } => format!("{time}  RESTORE POINT   {name:?} lsn {lsn}"),
    }
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
