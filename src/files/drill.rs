//! `walvault files drill`: restore a random sample of a snapshot's files
//! (read every chunk back from the repository, authenticated) and compare
//! each with the source's current file or object where the source still
//! has the same version (same size and mtime/inode, or same ETag): a
//! mismatch there means the snapshot does not hold what the source held.

use std::sync::Arc;

use futures::StreamExt;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::source::{self, Place};
use super::{choose, FilesError, Pick};
use crate::repo::files::{EntryCursor, EntryKind, FileEntry};
use crate::repo::{Index, Repository, StanzaPaths};
use crate::storage::S3Config;

/// Options of a files drill.
#[derive(Debug, Clone)]
pub struct FilesDrillOptions {
    /// The set.
    pub set: String,
    /// Files sampled.
    pub sample: usize,
    /// The source to compare with (default: the snapshot's own).
    pub source: Option<String>,
    /// S3 settings of an S3 source.
    pub s3: S3Config,
}

/// One sampled file that does not match.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mismatch {
    /// Its path.
    pub path: String,
    /// What differs.
    pub reason: String,
}

/// What a files drill found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FilesDrillReport {
    /// The snapshot sampled.
    pub snapshot: String,
    /// Files in the sample.
    pub sampled: usize,
    /// Of them, read back from the repository whole and authenticated.
    pub restored: usize,
    /// Bytes read back.
    pub restored_bytes: u64,
    /// Compared with the source's same version, and equal.
    pub matched: usize,
    /// Changed or removed in the source since the snapshot (not compared).
    pub changed_since: usize,
    /// Not equal, or not readable from the repository.
    pub mismatches: Vec<Mismatch>,
    /// No mismatch.
    pub passed: bool,
}

/// Run a drill on the newest snapshot of `opts.set`.
pub async fn drill(
    repo: Arc<Repository>,
    stanza: &str,
    opts: &FilesDrillOptions,
) -> Result<FilesDrillReport, FilesError> {
    let paths = StanzaPaths::new(stanza);
    let head = choose(&repo, &paths, &opts.set, &Pick::Newest).await?;
    let url = opts.source.clone().unwrap_or_else(|| head.source.clone());
    let place = Place::open(&url, &opts.s3).await?;
    source::probe(&place).await?;
    // reservoir sampling: each file equally likely, one pass, O(sample)
    let mut sample: Vec<FileEntry> = Vec::with_capacity(opts.sample);
    let mut seen = 0usize;
    // a seeded generator, not `rand::rng()`: that one is per thread and
    // the command runs as a task that may move between threads
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut cursor = EntryCursor::new(&paths, &head);
    while let Some(e) = cursor.next(&repo).await? {
        if e.kind != EntryKind::File || e.path.ends_with('/') {
            continue;
        }
        seen += 1;
        if sample.len() < opts.sample {
            sample.push(e);
        } else {
            let j = rng.random_range(0..seen);
            if let Some(slot) = sample.get_mut(j) {
                *slot = e;
            }
        }
    }
    let (index, _) = Index::load(&repo, &paths).await?;
    let mut r = FilesDrillReport {
        snapshot: head.id.clone(),
        sampled: sample.len(),
        ..FilesDrillReport::default()
    };
    for e in &sample {
        let ids: Vec<_> = e.chunks.iter().map(|c| c.id).collect();
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut blocks = std::pin::pin!(repo.read_blocks(&paths, &index, &ids, 4));
        let mut failed = None;
        while let Some(b) = blocks.next().await {
            match b {
                Ok(b) => {
                    n += b.len() as u64;
                    h.update(&b);
                }
                Err(err) => {
                    failed = Some(err.to_string());
                    break;
                }
            }
        }
        if let Some(why) = failed
            .or_else(|| (n != e.size).then(|| format!("{n} bytes restored, {} expected", e.size)))
        {
            r.mismatches.push(Mismatch {
                path: e.path.clone(),
                reason: format!("cannot be restored: {why}"),
            });
            continue;
        }
        r.restored += 1;
        r.restored_bytes += n;
        let restored = h.finalize();
        match current(&place, e).await? {
            None => r.changed_since += 1,
            Some(now) if now == restored.as_slice() => r.matched += 1,
            Some(_) => r.mismatches.push(Mismatch {
                path: e.path.clone(),
                reason: "the source holds the same version (same size and time, or ETag) with other content".into(),
            }),
        }
    }
    r.passed = r.mismatches.is_empty();
    Ok(r)
}

/// SHA-256 of the source's content of `e` when the source still has the
/// version the snapshot stored; `None` when it changed or is gone.
async fn current(place: &Place, e: &FileEntry) -> Result<Option<Vec<u8>>, FilesError> {
    match place {
        Place::Dir(root) => {
            let full = root.join(&e.path);
            let e = e.clone();
            tokio::task::spawn_blocking(move || {
                let Ok(m) = std::fs::symlink_metadata(&full) else {
                    return Ok(None);
                };
                let Ok(now) = source::dir_entry(&full, e.path.clone(), &m) else {
                    return Ok(None);
                };
                if !e.unchanged(&now) {
                    return Ok(None);
                }
                let mut f = std::fs::File::open(&full)
                    .map_err(FilesError::io(format!("open {}", full.display())))?;
                let mut h = Sha256::new();
                std::io::copy(&mut f, &mut h)
                    .map_err(FilesError::io(format!("read {}", full.display())))?;
                Ok(Some(h.finalize().to_vec()))
            })
            .await
            .map_err(|e| FilesError::Task(e.to_string()))?
        }
        Place::S3(s3) => {
            let Some(d) = s3.object_details(&e.path).await? else {
                return Ok(None);
            };
            if Some(&d.etag) != e.etag.as_ref() || d.size != e.size {
                return Ok(None);
            }
            let mut h = Sha256::new();
            let mut at = 0u64;
            while at < d.size {
                let len = (8u64 << 20).min(d.size - at);
                match s3.get_range_if_match(&e.path, at, len, &d.etag).await {
                    Ok(b) => h.update(&b),
                    Err(crate::storage::StorageError::Changed { .. }) => return Ok(None),
                    Err(err) if err.is_not_found() => return Ok(None),
                    Err(err) => return Err(err.into()),
                }
                at += len;
            }
            Ok(Some(h.finalize().to_vec()))
        }
    }
}
