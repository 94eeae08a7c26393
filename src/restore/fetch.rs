//! `walvault wal-fetch NAME DEST` for `restore_command`, with a spool that
//! keeps replay off the network: after serving segment N, the next
//! `--prefetch` segments are downloaded in parallel (by a detached copy of
//! this process, so PostgreSQL is not kept waiting) into
//! `<pg_wal>/walvault-spool/`, and the next calls are a rename. `restore-pitr`
//! fills the same spool ahead of time.
//!
//! Invariants: a spool file appears only complete (written beside, then
//! renamed) and only with the repository's content for its name; the spool
//! lives in `pg_wal`, so base backups of the restored server skip it.

use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::{io, RestoreError};
use crate::pg::{WalFileName, WalSegSize};
use crate::repo::{Repository, StanzaPaths};

/// Name of the spool directory inside `pg_wal`.
pub const SPOOL_DIR: &str = "walvault-spool";

/// The spool beside `dest` (PostgreSQL asks for `pg_wal/RECOVERYXLOG`).
pub fn default_spool(dest: &Path) -> PathBuf {
    dest.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(SPOOL_DIR)
}

/// Write `data` to `dest` atomically (beside, then rename): PostgreSQL
/// never sees a prefix.
fn write_atomic(dest: &Path, data: &[u8]) -> Result<(), RestoreError> {
    let tmp = dest.with_extension("walvault-tmp");
    std::fs::write(&tmp, data).map_err(io(&tmp))?;
    std::fs::rename(&tmp, dest).map_err(io(dest))
}

/// Write WAL file `name` from the spool or the repository to `dest`. Falls
/// back to `<name>.partial` when the full segment is not there (the last
/// segment of a backup or a stream). Returns the segment size when a
/// segment was served (for prefetching), `None` when the repository has
/// neither, so recovery ends cleanly.
pub async fn wal_fetch(
    repo: &Repository,
    stanza: &str,
    name: &str,
    dest: &Path,
    spool: Option<&Path>,
) -> Result<Option<u64>, RestoreError> {
    if let Some(dir) = spool {
        if let Some(len) = from_spool(name, dest, dir)? {
            return Ok(Some(len));
        }
    }
    let paths = StanzaPaths::new(stanza);
    let mut data = repo.load_wal(&paths, name).await?;
    if data.is_none() && name.len() == 24 {
        data = repo.load_wal(&paths, &format!("{name}.partial")).await?;
    }
    let Some(data) = data else {
        return Ok(None);
    };
    write_atomic(dest, &data)?;
    Ok(Some(data.len() as u64))
}

/// Serve `name` from the spool (a rename) if it is there: the fast path,
/// which needs no repository at all. Returns its size.
pub fn from_spool(name: &str, dest: &Path, spool: &Path) -> Result<Option<u64>, RestoreError> {
    let spooled = spool.join(name);
    match std::fs::metadata(&spooled) {
        Ok(m) => {
            std::fs::rename(&spooled, dest).map_err(io(dest))?;
            Ok(Some(m.len()))
        }
        Err(_) => Ok(None),
    }
}

/// The `count` segments after `name` on its timeline (none when `name` is
/// not a segment).
pub fn following_segments(name: &str, seg_bytes: u64, count: usize) -> Vec<String> {
    let Ok(seg) = WalSegSize::new(seg_bytes) else {
        return Vec::new();
    };
    let Ok(WalFileName::Segment(mut f)) = WalFileName::parse(name, seg) else {
        return Vec::new();
    };
    (0..count)
        .map(|_| {
            f = f.next();
            f.to_string()
        })
        .collect()
}

/// Download `names` (in order; stop at the first the repository does not
/// have) into `spool`, `parallel` at a time, skipping those already there;
/// also remove spooled segments of the same timeline older than `after`
/// (replay has passed them). Holds `spool/.lock` so only one prefetcher
/// runs; returns at once when another holds it.
pub async fn prefetch(
    repo: &Repository,
    stanza: &str,
    after: &str,
    names: &[String],
    spool: &Path,
    parallel: usize,
) -> Result<usize, RestoreError> {
    std::fs::create_dir_all(spool).map_err(io(spool))?;
    let lock_path = spool.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(&lock_path))?;
    let Ok(_guard) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
    else {
        return Ok(0); // another prefetcher is at work
    };
    // replay has passed these
    if let Ok(entries) = std::fs::read_dir(spool) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.len() == 24 && n[..8] == after[..8.min(after.len())] && n.as_str() <= after {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let paths = StanzaPaths::new(stanza);
    let wanted: Vec<&String> = names.iter().filter(|n| !spool.join(n).exists()).collect();
    let results: Vec<Result<bool, RestoreError>> = futures::stream::iter(wanted)
        .map(|n| {
            let paths = &paths;
            async move {
                match repo.load_wal(paths, n).await? {
                    Some(data) => {
                        write_atomic(&spool.join(n), &data)?;
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
        })
        .buffered(parallel.max(1))
        .collect()
        .await;
    let mut fetched = 0;
    for r in results {
        match r? {
            true => fetched += 1,
            false => break,
        }
    }
    Ok(fetched)
}
