//! `walvault files verify`: every chunk each snapshot names is in the
//! index; with `deep`, every chunk is read and authenticated (once, however
//! many snapshots name it).

use std::collections::HashSet;
use std::sync::Arc;

use futures::stream::FuturesUnordered;
use futures::StreamExt;

use super::FilesError;
use crate::codec::BlockId;
use crate::repo::files::{list_heads, EntryCursor};
use crate::repo::{Index, Repository, StanzaPaths};

/// What a files verify found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FilesVerifyReport {
    /// Snapshots checked.
    pub snapshots: u64,
    /// Entries checked.
    pub entries: u64,
    /// Distinct chunks named.
    pub chunks: u64,
    /// Chunks read and authenticated (`deep`).
    pub chunks_read: u64,
    /// Their bytes.
    pub bytes_read: u64,
    /// What is wrong, one line each (the first 1000).
    pub problems: Vec<String>,
    /// No problem.
    pub passed: bool,
}

/// Check the snapshots of `set` (every set when `None`).
pub async fn verify(
    repo: Arc<Repository>,
    stanza: &str,
    set: Option<&str>,
    deep: bool,
    parallel: usize,
) -> Result<FilesVerifyReport, FilesError> {
    let paths = StanzaPaths::new(stanza);
    let (index, _) = Index::load(&repo, &paths).await?;
    let index = Arc::new(index);
    let mut r = FilesVerifyReport::default();
    let mut seen: HashSet<BlockId> = HashSet::new();
    let mut problem = |r: &mut FilesVerifyReport, p: String| {
        if r.problems.len() < 1000 {
            r.problems.push(p);
        }
    };
    let mut reads = FuturesUnordered::new();
    for head in list_heads(&repo, &paths, set).await? {
        r.snapshots += 1;
        let mut cursor = EntryCursor::new(&paths, &head);
        while let Some(e) = cursor.next(&repo).await? {
            r.entries += 1;
            let total: u64 = e.chunks.iter().map(|c| u64::from(c.len)).sum();
            if total != e.size {
                problem(
                    &mut r,
                    format!(
                        "set {} snapshot {}: {}: chunks hold {total} bytes, the entry says {}",
                        head.set, head.id, e.path, e.size
                    ),
                );
            }
            for c in &e.chunks {
                if !seen.insert(c.id) {
                    continue;
                }
                r.chunks += 1;
                if !index.contains(&c.id) {
                    problem(
                        &mut r,
                        format!(
                            "set {} snapshot {}: {}: chunk {} is missing from the repository",
                            head.set, head.id, e.path, c.id
                        ),
                    );
                    continue;
                }
                if deep {
                    let (repo, paths, index, id) =
                        (repo.clone(), paths.clone(), index.clone(), c.id);
                    let what = format!("set {} snapshot {}: {}", head.set, head.id, e.path);
                    reads.push(async move { (what, repo.read_block(&paths, &index, &id).await) });
                    while reads.len() >= parallel.max(1) {
                        if let Some((what, got)) = reads.next().await {
                            tally(&mut r, &mut problem, what, got);
                        }
                    }
                }
            }
        }
    }
    while let Some((what, got)) = reads.next().await {
        tally(&mut r, &mut problem, what, got);
    }
    r.passed = r.problems.is_empty();
    Ok(r)
}

fn tally(
    r: &mut FilesVerifyReport,
    problem: &mut impl FnMut(&mut FilesVerifyReport, String),
    what: String,
    got: Result<bytes::Bytes, crate::repo::RepoError>,
) {
    match got {
        Ok(b) => {
            r.chunks_read += 1;
            r.bytes_read += b.len() as u64;
        }
        Err(e) => problem(r, format!("{what}: {e}")),
    }
}
