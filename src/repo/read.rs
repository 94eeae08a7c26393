//! Reading blocks back: ranged reads of blobs from packs, then decryption,
//! decompression and verification on the blocking pool.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::index::Index;
use super::pack::{decode_blob, PackEntry, PackId};
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::BlockId;

impl Repository {
    /// Read, verify and decode one block.
    pub async fn read_block(
        &self,
        paths: &StanzaPaths,
        index: &Index,
        id: &BlockId,
    ) -> Result<Bytes, RepoError> {
        let loc = index
            .get(id)
            .ok_or_else(|| RepoError::Invalid(format!("block {id} is not in the index")))?;
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
            .map_err(|e| RepoError::Invalid(format!("decode task failed: {e}")))?
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
    /// covering all of them (they must be in offset order, without overlap),
    /// then verify and decode each. Restores read runs of neighbouring blocks
    /// this way: one request per run instead of one per block, which is what
    /// makes restoring from object storage fast.
    pub async fn read_run(
        &self,
        paths: &StanzaPaths,
        pack: &PackId,
        entries: Vec<PackEntry>,
    ) -> Result<Vec<Vec<u8>>, RepoError> {
        let name = paths.pack(pack);
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(Vec::new());
        };
        let start = u64::from(first.offset);
        let end = u64::from(last.offset) + u64::from(last.len);
        if entries
            .windows(2)
            .any(|w| u64::from(w[0].offset) + u64::from(w[0].len) > u64::from(w[1].offset))
            || end < start
        {
            return Err(RepoError::Invalid(format!(
                "blocks of a read of {name} overlap or are out of order"
            )));
        }
        let range = self.storage().get_range(&name, start, end - start).await?;
        if range.len() as u64 != end - start {
            return Err(RepoError::Corrupt {
                object: name,
                reason: format!(
                    "is truncated: {} bytes at offset {start}, expected {}",
                    range.len(),
                    end - start
                ),
            });
        }
        let keys = self.keys().cloned();
        let hasher = self.hasher().clone();
        let object = name.clone();
        tokio::task::spawn_blocking(move || {
            entries
                .iter()
                .map(|e| {
                    let at = (u64::from(e.offset) - start) as usize;
                    let blob = &range[at..at + e.len as usize];
                    decode_blob(blob, e, keys.as_ref(), &hasher).map_err(|reason| {
                        RepoError::Corrupt {
                            object: object.clone(),
                            reason: format!("block {}: {reason}", e.id),
                        }
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| RepoError::Invalid(format!("decode task failed: {e}")))?
    }
}
