//! Reading blocks back: ranged reads of blobs from packs, then decryption,
//! decompression and verification on the blocking pool.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::index::Index;
use super::pack::{decode_blob, GroupCache, PackEntry, PackId};
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::{BlockId, IdHasher, Keys};

impl Repository {
    /// Read, verify and decode one block.
    pub async fn read_block(
        &self,
        paths: &StanzaPaths,
        index: &Index,
        id: &BlockId,
    ) -> Result<Bytes, RepoError> {
        let loc = index.get(id).ok_or(RepoError::MissingBlock {
            id: *id,
            context: None,
        })?;
        let name = paths.pack(&loc.pack);
        let blob = self
            .storage()
            .get_range(&name, u64::from(loc.entry.offset), u64::from(loc.entry.len))
            .await?;
        if blob.len() != loc.entry.len as usize {
            return Err(RepoError::Corrupt {
                object: name,
                reason: format!("blob of block {id} is truncated"),
            });
        }
        let keys = self.keys().cloned();
        let hasher = self.hasher().clone();
        let entry = loc.entry;
        tokio::task::spawn_blocking(move || decode_blob(&blob, &entry, keys.as_ref(), &hasher))
            .await
            .map_err(RepoError::task("decode"))?
            .map(Bytes::from)
            .map_err(|reason| RepoError::Corrupt {
                object: name,
                reason: format!("block {id}: {reason}"),
            })
    }

    /// The blocks `ids` in order, `parallel` fetched at once.
    pub fn read_blocks<'a>(
        self: &'a Arc<Self>,
        paths: &'a StanzaPaths,
        index: &'a Index,
        ids: &'a [BlockId],
        parallel: usize,
    ) -> impl Stream<Item = Result<Bytes, RepoError>> + 'a {
        futures::stream::iter(ids.iter())
            .map(move |id| self.read_block(paths, index, id))
            .buffered(parallel.max(1))
    }

    /// Read the blobs `entries` of one pack with a single ranged read
    /// covering all of them (they must be in offset order, without overlap;
    /// blocks of one group are neighbours with the group's offset), then
    /// verify and decode each. Restores read runs of neighbouring blocks
    /// this way: one request per run instead of one per block, which is what
    /// makes restoring from object storage fast.
    pub async fn read_run(
        &self,
        paths: &StanzaPaths,
        pack: &PackId,
        entries: Vec<PackEntry>,
    ) -> Result<Vec<Vec<u8>>, RepoError> {
        let run = self.fetch_run(paths, pack, &entries).await?;
        tokio::task::spawn_blocking(move || {
            entries
                .iter()
                .map(|e| {
                    let mut out = Vec::new();
                    run.decode_into(e, &mut out).map(|()| out)
                })
                .collect()
        })
        .await
        .map_err(RepoError::task("decode"))?
    }

    /// The single ranged read of [`Repository::read_run`], undecoded: the
    /// caller decodes each blob where it wants it ([`RunBytes::decode_into`]).
    pub async fn fetch_run(
        &self,
        paths: &StanzaPaths,
        pack: &PackId,
        entries: &[PackEntry],
    ) -> Result<RunBytes, RepoError> {
        let name = paths.pack(pack);
        let (start, end) = match (entries.first(), entries.last()) {
            (Some(first), Some(last)) => (
                u64::from(first.offset),
                u64::from(last.offset) + u64::from(last.len),
            ),
            _ => (0, 0),
        };
        let same_blob = |a: &PackEntry, b: &PackEntry| (a.offset, a.len) == (b.offset, b.len);
        if entries.windows(2).any(|w| {
            !same_blob(&w[0], &w[1])
                && u64::from(w[0].offset) + u64::from(w[0].len) > u64::from(w[1].offset)
        }) || end < start
        {
            return Err(RepoError::BadRead {
                object: name.to_owned(),
            });
        }
        let bytes = if end > start {
            self.storage().get_range(&name, start, end - start).await?
        } else {
            Bytes::new()
        };
        if bytes.len() as u64 != end - start {
            return Err(RepoError::Corrupt {
                object: name,
                reason: format!(
                    "is truncated: {} bytes at offset {start}, expected {}",
                    bytes.len(),
                    end - start
                ),
            });
        }
        Ok(RunBytes {
            object: name,
            start,
            bytes,
            keys: self.keys().cloned(),
            hasher: self.hasher().clone(),
            group: std::sync::Mutex::new(GroupCache::default()),
        })
    }
}

/// The bytes of one ranged read of a pack, and what decoding them needs.
pub struct RunBytes {
    object: String,
    start: u64,
    bytes: Bytes,
    keys: Option<Keys>,
    hasher: IdHasher,
    /// The group decoded last: its other blocks are read without decoding
    /// it again.
    group: std::sync::Mutex<GroupCache>,
}

impl RunBytes {
    /// Decrypt, decompress and verify blob `e` (one of the entries the run
    /// was fetched for), appending the block's content to `out`.
    pub fn decode_into(&self, e: &PackEntry, out: &mut Vec<u8>) -> Result<(), RepoError> {
        let at = u64::from(e.offset)
            .checked_sub(self.start)
            .map(|a| a as usize)
            .filter(|&a| a + e.len as usize <= self.bytes.len())
            .ok_or(RepoError::MissingBlock {
                id: e.id,
                context: Some("not in this read"),
            })?;
        let blob = &self.bytes[at..at + e.len as usize];
        let mut group = self
            .group
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        group
            .decode_into(blob, e, self.keys.as_ref(), &self.hasher, out)
            .map_err(|reason| RepoError::Corrupt {
                object: self.object.clone(),
                reason: format!("block {}: {reason}", e.id),
            })
    }
}
