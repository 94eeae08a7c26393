//! Continuous WAL archiving: `walvault stream` ([`stream`]: replication
//! protocol through a slot, RPO of seconds or zero), `walvault wal-push`
//! ([`push`], [`push_async`]: `archive_command`) and `walvault wal-verify`
//! ([`verify`]: the archive is continuous and intact). Also the stanza's WAL
//! as data, which backup and restore use too: [`catalog`] (what segments and
//! histories are stored) and [`summaries`] (segment summaries in the
//! repository).

pub mod catalog;
pub mod inspect;
pub mod push;
pub mod push_async;
pub mod stream;
pub mod summaries;
pub mod verify;

use crate::pg::{Lsn, PgError, SystemId, TimelineId, WalFileName};
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
    /// The server sent something the replication protocol does not allow.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// A WAL file is damaged or not what its name says; nothing was stored.
    #[error("{name}: {reason}; refusing to archive it")]
    BadWal {
        /// The file's name.
        name: WalFileName,
        /// What is wrong (the first bad page or record, with its LSN).
        reason: String,
    },
    /// A file handed to `wal-push` whose name is not a WAL file name.
    #[error("{} is not a WAL file name (segment, .partial, .history or .backup)", path.display())]
    NotAWalFile {
        /// The file.
        path: std::path::PathBuf,
    },
    /// A segment file whose length is no segment size.
    #[error(
        "{name} is {len} bytes, not a WAL segment size (a truncated copy?); refusing to archive it"
    )]
    NotASegmentSize {
        /// The file's name.
        name: WalFileName,
        /// Its length in bytes.
        len: u64,
    },
    /// A timeline history file in the repository that does not parse.
    #[error("{timeline:08X}.history in the repository is not a timeline history: {reason}", timeline = timeline.get())]
    BadHistory {
        /// The timeline it belongs to.
        timeline: TimelineId,
        /// What is wrong.
        reason: String,
    },
    /// A timeline after the first whose history file the repository lacks.
    #[error("timeline {timeline} has no {tli:08X}.history in the repository: its ancestry is unknown", tli = timeline.get())]
    MissingHistory {
        /// The timeline.
        timeline: TimelineId,
    },
    /// The stanza's backups belong to another database system.
    #[error(
        "stanza {stanza} holds backups of database system {stored}, but this server is system {server}: \
         give each cluster its own stanza (--stanza)"
    )]
    SystemMismatch {
        /// The stanza.
        stanza: String,
        /// The system of its newest backup.
        stored: SystemId,
        /// The server's.
        server: SystemId,
    },
    /// The repository holds WAL past the server's end of WAL.
    #[error(
        "the repository holds WAL up to {have} on timeline {timeline}, past the server's end of WAL {server_end}: \
         this stanza belongs to another server or history; use another stanza"
    )]
    AheadOfServer {
        /// Where the repository's WAL ends.
        have: Lsn,
        /// On this timeline.
        timeline: TimelineId,
        /// The server's end of WAL.
        server_end: Lsn,
    },
    /// `wal-push --async`: the background process failed to archive a file.
    #[error("{name}: the background push failed: {message}")]
    BackgroundPush {
        /// The WAL file.
        name: WalFileName,
        /// Its error, as it recorded it.
        message: String,
    },
    /// `wal-push --async` waited for the background process in vain.
    #[error("{name} was not archived within {} s by the background process (its log: {}); PostgreSQL will call again", waited.as_secs(), log.display())]
    NotArchivedInTime {
        /// The WAL file.
        name: WalFileName,
        /// How long it waited.
        waited: std::time::Duration,
        /// The background process's log file.
        log: std::path::PathBuf,
    },
    /// A background task (hashing, checking, sealing) panicked or was
    /// cancelled.
    #[error("{what} task failed: {reason}")]
    Task {
        /// What the task did.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// Reading a local file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl ArchiveError {
    /// A failed background task.
    pub(crate) fn task(
        what: &'static str,
    ) -> impl Fn(tokio::task::JoinError) -> ArchiveError + Copy {
        move |e| ArchiveError::Task {
            what,
            reason: e.to_string(),
        }
    }
}

impl ArchiveError {
    /// Whether retrying cannot help (the stream gives up on these).
    pub fn is_permanent(&self) -> bool {
        match self {
            ArchiveError::BadWal { .. }
            | ArchiveError::NotAWalFile { .. }
            | ArchiveError::NotASegmentSize { .. }
            | ArchiveError::BadHistory { .. }
            | ArchiveError::MissingHistory { .. }
            | ArchiveError::SystemMismatch { .. }
            | ArchiveError::AheadOfServer { .. }
            | ArchiveError::NotArchivedInTime { .. }
            | ArchiveError::BackgroundPush { .. }
            | ArchiveError::Io { .. } => true,
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
    system_id: SystemId,
) -> Result<(), ArchiveError> {
    let Some(newest) = Manifest::list_ids(repo, paths).await?.pop() else {
        return Ok(());
    };
    let m = Manifest::load(repo, paths, &newest).await?;
    if m.system_id != system_id {
        return Err(ArchiveError::SystemMismatch {
            stanza: paths.stanza().to_owned(),
            stored: m.system_id,
            server: system_id,
        });
    }
    Ok(())
}
