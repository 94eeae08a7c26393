//! Holds (`walvault hold BACKUP [--until DATE] [--reason TEXT]`, `walvault
//! release BACKUP`): a held backup (or file snapshot, by its id) is never
//! expired. Each hold is its own
//! object `<stanza>/holds/<backup id>/<random>`, written once and deleted
//! on release, so nothing is rewritten in place.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::retention::Hold;
use super::OpsError;
use crate::codec::to_hex;
use crate::repo::object::ObjectKind;
use crate::repo::{Manifest, Repository, StanzaPaths};

/// Every hold of the stanza, by backup id (expired ones included: the
/// policy ignores those).
pub async fn load(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<BTreeMap<String, Vec<Hold>>, OpsError> {
    let mut out: BTreeMap<String, Vec<Hold>> = BTreeMap::new();
    for (key, hold) in repo
        .list_json::<Hold>(ObjectKind::Hold, &paths.holds())
        .await?
    {
        if let Some(id) = backup_of(paths, &key) {
            out.entry(id.to_owned()).or_default().push(hold);
        }
    }
    Ok(out)
}

fn backup_of<'a>(paths: &StanzaPaths, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(&paths.holds())?.split('/').next()
}

/// Backup ids are `YYYYMMDDTHHMMSSZ-NNNN`: letters, digits and dashes.
fn check_id(id: &str) -> Result<(), OpsError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(OpsError::UnknownBackup(id.to_owned()));
    }
    Ok(())
}

/// Whether `id` is a backup or a file snapshot of the stanza.
async fn exists(repo: &Repository, paths: &StanzaPaths, id: &str) -> Result<bool, OpsError> {
    Ok(Manifest::exists(repo, paths, id).await?
        || crate::repo::files::snapshot_exists(repo, paths, id).await?)
}

/// Put a hold on backup (or file snapshot) `id`, which must exist.
pub async fn hold(
    repo: &Repository,
    paths: &StanzaPaths,
    id: &str,
    until: Option<DateTime<Utc>>,
    reason: &str,
) -> Result<Hold, OpsError> {
    check_id(id)?;
    if !exists(repo, paths, id).await? {
        return Err(OpsError::UnknownBackup(id.to_owned()));
    }
    let now = Utc::now();
    if until.is_some_and(|u| u <= now) {
        return Err(OpsError::HoldInThePast);
    }
    let h = Hold {
        until,
        reason: reason.to_owned(),
        created: now,
    };
    let key = format!(
        "{}{id}/{}",
        paths.holds(),
        to_hex(&rand::random::<[u8; 8]>())
    );
    repo.put_json(ObjectKind::Hold, &key, &h).await?;
    Ok(h)
}

/// Remove every hold of backup `id`; returns how many there were.
pub async fn release(repo: &Repository, paths: &StanzaPaths, id: &str) -> Result<usize, OpsError> {
    check_id(id)?;
    let prefix = format!("{}{id}/", paths.holds());
    let keys = crate::storage::list_all(repo.storage().as_ref(), &prefix).await?;
    if keys.is_empty() && !exists(repo, paths, id).await? {
        return Err(OpsError::UnknownBackup(id.to_owned()));
    }
    for k in &keys {
        repo.storage().delete(&k.key).await?;
    }
    Ok(keys.len())
}

/// Delete the holds left on backup `id` (expired ones, when the backup
/// itself is expired).
pub async fn forget(repo: &Repository, paths: &StanzaPaths, id: &str) -> Result<(), OpsError> {
    let prefix = format!("{}{id}/", paths.holds());
    for k in crate::storage::list_all(repo.storage().as_ref(), &prefix).await? {
        match repo.storage().delete(&k.key).await {
            Ok(()) => {}
            // a write-once repository keeps it until its lock ends; a hold
            // on a backup that is gone holds nothing
            Err(crate::storage::StorageError::Locked { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
