//! Segment summaries in the repository: `<stanza>/wal-summary/<TLI>/<segment>`
//! (postcard, sealed like every object). Written when a complete segment is
//! archived (`stream`, `wal-push`, a backup's own WAL); computed on the fly
//! from the WAL when one is missing (the newest `.partial`, or WAL archived
//! before summaries existed) — `load_path` always returns a summary per
//! segment asked for.

use futures::StreamExt;

use super::ArchiveError;
use crate::pg::{SegmentFile, WalFileName};
use crate::repo::object::ObjectKind;
use crate::repo::timeline_dir;
use crate::repo::{RepoError, Repository, StanzaPaths};
use crate::wal::summary::{summarize, SegmentSummary, SUMMARY_OLDEST, SUMMARY_VERSION};

/// The object key of segment `f`'s summary.
pub fn key(paths: &StanzaPaths, f: &SegmentFile) -> String {
    format!("{}{}/{f}", paths.wal_summaries(), timeline_dir(f.timeline))
}

/// Delete the summary of segment `f` (retention removed the segment); a
/// missing one is not an error.
pub async fn delete_summary(
    repo: &Repository,
    paths: &StanzaPaths,
    f: &SegmentFile,
) -> Result<(), RepoError> {
    match repo.storage().delete(&key(paths, f)).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        // written a moment after its segment, locked a moment longer in a
        // write-once repository: a later expire removes it
        Err(crate::storage::StorageError::Locked { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Summarize WAL file `name` (a segment or `.partial`) from its bytes and
/// store the summary. Errors are logged, not returned: a summary is an
/// index, and the WAL itself is already safe.
pub async fn store_summary(
    repo: &Repository,
    paths: &StanzaPaths,
    name: &WalFileName,
    data: &[u8],
) {
    let (name2, data2) = (*name, data.to_vec());
    match tokio::task::spawn_blocking(move || compute(&name2, &data2)).await {
        Ok(Some(s)) => store_computed(repo, paths, name, &s).await,
        Ok(None) => {}
        Err(e) => tracing::warn!("summary task for {name} failed: {e}"),
    }
}

/// Store a summary computed already (logged, not returned, on failure).
pub async fn store_computed(
    repo: &Repository,
    paths: &StanzaPaths,
    name: &WalFileName,
    s: &SegmentSummary,
) {
    let Some(f) = name.segment_file() else {
        return;
    };
    let r = async {
        let body = s.encode().map_err(RepoError::encode("a WAL summary"))?;
        let k = key(paths, &f);
        repo.storage()
            .put(&k, repo.seal(ObjectKind::WalSummary, &k, &body))
            .await
            .map_err(RepoError::from)?;
        Ok::<(), ArchiveError>(())
    }
    .await;
    if let Err(e) = r {
        tracing::warn!("could not store the summary of {name}: {e}");
    }
}

/// The summary of WAL file `name` from its bytes (`None` if not a segment
/// or `.partial`, or when `data` is not a whole segment of the name's size).
pub fn compute(name: &WalFileName, data: &[u8]) -> Option<SegmentSummary> {
    let (WalFileName::Segment(f) | WalFileName::Partial(f)) = *name else {
        return None;
    };
    (data.len() as u64 == f.seg_size.bytes())
        .then(|| summarize(data, None, f.timeline, f.segno, f.seg_size))
}

/// The stored summary of segment `f`, if any (of a version this build
/// reads, and about that segment: anything else is recomputed by callers).
pub async fn load_summary(
    repo: &Repository,
    paths: &StanzaPaths,
    f: &SegmentFile,
) -> Result<Option<SegmentSummary>, ArchiveError> {
    let k = key(paths, f);
    match repo.read_object(ObjectKind::WalSummary, &k, 64 << 20).await {
        Ok(body) => Ok(SegmentSummary::decode(&body).filter(|s| {
            (SUMMARY_OLDEST..=SUMMARY_VERSION).contains(&s.version)
                && s.timeline == f.timeline
                && s.segno == f.segno
                && s.seg_size == f.seg_size
        })),
        Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Summaries of `names` (stored WAL file names in order along a timeline
/// path, the last possibly `.partial`), stored ones loaded, missing ones
/// computed from the WAL; records that cross a boundary are completed.
pub async fn load_path(
    repo: &Repository,
    paths: &StanzaPaths,
    names: &[WalFileName],
    parallel: usize,
) -> Result<Vec<SegmentSummary>, ArchiveError> {
    let loaded: Vec<Result<Option<SegmentSummary>, ArchiveError>> =
        // owned names: a closure over borrowed ones is not `Send` for
        // every lifetime, which spawned callers (the daemon) need
        futures::stream::iter(names.iter().copied())
            .map(|name| async move {
                if let WalFileName::Segment(f) = &name {
                    if let Some(s) = load_summary(repo, paths, f).await? {
                        return Ok(Some(s));
                    }
                }
                let Some(data) = repo.load_wal(paths, &name).await? else {
                    return Ok(None);
                };
                tokio::task::spawn_blocking(move || compute(&name, &data))
                    .await
                    .map_err(ArchiveError::task("summary"))
            })
            .buffered(parallel.max(1))
            .collect()
            .await;
    let mut out = Vec::with_capacity(names.len());
    for l in loaded {
        if let Some(s) = l? {
            out.push(s);
        }
    }
    for i in 0..out.len().saturating_sub(1) {
        if out[i + 1].segno == out[i].segno.next() {
            let next = out[i + 1].clone();
            out[i].complete_with(&next);
        }
    }
    Ok(out)
}

/// Summarize and store in the background (the stream goes on receiving).
pub fn spawn_store(
    repo: std::sync::Arc<Repository>,
    paths: StanzaPaths,
    name: WalFileName,
    data: Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        store_summary(&repo, &paths, &name, &data).await;
    })
}
