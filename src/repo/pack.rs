//! Packs: many block blobs in one immutable object, with a header that lists
//! them, so the index can always be rebuilt from the packs alone.
//!
//! ```text
//! blob 0 | blob 1 | ... | header (object envelope, kind PackHeader) | header length (u32 LE) | "WVPK"
//! ```
//! Header body: entry count (u32 LE), then per entry 45 bytes: block id (32),
//! offset (u32 LE), stored length (u32 LE), raw length (u32 LE), compression (u8).
//!
//! A blob is the block compressed, then (encrypted repositories) sealed with
//! AES-256-GCM with associated data "block" || id — a blob served for another
//! id fails authentication. In unencrypted repositories the SHA-256 of the
//! decompressed block must equal its id.

use std::fmt;

use bytes::Bytes;

use super::object::{self, ObjectKind};
use super::RepoError;
use crate::codec::{to_hex, BlockId, Compression, IdHasher, Keys};
use crate::storage::Storage;

const TRAILER_MAGIC: &[u8; 4] = b"WVPK";
const TRAILER_LEN: u64 = 8;
pub(crate) const ENTRY_LEN: usize = 45;

/// A pack's random 128-bit name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A fresh random id.
    pub fn random() -> PackId {
        PackId(rand::random())
    }

    /// Parse the hex form.
    pub fn parse(s: &str) -> Option<PackId> {
        let v = crate::codec::from_hex(s)?;
        Some(PackId(v.try_into().ok()?))
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

/// Where one block sits inside its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The block.
    pub id: BlockId,
    /// Offset of its blob from the start of the pack.
    pub offset: u32,
    /// Stored length of the blob.
    pub len: u32,
    /// Length of the block itself.
    pub raw_len: u32,
    /// Compression id (see [`Compression::id`]).
    pub compression: u8,
}

pub(crate) fn encode_entries(entries: &[PackEntry], out: &mut Vec<u8>) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.push(e.compression);
    }
}

/// Parse `count, entries...` from the front of `body`; returns the rest.
pub(crate) fn decode_entries<'a>(
    body: &'a [u8],
    object: &str,
) -> Result<(Vec<PackEntry>, &'a [u8]), RepoError> {
    let corrupt = |reason: String| RepoError::Corrupt {
        object: object.to_owned(),
        reason,
    };
    let count = read_u32(body, 0).ok_or_else(|| corrupt("truncated entry count".into()))? as usize;
    let need = count
        .checked_mul(ENTRY_LEN)
        .and_then(|n| n.checked_add(4))
        .filter(|&n| n <= body.len())
        .ok_or_else(|| {
            corrupt(format!(
                "{count} entries do not fit in {} bytes",
                body.len()
            ))
        })?;
    let mut entries = Vec::with_capacity(count);
    for rec in body[4..need].chunks_exact(ENTRY_LEN) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&rec[..32]);
        let compression = rec[44];
        if Compression::from_id(compression).is_none() {
            return Err(corrupt(format!("unknown compression {compression}")));
        }
        entries.push(PackEntry {
            id: BlockId(id),
            offset: read_u32(rec, 32).unwrap_or(0),
            len: read_u32(rec, 36).unwrap_or(0),
            raw_len: read_u32(rec, 40).unwrap_or(0),
            compression,
        });
    }
    Ok((entries, &body[need..]))
}

pub(crate) fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Compress (and encrypt) one block into its blob.
pub fn encode_blob(
    data: &[u8],
    id: &BlockId,
    compression: Compression,
    keys: Option<&Keys>,
) -> (Vec<u8>, Compression) {
    let (used, compressed) = compression.compress(data);
    match keys {
        Some(k) => (k.seal(&blob_aad(id), &compressed), used),
        None => (compressed, used),
    }
}

/// Decrypt, decompress and verify one blob.
pub fn decode_blob(
    blob: &[u8],
    loc: &PackEntry,
    keys: Option<&Keys>,
    hasher: &IdHasher,
) -> Result<Vec<u8>, String> {
    let compressed = match keys {
        Some(k) => k
            .open(&blob_aad(&loc.id), blob)
            .map_err(|e| e.to_string())?,
        None => blob.to_vec(),
    };
    let compression = Compression::from_id(loc.compression).ok_or("unknown compression")?;
    let data = compression.decompress(&compressed, loc.raw_len as usize)?;
    // Encrypted blobs are authenticated; plain ones are checked by content.
    if keys.is_none() && hasher.id(&data) != loc.id {
        return Err("content does not match its block id".into());
    }
    Ok(data)
}

fn blob_aad(id: &BlockId) -> [u8; 37] {
    let mut a = [0u8; 37];
    a[..5].copy_from_slice(b"block");
    a[5..].copy_from_slice(&id.0);
    a
}

/// A pack being filled.
#[derive(Debug)]
pub(crate) struct PackBuilder {
    pub id: PackId,
    data: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new(capacity: usize) -> PackBuilder {
        PackBuilder {
            id: PackId::random(),
            data: Vec::with_capacity(capacity),
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn push(&mut self, id: BlockId, blob: &[u8], raw_len: usize, compression: Compression) {
        self.entries.push(PackEntry {
            id,
            offset: self.data.len() as u32,
            len: blob.len() as u32,
            raw_len: raw_len as u32,
            compression: compression.id(),
        });
        self.data.extend_from_slice(blob);
    }

    /// The finished pack object for storage under `name`.
    pub fn finish(mut self, name: &str, keys: Option<&Keys>) -> (PackId, Bytes, Vec<PackEntry>) {
        let mut body = Vec::with_capacity(4 + self.entries.len() * ENTRY_LEN);
        encode_entries(&self.entries, &mut body);
        let header = object::seal(ObjectKind::PackHeader, name, &body, Compression::None, keys);
        self.data.extend_from_slice(&header);
        self.data
            .extend_from_slice(&(header.len() as u32).to_le_bytes());
        self.data.extend_from_slice(TRAILER_MAGIC);
        (self.id, Bytes::from(self.data), self.entries)
    }
}

/// Read a pack's header with two ranged reads (trailer, then header) and check
/// that every entry lies inside the blob area.
pub async fn read_pack_header(
    storage: &dyn Storage,
    name: &str,
    keys: Option<&Keys>,
) -> Result<Vec<PackEntry>, RepoError> {
    let corrupt = |reason: String| RepoError::Corrupt {
        object: name.to_owned(),
        reason,
    };
    let size = storage
        .head(name)
        .await?
        .ok_or_else(|| crate::storage::StorageError::NotFound {
            location: storage.location(),
            key: name.to_owned(),
        })?
        .size;
    if size < TRAILER_LEN {
        return Err(corrupt(format!("truncated: {size} bytes")));
    }
    let trailer = storage
        .get_range(name, size - TRAILER_LEN, TRAILER_LEN)
        .await?;
    if trailer.len() as u64 != TRAILER_LEN || &trailer[4..] != TRAILER_MAGIC {
        return Err(corrupt("no pack trailer (truncated or not a pack)".into()));
    }
    let header_len = u64::from(read_u32(&trailer, 0).unwrap_or(0));
    let blobs_end = size.checked_sub(TRAILER_LEN + header_len).ok_or_else(|| {
        corrupt(format!(
            "header length {header_len} exceeds the pack size {size}"
        ))
    })?;
    let header = storage.get_range(name, blobs_end, header_len).await?;
    let body = object::open(ObjectKind::PackHeader, name, &header, keys, 1 << 30)?;
    let (entries, rest) = decode_entries(&body, name)?;
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes after the header entries".into()));
    }
    for e in &entries {
        if u64::from(e.offset) + u64::from(e.len) > blobs_end {
            return Err(corrupt(format!(
                "entry for block {} points past the blobs",
                e.id
            )));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn entries_round_trip(n in 0usize..50, seed: u8) {
            let entries: Vec<PackEntry> = (0..n).map(|i| PackEntry {
                id: BlockId([seed.wrapping_add(i as u8); 32]), offset: i as u32 * 7, len: 3, raw_len: 9, compression: (i % 3) as u8,
            }).collect();
            let mut buf = Vec::new();
            encode_entries(&entries, &mut buf);
            buf.extend_from_slice(b"rest");
            let (back, rest) = decode_entries(&buf, "p").unwrap();
            prop_assert_eq!(back, entries);
            prop_assert_eq!(rest, b"rest");
        }

        #[test]
        fn random_entries_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_entries(&data, "p");
        }
    }
}
