//! `walvault wal-push PATH` for `archive_command`: store one WAL segment,
//! `.partial`, `.history` or `.backup` file. Idempotent (PostgreSQL retries
//! after crashes); a different file under an archived name fails loudly.
//! A segment is checked before it is acknowledged: its size must be a valid
//! segment size, every page header must carry the address the file name
//! implies and every record must pass its CRC, so a truncated, misnamed or
//! damaged file is refused.
//!
//! The call is on PostgreSQL's archiving path, once per segment, so its cost
//! is measured (`bench/compare.sh`, phase push20). A new segment is read in
//! 1 MiB pieces; each piece is handed to the sealer ([`ChunkSealer`]), which
//! compresses it on one core while it is checked (page headers, records
//! decoded into the summary, BLAKE3 digest) and the next one read on the
//! other, so compression overlaps reading and checking instead of following
//! them; only when both sides are done is the object written. A second push of an archived name
//! compares the file's BLAKE3 digest with the one its summary recorded
//! instead of downloading the stored copy.

use bytes::Bytes;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;

use super::ArchiveError;
use crate::pg::{SegmentFile, WalFileName, WalSegSize};
use crate::repo::object::{ChunkSealer, ObjectKind};
use crate::repo::{wal_key, Repository, StanzaPaths, WalStored};
use crate::wal::summary::{SegmentSummary, Summarizer};
use crate::wal::verify::PageChecker;

/// What a segment file is: its size and its name's parts.
type SegmentOf = Option<(WalSegSize, SegmentFile)>;

/// Bytes read, checked and compressed at a time (a whole number of WAL
/// pages: segment sizes are powers of two from 1 MiB).
const PIECE: u64 = 1 << 20;
/// Piece buffers in circulation between the reader and the sealer: reused,
/// so a push touches 4 MiB of fresh memory instead of 16.
const POOL: usize = 4;

/// Store the WAL file at `path` under its own name.
pub async fn wal_push(
    repo: &Repository,
    stanza: &str,
    path: &Path,
) -> Result<WalStored, ArchiveError> {
    let io = |source| ArchiveError::Io {
        path: path.to_owned(),
        source,
    };
    let file_name =
        path.file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ArchiveError::NotAWalFile {
                path: path.to_owned(),
            })?;
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let (name, segment) = classify(file_name, path, len)?;
    let paths = StanzaPaths::new(stanza);
    // `.partial` files are replaced as they grow; everything else is
    // written once
    let write_once = !matches!(name, WalFileName::Partial(_));
    let (key, sealed, summary) = match segment {
        Some((seg, f)) => {
            // whether the name is archived already (a round trip to an
            // object store) is asked while the segment is read and sealed:
            // a first push is every call, a re-push rare (and an archived
            // name stops the reading at its next piece)
            let stop = Arc::new(AtomicBool::new(false));
            let reading = Reading {
                name,
                path: path.to_owned(),
                file,
                len,
                seg,
                f,
                digest: write_once,
                stop: Arc::clone(&stop),
            };
            let (there, sealed) = tokio::join!(
                async {
                    let there = write_once && repo.has_wal(&paths, &name).await?;
                    stop.store(there, Ordering::Relaxed);
                    Ok::<_, ArchiveError>(there)
                },
                seal_segment(repo, &paths, reading)
            );
            if there? {
                let file = std::fs::File::open(path).map_err(io)?;
                return push_again(repo, &paths, &name, segment, path, file).await;
            }
            let (key, sealed, summary) = sealed?;
            (key, sealed, Some(summary))
        }
        None => {
            if write_once && repo.has_wal(&paths, &name).await? {
                return push_again(repo, &paths, &name, segment, path, file).await;
            }
            drop(file);
            let data = read_whole(path).await?;
            let (key, sealed) = repo.seal_wal(&paths, &name, data).await?;
            (key, sealed, None)
        }
    };
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

async fn read_whole(path: &Path) -> Result<Bytes, ArchiveError> {
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(|source| ArchiveError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Read a segment in pieces, check it and seal it at once (two blocking
/// threads joined by a bounded channel). Returns the object key, the sealed
/// object and the summary (with the file's digest when asked).
async fn seal_segment(
    repo: &Repository,
    paths: &StanzaPaths,
    reading: Reading,
) -> Result<(String, Bytes, SegmentSummary), ArchiveError> {
    let key = wal_key(paths, &reading.name);
    let len = reading.len;
    let (pieces_tx, pieces) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(2);
    let (free_tx, free) = std::sync::mpsc::channel::<Arc<Vec<u8>>>();
    let mut sealer = ChunkSealer::new(
        ObjectKind::Wal,
        &key,
        len,
        repo.keys().cloned(),
        usize::try_from(len / 2).unwrap_or(0),
    );
    let sealing = tokio::task::spawn_blocking(move || {
        for piece in pieces {
            sealer.push(&piece);
            // the reader may be done already
            let _ = free_tx.send(piece);
        }
        sealer.finish()
    });
    let checking = tokio::task::spawn_blocking(move || reading.run(pieces_tx, free));
    let (checked, sealed) = tokio::join!(checking, sealing);
    let task = ArchiveError::task("WAL push");
    // a sealer that panicked first (the reader then only saw it stop), then
    // the check's verdict: a sealer cut short by it has nothing to add
    let sealed = sealed.map_err(task)?;
    let summary = checked.map_err(task)??;
    let sealed = sealed?;
    Ok((key, sealed, summary))
}

/// The reading and checking side of [`seal_segment`].
struct Reading {
    name: WalFileName,
    path: std::path::PathBuf,
    file: std::fs::File,
    len: u64,
    seg: WalSegSize,
    f: SegmentFile,
    /// Record the file's BLAKE3 digest in the summary.
    digest: bool,
    /// Set when the work turned out to be unneeded: stop at the next piece.
    stop: Arc<AtomicBool>,
}

impl Reading {
    /// Read every piece, hand it to the sealer (`out`), check it; reuse the
    /// buffers the sealer hands back (`free`).
    fn run(
        mut self,
        out: SyncSender<Arc<Vec<u8>>>,
        free: Receiver<Arc<Vec<u8>>>,
    ) -> Result<SegmentSummary, ArchiveError> {
        let mut pages =
            PageChecker::new(self.f.segno, self.seg).map_err(|e| self.bad(e.to_string()))?;
        let mut summary = Summarizer::new(
            usize::try_from(self.len).unwrap_or(usize::MAX),
            self.f.timeline,
            self.f.segno,
            self.seg,
        );
        let mut hash = self.digest.then(blake3::Hasher::new);
        let mut made = 0;
        let mut left = self.len;
        while left > 0 {
            if self.stop.load(Ordering::Relaxed) {
                return Err(ArchiveError::Protocol("reading stopped: not needed".into()));
            }
            let n = PIECE.min(left) as usize;
            let reuse = |b: Arc<Vec<u8>>| Arc::try_unwrap(b).unwrap_or_default();
            let mut buf = match free.try_recv() {
                Ok(b) => reuse(b),
                Err(_) if made < POOL => {
                    made += 1;
                    Vec::new()
                }
                Err(_) => free.recv().map(reuse).unwrap_or_default(),
            };
            buf.resize(n, 0);
            self.file
                .read_exact(&mut buf)
                .map_err(|e| self.read_error(e))?;
            left -= n as u64;
            let piece = Arc::new(buf);
            if out.send(Arc::clone(&piece)).is_err() {
                return Err(ArchiveError::Protocol(
                    "the WAL sealing task stopped early".into(),
                ));
            }
            pages.check(&piece).map_err(|e| self.bad(e.to_string()))?;
            summary.push(&piece);
            if let Some(h) = &mut hash {
                h.update(&piece);
            }
        }
        drop(out);
        // PostgreSQL hands over a finished file: one that changes while it is
        // read is not the file to archive
        let mut probe = [0u8; 1];
        if self.file.read(&mut probe).map_err(|e| self.read_error(e))? != 0 {
            return Err(self.bad("the file grew while it was read"));
        }
        pages.finish().map_err(|e| self.bad(e.to_string()))?;
        let mut s = summary.finish(None);
        if let Some(e) = s.error.take() {
            return Err(self.bad(e));
        }
        s.content_blake3 = hash.map(|h| h.finalize().into());
        Ok(s)
    }

    fn bad(&self, e: impl std::fmt::Display) -> ArchiveError {
        ArchiveError::BadWal {
            name: self.name,
            reason: e.to_string(),
        }
    }

    fn read_error(&self, e: std::io::Error) -> ArchiveError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return self.bad("the file shrank while it was read");
        }
        ArchiveError::Io {
            path: self.path.clone(),
            source: e,
        }
    }
}

/// `name` is archived already: the same content is success, other content
/// is split brain. The summary's digest answers without a download; when
/// it is missing or differs, the file is checked (a damaged local copy is
/// reported as such) and compared with the stored copy.
async fn push_again(
    repo: &Repository,
    paths: &StanzaPaths,
    name: &WalFileName,
    segment: SegmentOf,
    path: &Path,
    file: std::fs::File,
) -> Result<WalStored, ArchiveError> {
    if let Some((_, f)) = segment {
        let (stored, ours) = tokio::join!(
            super::summaries::load_summary(repo, paths, &f),
            tokio::task::spawn_blocking(move || digest_of_file(file))
        );
        let ours = ours
            .map_err(ArchiveError::task("hash"))?
            .map_err(|source| ArchiveError::Io {
                path: path.to_owned(),
                source,
            })?;
        if let Ok(Some(SegmentSummary {
            content_blake3: Some(theirs),
            ..
        })) = stored
        {
            if theirs == ours {
                return Ok(WalStored::AlreadyThere);
            }
        }
    }
    let data = read_whole(path).await?;
    if let Some((seg, f)) = segment {
        check(name, seg, f, data.clone()).await?;
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

/// The typed name of the file `file_name` at `path`, `len` bytes long, and
/// for a segment (or `.partial`) its size and name parts (`None` for
/// history and backup files). A segment's size is its length.
fn classify(
    file_name: &str,
    path: &Path,
    len: u64,
) -> Result<(WalFileName, SegmentOf), ArchiveError> {
    let loose = WalFileName::parse_any_size(file_name).map_err(|_| ArchiveError::NotAWalFile {
        path: path.to_owned(),
    })?;
    if !matches!(loose, WalFileName::Segment(_) | WalFileName::Partial(_)) {
        return Ok((loose, None));
    }
    let seg =
        WalSegSize::new(len).map_err(|_| ArchiveError::NotASegmentSize { name: loose, len })?;
    match WalFileName::parse(file_name, seg) {
        Ok(n @ (WalFileName::Segment(f) | WalFileName::Partial(f))) => Ok((n, Some((seg, f)))),
        _ => Err(ArchiveError::BadWal {
            name: loose,
            reason: format!("not a WAL segment name for {seg} segments"),
        }),
    }
}

/// Page headers, then every record of a whole segment, on the blocking
/// pool (a re-push whose digest differs: damage is reported as damage).
async fn check(
    name: &WalFileName,
    seg: WalSegSize,
    f: SegmentFile,
    data: Bytes,
) -> Result<(), ArchiveError> {
    tokio::task::spawn_blocking(move || {
        // pages, then every record decoded as a first push would
        crate::wal::verify::verify_pages(&data, f.segno, seg).map_err(|e| e.to_string())?;
        match crate::wal::summary::summarize(&data, None, f.timeline, f.segno, seg).error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
    .await
    .map_err(ArchiveError::task("WAL check"))?
    .map_err(|reason| ArchiveError::BadWal {
        name: *name,
        reason,
    })
}

/// BLAKE3 of a whole file (about 2 ms per 16 MiB here, where SHA-256 took
/// 8 ms on the archive command's critical path), read through one 1 MiB
/// buffer: 16 MiB of fresh memory cost more than the hash.
fn digest_of_file(mut file: std::fs::File) -> std::io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; PIECE as usize];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(h.finalize().into()),
            n => {
                h.update(&buf[..n]);
            }
        }
    }
}
