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

/// The lock file in the spool.
const SPOOL_LOCK: &str = ".lock";

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
    name: &WalFileName,
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
    if let (None, WalFileName::Segment(f)) = (&data, name) {
        data = repo.load_wal(&paths, &WalFileName::Partial(*f)).await?;
    }
    let Some(data) = data else {
        return Ok(None);
    };
    write_atomic(dest, &data)?;
    Ok(Some(data.len() as u64))
}

/// Serve `name` from the spool (a rename) if it is there: the fast path,
/// which needs no repository at all. Returns its size.
pub fn from_spool(
    name: &WalFileName,
    dest: &Path,
    spool: &Path,
) -> Result<Option<u64>, RestoreError> {
    let spooled = spool.join(name.to_string());
    match std::fs::metadata(&spooled) {
        Ok(m) => {
            std::fs::rename(&spooled, dest).map_err(io(dest))?;
            Ok(Some(m.len()))
        }
        Err(_) => Ok(None),
    }
}

/// Whether another process holds the spool's lock: a prefetcher, or
/// restore-pitr staging the segments replay needs.
pub fn spool_busy(spool: &Path) -> bool {
    matches!(crate::flock::lock(&spool.join(SPOOL_LOCK), false), Ok(None))
}

/// The spool's lock, held by whoever fills it (a prefetcher, restore-pitr's
/// staging); `None` when another process holds it and `wait` is false.
pub fn lock_spool(
    spool: &Path,
    wait: bool,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, RestoreError> {
    let path = spool.join(SPOOL_LOCK);
    crate::flock::lock(&path, wait).map_err(io(&path))
}

/// Wait for segment `name` to appear in the spool while another process
/// holds its lock (it is most likely downloading it: fetching it here too
/// would race it for the same bytes), then serve it. `None` when the lock
/// is free and the file is not there, or after `patience`: fetch it then.
/// Only segments are waited for: PostgreSQL probes for history files that
/// do not exist, and those must not wait for the whole staging.
pub async fn from_busy_spool(
    name: &WalFileName,
    dest: &Path,
    spool: &Path,
    patience: std::time::Duration,
) -> Result<Option<u64>, RestoreError> {
    if !matches!(name, WalFileName::Segment(_)) {
        return Ok(None);
    }
    let deadline = std::time::Instant::now() + patience;
    while spool_busy(spool) {
        if std::time::Instant::now() >= deadline {
            // (restore-pitr releases the lock once staging is done, so
            // this is a stuck or very slow stager)
            tracing::warn!(
                "{name}: the spool was still being filled after {} s; fetching it from the repository",
                patience.as_secs()
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        if let Some(n) = from_spool(name, dest, spool)? {
            return Ok(Some(n));
        }
    }
    from_spool(name, dest, spool)
}

/// `name` read for segments of `seg_bytes` bytes (the size of a served
/// segment), when that is a segment size and the name a segment of it.
pub fn with_segment_size(name: &WalFileName, seg_bytes: u64) -> Option<WalFileName> {
    let seg = WalSegSize::new(seg_bytes).ok()?;
    WalFileName::parse(&name.to_string(), seg).ok()
}

/// The `count` segments after `name` on its timeline (none when `name` is
/// not a segment). `name` must carry the cluster's real segment size
/// ([`with_segment_size`]).
pub fn following_segments(name: &WalFileName, count: usize) -> Vec<WalFileName> {
    let WalFileName::Segment(mut f) = *name else {
        return Vec::new();
    };
    (0..count)
        .map(|_| {
            f = f.next();
            WalFileName::Segment(f)
        })
        .collect()
}

/// Who owns the files written into a spool (a recovery run by root for the
/// database's OS user): PostgreSQL renames, recycles and rewrites the
/// segments it is served.
pub type Owner = (nix::unistd::Uid, nix::unistd::Gid);

/// The one writer of a spool, for both wal-fetch's prefetch and
/// restore-pitr's staging: each file is written beside its final name
/// (optionally synced and given to `owner`), then renamed into place, so a
/// reader only ever sees complete files with the repository's content.
#[derive(Debug, Clone)]
pub struct SpoolWriter {
    dir: PathBuf,
    sync: bool,
    owner: Option<Owner>,
}

/// What [`SpoolWriter::fill`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filled {
    /// Files written.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The first name the repository did not have (nothing after it was
    /// written).
    pub missing: Option<WalFileName>,
}

impl SpoolWriter {
    /// A writer into `dir` (created when missing). `sync`: each file is
    /// fsynced before its rename (staging for a recovery that may crash and
    /// read it again; a prefetch is only a cache).
    pub fn new(dir: &Path, sync: bool, owner: Option<Owner>) -> Result<SpoolWriter, RestoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw()))
                .map_err(io(dir))?;
        }
        Ok(SpoolWriter {
            dir: dir.to_owned(),
            sync,
            owner,
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `name` is served from: a `.partial` under its segment's name
    /// (the last segment of a backup or a stream, which recovery asks for
    /// by the segment's name).
    pub fn path_of(&self, name: &WalFileName) -> PathBuf {
        let served = match *name {
            WalFileName::Partial(f) => WalFileName::Segment(f),
            other => other,
        };
        self.dir.join(served.to_string())
    }

    /// Write `data` as `name`.
    pub fn write(&self, name: &WalFileName, data: &[u8]) -> Result<(), RestoreError> {
        let file = self.path_of(name);
        let tmp = file.with_extension("walvault-tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        std::io::Write::write_all(&mut f, data).map_err(io(&tmp))?;
        if self.sync {
            f.sync_data().map_err(io(&tmp))?;
        }
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&f, Some(uid.as_raw()), Some(gid.as_raw()))
                .map_err(io(&tmp))?;
        }
        drop(f);
        std::fs::rename(&tmp, &file).map_err(io(&file))
    }

    /// Download `names` from the repository into the spool, `parallel` at
    /// a time, skipping those already there; stops at the first name the
    /// repository does not have (reported in [`Filled::missing`]).
    pub async fn fill(
        &self,
        repo: &Repository,
        paths: &StanzaPaths,
        names: &[WalFileName],
        parallel: usize,
    ) -> Result<Filled, RestoreError> {
        let wanted: Vec<WalFileName> = names
            .iter()
            .filter(|n| !self.path_of(n).exists())
            .copied()
            .collect();
        let mut results = futures::stream::iter(wanted)
            .map(|n| async move {
                let mut data = repo.load_wal(paths, &n).await?;
                if let (None, WalFileName::Partial(f)) = (&data, n) {
                    // the open segment was completed since it was planned:
                    // the complete one holds all the partial did, and more
                    data = repo.load_wal(paths, &WalFileName::Segment(f)).await?;
                }
                let Some(data) = data else {
                    return Ok((n, None));
                };
                let len = data.len() as u64;
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.write(&n, &data))
                    .await
                    .map_err(|e| RestoreError::Task {
                        what: "spool write",
                        reason: e.to_string(),
                    })??;
                Ok::<_, RestoreError>((n, Some(len)))
            })
            .buffered(parallel.max(1));
        let mut filled = Filled::default();
        while let Some(r) = results.next().await {
            match r? {
                (_, Some(len)) => {
                    filled.files += 1;
                    filled.bytes += len;
                }
                (n, None) => {
                    filled.missing = Some(n);
                    break;
                }
            }
        }
        Ok(filled)
    }
}

/// Download `names` (in order; stop at the first the repository does not
/// have) into `spool`, `parallel` at a time, skipping those already there;
/// also remove spooled segments of the same timeline older than `after`
/// (replay has passed them). Holds `spool/.lock` so only one prefetcher
/// runs; returns at once when another holds it.
pub async fn prefetch(
    repo: &Repository,
    stanza: &str,
    after: &WalFileName,
    names: &[WalFileName],
    spool: &Path,
    parallel: usize,
) -> Result<usize, RestoreError> {
    let writer = SpoolWriter::new(spool, false, None)?;
    let Some(_guard) = lock_spool(spool, false)? else {
        return Ok(0); // another prefetcher is at work
    };
    // replay has passed these: segments of the same timeline up to `after`
    if let WalFileName::Segment(last) = after {
        if let Ok(entries) = std::fs::read_dir(spool) {
            for e in entries.flatten() {
                let passed = e.file_name().to_str().is_some_and(|n| {
                    matches!(WalFileName::parse(n, last.seg_size),
                        Ok(WalFileName::Segment(f)) if f.timeline == last.timeline && f.segno <= last.segno)
                });
                if passed {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let paths = StanzaPaths::new(stanza);
    Ok(writer.fill(repo, &paths, names, parallel).await?.files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn hold_lock(spool: &Path) -> nix::fcntl::Flock<std::fs::File> {
        lock_spool(spool, false).unwrap().unwrap()
    }

    /// A segment another process is still writing into the spool is
    /// waited for, not fetched a second time.
    #[tokio::test]
    async fn a_busy_spool_is_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let (spool, dest) = (d.path().join("spool"), d.path().join("RECOVERYXLOG"));
        std::fs::create_dir(&spool).unwrap();
        let name = WalFileName::parse_any_size("000000010000000000000003").unwrap();
        let held = hold_lock(&spool);
        assert!(spool_busy(&spool));
        let s2 = spool.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            write_atomic(&s2.join(name.to_string()), b"segment").unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let got = from_busy_spool(&name, &dest, &spool, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got, Some(7));
        assert_eq!(std::fs::read(&dest).unwrap(), b"segment");
        writer.join().unwrap();
        assert!(!spool_busy(&spool));
        // free lock and no file: no wait
        let t = Instant::now();
        let missing = from_busy_spool(&name, &dest, &spool, Duration::from_secs(10));
        assert_eq!(missing.await.unwrap(), None);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// History files are never waited for (PostgreSQL probes for ones that
    /// do not exist while the segments are still being staged).
    #[tokio::test]
    async fn history_probes_do_not_wait() {
        let d = tempfile::tempdir().unwrap();
        let spool = d.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let _held = hold_lock(&spool);
        let t = Instant::now();
        let got = from_busy_spool(
            &WalFileName::parse_any_size("00000002.history").unwrap(),
            &d.path().join("x"),
            &spool,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(got, None);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
