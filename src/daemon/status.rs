//! The one status model of the daemon. The stream, the jobs and the health
//! evaluation write into it; the status file, `/api/status`,
//! `/api/backups`, `/metrics`, the server-sent events and the page read
//! it. Every change bumps a version that event streams wait on.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use super::jobs::JobKind;
use crate::archive::stream::StreamStatus;
use crate::ops::check::CheckReport;
use crate::progress::Progress;

/// Jobs remembered in `recent`.
const RECENT_JOBS: usize = 50;

/// How a job run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// In progress.
    Running,
    /// Done.
    Succeeded,
    /// Ended with an error.
    Failed,
}

/// One run of a job.
#[derive(Debug, Clone, Serialize)]
pub struct JobRun {
    /// Unique id (also in its records).
    pub id: String,
    /// The job.
    pub kind: JobKind,
    /// Why it ran: `schedule`, `rto`, `manual`, `retry`, `after-backup`,
    /// `continuous`.
    pub trigger: String,
    /// With `rto`: the estimate and the budget that made it run.
    pub reason: Option<String>,
    /// When it began.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its state.
    pub state: RunState,
    /// Bytes done (backups: received from the server).
    pub progress_done: Option<u64>,
    /// Bytes expected (the server's estimate).
    pub progress_total: Option<u64>,
    /// One line of what it did.
    pub summary: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Seconds it took.
    pub seconds: Option<f64>,
    /// Live counters while it runs.
    #[serde(skip)]
    pub progress: Option<Arc<Progress>>,
}

/// The stream as the daemon sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamView {
    /// Whether the daemon runs a stream.
    pub enabled: bool,
    /// Connected and receiving.
    pub up: bool,
    /// Since when it is up, or down.
    pub since: Option<DateTime<Utc>>,
    /// Times it was restarted after an error.
    pub restarts: u64,
    /// The last error that stopped it.
    pub last_error: Option<String>,
    /// Positions and lag, as the stream reports them.
    pub position: Option<StreamStatus>,
}

/// A backup as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupView {
    /// Id.
    pub id: String,
    /// Label.
    pub label: String,
    /// When it started.
    pub start_time: DateTime<Utc>,
    /// When it became consistent.
    pub stop_time: DateTime<Utc>,
    /// Start LSN.
    pub start_lsn: String,
    /// Consistency LSN.
    pub stop_lsn: String,
    /// Timeline.
    pub timeline: u32,
    /// Logical bytes.
    pub bytes: u64,
    /// Bytes it added to the repository.
    pub new_bytes: u64,
    /// The rules that keep it (`newest`, `gfs daily`, …).
    pub kept_by: Vec<String>,
    /// Kept as a restore point only (its own WAL, no PITR after it).
    pub point: bool,
    /// Held.
    pub held: bool,
    /// Its last verify passed (`None`: never verified).
    pub verified: Option<bool>,
}

/// WAL missing from the repository: recovery cannot cross it.
#[derive(Debug, Clone, Serialize)]
pub struct GapView {
    /// First missing file.
    pub from: String,
    /// Last missing file.
    pub to: String,
    /// Segments missing.
    pub segments: u64,
    /// About when it begins and ends (interpolated from the backups' LSNs
    /// and times).
    pub start_time: Option<DateTime<Utc>>,
    /// About when it ends.
    pub end_time: Option<DateTime<Utc>>,
}

/// A copy repository.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyView {
    /// Its `[[repository]]` name.
    pub name: String,
    /// Its location.
    pub location: String,
    /// The newest backup it has.
    pub newest_backup: Option<String>,
    /// Backups of the main repository it lacks.
    pub backups_behind: usize,
    /// Seconds its newest backup is behind the main repository's newest.
    pub lag_seconds: Option<f64>,
    /// When it was last copied to.
    pub last_copy: Option<DateTime<Utc>>,
    /// Why it could not be read or copied to.
    pub error: Option<String>,
}

/// An alert that is firing.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveAlert {
    /// Its key (`budget:max_rpo`, `job:backup`, `stream:down`, …).
    pub key: String,
    /// What is wrong.
    pub summary: String,
    /// Since when.
    pub since: DateTime<Utc>,
}

/// The health in a word and a sentence.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `starting`, `healthy`, `warning`, `breached` or `failing`.
    pub state: &'static str,
    /// The sentence the page shows.
    pub words: String,
}

/// Everything the daemon knows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// walvault's version.
    pub version: &'static str,
    /// The stanza.
    pub stanza: String,
    /// The main repository's location.
    pub repository: String,
    /// When the daemon started.
    pub started_at: DateTime<Utc>,
    /// When this was last changed.
    pub updated_at: DateTime<Utc>,
    /// The health.
    pub health: Health,
    /// The actions need a token; without one the page is read-only.
    pub read_only: bool,
    /// The budgets, seconds.
    pub budgets: BTreeMap<&'static str, f64>,
    /// The budgets breached now.
    pub breached: Vec<&'static str>,
    /// The last health check.
    pub check: Option<CheckReport>,
    /// When it ran.
    pub checked_at: Option<DateTime<Utc>>,
    /// Why it could not run (server or repository unreachable).
    pub check_error: Option<String>,
    /// The stream.
    pub stream: StreamView,
    /// Backups, oldest first.
    pub backups: Vec<BackupView>,
    /// The recovery window: from the oldest backup with all WAL after it…
    pub window_start: Option<DateTime<Utc>>,
    /// …to the newest archived commit.
    pub window_end: Option<DateTime<Utc>>,
    /// WAL gaps.
    pub gaps: Vec<GapView>,
    /// Bytes stored in the repository (packs and WAL).
    pub repository_bytes: Option<u64>,
    /// Logical bytes of the backups per byte stored for them.
    pub dedup_ratio: Option<f64>,
    /// Jobs running now.
    pub running: Vec<JobRun>,
    /// Jobs that ended, newest first.
    pub recent: VecDeque<JobRun>,
    /// The next scheduled run of each job.
    pub next_runs: BTreeMap<JobKind, DateTime<Utc>>,
    /// Each job's schedule as configured.
    pub schedules: BTreeMap<JobKind, String>,
    /// The last time the RTO made a backup start early, and why.
    pub rto_backup: Option<String>,
    /// The copies.
    pub copies: Vec<CopyView>,
    /// Alerts firing.
    pub alerts: Vec<ActiveAlert>,
}

/// The shared model.
pub struct Hub {
    status: Mutex<Status>,
    version: watch::Sender<u64>,
}

impl Hub {
    /// A model for `stanza` in `repository`.
    pub fn new(stanza: &str, repository: String, read_only: bool) -> Arc<Hub> {
        let now = Utc::now();
        Arc::new(Hub {
            status: Mutex::new(Status {
                version: env!("CARGO_PKG_VERSION"),
                stanza: stanza.to_owned(),
                repository,
                started_at: now,
                updated_at: now,
                health: Health {
                    state: "starting",
                    words: "starting: the first health check has not run yet".into(),
                },
                read_only,
                budgets: BTreeMap::new(),
                breached: Vec::new(),
                check: None,
                checked_at: None,
                check_error: None,
                stream: StreamView::default(),
                backups: Vec::new(),
                window_start: None,
                window_end: None,
                gaps: Vec::new(),
                repository_bytes: None,
                dedup_ratio: None,
                running: Vec::new(),
                recent: VecDeque::new(),
                next_runs: BTreeMap::new(),
                schedules: BTreeMap::new(),
                rto_backup: None,
                copies: Vec::new(),
                alerts: Vec::new(),
            }),
            version: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Status> {
        // a panic while holding it leaves a status that is still readable
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the model.
    pub fn update<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let r = {
            let mut s = self.lock();
            let r = f(&mut s);
            s.updated_at = Utc::now();
            r
        };
        self.version.send_modify(|v| *v += 1);
        r
    }

    /// A copy of the model, running jobs' progress read now.
    pub fn snapshot(&self) -> Status {
        let mut s = self.lock().clone();
        for r in &mut s.running {
            if let Some(p) = &r.progress {
                r.progress_done = Some(p.done());
                r.progress_total = Some(p.total()).filter(|&t| t > 0);
            }
        }
        s
    }

    /// Changes: the value is bumped on each.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Mark a change without one (progress counters moved).
    pub fn touch(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Record that a run began.
    pub fn job_started(&self, run: JobRun) {
        self.update(|s| s.running.push(run));
    }

    /// Record that run `id` ended.
    pub fn job_ended(&self, id: &str, result: Result<String, String>) -> Option<JobRun> {
        self.update(|s| {
            let i = s.running.iter().position(|r| r.id == id)?;
            let mut r = s.running.remove(i);
            let now = Utc::now();
            r.finished_at = Some(now);
            r.seconds = Some((now - r.started_at).as_seconds_f64());
            if let Some(p) = r.progress.take() {
                r.progress_done = Some(p.done());
                r.progress_total = Some(p.total()).filter(|&t| t > 0);
            }
            match result {
                Ok(summary) => {
                    r.state = RunState::Succeeded;
                    r.summary = Some(summary);
                }
                Err(e) => {
                    r.state = RunState::Failed;
                    r.error = Some(e);
                }
            }
            s.recent.push_front(r.clone());
            s.recent.truncate(RECENT_JOBS);
            Some(r)
        })
    }

    /// Remember a run that ended before this daemon started (an
    /// interrupted one found in the repository).
    pub fn job_recalled(&self, run: JobRun) {
        self.update(|s| {
            s.recent.push_front(run);
            s.recent.truncate(RECENT_JOBS);
        });
    }

    /// The newest ended run of `kind`.
    pub fn last_run(&self, kind: JobKind) -> Option<JobRun> {
        self.lock().recent.iter().find(|r| r.kind == kind).cloned()
    }

    /// Whether a running job reports progress.
    pub fn progress_running(&self) -> bool {
        self.lock().running.iter().any(|r| r.progress.is_some())
    }

    /// Whether a run of `kind` is in progress.
    pub fn is_running(&self, kind: JobKind) -> bool {
        self.lock().running.iter().any(|r| r.kind == kind)
    }
}
