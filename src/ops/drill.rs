//! `walvault drill`: proof that recovery works. It picks a moment (random
//! inside the recovery window by default), recovers to it into a scratch
//! directory through [`crate::restore::recover`], runs PostgreSQL there on
//! a private socket, runs the user's SQL checks, counts every table's rows,
//! runs `pg_amcheck` when installed and `pg_checksums` after a clean stop,
//! removes the directory and records the result in `records/drill/`.
//!
//! A drill that cannot recover (a WAL segment gone, a damaged block, a
//! server that will not start) is not an error of the command: it is the
//! finding, recorded as a failed drill. Errors are what keeps the drill
//! from running at all (the repository unreachable, no scratch space).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::records::{self, DRILL};
use super::scratch::{self, quote, tail, Scratch};
use super::OpsError;
use crate::archive::catalog::WalCatalog;
use crate::pg::{ConnParams, PgConnection, QueryResult};
use crate::repo::{Manifest, Repository, StanzaPaths};
use crate::restore::fetch::Owner;
use crate::restore::pitr::{Target, TimelineChoice};
use crate::restore::recover::EventSink;
use crate::restore::recovery::TargetAction;
use crate::restore::server::{self, ServerOptions};
use crate::restore::{plan_recovery, recover, RecoverError, RecoverOptions};

/// The moment a drill recovers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrillTarget {
    /// A random moment inside the recovery window: from the oldest backup
    /// with WAL kept after it to the newest archived commit.
    Random,
    /// This moment.
    Time(DateTime<Utc>),
    /// Everything archived.
    Latest,
}

/// How to drill.
#[derive(Clone)]
pub struct DrillOptions {
    /// The moment.
    pub target: DrillTarget,
    /// The backup to restore (default: the newest that reaches the target).
    pub backup: Option<String>,
    /// Directory the scratch directory is made in.
    pub scratch: PathBuf,
    /// Directory of the server binaries (default: by the backup's major).
    pub pg_bin: Option<PathBuf>,
    /// OS user to run PostgreSQL as when running as root.
    pub run_as: Option<String>,
    /// Role the checks connect as (trust on the private socket).
    pub user: String,
    /// Database the SQL checks run in.
    pub database: String,
    /// Queries that must return true.
    pub sql: Vec<String>,
    /// Server settings for the scratch run (`shared_buffers = 128MB`, …).
    pub settings: Vec<(String, String)>,
    /// The `restore_command` the recovered server runs.
    pub restore_command: String,
    /// Fail when recovery takes longer.
    pub max_rto: Option<Duration>,
    /// Leave the scratch directory (stopped) for inspection.
    pub keep: bool,
    /// Receives the recovery's steps.
    pub events: Option<EventSink>,
}

/// How one check of a drill came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// It passed.
    Passed,
    /// It failed: recovery is not proven.
    Failed,
    /// It could not run here (a tool not installed, checksums off).
    Skipped,
}

/// One check of a drill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillCheck {
    /// `plan`, `recovery`, `sql: …`, `row counts`, `pg_amcheck`,
    /// `pg_checksums`.
    pub name: String,
    /// Its verdict.
    pub status: CheckStatus,
    /// What it found.
    pub detail: String,
}

/// What a drill did, as recorded in the repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    /// When it began.
    pub time: DateTime<Utc>,
    /// Every check passed.
    pub passed: bool,
    /// The backup restored (none when planning failed).
    pub backup: Option<String>,
    /// The target, in words.
    pub target: String,
    /// The last transaction recovered, as PostgreSQL logged it.
    pub recovered_to: Option<String>,
    /// The measured recovery time: planning, restore, WAL, replay,
    /// promotion.
    pub rto_seconds: Option<f64>,
    /// What the plan estimated.
    pub estimated_rto_seconds: Option<f64>,
    /// Time from the newest commit in the repository to the drill's start:
    /// what a recovery to the latest point would have lost (an upper bound;
    /// an idle database makes it look larger).
    pub rpo_seconds: Option<f64>,
    /// The checks, in the order they ran.
    pub checks: Vec<DrillCheck>,
    /// Rows of every table, `database.schema.table`.
    pub row_counts: BTreeMap<String, i64>,
    /// The whole drill, seconds.
    pub seconds: f64,
}

impl DrillRecord {
    /// The first failed check, in words.
    pub fn failure(&self) -> Option<String> {
        self.checks
            .iter()
            .find(|c| c.status == CheckStatus::Failed)
            .map(|c| format!("{}: {}", c.name, c.detail))
    }
}

/// Run a drill and record it (passed or failed) in the repository.
pub async fn drill(
    repo: Arc<Repository>,
    stanza: &str,
    opts: &DrillOptions,
) -> Result<DrillRecord, OpsError> {
    let started = Instant::now();
    let paths = StanzaPaths::new(stanza);
    let mut rec = DrillRecord {
        time: Utc::now(),
        passed: false,
        backup: None,
        target: String::new(),
        recovered_to: None,
        rto_seconds: None,
        estimated_rto_seconds: None,
        rpo_seconds: None,
        checks: Vec::new(),
        row_counts: BTreeMap::new(),
        seconds: 0.0,
    };
    let owner = scratch::owner(opts.run_as.as_deref()).map_err(OpsError::Drill)?;
    let (target, newest_commit, intended) = choose_target(&repo, &paths, opts).await?;
    rec.target = target.to_string();
    // the plan names the backup it restores; if planning fails, the failure
    // belongs to the backup it would have restored
    rec.backup = intended;
    rec.rpo_seconds =
        newest_commit.map(|c| (rec.time - c).to_std().map_or(0.0, |d| d.as_secs_f64()));
    let interrupted = super::scratch::on_interrupt();
    let scratch =
        Scratch::make(&opts.scratch, "walvault-drill-", owner).map_err(OpsError::Drill)?;
    let work = run(
        &repo, stanza, opts, &target, &scratch, owner, &mut rec, started,
    );
    let (outcome, stopped_by) = tokio::select! {
        r = work => (r, None),
        sig = interrupted => (Ok(()), Some(sig)),
    };
    if let Err(e) = outcome {
        rec.checks.push(DrillCheck {
            name: e.0.to_owned(),
            status: CheckStatus::Failed,
            detail: e.1,
        });
    }
    // whatever happened, no server is left running in the scratch directory
    let pid = scratch.pgdata.join("postmaster.pid");
    if pid.exists() {
        // (stopping needs only the binaries and the OS user)
        let sopts = ServerOptions {
            pg_bin: opts.pg_bin.clone(),
            run_as: owner.map(|_| opts.run_as.clone().unwrap_or_else(|| "postgres".into())),
            ..Default::default()
        };
        if stopped_by.is_some() {
            // leaving: no shutdown checkpoint
            let _ = server::stop_with(&scratch.pgdata, &sopts, "immediate").await;
        } else if let Err(e) = server::stop(&scratch.pgdata, &sopts).await {
            tracing::warn!(
                "drill: stopping the scratch server failed ({e}); stopping it immediately"
            );
            let _ = server::stop_with(&scratch.pgdata, &sopts, "immediate").await;
        }
    }
    if pid.exists() {
        // never delete a directory a server still runs on
        rec.checks.push(DrillCheck {
            name: "cleanup".into(),
            status: CheckStatus::Failed,
            detail: format!(
                "the scratch server on {} could not be stopped: stop it (pg_ctl -D {} stop -m immediate) and remove {}",
                scratch.pgdata.display(),
                scratch.pgdata.display(),
                scratch.root.display()
            ),
        });
    } else if opts.keep && stopped_by.is_none() {
        tracing::info!("drill: scratch directory kept: {}", scratch.root.display());
    } else {
        scratch.remove();
    }
    if let Some(sig) = stopped_by {
        // an interrupted drill says nothing about the backup: no record
        return Err(OpsError::Drill(
            match rec.checks.iter().find(|c| c.name == "cleanup") {
                Some(c) => format!("interrupted by {sig}; {}", c.detail),
                None => format!(
                    "interrupted by {sig}: the scratch server was stopped and {} removed",
                    scratch.root.display()
                ),
            },
        ));
    }
    rec.passed =
        !rec.checks.is_empty() && rec.checks.iter().all(|c| c.status != CheckStatus::Failed);
    rec.seconds = started.elapsed().as_secs_f64();
    records::store(&repo, &paths, DRILL, &rec).await?;
    Ok(rec)
}

/// A failed step: the check's name and what went wrong.
type Failed = (&'static str, String);

/// Plan, recover, check; each failure ends the drill as that check.
#[allow(clippy::too_many_arguments)]
async fn run(
    repo: &Arc<Repository>,
    stanza: &str,
    opts: &DrillOptions,
    target: &Target,
    scratch: &Scratch,
    owner: Option<Owner>,
    rec: &mut DrillRecord,
    started: Instant,
) -> Result<(), Failed> {
    let rp = plan_recovery(
        repo,
        stanza,
        target,
        false,
        TimelineChoice::Latest,
        opts.backup.as_deref(),
    )
    .await
    .map_err(|e| ("plan", e.to_string()))?;
    rec.backup = Some(rp.plan.backup.id.clone());
    rec.estimated_rto_seconds = Some(rp.estimate.as_secs_f64());
    rec.checks.push(DrillCheck {
        name: "plan".into(),
        status: CheckStatus::Passed,
        detail: format!(
            "backup {}, {} WAL file(s) on timeline {}",
            rp.plan.backup.id,
            rp.plan.segments.len(),
            rp.plan.timeline
        ),
    });
    let sopts = scratch
        .server_options(
            &rp.plan.backup,
            opts.pg_bin.clone(),
            opts.run_as.as_deref(),
            owner,
            &opts.settings,
        )
        .map_err(|e| ("recovery", e))?;
    let ropts = RecoverOptions {
        pgdata: scratch.pgdata.clone(),
        restore_command: opts.restore_command.clone(),
        archive_off: true,
        target_action: TargetAction::Promote,
        server: Some(sopts.clone()),
        rto_budget: opts.max_rto,
        events: opts.events.clone(),
        // a drill runs next to production: its scratch server takes no
        // quarter of the machine's memory (its measured RTO is then the
        // conservative one, without restore-pitr's recovery settings)
        no_tuning: true,
        tablespace_map: scratch.tablespaces(&rp.plan.backup),
        ..Default::default()
    };
    let report = match recover(repo.clone(), stanza, &rp, &ropts, started).await {
        Ok(r) => r,
        Err(RecoverError::OverBudget {
            took,
            budget,
            report,
        }) => {
            rec.rto_seconds = Some(report.total_seconds);
            rec.recovered_to = report.last_replayed_commit_time.clone();
            return Err((
                "rto",
                format!("the recovery took {took:.1} s, over the budget of {budget:.0} s"),
            ));
        }
        Err(e) => return Err(("recovery", e.to_string())),
    };
    rec.rto_seconds = Some(report.total_seconds);
    rec.recovered_to = report.last_replayed_commit_time.clone();
    rec.checks.push(DrillCheck {
        name: "recovery".into(),
        status: CheckStatus::Passed,
        detail: format!(
            "{} in {:.1} s (estimated {:.1} s){}",
            report.outcome,
            report.total_seconds,
            report.estimated_seconds,
            report
                .stop_detail
                .as_deref()
                .map(|d| format!("; {d}"))
                .unwrap_or_default()
        ),
    });
    let port = sopts.port.unwrap_or(5432);
    let conn = |db: &str| {
        let info = format!(
            "host='{}' port={port} user='{}' dbname='{}'",
            quote(&scratch.sock.display().to_string()),
            quote(&opts.user),
            quote(db)
        );
        async move {
            let p = ConnParams::parse(&info).map_err(|e| e.to_string())?;
            PgConnection::connect(&p, false)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let mut c = conn(&opts.database).await.map_err(|e| {
        (
            "connect",
            format!("cannot connect to the recovered server: {e}"),
        )
    })?;
    for sql in &opts.sql {
        rec.checks.push(sql_check(&mut c, sql).await);
    }
    c.close().await;
    match row_counts(&conn).await {
        Ok(counts) => {
            rec.checks.push(DrillCheck {
                name: "row counts".into(),
                status: CheckStatus::Passed,
                detail: format!(
                    "{} table(s), {} row(s)",
                    counts.len(),
                    counts.values().sum::<i64>()
                ),
            });
            rec.row_counts = counts;
        }
        Err(e) => rec.checks.push(DrillCheck {
            name: "row counts".into(),
            status: CheckStatus::Failed,
            detail: e,
        }),
    }
    let bin = server::bindir(&scratch.pgdata, opts.pg_bin.as_deref())
        .map_err(|e| ("recovery", e.to_string()))?;
    rec.checks.push(
        amcheck(
            &bin,
            &scratch.sock,
            port,
            &opts.user,
            sopts.run_as.as_deref(),
        )
        .await,
    );
    server::stop(&scratch.pgdata, &sopts)
        .await
        .map_err(|e| ("stop", e.to_string()))?;
    rec.checks
        .push(checksums(&bin, &scratch.pgdata, sopts.run_as.as_deref()).await);
    Ok(())
}

/// The drill's target, the newest archived commit (for the RPO), and the
/// backup that would reach the target.
async fn choose_target(
    repo: &Repository,
    paths: &StanzaPaths,
    opts: &DrillOptions,
) -> Result<(Target, Option<DateTime<Utc>>, Option<String>), OpsError> {
    let backups = Manifest::load_all_headers(repo, paths).await?;
    let Some(newest) = backups.last() else {
        return Err(OpsError::Drill(
            "there is no backup to drill: run `walvault backup` first".into(),
        ));
    };
    let cat = WalCatalog::load(repo, paths, newest.wal_segment_size).await?;
    let newest_commit = super::check::newest_archived_commit(repo, paths, &cat).await?;
    let target = match &opts.target {
        DrillTarget::Time(t) => Target::Time(*t),
        DrillTarget::Latest => Target::Latest,
        DrillTarget::Random => {
            // restore points keep only their own WAL: the window starts at
            // the oldest backup with all WAL after it
            let points = records::restore_points(repo, paths).await?;
            let from = backups
                .iter()
                .filter(|m| !points.contains(&m.id))
                .filter(|m| opts.backup.as_ref().is_none_or(|b| b == &m.id))
                .map(|m| m.stop_time)
                .min();
            match (from, newest_commit) {
                (Some(from), Some(to)) if to.timestamp_micros() > from => {
                    let span = (to.timestamp_micros() - from) as u64;
                    let at = from + (rand::random::<u64>() % span) as i64;
                    match DateTime::from_timestamp_micros(at) {
                        Some(t) => Target::Time(t),
                        None => Target::Latest,
                    }
                }
                // no transaction since the backup: everything archived
                _ => Target::Latest,
            }
        }
    };
    let intended = match (&opts.backup, &target) {
        (Some(b), _) => Some(b.clone()),
        (None, Target::Time(t)) => backups
            .iter()
            .rfind(|m| m.stop_time <= t.timestamp_micros())
            .map(|m| m.id.clone()),
        _ => Some(newest.id.clone()),
    };
    Ok((target, newest_commit, intended))
}

/// One user check: a query whose first column of its first row is true.
async fn sql_check(c: &mut PgConnection, sql: &str) -> DrillCheck {
    let (status, detail) = match c.simple_query(sql).await {
        Ok(r) => match first(&r, 0) {
            Some(v) if v == "t" => (CheckStatus::Passed, "true".to_owned()),
            Some(v) => (CheckStatus::Failed, format!("returned {v:?}, not true")),
            None => (
                CheckStatus::Failed,
                "returned no value, not true".to_owned(),
            ),
        },
        Err(e) => (CheckStatus::Failed, e.to_string()),
    };
    DrillCheck {
        name: format!("sql: {}", sql.trim()),
        status,
        detail,
    }
}

/// Rows of every ordinary table of every database that takes connections.
async fn row_counts<F, Fut>(conn: &F) -> Result<BTreeMap<String, i64>, String>
where
    F: Fn(&str) -> Fut,
    Fut: std::future::Future<Output = Result<PgConnection, String>>,
{
    let mut c = match conn("postgres").await {
        Ok(c) => c,
        Err(_) => conn("template1").await?,
    };
    let dbs = c
        .simple_query(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
        )
        .await
        .map_err(|e| e.to_string())?;
    c.close().await;
    let mut out = BTreeMap::new();
    for i in 0..dbs.rows.len() {
        let Some(db) = first(&dbs, i) else { continue };
        let mut c = conn(&db).await?;
        let tables = c
            .simple_query(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                 AND n.nspname NOT LIKE 'pg\\_toast%' ORDER BY 1",
            )
            .await
            .map_err(|e| format!("{db}: {e}"))?;
        for j in 0..tables.rows.len() {
            let Some(name) = first(&tables, j) else {
                continue;
            };
            let r = c
                .simple_query(&format!("SELECT count(*) FROM {name}"))
                .await
                .map_err(|e| format!("{db}.{name}: {e}"))?;
            let n = first(&r, 0).and_then(|v| v.parse().ok()).unwrap_or(0);
            out.insert(format!("{db}.{name}"), n);
        }
        c.close().await;
    }
    Ok(out)
}

/// The first column of row `i`, as text.
fn first(r: &QueryResult, i: usize) -> Option<String> {
    let v = r.rows.get(i)?.first()?.as_ref()?;
    Some(String::from_utf8_lossy(v).into_owned())
}

/// `pg_amcheck --all` on the running server (tables and B-tree indexes of
/// every database), when the binaries include it (PostgreSQL 14+).
async fn amcheck(
    bin: &Path,
    sock: &Path,
    port: u16,
    user: &str,
    run_as: Option<&str>,
) -> DrillCheck {
    let args: Vec<std::ffi::OsString> = vec![
        "-h".into(),
        sock.into(),
        "-p".into(),
        port.to_string().into(),
        "-U".into(),
        user.into(),
        "--all".into(),
        "--install-missing".into(),
    ];
    run_tool(
        bin,
        "pg_amcheck",
        &args,
        run_as,
        "every table and B-tree index of every database is consistent",
        None,
    )
    .await
}

/// `pg_checksums --check` on the stopped directory.
async fn checksums(bin: &Path, pgdata: &Path, run_as: Option<&str>) -> DrillCheck {
    let args: Vec<std::ffi::OsString> = vec!["--check".into(), "-D".into(), pgdata.into()];
    run_tool(
        bin,
        "pg_checksums",
        &args,
        run_as,
        "every page's checksum is correct",
        Some((
            "checksums are not enabled",
            "data checksums are not enabled in this cluster",
        )),
    )
    .await
}

/// Run `program` of the server's binaries as a check: passed when it exits
/// 0, skipped when it is not installed or its output says `skip.0` (then
/// with `skip.1` as the detail), failed otherwise with its last lines.
async fn run_tool(
    bin: &Path,
    program: &str,
    args: &[std::ffi::OsString],
    run_as: Option<&str>,
    passed: &str,
    skip: Option<(&str, &str)>,
) -> DrillCheck {
    let check = |status, detail: String| DrillCheck {
        name: program.to_owned(),
        status,
        detail,
    };
    if !bin.join(program).exists() {
        return check(
            CheckStatus::Skipped,
            format!("not installed in {}", bin.display()),
        );
    }
    let mut cmd = server::tool(bin, program, run_as);
    cmd.args(args);
    match cmd.output().await {
        Ok(o) if o.status.success() => check(CheckStatus::Passed, passed.to_owned()),
        Ok(o) => match skip {
            Some((needle, why)) if tail(&o, 3).contains(needle) => {
                check(CheckStatus::Skipped, why.to_owned())
            }
            _ => check(CheckStatus::Failed, tail(&o, 5)),
        },
        Err(e) => check(CheckStatus::Failed, format!("cannot run it: {e}")),
    }
}
