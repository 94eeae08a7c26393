//! `walvault wal-push PATH` for `archive_command`: store one WAL segment,
//! `.partial`, `.history` or `.backup` file. Idempotent (PostgreSQL retries
//! after crashes); a different file under an archived name fails loudly.
//! A segment is checked before it is acknowledged: its size must be a valid
//! segment size and every page header must carry the address the file name
//! implies, so a truncated or misnamed file is refused.

use std::path::Path;

use super::ArchiveError;
use crate::pg::{WalFileName, WalSegSize};
use crate::repo::{valid_wal_name, Repository, StanzaPaths, WalStored};

/// Store the WAL file at `path` under its own name.
pub async fn wal_push(
    repo: &Repository,
    stanza: &str,
    path: &Path,
) -> Result<WalStored, ArchiveError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| valid_wal_name(n))
        .ok_or_else(|| {
            ArchiveError::BadWal(format!(
                "{} is not a WAL file name (segment, .partial, .history or .backup)",
                path.display()
            ))
        })?
        .to_owned();
    let data = tokio::fs::read(path)
        .await
        .map_err(|source| ArchiveError::Io {
            path: path.to_owned(),
            source,
        })?;
    let stem = name.strip_suffix(".partial").unwrap_or(&name);
    let paths = StanzaPaths::new(stanza);
    let mut summary = None;
    if stem.len() == 24 {
        let seg = WalSegSize::new(data.len() as u64).map_err(|_| {
            ArchiveError::BadWal(format!(
                "{name} is {} bytes, not a WAL segment size (a truncated copy?); refusing to archive it",
                data.len()
            ))
        })?;
        let Ok(WalFileName::Segment(f) | WalFileName::Partial(f)) = WalFileName::parse(&name, seg)
        else {
            return Err(ArchiveError::BadWal(format!(
                "{name} is not a WAL segment name for {seg} segments"
            )));
        };
        // page headers, then every record (decoded once: the summary)
        crate::wal::verify::verify_pages(&data, f.segno, seg)
            .map_err(|e| ArchiveError::BadWal(format!("{name}: {e}; refusing to archive it")))?;
        let s = crate::wal::summary::summarize(&data, None, f.timeline.get(), f.segno, seg);
        if let Some(e) = &s.error {
            return Err(ArchiveError::BadWal(format!(
                "{name}: {e}; refusing to archive it"
            )));
        }
        summary = Some(s);
    }
    let stored = repo.store_wal_once(&paths, &name, data).await?;
    if let (WalStored::New, Some(s)) = (stored, summary) {
        super::summaries::store_computed(repo, &paths, &name, &s).await;
    }
    Ok(stored)
}
