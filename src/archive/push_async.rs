//! `walvault wal-push --async`: archiving ahead of `archive_command`.
//!
//! PostgreSQL's archiver runs `archive_command` for one file at a time and
//! waits for it; a synchronous push costs a process start, a read, a check,
//! compression and a durable write, one after the other. With `--async` a
//! background process (started by the first call, exiting after a quiet
//! spell) pushes every file PostgreSQL has marked ready
//! (`archive_status/*.ready`), several at once, and leaves
//! `<spool>/<name>.ok` once the file is durable in the repository — or
//! `<name>.error` with the reason. The call PostgreSQL waits for only looks
//! for its file's mark: usually it is there already.
//!
//! Invariants: a `.ok` is written only after the push returned success, so a
//! call never acknowledges WAL that is not durable; a lost mark (crash)
//! only means the file is pushed again, which is idempotent; an `.error`
//! is reported once by the call, which removes it, so PostgreSQL's retry
//! makes the background process try again. The spool holds marks only.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::ArchiveError;
use crate::pg::WalFileName;
use crate::repo::Repository;

/// Name of the default spool directory, in `pg_wal`.
pub const SPOOL_DIR: &str = "walvault-push";
/// Lock file held by the running background process.
const LOCK: &str = "worker.lock";
/// Where the background process logs.
pub const WORKER_LOG: &str = "worker.log";
/// How long the background process waits for new files before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// Pause between scans of `archive_status` when nothing is ready.
const SCAN_PAUSE: Duration = Duration::from_millis(50);

/// The spool beside `wal_file`'s directory (`pg_wal/walvault-push`).
pub fn default_spool(wal_file: &Path) -> PathBuf {
    wal_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(SPOOL_DIR)
}

/// What the call for one file found.
#[derive(Debug, PartialEq, Eq)]
pub enum Mark {
    /// Durable in the repository.
    Ok,
    /// The background push failed with this message.
    Error(String),
    /// Not pushed yet.
    None,
}

/// Take (read and remove) the mark of `name`.
pub fn take_mark(spool: &Path, name: &WalFileName) -> Result<Mark, ArchiveError> {
    let ok = spool.join(format!("{name}.ok"));
    match std::fs::remove_file(&ok) {
        Ok(()) => return Ok(Mark::Ok),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ArchiveError::Io { path: ok, source }),
    }
    let err = spool.join(format!("{name}.error"));
    match std::fs::read_to_string(&err) {
        Ok(msg) => {
            let _ = std::fs::remove_file(&err);
            Ok(Mark::Error(msg.trim().to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Mark::None),
        Err(source) => Err(ArchiveError::Io { path: err, source }),
    }
}

/// Whether a background process holds the spool's lock.
pub fn worker_running(spool: &Path) -> bool {
    match try_lock(spool) {
        Ok(Some(_held)) => false,
        Ok(None) => true,
        Err(_) => false,
    }
}

/// The spool's lock, if nobody holds it (released when dropped).
fn try_lock(spool: &Path) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    crate::flock::lock(&spool.join(LOCK), false)
}

/// The files PostgreSQL has marked ready in `wal_dir`, in the order its
/// archiver takes them: timeline history files first, then by name. A
/// status file that names no WAL file is left to PostgreSQL's own call.
fn ready_files(wal_dir: &Path) -> std::io::Result<Vec<WalFileName>> {
    let mut names: Vec<WalFileName> = std::fs::read_dir(wal_dir.join("archive_status"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".ready"))
                .and_then(|n| WalFileName::parse_any_size(n).ok())
        })
        .collect();
    names.sort_by_key(|n| (!matches!(n, WalFileName::History(_)), n.to_string()));
    Ok(names)
}

/// Leave `msg` as the error of `name`, for the call waiting for it (the
/// background process could not run at all).
pub fn mark_error(spool: &Path, name: &WalFileName, msg: &str) -> std::io::Result<()> {
    mark(spool, name, "error", msg)
}

/// Write `<spool>/<name>.<kind>` whole (beside, then renamed).
fn mark(spool: &Path, name: &WalFileName, kind: &str, body: &str) -> std::io::Result<()> {
    let tmp = spool.join(format!(".{name}.{kind}.tmp"));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, spool.join(format!("{name}.{kind}")))
}

/// The background process: push every ready file of `wal_dir` not marked
/// yet, `parallel` at once, until nothing new is ready for [`IDLE_EXIT`].
/// Returns at once when another process holds the lock.
pub async fn run_worker(
    repo: &Repository,
    stanza: &str,
    wal_dir: &Path,
    spool: &Path,
    parallel: usize,
) -> Result<(), ArchiveError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ArchiveError::Io { path, source }
    };
    let Some(_lock) = try_lock(spool).map_err(io(spool))? else {
        return Ok(());
    };
    let mut idle_since = Instant::now();
    loop {
        let ready = ready_files(wal_dir).map_err(io(wal_dir))?;
        let todo: Vec<WalFileName> = ready
            .iter()
            .filter(|n| {
                !spool.join(format!("{n}.ok")).exists()
                    && !spool.join(format!("{n}.error")).exists()
            })
            .take(parallel.max(1) * 4)
            .cloned()
            .collect();
        forget_consumed(spool, &ready);
        if todo.is_empty() {
            if idle_since.elapsed() >= IDLE_EXIT {
                return Ok(());
            }
            tokio::time::sleep(SCAN_PAUSE).await;
            continue;
        }
        futures::stream::iter(todo)
            .map(|name| async move {
                let r = super::push::wal_push(repo, stanza, &wal_dir.join(name.to_string())).await;
                let written = match &r {
                    Ok(_) => mark(spool, &name, "ok", ""),
                    Err(e) => {
                        tracing::warn!("{name}: {e}");
                        mark(spool, &name, "error", &e.to_string())
                    }
                };
                if let Err(e) = written {
                    tracing::warn!("cannot mark {name} in {}: {e}", spool.display());
                }
            })
            .buffer_unordered(parallel.max(1))
            .collect::<Vec<()>>()
            .await;
        idle_since = Instant::now();
    }
}

/// Remove marks of files no longer ready: PostgreSQL archived them some
/// other way, or removed them (a mark is only a hint).
fn forget_consumed(spool: &Path, ready: &[WalFileName]) {
    let Ok(entries) = std::fs::read_dir(spool) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let file = e.file_name();
        let Some(name) = file
            .to_str()
            .and_then(|n| n.strip_suffix(".ok").or_else(|| n.strip_suffix(".error")))
        else {
            continue;
        };
        if !ready.iter().any(|r| r.to_string() == name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Wait for the mark of `name`: `Ok` once it is durable. `start_worker` is
/// called when no background process holds the lock (at most once a
/// second).
pub async fn wait_for(
    spool: &Path,
    name: &WalFileName,
    timeout: Duration,
    mut start_worker: impl FnMut() -> std::io::Result<()>,
) -> Result<(), ArchiveError> {
    let deadline = Instant::now() + timeout;
    let mut started: Option<Instant> = None;
    let mut pause = Duration::from_millis(1);
    loop {
        match take_mark(spool, name)? {
            Mark::Ok => return Ok(()),
            Mark::Error(message) => {
                return Err(ArchiveError::BackgroundPush {
                    name: *name,
                    message,
                })
            }
            Mark::None => {}
        }
        if Instant::now() >= deadline {
            return Err(ArchiveError::NotArchivedInTime {
                name: *name,
                waited: timeout,
                log: spool.join(WORKER_LOG),
            });
        }
        if started.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) && !worker_running(spool) {
            start_worker().map_err(|source| ArchiveError::Io {
                path: spool.to_owned(),
                source,
            })?;
            started = Some(Instant::now());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_taken_once() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        let a = WalFileName::parse_any_size("000000010000000000000001").unwrap();
        let b = WalFileName::parse_any_size("00000002.history").unwrap();
        assert_eq!(take_mark(s, &a).unwrap(), Mark::None);
        mark(s, &a, "ok", "").unwrap();
        mark(s, &b, "error", "it broke\n").unwrap();
        assert_eq!(take_mark(s, &a).unwrap(), Mark::Ok);
        assert_eq!(take_mark(s, &a).unwrap(), Mark::None);
        assert_eq!(take_mark(s, &b).unwrap(), Mark::Error("it broke".into()));
        assert_eq!(take_mark(s, &b).unwrap(), Mark::None);
    }

    #[test]
    fn history_files_come_first() {
        let d = tempfile::tempdir().unwrap();
        let st = d.path().join("archive_status");
        std::fs::create_dir(&st).unwrap();
        for n in [
            "000000020000000000000003.ready",
            "00000002.history.ready",
            "000000010000000000000002.ready",
            "000000010000000000000001.done",
        ] {
            std::fs::write(st.join(n), "").unwrap();
        }
        assert_eq!(
            ready_files(d.path())
                .unwrap()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>(),
            [
                "00000002.history",
                "000000010000000000000002",
                "000000020000000000000003"
            ]
        );
    }

    #[test]
    fn one_worker_holds_the_lock() {
        let d = tempfile::tempdir().unwrap();
        assert!(!worker_running(d.path()));
        let held = try_lock(d.path()).unwrap();
        assert!(held.is_some());
        assert!(worker_running(d.path()));
        drop(held);
        assert!(!worker_running(d.path()));
    }
}
