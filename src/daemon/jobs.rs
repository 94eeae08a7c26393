//! The jobs the daemon runs, each one library call (the same the commands
//! make), and their records in the repository: a `records/job/` object
//! when a run starts and another when it ends. A start without an end is
//! a run the daemon did not live to finish.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::supervisor::Context;
use crate::ops::records;
use crate::ops::OpsError;
use crate::progress::Progress;
use crate::repo::StanzaPaths;

/// The record kind of job runs.
pub use crate::ops::records::JOB;

/// A kind of job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// A full backup.
    Backup,
    /// The retention policy.
    Expire,
    /// `verify --since-last`.
    Verify,
    /// `verify --since-last --sample PERCENT` (a scrub of older data too).
    DeepVerify,
    /// A restore drill.
    Drill,
    /// Copies to the other repositories.
    Copy,
    /// Snapshots of every `[files.<set>]` (`walvault files backup`).
    Files,
}

impl JobKind {
    /// Every kind.
    pub const ALL: [JobKind; 7] = [
        JobKind::Backup,
        JobKind::Expire,
        JobKind::Verify,
        JobKind::DeepVerify,
        JobKind::Drill,
        JobKind::Copy,
        JobKind::Files,
    ];

    /// Its name in the API, metrics and records.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Expire => "expire",
            JobKind::Verify => "verify",
            JobKind::DeepVerify => "deep_verify",
            JobKind::Drill => "drill",
            JobKind::Copy => "copy",
            JobKind::Files => "files",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A job run's record: written at its start (`ended_at` empty) and at its
/// end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// The run's id.
    pub run: String,
    /// The job.
    pub kind: JobKind,
    /// Why it ran.
    pub trigger: String,
    /// When it began.
    pub started_at: DateTime<Utc>,
    /// When it ended (`None` in the start record).
    pub ended_at: Option<DateTime<Utc>>,
    /// Whether it succeeded.
    pub ok: Option<bool>,
    /// Its summary or error.
    pub detail: Option<String>,
}

/// Runs whose start is recorded without an end, and the ended runs, each
/// oldest first.
pub async fn load_runs(
    repo: &crate::repo::Repository,
    paths: &StanzaPaths,
) -> Result<(Vec<JobRecord>, Vec<JobRecord>), OpsError> {
    let all: Vec<JobRecord> = records::all(repo, paths, JOB).await?;
    let mut by_run: BTreeMap<String, JobRecord> = BTreeMap::new();
    let mut order = Vec::new();
    for r in all {
        if !by_run.contains_key(&r.run) {
            order.push(r.run.clone());
        }
        let e = by_run.entry(r.run.clone()).or_insert_with(|| r.clone());
        if r.ended_at.is_some() {
            *e = r;
        }
    }
    let (mut open, mut ended) = (Vec::new(), Vec::new());
    for id in order {
        if let Some(r) = by_run.remove(&id) {
            if r.ended_at.is_some() {
                ended.push(r);
            } else {
                open.push(r);
            }
        }
    }
    Ok((open, ended))
}

/// Run one job of `kind`; the summary line, or the error as one line.
pub async fn execute(
    ctx: &Context,
    kind: JobKind,
    progress: Option<Arc<Progress>>,
) -> Result<String, String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    match kind {
        JobKind::Backup => {
            let mut opts = ctx.backup.clone();
            opts.progress = progress;
            let m = crate::backup::run_backup(ctx.repo.clone(), &ctx.stanza, &ctx.params, &opts)
                .await
                .map_err(|e| text(&e))?;
            Ok(format!(
                "backup {}: {} MiB, {} MiB new ({} MiB stored), WAL {}..{}",
                m.id,
                m.totals.logical_bytes >> 20,
                m.totals.new_raw_bytes >> 20,
                m.totals.new_stored_bytes >> 20,
                m.start_lsn,
                m.stop_lsn
            ))
        }
        JobKind::Expire => {
            let Some((policy, grace)) = &ctx.expire else {
                return Err("walvault.toml has no [retention] policy".into());
            };
            let opts = crate::ops::expire::ExpireOptions {
                policy: policy.clone(),
                dry_run: false,
                pack_grace: *grace,
                now: Utc::now(),
                forget: Vec::new(),
            };
            let r = crate::ops::expire::expire(&ctx.repo, &ctx.stanza, &opts)
                .await
                .map_err(|e| text(&e))?;
            Ok(format!(
                "{} backup(s) expired, {} WAL file(s) removed, {} pack(s) deleted, {} MiB freed",
                r.backups.iter().filter(|b| !b.keep).count(),
                r.wal_expired.iter().map(|w| w.files).sum::<usize>(),
                r.packs_deleted,
                r.bytes_freed >> 20
            ))
        }
        JobKind::Verify | JobKind::DeepVerify => {
            // both read deeply what the last passing deep verify did not;
            // the weekly one also re-reads a sample of what it did (scrub)
            let scrub = kind == JobKind::DeepVerify;
            let opts = crate::ops::verify::VerifyOptions {
                deep: false,
                since_last: true,
                sample_percent: scrub.then_some(ctx.deep_verify_sample),
                parallel: 8,
            };
            let r = crate::ops::verify::verify(&ctx.repo, &ctx.stanza, &opts)
                .await
                .map_err(|e| text(&e))?;
            let what = format!(
                "{} backup(s), {} pack(s) checked, {} read ({} MiB), {} WAL file(s) read",
                r.backups,
                r.packs_checked,
                r.packs_read,
                r.pack_bytes_read >> 20,
                r.wal_files_read
            );
            if r.passed {
                Ok(format!("passed: {what}"))
            } else {
                let first: Vec<String> = r.problems.iter().take(3).map(|p| p.to_string()).collect();
                Err(format!(
                    "{} problem(s): {}; {what}",
                    r.problems.len(),
                    first.join("; ")
                ))
            }
        }
        JobKind::Drill => {
            let Some(opts) = &ctx.drill else {
                return Err("drills are not configured".into());
            };
            let r = crate::ops::drill::drill(ctx.repo.clone(), &ctx.stanza, opts)
                .await
                .map_err(|e| text(&e))?;
            let rto = r
                .rto_seconds
                .map(|s| format!(", measured RTO {s:.1} s"))
                .unwrap_or_default();
            if r.passed {
                Ok(format!(
                    "passed: recovered to {} from {}{rto}",
                    r.target,
                    r.backup.as_deref().unwrap_or("-")
                ))
            } else {
                Err(format!(
                    "failed: {}{rto}",
                    r.failure().unwrap_or_else(|| "no check ran".into())
                ))
            }
        }
        JobKind::Files => {
            if ctx.file_sets.is_empty() {
                return Err("walvault.toml has no [files.<set>] with a source".into());
            }
            // every set, even after one failed; the error names each failure
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for opts in &ctx.file_sets {
                match crate::files::backup::backup(ctx.repo.clone(), &ctx.stanza, opts).await {
                    Ok(h) if h.skipped_count == 0 => done.push(format!(
                        "{} {} ({} entries, {} MiB read)",
                        h.set,
                        h.id,
                        h.entries,
                        h.read_bytes >> 20
                    )),
                    Ok(h) => failed.push(format!(
                        "{}: snapshot {} left out {} entries, first {}",
                        h.set,
                        h.id,
                        h.skipped_count,
                        h.skipped.first().map(|s| s.path.as_str()).unwrap_or("")
                    )),
                    Err(e) => failed.push(format!("{}: {e}", opts.set)),
                }
            }
            if failed.is_empty() {
                Ok(format!("snapshots: {}", done.join(", ")))
            } else {
                Err(format!("{}; done: {}", failed.join("; "), done.join(", ")))
            }
        }
        JobKind::Copy => {
            if ctx.copies.is_empty() {
                return Err("no [[repository]] to copy to".into());
            }
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for t in &ctx.copies {
                let dst = match (t.open)().await {
                    Ok(r) => Arc::new(r),
                    Err(e) => {
                        failed.push(format!("{}: {e}", t.name));
                        continue;
                    }
                };
                let opts = crate::ops::copy::CopyOptions {
                    backups: crate::ops::copy::Selection::All,
                    wal: true,
                    parallel: 8,
                };
                match crate::ops::copy::copy(ctx.repo.clone(), dst, &ctx.stanza, &opts).await {
                    Ok(r) => done.push(format!(
                        "{}: {} backup(s), {} WAL file(s), {} KiB",
                        t.name,
                        r.backups_copied.len(),
                        r.wal_files,
                        r.bytes_moved >> 10
                    )),
                    Err(e) => failed.push(format!("{}: {e}", t.name)),
                }
            }
            if failed.is_empty() {
                Ok(done.join("; "))
            } else {
                Err(failed.join("; "))
            }
        }
    }
}
