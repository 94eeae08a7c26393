//! Operating the repository: retention, verification, health checks,
//! drills, copies.

pub mod check;
pub mod copy;
pub mod drill;
pub mod expire;
pub mod extract;
pub mod holds;
pub mod locks;
pub mod records;
pub mod retention;
pub(crate) mod scratch;
pub mod status;
pub mod verify;

use crate::archive::ArchiveError;
use crate::repo::RepoError;
use crate::storage::StorageError;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The server failed or refused.
    #[error(transparent)]
    Pg(#[from] crate::pg::PgError),
    /// Reading the archived WAL failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The retention policy is unusable.
    #[error(transparent)]
    Policy(#[from] retention::PolicyError),
    /// No backup has this id.
    #[error("there is no backup {0} in this stanza; `walvault list` shows the backups")]
    UnknownBackup(String),
    /// A copy refused or failed.
    #[error("{0}")]
    Copy(String),
    /// A drill could not run (no backup, no scratch space, no OS user).
    #[error("{0}")]
    Drill(String),
    /// An extract was refused or failed (one line saying why and what to
    /// do).
    #[error("{0}")]
    Extract(String),
    /// `expire --forget` refused a backup (held, the newest, locked).
    #[error("{0}")]
    Forget(String),
    /// A hold that would end before it begins.
    #[error("--until lies in the past: a hold must end in the future (or give no --until to hold until released)")]
    HoldInThePast,
}

impl From<StorageError> for OpsError {
    fn from(e: StorageError) -> OpsError {
        OpsError::Repo(e.into())
    }
}
