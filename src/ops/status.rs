//! What the operations know about each backup, for `list` and `info`: its
//! holds, what its last verify and its last drill found, and the retention
//! rule that keeps it (from the newest applied `expire`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::drill::DrillRecord;
use super::records::{self, ExpireRecord, KeptAs, VerifyRecord};
use super::retention::Hold;
use super::OpsError;
use crate::repo::{Repository, StanzaPaths};

/// A backup's last verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastVerify {
    /// When it ran.
    pub time: DateTime<Utc>,
    /// Whether it read every byte.
    pub deep: bool,
    /// Whether it found the backup whole.
    pub ok: bool,
    /// What it found wrong.
    pub problems: Vec<String>,
}

/// A backup's last drill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LastDrill {
    /// When it ran.
    pub time: DateTime<Utc>,
    /// Whether every check passed.
    pub passed: bool,
    /// The moment it recovered to.
    pub target: String,
    /// The measured recovery time.
    pub rto_seconds: Option<f64>,
    /// The first failed check.
    pub failure: Option<String>,
}

/// What the operations know about one backup.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BackupStatus {
    /// Its holds (expired ones included, marked by their `until`).
    pub holds: Vec<Hold>,
    /// Its last verify.
    pub last_verify: Option<LastVerify>,
    /// How the newest applied `expire` kept it.
    pub retention: Option<KeptAs>,
    /// Its last drill.
    pub last_drill: Option<LastDrill>,
}

/// The status of every backup that has any.
pub async fn backup_status(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<BTreeMap<String, BackupStatus>, OpsError> {
    let mut out: BTreeMap<String, BackupStatus> = BTreeMap::new();
    for (id, holds) in super::holds::load(repo, paths).await? {
        out.entry(id).or_default().holds = holds;
    }
    for r in records::all::<VerifyRecord>(repo, paths, records::VERIFY).await? {
        for (id, c) in r.backups {
            out.entry(id).or_default().last_verify = Some(LastVerify {
                time: r.time,
                deep: r.deep,
                ok: c.ok,
                problems: c.problems,
            });
        }
    }
    for r in records::all::<DrillRecord>(repo, paths, records::DRILL).await? {
        if let Some(id) = &r.backup {
            out.entry(id.clone()).or_default().last_drill = Some(LastDrill {
                time: r.time,
                passed: r.passed,
                target: r.target.clone(),
                rto_seconds: r.rto_seconds,
                failure: r.failure(),
            });
        }
    }
    if let Some(e) = records::newest::<ExpireRecord>(repo, paths, records::EXPIRE).await? {
        for (id, k) in e.kept {
            out.entry(id).or_default().retention = Some(k);
        }
    }
    Ok(out)
}
