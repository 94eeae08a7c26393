//! The index: block id → (pack, offset, length, raw length, compression).
//!
//! Stored as index objects under `<stanza>/index/`, each covering the packs one
//! writer finished (body: pack count u32 LE, then per pack its 16-byte id and
//! the same entry list as its pack header). In memory, one hash map keyed by
//! the id's first 64 bits (ids are uniform, so no further hashing): 32 bytes
//! of id + 20 bytes of location + hash-table overhead ≈ 60 bytes per distinct
//! block. The first location seen for an id wins, in index-object name order.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use futures::StreamExt;

pub use super::pack::PackId;
use super::pack::{decode_entries, encode_entries, read_pack_header, read_u32, PackEntry};
use super::{object::ObjectKind, RepoError, Repository, StanzaPaths};
use crate::codec::BlockId;
use crate::storage::list_all;

/// Largest index object body accepted (about 23 M entries).
pub(crate) const MAX_INDEX_BODY: u64 = 1 << 30;

/// Pass-through hasher for [`BlockId`]'s `write_u64`.
#[derive(Default)]
pub(crate) struct IdHash(u64);

impl Hasher for IdHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Packs and their entries, as index objects and pack headers list them.
pub type PackList = Vec<(PackId, Vec<PackEntry>)>;

pub(crate) type IdMap<V> = HashMap<BlockId, V, BuildHasherDefault<IdHash>>;

#[derive(Debug, Clone, Copy)]
struct Loc {
    pack: u32,
    offset: u32,
    len: u32,
    raw_len: u32,
    compression: u8,
}

/// Where a block is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLocation {
    /// The pack.
    pub pack: PackId,
    /// The entry inside it.
    pub entry: PackEntry,
}

/// All blocks of a stanza known to the readers of the index.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<PackId>,
    map: IdMap<Loc>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index::default()
    }

    /// Distinct blocks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no block is known.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Packs referenced by the index.
    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// True when the block is stored.
    pub fn contains(&self, id: &BlockId) -> bool {
        self.map.contains_key(id)
    }

    /// Where the block is stored.
    pub fn get(&self, id: &BlockId) -> Option<BlockLocation> {
        let l = self.map.get(id)?;
        Some(BlockLocation {
            pack: *self.packs.get(l.pack as usize)?,
            entry: PackEntry {
                id: *id,
                offset: l.offset,
                len: l.len,
                raw_len: l.raw_len,
                compression: l.compression,
            },
        })
    }

    /// Add a pack's entries; ids already known keep their first location.
    pub fn add_pack(&mut self, pack: PackId, entries: &[PackEntry]) {
        let n = self.packs.len() as u32;
        self.packs.push(pack);
        self.map.reserve(entries.len());
        for e in entries {
            self.map.entry(e.id).or_insert(Loc {
                pack: n,
                offset: e.offset,
                len: e.len,
                raw_len: e.raw_len,
                compression: e.compression,
            });
        }
    }

    /// Encode packs and their entries as an index object body.
    pub fn encode_object(packs: &[(PackId, Vec<PackEntry>)]) -> Vec<u8> {
        let entries: usize = packs.iter().map(|(_, e)| e.len()).sum();
        let mut out = Vec::with_capacity(4 + packs.len() * 20 + entries * super::pack::ENTRY_LEN);
        out.extend_from_slice(&(packs.len() as u32).to_le_bytes());
        for (id, e) in packs {
            out.extend_from_slice(&id.0);
            encode_entries(e, &mut out);
        }
        out
    }

    /// Decode an index object body.
    pub fn decode_object(
        body: &[u8],
        object: &str,
    ) -> Result<Vec<(PackId, Vec<PackEntry>)>, RepoError> {
        let corrupt = |reason: String| RepoError::Corrupt {
            object: object.to_owned(),
            reason,
        };
        let count = read_u32(body, 0).ok_or_else(|| corrupt("truncated pack count".into()))?;
        let mut rest = &body[4..];
        let mut out = Vec::new();
        for _ in 0..count {
            if rest.len() < 16 {
                return Err(corrupt("truncated pack id".into()));
            }
            let mut id = [0u8; 16];
            id.copy_from_slice(&rest[..16]);
            let (entries, r) = decode_entries(&rest[16..], object)?;
            out.push((PackId(id), entries));
            rest = r;
        }
        if !rest.is_empty() {
            return Err(corrupt(format!("{} trailing bytes", rest.len())));
        }
        Ok(out)
    }

    /// Load every index object of a stanza (8 at a time). Returns the index and
    /// the names of the objects it was built from.
    pub async fn load(
        repo: &Repository,
        paths: &StanzaPaths,
    ) -> Result<(Index, Vec<String>), RepoError> {
        let names: Vec<String> = list_all(repo.storage().as_ref(), &paths.index_dir())
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        let bodies: Vec<Result<Option<PackList>, RepoError>> =
            futures::stream::iter(names.iter().cloned())
                .map(|name| async move {
                    match repo
                        .read_object(ObjectKind::Index, &name, MAX_INDEX_BODY)
                        .await
                    {
                        Ok(body) => Index::decode_object(&body, &name).map(Some),
                        // replaced by a concurrent garbage collection
                        Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None),
                        Err(e) => Err(e),
                    }
                })
                .buffered(8)
                .collect()
                .await;
        let mut index = Index::new();
        let mut loaded = Vec::new();
        for (name, body) in names.into_iter().zip(bodies) {
            if let Some(packs) = body? {
                for (id, entries) in packs {
                    index.add_pack(id, &entries);
                }
                loaded.push(name);
            }
        }
        Ok((index, loaded))
    }

    /// Build an index from the pack headers alone (no index objects): the
    /// proof that packs are self-describing, and the repair path when index
    /// objects are lost or damaged.
    pub async fn rebuild_from_packs(
        repo: &Repository,
        paths: &StanzaPaths,
    ) -> Result<Index, RepoError> {
        let packs: Vec<(PackId, String)> = list_all(repo.storage().as_ref(), &paths.packs())
            .await?
            .into_iter()
            .filter_map(|o| Some((PackId::parse(o.key.rsplit('/').next()?)?, o.key)))
            .collect();
        let headers: Vec<Result<(PackId, Vec<PackEntry>), RepoError>> =
            futures::stream::iter(packs)
                .map(|(id, name)| async move {
                    read_pack_header(repo.storage().as_ref(), &name, repo.keys())
                        .await
                        .map(|e| (id, e))
                })
                .buffered(8)
                .collect()
                .await;
        let mut index = Index::new();
        for h in headers {
            let (id, entries) = h?;
            index.add_pack(id, &entries);
        }
        Ok(index)
    }

    /// Store an index object for `packs`; returns its name.
    pub async fn store_object(
        repo: &Repository,
        paths: &StanzaPaths,
        packs: &[(PackId, Vec<PackEntry>)],
    ) -> Result<String, RepoError> {
        let name = format!(
            "{}{}",
            paths.index_dir(),
            crate::codec::to_hex(&rand::random::<[u8; 16]>())
        );
        let body = Index::encode_object(packs);
        let data = repo.seal_blocking(ObjectKind::Index, &name, body).await?;
        repo.storage().put(&name, data).await?;
        Ok(name)
    }

    /// Every pack with its entries as this index knows them (first locations only).
    pub fn pack_entries(&self) -> PackList {
        let mut per: Vec<Vec<PackEntry>> = vec![Vec::new(); self.packs.len()];
        for (id, l) in &self.map {
            per[l.pack as usize].push(PackEntry {
                id: *id,
                offset: l.offset,
                len: l.len,
                raw_len: l.raw_len,
                compression: l.compression,
            });
        }
        self.packs
            .iter()
            .copied()
            .zip(per)
            .map(|(p, mut e)| {
                e.sort_by_key(|x| x.offset);
                (p, e)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_location_wins_and_round_trip() {
        let e = |b: u8, off| PackEntry {
            id: BlockId([b; 32]),
            offset: off,
            len: 1,
            raw_len: 2,
            compression: 1,
        };
        let p1 = (PackId([1; 16]), vec![e(1, 0), e(2, 10)]);
        let p2 = (PackId([2; 16]), vec![e(2, 0), e(3, 5)]);
        let body = Index::encode_object(&[p1.clone(), p2.clone()]);
        let back = Index::decode_object(&body, "i").unwrap();
        assert_eq!(back, vec![p1.clone(), p2.clone()]);
        let mut idx = Index::new();
        for (p, es) in &back {
            idx.add_pack(*p, es);
        }
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.get(&BlockId([2; 32])).unwrap().pack, PackId([1; 16]));
        assert!(!idx.contains(&BlockId([9; 32])));
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Index::decode_object(&data, "i");
        }
    }
}
