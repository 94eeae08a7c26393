//! Segment summaries in the repository: `<stanza>/wal-summary/<TLI>/<segment>`
//! (postcard, sealed like every object). Written when a complete segment is
//! archived (`stream`, `wal-push`, a backup's own WAL); computed on the fly
//! from the WAL when one is missing (the newest `.partial`, or WAL archived
//! before summaries existed) — `load_path` always returns a summary per
//! segment asked for.

use futures::StreamExt;

use super::ArchiveError;
use crate::pg::{WalFileName, WalSegSize};
use crate::repo::object::ObjectKind;
use crate::repo::{RepoError, Repository, StanzaPaths};
use crate::wal::summary::{summarize, SegmentSummary, SUMMARY_VERSION};

fn key(paths: &StanzaPaths, name: &str) -> String {
    format!("{}{}/{name}", paths.wal_summaries(), &name[..8])
}

/// Summarize WAL file `name` (a segment or `.partial`) from its bytes and
/// store the summary. Errors are logged, not returned: a summary is an
/// index, and the WAL itself is already safe.
pub async fn store_summary(repo: &Repository, paths: &StanzaPaths, name: &str, data: &[u8]) {
    let (name2, data2) = (name.to_owned(), data.to_vec());
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
    name: &str,
    s: &SegmentSummary,
) {
    let r = async {
        let body = postcard::to_stdvec(s)
            .map_err(|e| ArchiveError::Protocol(format!("encoding summary: {e}")))?;
        let k = key(paths, name.trim_end_matches(".partial"));
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

/// The summary of WAL file `name` from its bytes (`None` if not a segment).
pub fn compute(name: &str, data: &[u8]) -> Option<SegmentSummary> {
    let stem = name.trim_end_matches(".partial");
    let seg = WalSegSize::new(data.len() as u64).ok()?;
    let Ok(WalFileName::Segment(f)) = WalFileName::parse(stem, seg) else {
        return None;
    };
    Some(summarize(data, None, f.timeline.get(), f.segno, seg))
}

/// The stored summary of segment `name`, if any (and of this version).
pub async fn load_summary(
    repo: &Repository,
    paths: &StanzaPaths,
    name: &str,
) -> Result<Option<SegmentSummary>, ArchiveError> {
    let k = key(paths, name);
    match repo.read_object(ObjectKind::WalSummary, &k, 64 << 20).await {
        Ok(body) => Ok(postcard::from_bytes::<SegmentSummary>(&body)
            .ok()
            .filter(|s| s.version == SUMMARY_VERSION)),
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
    names: &[String],
    parallel: usize,
) -> Result<Vec<SegmentSummary>, ArchiveError> {
    let loaded: Vec<Result<Option<SegmentSummary>, ArchiveError>> =
        futures::stream::iter(names.iter())
            .map(|name| async move {
                let stem = name.trim_end_matches(".partial");
                if !name.ends_with(".partial") {
                    if let Some(s) = load_summary(repo, paths, stem).await? {
                        return Ok(Some(s));
                    }
                }
                let Some(data) = repo.load_wal(paths, name).await? else {
                    return Ok(None);
                };
                let name = name.clone();
                tokio::task::spawn_blocking(move || compute(&name, &data))
                    .await
                    .map_err(|e| ArchiveError::Protocol(format!("summary task failed: {e}")))
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
        if out[i + 1].segno == out[i].segno + 1 {
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
    name: String,
    data: Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        store_summary(&repo, &paths, &name, &data).await;
    })
}
