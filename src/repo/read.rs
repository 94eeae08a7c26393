//! Reading blocks back: ranged reads of blobs from packs, then decryption,
//! decompression and verification on the blocking pool.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::index::Index;
use super::pack::decode_blob;
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
}
