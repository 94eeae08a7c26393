//! Packs `verify` found damaged (missing, truncated, or failing their
//! checks), one empty object each: `<stanza>/damaged/<pack id>`.
//!
//! A block the index places in such a pack cannot be read, and before this
//! a new backup deduplicated against it all the same: "take a new backup"
//! after damage made another backup that could not be restored. Now a
//! session leaves damaged packs out of what it deduplicates against, so the
//! next backup stores their blocks again, and every index read puts them
//! last, so a block stored again is read from its new copy (and a damaged
//! pack whose blocks all have new copies is no longer referenced: garbage
//! collection removes it). Backups taken before stay damaged and `verify`
//! keeps naming them. A marked pack that a later `verify` reads in full and
//! finds whole (put back from a copy, or the damage was in the path to it)
//! loses its mark.

use std::collections::HashSet;

use bytes::Bytes;

use super::{PackId, RepoError, Repository, StanzaPaths};
use crate::storage::list_all;

/// Record that `pack` is damaged.
pub async fn mark_damaged(
    repo: &Repository,
    paths: &StanzaPaths,
    pack: &PackId,
) -> Result<(), RepoError> {
    repo.storage()
        .put(&paths.damaged(pack), Bytes::new())
        .await
        .map_err(RepoError::from)
}

/// Remove the record that `pack` is damaged (removing none succeeds).
pub async fn clear_damaged(
    repo: &Repository,
    paths: &StanzaPaths,
    pack: &PackId,
) -> Result<(), RepoError> {
    repo.storage()
        .delete(&paths.damaged(pack))
        .await
        .map_err(RepoError::from)
}

/// The packs recorded as damaged.
pub async fn damaged_packs(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<HashSet<PackId>, RepoError> {
    let prefix = paths.damaged_dir();
    Ok(list_all(repo.storage().as_ref(), &prefix)
        .await?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(&prefix).and_then(PackId::parse))
        .collect())
}
