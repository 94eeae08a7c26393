//! Results the operations leave in the repository for the next run and for
//! monitors: `<stanza>/records/<kind>/<time>-<random>`, one sealed JSON
//! object per result, never rewritten (a write-once repository allows
//! that). Names sort by time, so the newest is the last listed. `expire`
//! prunes all but the newest [`KEEP_RECORDS`] of each kind.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::retention::Role;
use super::OpsError;
use crate::repo::object::ObjectKind;
use crate::repo::{Repository, StanzaPaths};
use crate::storage::list_all;

/// Records of each kind kept by pruning.
pub const KEEP_RECORDS: usize = 50;

/// The record kinds.
pub const EXPIRE: &str = "expire";
/// `walvault verify` results.
pub const VERIFY: &str = "verify";
/// `walvault drill` results.
pub const DRILL: &str = "drill";
/// The daemon's job runs (a start and an end record each).
pub const JOB: &str = "job";

/// Store `value` as a new record of `kind`; returns its key.
pub async fn store<T: Serialize>(
    repo: &Repository,
    paths: &StanzaPaths,
    kind: &str,
    value: &T,
) -> Result<String, OpsError> {
    let key = paths.new_record(kind);
    repo.put_json(ObjectKind::Record, &key, value).await?;
    Ok(key)
}

/// The newest record of `kind`, if any.
pub async fn newest<T: DeserializeOwned>(
    repo: &Repository,
    paths: &StanzaPaths,
    kind: &str,
) -> Result<Option<T>, OpsError> {
    let mut keys = list_all(repo.storage().as_ref(), &paths.records(kind)).await?;
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    for k in keys.iter().rev() {
        match repo.get_json::<T>(ObjectKind::Record, &k.key).await? {
            Some(v) => return Ok(Some(v)),
            None => continue, // pruned while we listed
        }
    }
    Ok(None)
}

/// Every record of `kind`, oldest first.
pub async fn all<T: DeserializeOwned>(
    repo: &Repository,
    paths: &StanzaPaths,
    kind: &str,
) -> Result<Vec<T>, OpsError> {
    Ok(repo
        .list_json::<T>(ObjectKind::Record, &paths.records(kind))
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Delete all but the newest [`KEEP_RECORDS`] records of `kind`; returns
/// how many were deleted. Of `verify` records, the newest passing deep one
/// stays whatever its age: it holds the ledger `--since-last` reads.
pub async fn prune(repo: &Repository, paths: &StanzaPaths, kind: &str) -> Result<usize, OpsError> {
    let mut keys = list_all(repo.storage().as_ref(), &paths.records(kind)).await?;
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    let excess = keys.len().saturating_sub(KEEP_RECORDS);
    let ledger = if kind == VERIFY && excess > 0 {
        repo.list_json::<VerifyRecord>(ObjectKind::Record, &paths.records(kind))
            .await?
            .into_iter()
            .rfind(|(_, r)| r.deep && r.passed)
            .map(|(k, _)| k)
    } else {
        None
    };
    let mut deleted = 0;
    for k in keys.iter().take(excess) {
        if ledger.as_deref() == Some(k.key.as_str()) {
            continue;
        }
        match repo.storage().delete(&k.key).await {
            Ok(()) => deleted += 1,
            // a write-once repository keeps it until its lock ends
            Err(crate::storage::StorageError::Locked { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}

/// How `expire` left a backup: what it is kept as, and by which rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptAs {
    /// What its WAL is kept for.
    pub role: Role,
    /// The rules that keep it, in words (`window`, `daily 2026-12-04`, …).
    pub rules: Vec<String>,
}

/// What an applied `expire` decided: `wal-verify` reads it to know which
/// backups are restore points with only their own WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpireRecord {
    /// When it ran.
    pub time: DateTime<Utc>,
    /// Kept backups.
    pub kept: BTreeMap<String, KeptAs>,
    /// Expired backups.
    pub expired: Vec<String>,
}

/// What one backup's check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCheck {
    /// No problem.
    pub ok: bool,
    /// The problems, one line each.
    pub problems: Vec<String>,
}

/// The result of a `walvault verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyRecord {
    /// When it ran.
    pub time: DateTime<Utc>,
    /// Every byte read and authenticated (of what it covered).
    pub deep: bool,
    /// Only what was written since the last passing deep verify (plus the
    /// sample).
    pub since_last: bool,
    /// The share of older packs re-read (scrubbing), in percent.
    pub sample_percent: Option<f64>,
    /// Nothing found.
    pub passed: bool,
    /// Per backup.
    pub backups: BTreeMap<String, BackupCheck>,
    /// Packs read completely and authenticated (hex ids).
    pub packs_read: Vec<String>,
    /// WAL files read completely and checked (object names).
    pub wal_read: Vec<String>,
    /// Bytes read.
    pub bytes_read: u64,
    /// Every problem, one line each.
    pub problems: Vec<String>,
}

/// Backups whose most recent verify found them whole.
pub async fn verified_backups(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<std::collections::BTreeSet<String>, OpsError> {
    let mut last: BTreeMap<String, bool> = BTreeMap::new();
    for r in all::<VerifyRecord>(repo, paths, VERIFY).await? {
        for (id, c) in r.backups {
            last.insert(id, c.ok);
        }
    }
    Ok(last
        .into_iter()
        .filter(|(_, ok)| *ok)
        .map(|(id, _)| id)
        .collect())
}

/// Backups the newest applied `expire` kept as restore points (only their
/// own WAL kept).
pub async fn restore_points(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<std::collections::BTreeSet<String>, OpsError> {
    Ok(newest::<ExpireRecord>(repo, paths, EXPIRE)
        .await?
        .map(|r| {
            r.kept
                .into_iter()
                .filter(|(_, k)| k.role == Role::Point)
                .map(|(id, _)| id)
                .collect()
        })
        .unwrap_or_default())
}
