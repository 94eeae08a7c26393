//! The ids a writing session has stored so far, in 32 bytes per id.
//!
//! A hash set of ids cost 38 to 75 bytes per id and doubled its table at
//! powers of two: 207 MB at the peak of a 15 GB first backup (heaptrack),
//! with both tables alive during the resize. Here ids are split into 256
//! shards by their sixteenth byte (ids are uniform; the first eight are the
//! buffers' hash; a 128-bit id's bytes past the sixteenth are zero, and
//! sharding by the last byte put every id of such a repository in one
//! shard: a first backup of 15 GB took 90 s instead of 30, merging one
//! array of 2 million ids); each shard keeps a sorted
//! array of ids and a small unsorted buffer of the newest, merged into the
//! array when it fills. Memory is 32 bytes per id plus 256 buffers, and a
//! merge copies one shard (1/256 of the ids) at a time.

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Mutex;

use super::index::IdHash;
use crate::codec::BlockId;

/// The byte of an id that picks its shard: the last of a 128-bit id.
const SHARD_BYTE: usize = 15;

/// Ids buffered in a shard before they are merged into its sorted array.
const BUFFERED: usize = 512;

#[derive(Default)]
struct Shard {
    sorted: Vec<BlockId>,
    recent: HashSet<BlockId, BuildHasherDefault<IdHash>>,
}

impl Shard {
    fn insert(&mut self, id: BlockId) -> bool {
        if self.sorted.binary_search_by(|s| s.0.cmp(&id.0)).is_ok() || !self.recent.insert(id) {
            return false;
        }
        if self.recent.len() >= BUFFERED {
            self.merge();
        }
        true
    }

    /// Merge the buffer into the sorted array (exactly sized).
    fn merge(&mut self) {
        let mut recent: Vec<BlockId> = self.recent.drain().collect();
        recent.sort_unstable_by_key(|a| a.0);
        let mut merged = Vec::with_capacity(self.sorted.len() + recent.len());
        let (mut a, mut b) = (self.sorted.iter().peekable(), recent.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.0 <= y.0 => a.next(),
                (Some(_), Some(_)) | (None, Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, None) => break,
            };
            merged.extend(next.copied());
        }
        self.sorted = merged;
    }
}

/// A set of block ids for many threads; see the module documentation.
pub(crate) struct FreshSet {
    shards: Vec<Mutex<Shard>>,
}

impl Default for FreshSet {
    fn default() -> Self {
        FreshSet {
            shards: (0..256).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }
}

impl FreshSet {
    /// Add `id`; true when it was not there before.
    pub fn insert(&self, id: BlockId) -> bool {
        let shard = &self.shards[usize::from(id.0[SHARD_BYTE])];
        shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Inserts answer as a hash set's do, across merges and with ids
        /// crowded into one shard.
        #[test]
        fn agrees_with_a_set(ids in proptest::collection::vec((0u8..3, any::<u16>()), 0..4000)) {
            let set = FreshSet::default();
            let mut want = std::collections::HashSet::new();
            for (first, rest) in ids {
                let mut b = [0u8; 32];
                b[SHARD_BYTE] = first;
                b[..2].copy_from_slice(&rest.to_le_bytes());
                let id = BlockId(b);
                prop_assert_eq!(set.insert(id), want.insert(id));
            }
            for s in &set.shards {
                let s = s.lock().unwrap();
                prop_assert!(s.sorted.windows(2).all(|w| w[0].0 < w[1].0));
            }
        }
    }

    /// 128-bit ids (16 zero bytes after them) spread over every shard as
    /// 256-bit ones do.
    #[test]
    fn short_ids_spread_over_the_shards() {
        for name in ["blake3-128", "blake3"] {
            let hasher = crate::codec::IdHasher::named(name, None).unwrap();
            let set = FreshSet::default();
            for i in 0..25_600u32 {
                assert!(set.insert(hasher.id(&i.to_le_bytes())));
            }
            let most = set
                .shards
                .iter()
                .map(|s| {
                    let s = s.lock().unwrap();
                    s.sorted.len() + s.recent.len()
                })
                .max()
                .unwrap();
            // 100 per shard on average
            assert!(most < 200, "{name}: {most} ids in one shard");
        }
    }
}
