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

use super::alerts::{Alerter, Sink, SinkConfig};
use super::jobs::{self, JobKind, JobRecord};
use super::status::{
    ActiveAlert, BackupView, CopyView, GapView, Health, Hub, JobRun, RunState, Status,
};
use super::{Plan, Trigger};
use crate::archive::stream::{run_stream, StreamOptions, StreamStatus};
use crate::backup::stream::BaseBackupOptions;
use crate::ops::check::{Budgets, CheckReport, Level};
use crate::ops::drill::DrillOptions;
use crate::ops::records;
use crate::ops::retention::Policy;
use crate::pg::ConnParams;
use crate::progress::Progress;
use crate::repo::{Manifest, Repository, StanzaPaths};

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
}

/// Why a job did not start.
#[derive(Debug)]
pub enum StartError {
    /// One of its kind is running.
    Busy(String),
    /// It cannot run here (not configured, shutting down).
    Unavailable(String),
}

struct Inner {
    ctx: Context,
    plan: Plan,
    hub: Arc<Hub>,
    cancel: CancellationToken,
    /// Expire takes it exclusively; every other job shares it.
    exclusive: RwLock<()>,
    /// Wakes the health evaluation (a job ended).
    wake: Notify,
    /// When the last RTO-driven backup ended.
    rto_backup_end: std::sync::Mutex<Option<Instant>>,
}

/// Starts jobs; the HTTP actions and the scheduler hold one.
#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
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
        match kind {
            JobKind::Drill if i.ctx.drill.is_none() => {
                return Err(StartError::Unavailable("drills are not configured".into()))
            }
            JobKind::Copy if i.ctx.copies.is_empty() => {
                return Err(StartError::Unavailable(
                    "no [[repository]] to copy to".into(),
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
        // the library's futures are Send, but rustc cannot prove it for
        // every lifetime of the borrows inside some of them (closures in
        // stream combinators, rust-lang/rust#102211), which tokio::spawn
        // demands; a blocking-pool thread drives the run with block_on
        // instead, which needs no Send
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(this.run(run, trigger, progress)));
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
                tokio::select! {
                    r = work => r,
                    // the start stays recorded without an end: the next
                    // start of the daemon reports it and runs it again
                    _ = i.cancel.cancelled() => {
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
/// use is the caller's error to report, before anything starts).
pub async fn run(ctx: Context, plan: Plan, listener: TcpListener, cancel: CancellationToken) {
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
        }),
    };
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
    let health = tokio::spawn(health_loop(control.clone()));
    let progress = tokio::spawn(progress_ticker(hub.clone(), cancel.clone()));
    scheduler(&control).await;
    super::notify::notify("STOPPING=1");
    tracing::info!("stopping: the stream uploads what it received");
    let _ = stream.await;
    let _ = tokio::join!(http, health, progress);
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
                if hub.snapshot().running.iter().any(|r| r.progress.is_some()) {
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

/// Evaluate health every check interval (and after each job): the check,
/// the backups, the window, the gaps, the copies, budgets, the RTO-driven
/// backup, alerts, the status file.
async fn health_loop(c: Control) {
    let i = &c.inner;
    let mut alerter = Alerter::default();
    let mut sinks: Vec<Sink> = i.ctx.sinks.iter().cloned().map(Sink::new).collect();
    let mut tick: u64 = 0;
    // a starting stream is not an outage: the first evaluation waits for
    // it to connect (at most 15 s)
    if i.ctx.stream.is_some() {
        let mut changes = i.hub.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !i.hub.snapshot().stream.up {
            tokio::select! {
                _ = i.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => break,
                r = changes.changed() => if r.is_err() { break },
            }
        }
    }
    loop {
        evaluate(&c, &mut alerter, &mut sinks, tick).await;
        tick += 1;
        tokio::select! {
            _ = i.cancel.cancelled() => return,
            _ = tokio::time::sleep(i.plan.check_interval) => {}
            _ = i.wake.notified() => {}
        }
    }
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

async fn evaluate(c: &Control, alerter: &mut Alerter, sinks: &mut [Sink], tick: u64) {
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
    let views = load_views(ctx, &paths, tick).await;
    let mut breached: Vec<&'static str> = Vec::new();
    if let Some(r) = &report {
        for f in &r.findings {
            let budget = budget_of(f.check).filter(|b| i.hub.snapshot().budgets.contains_key(b));
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
                (Level::Warning, _) if f.check == "slot" => {
                    conditions.insert("slot:retention".into(), format!("slot: {}", f.detail));
                }
                _ => {}
            }
        }
    }
    if let Ok(v) = &views {
        if !v.gaps.is_empty() {
            let g: Vec<String> = v
                .gaps
                .iter()
                .map(|g| format!("{}..{}", g.from, g.to))
                .collect();
            conditions.insert(
                "wal:gap".into(),
                format!("WAL missing from the repository: {}", g.join(", ")),
            );
        }
    }
    if let Err(e) = &views {
        conditions.insert(
            "repository:unreadable".into(),
            format!("the repository cannot be read: {e}"),
        );
    }
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
    for a in alerter.reconcile(&ctx.stanza, &conditions) {
        match a.state {
            super::alerts::AlertState::Firing => {
                tracing::warn!(key = a.key, "ALERT: {}", a.summary)
            }
            super::alerts::AlertState::Resolved => {
                tracing::info!(key = a.key, "resolved: {}", a.summary)
            }
        }
        for s in sinks.iter_mut() {
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
        if let Ok(v) = views {
            s.backups = v.backups;
            s.window_start = s.check.as_ref().and_then(|c| c.recovery_window_start);
            s.window_end = v.window_end;
            s.gaps = v.gaps;
            if v.repository_bytes.is_some() {
                s.repository_bytes = v.repository_bytes;
                s.dedup_ratio = v.dedup_ratio;
            }
            if let Some(copies) = v.copies {
                s.copies = copies;
            }
        }
        s.alerts = alerter
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
        write_status_file(path, &i.hub.snapshot());
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

async fn load_views(ctx: &Context, paths: &StanzaPaths, tick: u64) -> Result<Views, String> {
    let repo = &ctx.repo;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let manifests = Manifest::load_all(repo, paths).await.map_err(|x| e(&x))?;
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
    if tick % 30 == 0 {
        let objects = crate::storage::list_all(repo.storage().as_ref(), "")
            .await
            .map_err(|x| e(&x))?;
        let total: u64 = objects.iter().map(|o| o.size).sum();
        let logical: u64 = manifests.iter().map(|m| m.totals.logical_bytes).sum();
        let stored: u64 = manifests.iter().map(|m| m.totals.new_stored_bytes).sum();
        repository_bytes = Some(total);
        dedup_ratio = (stored > 0).then(|| logical as f64 / stored as f64);
    }
    let copies = if ctx.copies.is_empty() || tick % 6 != 0 {
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
        Ok(r) => Manifest::load_all(&r, paths)
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

/// Replace the status file atomically.
fn write_status_file(path: &std::path::Path, s: &Status) {
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec_pretty(s).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)) {
        tracing::warn!("cannot write status file {}: {e}", path.display());
    }
}
