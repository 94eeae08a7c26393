//! Continuous WAL archiving: `walvault stream` ([`stream`]: replication
//! protocol through a slot, RPO of seconds or zero), `walvault wal-push`
//! ([`push`], [`push_async`]: `archive_command`) and `walvault wal-verify`
//! ([`verify`]: the archive is continuous and intact). Also the stanza's WAL
//! as data, which backup and restore use too: [`catalog`] (what segments and
//! histories are stored) and [`summaries`] (segment summaries in the
//! repository).

pub mod catalog;
pub mod push;
pub mod push_async;
pub mod stream;
pub mod summaries;
pub mod verify;

use crate::pg::PgError;
use crate::repo::{Manifest, RepoError, Repository, StanzaPaths};

/// Why archiving failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The server or the connection failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The server sent something unexpected.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// A WAL file is not what it claims to be.
    #[error("{0}")]
    BadWal(String),
    /// Reading a local file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A condition retrying cannot fix.
    #[error("{0}")]
    Permanent(String),
}

impl ArchiveError {
    /// Whether retrying cannot help (the stream gives up on these).
    pub fn is_permanent(&self) -> bool {
        match self {
            ArchiveError::Permanent(_) | ArchiveError::BadWal(_) | ArchiveError::Io { .. } => true,
            ArchiveError::Repo(RepoError::WalConflict { .. })
            | ArchiveError::Repo(RepoError::WrongKey { .. })
            | ArchiveError::Repo(RepoError::KeyNeeded)
            | ArchiveError::Repo(RepoError::NotARepository { .. }) => true,
            // authentication and authorization: 28xxx
            ArchiveError::Pg(e) => e.sqlstate().is_some_and(|s| s.starts_with("28")),
            _ => false,
        }
    }
}

/// Refuse to archive a cluster into a stanza whose backups belong to
/// another cluster.
pub(crate) async fn check_system(
    repo: &Repository,
    paths: &StanzaPaths,
    system_id: u64,
) -> Result<(), ArchiveError> {
    let Some(newest) = Manifest::list_ids(repo, paths).await?.pop() else {
        return Ok(());
    };
    let m = Manifest::load(repo, paths, &newest).await?;
    if m.system_id != system_id {
        return Err(ArchiveError::Permanent(format!(
            "stanza {} holds backups of database system {}, but this server is system {system_id}: \
             give each cluster its own stanza (--stanza)",
            paths.stanza(),
            m.system_id
        )));
    }
    Ok(())
}
