//! WAL files in the repository: `<stanza>/wal/<timeline>/<file name>`, one
//! envelope (kind 8; LZ4, or LZ4 chunks from `wal-push`; encrypted when the
//! repository is) per segment, `.partial` segment, or `.history` file. The
//! object name is bound into the tag or checksum, so a segment stored under
//! another name never verifies.
//!
//! The open segment of `stream` is stored as *pieces*: immutable objects
//! `<segment>.<offset>` (8 upper-case hex digits) holding the WAL bytes
//! from that offset on, each written once, so making new WAL durable writes
//! only the new bytes. Listings show a segment with pieces as its
//! `.partial`; reading that `.partial` assembles the pieces from offset 0,
//! stopping at the first gap or damaged piece (never a byte past it), over
//! the `.partial` object when one exists too. Storing the complete segment
//! removes its pieces.
//!
//! On a local directory a synchronous stream writes its pieces into the
//! segment's *journal* instead, `<segment>.journal`: a file of zeros made
//! durable ahead of need (segment size plus an eighth) that takes each
//! piece in place, so making a commit durable is one write and one
//! `fdatasync`, with no new name or size to commit (pg_receivewal's
//! zero-filled segments, for the same reason). A record is a 16-byte header
//! — `WVJ1`, the piece's offset and sealed length (u32 little-endian), the
//! CRC-32C of those 12 bytes — then the piece exactly as its own object
//! would be stored (sealed under the piece's key, so it verifies only
//! there). Records follow each other from byte 0; the first header that is
//! not valid (zeros, or a write torn by a crash) ends the journal, a record
//! whose piece does not verify is left out like a damaged piece. Readers
//! treat records as pieces.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::object::{self, ObjectKind};
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::Compression;
use crate::pg::{SegmentFile, TimelineId, WalFileName, WalSegSize};

/// Largest WAL object body accepted: a 1 GiB segment.
const MAX_WAL: u64 = 1 << 30;

/// Pieces of one segment read at once.
const PIECE_READS: usize = 16;

/// The object key of WAL file `name`: its timeline's directory, then the
/// name as PostgreSQL writes it.
pub fn wal_key(paths: &StanzaPaths, name: &WalFileName) -> String {
    format!("{}{}/{name}", paths.wal(), timeline_dir(name.timeline()))
}

/// The object key of the piece of segment `f` that starts at byte `offset`.
pub fn piece_key(paths: &StanzaPaths, f: &SegmentFile, offset: u32) -> String {
    format!(
        "{}{}/{f}.{offset:08X}",
        paths.wal(),
        timeline_dir(f.timeline)
    )
}

/// The key of segment `f`'s journal (local directories, synchronous stream).
pub fn journal_key(paths: &StanzaPaths, f: &SegmentFile) -> String {
    format!(
        "{}{}/{f}.{JOURNAL_SUFFIX}",
        paths.wal(),
        timeline_dir(f.timeline)
    )
}

const JOURNAL_SUFFIX: &str = "journal";
const JOURNAL_MAGIC: &[u8; 4] = b"WVJ1";
const RECORD_HEADER: usize = 16;

/// Size of a new journal for segments of `seg` bytes: room for the whole
/// segment stored uncompressed in pieces of 64 KiB or more; smaller pieces
/// compress, and what does not fit is stored as piece objects.
pub fn journal_size(seg: WalSegSize) -> u64 {
    seg.bytes() + seg.bytes() / 8
}

/// Where a piece is: its own object, or records of the segment's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PieceAt {
    /// The object `<segment>.<offset>`.
    Offset(u32),
    /// The journal `<segment>.journal`.
    Journal,
}

/// The records of a journal: each piece's offset and the byte range of its
/// sealed object, and where the next record goes (after the last valid
/// header).
pub fn journal_records(data: &[u8]) -> (Vec<(u32, std::ops::Range<usize>)>, usize) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(h) = data.get(at..at + RECORD_HEADER) {
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        if &h[..4] != JOURNAL_MAGIC || crc32c::crc32c(&h[..12]) != word(12) {
            break;
        }
        let (offset, len) = (word(4), word(8) as usize);
        let body = at + RECORD_HEADER..at + RECORD_HEADER + len;
        if body.end > data.len() {
            break;
        }
        at = body.end;
        out.push((offset, body));
    }
    (out, at)
}

/// One journal record: the header for a piece at `offset`, then `sealed`.
fn journal_record(offset: u32, sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + sealed.len());
    out.extend_from_slice(JOURNAL_MAGIC);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(sealed);
    out
}

/// The journal of one open segment, being written in place.
#[derive(Debug)]
pub struct WalJournal {
    file: crate::storage::InPlaceFile,
    segment: SegmentFile,
    next: u64,
}

impl WalJournal {
    /// The segment it belongs to.
    pub fn segment(&self) -> SegmentFile {
        self.segment
    }

    /// Whether the journal still has a name in the repository (`false`
    /// once the finished segment replaced it and it was deleted).
    pub fn is_linked(&self) -> bool {
        self.file.is_linked()
    }

    /// Append the piece at `offset` (`sealed` by [`Repository::seal_piece`])
    /// and make it durable: `false`, with nothing written, when it does not
    /// fit (store it as its own object then). Blocking.
    pub fn append(&mut self, offset: u32, sealed: &[u8]) -> Result<bool, RepoError> {
        let record = journal_record(offset, sealed);
        if self.next + record.len() as u64 > self.file.size() {
            return Ok(false);
        }
        self.file.write_durable(self.next, &record)?;
        self.next += record.len() as u64;
        Ok(true)
    }
}

/// A piece's segment and where it is, from its name inside the timeline
/// directory.
pub fn parse_piece(name: &str, seg: WalSegSize) -> Option<(SegmentFile, PieceAt)> {
    let (segment, offset) = name.split_once('.')?;
    if offset == JOURNAL_SUFFIX {
        return match WalFileName::parse(segment, seg).ok()? {
            WalFileName::Segment(f) => Some((f, PieceAt::Journal)),
            _ => None,
        };
    }
    if offset.len() != 8
        || !offset
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
    {
        return None;
    }
    match WalFileName::parse(segment, seg).ok()? {
        WalFileName::Segment(f) => {
            Some((f, PieceAt::Offset(u32::from_str_radix(offset, 16).ok()?)))
        }
        _ => None,
    }
}

/// The directory of a timeline under `wal/` and `wal-summary/`: 8 hex digits.
pub fn timeline_dir(tli: TimelineId) -> String {
    format!("{:08X}", tli.get())
}

/// What [`Repository::store_wal_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalStored {
    /// Stored now.
    New,
    /// The repository already had the same content under this name.
    AlreadyThere,
}

impl Repository {
    /// Store WAL file `name` unless the repository already has it: with the
    /// same content that is success (archiving is retried after crashes),
    /// with other content it is [`RepoError::WalConflict`] and nothing is
    /// overwritten. `.partial` files are replaced (they grow).
    pub async fn store_wal_once(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
        data: Vec<u8>,
    ) -> Result<WalStored, RepoError> {
        if !matches!(name, WalFileName::Partial(_)) && self.has_wal(paths, name).await? {
            if let Some(found) = self.compare_wal(paths, name, &data).await? {
                return Ok(found);
            }
        }
        self.store_wal(paths, name, data).await?;
        Ok(WalStored::New)
    }

    /// The WAL files stored for timeline `tli`, sorted by name; names are
    /// read for segments of `seg` bytes (objects whose name is not a WAL file
    /// name of that size are left out).
    pub async fn list_wal(
        &self,
        paths: &StanzaPaths,
        tli: TimelineId,
        seg: WalSegSize,
    ) -> Result<Vec<WalFileName>, RepoError> {
        Ok(self
            .list_wal_sized(paths, tli, seg)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// [`Repository::list_wal`] with each object's stored size.
    pub async fn list_wal_sized(
        &self,
        paths: &StanzaPaths,
        tli: TimelineId,
        seg: WalSegSize,
    ) -> Result<Vec<(WalFileName, u64)>, RepoError> {
        let prefix = format!("{}{}/", paths.wal(), timeline_dir(tli));
        let mut found: Vec<(WalFileName, u64)> = Vec::new();
        let mut pieces: std::collections::BTreeMap<String, (SegmentFile, u64)> =
            std::collections::BTreeMap::new();
        for o in crate::storage::list_all(self.storage().as_ref(), &prefix).await? {
            let Some(rest) = o.key.strip_prefix(&prefix) else {
                continue;
            };
            if let Ok(name) = WalFileName::parse(rest, seg) {
                if name.timeline() == tli {
                    found.push((name, o.size));
                }
            } else if let Some((f, _)) = parse_piece(rest, seg) {
                if f.timeline == tli {
                    pieces.entry(f.to_string()).or_insert((f, 0)).1 += o.size;
                }
            }
        }
        // a segment with pieces is listed as its .partial (once)
        for (_, (f, size)) in pieces {
            let as_partial = WalFileName::Partial(f);
            match found.iter_mut().find(|(n, _)| *n == as_partial) {
                Some(entry) => entry.1 += size,
                None => found.push((as_partial, size)),
            }
        }
        found.sort_by_key(|(n, _)| n.to_string());
        Ok(found)
    }

    /// Delete WAL file `name` (retention); a missing one is not an error.
    pub async fn delete_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
    ) -> Result<(), RepoError> {
        match self.storage().delete(&wal_key(paths, name)).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        if let WalFileName::Partial(f) | WalFileName::Segment(f) = name {
            self.delete_pieces(paths, f).await?;
        }
        Ok(())
    }

    /// The pieces of segment `f`: (where, key), by offset, the journal last.
    pub async fn list_pieces(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
    ) -> Result<Vec<(PieceAt, String)>, RepoError> {
        let dir = format!("{}{}/", paths.wal(), timeline_dir(f.timeline));
        let prefix = format!("{dir}{f}.");
        let mut out: Vec<(PieceAt, String)> =
            crate::storage::list_all(self.storage().as_ref(), &prefix)
                .await?
                .into_iter()
                .filter_map(|o| {
                    let (g, off) = parse_piece(o.key.strip_prefix(&dir)?, f.seg_size)?;
                    (g == *f).then_some((off, o.key))
                })
                .collect();
        out.sort();
        Ok(out)
    }

    /// Delete the pieces of segment `f` (its complete segment is stored, or
    /// retention removes it); a piece a write-once repository still locks
    /// stays for a later run.
    pub async fn delete_pieces(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
    ) -> Result<(), RepoError> {
        for (_, key) in self.list_pieces(paths, f).await? {
            match self.storage().delete(&key).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(crate::storage::StorageError::Locked { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Store the bytes of segment `f` from `offset` on as a piece; returns
    /// the bytes written.
    pub async fn store_piece(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
        offset: u32,
        data: Bytes,
    ) -> Result<u64, RepoError> {
        let (key, sealed) = self.seal_piece(paths, f, offset, data).await?;
        let n = sealed.len() as u64;
        self.storage().put(&key, sealed).await?;
        Ok(n)
    }

    /// The piece of segment `f` at `offset` holding `data`, encoded as its
    /// object: (key, sealed bytes), for [`Storage::put`](crate::storage::Storage::put)
    /// or [`WalJournal::append`].
    pub async fn seal_piece(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
        offset: u32,
        data: Bytes,
    ) -> Result<(String, Bytes), RepoError> {
        let key = piece_key(paths, f, offset);
        let keys = self.keys().cloned();
        // a piece of a few commits is sealed in microseconds: here, not
        // through the blocking pool (a synchronous commit waits for it)
        let sealed = if data.len() <= 64 << 10 {
            object::seal(
                ObjectKind::Wal,
                &key,
                &data,
                Compression::Lz4,
                keys.as_ref(),
            )
        } else {
            let k = key.clone();
            tokio::task::spawn_blocking(move || {
                object::seal(ObjectKind::Wal, &k, &data, Compression::Lz4, keys.as_ref())
            })
            .await
            .map_err(RepoError::task("WAL encode"))?
        };
        Ok((key, sealed))
    }

    /// The journal of segment `f` to append to: the existing one (after its
    /// last record), or a new one made from `zeroed` (a file of
    /// [`journal_size`] zeros, if one is ready). `None` when the repository
    /// is not a local directory, or there is no journal and no zeroed file.
    /// Blocking.
    pub fn open_journal(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
        zeroed: impl FnOnce()
            -> Result<Option<crate::storage::ZeroedFile>, crate::storage::StorageError>,
    ) -> Result<Option<WalJournal>, RepoError> {
        let Some(dir) = self.storage().local_dir() else {
            return Ok(None);
        };
        let key = journal_key(paths, f);
        let (file, next) = match dir.open_in_place(&key)? {
            Some(file) => {
                let (_, end) = journal_records(&file.read_all()?);
                (file, end as u64)
            }
            None => match zeroed()? {
                Some(z) => (dir.install(z, &key)?, 0),
                None => return Ok(None),
            },
        };
        Ok(Some(WalJournal {
            file,
            segment: *f,
            next,
        }))
    }

    /// Segment `f` as its pieces make it (over `base`, the `.partial`
    /// object, when there is one): zero-padded to the segment size, the
    /// valid bytes those of the pieces from offset 0 up to the first gap or
    /// damaged piece. `None` when `f` has no pieces. With the bytes, how
    /// far the pieces reach without a gap.
    async fn assemble_pieces(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
        base: Option<Bytes>,
    ) -> Result<Option<(Bytes, usize)>, RepoError> {
        let pieces = self.list_pieces(paths, f).await?;
        if pieces.is_empty() {
            return Ok(None);
        }
        // every piece read at once (an open segment of a synchronous
        // stream has many small ones); a damaged or vanished one is left out
        let read: Vec<Vec<(usize, Vec<u8>)>> = futures::stream::iter(pieces)
            .map(|(at, key)| async move {
                let off = match at {
                    PieceAt::Offset(off) => off,
                    PieceAt::Journal => return self.read_journal(paths, f, &key).await,
                };
                match self.read_object(ObjectKind::Wal, &key, MAX_WAL).await {
                    Ok(body) => Ok(vec![(off as usize, body)]),
                    Err(RepoError::Storage(e)) if e.is_not_found() => Ok(Vec::new()),
                    Err(RepoError::Corrupt { object, reason }) => {
                        tracing::warn!(
                            "WAL piece {object} is damaged ({reason}); the segment ends before it"
                        );
                        Ok(Vec::new())
                    }
                    Err(e) => Err(e),
                }
            })
            .buffered(PIECE_READS)
            .try_collect()
            .await?;
        let read: Vec<(usize, Vec<u8>)> = read.into_iter().flatten().collect();
        // from offset 0: each step takes, of the pieces starting at or
        // before the end reached, the one reaching furthest; the first gap
        // ends it. (The name alone may not tell the segment size — wal-fetch
        // reads it with a default — so the bound is the largest segment.)
        let mut out = base.map(|b| b.to_vec()).unwrap_or_default();
        let mut end = 0usize;
        while let Some((off, body)) = read
            .iter()
            .filter(|(off, body)| {
                *off <= end && off + body.len() > end && off + body.len() <= MAX_WAL as usize
            })
            .max_by_key(|(off, body)| off + body.len())
        {
            let reach = off + body.len();
            if out.len() < reach {
                out.resize(reach, 0);
            }
            out[end..reach].copy_from_slice(&body[end - off..]);
            end = reach;
        }
        if end == 0 {
            return Ok(None);
        }
        let size = out
            .get(32..36)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .and_then(|v| WalSegSize::new(u64::from(v)).ok())
            .map_or(f.seg_size.bytes(), |s| s.bytes()) as usize;
        if out.len() < size {
            out.resize(size, 0);
        }
        // the pieces' prefix over the base's: both are authentic prefixes
        // of the same segment, so the result is the longer prefix, then
        // zeros (past a gap in the pieces only what the base itself holds)
        Ok(Some((Bytes::from(out), end)))
    }

    /// Segment `f` when its pieces alone hold all of it, from offset 0 to
    /// its end: a synchronous stream made the whole segment durable in its
    /// journal and stopped before it stored the segment object.
    pub async fn complete_from_pieces(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
    ) -> Result<Option<Bytes>, RepoError> {
        let size = f.seg_size.bytes() as usize;
        Ok(match self.assemble_pieces(paths, f, None).await? {
            Some((data, end)) if end >= size && data.len() == size => Some(data),
            _ => None,
        })
    }

    /// The pieces in the journal `key` of segment `f`: (offset, WAL bytes);
    /// a record whose piece does not verify is left out.
    async fn read_journal(
        &self,
        paths: &StanzaPaths,
        f: &SegmentFile,
        key: &str,
    ) -> Result<Vec<(usize, Vec<u8>)>, RepoError> {
        let data = match self.storage().get(key).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let keys = self.keys().cloned();
        let (paths, f, journal) = (paths.clone(), *f, key.to_owned());
        tokio::task::spawn_blocking(move || {
            let (records, _) = journal_records(&data);
            let mut out = Vec::with_capacity(records.len());
            for (off, range) in records {
                let name = piece_key(&paths, &f, off);
                match object::open(ObjectKind::Wal, &name, &data[range], keys.as_ref(), MAX_WAL) {
                    Ok(body) => out.push((off as usize, body)),
                    Err(e) => tracing::warn!(
                        "the piece at offset {off:08X} in WAL journal {journal} is damaged ({e}); the segment ends before it"
                    ),
                }
            }
            out
        })
        .await
        .map_err(RepoError::task("WAL journal decode"))
    }

    /// Timelines with a directory under `<stanza>/wal/`, sorted.
    pub async fn wal_timelines(&self, paths: &StanzaPaths) -> Result<Vec<TimelineId>, RepoError> {
        let prefix = paths.wal();
        let mut tlis: Vec<TimelineId> = crate::storage::list_all(self.storage().as_ref(), &prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&prefix)?;
                let (t, _) = rest.split_once('/')?;
                if t.len() != 8 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                TimelineId::new(u32::from_str_radix(t, 16).ok()?)
            })
            .collect();
        tlis.sort();
        tlis.dedup();
        Ok(tlis)
    }

    /// Store WAL file `name`.
    pub async fn store_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
        data: Vec<u8>,
    ) -> Result<(), RepoError> {
        let (key, sealed) = self.seal_wal(paths, name, Bytes::from(data)).await?;
        self.storage().put(&key, sealed).await?;
        Ok(())
    }

    /// WAL file `name` encoded as its object (LZ4, then the tag or the
    /// encryption), on the blocking pool: the CPU half of
    /// [`Repository::store_wal`], for callers that overlap it with other
    /// work and store the result with `storage().put(key, sealed)`.
    pub async fn seal_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
        data: Bytes,
    ) -> Result<(String, Bytes), RepoError> {
        let key = wal_key(paths, name);
        let keys = self.keys().cloned();
        let k = key.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            object::seal(ObjectKind::Wal, &k, &data, Compression::Lz4, keys.as_ref())
        })
        .await
        .map_err(RepoError::task("WAL encode"))?;
        Ok((key, sealed))
    }

    /// Whether WAL file `name` is stored.
    pub async fn has_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
    ) -> Result<bool, RepoError> {
        Ok(self.storage().head(&wal_key(paths, name)).await?.is_some())
    }

    /// Compare `data` with the stored WAL file `name` by downloading it:
    /// [`WalStored::AlreadyThere`] when equal, [`RepoError::WalConflict`]
    /// when not, `None` when nothing is stored under the name.
    pub async fn compare_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
        data: &[u8],
    ) -> Result<Option<WalStored>, RepoError> {
        match self.load_wal(paths, name).await? {
            Some(existing) if existing[..] == *data => Ok(Some(WalStored::AlreadyThere)),
            Some(_) => Err(RepoError::WalConflict {
                name: *name,
                stanza: paths.stanza().to_owned(),
            }),
            None => Ok(None),
        }
    }

    /// WAL file `name`, or `None` when the repository does not have it.
    pub async fn load_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
    ) -> Result<Option<Bytes>, RepoError> {
        let key = wal_key(paths, name);
        let stored = match self.read_object(ObjectKind::Wal, &key, MAX_WAL).await {
            Ok(body) => Some(Bytes::from(body)),
            Err(RepoError::Storage(e)) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        if let WalFileName::Partial(f) = name {
            if let Some((assembled, _)) = self.assemble_pieces(paths, f, stored.clone()).await? {
                return Ok(Some(assembled));
            }
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let n = WalFileName::parse("000000020000000000000003", WalSegSize::DEFAULT).unwrap();
        assert_eq!(
            wal_key(&StanzaPaths::new("main"), &n),
            "main/wal/00000002/000000020000000000000003"
        );
        let h = WalFileName::parse("0000000A.history", WalSegSize::DEFAULT).unwrap();
        assert_eq!(
            wal_key(&StanzaPaths::new("s"), &h),
            "s/wal/0000000A/0000000A.history"
        );
    }

    #[tokio::test]
    async fn pieces_assemble_up_to_the_first_gap_or_damaged_piece() {
        use crate::pg::{SegmentFile, SegmentNo};
        use crate::repo::{InitParams, KdfCost};
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(crate::storage::LocalDir::open(dir.path()).unwrap());
        let repo = Repository::init(storage, &InitParams::default(), None, KdfCost::default())
            .await
            .unwrap();
        let paths = StanzaPaths::new("s");
        let seg = WalSegSize::DEFAULT;
        let f = SegmentFile {
            timeline: TimelineId::new(1).unwrap(),
            segno: SegmentNo(3),
            seg_size: seg,
        };
        let wal: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8 + 1).collect();
        let piece = |from: usize, to: usize| Bytes::copy_from_slice(&wal[from..to]);
        for (from, to) in [(0, 100), (100, 200), (200, 300)] {
            repo.store_piece(&paths, &f, from as u32, piece(from, to))
                .await
                .unwrap();
        }
        let partial = WalFileName::Partial(f);
        let load = || async { repo.load_wal(&paths, &partial).await.unwrap().unwrap() };
        let valid = |got: &Bytes| {
            assert_eq!(got.len() as u64, seg.bytes());
            let n = got.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            assert_eq!(&got[..n], &wal[..n], "bytes that are not the WAL");
            n
        };
        assert_eq!(valid(&load().await), 300);
        // listed as the segment's .partial
        let listed = repo.list_wal_sized(&paths, f.timeline, seg).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, partial);
        // a restarted session's overlapping piece changes nothing
        repo.store_piece(&paths, &f, 0, piece(0, 150))
            .await
            .unwrap();
        assert_eq!(valid(&load().await), 300);
        // the middle piece damaged: up to what reaches past it, never beyond
        let middle = dir.path().join(piece_key(&paths, &f, 100));
        let mut bytes = std::fs::read(&middle).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        std::fs::write(&middle, bytes).unwrap();
        assert_eq!(valid(&load().await), 150);
        // the middle piece and the overlap gone: up to the gap
        std::fs::remove_file(&middle).unwrap();
        std::fs::remove_file(dir.path().join(piece_key(&paths, &f, 0))).unwrap();
        repo.store_piece(&paths, &f, 0, piece(0, 100))
            .await
            .unwrap();
        assert_eq!(valid(&load().await), 100);
        // deleting the .partial deletes its pieces
        repo.delete_wal(&paths, &partial).await.unwrap();
        assert!(repo.list_pieces(&paths, &f).await.unwrap().is_empty());
        assert!(repo.load_wal(&paths, &partial).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_journal_holds_pieces_in_place_and_ends_at_the_first_torn_record() {
        use crate::pg::{SegmentFile, SegmentNo};
        use crate::repo::{InitParams, KdfCost};
        let dir = tempfile::tempdir().unwrap();
        let local = crate::storage::LocalDir::open(dir.path()).unwrap();
        let storage = std::sync::Arc::new(local.clone());
        let repo = Repository::init(storage, &InitParams::default(), None, KdfCost::default())
            .await
            .unwrap();
        let paths = StanzaPaths::new("s");
        let seg = WalSegSize::new(1 << 20).unwrap();
        let f = SegmentFile {
            timeline: TimelineId::new(1).unwrap(),
            segno: SegmentNo(5),
            seg_size: seg,
        };
        let wal: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
        let sealed = |from: usize, to: usize| {
            let repo = &repo;
            let paths = &paths;
            let wal = &wal;
            async move {
                repo.seal_piece(
                    paths,
                    &f,
                    from as u32,
                    Bytes::copy_from_slice(&wal[from..to]),
                )
                .await
                .unwrap()
                .1
            }
        };
        let partial = WalFileName::Partial(f);
        let valid = |got: Bytes| {
            assert_eq!(got.len() as u64, seg.bytes());
            let n = got.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            assert_eq!(&got[..n], &wal[..n], "bytes that are not the WAL");
            n
        };
        let journal_file = dir.path().join(journal_key(&paths, &f));
        let mut made = 0;
        {
            let mut j = repo
                .open_journal(&paths, &f, || {
                    made += 1;
                    local.prepare_zeroed(journal_size(seg)).map(Some)
                })
                .unwrap()
                .unwrap();
            for (from, to) in [(0, 1000), (1000, 2000)] {
                assert!(j.append(from as u32, &sealed(from, to).await).unwrap());
            }
        }
        assert_eq!(made, 1);
        assert_eq!(
            std::fs::metadata(&journal_file).unwrap().len(),
            journal_size(seg),
            "written in place: the size never changes"
        );
        assert_eq!(
            valid(repo.load_wal(&paths, &partial).await.unwrap().unwrap()),
            2000
        );
        let listed = repo.list_wal_sized(&paths, f.timeline, seg).await.unwrap();
        assert_eq!(listed, vec![(partial, journal_size(seg))]);

        // a crash tore the third record: its header is there, its piece cut
        let third = sealed(2000, 3000).await;
        let bytes = std::fs::read(&journal_file).unwrap();
        let (records, end) = journal_records(&bytes);
        assert_eq!(records.len(), 2);
        let mut torn = bytes.clone();
        let record = journal_record(2000, &third);
        torn[end..end + record.len() / 2].copy_from_slice(&record[..record.len() / 2]);
        std::fs::write(&journal_file, &torn).unwrap();
        assert_eq!(
            valid(repo.load_wal(&paths, &partial).await.unwrap().unwrap()),
            2000
        );
        // a torn header: the same
        let mut torn_header = bytes.clone();
        torn_header[end..end + 6].copy_from_slice(&record[..6]);
        std::fs::write(&journal_file, &torn_header).unwrap();
        assert_eq!(journal_records(&torn_header).1, end);
        assert_eq!(
            valid(repo.load_wal(&paths, &partial).await.unwrap().unwrap()),
            2000
        );

        // a restarted stream reopens it and appends after the last whole
        // record (overwriting the torn one), re-sending from offset 0
        let mut j = repo
            .open_journal(&paths, &f, || panic!("the journal exists"))
            .unwrap()
            .unwrap();
        assert!(j.append(0, &sealed(0, 1500).await).unwrap());
        assert!(j.append(1500, &sealed(1500, 3000).await).unwrap());
        assert_eq!(
            valid(repo.load_wal(&paths, &partial).await.unwrap().unwrap()),
            3000
        );

        // a damaged piece in the middle: the WAL up to it, never past it
        let bytes = std::fs::read(&journal_file).unwrap();
        let (records, _) = journal_records(&bytes);
        let mut damaged = bytes.clone();
        for (off, range) in &records {
            if *off == 1000 || *off == 1500 {
                damaged[range.end - 1] ^= 0x55;
            }
        }
        std::fs::write(&journal_file, &damaged).unwrap();
        assert_eq!(
            valid(repo.load_wal(&paths, &partial).await.unwrap().unwrap()),
            1500
        );

        // no room: nothing written, the caller stores an object
        let big: Vec<u8> = (0..journal_size(seg) as usize)
            .map(|_| rand::random::<u8>())
            .collect();
        let (_, sealed_big) = repo
            .seal_piece(&paths, &f, 0, Bytes::from(big))
            .await
            .unwrap();
        assert!(!j.append(0, &sealed_big).unwrap());
        assert_eq!(std::fs::read(&journal_file).unwrap(), damaged);

        // deleting the .partial deletes its journal
        drop(j);
        repo.delete_wal(&paths, &partial).await.unwrap();
        assert!(!journal_file.exists());
        assert!(repo.load_wal(&paths, &partial).await.unwrap().is_none());
    }
}
