//! `walvault files backup`: one snapshot of a source.
//!
//! ```text
//! listing (path order) ─▶ merge with the previous snapshot ─▶ up to `parallel` files read at once ─▶ entries in order ─▶ head
//! ```
//! A file whose metadata matches the previous snapshot's entry (size,
//! mtime and inode; for an object size, ETag and last-modified) keeps its
//! chunks and is not read. A file that changes while it is read (its
//! size or mtime after the read differ from before; an object's ETag no
//! longer matches: every ranged GET carries `If-Match`) is read again, up
//! to `attempts` times, then left out and reported: a snapshot never holds
//! a mixture of two versions. The head is written only after every chunk
//! is durable, under the session's lease.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use super::chunker::Chunker;
use super::source::{self, Listed, Place};
use super::FilesError;
use crate::repo::files::{
    list_heads, new_snapshot_id, valid_set_name, ChunkRef, EntryCursor, EntryKind, FileEntry,
    Skipped, SnapshotHead, SnapshotWriter, SourceKind, FILES_VERSION,
};
use crate::repo::{Repository, Session, SessionOptions, StanzaPaths};
use crate::storage::{S3Config, StorageError};

/// Options of a files backup.
#[derive(Debug, Clone)]
pub struct FilesBackupOptions {
    /// The set's name.
    pub set: String,
    /// A directory or `s3://bucket/prefix`.
    pub source: String,
    /// S3 settings for an S3 source.
    pub s3: S3Config,
    /// Glob patterns left out.
    pub exclude: Vec<String>,
    /// Files read at once.
    pub parallel: usize,
    /// Reads of a file that keeps changing before it is left out.
    pub attempts: u32,
}

impl Default for FilesBackupOptions {
    fn default() -> Self {
        FilesBackupOptions {
            set: String::new(),
            source: String::new(),
            s3: S3Config::default(),
            exclude: Vec::new(),
            parallel: 8,
            attempts: 3,
        }
    }
}

/// Bytes asked for in one ranged GET of an object.
const RANGE: u64 = 4 << 20;
/// Bytes read from a local file at a time.
const READ_BUF: usize = 4 << 20;
/// Skipped entries named in the head.
const SKIPPED_KEPT: usize = 100;

enum Outcome {
    Entry(Box<FileEntry>),
    Skipped(Skipped),
    /// Removed while the run went on: not in the snapshot, not an error.
    Gone,
}

/// Take a snapshot of `opts.source` as set `opts.set`.
pub async fn backup(
    repo: Arc<Repository>,
    stanza: &str,
    opts: &FilesBackupOptions,
) -> Result<SnapshotHead, FilesError> {
    if !valid_set_name(&opts.set) {
        return Err(FilesError::Usage(format!(
            "invalid set name {:?}: use 1-64 characters from a-z, A-Z, 0-9, '-', '_', '.'",
            opts.set
        )));
    }
    let paths = StanzaPaths::new(stanza);
    let place = Place::open(&opts.source, &opts.s3).await?;
    let exclude = source::excludes(&opts.exclude)?;
    source::probe(&place).await?;
    let kind = place.kind();
    let previous = list_heads(&repo, &paths, Some(&opts.set))
        .await?
        .into_iter()
        .rev()
        .find(|h| h.source_kind == kind);
    let started = chrono::Utc::now();
    let id = new_snapshot_id(started);
    let session = Arc::new(
        Session::start(
            repo.clone(),
            stanza,
            SessionOptions {
                purpose: "files".into(),
                ..SessionOptions::default()
            },
        )
        .await?,
    );
    let mut writer = SnapshotWriter::new(&paths, &opts.set, &id);
    let read = Arc::new(AtomicU64::new(0));
    let outcome = run(
        &repo,
        &paths,
        &place,
        exclude,
        previous.as_ref(),
        &session,
        &mut writer,
        &read,
        opts,
    )
    .await;
    // after an error, reads already handed to the blocking pool still hold
    // the session: they end with their file; the session must be finished
    // (its packs indexed, its lease released) whatever happened
    let mut session = session;
    let session = loop {
        match Arc::try_unwrap(session) {
            Ok(s) => break s,
            Err(shared) => {
                session = shared;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    let (stats, lease) = session.finish_keep_lease().await;
    let result = async {
        let (skipped, skipped_count) = outcome?;
        let stats = stats?;
        if !lease.valid() {
            return Err(FilesError::Usage(
                "the run's lease expired (the repository was unreachable for too long): no snapshot was stored; run it again".into(),
            ));
        }
        let head = SnapshotHead {
            version: FILES_VERSION,
            set: opts.set.clone(),
            id: id.clone(),
            source: place.describe(),
            source_kind: kind,
            started,
            finished: chrono::Utc::now(),
            parts: 0,
            entries: 0,
            bytes: 0,
            read_bytes: read.load(Ordering::Relaxed),
            new_bytes: stats.new_raw_bytes,
            stored_bytes: stats.stored_bytes,
            excludes: opts.exclude.clone(),
            skipped,
            skipped_count,
        };
        Ok(writer.commit(&repo, head).await?)
    }
    .await;
    lease.release().await;
    if result.is_err() {
        // entries without a head are not a snapshot; leave none behind
        let dir = crate::repo::files::entries_dir(&paths, &opts.set, &id);
        if let Ok(objs) = crate::storage::list_all(repo.storage().as_ref(), &dir).await {
            for o in objs {
                let _ = repo.storage().delete(&o.key).await;
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run(
    repo: &Repository,
    paths: &StanzaPaths,
    place: &Place,
    exclude: globset::GlobSet,
    previous: Option<&SnapshotHead>,
    session: &Arc<Session>,
    writer: &mut SnapshotWriter,
    read: &Arc<AtomicU64>,
    opts: &FilesBackupOptions,
) -> Result<(Vec<Skipped>, u64), FilesError> {
    let kind = place.kind();
    let (tx, mut rx) = mpsc::channel(1024);
    let lister = tokio::spawn(source::list(place.clone(), exclude, tx));
    let mut prev = previous.map(|h| EntryCursor::new(paths, h));
    let mut left_out = LeftOut::default();
    let mut running: FuturesOrdered<BoxFuture<'static, Result<Outcome, FilesError>>> =
        FuturesOrdered::new();
    let parallel = opts.parallel.max(1);
    let mut logged = std::time::Instant::now();
    while let Some(listed) = rx.recv().await {
        if logged.elapsed() >= crate::progress::LOG_INTERVAL {
            logged = std::time::Instant::now();
            let (entries, bytes) = writer.counts();
            tracing::info!(
                "files backup of {}: {entries} entries so far, {} of content, {} read",
                opts.set,
                crate::progress::human_bytes(bytes),
                crate::progress::human_bytes(read.load(Ordering::Relaxed))
            );
        }
        let mut entry = match listed? {
            Listed::Entry(e) => *e,
            Listed::Skipped(s) => {
                running.push_back(async move { Ok(Outcome::Skipped(s)) }.boxed());
                continue;
            }
        };
        // the previous snapshot's entry of the same path, if any
        let mut before: Option<FileEntry> = None;
        if let Some(cur) = prev.as_mut() {
            loop {
                let order = match cur.peek(repo).await? {
                    Some(p) => source::path_order(kind, &p.path, &entry.path),
                    None => break,
                };
                match order {
                    std::cmp::Ordering::Less => {
                        cur.next(repo).await?;
                    }
                    std::cmp::Ordering::Equal => {
                        before = cur.next(repo).await?;
                        break;
                    }
                    std::cmp::Ordering::Greater => break,
                }
            }
        }
        let job: BoxFuture<'static, Result<Outcome, FilesError>> = match entry.kind {
            EntryKind::Dir | EntryKind::Symlink => {
                async move { Ok(Outcome::Entry(Box::new(entry))) }.boxed()
            }
            EntryKind::File if entry.size == 0 && kind == SourceKind::Dir => {
                async move { Ok(Outcome::Entry(Box::new(entry))) }.boxed()
            }
            EntryKind::File => match before.filter(|b| b.unchanged(&entry)) {
                Some(b) => {
                    entry.chunks = b.chunks;
                    entry.attrs = b.attrs;
                    async move { Ok(Outcome::Entry(Box::new(entry))) }.boxed()
                }
                None => match place {
                    Place::Dir(root) => {
                        let full = root.join(&entry.path);
                        let session = session.clone();
                        let read = read.clone();
                        let attempts = opts.attempts.max(1);
                        async move {
                            tokio::task::spawn_blocking(move || {
                                read_file(&session, &full, entry, attempts, &read)
                            })
                            .await
                            .map_err(|e| FilesError::Task(e.to_string()))?
                        }
                        .boxed()
                    }
                    Place::S3(s3) => read_object(
                        session.clone(),
                        s3.clone(),
                        entry,
                        opts.attempts.max(1),
                        read.clone(),
                    )
                    .boxed(),
                },
            },
        };
        running.push_back(job);
        while running.len() >= parallel {
            if let Some(done) = running.next().await {
                deliver(repo, done?, writer, &mut left_out).await?;
            }
        }
    }
    while let Some(done) = running.next().await {
        deliver(repo, done?, writer, &mut left_out).await?;
    }
    lister.await.map_err(|e| FilesError::Task(e.to_string()))?;
    Ok((left_out.named, left_out.count))
}

/// Entries left out of a snapshot.
#[derive(Default)]
struct LeftOut {
    named: Vec<Skipped>,
    count: u64,
}

async fn deliver(
    repo: &Repository,
    o: Outcome,
    writer: &mut SnapshotWriter,
    left_out: &mut LeftOut,
) -> Result<(), FilesError> {
    match o {
        Outcome::Entry(e) => writer.push(repo, *e).await?,
        Outcome::Skipped(s) => {
            tracing::warn!("{} left out: {}", s.path, s.reason);
            left_out.count += 1;
            if left_out.named.len() < SKIPPED_KEPT {
                left_out.named.push(s);
            }
        }
        Outcome::Gone => {}
    }
    Ok(())
}

/// Store `chunks` and add them to `out`.
fn store(session: &Session, chunks: Vec<Bytes>, out: &mut Vec<ChunkRef>) -> Result<(), FilesError> {
    if chunks.is_empty() {
        return Ok(());
    }
    let ids = session.put_blocks(&chunks)?;
    out.extend(ids.into_iter().zip(&chunks).map(|(id, c)| ChunkRef {
        id,
        len: c.len() as u32,
    }));
    Ok(())
}

/// Read a local file into chunks, again when it changed meanwhile.
fn read_file(
    session: &Session,
    full: &Path,
    mut entry: FileEntry,
    attempts: u32,
    read: &AtomicU64,
) -> Result<Outcome, FilesError> {
    let skipped = |reason: String, path: &str| {
        Ok(Outcome::Skipped(Skipped {
            path: path.to_owned(),
            reason,
        }))
    };
    for _ in 0..attempts {
        let mut f = match std::fs::File::open(full) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Outcome::Gone),
            Err(e) => return skipped(format!("cannot open: {e}"), &entry.path),
        };
        let before = f
            .metadata()
            .map_err(FilesError::io(format!("stat {}", full.display())))?;
        let mut chunker = Chunker::new();
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; READ_BUF];
        let mut total = 0u64;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return skipped(format!("cannot read: {e}"), &entry.path),
            };
            total += n as u64;
            read.fetch_add(n as u64, Ordering::Relaxed);
            store(session, chunker.push(&buf[..n]), &mut chunks)?;
        }
        store(session, chunker.finish(), &mut chunks)?;
        let after = f
            .metadata()
            .map_err(FilesError::io(format!("stat {}", full.display())))?;
        use std::os::unix::fs::MetadataExt;
        let same = before.len() == after.len()
            && (before.mtime(), before.mtime_nsec()) == (after.mtime(), after.mtime_nsec())
            && total == after.len();
        if same {
            let path = std::mem::take(&mut entry.path);
            entry = match source::dir_entry(full, path, &after) {
                Ok(e) => e,
                Err(s) => return Ok(Outcome::Skipped(s)),
            };
            entry.chunks = chunks;
            return Ok(Outcome::Entry(Box::new(entry)));
        }
        tracing::info!("{} changed while it was read; reading it again", entry.path);
    }
    skipped(
        format!("changed while it was read, {attempts} times: not stored"),
        &entry.path,
    )
}

/// Read an object into chunks with ranged GETs that all carry `If-Match`,
/// again when it was replaced meanwhile.
async fn read_object(
    session: Arc<Session>,
    s3: crate::storage::S3,
    mut entry: FileEntry,
    attempts: u32,
    read: Arc<AtomicU64>,
) -> Result<Outcome, FilesError> {
    // a small object as listed: one GET gives its headers and content
    if let (true, Some(etag)) = (entry.size <= RANGE, entry.etag.clone()) {
        match s3.get_object_if_match(&entry.path, &etag).await {
            Ok((d, body)) if d.size == body.len() as u64 => {
                read.fetch_add(d.size, Ordering::Relaxed);
                entry.size = d.size;
                entry.attrs = Some(d.attrs);
                let s = session.clone();
                entry.chunks = tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    store(&s, super::chunker::chunks_of(&body), &mut out).map(|()| out)
                })
                .await
                .map_err(|e| FilesError::Task(e.to_string()))??;
                return Ok(Outcome::Entry(Box::new(entry)));
            }
            // replaced since the listing: read it as below
            Ok(_) | Err(StorageError::Changed { .. }) => {}
            Err(e) if e.is_not_found() => return Ok(Outcome::Gone),
            Err(e) => return Err(e.into()),
        }
    }
    'attempt: for _ in 0..attempts {
        let Some(d) = s3.object_details(&entry.path).await? else {
            return Ok(Outcome::Gone);
        };
        if entry.etag.as_deref() != Some(d.etag.as_str()) {
            // replaced since it was listed: HEAD's time (the listing's has
            // more precision, and is what the next run compares with)
            entry.mtime_ns = d
                .last_modified
                .and_then(|t| t.timestamp_nanos_opt())
                .unwrap_or(entry.mtime_ns);
        }
        entry.size = d.size;
        entry.etag = Some(d.etag.clone());
        entry.attrs = Some(d.attrs);
        let mut chunker = Chunker::new();
        let mut chunks: Vec<ChunkRef> = Vec::new();
        let mut at = 0u64;
        while at < entry.size {
            let len = RANGE.min(entry.size - at);
            let body = match s3.get_range_if_match(&entry.path, at, len, &d.etag).await {
                Ok(b) if b.len() as u64 == len => b,
                Ok(_) | Err(StorageError::Changed { .. }) => {
                    tracing::info!("{} changed while it was read; reading it again", entry.path);
                    continue 'attempt;
                }
                Err(e) if e.is_not_found() => return Ok(Outcome::Gone),
                Err(e) => return Err(e.into()),
            };
            at += len;
            read.fetch_add(len, Ordering::Relaxed);
            let s = session.clone();
            let (c, more) = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let cut = chunker.push(&body);
                store(&s, cut, &mut out).map(|()| (chunker, out))
            })
            .await
            .map_err(|e| FilesError::Task(e.to_string()))??;
            chunker = c;
            chunks.extend(more);
        }
        let s = session.clone();
        let last = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            store(&s, chunker.finish(), &mut out).map(|()| out)
        })
        .await
        .map_err(|e| FilesError::Task(e.to_string()))??;
        chunks.extend(last);
        entry.chunks = chunks;
        return Ok(Outcome::Entry(Box::new(entry)));
    }
    Ok(Outcome::Skipped(Skipped {
        path: entry.path,
        reason: format!("replaced while it was read, {attempts} times: not stored"),
    }))
}
