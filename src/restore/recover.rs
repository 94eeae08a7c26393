//! Point-in-time recovery as one call: plan ([`plan_recovery`]), then
//! [`recover`] restores the files while the WAL is staged into the spool,
//! writes the recovery settings, and (with [`ServerOptions`]) runs
//! PostgreSQL to the target and measures the recovery time. `restore-pitr`,
//! the demo and drills call it; they only print.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::fetch::{Owner, SpoolWriter, SPOOL_DIR};
use super::pitr::{plan, PitrPlan, PlanError, Target, TimelineChoice};
use super::rates::RecoveryRates;
use super::recovery::{self, TargetAction};
use super::server::{self, Outcome, ServerOptions};
use super::{io, RestoreError, RestoreOptions};
use crate::pg::{Lsn, TimelineId, WalFileName};
use crate::progress::Progress;
use crate::repo::{Repository, StanzaPaths};

/// Why a recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The target cannot be reached: refused before anything was written.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Restoring the files or staging WAL failed; the directory is
    /// incomplete.
    #[error("{source}; {} is incomplete and must not be started: once the cause is fixed, remove it and run the recovery (restore-pitr) again", dir.display())]
    Incomplete {
        /// The data directory.
        dir: PathBuf,
        /// Cause.
        source: RestoreError,
    },
    /// Preparing the directory failed.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// The target directory holds files.
    #[error("{} is not empty; recover into an empty or new directory", .0.display())]
    NotEmpty(PathBuf),
    /// Asked to run PostgreSQL as root.
    #[error("starting the recovered server runs PostgreSQL, which refuses to run as root: run as the database's OS user (sudo -u postgres walvault …), or recover without starting it, chown the directory and start it yourself")]
    AsRoot,
    /// `run_as` names no OS user.
    #[error("there is no OS user {0:?} to run PostgreSQL as")]
    NoSuchUser(String),
    /// No server binaries for the backup's major version.
    #[error("no PostgreSQL {version} binaries in {}: give their directory with --pg-bin", dir.display())]
    NoBinaries {
        /// The major version (`PG_VERSION`).
        version: String,
        /// Where they were looked for.
        dir: PathBuf,
    },
    /// `pg_ctl` failed.
    #[error("pg_ctl {action} failed: {output}")]
    PgCtl {
        /// start, promote, stop.
        action: &'static str,
        /// What it printed.
        output: String,
    },
    /// The server paused at the target but would not promote.
    #[error("the server paused at the target, but pg_ctl promote failed: {output}; it is still paused: promote it with pg_ctl promote -D {}", pgdata.display())]
    PromoteFailed {
        /// What pg_ctl printed.
        output: String,
        /// The data directory.
        pgdata: PathBuf,
    },
    /// PostgreSQL stopped with an error before the target.
    #[error("recovery of backup {backup} failed: {line}\n--- {} (last lines) ---\n{tail}", log.display())]
    RecoveryFailed {
        /// The backup restored.
        backup: String,
        /// The FATAL or PANIC line.
        line: String,
        /// The server's log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// The recovery took longer than its budget.
    #[error("the recovery took {took:.0} s, over the RTO budget of {budget:.0} s")]
    OverBudget {
        /// Seconds it took.
        took: f64,
        /// Seconds allowed.
        budget: f64,
        /// The full report.
        report: Box<RecoveryReport>,
    },
}

/// A plan with its estimated recovery time.
#[derive(Debug, Clone)]
pub struct RecoveryPlan {
    /// Backup, timeline, WAL files.
    pub plan: PitrPlan,
    /// Estimated time to recover (whole segments: a little more than replay
    /// will cover).
    pub estimate: Duration,
    /// The rates the estimate comes from.
    pub rates: RecoveryRates,
    /// The timeline asked for (written as `recovery_target_timeline`).
    pub timeline_choice: TimelineChoice,
}

/// Plan a recovery of `stanza` to `target` and estimate its time; writes
/// nothing.
pub async fn plan_recovery(
    repo: &Repository,
    stanza: &str,
    target: &Target,
    exclusive: bool,
    timeline: TimelineChoice,
    backup: Option<&str>,
) -> Result<RecoveryPlan, RecoverError> {
    let plan = plan(repo, stanza, target, exclusive, timeline, backup).await?;
    let rates = RecoveryRates::load(repo, &StanzaPaths::new(stanza)).await;
    let estimate =
        Duration::try_from_secs_f64(rates.estimate(plan.restore_bytes, plan.wal_bytes()))
            .unwrap_or(Duration::MAX);
    Ok(RecoveryPlan {
        plan,
        estimate,
        rates,
        timeline_choice: timeline,
    })
}

/// A step of a recovery, reported as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryEvent {
    /// The files are restored (and the first WAL staged) in this time.
    Restored {
        /// Seconds.
        seconds: f64,
    },
    /// PostgreSQL is starting.
    ServerStarting,
    /// All the WAL the plan names is in the spool.
    WalStaged {
        /// Files.
        files: usize,
        /// Seconds since staging began.
        seconds: f64,
    },
    /// Recovery ended.
    Ended(Outcome),
}

impl std::fmt::Display for RecoveryEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryEvent::Restored { seconds } => write!(f, "files restored in {seconds:.1} s"),
            RecoveryEvent::ServerStarting => f.write_str("PostgreSQL starting, replaying WAL"),
            RecoveryEvent::WalStaged { files, seconds } => {
                write!(f, "all {files} WAL file(s) staged in {seconds:.1} s")
            }
            RecoveryEvent::Ended(o) => write!(f, "ended: {o}"),
        }
    }
}

/// Receives [`RecoveryEvent`]s.
pub type EventSink = Arc<dyn Fn(RecoveryEvent) + Send + Sync>;

/// How to recover.
#[derive(Clone, Default)]
pub struct RecoverOptions {
    /// The empty or missing directory to recover into.
    pub pgdata: PathBuf,
    /// Tablespaces elsewhere: OID or old location → new location.
    pub tablespace_map: HashMap<String, PathBuf>,
    /// The `restore_command` the recovered server runs.
    pub restore_command: String,
    /// Write `archive_mode = off` (a copy must not archive into the
    /// original's archive).
    pub archive_off: bool,
    /// What the server does at the target.
    pub target_action: TargetAction,
    /// `Some`: run PostgreSQL to the target and measure; `None`: stop
    /// after staging, for the operator to start it.
    pub server: Option<ServerOptions>,
    /// Fail (with the report) when the recovery takes longer.
    pub rto_budget: Option<Duration>,
    /// Keep the restored configuration for the recovery run; otherwise
    /// `shared_buffers`, `max_wal_size` and `checkpoint_timeout` are raised
    /// for it ([`super::tuning`]).
    pub no_tuning: bool,
    /// Counts the bytes of files restored.
    pub progress: Option<Arc<Progress>>,
    /// Restore only these files' contents; the others become holes
    /// ([`RestoreOptions::fetch_only`]).
    pub fetch_only: Option<Arc<std::collections::HashSet<String>>>,
    /// Receives the steps as they happen.
    pub events: Option<EventSink>,
}

impl std::fmt::Debug for RecoverOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoverOptions")
            .field("pgdata", &self.pgdata)
            .field("target_action", &self.target_action)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// How long each phase took.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Phases {
    /// Restoring the files (the first WAL staged meanwhile).
    pub restore_seconds: f64,
    /// From the start of staging until every planned WAL file was in the
    /// spool.
    pub wal_fetch_seconds: f64,
    /// From the server's start to the target (`None` when not started).
    pub replay_seconds: Option<f64>,
}

/// What a recovery did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryReport {
    /// The backup restored.
    pub backup: String,
    /// The target, in words.
    pub target: String,
    /// Stopped just before the target.
    pub exclusive: bool,
    /// The timeline recovery followed.
    pub timeline: TimelineId,
    /// Where it ended.
    #[serde(rename = "state")]
    pub outcome: Outcome,
    /// Where replay stopped (the new timeline's start after a promotion).
    pub stopped_at_lsn: Option<Lsn>,
    /// PostgreSQL's "recovery stopping …" line.
    pub stop_detail: Option<String>,
    /// The last transaction replayed, as PostgreSQL logged it.
    pub last_replayed_commit_time: Option<String>,
    /// WAL files staged.
    pub wal_files: usize,
    /// Their bytes.
    pub wal_bytes_fetched: u64,
    /// WAL replayed, from the backup's start to the stop point.
    pub wal_bytes_replayed: Option<u64>,
    /// Bytes of files restored.
    pub restore_bytes: u64,
    /// Bytes read from the repository for them.
    pub restore_fetched_bytes: u64,
    /// Files created as holes, not read (a sparse recovery).
    pub sparse_files: usize,
    /// Their bytes.
    pub sparse_bytes: u64,
    /// Times per phase.
    #[serde(flatten)]
    pub phases: Phases,
    /// The measured recovery time (RTO), planning included.
    pub total_seconds: f64,
    /// What the plan estimated.
    pub estimated_seconds: f64,
    /// The budget, if any.
    pub rto_budget_seconds: Option<f64>,
    /// Whether the recovery stayed within it.
    pub budget_held: Option<bool>,
    /// Settings raised for the recovery run (`shared_buffers = 1536MB (was
    /// 128MB)`); after a promotion only `shared_buffers` is still in
    /// effect, until the server restarts.
    pub recovery_settings: Vec<String>,
}

/// Segments staged before PostgreSQL starts when the rest can follow during
/// replay.
const STAGE_AHEAD: usize = 4;

/// Parallel downloads while staging.
const STAGE_PARALLEL: usize = 4;

/// Parallel downloads while the files are restored too: each holds a
/// decoded segment (16 MiB) beside the restore's index and buffers, and
/// the restore keeps both cores busy anyway.
const STAGE_PARALLEL_BESIDE_RESTORE: usize = 2;

/// Carry out `rp` into `opts.pgdata`. `started` is when the recovery began
/// (before planning), so the report's total is the whole RTO.
///
/// Files are restored while WAL is staged into `pg_wal/walvault-spool`
/// (where wal-fetch serves it from); with a server, only the first
/// segments before it starts and the rest during replay, holding the
/// spool's lock so wal-fetch waits for a segment being staged instead of
/// downloading it twice, and releasing it as soon as staging is done.
pub async fn recover(
    repo: Arc<Repository>,
    stanza: &str,
    rp: &RecoveryPlan,
    opts: &RecoverOptions,
    started: Instant,
) -> Result<RecoveryReport, RecoverError> {
    let plan = &rp.plan;
    let pgdata = &opts.pgdata;
    let emit = |e: RecoveryEvent| {
        if let Some(sink) = &opts.events {
            sink(e);
        }
    };
    let owner: Option<Owner> = match &opts.server {
        Some(s) if nix::unistd::geteuid().is_root() => match &s.run_as {
            Some(u) => Some(server::os_user(u)?),
            None => return Err(RecoverError::AsRoot),
        },
        _ => None,
    };
    if !super::is_empty_dir(pgdata, false)? {
        return Err(RecoverError::NotEmpty(pgdata.clone()));
    }
    let paths = StanzaPaths::new(stanza);
    let spool = SpoolWriter::new(&pgdata.join("pg_wal").join(SPOOL_DIR), true, owner)?;
    std::fs::set_permissions(pgdata, std::fs::Permissions::from_mode(0o700)).map_err(io(pgdata))?;
    let ropts = RestoreOptions {
        backup: Some(plan.backup.id.clone()),
        tablespace_map: opts.tablespace_map.clone(),
        restore_command: Some(opts.restore_command.clone()),
        delta: false,
        progress: opts.progress.clone(),
        staged_wal: true,
        page_cache: true,
        standby: None,
        fetch_only: opts.fetch_only.clone(),
    };
    let incomplete = |source: RestoreError| RecoverError::Incomplete {
        dir: pgdata.clone(),
        source,
    };
    let restore_files = async {
        let t = Instant::now();
        let r = super::restore(repo.clone(), stanza, pgdata, &ropts).await?;
        Ok::<_, RestoreError>((t.elapsed().as_secs_f64(), r))
    };
    // Only the first segments must be there when PostgreSQL starts; with a
    // server the rest is staged while it replays (replay takes one core,
    // staging the other) instead of competing with the restore for both
    let t_stage = Instant::now();
    let ahead = if opts.server.is_some() {
        STAGE_AHEAD.min(plan.segments.len())
    } else {
        plan.segments.len()
    };
    let (head, rest) = plan.segments.split_at(ahead);
    // both run to their end, also when one fails: a restore dropped
    // half-way would leave its spawned writes going on in a directory the
    // caller is about to report, or (a drill) remove
    let (restored, staged) = tokio::join!(
        restore_files,
        stage(&repo, &paths, &spool, head, STAGE_PARALLEL_BESIDE_RESTORE)
    );
    let ((restore_secs, restored), head_bytes) = match (restored, staged) {
        (Ok(r), Ok(b)) => (r, b),
        (Err(e), _) | (_, Err(e)) => return Err(incomplete(e)),
    };
    emit(RecoveryEvent::Restored {
        seconds: restore_secs,
    });
    let mut fetch_secs = t_stage.elapsed().as_secs_f64();

    let timeline = match rp.timeline_choice {
        TimelineChoice::Latest => "latest".to_owned(),
        TimelineChoice::Current => "current".to_owned(),
        TimelineChoice::Id(n) => n.to_string(),
    };
    // with a server, "promote" is carried out as pause, then pg_ctl promote
    // (see server::start_and_wait): the same stop point without waiting for
    // a full checkpoint. `Latest` has no target to pause at.
    let promote_on_pause = opts.server.is_some()
        && opts.target_action == TargetAction::Promote
        && !matches!(plan.target, Target::Latest);
    let written_action = if promote_on_pause {
        TargetAction::Pause
    } else {
        opts.target_action
    };
    let lines = recovery::settings(&plan.target, plan.exclusive, &timeline, written_action);
    if opts.archive_off {
        let auto = pgdata.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(
            "# added by walvault: a recovered copy does not archive\narchive_mode = 'off'\n",
        );
        std::fs::write(&auto, text).map_err(io(&auto))?;
    }
    for l in recovery::write(pgdata, &lines)? {
        tracing::warn!("postgresql.conf sets `{l}`, which conflicts with the target; remove it before starting");
    }
    let mut report = RecoveryReport {
        backup: plan.backup.id.clone(),
        target: plan.target.to_string(),
        exclusive: plan.exclusive,
        timeline: plan.timeline,
        outcome: Outcome::Staged,
        stopped_at_lsn: None,
        stop_detail: None,
        last_replayed_commit_time: None,
        wal_files: plan.segments.len(),
        wal_bytes_fetched: head_bytes,
        wal_bytes_replayed: None,
        restore_bytes: plan.restore_bytes,
        restore_fetched_bytes: restored.stats.fetched,
        sparse_files: restored.sparse_files,
        sparse_bytes: restored.sparse_bytes,
        phases: Phases {
            restore_seconds: restore_secs,
            wal_fetch_seconds: fetch_secs,
            replay_seconds: None,
        },
        total_seconds: 0.0,
        estimated_seconds: rp.estimate.as_secs_f64(),
        rto_budget_seconds: opts.rto_budget.map(|b| b.as_secs_f64()),
        budget_held: None,
        recovery_settings: Vec::new(),
    };
    let Some(sopts) = &opts.server else {
        report.total_seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    };
    if let Some(o) = owner {
        server::chown_tree(pgdata, o)?;
    }
    // only when walvault itself sees recovery end (promote): a paused or
    // shut-down recovery keeps the block, and the settings would outlive it
    if !opts.no_tuning && opts.target_action == TargetAction::Promote {
        let bin = server::bindir(pgdata, sopts.pg_bin.as_deref())?;
        let wal_bytes = plan.segments.len() as u64 * plan.backup.wal_segment_size.bytes();
        let raised = super::tuning::recovery_settings(
            &bin,
            pgdata,
            sopts.run_as.as_deref(),
            plan.restore_bytes,
            wal_bytes,
        )
        .await;
        if !raised.is_empty() {
            let mut all = lines.clone();
            all.extend(raised.iter().map(|r| r.line()));
            recovery::write(pgdata, &all)?;
            let auto = pgdata.join("postgresql.auto.conf");
            if let Some(o) = owner {
                std::os::unix::fs::lchown(&auto, Some(o.0.as_raw()), Some(o.1.as_raw()))
                    .map_err(io(&auto))?;
            }
            report.recovery_settings = raised.iter().map(|r| r.to_string()).collect();
        }
    }
    // the spool's lock keeps wal-fetch's own prefetching out while the rest
    // is staged, and makes wal-fetch wait for a segment replay reaches
    // before it is staged instead of downloading it a second time. It is
    // released as soon as staging is done: after that nothing more will
    // appear in the spool, and a segment beyond the archive (which recovery
    // asks for at its end) must be "not found" at once, not after a wait.
    let held = super::fetch::lock_spool(spool.dir(), true)?;
    emit(RecoveryEvent::ServerStarting);
    let (ended, rest_bytes) = tokio::join!(
        server::start_and_wait(
            pgdata,
            &plan.backup.id,
            sopts,
            opts.target_action,
            promote_on_pause,
        ),
        async {
            let r = stage(&repo, &paths, &spool, rest, STAGE_PARALLEL).await;
            drop(held);
            fetch_secs = t_stage.elapsed().as_secs_f64();
            emit(RecoveryEvent::WalStaged {
                files: plan.segments.len(),
                seconds: fetch_secs,
            });
            r
        }
    );
    let ended = ended?;
    emit(RecoveryEvent::Ended(ended.outcome));
    report.wal_bytes_fetched += rest_bytes.unwrap_or_else(|e| {
        tracing::warn!("staging WAL ahead of replay failed ({e}); restore_command fetched it");
        0
    });
    if ended.outcome != Outcome::Paused {
        // staged files replay did not consume (beyond the target)
        let _ = std::fs::remove_dir_all(spool.dir());
    }
    let total = started.elapsed().as_secs_f64();
    let replayed = ended
        .stop_lsn
        .and_then(|l| l.checked_sub(plan.backup.start_lsn));
    // a sparse recovery restores a fraction of the bytes: its times would
    // skew the estimates of whole recoveries
    let measured = match opts.fetch_only {
        Some(_) => None,
        None => RecoveryRates::measured(
            plan.restore_bytes,
            restore_secs,
            replayed.unwrap_or(0),
            ended.replay_secs,
            total,
        ),
    };
    if let Some(measured) = measured {
        measured.store(&repo, &paths).await;
    }
    report.outcome = ended.outcome;
    report.stopped_at_lsn = ended.stop_lsn;
    report.stop_detail = ended.stop_line;
    report.last_replayed_commit_time = ended.last_commit_time;
    report.wal_bytes_replayed = replayed;
    report.phases.wal_fetch_seconds = fetch_secs;
    report.phases.replay_seconds = Some(ended.replay_secs);
    report.total_seconds = total;
    report.budget_held = opts.rto_budget.map(|b| total <= b.as_secs_f64());
    if let Some(budget) = opts.rto_budget {
        if total > budget.as_secs_f64() {
            return Err(RecoverError::OverBudget {
                took: total,
                budget: budget.as_secs_f64(),
                report: Box::new(report),
            });
        }
    }
    Ok(report)
}

/// Stage `names` into the spool; each must be in the repository.
async fn stage(
    repo: &Repository,
    paths: &StanzaPaths,
    spool: &SpoolWriter,
    names: &[WalFileName],
    parallel: usize,
) -> Result<u64, RestoreError> {
    let filled = spool.fill(repo, paths, names, parallel).await?;
    if let Some(name) = filled.missing {
        return Err(RestoreError::WalVanished(name));
    }
    Ok(filled.bytes)
}
