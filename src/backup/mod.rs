//! Base backups: BASE_BACKUP's tar streams ([`stream`], [`tar`]) parsed into
//! files and fed to the repository's block pipeline ([`files`],
//! [`store_base_backup`]); [`run_backup`] adds the backup's own WAL, streamed
//! through a temporary slot, and writes the manifest last.

pub mod files;
pub mod incremental;
mod run;
pub mod stream;

pub use run::run_backup;
pub mod tar;

use std::sync::Arc;

use crate::pg::{Lsn, PgConnection, PgError, TimelineId};
use crate::repo::gc::Lease;
use crate::repo::{BackupFile, RepoError, Repository, Session, SessionOptions, SessionStats};
use stream::{ArchiveEvent, BackupStart, BaseBackupOptions, BaseBackupStream};
use tar::TarEvent;

/// Why storing a base backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The server or the connection failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The backup's lease on the repository lapsed before it could commit.
    #[error("the backup's lease on the repository expired (the store was unreachable too long); nothing was committed, run the backup again")]
    LeaseExpired,
    /// The server is a standby that cannot give a backup now (too far
    /// behind its primary, or following none).
    #[error("{0}")]
    Standby(String),
    /// The server found pages whose checksum does not match.
    #[error("{} corrupt page(s) in the source cluster: {}{}; restore those relations from an earlier backup or repair them, then back up again",
        pages.len(),
        pages.iter().take(5).map(|p| format!("{} block {}", p.file, p.block)).collect::<Vec<_>>().join(", "),
        if pages.len() > 5 { ", ..." } else { "" })]
    CorruptPages {
        /// The pages, as the server reported them.
        pages: Vec<CorruptPage>,
    },
}

/// A page that failed checksum verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptPage {
    /// File, relative to the data directory.
    pub file: String,
    /// Block number in the file.
    pub block: u64,
}

/// Pages named in the server's "checksum verification failed in file \"F\",
/// block N: ..." warnings.
fn corrupt_pages(notices: &[crate::pg::wire::ServerMessage]) -> Vec<CorruptPage> {
    notices
        .iter()
        .filter_map(|n| {
            let rest = n
                .message
                .strip_prefix("checksum verification failed in file \"")?;
            let (file, rest) = rest.split_once('"')?;
            let block = rest
                .strip_prefix(", block ")?
                .split(':')
                .next()?
                .trim()
                .parse()
                .ok()?;
            Some(CorruptPage {
                file: file.trim_start_matches("./").to_owned(),
                block,
            })
        })
        .collect()
}

/// A base backup's files, stored in the repository (not yet committed: no
/// manifest has been written).
#[derive(Debug)]
pub struct StoredFiles {
    /// The files, in archive order.
    pub files: Vec<BackupFile>,
    /// What the session stored.
    pub stats: SessionStats,
    /// Start position and tablespaces.
    pub start: BackupStart,
    /// End position.
    pub end: (Lsn, TimelineId),
    /// The writer's lease, still held: commit the manifest while it is valid,
    /// then release it (garbage collection spares packs while it lives).
    pub lease: Lease,
    /// Pages whose checksum failed (only with `allow_checksum_failures`).
    pub corrupt_pages: Vec<CorruptPage>,
    /// The server's `backup_manifest`, when it sent one.
    pub server_manifest: Option<bytes::Bytes>,
    /// The backup the server sent only changes against (PostgreSQL 17+),
    /// when it did.
    pub incremental_from: Option<String>,
    /// Bytes of file contents the server sent.
    pub received_bytes: u64,
}

/// Events go from the network to the block pipeline in batches of about
/// this many bytes of file data (one hand-over per CopyData message, ~32
/// KiB, cost more in thread wake-ups than parsing them)...
const EVENT_BATCH_BYTES: u64 = 1 << 20;
/// ...and at most this many batches wait (so about 8 MiB: the pipeline
/// takes a batch in a few milliseconds: 16 were no faster at scale 100,
/// and held 8 MiB more at the peak of a 15 GB backup).
const EVENT_QUEUE: usize = 8;

/// Run BASE_BACKUP on `conn` and store every file through a new session on
/// `stanza`. `observe` sees every event (progress reporting, tests).
///
/// On failure the session is still finished, so the packs uploaded so far are
/// indexed and the next backup deduplicates against them instead of sending
/// them again.
pub async fn store_base_backup(
    repo: Arc<Repository>,
    stanza: &str,
    conn: &mut PgConnection,
    opts: &BaseBackupOptions,
    mut observe: impl FnMut(&ArchiveEvent) + Send,
) -> Result<StoredFiles, BackupError> {
    let session_opts = SessionOptions {
        compression: opts.compression,
        ..SessionOptions::default()
    };
    let session = Session::start(repo, stanza, session_opts).await?;
    // every block the previous backup's files reference must be one this
    // session may use (garbage collection may have marked its packs)
    let base = opts.incremental_base.clone().filter(|b| {
        let missing = b
            .all_blocks()
            .filter(|id| !session.known_index().contains(id))
            .count();
        if missing > 0 {
            tracing::info!(
                previous = %b.id,
                missing,
                "reading every file: blocks of the previous backup are no longer in the repository's index"
            );
        }
        missing == 0
    });
    let active = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker_base = base.clone().map(|b| (b, active.clone()));
    // bounded: a slow pipeline slows the download instead of filling memory
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<ArchiveEvent>>(EVENT_QUEUE);
    let worker = tokio::task::spawn_blocking(move || {
        let mut asm = files::FileAssembler::new(&session);
        if let Some((b, on)) = worker_base {
            asm = asm.with_base(b, on);
        }
        let mut result = Ok(());
        'recv: while let Some(batch) = rx.blocking_recv() {
            for e in batch {
                if let Err(err) = asm.push(e) {
                    result = Err(err);
                    break 'recv;
                }
            }
        }
        drop(rx);
        let files = result.and_then(|()| asm.finish());
        (files, session)
    });
    let pumped = async {
        let incremental_from = match &base {
            Some(b) => match conn.upload_manifest(&b.server_manifest).await {
                Ok(()) => Some(b.id.clone()),
                Err(e) => {
                    tracing::info!(previous = %b.id, "reading every file: the server took no incremental backup: {e}");
                    None
                }
            },
            None => None,
        };
        let started = match incremental_from {
            Some(_) => match BaseBackupStream::start(conn, opts, true).await {
                Ok(s) => Some(s),
                // the server checks the summaries and the previous
                // backup's WAL against its history only now
                Err(e @ PgError::Server { .. }) => {
                    tracing::info!("reading every file: the server refused an incremental backup: {e}");
                    None
                }
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let (incremental_from, (mut stream, start)) = match started {
            Some(s) => (incremental_from, s),
            None => (None, BaseBackupStream::start(conn, opts, false).await?),
        };
        // before the first event reaches the worker
        active.store(incremental_from.is_some(), std::sync::atomic::Ordering::Release);
        let mut received = 0u64;
        if let Some(p) = &opts.progress {
            p.set_total(start.tablespaces.iter().filter_map(|t| t.size).sum());
        }
        if let Some(tx) = &opts.on_start {
            let _ = tx.send(Some(start.start_lsn));
        }
        let mut events = Vec::new();
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        let mut checksum_error_end = None;
        loop {
            match stream.next(&mut events).await {
                Ok(true) => {}
                Ok(false) => break,
                // the server reports checksum failures with an error after
                // the whole backup, end position included, was sent
                Err(e)
                    if opts.allow_checksum_failures
                        && e.sqlstate() == Some("XX001")
                        && stream.end_sent().is_some() =>
                {
                    tracing::warn!("{e}; kept as asked (--allow-checksum-failures)");
                    checksum_error_end = stream.end_sent();
                    break;
                }
                Err(e) => return Err(e.into()),
            }
            for e in events.drain(..) {
                observe(&e);
                if let ArchiveEvent::Tar(TarEvent::Data(d)) = &e {
                    received += d.len() as u64;
                    batch_bytes += d.len() as u64;
                    if let Some(p) = &opts.progress {
                        p.add(d.len() as u64);
                    }
                }
                batch.push(e);
            }
            if batch_bytes >= EVENT_BATCH_BYTES || batch.len() >= 4096 {
                batch_bytes = 0;
                if tx.send(std::mem::take(&mut batch)).await.is_err() {
                    // the worker stopped on an error, reported below
                    return Ok::<_, BackupError>(None);
                }
            }
        }
        if !batch.is_empty() && tx.send(batch).await.is_err() {
            return Ok::<_, BackupError>(None);
        }
        let end = checksum_error_end
            .or(stream.end())
            .ok_or_else(|| PgError::Protocol {
                target: String::new(),
                reason: "BASE_BACKUP ended without an end position".into(),
            })?;
        Ok(Some((start, end, stream.take_manifest(), incremental_from, received)))
    }
    .await;
    drop(tx);
    let (files, session) = worker.await.map_err(RepoError::task("backup worker"))?;
    let (finished, lease) = session.finish_keep_lease().await;
    // the files' ids back from the temporary file now that the session
    // (and its dedup set) is gone
    let files = match files {
        Ok(a) => tokio::task::spawn_blocking(move || a.into_files())
            .await
            .map_err(RepoError::task("backup worker"))?,
        Err(e) => Err(e),
    };
    // The server verifies page checksums (retrying torn reads) and names each
    // failure in a warning before its final error.
    let pages = corrupt_pages(&conn.take_notices());
    if !pages.is_empty() && !opts.allow_checksum_failures {
        lease.release().await;
        return Err(BackupError::CorruptPages { pages });
    }
    for p in &pages {
        tracing::warn!(
            file = %p.file,
            block = p.block,
            "page checksum failed; the backup keeps the page as read (--allow-checksum-failures)"
        );
    }
    // the first error in pipeline order: the server's, then the files', then the uploads'
    let outcome = (|| -> Result<_, BackupError> { Ok((pumped?, files?, finished?)) })();
    let (positions, files, stats) = match outcome {
        Ok(v) => v,
        Err(e) => {
            lease.release().await;
            return Err(e);
        }
    };
    let Some((start, end, server_manifest, incremental_from, received_bytes)) = positions else {
        lease.release().await;
        return Err(RepoError::SessionClosed("the block pipeline stopped early").into());
    };
    Ok(StoredFiles {
        files,
        stats,
        start,
        end,
        lease,
        corrupt_pages: pages,
        server_manifest,
        incremental_from,
        received_bytes,
    })
}
