//! Packs: many block blobs in one immutable object, with a header that lists
//! them, so the index can always be rebuilt from the packs alone.
//!
//! ```text
//! blob 0 | blob 1 | ... | header (object envelope, kind PackHeader) | header length (u32 LE) | "WVPK"
//! ```
//! Header body: an entry list ([`EntryFormat`]). Config versions 1 to 3:
//! entry count (u32 LE), then per entry 45 bytes: block id (32), offset
//! (u32 LE), stored length (u32 LE), raw length (u32 LE), compression (u8).
//! Version 4: the entries of each blob together, as runs of 128-bit ids
//! (docs/repository-format.md, "Entry lists").
//!
//! A blob is the block compressed, then (encrypted repositories) sealed with
//! AES-256-GCM with associated data "block" || id — a blob served for another
//! id fails authentication. In unencrypted repositories the blob ends with
//! CRC-32C(id || compressed bytes) (4 bytes LE), marked by bit 7 of the
//! entry's compression byte ([`BLOB_CRC`]): a changed byte or a blob served
//! for another id fails the check at a fraction of the cost of hashing the
//! block again. Blobs written before the checksum existed (bit 7 clear) are
//! verified by recomputing the SHA-256 id of the decompressed block.
//!
//! A *group* blob (bit 6 of the compression byte, [`BLOB_GROUP`]; written
//! to repositories of config version 3) holds up to 16 consecutive new
//! blocks compressed together, which gives LZ4 the context one 8 KiB block
//! lacks (docs/compression-groups-study.md). Every block of the group has its
//! own entry; they share the group's offset and stored length. The group's
//! plaintext is a table, then the compressed concatenation of its blocks:
//!
//! ```text
//! count (u8) | count × (first 8 bytes of the block id, raw length u32 LE) | compressed blocks
//! ```
//! sealed with AES-256-GCM and associated data "group", or followed by
//! CRC-32C("group" || plaintext). A reader finds its block by the id prefix
//! in the authenticated table (prefixes are unique within a group), so a
//! group served for a block it does not hold fails as a single blob does.

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use std::fmt;

use bytes::Bytes;

use super::object::{self, ObjectKind};
use super::RepoError;
use crate::codec::{to_hex, BlockId, Compression, CryptoError, DecompressError, IdHasher, Keys};
use crate::reader::ByteReader;
use crate::storage::Storage;

const TRAILER_MAGIC: &[u8; 4] = b"WVPK";
const TRAILER_LEN: u64 = 8;
pub(crate) const ENTRY_LEN: usize = 45;
/// Bit of an entry's compression byte: the blob ends with CRC-32C(id || rest).
pub const BLOB_CRC: u8 = 0x80;
/// Bit of an entry's compression byte: the blob is a group of blocks.
pub const BLOB_GROUP: u8 = 0x40;
const CRC_LEN: usize = 4;
/// Bytes per block in a group's table.
const GROUP_SLOT: usize = 12;
/// Largest decompressed group accepted when reading.
const MAX_GROUP_RAW: usize = 1 << 30;

/// The compression algorithm of an entry's compression byte.
pub(crate) fn algorithm(byte: u8) -> Option<Compression> {
    Compression::from_id(byte & !(BLOB_CRC | BLOB_GROUP))
}

/// Why a blob does not give back its block. The caller names the pack and
/// the block.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// An encrypted blob fails authentication (changed, or not this block's).
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    /// A checksummed blob too short to hold its checksum.
    #[error("blob of {len} bytes is shorter than its checksum")]
    ShorterThanChecksum {
        /// The blob's length.
        len: usize,
    },
    /// A checksummed blob whose CRC does not match.
    #[error("checksum mismatch (the blob was changed, or is not this block's)")]
    ChecksumMismatch,
    /// A compression byte walvault does not know.
    #[error("unknown compression {0}")]
    UnknownCompression(u8),
    /// The compressed bytes do not decompress to the block's length.
    #[error(transparent)]
    Decompress(#[from] DecompressError),
    /// A legacy blob whose content hashes to another id.
    #[error("content does not match its block id")]
    WrongContent,
    /// A group whose table is cut short or inconsistent.
    #[error("group table damaged: {0}")]
    BadGroup(&'static str),
    /// A group that does not hold the block its entry places there.
    #[error("the group does not hold this block (the index points at another group)")]
    NotInGroup,
}

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

/// How a pack header or an index object lists its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryFormat {
    /// Config versions 1 to 3: 45 bytes per block (id of 32 bytes,
    /// offset, stored length, raw length, compression).
    Wide,
    /// Config version 4: by blob, 18 bytes a run then 16 bytes per block
    /// (128-bit ids; decision 040).
    Runs,
}

impl EntryFormat {
    /// The format of a repository's config.
    pub fn of(config: &super::RepoConfig) -> EntryFormat {
        if config.compact() {
            EntryFormat::Runs
        } else {
            EntryFormat::Wide
        }
    }
}

/// Bytes of a 128-bit block id.
const SHORT_ID: usize = 16;
/// Bytes of a run before its ids: offset, stored length, compression,
/// count, raw length, last raw length.
const RUN_HEAD: usize = 4 + 4 + 1 + 1 + 4 + 4;

/// Entries as runs: consecutive entries of one blob, all but the last of
/// one raw length, at most 255.
fn runs(entries: &[PackEntry]) -> impl Iterator<Item = &[PackEntry]> {
    let mut rest = entries;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let mut n = 1;
        while let Some(e) = rest.get(n) {
            let prev = rest.get(n - 1).map_or(first.raw_len, |p| p.raw_len);
            if n == 255
                || (e.offset, e.len, e.compression) != (first.offset, first.len, first.compression)
                || prev != first.raw_len
            {
                break;
            }
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

pub(crate) fn encode_entries(entries: &[PackEntry], format: EntryFormat, out: &mut Vec<u8>) {
    match format {
        EntryFormat::Wide => {
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for e in entries {
                out.extend_from_slice(&e.id.0);
                out.extend_from_slice(&e.offset.to_le_bytes());
                out.extend_from_slice(&e.len.to_le_bytes());
                out.extend_from_slice(&e.raw_len.to_le_bytes());
                out.push(e.compression);
            }
        }
        EntryFormat::Runs => {
            let count_at = out.len();
            out.extend_from_slice(&0u32.to_le_bytes());
            let mut count = 0u32;
            for run in runs(entries) {
                let (Some(first), Some(last)) = (run.first(), run.last()) else {
                    continue;
                };
                count += 1;
                out.extend_from_slice(&first.offset.to_le_bytes());
                out.extend_from_slice(&first.len.to_le_bytes());
                out.push(first.compression);
                out.push(run.len() as u8);
                out.extend_from_slice(&first.raw_len.to_le_bytes());
                out.extend_from_slice(&last.raw_len.to_le_bytes());
                for e in run {
                    let (id, cut) = e.id.0.split_at(SHORT_ID);
                    debug_assert!(
                        cut.iter().all(|&b| b == 0),
                        "a 256-bit id in a 128-bit list"
                    );
                    out.extend_from_slice(id);
                }
            }
            if let Some(c) = out.get_mut(count_at..count_at + 4) {
                c.copy_from_slice(&count.to_le_bytes());
            }
        }
    }
}

/// Parse an entry list in `format` from the front of `body`; returns the
/// rest.
pub(crate) fn decode_entries<'a>(
    body: &'a [u8],
    format: EntryFormat,
    object: &str,
) -> Result<(Vec<PackEntry>, &'a [u8]), RepoError> {
    let corrupt = |reason: String| RepoError::Corrupt {
        object: object.to_owned(),
        reason,
    };
    let cut = |t: crate::reader::Truncated| corrupt(format!("pack entries are cut short: {t}"));
    let mut r = ByteReader::new(body);
    let count = r
        .u32_le()
        .map_err(|t| corrupt(format!("truncated entry count: {t}")))? as usize;
    let least = match format {
        EntryFormat::Wide => ENTRY_LEN,
        EntryFormat::Runs => RUN_HEAD + SHORT_ID,
    };
    if count.checked_mul(least).is_none_or(|n| n > r.remaining()) {
        return Err(corrupt(format!(
            "{count} entries do not fit in {} bytes",
            body.len()
        )));
    }
    let check = |compression: u8, at: usize| {
        if algorithm(compression).is_none() {
            return Err(corrupt(format!(
                "unknown compression {compression} in the entry at byte {at}"
            )));
        }
        Ok(())
    };
    let mut entries = Vec::with_capacity(count);
    match format {
        EntryFormat::Wide => {
            for _ in 0..count {
                let at = r.position();
                let id = r.array::<32>().map_err(cut)?;
                let offset = r.u32_le().map_err(cut)?;
                let len = r.u32_le().map_err(cut)?;
                let raw_len = r.u32_le().map_err(cut)?;
                let compression = r.u8().map_err(cut)?;
                check(compression, at)?;
                entries.push(PackEntry {
                    id: BlockId(id),
                    offset,
                    len,
                    raw_len,
                    compression,
                });
            }
        }
        EntryFormat::Runs => {
            for _ in 0..count {
                let at = r.position();
                let offset = r.u32_le().map_err(cut)?;
                let len = r.u32_le().map_err(cut)?;
                let compression = r.u8().map_err(cut)?;
                let n = usize::from(r.u8().map_err(cut)?);
                let raw_len = r.u32_le().map_err(cut)?;
                let last_raw = r.u32_le().map_err(cut)?;
                check(compression, at)?;
                if n == 0 {
                    return Err(corrupt(format!("a run of no blocks at byte {at}")));
                }
                for i in 0..n {
                    let mut id = [0u8; 32];
                    if let Some(d) = id.get_mut(..SHORT_ID) {
                        d.copy_from_slice(r.bytes(SHORT_ID).map_err(cut)?);
                    }
                    entries.push(PackEntry {
                        id: BlockId(id),
                        offset,
                        len,
                        raw_len: if i + 1 == n { last_raw } else { raw_len },
                        compression,
                    });
                }
            }
        }
    }
    Ok((entries, r.rest()))
}

pub(crate) fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let mut r = ByteReader::new(b.get(at..)?);
    r.u32_le().ok()
}

/// Compress (and encrypt, or checksum) one block into its blob. Returns the
/// blob and its entry's compression byte.
pub fn encode_blob(
    data: &[u8],
    id: &BlockId,
    compression: Compression,
    keys: Option<&Keys>,
) -> (Vec<u8>, u8) {
    let (used, mut compressed) = compression.compress(data);
    match keys {
        Some(k) => (k.seal(&blob_aad(id), &compressed), used.id()),
        None => {
            let crc = blob_crc(id, &compressed);
            compressed.extend_from_slice(&crc.to_le_bytes());
            (compressed, used.id() | BLOB_CRC)
        }
    }
}

fn blob_crc(id: &BlockId, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&id.0), body)
}

const GROUP_AAD: &[u8] = b"group";

/// Compress (and encrypt, or checksum) consecutive blocks together into one
/// group blob. Returns the blob and the compression byte of each of its
/// blocks' entries. One block is stored as a single blob ([`encode_blob`]).
/// The caller keeps the 8-byte id prefixes of a group distinct
/// ([`group_prefix`]) and at most 255 blocks in it.
pub fn encode_group(
    blocks: &[(BlockId, &[u8])],
    compression: Compression,
    keys: Option<&Keys>,
) -> (Vec<u8>, u8) {
    if let [(id, data)] = blocks {
        return encode_blob(data, id, compression, keys);
    }
    let raw: usize = blocks.iter().map(|(_, d)| d.len()).sum();
    let mut joined = Vec::with_capacity(raw);
    for (_, d) in blocks {
        joined.extend_from_slice(d);
    }
    let (used, compressed) = compression.compress(&joined);
    let mut plain = Vec::with_capacity(1 + blocks.len() * GROUP_SLOT + compressed.len() + CRC_LEN);
    plain.push(blocks.len() as u8);
    for (id, d) in blocks {
        plain.extend_from_slice(&group_prefix(id));
        plain.extend_from_slice(&(d.len() as u32).to_le_bytes());
    }
    plain.extend_from_slice(&compressed);
    match keys {
        Some(k) => (k.seal(GROUP_AAD, &plain), used.id() | BLOB_GROUP),
        None => {
            let crc = crc32c::crc32c_append(crc32c::crc32c(GROUP_AAD), &plain);
            plain.extend_from_slice(&crc.to_le_bytes());
            (plain, used.id() | BLOB_GROUP | BLOB_CRC)
        }
    }
}

/// The part of a block id a group's table keeps.
pub fn group_prefix(id: &BlockId) -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(id.0.get(..8).unwrap_or(&[0; 8]));
    p
}

/// The decoded group blob last read, so the blocks of one group cost one
/// decryption and one decompression between them. Valid for one pack.
#[derive(Debug, Default)]
pub struct GroupCache {
    /// (offset, stored length) of the group held.
    at: Option<(u32, u32)>,
    /// Per block: id prefix, start and length in `data`.
    slots: Vec<([u8; 8], usize, usize)>,
    data: Vec<u8>,
}

impl GroupCache {
    /// Append the content of `loc`'s block, whose blob (a single one or its
    /// group) is `blob`, to `out` (left as it was on error).
    pub fn decode_into(
        &mut self,
        blob: &[u8],
        loc: &PackEntry,
        keys: Option<&Keys>,
        hasher: &IdHasher,
        out: &mut Vec<u8>,
    ) -> Result<(), BlobError> {
        if loc.compression & BLOB_GROUP == 0 {
            return decode_blob_into(blob, loc, keys, hasher, out);
        }
        if self.at != Some((loc.offset, loc.len)) {
            self.at = None;
            self.load(blob, loc.compression, keys)?;
            self.at = Some((loc.offset, loc.len));
        }
        let want = group_prefix(&loc.id);
        let (_, start, len) = self
            .slots
            .iter()
            .find(|(p, _, _)| *p == want)
            .ok_or(BlobError::NotInGroup)?;
        if *len != loc.raw_len as usize {
            return Err(BlobError::BadGroup(
                "a block's length differs from its entry's",
            ));
        }
        out.extend_from_slice(self.data.get(*start..start + len).unwrap_or_default());
        Ok(())
    }

    /// Open (or check), parse and decompress a group blob.
    fn load(&mut self, blob: &[u8], byte: u8, keys: Option<&Keys>) -> Result<(), BlobError> {
        let opened;
        let plain = match keys {
            Some(k) => {
                opened = k.open(GROUP_AAD, blob)?;
                opened.as_slice()
            }
            None => {
                let (body, crc) = blob
                    .split_last_chunk::<CRC_LEN>()
                    .ok_or(BlobError::ShorterThanChecksum { len: blob.len() })?;
                if byte & BLOB_CRC == 0
                    || crc32c::crc32c_append(crc32c::crc32c(GROUP_AAD), body)
                        != u32::from_le_bytes(*crc)
                {
                    return Err(BlobError::ChecksumMismatch);
                }
                body
            }
        };
        let mut r = ByteReader::new(plain);
        let count = r.u8().map_err(|_| BlobError::BadGroup("no block count"))? as usize;
        self.slots.clear();
        let mut total = 0usize;
        for _ in 0..count {
            let prefix = r
                .array::<8>()
                .map_err(|_| BlobError::BadGroup("the table is cut short"))?;
            let len = r
                .u32_le()
                .map_err(|_| BlobError::BadGroup("the table is cut short"))?
                as usize;
            if self.slots.iter().any(|(p, _, _)| *p == prefix) {
                return Err(BlobError::BadGroup("two blocks with one id prefix"));
            }
            self.slots.push((prefix, total, len));
            total = total
                .checked_add(len)
                .filter(|&t| t <= MAX_GROUP_RAW)
                .ok_or(BlobError::BadGroup("blocks longer than a group can be"))?;
        }
        let compression = algorithm(byte).ok_or(BlobError::UnknownCompression(byte))?;
        self.data.clear();
        compression.decompress_into(r.rest(), total, &mut self.data)?;
        Ok(())
    }
}

/// Decrypt (or check), decompress and verify one blob.
pub fn decode_blob(
    blob: &[u8],
    loc: &PackEntry,
    keys: Option<&Keys>,
    hasher: &IdHasher,
) -> Result<Vec<u8>, BlobError> {
    let mut out = Vec::new();
    decode_blob_into(blob, loc, keys, hasher, &mut out)?;
    Ok(out)
}

/// [`decode_blob`], appending the block's content to `out` (left as it was
/// on error).
pub fn decode_blob_into(
    blob: &[u8],
    loc: &PackEntry,
    keys: Option<&Keys>,
    hasher: &IdHasher,
    out: &mut Vec<u8>,
) -> Result<(), BlobError> {
    if loc.compression & BLOB_GROUP != 0 {
        return GroupCache::default().decode_into(blob, loc, keys, hasher, out);
    }
    let opened;
    let checked = loc.compression & BLOB_CRC != 0;
    let compressed = match keys {
        Some(k) => {
            opened = k.open(&blob_aad(&loc.id), blob)?;
            opened.as_slice()
        }
        None if checked => {
            let (body, crc) = blob
                .split_last_chunk::<CRC_LEN>()
                .ok_or(BlobError::ShorterThanChecksum { len: blob.len() })?;
            if blob_crc(&loc.id, body) != u32::from_le_bytes(*crc) {
                return Err(BlobError::ChecksumMismatch);
            }
            body
        }
        None => blob,
    };
    let compression =
        algorithm(loc.compression).ok_or(BlobError::UnknownCompression(loc.compression))?;
    let start = out.len();
    compression.decompress_into(compressed, loc.raw_len as usize, out)?;
    // Encrypted blobs are authenticated and checksummed ones checked;
    // older plain ones are verified by content.
    if keys.is_none() && !checked && hasher.id(out.get(start..).unwrap_or_default()) != loc.id {
        out.truncate(start);
        return Err(BlobError::WrongContent);
    }
    Ok(())
}

fn blob_aad(id: &BlockId) -> [u8; 37] {
    let mut a = [0u8; 37];
    for (d, s) in a.iter_mut().zip(b"block".iter().chain(&id.0)) {
        *d = *s;
    }
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

    /// Append a blob made by [`encode_blob`] or [`encode_group`]
    /// (`compression`: its byte) holding the blocks `ids` with their raw
    /// lengths.
    pub fn push(&mut self, blocks: &[(BlockId, usize)], blob: &[u8], compression: u8) {
        let offset = self.data.len() as u32;
        for (id, raw_len) in blocks {
            self.entries.push(PackEntry {
                id: *id,
                offset,
                len: blob.len() as u32,
                raw_len: *raw_len as u32,
                compression,
            });
        }
        self.data.extend_from_slice(blob);
    }

    /// The finished pack object for storage under `name`.
    pub fn finish(
        mut self,
        name: &str,
        keys: Option<&Keys>,
        format: EntryFormat,
    ) -> (PackId, Bytes, Vec<PackEntry>) {
        let mut body = Vec::with_capacity(4 + self.entries.len() * ENTRY_LEN);
        encode_entries(&self.entries, format, &mut body);
        let header = object::seal(ObjectKind::PackHeader, name, &body, Compression::None, keys);
        // exactly: a pack of well-compressed groups lists so many blocks
        // that its header outgrows the spare room, and doubling a 36 MiB
        // buffer for it held 72 MiB per pack
        self.data.reserve_exact(header.len() + TRAILER_LEN as usize);
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
    format: EntryFormat,
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
    let mut r = ByteReader::new(&trailer);
    let (Ok(header_len), Ok(magic), true) = (r.u32_le(), r.array::<4>(), r.is_empty()) else {
        return Err(corrupt("no pack trailer (truncated or not a pack)".into()));
    };
    if &magic != TRAILER_MAGIC {
        return Err(corrupt("no pack trailer (truncated or not a pack)".into()));
    }
    let header_len = u64::from(header_len);
    let blobs_end = size.checked_sub(TRAILER_LEN + header_len).ok_or_else(|| {
        corrupt(format!(
            "header length {header_len} exceeds the pack size {size}"
        ))
    })?;
    let header = storage.get_range(name, blobs_end, header_len).await?;
    let body = object::open(ObjectKind::PackHeader, name, &header, keys, 1 << 30)?;
    let (entries, rest) = decode_entries(&body, format, name)?;
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
#[allow(clippy::indexing_slicing)]
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
            encode_entries(&entries, EntryFormat::Wide, &mut buf);
            buf.extend_from_slice(b"rest");
            let (back, rest) = decode_entries(&buf, EntryFormat::Wide, "p").unwrap();
            prop_assert_eq!(back, entries);
            prop_assert_eq!(rest, b"rest");
        }

        /// Version 4's runs give back every entry of groups, single blobs,
        /// short blocks anywhere and groups longer than a run.
        #[test]
        fn runs_round_trip(sizes in proptest::collection::vec((1usize..300, any::<bool>()), 0..20), seed: u8) {
            let mut entries = Vec::new();
            let mut offset = 0u32;
            for (b, (n, short_inside)) in sizes.iter().enumerate() {
                for i in 0..*n {
                    let mut id = [0u8; 32];
                    id[..16].fill(seed ^ (b as u8));
                    id[..4].copy_from_slice(&(i as u32).to_le_bytes());
                    let raw_len = if i + 1 == *n || (*short_inside && i % 5 == 3) { 100 + i as u32 } else { 8192 };
                    entries.push(PackEntry {
                        id: BlockId(id), offset, len: 40, raw_len,
                        compression: if *n > 1 { 2 | BLOB_GROUP | BLOB_CRC } else { 1 | BLOB_CRC },
                    });
                }
                offset += 40;
            }
            let mut buf = Vec::new();
            encode_entries(&entries, EntryFormat::Runs, &mut buf);
            let blocks: usize = sizes.iter().map(|(n, _)| n).sum();
            prop_assert!(buf.len() <= 4 + blocks * (16 + RUN_HEAD), "{} bytes", buf.len());
            buf.extend_from_slice(b"rest");
            let (back, rest) = decode_entries(&buf, EntryFormat::Runs, "p").unwrap();
            prop_assert_eq!(back, entries);
            prop_assert_eq!(rest, b"rest");
        }

        /// Every changed byte of a checksummed blob, and the blob read for
        /// another id, fail before anything is returned.
        #[test]
        fn checksummed_blobs_refuse_changes(seed: u8, at in 0usize..10_000, bit in 0u8..8) {
            let data: Vec<u8> = (0..8192u32).map(|i| (i / 64) as u8 ^ seed).collect();
            let hasher = IdHasher::new(None);
            let id = hasher.id(&data);
            let (blob, byte) = encode_blob(&data, &id, Compression::Lz4, None);
            prop_assert_eq!(byte & BLOB_CRC, BLOB_CRC);
            let entry = PackEntry { id, offset: 0, len: blob.len() as u32, raw_len: 8192, compression: byte };
            prop_assert_eq!(decode_blob(&blob, &entry, None, &hasher).unwrap(), data);
            let mut bad = blob.clone();
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
            prop_assert!(decode_blob(&bad, &entry, None, &hasher).is_err());
            let other = PackEntry { id: BlockId([seed; 32]), ..entry };
            prop_assert!(decode_blob(&blob, &other, None, &hasher).is_err());
        }

        #[test]
        fn random_entries_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_entries(&data, EntryFormat::Wide, "p");
            let _ = decode_entries(&data, EntryFormat::Runs, "p");
        }
    }

    fn group_blocks(seed: u8, n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|b| {
                (0..8192u32 - if b == n - 1 { 100 } else { 0 })
                    .map(|i| ((i / 32) as u8) ^ seed ^ b as u8)
                    .collect()
            })
            .collect()
    }

    proptest! {
        /// Every block of a group comes back, plain or encrypted, whatever
        /// order it is read in; any changed byte of the group, and the
        /// group read for a block it does not hold, fail.
        #[test]
        fn groups_round_trip_and_refuse_changes(
            seed: u8, n in 2usize..17, at in 0usize..100_000, bit in 0u8..8, encrypted: bool,
        ) {
            let keys = encrypted.then(|| Keys::derive(&crate::codec::MasterKey([seed; 32]), b"r"));
            let hasher = IdHasher::new(keys.as_ref());
            let data = group_blocks(seed, n);
            let blocks: Vec<(BlockId, &[u8])> = data.iter().map(|d| (hasher.id(d), d.as_slice())).collect();
            let (blob, byte) = encode_group(&blocks, Compression::Lz4, keys.as_ref());
            prop_assert_eq!(byte & BLOB_GROUP, BLOB_GROUP);
            prop_assert!(blob.len() < 8192 * n / 4, "{} bytes", blob.len());
            let entry = |i: usize| PackEntry {
                id: blocks[i].0, offset: 64, len: blob.len() as u32, raw_len: data[i].len() as u32, compression: byte,
            };
            let mut cache = GroupCache::default();
            for i in (0..n).rev() {
                let mut out = vec![1, 2];
                cache.decode_into(&blob, &entry(i), keys.as_ref(), &hasher, &mut out).unwrap();
                prop_assert_eq!(&out[2..], data[i].as_slice());
                prop_assert_eq!(decode_blob(&blob, &entry(i), keys.as_ref(), &hasher).unwrap(), data[i].clone());
            }
            let mut bad = blob.clone();
            let at = at % bad.len();
            bad[at] ^= 1 << bit;
            prop_assert!(decode_blob(&bad, &entry(0), keys.as_ref(), &hasher).is_err());
            let stranger = PackEntry { id: hasher.id(b"another block"), ..entry(0) };
            let err = decode_blob(&blob, &stranger, keys.as_ref(), &hasher).unwrap_err();
            prop_assert!(matches!(err, BlobError::NotInGroup), "{}", err);
            let short = PackEntry { raw_len: 5, ..entry(0) };
            prop_assert!(decode_blob(&blob, &short, keys.as_ref(), &hasher).is_err());
            // a group is not a single blob, nor the reverse
            let single = PackEntry { compression: byte & !BLOB_GROUP, ..entry(0) };
            prop_assert!(decode_blob(&blob, &single, keys.as_ref(), &hasher).is_err());
        }

        #[test]
        fn random_groups_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400), byte: u8) {
            let e = PackEntry { id: BlockId([0; 32]), offset: 0, len: data.len() as u32, raw_len: 8192, compression: byte | BLOB_GROUP };
            let _ = decode_blob(&data, &e, None, &IdHasher::new(None));
        }
    }

    /// One block makes a single blob, readable by builds without groups.
    #[test]
    fn a_group_of_one_is_a_single_blob() {
        let data = vec![3u8; 8192];
        let hasher = IdHasher::new(None);
        let id = hasher.id(&data);
        assert_eq!(
            encode_group(&[(id, &data)], Compression::Lz4, None),
            encode_blob(&data, &id, Compression::Lz4, None)
        );
    }

    /// Blobs written before checksums (bit 7 clear) are still proven by
    /// their id.
    #[test]
    fn blobs_without_checksum_are_checked_by_id() {
        let data = vec![7u8; 8192];
        let hasher = IdHasher::new(None);
        let id = hasher.id(&data);
        let (blob, byte) = encode_blob(&data, &id, Compression::Lz4, None);
        let legacy = &blob[..blob.len() - CRC_LEN];
        let entry = PackEntry {
            id,
            offset: 0,
            len: legacy.len() as u32,
            raw_len: 8192,
            compression: byte & !BLOB_CRC,
        };
        assert_eq!(decode_blob(legacy, &entry, None, &hasher).unwrap(), data);
        let other = PackEntry {
            id: BlockId([1; 32]),
            ..entry
        };
        let err = decode_blob(legacy, &other, None, &hasher).unwrap_err();
        assert!(matches!(err, BlobError::WrongContent), "{err}");
    }
}
