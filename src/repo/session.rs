//! A writing session: the parallel block pipeline.
//!
//! ```text
//! bytes ─ cut ─▶ rayon: hash → dedup → compress → encrypt ─▶ pack builder ─▶ bounded queue ─▶ uploads (N at once) ─▶ index objects
//! ```
//! - Dedup: a block is skipped when the stanza's index (loaded at the start,
//!   minus packs pending deletion) or this session already has it; the first
//!   thread to claim a new id stores it, others just use the id.
//! - Back-pressure: when uploads lag, the queue fills and the CPU workers block
//!   on it, so memory stays bounded whatever the size of the input:
//!   `pack_size × (1 building + queue_packs + upload_concurrency)` for packs,
//!   plus `batch_blocks × block_size` of input being cut (with the defaults,
//!   16 MiB × 6 + 256 × 8 KiB = 98 MiB), plus the dedup set of this session
//!   (32 bytes per new block, `super::fresh`).
//! - Order: packs are uploaded first; an index object naming them is written
//!   after every `index_flush_packs` packs and at the end. A backup's manifest
//!   is written only after [`Session::finish`] returned.
//! - The session holds a lease (see [`super::gc`]) from before it loads the
//!   index until it finishes, so garbage collection never deletes a pack the
//!   session may have deduplicated against.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rayon::prelude::*;
use tokio::sync::mpsc;

use super::fresh::FreshSet;
use super::gc::{GcState, Lease};
use super::index::Index;
use super::pack::{encode_group, group_prefix, PackBuilder, PackEntry, PackId};
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::{BlockId, Compression};

/// Tuning of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Compression of new blocks (default: the repository's).
    pub compression: Option<Compression>,
    /// Packs uploaded at the same time.
    pub upload_concurrency: usize,
    /// Finished packs waiting for an upload slot.
    pub queue_packs: usize,
    /// Blocks cut and processed together (spread over the CPU workers).
    pub batch_blocks: usize,
    /// Write an index object after this many uploaded packs.
    pub index_flush_packs: usize,
    /// What the lease says the session is ("backup", "wal", ...).
    pub purpose: String,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            compression: None,
            upload_concurrency: 4,
            queue_packs: 1,
            batch_blocks: 256,
            index_flush_packs: 16,
            purpose: "backup".into(),
        }
    }
}

/// What a session stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Blocks passed in.
    pub blocks: u64,
    /// Bytes passed in.
    pub logical_bytes: u64,
    /// Blocks not stored before.
    pub new_blocks: u64,
    /// Bytes of those blocks before compression.
    pub new_raw_bytes: u64,
    /// Bytes of packs written (what the repository grew by, index aside).
    pub stored_bytes: u64,
    /// Packs written.
    pub packs: u64,
}

struct FinishedPack {
    id: PackId,
    name: String,
    data: Bytes,
    entries: Vec<PackEntry>,
}

#[derive(Default)]
struct Counters {
    blocks: AtomicU64,
    logical: AtomicU64,
    new_blocks: AtomicU64,
    new_raw: AtomicU64,
}

/// An open writing session on one stanza.
pub struct Session {
    repo: Arc<Repository>,
    paths: StanzaPaths,
    compression: Compression,
    pack_size: usize,
    batch_blocks: usize,
    group_blocks: usize,
    known: Arc<Index>,
    fresh: FreshSet,
    packer: Mutex<PackBuilder>,
    tx: Mutex<Option<mpsc::Sender<FinishedPack>>>,
    uploader: Mutex<Option<tokio::task::JoinHandle<Result<UploadResult, RepoError>>>>,
    counters: Counters,
    lease: Lease,
}

struct UploadResult {
    packs: u64,
    stored: u64,
    index_objects: Vec<String>,
    /// Packs named by the index objects written.
    indexed: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("stanza", &self.paths)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Take a lease, load the index, and start the uploaders.
    pub async fn start(
        repo: Arc<Repository>,
        stanza: &str,
        opts: SessionOptions,
    ) -> Result<Session, RepoError> {
        let paths = StanzaPaths::new(stanza);
        let lease = Lease::acquire(repo.clone(), &paths, &opts.purpose).await?;
        let (mut index, _, damaged) = Index::load_marked(&repo, &paths).await?;
        // never deduplicate against a pack garbage collection may delete,
        // nor against one verify found damaged (its blocks are stored again)
        let mut avoid = GcState::load(&repo, &paths).await?.pending_packs();
        avoid.extend(damaged);
        if !avoid.is_empty() {
            let kept: Vec<_> = index
                .pack_entries()
                .into_iter()
                .filter(|(p, _)| !avoid.contains(p))
                .collect();
            index = Index::from_packs(&kept);
        }
        let pack_size = repo.config().pack_size as usize;
        let (tx, rx) = mpsc::channel(opts.queue_packs.max(1));
        let uploader = tokio::spawn(upload_loop(
            repo.clone(),
            paths.clone(),
            rx,
            opts.upload_concurrency.max(1),
            opts.index_flush_packs.max(1),
        ));
        Ok(Session {
            compression: opts
                .compression
                .unwrap_or_else(|| repo.config().compression()),
            pack_size,
            batch_blocks: opts.batch_blocks.max(1),
            group_blocks: repo.config().group_blocks(),
            known: Arc::new(index),
            fresh: FreshSet::default(),
            packer: Mutex::new(PackBuilder::new(pack_size + pack_size / 8)),
            tx: Mutex::new(Some(tx)),
            uploader: Mutex::new(Some(uploader)),
            counters: Counters::default(),
            lease,
            repo,
            paths,
        })
    }

    /// The repository's block size.
    pub fn block_size(&self) -> usize {
        self.repo.config().block_size as usize
    }

    /// The index as loaded at the start (for readers in the same process).
    pub fn known_index(&self) -> &Arc<Index> {
        &self.known
    }

    /// Store one block (blocking: call from a worker thread, not from async
    /// code). Returns its id; the data is durable only after [`Session::finish`].
    pub fn put_block(&self, data: &[u8]) -> Result<BlockId, RepoError> {
        let id = self.put_chunk(&[data])?;
        Ok(id[0])
    }

    /// Store consecutive blocks on this thread: hash each, claim the new
    /// ones in the dedup set (256 shards, so two threads rarely meet on a
    /// lock), compress them in groups, then one lock of the pack builder for
    /// all of them (per block, two threads contending for one lock cost
    /// more in futex wake-ups than the compression itself).
    fn put_chunk(&self, blocks: &[&[u8]]) -> Result<Vec<BlockId>, RepoError> {
        let hasher = self.repo.hasher();
        let ids: Vec<BlockId> = blocks.iter().map(|b| hasher.id(b)).collect();
        let logical: usize = blocks.iter().map(|b| b.len()).sum();
        self.counters
            .blocks
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        self.counters
            .logical
            .fetch_add(logical as u64, Ordering::Relaxed);
        let new: Vec<bool> = {
            ids.iter()
                .map(|id| !self.known.contains(id) && self.fresh.insert(*id))
                .collect()
        };
        let fresh: Vec<(BlockId, &[u8])> = blocks
            .iter()
            .zip(&ids)
            .zip(&new)
            .filter(|(_, &is_new)| is_new)
            .map(|((data, id), _)| (*id, *data))
            .collect();
        if fresh.is_empty() {
            return Ok(ids);
        }
        self.counters
            .new_blocks
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        self.counters.new_raw.fetch_add(
            fresh.iter().map(|b| b.1.len() as u64).sum::<u64>(),
            Ordering::Relaxed,
        );
        // (the blocks and their raw lengths, the blob, its compression byte)
        type Blob = (Vec<(BlockId, usize)>, Vec<u8>, u8);
        let group_bytes = self.group_blocks * self.block_size();
        let blobs: Vec<Blob> = groups(&fresh, self.group_blocks, group_bytes)
            .map(|g| {
                let (blob, used) = encode_group(g, self.compression, self.repo.keys());
                let members = g.iter().map(|(id, d)| (*id, d.len())).collect();
                (members, blob, used)
            })
            .collect();
        let mut full = Vec::new();
        {
            let mut p = lock(&self.packer);
            for (members, blob, used) in &blobs {
                p.push(members, blob, *used);
                if p.len() >= self.pack_size {
                    full.push(std::mem::replace(
                        &mut *p,
                        PackBuilder::new(self.pack_size + self.pack_size / 8),
                    ));
                }
            }
        }
        for pack in full {
            self.send_pack(pack)?;
        }
        Ok(ids)
    }

    /// Blocks compressed together in one group blob (1: each alone).
    pub fn group_blocks(&self) -> usize {
        self.group_blocks
    }

    /// Store many blocks in parallel; ids in input order.
    pub fn put_blocks(&self, blocks: &[Bytes]) -> Result<Vec<BlockId>, RepoError> {
        // chunks small enough to spread a batch over every core
        let per = (blocks.len() / (4 * rayon::current_num_threads())).clamp(1, 32);
        let parts: Vec<Vec<BlockId>> = blocks
            .par_chunks(per)
            .map(|chunk| {
                let refs: Vec<&[u8]> = chunk.iter().map(|b| b.as_ref()).collect();
                self.put_chunk(&refs)
            })
            .collect::<Result<_, _>>()?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// Cut a stream into blocks of the repository's block size and store them
    /// (blocking). Returns the block ids and the number of bytes read.
    pub fn store_reader(&self, reader: &mut dyn Read) -> Result<(Vec<BlockId>, u64), RepoError> {
        let bs = self.block_size();
        let mut ids = Vec::new();
        let mut total = 0u64;
        loop {
            let mut batch = Vec::with_capacity(self.batch_blocks);
            let mut eof = false;
            while batch.len() < self.batch_blocks {
                let mut buf = vec![0u8; bs];
                let n = read_full(reader, &mut buf).map_err(RepoError::Input)?;
                if n == 0 {
                    eof = true;
                    break;
                }
                buf.truncate(n);
                total += n as u64;
                batch.push(Bytes::from(buf));
                if n < bs {
                    eof = true;
                    break;
                }
            }
            ids.extend(self.put_blocks(&batch)?);
            if eof {
                return Ok((ids, total));
            }
        }
    }

    fn prepare(&self, pack: PackBuilder) -> FinishedPack {
        let name = self.paths.pack(&pack.id);
        let (id, data, entries) = pack.finish(&name, self.repo.keys(), self.repo.entry_format());
        FinishedPack {
            id,
            name,
            data,
            entries,
        }
    }

    fn send_pack(&self, pack: PackBuilder) -> Result<(), RepoError> {
        let fp = self.prepare(pack);
        let tx = lock(&self.tx).clone();
        let tx = tx.ok_or(RepoError::SessionClosed("session already finished"))?;
        tx.blocking_send(fp).map_err(|_| uploads_stopped())
    }

    /// Flush the last pack, wait for every upload, write the final index
    /// object, and release the lease. After it returns, every block passed in
    /// is durable and indexed.
    pub async fn finish(self) -> Result<SessionStats, RepoError> {
        let (result, lease) = self.finish_keep_lease().await;
        lease.release().await;
        result
    }

    /// [`Session::finish`], but the lease stays held (and refreshed) for the
    /// caller to commit its manifest under, then release. On error it is
    /// returned too, so the caller can release it.
    pub async fn finish_keep_lease(self) -> (Result<SessionStats, RepoError>, Lease) {
        let result = self.drain().await;
        (result, self.lease)
    }

    async fn drain(&self) -> Result<SessionStats, RepoError> {
        let last = std::mem::replace(&mut *lock(&self.packer), PackBuilder::new(0));
        let tx = lock(&self.tx).take();
        let sent = match (last.is_empty(), tx) {
            (true, _) => Ok(()),
            (false, Some(tx)) => tx
                .send(self.prepare(last))
                .await
                .map_err(|_| uploads_stopped()),
            (false, None) => Err(RepoError::SessionClosed("session already finished")),
        };
        let handle = lock(&self.uploader).take();
        let uploaded = match handle {
            Some(h) => h.await.map_err(RepoError::task("upload"))?,
            None => Err(RepoError::SessionClosed("session already finished")),
        };
        sent?;
        let u = uploaded?;
        let c = &self.counters;
        tracing::debug!(
            index_objects = u.index_objects.len(),
            packs = u.indexed,
            "session finished"
        );
        Ok(SessionStats {
            blocks: c.blocks.load(Ordering::Relaxed),
            logical_bytes: c.logical.load(Ordering::Relaxed),
            new_blocks: c.new_blocks.load(Ordering::Relaxed),
            new_raw_bytes: c.new_raw.load(Ordering::Relaxed),
            stored_bytes: u.stored,
            packs: u.packs,
        })
    }

    /// True while the session's lease has not expired (a writer must check it
    /// right before committing a manifest).
    pub fn lease_valid(&self) -> bool {
        self.lease.valid()
    }
}

/// Entries of uploaded packs after which an index object is written
/// (about 6 MiB of index body).
const FLUSH_ENTRIES: usize = 1 << 17;

async fn upload_loop(
    repo: Arc<Repository>,
    paths: StanzaPaths,
    mut rx: mpsc::Receiver<FinishedPack>,
    concurrency: usize,
    flush_every: usize,
) -> Result<UploadResult, RepoError> {
    let mut running = FuturesUnordered::new();
    let mut unindexed: Vec<(PackId, Vec<PackEntry>)> = Vec::new();
    let mut result = UploadResult {
        packs: 0,
        stored: 0,
        index_objects: Vec::new(),
        indexed: 0,
    };
    let mut open = true;
    while open || !running.is_empty() {
        tokio::select! {
            msg = rx.recv(), if open && running.len() < concurrency => match msg {
                Some(p) => {
                    let storage = repo.storage().clone();
                    running.push(async move {
                        let size = p.data.len() as u64;
                        storage.put(&p.name, p.data).await.map(|_| (p.id, p.entries, size))
                    });
                }
                None => open = false,
            },
            Some(done) = running.next() => {
                let (id, entries, size) = done?;
                result.packs += 1;
                result.stored += size;
                unindexed.push((id, entries));
                // packs of well-compressed groups list many blocks each:
                // the entries held for the next index object are bounded too
                let held: usize = unindexed.iter().map(|(_, e)| e.len()).sum();
                if unindexed.len() >= flush_every || held >= FLUSH_ENTRIES {
                    let name = Index::store_object(&repo, &paths, &unindexed).await?;
                    result.index_objects.push(name);
                    // the entries are in the index object now: not kept
                    result.indexed += unindexed.len();
                    unindexed.clear();
                }
            }
        }
    }
    if !unindexed.is_empty() {
        let name = Index::store_object(&repo, &paths, &unindexed).await?;
        result.index_objects.push(name);
        result.indexed += unindexed.len();
    }
    Ok(result)
}

fn uploads_stopped() -> RepoError {
    RepoError::SessionClosed("uploads stopped after an error (finish the session to see it)")
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Lock a mutex, recovering from poisoning (every critical section here
/// leaves its data consistent).
/// Cut new blocks into groups of at most `most` blocks and `max_bytes`
/// (a block longer than that, a file chunk, is alone) whose id prefixes
/// are distinct (a group's table finds a block by its prefix).
fn groups<'a, 'b>(
    blocks: &'a [(BlockId, &'b [u8])],
    most: usize,
    max_bytes: usize,
) -> impl Iterator<Item = &'a [(BlockId, &'b [u8])]> {
    let most = most.clamp(1, 255);
    let mut rest = blocks;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut n = 1;
        let mut bytes = rest[0].1.len();
        while n < most.min(rest.len()) {
            let p = group_prefix(&rest[n].0);
            bytes += rest[n].1.len();
            if bytes > max_bytes || rest[..n].iter().any(|(id, _)| group_prefix(id) == p) {
                break;
            }
            n += 1;
        }
        let (g, tail) = rest.split_at(n);
        rest = tail;
        Some(g)
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Groups keep input order, hold at most `most` blocks, and never two
    /// blocks whose ids share the table's prefix.
    #[test]
    fn groups_are_bounded_and_prefixes_distinct() {
        let id = |p: u8, q: u8| {
            let mut b = [q; 32];
            b[..8].copy_from_slice(&[p; 8]);
            BlockId(b)
        };
        let ids = [id(1, 0), id(2, 0), id(1, 9), id(3, 0), id(4, 0), id(5, 0)];
        let blocks: Vec<(BlockId, &[u8])> = ids.iter().map(|i| (*i, &b"x"[..])).collect();
        let sizes = |most, bytes| {
            groups(&blocks, most, bytes)
                .map(|g| g.len())
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(16, 1 << 20), vec![2, 4]);
        assert_eq!(sizes(3, 1 << 20), vec![2, 3, 1]);
        assert_eq!(sizes(1, 1 << 20), vec![1; 6]);
        // byte-capped: one-byte blocks, two per group, never empty groups
        assert_eq!(sizes(16, 2), vec![2, 2, 2]);
        assert_eq!(sizes(16, 0), vec![1; 6]);
        let flat: Vec<BlockId> = groups(&blocks, 2, 1 << 20).flatten().map(|b| b.0).collect();
        assert_eq!(flat, ids);
        assert_eq!(groups(&[], 16, 1 << 20).count(), 0);
    }
}
