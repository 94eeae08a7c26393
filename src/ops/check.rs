//! `walvault check`: preflight and health in one report — the server as a
//! replication role and its WAL settings, the slot, the repository, the
//! newest backup's age, the current RPO, the estimated RTO of "recover to
//! now", the last verify — each judged against the budgets given.
//!
//! The RPO: with the stream connected through its slot, the bytes between
//! the server's flush position and the position the stream reported
//! durable, and PostgreSQL's own `flush_lag`; otherwise (stream stopped,
//! or `wal-push`) the bytes between the server's position and the end of
//! the WAL in the repository, and, when any are missing, the time since the
//! newest archived commit (or archive, per `pg_stat_archiver`): an upper
//! bound of what a crash now would lose.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::drill::DrillRecord;
use super::records::{self, VerifyRecord};
use super::OpsError;
use crate::archive::catalog::WalCatalog;
use crate::archive::stream::{StreamRecord, STREAM_RECORD};
use crate::pg::{ConnParams, Lsn, PgConnection, WalFileName};
use crate::repo::{Manifest, Repository, StanzaPaths};
use crate::restore::rates::RecoveryRates;

/// The budgets (none given: only reported). The same struct is `check`'s
/// flags, the `[budgets]` table of walvault.toml, and what the daemon
/// enforces.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, clap::Args, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    /// Breach when a crash now would lose more than this (e.g. 1m).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    #[serde(default, with = "crate::duration::text")]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub max_rpo: Option<Duration>,
    /// Breach when recovering to now is estimated to take longer (e.g. 15m).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    #[serde(default, with = "crate::duration::text")]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub max_rto: Option<Duration>,
    /// Breach when the newest backup is older (e.g. 26h).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    #[serde(default, with = "crate::duration::text")]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub max_backup_age: Option<Duration>,
    /// Breach when the newest drill is older, or failed (e.g. 8d).
    #[arg(long, value_parser = crate::duration::parse_duration)]
    #[serde(default, with = "crate::duration::text")]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub max_drill_age: Option<Duration>,
}

impl Budgets {
    /// Each budget given here, else the one in `fallback` (flags over the
    /// file).
    pub fn or(&self, fallback: &Budgets) -> Budgets {
        Budgets {
            max_rpo: self.max_rpo.or(fallback.max_rpo),
            max_rto: self.max_rto.or(fallback.max_rto),
            max_backup_age: self.max_backup_age.or(fallback.max_backup_age),
            max_drill_age: self.max_drill_age.or(fallback.max_drill_age),
        }
    }
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but should be looked at.
    Warning,
    /// A budget is exceeded, or recovery would fail.
    Breach,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: &'static str,
    /// The verdict.
    pub level: Level,
    /// What was found.
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// Every check.
    pub findings: Vec<Finding>,
    /// WAL the repository does not hold yet, bytes.
    pub rpo_bytes: u64,
    /// The same as time (an upper bound without a connected stream).
    pub rpo_seconds: f64,
    /// Estimated time to recover to now.
    pub rto_estimate_seconds: f64,
    /// `measured` or `assumed` rates behind it.
    pub rto_basis: &'static str,
    /// Age of the newest backup.
    pub newest_backup_age_seconds: Option<f64>,
    /// When the last verify ran and whether it passed.
    pub last_verify: Option<(DateTime<Utc>, bool)>,
    /// When the last drill ran and whether it passed.
    pub last_drill: Option<(DateTime<Utc>, bool)>,
    /// The last drill's measured recovery time.
    pub last_drill_rto_seconds: Option<f64>,
    /// Whether a stream is connected to the slot.
    pub stream_connected: bool,
    /// WAL the slot holds back on the server, bytes.
    pub slot_retained_bytes: Option<u64>,
    /// Part of the RTO estimate that restoring the newest backup's files
    /// takes (a new backup cannot bring the estimate below it).
    pub rto_restore_seconds: f64,
    /// The recovery window's start: the oldest backup with all WAL after
    /// it (its consistency time).
    pub recovery_window_start: Option<DateTime<Utc>>,
    /// Free space of a directory repository's file system, bytes.
    pub repository_free_bytes: Option<u64>,
    /// Free space of the file system holding pg_wal, when the server's
    /// data directory is on this host, bytes.
    pub pg_wal_free_bytes: Option<u64>,
}

impl CheckReport {
    /// Whether any budget is breached.
    pub fn breached(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Breach)
    }
}

fn verdict(over: bool) -> Level {
    if over {
        Level::Breach
    } else {
        Level::Ok
    }
}

/// Run every check of `stanza` against the server at `params`.
pub async fn check(
    repo: &Repository,
    stanza: &str,
    params: &ConnParams,
    slot: &str,
    budgets: &Budgets,
) -> Result<CheckReport, OpsError> {
    let paths = StanzaPaths::new(stanza);
    let mut findings = Vec::new();
    let mut add = |check: &'static str, level: Level, detail: String| {
        findings.push(Finding {
            check,
            level,
            detail,
        })
    };

    // the server, as a replication role
    let mut rc = PgConnection::connect(params, true).await?;
    let sys = rc.identify_system().await?;
    add(
        "server",
        Level::Ok,
        format!(
            "reachable as a replication role: system {}, timeline {}, WAL at {}",
            sys.system_id, sys.timeline, sys.xlogpos
        ),
    );
    let wal_level = rc.show("wal_level").await?;
    add(
        "wal_level",
        if wal_level == "minimal" {
            Level::Breach
        } else {
            Level::Ok
        },
        format!("{wal_level} (replica or logical is needed)"),
    );
    let senders: u32 = rc.show("max_wal_senders").await?.parse().unwrap_or(0);
    add(
        "max_wal_senders",
        if senders < 2 {
            Level::Warning
        } else {
            Level::Ok
        },
        format!("{senders} (a stream and a backup need 2)"),
    );
    let slots: u32 = rc.show("max_replication_slots").await?.parse().unwrap_or(0);
    add(
        "max_replication_slots",
        if slots < 1 { Level::Warning } else { Level::Ok },
        format!("{slots}"),
    );
    // the views of the same server (a multi-host conninfo names several)
    let params = &rc.server_params().clone();
    drop(rc);

    // the slot and the stream (a normal connection reads the views)
    crate::pg::validate_slot_name(slot).map_err(crate::pg::PgError::BadInput)?;
    let mut c = PgConnection::connect(params, false).await?;
    let q = c
        .simple_query(&format!(
            "SELECT s.active::text AS active, (pg_current_wal_lsn() - s.restart_lsn)::bigint::text AS retained, \
             s.wal_status, s.safe_wal_size::text AS safe, r.flush_lsn::text AS flush, \
             extract(epoch from r.flush_lag)::text AS lag, r.sync_state, current_setting('archive_mode') AS archive_mode, \
             current_setting('archive_command') AS archive_command \
             FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = '{slot}' \
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid"
        ))
        .await?;
    let text = |col: &str| q.text(0, col);
    let slot_exists = text("active").is_some();
    let stream_connected = text("active").as_deref() == Some("true");
    let archive_mode = text("archive_mode").unwrap_or_default();
    let pushes = text("archive_command").is_some_and(|c| c.contains("wal-push"));
    let slot_retained_bytes: Option<u64> = text("retained").and_then(|s| s.parse().ok());
    // how the stream that uses this slot last ran
    let mode = records::newest::<StreamRecord>(repo, &paths, STREAM_RECORD)
        .await?
        .filter(|m| m.slot == slot);
    if slot_exists {
        let retained: u64 = slot_retained_bytes.unwrap_or(0);
        let status = text("wal_status").unwrap_or_default();
        let level = match status.as_str() {
            "lost" => Level::Breach,
            "unreserved" => Level::Warning,
            _ => Level::Ok,
        };
        add(
            "slot",
            level,
            format!(
                "{slot}: {}, retains {} MiB of WAL, wal_status {status}{}",
                if stream_connected {
                    "stream connected"
                } else {
                    "no stream connected"
                },
                retained >> 20,
                text("safe")
                    .map(|s| format!(
                        ", {} MiB left before max_slot_wal_keep_size",
                        s.parse::<i64>().unwrap_or(0) >> 20
                    ))
                    .unwrap_or_default()
            ),
        );
    } else {
        // a stream that used this slot, and the repository's newest WAL:
        // after a failover the new primary has no slot, and nothing holds
        // its WAL for walvault until the stream reconnects to it
        let archived_tli = repo.wal_timelines(&paths).await?.into_iter().max();
        match &mode {
            Some(rec) => add(
                "slot",
                Level::Warning,
                format!(
                    "no slot {slot} on this server, though walvault stream uses it (started {} on {}){}: until the stream connects here \
                     (it creates the slot) nothing keeps this server from recycling WAL the repository lacks; point the stream at this server, \
                     or create the slot now: SELECT pg_create_physical_replication_slot('{slot}', true)",
                    rec.started_at.format("%Y-%m-%d %H:%M UTC"),
                    if rec.host.is_empty() { "an unnamed host" } else { &rec.host },
                    match archived_tli {
                        Some(t) if t < sys.timeline => format!(
                            "; the server is on timeline {}, the repository's WAL on timeline {t}: it was promoted (a failover?)",
                            sys.timeline
                        ),
                        _ => String::new(),
                    }
                ),
            ),
            None => add(
                "slot",
                if pushes { Level::Ok } else { Level::Warning },
                format!("no slot {slot} (walvault stream creates it)"),
            ),
        }
    }
    add(
        "wal mode",
        if stream_connected || (pushes && archive_mode != "off") {
            Level::Ok
        } else {
            Level::Breach
        },
        match (stream_connected, pushes, archive_mode.as_str()) {
            (true, _, _) => "walvault stream is connected".to_owned(),
            (false, true, "off") => "archive_command runs wal-push, but archive_mode is off".to_owned(),
            (false, true, m) => format!("archive_mode {m}, archive_command runs wal-push"),
            (false, false, _) => "nothing archives WAL: no stream is connected to the slot and archive_command does not run walvault wal-push".to_owned(),
        },
    );

    // the stream's mode against what the server waits for
    let sync_state = text("sync_state").unwrap_or_default();
    let waits = matches!(sync_state.as_str(), "sync" | "quorum" | "potential");
    match (&mode, stream_connected) {
        (Some(m), true) if waits && !m.synchronous => add(
            "synchronous",
            Level::Warning,
            format!(
                "the server waits for walvault's stream (sync_state {sync_state}), which runs without --synchronous: every commit waits up to its --partial-interval ({} s); restart the stream with --synchronous",
                m.partial_interval_seconds
            ),
        ),
        (Some(_), true) if waits => add(
            "synchronous",
            Level::Ok,
            format!("walvault is a synchronous standby (sync_state {sync_state}) streaming with --synchronous: RPO = 0"),
        ),
        (Some(m), true) if m.synchronous => add(
            "synchronous",
            Level::Warning,
            format!(
                "the stream runs with --synchronous but the server does not wait for it (sync_state {sync_state}): list {:?} in synchronous_standby_names for RPO = 0",
                m.application_name
            ),
        ),
        _ => {}
    }

    // the repository: writable, and its free space when it is a directory
    let probe = format!(
        "{}check-{}",
        paths.locks(),
        crate::codec::to_hex(&rand::random::<[u8; 8]>())
    );
    repo.storage()
        .put(&probe, bytes::Bytes::from_static(b"walvault check"))
        .await?;
    match repo.storage().delete(&probe).await {
        // a write-once repository keeps the probe until its lock ends
        Ok(()) | Err(crate::storage::StorageError::Locked { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let location = repo.storage().location();
    let repo_space = (!location.contains("://"))
        .then(|| free_space(std::path::Path::new(&location)))
        .flatten();
    add(
        "repository",
        repo_space.map_or(Level::Ok, |s| s.level()),
        match repo_space {
            Some(s) => format!("{location} is writable; {}", s.text()),
            None => format!("{location} is writable"),
        },
    );

    // the disk holding pg_wal, when the data directory is on this host
    // (reading data_directory needs pg_read_all_settings or a superuser)
    let data_dir = c
        .simple_query("SELECT current_setting('data_directory') AS d")
        .await
        .ok()
        .and_then(|q| q.text(0, "d"));
    let wal_space = data_dir
        .as_deref()
        .and_then(|d| free_space(&std::path::Path::new(d).join("pg_wal")));
    match (wal_space, &data_dir) {
        (Some(s), _) => add(
            "pg_wal disk",
            s.level(),
            format!("pg_wal's file system: {}", s.text()),
        ),
        (None, Some(d)) => add(
            "pg_wal disk",
            Level::Ok,
            format!(
                "not checked: the data directory {d} is not on this host (or not readable here)"
            ),
        ),
        (None, None) => add(
            "pg_wal disk",
            Level::Ok,
            "not checked: the role cannot read data_directory (grant pg_read_all_settings)".into(),
        ),
    }

    // backups
    let manifests = Manifest::load_all_headers(repo, &paths).await?;
    let now = Utc::now();
    let newest = manifests.last();
    // restore points keep only their own WAL: the window starts at the
    // oldest backup with all WAL after it
    let points = records::restore_points(repo, &paths).await?;
    let recovery_window_start = manifests
        .iter()
        .filter(|m| !points.contains(&m.id))
        .map(|m| m.stop_time)
        .min()
        .and_then(DateTime::from_timestamp_micros);
    let newest_age = newest.map(|m| (now.timestamp_micros() - m.stop_time) as f64 / 1e6);
    match (newest, newest_age) {
        (Some(m), Some(age)) => add(
            "newest backup",
            verdict(
                budgets
                    .max_backup_age
                    .is_some_and(|b| age > b.as_secs_f64()),
            ),
            format!(
                "{} is {:.0} s old{}",
                m.id,
                age,
                budget_text(budgets.max_backup_age)
            ),
        ),
        _ => add(
            "newest backup",
            Level::Breach,
            "the stanza has no backup: nothing can be recovered".into(),
        ),
    }

    // RPO
    let (mut rpo_bytes, mut rpo_seconds) = (0u64, 0f64);
    let flush: Option<Lsn> = text("flush").and_then(|s| s.parse().ok());
    if let (true, Some(f)) = (stream_connected, flush) {
        rpo_bytes = sys.xlogpos.checked_sub(f).unwrap_or(0);
        rpo_seconds = text("lag").and_then(|s| s.parse().ok()).unwrap_or(0.0);
    } else if let Some(m) = newest {
        let cat = WalCatalog::load(repo, &paths, m.wal_segment_size).await?;
        let tli = cat.newest_timeline();
        let end = match cat
            .newest_segment(tli)
            .and_then(|s| cat.stored_name(s, tli))
        {
            Some(WalFileName::Segment(f)) => f.next().start_lsn(),
            Some(name @ WalFileName::Partial(f)) => {
                crate::archive::summaries::load_path(repo, &paths, &[name], 1)
                    .await?
                    .first()
                    .and_then(|s| s.end_lsn)
                    // the next record begins at the next 8-byte boundary
                    .map(|l| Lsn::new(l.get().div_ceil(8) * 8))
                    .unwrap_or(f.start_lsn())
            }
            _ => m.stop_lsn,
        };
        rpo_bytes = sys.xlogpos.checked_sub(end).unwrap_or(0);
        if rpo_bytes > 0 {
            let newest_commit = newest_archived_commit(repo, &paths, &cat).await?;
            let archived = if pushes {
                last_archived(&mut c).await
            } else {
                None
            };
            let since = [
                newest_commit,
                archived,
                DateTime::from_timestamp_micros(m.stop_time),
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(now);
            rpo_seconds = (now - since).as_seconds_f64().max(0.0);
        }
    }
    add(
        "rpo",
        verdict(
            budgets
                .max_rpo
                .is_some_and(|b| rpo_seconds > b.as_secs_f64()),
        ),
        format!(
            "{} KiB of WAL not in the repository, {:.1} s{}",
            rpo_bytes >> 10,
            rpo_seconds,
            budget_text(budgets.max_rpo)
        ),
    );

    // RTO of "recover to now": the newest backup and all WAL since it
    let rates = RecoveryRates::load(repo, &paths).await;
    let (restore_bytes, wal_bytes) = newest.map_or((0, 0), |m| {
        (
            m.totals.logical_bytes,
            sys.xlogpos.checked_sub(m.start_lsn).unwrap_or(0),
        )
    });
    let rto = rates.estimate(restore_bytes, wal_bytes);
    add(
        "rto",
        verdict(budgets.max_rto.is_some_and(|b| rto > b.as_secs_f64())),
        format!(
            "recovering to now: {} MiB of files and {} MiB of WAL, estimated {:.0} s ({}){}",
            restore_bytes >> 20,
            wal_bytes >> 20,
            rto,
            rates.basis(),
            budget_text(budgets.max_rto)
        ),
    );

    // the last verify
    let last = records::newest::<VerifyRecord>(repo, &paths, records::VERIFY).await?;
    match &last {
        Some(v) => add(
            "last verify",
            if v.passed { Level::Ok } else { Level::Breach },
            format!(
                "{} at {}{}",
                if v.passed { "passed" } else { "FAILED" },
                v.time.to_rfc3339(),
                if v.passed {
                    String::new()
                } else {
                    format!(": {}", v.problems.join("; "))
                }
            ),
        ),
        None => add(
            "last verify",
            Level::Warning,
            "never verified: run walvault verify".into(),
        ),
    }

    // the last drill
    let drill = records::newest::<DrillRecord>(repo, &paths, records::DRILL).await?;
    let drill_age = drill
        .as_ref()
        .map(|d| (now - d.time).as_seconds_f64().max(0.0));
    match (&drill, drill_age) {
        (Some(d), Some(age)) => add(
            "last drill",
            if !d.passed || budgets.max_drill_age.is_some_and(|b| age > b.as_secs_f64()) {
                Level::Breach
            } else {
                Level::Ok
            },
            format!(
                "{} {:.0} s ago (to {}{}){}{}",
                if d.passed { "passed" } else { "FAILED" },
                age,
                d.target,
                d.rto_seconds
                    .map(|r| format!(", recovered in {r:.0} s"))
                    .unwrap_or_default(),
                d.failure().map(|f| format!(": {f}")).unwrap_or_default(),
                budget_text(budgets.max_drill_age)
            ),
        ),
        _ => add(
            "last drill",
            if budgets.max_drill_age.is_some() {
                Level::Breach
            } else {
                Level::Warning
            },
            "no drill has run: run walvault drill".into(),
        ),
    }

    Ok(CheckReport {
        findings,
        rpo_bytes,
        rpo_seconds,
        rto_estimate_seconds: rto,
        rto_basis: if rates.is_measured() {
            "measured"
        } else {
            "assumed"
        },
        newest_backup_age_seconds: newest_age,
        last_verify: last.map(|v| (v.time, v.passed)),
        last_drill_rto_seconds: drill.as_ref().and_then(|d| d.rto_seconds),
        last_drill: drill.map(|d| (d.time, d.passed)),
        stream_connected,
        slot_retained_bytes,
        rto_restore_seconds: rates.estimate(restore_bytes, 0),
        recovery_window_start,
        repository_free_bytes: repo_space.map(|s| s.free),
        pg_wal_free_bytes: wal_space.map(|s| s.free),
    })
}

/// Free space of a file system.
#[derive(Debug, Clone, Copy)]
struct Space {
    free: u64,
    total: u64,
}

/// Below this share free, a file system is a warning.
const LOW_SPACE: f64 = 0.10;

impl Space {
    fn share(self) -> f64 {
        self.free as f64 / self.total.max(1) as f64
    }

    fn level(self) -> Level {
        if self.share() < LOW_SPACE {
            Level::Warning
        } else {
            Level::Ok
        }
    }

    fn text(self) -> String {
        format!(
            "{} GiB free of {} GiB ({:.0} %{})",
            self.free >> 30,
            self.total >> 30,
            self.share() * 100.0,
            if self.share() < LOW_SPACE {
                ", below 10 %: free space or the next backup or WAL may not fit"
            } else {
                ""
            }
        )
    }
}

/// The free space (for an unprivileged user) of the file system holding
/// `path`, if it is on this host.
fn free_space(path: &std::path::Path) -> Option<Space> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = s.fragment_size().max(1) as u64;
    Some(Space {
        free: s.blocks_available() as u64 * frag,
        total: s.blocks() as u64 * frag,
    })
}

fn budget_text(b: Option<Duration>) -> String {
    b.map(|b| format!(" (budget {:.0} s)", b.as_secs_f64()))
        .unwrap_or_default()
}

/// `pg_stat_archiver.last_archived_time`.
async fn last_archived(c: &mut PgConnection) -> Option<DateTime<Utc>> {
    let q = c
        .simple_query(
            "SELECT extract(epoch from last_archived_time)::text AS t FROM pg_stat_archiver",
        )
        .await
        .ok()?;
    let secs: f64 = q.text(0, "t")?.parse().ok()?;
    DateTime::from_timestamp_micros((secs * 1e6) as i64)
}

/// The time of the newest commit in the newest archived segments (up to
/// 16 looked at).
pub(crate) async fn newest_archived_commit(
    repo: &Repository,
    paths: &StanzaPaths,
    cat: &WalCatalog,
) -> Result<Option<DateTime<Utc>>, OpsError> {
    let tli = cat.newest_timeline();
    let Some(last) = cat.newest_segment(tli) else {
        return Ok(None);
    };
    let names: Vec<WalFileName> = (last.0.saturating_sub(15)..=last.0)
        .rev()
        .filter_map(|s| cat.stored_name(crate::pg::SegmentNo(s), tli))
        .collect();
    let sums = crate::archive::summaries::load_path(repo, paths, &names, 4).await?;
    Ok(sums
        .iter()
        .flat_map(|s| s.xacts.iter())
        .filter_map(|x| crate::wal::records::pg_time(x.xact.time))
        .max())
}
