//! What the operations know about each backup, for `list` and `info`: its
//! holds, what its last verify found, and the retention rule that keeps
//! it (from the newest applied `expire`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

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

/// What the operations know about one backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackupStatus {
    /// Its holds (expired ones included, marked by their `until`).
    pub holds: Vec<Hold>,
    /// Its last verify.
    pub last_verify: Option<LastVerify>,
    /// How the newest applied `expire` kept it.
    pub retention: Option<KeptAs>,
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
    if let Some(e) = records::newest::<ExpireRecord>(repo, paths, records::EXPIRE).await? {
        for (id, k) in e.kept {
            out.entry(id).or_default().retention = Some(k);
        }
    }
    Ok(out)
}
