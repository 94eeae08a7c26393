//! The supervisor: runs the stream (restarted with backoff), the
//! scheduler, the jobs (one per kind at a time; expire alone), the health
//! evaluation that feeds the model, the budgets, the RTO-driven backups
//! and the alerts, and the HTTP server, until cancelled.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, RwLock};
use tokio_util::sync::CancellationToken;

use super::alerts::{Alerter, SinkConfig};
use super::jobs::{self, JobKind, JobRecord};
use super::status::{Hub, JobRun, RunState};
use super::{Plan, Trigger};
use crate::archive::stream::{run_stream, StreamOptions, StreamStatus};
use crate::backup::stream::BaseBackupOptions;
use crate::ops::check::Budgets;
use crate::ops::drill::DrillOptions;
use crate::ops::records;
use crate::ops::retention::Policy;
use crate::pg::ConnParams;
use crate::progress::Progress;
use crate::repo::{Manifest, Repository, StanzaPaths};

/// How long a drill may take at shutdown to stop its scratch server and
/// remove its directory (it sees the same signal).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Opens a repository (a copy target) when a job needs it.
pub type OpenRepository =
    Arc<dyn Fn() -> BoxFuture<'static, Result<Repository, String>> + Send + Sync>;

/// A repository copies go to.
#[derive(Clone)]
pub struct CopyTarget {
    /// Its `[[repository]]` name.
    pub name: String,
    /// Its location.
    pub location: String,
    /// Opens it.
    pub open: OpenRepository,
}

/// What the daemon works with, built by the command from walvault.toml.
pub struct Context {
    /// The main repository.
    pub repo: Arc<Repository>,
    /// The stanza.
    pub stanza: String,
    /// The server.
    pub params: ConnParams,
    /// The stream's options (`None`: no stream; WAL comes by wal-push).
    pub stream: Option<StreamOptions>,
    /// The slot checks look at.
    pub slot: String,
    /// Backups' options.
    pub backup: BaseBackupOptions,
    /// The retention policy and pack grace (`None`: no policy).
    pub expire: Option<(Policy, Duration)>,
    /// Drills' options (`None`: drills cannot run).
    pub drill: Option<DrillOptions>,
    /// Where copies go.
    pub copies: Vec<CopyTarget>,
    /// The budgets.
    pub budgets: Budgets,
    /// Deep verify's sample, percent.
    pub deep_verify_sample: f64,
    /// Alert sinks.
    pub sinks: Vec<SinkConfig>,
    /// The file sets the `files` job snapshots (`[files.<set>]`).
    pub file_sets: Vec<crate::files::backup::FilesBackupOptions>,
}

/// Why a job did not start.
#[derive(Debug)]
pub enum StartError {
    /// One of its kind is running.
    Busy(String),
    /// It cannot run here (not configured, shutting down).
    Unavailable(String),
}

pub(super) struct Inner {
    pub(super) ctx: Context,
    pub(super) plan: Plan,
    pub(super) hub: Arc<Hub>,
    pub(super) cancel: CancellationToken,
    /// Expire takes it exclusively; every other job shares it, and so
    /// does the health loop while it reads the repository's listings.
    pub(super) exclusive: RwLock<()>,
    /// Wakes the health evaluation (a job ended).
    pub(super) wake: Notify,
    /// When the last RTO-driven backup ended.
    pub(super) rto_backup_end: std::sync::Mutex<Option<Instant>>,
    /// Job runs whose task has not returned yet (shutdown waits for them).
    jobs: watch::Sender<usize>,
    /// A reload waits for the running jobs: no new one starts.
    draining: std::sync::atomic::AtomicBool,
}

/// Starts jobs; the HTTP actions and the scheduler hold one.
#[derive(Clone)]
pub struct Control {
    pub(super) inner: Arc<Inner>,
}

impl Control {
    /// Start a run of `kind` (it runs in its own task); its id.
    pub fn start(
        &self,
        kind: JobKind,
        trigger: &str,
        reason: Option<String>,
    ) -> Result<String, StartError> {
        let i = &self.inner;
        if i.cancel.is_cancelled() {
            return Err(StartError::Unavailable("the daemon is stopping".into()));
        }
        if i.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StartError::Unavailable(
                "the daemon is reloading its configuration: try again in a moment".into(),
            ));
        }
        match kind {
            JobKind::Drill if i.ctx.drill.is_none() => {
                return Err(StartError::Unavailable("drills are not configured".into()))
            }
            JobKind::Copy if i.ctx.copies.is_empty() => {
                return Err(StartError::Unavailable(
                    "no [[repository]] to copy to".into(),
                ))
            }
            JobKind::Files if i.ctx.file_sets.is_empty() => {
                return Err(StartError::Unavailable(
                    "walvault.toml has no [files.<set>] with a source".into(),
                ))
            }
            JobKind::Expire if i.ctx.expire.is_none() => {
                return Err(StartError::Unavailable(
                    "walvault.toml has no [retention] policy".into(),
                ))
            }
            _ => {}
        }
        let progress = (kind == JobKind::Backup).then(Progress::new);
        let id = format!(
            "{}-{}-{}",
            Utc::now().format("%Y%m%dT%H%M%SZ"),
            kind.name(),
            crate::codec::to_hex(&rand::random::<[u8; 3]>())
        );
        let run = JobRun {
            id: id.clone(),
            kind,
            trigger: trigger.to_owned(),
            reason: reason.clone(),
            started_at: Utc::now(),
            finished_at: None,
            state: RunState::Running,
            progress_done: None,
            progress_total: None,
            summary: None,
            error: None,
            seconds: None,
            progress: progress.clone(),
        };
        // checked and added under one lock: two triggers at once start one run
        let started = i.hub.update(|s| {
            if s.running.iter().any(|r| r.kind == kind) {
                false
            } else {
                s.running.push(run.clone());
                true
            }
        });
        if !started {
            return Err(StartError::Busy(format!(
                "a {} is running already",
                kind.name()
            )));
        }
        match &reason {
            Some(r) => tracing::info!(job = kind.name(), run = id, trigger, "starting: {r}"),
            None => tracing::info!(job = kind.name(), run = id, trigger, "starting"),
        }
        let this = self.clone();
        let trigger = trigger.to_owned();
        // a task on the runtime's workers (a blocking-pool thread driving
        // it with block_on before: every socket readiness then woke that
        // thread from a worker, see `cli::run`)
        let inner = self.inner.clone();
        inner.jobs.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            this.run(run, trigger, progress).await;
            inner.jobs.send_modify(|n| *n -= 1);
        });
        Ok(id)
    }

    async fn run(self, run: JobRun, trigger: String, progress: Option<Arc<Progress>>) {
        let i = &self.inner;
        let paths = StanzaPaths::new(&i.ctx.stanza);
        let mut record = JobRecord {
            run: run.id.clone(),
            kind: run.kind,
            trigger: trigger.clone(),
            started_at: run.started_at,
            ended_at: None,
            ok: None,
            detail: run.reason.clone(),
        };
        let result = match records::store(&i.ctx.repo, &paths, jobs::JOB, &record).await {
            Err(e) => Err(format!("cannot record the start in the repository: {e}")),
            Ok(_) => {
                let work = async {
                    let _guard = if run.kind == JobKind::Expire {
                        Guard::Write(i.exclusive.write().await)
                    } else {
                        Guard::Read(i.exclusive.read().await)
                    };
                    jobs::execute(&i.ctx, run.kind, progress).await
                };
                tokio::pin!(work);
                tokio::select! {
                    r = &mut work => r,
                    // the start stays recorded without an end: the next
                    // start of the daemon reports it and runs it again
                    _ = i.cancel.cancelled() => {
                        if run.kind == JobKind::Drill {
                            // the signal reached the drill too: it stops
                            // its scratch server and removes the directory
                            // (dropped now, it would leave both behind)
                            let _ = tokio::time::timeout(SHUTDOWN_GRACE, &mut work).await;
                        }
                        tracing::warn!(job = run.kind.name(), run = run.id, "stopped by shutdown; it runs again when the daemon starts");
                        return;
                    }
                }
            }
        };
        record.ended_at = Some(Utc::now());
        record.ok = Some(result.is_ok());
        record.detail = Some(match &result {
            Ok(s) | Err(s) => s.clone(),
        });
        if let Err(e) = records::store(&i.ctx.repo, &paths, jobs::JOB, &record).await {
            tracing::warn!(
                job = run.kind.name(),
                "cannot record the end in the repository: {e}"
            );
        }
        match &result {
            Ok(s) => tracing::info!(job = run.kind.name(), run = run.id, "succeeded: {s}"),
            Err(e) => tracing::error!(job = run.kind.name(), run = run.id, "failed: {e}"),
        }
        let ok = result.is_ok();
        i.hub.job_ended(&run.id, result);
        if run.kind == JobKind::Backup && trigger == "rto" {
            if let Ok(mut t) = i.rto_backup_end.lock() {
                *t = Some(Instant::now());
            }
        }
        if run.kind == JobKind::Backup && ok {
            for (kind, t) in &i.plan.triggers {
                if matches!(t, Trigger::AfterBackup | Trigger::Continuous(_)) {
                    let _ = self.start(*kind, "after-backup", None);
                }
            }
        }
        i.wake.notify_one();
    }
}

enum Guard<'a> {
    Read(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Write(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// Run the daemon until `cancel`: `listener` is already bound (a port in
/// use is the caller's error to report, before anything starts). Once
/// `reload` is cancelled no new job starts; when the running ones have
/// ended the daemon stops as on `cancel` (the caller starts it again on the
/// new configuration; the listener stays the caller's). `alerts`: the
/// conditions alerted before a reload (none at the start); returned for
/// the next, so a reload neither repeats an alert nor loses its "resolved".
pub async fn run(
    ctx: Context,
    plan: Plan,
    listener: Arc<TcpListener>,
    cancel: CancellationToken,
    reload: CancellationToken,
    alerts: Alerter,
) -> Alerter {
    let terminate = cancel;
    let cancel = terminate.child_token();
    // alert sinks speak TLS (webhooks, SMTP); the dependency tree enables
    // two rustls providers, so the process default is chosen here
    let _ = rustls::crypto::ring::default_provider().install_default();
    let hub = Hub::new(
        &ctx.stanza,
        ctx.repo.storage().location(),
        plan.token.is_none(),
    );
    hub.update(|s| {
        s.stream.enabled = ctx.stream.is_some();
        for (name, v) in [
            ("max_rpo", ctx.budgets.max_rpo),
            ("max_rto", ctx.budgets.max_rto),
            ("max_backup_age", ctx.budgets.max_backup_age),
            ("max_drill_age", ctx.budgets.max_drill_age),
        ] {
            if let Some(v) = v {
                s.budgets.insert(name, v.as_secs_f64());
            }
        }
        for (k, t) in &plan.triggers {
            s.schedules.insert(*k, t.text());
        }
    });
    let control = Control {
        inner: Arc::new(Inner {
            ctx,
            plan,
            hub: hub.clone(),
            cancel: cancel.clone(),
            exclusive: RwLock::new(()),
            wake: Notify::new(),
            rto_backup_end: std::sync::Mutex::new(None),
            jobs: watch::channel(0).0,
            draining: std::sync::atomic::AtomicBool::new(false),
        }),
    };
    let drain = tokio::spawn(drain_on_reload(control.clone(), reload));
    let server = Arc::new(super::http::Server {
        hub: hub.clone(),
        token: control.inner.plan.token.clone(),
        control: control.clone(),
    });
    let http = tokio::spawn(super::http::serve(listener, server, cancel.clone()));
    let stream = tokio::spawn(stream_loop(control.clone()));
    recall(&control).await;
    super::notify::notify("READY=1");
    tracing::info!(
        "daemon ready: status page http://{}/",
        control.inner.plan.listen
    );
    let health = tokio::spawn(super::health::health_loop(control.clone(), alerts));
    let progress = tokio::spawn(progress_ticker(hub.clone(), cancel.clone()));
    scheduler(&control).await;
    let reloading = control
        .inner
        .draining
        .load(std::sync::atomic::Ordering::SeqCst)
        && !terminate.is_cancelled();
    if !reloading {
        super::notify::notify("STOPPING=1");
    }
    // the jobs see the cancel at once; a drill takes a moment to stop its
    // scratch server (the runtime must outlive that)
    let mut jobs = control.inner.jobs.subscribe();
    let _ = tokio::time::timeout(
        SHUTDOWN_GRACE + Duration::from_secs(5),
        jobs.wait_for(|n| *n == 0),
    )
    .await;
    tracing::info!("stopping: the stream uploads what it received");
    let _ = stream.await;
    let (_, alerts, _, _) = tokio::join!(http, health, progress, drain);
    alerts.unwrap_or_default()
}

/// On `reload`: refuse new jobs, wait for the running ones, then stop the
/// daemon (it is started again on the new configuration).
async fn drain_on_reload(c: Control, reload: CancellationToken) {
    let i = &c.inner;
    tokio::select! {
        _ = reload.cancelled() => {}
        _ = i.cancel.cancelled() => return,
    }
    i.draining.store(true, std::sync::atomic::Ordering::SeqCst);
    // systemd (Type=notify) holds `systemctl reload` until READY=1 again
    super::notify::notify("RELOADING=1");
    let mut jobs = i.jobs.subscribe();
    let running = *jobs.borrow();
    if running > 0 {
        tracing::info!(
            "reloading the configuration: waiting for {running} running job(s) to end; no new one starts meanwhile"
        );
    }
    tokio::select! {
        _ = jobs.wait_for(|n| *n == 0) => {}
        _ = i.cancel.cancelled() => return,
    }
    tracing::info!("reloading the configuration: the stream and the scheduler start again");
    i.cancel.cancel();
}

/// Runs recorded in the repository: the ended ones fill the job history;
/// one started but never ended was interrupted, is reported failed and
/// runs again now.
async fn recall(c: &Control) {
    let i = &c.inner;
    let paths = StanzaPaths::new(&i.ctx.stanza);
    let (open, ended) = match jobs::load_runs(&i.ctx.repo, &paths).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot read the job records: {e}");
            return;
        }
    };
    let as_run = |r: &JobRecord, state: RunState, detail: Option<String>| JobRun {
        id: r.run.clone(),
        kind: r.kind,
        trigger: r.trigger.clone(),
        reason: None,
        started_at: r.started_at,
        finished_at: r.ended_at,
        state,
        progress_done: None,
        progress_total: None,
        summary: (state == RunState::Succeeded)
            .then(|| detail.clone())
            .flatten(),
        error: (state == RunState::Failed).then_some(detail).flatten(),
        seconds: r.ended_at.map(|e| (e - r.started_at).as_seconds_f64()),
        progress: None,
    };
    for r in ended.iter().rev().take(50).rev() {
        let state = if r.ok == Some(true) {
            RunState::Succeeded
        } else {
            RunState::Failed
        };
        i.hub.job_recalled(as_run(r, state, r.detail.clone()));
    }
    let retried: Vec<JobKind> = open.iter().map(|r| r.kind).collect();
    for r in open {
        let why = "interrupted: the daemon stopped while it ran";
        tracing::warn!(job = r.kind.name(), run = r.run, started = %r.started_at, "{why}; running it again");
        let mut end = r.clone();
        end.ended_at = Some(Utc::now());
        end.ok = Some(false);
        end.detail = Some(why.into());
        if let Err(e) = records::store(&i.ctx.repo, &paths, jobs::JOB, &end).await {
            tracing::warn!("cannot record the interrupted run: {e}");
        }
        i.hub
            .job_recalled(as_run(&end, RunState::Failed, Some(why.into())));
        if let Err(StartError::Unavailable(e)) = c.start(
            r.kind,
            "retry",
            Some(format!("run {} was interrupted", r.run)),
        ) {
            tracing::warn!(job = r.kind.name(), "cannot retry: {e}");
        }
    }
    make_up_missed(c, &ended, &retried).await;
}

/// A scheduled run that fell due while the daemon was not running (a
/// restart, an upgrade, a host down over the backup window) runs once now,
/// like a systemd timer with `Persistent=true`: it is due when its schedule
/// fired between the kind's last recorded run (for backups: or the newest
/// backup, taken by any means) and now. So does an after-backup job (expire)
/// that did not run after the newest successful backup the daemon recorded.
/// Kinds retried as interrupted run already.
async fn make_up_missed(c: &Control, ended: &[JobRecord], retried: &[JobKind]) {
    let i = &c.inner;
    let now = Utc::now();
    let mut newest_backup = None;
    for (kind, t) in &i.plan.triggers {
        let Trigger::Cron(cron) = t else { continue };
        if retried.contains(kind) {
            continue;
        }
        let mut last = ended
            .iter()
            .filter(|r| r.kind == *kind)
            .map(|r| r.started_at)
            .max();
        if *kind == JobKind::Backup {
            if newest_backup.is_none() {
                let paths = StanzaPaths::new(&i.ctx.stanza);
                newest_backup = Some(match Manifest::list_ids(&i.ctx.repo, &paths).await {
                    Ok(ids) => ids.last().and_then(|id| Manifest::id_time(id)),
                    Err(e) => {
                        tracing::warn!("cannot list the backups: {e}");
                        None
                    }
                });
            }
            last = last.max(newest_backup.flatten());
        }
        // never run: the schedule starts now
        let Some(due) = last.and_then(|l| cron.next_after(l)).filter(|d| *d <= now) else {
            continue;
        };
        let why = format!(
            "the run due at {} was missed: the daemon was not running",
            due.format("%Y-%m-%d %H:%M:%S UTC")
        );
        tracing::warn!(job = kind.name(), "{why}; running it now");
        match c.start(*kind, "missed", Some(why)) {
            Ok(_) => {}
            Err(StartError::Busy(b) | StartError::Unavailable(b)) => {
                tracing::warn!(
                    job = kind.name(),
                    "the missed run waits for its next time: {b}"
                )
            }
        }
    }
    // an after-backup job the newest successful backup did not start: it
    // ended while the daemon was stopping or draining for a reload, when
    // no job starts
    let last_backup = ended
        .iter()
        .filter(|r| r.kind == JobKind::Backup && r.ok == Some(true))
        .filter_map(|r| r.ended_at)
        .max();
    let Some(backup_end) = last_backup else {
        return;
    };
    for (kind, t) in &i.plan.triggers {
        if !matches!(t, Trigger::AfterBackup) || retried.contains(kind) {
            continue;
        }
        let last = ended
            .iter()
            .filter(|r| r.kind == *kind)
            .map(|r| r.started_at)
            .max();
        if last.is_some_and(|l| l >= backup_end) {
            continue;
        }
        let why = format!(
            "the backup that ended at {} was not followed by it: the daemon was stopping or reloading",
            backup_end.format("%Y-%m-%d %H:%M:%S UTC")
        );
        tracing::warn!(job = kind.name(), "{why}; running it now");
        if let Err(StartError::Busy(b) | StartError::Unavailable(b)) =
            c.start(*kind, "missed", Some(why))
        {
            tracing::warn!(
                job = kind.name(),
                "the missed run waits for the next backup: {b}"
            )
        }
    }
}

/// The cron schedules and continuous jobs, until cancelled.
async fn scheduler(c: &Control) {
    let i = &c.inner;
    let mut next: HashMap<JobKind, DateTime<Utc>> = HashMap::new();
    let mut continuous_since: HashMap<JobKind, Instant> = HashMap::new();
    loop {
        let now = Utc::now();
        for (kind, t) in &i.plan.triggers {
            match t {
                Trigger::Cron(cron) => {
                    let due = next.get(kind).copied();
                    if due.is_some_and(|d| d <= now) {
                        if let Err(StartError::Busy(why)) = c.start(*kind, "schedule", None) {
                            tracing::warn!(job = kind.name(), "scheduled run skipped: {why}");
                        }
                    }
                    if due.is_none_or(|d| d <= now) {
                        if let Some(n) = cron.next_after(now) {
                            next.insert(*kind, n);
                        }
                    }
                }
                Trigger::Continuous(pause) => {
                    if i.hub.is_running(*kind) {
                        continuous_since.insert(*kind, Instant::now());
                    } else if continuous_since
                        .get(kind)
                        .is_none_or(|t| t.elapsed() >= *pause)
                    {
                        let _ = c.start(*kind, "continuous", None);
                        continuous_since.insert(*kind, Instant::now());
                    }
                }
                Trigger::AfterBackup => {}
            }
        }
        let shown: BTreeMap<JobKind, DateTime<Utc>> = next.iter().map(|(k, v)| (*k, *v)).collect();
        i.hub.update(|s| s.next_runs = shown);
        let wait = next
            .values()
            .min()
            .map(|d| (*d - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = i.cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// While a job runs, mark the model changed twice a second so event
/// streams send its progress.
async fn progress_ticker(hub: Arc<Hub>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                if hub.progress_running() {
                    hub.touch();
                }
            }
        }
    }
}

/// Keep the stream running: restarted with backoff (5 s doubling to
/// 5 min) after errors it does not retry itself.
async fn stream_loop(c: Control) {
    let i = &c.inner;
    let Some(opts) = &i.ctx.stream else { return };
    let (tx, mut rx) = watch::channel(StreamStatus::default());
    let mut opts = opts.clone();
    opts.publish = Some(Arc::new(tx));
    let hub = i.hub.clone();
    let cancel = i.cancel.clone();
    let forward = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let st = rx.borrow_and_update().clone();
            hub.update(|s| {
                if s.stream.up != st.connected {
                    s.stream.since = Some(Utc::now());
                }
                s.stream.up = st.connected;
                if st.connected {
                    s.stream.last_error = None;
                }
                s.stream.position = Some(st);
            });
        }
    });
    i.hub.update(|s| s.stream.since = Some(Utc::now()));
    let mut backoff = Duration::from_secs(5);
    loop {
        let (stop_tx, stop_rx) = watch::channel(false);
        let cancel = i.cancel.clone();
        let stopper = tokio::spawn(async move {
            cancel.cancelled().await;
            let _ = stop_tx.send(true);
        });
        let started = Instant::now();
        let r = run_stream(
            i.ctx.repo.clone(),
            &i.ctx.stanza,
            &i.ctx.params,
            &opts,
            stop_rx,
        )
        .await;
        stopper.abort();
        if i.cancel.is_cancelled() {
            break;
        }
        let why = match r {
            Ok(()) => "the stream ended".to_owned(),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(600) {
            backoff = Duration::from_secs(5);
        }
        tracing::error!(
            "stream stopped: {why}; restarting in {} s",
            backoff.as_secs()
        );
        i.hub.update(|s| {
            s.stream.up = false;
            s.stream.restarts += 1;
            s.stream.last_error = Some(why);
        });
        tokio::select! {
            _ = i.cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(300));
    }
    forward.abort();
}
