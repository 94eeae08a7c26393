//! File snapshots: trees of files (a directory, a bucket) stored by
//! `walvault files` in the stanza's packs, beside its database backups.
//!
//! ```text
//! <stanza>/file-snapshots/<set>/<id>          the head (sealed JSON), written last: the commit
//! <stanza>/file-entries/<set>/<id>/<nnnnnn>   the entries, in path order, FILE_PART_ENTRIES per object (sealed postcard)
//! ```
//! A snapshot exists once its head does; entries without a head are what a
//! run that did not finish left (`expire` removes them). Entries are
//! written and read a part at a time, so neither a backup nor a restore
//! holds a whole tree's listing in memory. A file's content is a list of
//! chunks (content-defined, about 1 MiB) stored like database blocks: same
//! ids, same packs, same dedup, same encryption; garbage collection keeps
//! every chunk a snapshot names ([`live_chunks`]).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::object::ObjectKind;
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::BlockId;
use crate::storage::{list_all, ObjectAttrs};

/// The snapshot format this build writes and reads.
pub const FILES_VERSION: u32 = 1;
/// Entries per entries object.
pub const FILE_PART_ENTRIES: usize = 2048;
/// Largest entries object body accepted.
const MAX_PART: u64 = 256 << 20;

/// What a snapshot was taken of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A local directory tree.
    Dir,
    /// Objects of an S3-compatible bucket under a prefix.
    S3,
}

/// A file or object the run could not store consistently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Path or key, relative to the source.
    pub path: String,
    /// Why, in words.
    pub reason: String,
}

/// The head of a snapshot: what a listing shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHead {
    /// [`FILES_VERSION`].
    pub version: u32,
    /// The set's name.
    pub set: String,
    /// The snapshot's id (its start time, sortable).
    pub id: String,
    /// The source, as given (`/srv/config`, `s3://uploads/`).
    pub source: String,
    /// Directory or bucket.
    pub source_kind: SourceKind,
    /// When the listing of the source began: the moment the snapshot stands
    /// for (`--as-of` and `restore-pitr --with-files` compare with it).
    pub started: DateTime<Utc>,
    /// When the last entry was stored.
    pub finished: DateTime<Utc>,
    /// Entries objects (`<nnnnnn>` from 0).
    pub parts: u32,
    /// Entries (files, directories, links, objects).
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Content bytes read from the source by this run (unchanged files are
    /// not read).
    pub read_bytes: u64,
    /// Bytes of chunks not stored before, before compression.
    pub new_bytes: u64,
    /// Bytes of packs written.
    pub stored_bytes: u64,
    /// Glob patterns left out.
    pub excludes: Vec<String>,
    /// Entries not in the snapshot, and why (the first 100).
    pub skipped: Vec<Skipped>,
    /// How many entries were skipped in all.
    pub skipped_count: u64,
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file or an object.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (`target`).
    Symlink,
}

/// A piece of a file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The block id of the chunk.
    pub id: BlockId,
    /// Its length in bytes.
    pub len: u32,
}

/// One file, directory, link or object of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path (directories) or key below the prefix (buckets); `/`
    /// separated.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Content length.
    pub size: u64,
    /// Unix mode bits (permissions), 0 for objects.
    pub mode: u32,
    /// Owner, 0 for objects.
    pub uid: u32,
    /// Group, 0 for objects.
    pub gid: u32,
    /// Modification time (objects: last-modified), nanoseconds since the
    /// epoch.
    pub mtime_ns: i64,
    /// Inode number (directories; decides "unchanged"), 0 for objects.
    pub inode: u64,
    /// The object's ETag (buckets).
    pub etag: Option<String>,
    /// Content type, user metadata… (buckets).
    pub attrs: Option<ObjectAttrs>,
    /// A link's target.
    pub target: Option<String>,
    /// The content, in order.
    pub chunks: Vec<ChunkRef>,
}

impl FileEntry {
    /// Whether `self` (the previous snapshot's) describes the same content
    /// as `now` without reading it: same kind and size, and the same
    /// (mtime, inode) for a file of a directory, the same (ETag,
    /// last-modified) for an object.
    pub fn unchanged(&self, now: &FileEntry) -> bool {
        self.kind == EntryKind::File
            && now.kind == EntryKind::File
            && self.size == now.size
            && self.mtime_ns == now.mtime_ns
            && self.inode == now.inode
            && self.etag == now.etag
            && self.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == self.size
    }
}

/// `<stanza>/file-snapshots/`.
pub fn heads_dir(paths: &StanzaPaths) -> String {
    format!("{}/file-snapshots/", paths.stanza())
}

/// `<stanza>/file-snapshots/<set>/<id>`.
pub fn head_key(paths: &StanzaPaths, set: &str, id: &str) -> String {
    format!("{}{set}/{id}", heads_dir(paths))
}

/// `<stanza>/file-entries/<set>/<id>/`.
pub fn entries_dir(paths: &StanzaPaths, set: &str, id: &str) -> String {
    format!("{}/file-entries/{set}/{id}/", paths.stanza())
}

fn part_key(paths: &StanzaPaths, set: &str, id: &str, n: u32) -> String {
    format!("{}{n:06}", entries_dir(paths, set, id))
}

/// Whether `name` can name a set: letters, digits, `-`, `_`, `.`, not
/// starting with `.`, at most 64 bytes.
pub fn valid_set_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A new snapshot id for a run started at `started`: the time to the
/// second and 6 random hex digits (two runs never collide; ids sort by
/// time to the second; `walvault hold` takes them like backup ids).
pub fn new_snapshot_id(started: DateTime<Utc>) -> String {
    format!(
        "{}-{}",
        started.format("%Y%m%dT%H%M%SZ"),
        crate::codec::to_hex(&rand::random::<[u8; 3]>())
    )
}

/// Whether some set of the stanza has snapshot `id`.
pub async fn snapshot_exists(
    repo: &Repository,
    paths: &StanzaPaths,
    id: &str,
) -> Result<bool, RepoError> {
    Ok(list_all(repo.storage().as_ref(), &heads_dir(paths))
        .await?
        .iter()
        .any(|o| o.key.rsplit('/').next() == Some(id)))
}

/// Writes a snapshot's entries, a part at a time, then its head.
#[derive(Debug)]
pub struct SnapshotWriter {
    paths: StanzaPaths,
    set: String,
    id: String,
    pending: Vec<FileEntry>,
    parts: u32,
    entries: u64,
    bytes: u64,
}

impl SnapshotWriter {
    /// A writer for snapshot `id` of `set`.
    pub fn new(paths: &StanzaPaths, set: &str, id: &str) -> SnapshotWriter {
        SnapshotWriter {
            paths: paths.clone(),
            set: set.to_owned(),
            id: id.to_owned(),
            pending: Vec::with_capacity(FILE_PART_ENTRIES),
            parts: 0,
            entries: 0,
            bytes: 0,
        }
    }

    /// Add the next entry (callers add them in path order); a full part is
    /// stored.
    pub async fn push(&mut self, repo: &Repository, entry: FileEntry) -> Result<(), RepoError> {
        self.entries += 1;
        self.bytes += entry.size;
        self.pending.push(entry);
        if self.pending.len() >= FILE_PART_ENTRIES {
            self.flush(repo).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, repo: &Repository) -> Result<(), RepoError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let body = postcard::to_stdvec(&(FILES_VERSION, &self.pending))
            .map_err(RepoError::encode("file entries"))?;
        let key = part_key(&self.paths, &self.set, &self.id, self.parts);
        let sealed = repo
            .seal_blocking(ObjectKind::FileEntries, &key, body)
            .await?;
        repo.storage().put(&key, sealed).await?;
        self.parts += 1;
        self.pending.clear();
        Ok(())
    }

    /// Entries and content bytes added so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.entries, self.bytes)
    }

    /// Store the last part, then the head (`parts`, `entries` and `bytes`
    /// are filled in here): the snapshot exists from now on.
    pub async fn commit(
        mut self,
        repo: &Repository,
        mut head: SnapshotHead,
    ) -> Result<SnapshotHead, RepoError> {
        self.flush(repo).await?;
        head.parts = self.parts;
        head.entries = self.entries;
        head.bytes = self.bytes;
        let key = head_key(&self.paths, &self.set, &self.id);
        repo.put_json(ObjectKind::FileSnapshot, &key, &head).await?;
        Ok(head)
    }
}

/// Every snapshot head of the stanza (of `set` only, when given), oldest
/// first within a set, sets in name order.
pub async fn list_heads(
    repo: &Repository,
    paths: &StanzaPaths,
    set: Option<&str>,
) -> Result<Vec<SnapshotHead>, RepoError> {
    let dir = match set {
        Some(s) => format!("{}{s}/", heads_dir(paths)),
        None => heads_dir(paths),
    };
    let mut heads: Vec<SnapshotHead> = repo
        .list_json::<SnapshotHead>(ObjectKind::FileSnapshot, &dir)
        .await?
        .into_iter()
        .map(|(_, h)| h)
        .collect();
    if let Some(h) = heads.iter().find(|h| h.version != FILES_VERSION) {
        return Err(RepoError::UnsupportedVersion {
            object: head_key(paths, &h.set, &h.id),
            found: h.version,
            supported: FILES_VERSION,
        });
    }
    heads.sort_by(|a, b| (&a.set, a.started, &a.id).cmp(&(&b.set, b.started, &b.id)));
    Ok(heads)
}

/// The entries of part `n` of a snapshot.
pub async fn read_part(
    repo: &Repository,
    paths: &StanzaPaths,
    head: &SnapshotHead,
    n: u32,
) -> Result<Vec<FileEntry>, RepoError> {
    let key = part_key(paths, &head.set, &head.id, n);
    let body = repo
        .read_object(ObjectKind::FileEntries, &key, MAX_PART)
        .await?;
    let (version, entries): (u32, Vec<FileEntry>) =
        postcard::from_bytes(&body).map_err(|e| RepoError::Corrupt {
            object: key.clone(),
            reason: e.to_string(),
        })?;
    if version != FILES_VERSION {
        return Err(RepoError::UnsupportedVersion {
            object: key,
            found: version,
            supported: FILES_VERSION,
        });
    }
    Ok(entries)
}

/// Reads a snapshot's entries in order, one part in memory at a time.
#[derive(Debug)]
pub struct EntryCursor {
    head: SnapshotHead,
    paths: StanzaPaths,
    next_part: u32,
    buffer: std::collections::VecDeque<FileEntry>,
}

impl EntryCursor {
    /// A cursor at the first entry of `head`.
    pub fn new(paths: &StanzaPaths, head: &SnapshotHead) -> EntryCursor {
        EntryCursor {
            head: head.clone(),
            paths: paths.clone(),
            next_part: 0,
            buffer: Default::default(),
        }
    }

    /// The next entry; `None` after the last.
    pub async fn next(&mut self, repo: &Repository) -> Result<Option<FileEntry>, RepoError> {
        self.fill(repo).await?;
        Ok(self.buffer.pop_front())
    }

    /// The next entry without taking it.
    pub async fn peek(&mut self, repo: &Repository) -> Result<Option<&FileEntry>, RepoError> {
        self.fill(repo).await?;
        Ok(self.buffer.front())
    }

    /// Read parts until one holds an entry, or none is left.
    async fn fill(&mut self, repo: &Repository) -> Result<(), RepoError> {
        while self.buffer.is_empty() && self.next_part < self.head.parts {
            self.buffer = read_part(repo, &self.paths, &self.head, self.next_part)
                .await?
                .into();
            self.next_part += 1;
        }
        Ok(())
    }
}

/// Delete a snapshot: the head first (from then on it does not exist),
/// then its entries.
pub async fn delete_snapshot(
    repo: &Repository,
    paths: &StanzaPaths,
    set: &str,
    id: &str,
) -> Result<(), RepoError> {
    repo.storage().delete(&head_key(paths, set, id)).await?;
    for o in list_all(repo.storage().as_ref(), &entries_dir(paths, set, id)).await? {
        repo.storage().delete(&o.key).await?;
    }
    Ok(())
}

/// Entries objects whose snapshot has no head (a run that failed or was
/// killed), as (set, id) pairs.
pub async fn orphan_entries(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<Vec<(String, String)>, RepoError> {
    let heads: HashSet<(String, String)> = list_all(repo.storage().as_ref(), &heads_dir(paths))
        .await?
        .into_iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix(&heads_dir(paths))?.to_owned();
            let (set, id) = rest.split_once('/')?;
            Some((set.to_owned(), id.to_owned()))
        })
        .collect();
    let root = format!("{}/file-entries/", paths.stanza());
    let mut orphans: Vec<(String, String)> = list_all(repo.storage().as_ref(), &root)
        .await?
        .into_iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix(&root)?;
            let mut it = rest.split('/');
            Some((it.next()?.to_owned(), it.next()?.to_owned()))
        })
        .filter(|k| !heads.contains(k))
        .collect();
    orphans.dedup();
    Ok(orphans)
}

/// Every chunk id a snapshot of the stanza names (garbage collection keeps
/// their packs). `except` leaves out snapshots (set, id) about to be
/// deleted.
pub async fn live_chunks(
    repo: &Repository,
    paths: &StanzaPaths,
    except: &HashSet<(String, String)>,
) -> Result<HashSet<BlockId>, RepoError> {
    let mut ids = HashSet::new();
    for head in list_heads(repo, paths, None).await? {
        if except.contains(&(head.set.clone(), head.id.clone())) {
            continue;
        }
        for n in 0..head.parts {
            for e in read_part(repo, paths, &head, n).await? {
                ids.extend(e.chunks.iter().map(|c| c.id));
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names() {
        for good in ["uploads", "etc-postgresql", "tls_certs", "a.b"] {
            assert!(valid_set_name(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65), "ü"] {
            assert!(!valid_set_name(bad), "{bad}");
        }
    }

    #[test]
    fn ids_sort_by_time() {
        let a = new_snapshot_id(DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default());
        let b = new_snapshot_id(DateTime::from_timestamp(1_800_000_001, 0).unwrap_or_default());
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20270115T080000Z-"), "{a}");
        assert_eq!(a.len(), "20270115T080000Z-".len() + 6);
    }
}
