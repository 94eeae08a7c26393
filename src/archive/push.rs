//! `walvault wal-push PATH` for `archive_command`: store one WAL segment,
//! `.partial`, `.history` or `.backup` file. Idempotent (PostgreSQL retries
//! after crashes); a different file under an archived name fails loudly.
//! A segment is checked before it is acknowledged: its size must be a valid
//! segment size, every page header must carry the address the file name
//! implies and every record must pass its CRC, so a truncated, misnamed or
//! damaged file is refused.
//!
//! The call is on PostgreSQL's archiving path, once per segment, so its cost
//! is measured (`bench/compare.sh`, phase push20). A new segment is checked
//! (records decoded, summary built, BLAKE3 digest taken) on one core while it is
//! compressed and sealed on the other; only when both are done is the object
//! written. A second push of an archived name compares the file's BLAKE3
//! digest with the one its summary recorded instead of downloading the stored copy.

use bytes::Bytes;
use std::path::Path;

use super::ArchiveError;
use crate::pg::{WalFileName, WalSegSize};
use crate::repo::{valid_wal_name, Repository, StanzaPaths, WalStored};
use crate::wal::summary::SegmentSummary;

/// What a segment file is: its size and its name's parts.
type SegmentOf = Option<(WalSegSize, crate::pg::SegmentFile)>;

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
    let data = Bytes::from(
        tokio::fs::read(path)
            .await
            .map_err(|source| ArchiveError::Io {
                path: path.to_owned(),
                source,
            })?,
    );
    let segment = segment_of(&name, data.len())?;
    let paths = StanzaPaths::new(stanza);
    // `.partial` files are replaced as they grow; everything else is
    // written once
    let write_once = !name.ends_with(".partial");
    if write_once && repo.has_wal(&paths, &name).await? {
        return push_again(repo, &paths, &name, segment, data).await;
    }
    let (checked, sealed) = tokio::join!(
        check(&name, segment, data.clone(), write_once),
        repo.seal_wal(&paths, &name, data)
    );
    let summary = checked?;
    let (key, sealed) = sealed?;
    // the summary is written beside the segment, not after it: two durable
    // writes in the time of one. A summary whose segment did not make it is
    // harmless (summaries are only read for segments the archive lists) and
    // is rewritten by PostgreSQL's retry.
    let (stored, ()) = tokio::join!(repo.storage().put(&key, sealed), async {
        if let Some(s) = &summary {
            super::summaries::store_computed(repo, &paths, &name, s).await;
        }
    });
    stored.map_err(crate::repo::RepoError::from)?;
    Ok(WalStored::New)
}

/// `name` is archived already: the same content is success, other content
/// is split brain. The summary's digest answers without a download; when
/// it is missing or differs, the file is checked (a damaged local copy is
/// reported as such) and compared with the stored copy.
async fn push_again(
    repo: &Repository,
    paths: &StanzaPaths,
    name: &str,
    segment: SegmentOf,
    data: Bytes,
) -> Result<WalStored, ArchiveError> {
    if segment.is_some() {
        let d = data.clone();
        let (stored, ours) = tokio::join!(
            super::summaries::load_summary(repo, paths, name),
            tokio::task::spawn_blocking(move || digest_of(&d))
        );
        let ours = ours.map_err(|e| ArchiveError::Protocol(format!("hash task failed: {e}")))?;
        if let Ok(Some(SegmentSummary {
            content_blake3: Some(theirs),
            ..
        })) = stored
        {
            if theirs == ours {
                return Ok(WalStored::AlreadyThere);
            }
        }
        check(name, segment, data.clone(), false).await?;
    }
    match repo.compare_wal(paths, name, &data).await? {
        Some(found) => Ok(found),
        // deleted meanwhile (expiry): store it
        None => {
            repo.store_wal(paths, name, data.to_vec()).await?;
            Ok(WalStored::New)
        }
    }
}

/// Size and name of a segment file; `None` for history and backup files.
fn segment_of(name: &str, len: usize) -> Result<SegmentOf, ArchiveError> {
    let stem = name.strip_suffix(".partial").unwrap_or(name);
    if stem.len() != 24 {
        return Ok(None);
    }
    let seg = WalSegSize::new(len as u64).map_err(|_| {
        ArchiveError::BadWal(format!(
            "{name} is {len} bytes, not a WAL segment size (a truncated copy?); refusing to archive it"
        ))
    })?;
    match WalFileName::parse(name, seg) {
        Ok(WalFileName::Segment(f) | WalFileName::Partial(f)) => Ok(Some((seg, f))),
        _ => Err(ArchiveError::BadWal(format!(
            "{name} is not a WAL segment name for {seg} segments"
        ))),
    }
}

/// Page headers, then every record (decoded once: the summary), on the
/// blocking pool — about 20 ms of CPU per 16 MiB. With `digest`, the
/// summary records the file's BLAKE3 digest for later pushes of the same
/// name.
async fn check(
    name: &str,
    segment: SegmentOf,
    data: Bytes,
    digest: bool,
) -> Result<Option<SegmentSummary>, ArchiveError> {
    let Some((seg, f)) = segment else {
        return Ok(None);
    };
    let checked = tokio::task::spawn_blocking(move || {
        crate::wal::verify::verify_pages(&data, f.segno, seg)?;
        let mut s = crate::wal::summary::summarize(&data, None, f.timeline.get(), f.segno, seg);
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        if digest {
            s.content_blake3 = Some(digest_of(&data));
        }
        Ok(s)
    })
    .await
    .map_err(|e| ArchiveError::Protocol(format!("WAL check task failed: {e}")))?;
    checked
        .map(Some)
        .map_err(|e| ArchiveError::BadWal(format!("{name}: {e}; refusing to archive it")))
}

/// BLAKE3 of a whole file: about 2 ms per 16 MiB here, where SHA-256 took
/// 8 ms on the archive command's critical path.
fn digest_of(data: &[u8]) -> [u8; 32] {
    blake3::hash(data).into()
}
