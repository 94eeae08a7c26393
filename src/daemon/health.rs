//! The health evaluation: every check interval (and after each job) the
//! check of `ops::check`, the backups, the recovery window, WAL gaps, the
//! copies, the budgets, the RTO-driven backup, the alerts and the status
//! file, all into the status model.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::alerts::{Alerter, Sink};
use super::jobs::JobKind;
use super::status::{ActiveAlert, BackupView, CopyView, GapView, Health, RunState};
use super::supervisor::{Context, Control, CopyTarget};
use crate::ops::check::{CheckReport, Level};
use crate::ops::records;
use crate::repo::{Manifest, StanzaPaths};

/// Evaluate health every check interval (and after each job): the check,
/// the backups, the window, the gaps, the copies, budgets, the RTO-driven
/// backup, alerts, the status file.
pub(super) async fn health_loop(c: Control, alerter: Alerter) -> Alerter {
    let i = &c.inner;
    let mut state = State {
        alerter,
        sinks: i.ctx.sinks.iter().cloned().map(Sink::new).collect(),
        refreshes: 0,
        from_views: BTreeMap::new(),
    };
    let mut tick: u64 = 0;
    let mut refresh = true;
    // a starting stream is not an outage: the first evaluation waits for
    // it to connect (at most 15 s)
    if i.ctx.stream.is_some() {
        let mut changes = i.hub.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !i.hub.snapshot().stream.up {
            tokio::select! {
                _ = i.cancel.cancelled() => return state.alerter,
                _ = tokio::time::sleep_until(deadline) => break,
                r = changes.changed() => if r.is_err() { break },
            }
        }
    }
    loop {
        evaluate(&c, &mut state, refresh).await;
        tick += 1;
        // what the repository holds (manifests, WAL listing, summaries) is
        // read again every fourth check, and at once after a job: on S3
        // each read is requests
        refresh = tick % 4 == 0;
        tokio::select! {
            _ = i.cancel.cancelled() => return state.alerter,
            _ = tokio::time::sleep(i.plan.check_interval) => {}
            _ = i.wake.notified() => refresh = true,
        }
    }
}

/// What the health evaluation keeps between checks.
struct State {
    alerter: Alerter,
    sinks: Vec<Sink>,
    /// Views read so far (the repository's size and the copies are read
    /// every few of them).
    refreshes: u64,
    /// The conditions the last views found (WAL gaps, an unreadable
    /// repository), held until the next views.
    from_views: BTreeMap<String, String>,
}

/// Map a check's finding to the budget it judges.
fn budget_of(check: &str) -> Option<&'static str> {
    match check {
        "rpo" => Some("max_rpo"),
        "rto" => Some("max_rto"),
        "newest backup" => Some("max_backup_age"),
        "last drill" => Some("max_drill_age"),
        _ => None,
    }
}

async fn evaluate(c: &Control, st: &mut State, refresh: bool) {
    let i = &c.inner;
    let ctx = &i.ctx;
    let paths = StanzaPaths::new(&ctx.stanza);
    let report =
        crate::ops::check::check(&ctx.repo, &ctx.stanza, &ctx.params, &ctx.slot, &ctx.budgets)
            .await;
    let mut conditions: BTreeMap<String, String> = BTreeMap::new();
    let (report, check_error) = match report {
        Ok(r) => (Some(r), None),
        Err(e) => {
            let e = e.to_string();
            tracing::warn!("health check failed: {e}");
            conditions.insert(
                "check:error".into(),
                format!("the health check cannot run: {e}"),
            );
            (None, Some(e))
        }
    };
    // not while expire deletes: WAL listed half-way through its deletions,
    // against the backups or the window listed before them, shows gaps
    // that are not there (the views are read again when it ends)
    let views = match (refresh, i.exclusive.try_read()) {
        (true, Ok(_shared)) => {
            st.refreshes += 1;
            Some(load_views(ctx, &paths, st.refreshes - 1).await)
        }
        _ => None,
    };
    let mut breached: Vec<&'static str> = Vec::new();
    let configured = i.hub.snapshot().budgets;
    if let Some(r) = &report {
        for f in &r.findings {
            let budget = budget_of(f.check).filter(|b| configured.contains_key(b));
            match (f.level, budget) {
                (Level::Breach, Some(b)) => {
                    breached.push(b);
                    conditions.insert(format!("budget:{b}"), format!("{}: {}", f.check, f.detail));
                }
                (Level::Breach, None) => {
                    conditions.insert(
                        format!("check:{}", f.check),
                        format!("{}: {}", f.check, f.detail),
                    );
                }
                (Level::Warning, _) if f.check == "synchronous" => {
                    conditions.insert(
                        "stream:synchronous".into(),
                        format!("synchronous: {}", f.detail),
                    );
                }
                (Level::Warning, _) if f.check == "slot" => {
                    conditions.insert("slot:retention".into(), format!("slot: {}", f.detail));
                }
                _ => {}
            }
        }
    }
    if let Some(views) = &views {
        st.from_views.clear();
        if let Ok(v) = views {
            if !v.gaps.is_empty() {
                let g: Vec<String> = v
                    .gaps
                    .iter()
                    .map(|g| format!("{}..{}", g.from, g.to))
                    .collect();
                st.from_views.insert(
                    "wal:gap".into(),
                    format!("WAL missing from the repository: {}", g.join(", ")),
                );
            }
        }
        if let Err(e) = views {
            st.from_views.insert(
                "repository:unreadable".into(),
                format!("the repository cannot be read: {e}"),
            );
        }
    }
    conditions.extend(st.from_views.clone());
    let snap = i.hub.snapshot();
    for k in JobKind::ALL {
        if let Some(r) = snap.recent.iter().find(|r| r.kind == k) {
            if r.state == RunState::Failed {
                conditions.insert(
                    format!("job:{}", k.name()),
                    format!(
                        "the last {} failed: {}",
                        k.name(),
                        r.error.as_deref().unwrap_or("")
                    ),
                );
            }
        }
    }
    if snap.stream.enabled && !snap.stream.up {
        let limit = ctx.budgets.max_rpo.unwrap_or(Duration::from_secs(60));
        let down_for = snap
            .stream
            .since
            .map(|t| (Utc::now() - t).to_std().unwrap_or_default())
            .unwrap_or_default();
        if down_for > limit {
            conditions.insert(
                "stream:down".into(),
                format!(
                    "the WAL stream is down for {} s (longer than {} s){}",
                    down_for.as_secs(),
                    limit.as_secs(),
                    snap.stream
                        .last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
            );
        }
    }
    // RTO-driven backup: before the estimate exceeds the budget, when a
    // new backup would bring it back under
    if let (Some(r), Some(max)) = (&report, ctx.budgets.max_rto) {
        let max = max.as_secs_f64();
        let recently = i
            .rto_backup_end
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < i.plan.check_interval * 3);
        if r.rto_estimate_seconds > 0.9 * max && !i.hub.is_running(JobKind::Backup) && !recently {
            if r.rto_restore_seconds < 0.9 * max {
                let why = format!(
                    "estimated RTO {:.0} s would exceed max_rto {:.0} s (restoring the newest backup {:.0} s + replaying the WAL since it); a new backup brings it back to about {:.0} s",
                    r.rto_estimate_seconds, max, r.rto_restore_seconds, r.rto_restore_seconds
                );
                tracing::warn!("starting a backup early: {why}");
                i.hub
                    .update(|s| s.rto_backup = Some(format!("{}: {why}", Utc::now().to_rfc3339())));
                let _ = c.start(JobKind::Backup, "rto", Some(why));
            } else {
                conditions.insert(
                    "rto:unreachable".into(),
                    format!(
                        "restoring the newest backup alone is estimated at {:.0} s, over max_rto {:.0} s: a new backup cannot fix it (faster storage, more parallelism, or a larger budget)",
                        r.rto_restore_seconds, max
                    ),
                );
            }
        }
    }
    // stopping (a shutdown, or a reload once the jobs ended): the stream
    // and the jobs go away on purpose; what this check saw meanwhile is no
    // news for anyone
    if i.cancel.is_cancelled() {
        return;
    }
    for a in st.alerter.reconcile(&ctx.stanza, &conditions) {
        match a.state {
            super::alerts::AlertState::Firing => {
                tracing::warn!(key = a.key, "ALERT: {}", a.summary)
            }
            super::alerts::AlertState::Resolved => {
                tracing::info!(key = a.key, "resolved: {}", a.summary)
            }
        }
        for s in st.sinks.iter_mut() {
            s.send(&a);
        }
    }
    let health = health_words(&report, &check_error, &breached, &conditions);
    i.hub.update(|s| {
        s.health = health;
        s.breached = breached;
        if report.is_some() {
            s.checked_at = Some(Utc::now());
        }
        s.check = report.or(s.check.take());
        s.check_error = check_error;
        if let Some(Ok(v)) = views {
            s.window_start = s.check.as_ref().and_then(|c| c.recovery_window_start);
            // the newest moment recovery reaches: the newest archived commit,
            // or the newest backup's consistent point when nothing committed
            // since (an idle database, right after a backup)
            let newest_backup = v.backups.iter().map(|b| b.stop_time).max();
            s.window_end = v.window_end.max(newest_backup).max(s.window_start);
            s.backups = v.backups;
            s.gaps = v.gaps;
            if v.repository_bytes.is_some() {
                s.repository_bytes = v.repository_bytes;
                s.dedup_ratio = v.dedup_ratio;
            }
            if let Some(copies) = v.copies {
                s.copies = copies;
            }
        }
        s.alerts = st
            .alerter
            .active()
            .into_iter()
            .map(|(key, summary, since)| ActiveAlert {
                key,
                summary,
                since,
            })
            .collect();
    });
    if let Some(path) = &i.plan.status_file {
        crate::archive::stream::write_status(path, &i.hub.snapshot());
    }
}

fn health_words(
    report: &Option<CheckReport>,
    error: &Option<String>,
    breached: &[&'static str],
    conditions: &BTreeMap<String, String>,
) -> Health {
    if let Some(e) = error {
        return Health {
            state: "failing",
            words: format!("cannot check recoverability: {e}"),
        };
    }
    if !breached.is_empty() {
        return Health {
            state: "breached",
            words: format!("budget breached: {}", breached.join(", ")),
        };
    }
    if let Some((_, what)) = conditions.iter().next() {
        return Health {
            state: "failing",
            words: what.clone(),
        };
    }
    let warnings: Vec<&str> = report
        .iter()
        .flat_map(|r| r.findings.iter())
        .filter(|f| f.level == Level::Warning)
        .map(|f| f.check)
        .collect();
    if !warnings.is_empty() {
        return Health {
            state: "warning",
            words: format!("recoverable; look at: {}", warnings.join(", ")),
        };
    }
    Health {
        state: "healthy",
        words: "recoverable: every check passes and every budget holds".into(),
    }
}

/// What the health evaluation reads from the repositories.
struct Views {
    backups: Vec<BackupView>,
    window_end: Option<DateTime<Utc>>,
    gaps: Vec<GapView>,
    repository_bytes: Option<u64>,
    dedup_ratio: Option<f64>,
    copies: Option<Vec<CopyView>>,
}

/// Read the views; `n` counts the reads (the repository's size is listed
/// every 30th, the copies read every 6th).
async fn load_views(ctx: &Context, paths: &StanzaPaths, n: u64) -> Result<Views, String> {
    let repo = &ctx.repo;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let manifests = Manifest::load_all_headers(repo, paths)
        .await
        .map_err(|x| e(&x))?;
    let status = crate::ops::status::backup_status(repo, paths)
        .await
        .map_err(|x| e(&x))?;
    let points = records::restore_points(repo, paths)
        .await
        .map_err(|x| e(&x))?;
    let time = |us: i64| DateTime::from_timestamp_micros(us).unwrap_or_default();
    let backups: Vec<BackupView> = manifests
        .iter()
        .map(|m| {
            let st = status.get(&m.id);
            BackupView {
                id: m.id.clone(),
                label: m.label.clone(),
                start_time: time(m.start_time),
                stop_time: time(m.stop_time),
                start_lsn: m.start_lsn.to_string(),
                stop_lsn: m.stop_lsn.to_string(),
                timeline: m.timeline.get(),
                bytes: m.totals.logical_bytes,
                new_bytes: m.totals.new_stored_bytes,
                kept_by: st
                    .and_then(|s| s.retention.as_ref())
                    .map(|k| k.rules.clone())
                    .unwrap_or_default(),
                point: points.contains(&m.id),
                held: st.is_some_and(|s| !s.holds.is_empty()),
                verified: st.and_then(|s| s.last_verify.as_ref()).map(|v| v.ok),
            }
        })
        .collect();
    let (mut window_end, mut gaps) = (None, Vec::new());
    if let Some(newest) = manifests.last() {
        let cat = crate::archive::catalog::WalCatalog::load(repo, paths, newest.wal_segment_size)
            .await
            .map_err(|x| e(&x))?;
        window_end = crate::ops::check::newest_archived_commit(repo, paths, &cat)
            .await
            .map_err(|x| e(&x))?
            .or(Some(time(newest.stop_time)));
        let opts = crate::archive::verify::WalVerifyOptions {
            read_content: false,
            parallel: 8,
            points: points.clone(),
            ..Default::default()
        };
        let r = crate::archive::verify::wal_verify(repo, &ctx.stanza, &opts)
            .await
            .map_err(|x| e(&x))?;
        // LSN → time, interpolated between the backups' known points
        let known: Vec<(u64, i64)> = manifests
            .iter()
            .flat_map(|m| {
                [
                    (m.start_lsn.get(), m.start_time),
                    (m.stop_lsn.get(), m.stop_time),
                ]
            })
            .collect();
        let at = |lsn: u64| -> Option<DateTime<Utc>> {
            let before = known.iter().filter(|k| k.0 <= lsn).max_by_key(|k| k.0);
            let after = known.iter().filter(|k| k.0 >= lsn).min_by_key(|k| k.0);
            match (before, after) {
                (Some(a), Some(b)) if b.0 > a.0 => Some(time(
                    a.1 + ((b.1 - a.1) as f64 * (lsn - a.0) as f64 / (b.0 - a.0) as f64) as i64,
                )),
                (Some(a), _) => Some(time(a.1)),
                (None, Some(b)) => Some(time(b.1)),
                _ => None,
            }
        };
        gaps = r
            .gaps
            .iter()
            .map(|g| GapView {
                from: g.from.to_string(),
                to: g.to.to_string(),
                segments: g.segments,
                start_time: file_lsn(&g.from).and_then(at),
                end_time: file_lsn(&g.to).and_then(at).or(window_end),
            })
            .collect();
    }
    // the whole repository's size: a listing, so not every tick
    let (mut repository_bytes, mut dedup_ratio) = (None, None);
    if n % 30 == 0 {
        let objects = crate::storage::list_all(repo.storage().as_ref(), "")
            .await
            .map_err(|x| e(&x))?;
        let total: u64 = objects.iter().map(|o| o.size).sum();
        let logical: u64 = manifests.iter().map(|m| m.totals.logical_bytes).sum();
        let stored: u64 = manifests.iter().map(|m| m.totals.new_stored_bytes).sum();
        repository_bytes = Some(total);
        dedup_ratio = (stored > 0).then(|| logical as f64 / stored as f64);
    }
    let copies = if ctx.copies.is_empty() || n % 6 != 0 {
        None
    } else {
        let mut v = Vec::new();
        for t in &ctx.copies {
            v.push(copy_view(t, &manifests, paths).await);
        }
        Some(v)
    };
    Ok(Views {
        backups,
        window_end,
        gaps,
        repository_bytes,
        dedup_ratio,
        copies,
    })
}

/// Where a WAL file begins.
fn file_lsn(f: &crate::pg::WalFileName) -> Option<u64> {
    match f {
        crate::pg::WalFileName::Segment(s) | crate::pg::WalFileName::Partial(s) => {
            Some(s.start_lsn().get())
        }
        _ => None,
    }
}

async fn copy_view(t: &CopyTarget, main: &[Manifest], paths: &StanzaPaths) -> CopyView {
    let mut v = CopyView {
        name: t.name.clone(),
        location: t.location.clone(),
        ..Default::default()
    };
    let theirs = match (t.open)().await {
        Ok(r) => Manifest::load_all_headers(&r, paths)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match theirs {
        Err(e) => v.error = Some(e),
        Ok(theirs) => {
            let have: std::collections::HashSet<&str> =
                theirs.iter().map(|m| m.id.as_str()).collect();
            v.backups_behind = main
                .iter()
                .filter(|m| !have.contains(m.id.as_str()))
                .count();
            v.newest_backup = theirs.last().map(|m| m.id.clone());
            let newest_main = main.last().map(|m| m.stop_time);
            let newest_theirs = theirs.last().map(|m| m.stop_time);
            v.lag_seconds = match (newest_main, newest_theirs) {
                (Some(a), Some(b)) => Some(((a - b).max(0)) as f64 / 1e6),
                (Some(_), None) => None,
                _ => Some(0.0),
            };
            v.last_copy = newest_theirs.and_then(DateTime::from_timestamp_micros);
        }
    }
    v
}
