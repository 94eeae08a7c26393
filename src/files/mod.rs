//! `walvault files`: snapshots of file trees (a directory, a bucket of
//! uploads) in the stanza's repository, beside its database backups, so a
//! database and its files come back to the same moment.
//!
//! - [`backup`] lists the source in path order, merges the listing with the
//!   set's previous snapshot (an unchanged file is not read), cuts changed
//!   content into chunks ([`chunker`]) and stores them through the same
//!   block pipeline as database backups (`repo::Session`), then writes the
//!   snapshot ([`crate::repo::files`]): entries first, the head last.
//! - [`restore`] writes a snapshot (or part of it) to a directory or a
//!   bucket, each file under a temporary name then renamed.
//! - [`verify`] checks that every chunk a snapshot names is in the index
//!   (and with `deep`, reads and authenticates it); [`drill`] restores a
//!   random sample and compares it with the source where it is unchanged.
//! - Retention and garbage collection: `ops::expire` applies the policy to
//!   each set; `repo::gc` keeps every chunk a snapshot names.

pub mod backup;
pub mod chunker;
pub mod drill;
pub mod restore;
pub mod source;
pub mod verify;

use chrono::{DateTime, Utc};

use crate::repo::files::{list_heads, SnapshotHead};
use crate::repo::{RepoError, Repository, StanzaPaths};
use crate::storage::StorageError;

/// Why a files command failed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The repository.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The source or target store.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A wrong argument or a source that is not there.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing local files.
    #[error("{what}: {source}")]
    Io {
        /// What was done, with the path.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The restore target holds files already.
    #[error(
        "{target} is not empty: restore into an empty directory or prefix, or give --overwrite"
    )]
    NotEmpty {
        /// The target.
        target: String,
    },
    /// No snapshot fits.
    #[error("{0}")]
    NoSnapshot(String),
    /// A worker task failed.
    #[error("a files task failed: {0}")]
    Task(String),
}

impl FilesError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FilesError {
        let what = what.into();
        move |source| FilesError::Io { what, source }
    }
}

/// Which snapshot of a set: the one named, the newest started at or before
/// a moment, or the newest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Pick {
    /// The newest snapshot of the set.
    #[default]
    Newest,
    /// `--snapshot ID`.
    Id(String),
    /// `--as-of TIME`: the newest snapshot started at or before it.
    AsOf(DateTime<Utc>),
}

/// The snapshot of `set` that `pick` names.
pub async fn choose(
    repo: &Repository,
    paths: &StanzaPaths,
    set: &str,
    pick: &Pick,
) -> Result<SnapshotHead, FilesError> {
    let heads = list_heads(repo, paths, Some(set)).await?;
    let none = |why: String| FilesError::NoSnapshot(why);
    if heads.is_empty() {
        return Err(none(format!(
            "set {set:?} of stanza {} has no snapshot: `walvault files list` shows the sets",
            paths.stanza()
        )));
    }
    match pick {
        Pick::Newest => heads.last().cloned().ok_or_else(|| none(String::new())),
        Pick::Id(id) => heads.iter().find(|h| &h.id == id).cloned().ok_or_else(|| {
            none(format!(
                "set {set:?} has no snapshot {id}: `walvault files list --set {set}` shows them"
            ))
        }),
        Pick::AsOf(t) => heads
            .iter()
            .rev()
            .find(|h| h.started <= *t)
            .cloned()
            .ok_or_else(|| {
                none(format!(
                    "set {set:?} has no snapshot started at or before {}: the oldest started at {}",
                    t.to_rfc3339(),
                    heads[0].started.to_rfc3339()
                ))
            }),
    }
}
