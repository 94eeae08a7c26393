//! The envelope every repository object (other than pack blobs) is stored in.
//!
//! ```text
//! 0   magic "WVLT"
//! 4   format version (u8, currently 1)
//! 5   kind (u8, ObjectKind)
//! 6   compression of the body (u8: 0 none, 1 lz4, 2 zstd, 3 lz4 chunks)
//! 7   flags (u8: bit 0 = encrypted)
//! 8   body length before compression (u64 LE)
//! 16  payload
//!       encrypted: nonce(12) || AES-256-GCM(compressed body) || tag(16),
//!                  associated data = bytes 0..16 || object name
//!       plain:     compressed body || SHA-256(bytes 0..16 || object name || compressed body)
//! ```
//!
//! The object name (its key relative to the repository root) is bound into the
//! tag or hash, so an object copied under another name fails verification.
//!
//! Compression 3 ([`LZ4_CHUNKS`]) is written by [`ChunkSealer`], which seals
//! a body as it arrives (a WAL segment while it is read and checked): the
//! compressed body is a sequence of chunks, each `raw length (u32 LE) ‖
//! stored length (u32 LE) ‖ stored bytes`, an LZ4 block when the stored
//! length is smaller than the raw one, the raw bytes when equal.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::RepoError;
use crate::codec::{Compression, Keys};

/// Magic bytes at the start of every object.
pub const MAGIC: &[u8; 4] = b"WVLT";
/// The envelope version this build writes and the newest it reads.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 16;
const FLAG_ENCRYPTED: u8 = 1;
/// The compression byte of a body compressed in independent LZ4 chunks.
pub const LZ4_CHUNKS: u8 = 3;
/// Largest raw chunk of an [`LZ4_CHUNKS`] body accepted on read.
const MAX_CHUNK: usize = 64 << 20;

/// What an object is; stored in its header and checked on read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// The repository's `config`.
    Config = 1,
    /// A wrapped master key, `keys/<id>`.
    Key = 2,
    /// The header at the end of a pack.
    PackHeader = 3,
    /// An index object.
    Index = 4,
    /// A backup manifest.
    Manifest = 5,
    /// Garbage-collection state (packs pending deletion).
    GcState = 6,
    /// A lease held by a running writer.
    Lease = 7,
    /// A WAL segment, partial segment, or history file.
    Wal = 8,
    /// The summary of a WAL segment's records.
    WalSummary = 9,
    /// Throughputs of the stanza's last measured recovery.
    RecoveryRates = 10,
}

impl ObjectKind {
    fn name(self) -> &'static str {
        match self {
            ObjectKind::Config => "config",
            ObjectKind::Key => "key",
            ObjectKind::PackHeader => "pack header",
            ObjectKind::Index => "index",
            ObjectKind::Manifest => "manifest",
            ObjectKind::GcState => "gc state",
            ObjectKind::Lease => "lease",
            ObjectKind::Wal => "WAL",
            ObjectKind::WalSummary => "WAL summary",
            ObjectKind::RecoveryRates => "recovery rates",
        }
    }
}

/// The 16-byte header.
fn header(kind: ObjectKind, compression: u8, encrypted: bool, raw_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    out.push(compression);
    out.push(if encrypted { FLAG_ENCRYPTED } else { 0 });
    out.extend_from_slice(&raw_len.to_le_bytes());
    out
}

/// Seals an object whose body arrives in pieces ([`LZ4_CHUNKS`]): each
/// piece is compressed (and, unencrypted, hashed) as it is pushed, so the
/// work overlaps with producing the next one. The body's total length is
/// declared up front; [`ChunkSealer::finish`] refuses any other.
pub struct ChunkSealer {
    name: String,
    keys: Option<Keys>,
    raw_len: u64,
    pushed: u64,
    out: Vec<u8>,
    /// End of what is written in `out`.
    end: usize,
    /// Unencrypted: SHA-256 of the header, the name and the body so far.
    digest: Option<Sha256>,
}

impl ChunkSealer {
    /// Start object `name` of `kind` with a body of `raw_len` bytes;
    /// encrypted when `keys` is given. `expect` sizes the output buffer.
    pub fn new(
        kind: ObjectKind,
        name: &str,
        raw_len: u64,
        keys: Option<Keys>,
        expect: usize,
    ) -> ChunkSealer {
        let mut out = header(kind, LZ4_CHUNKS, keys.is_some(), raw_len);
        out.reserve(expect + 64);
        let digest = keys.is_none().then(|| {
            let mut h = Sha256::new();
            h.update(&out);
            h.update(name.as_bytes());
            h
        });
        ChunkSealer {
            name: name.to_owned(),
            keys,
            raw_len,
            pushed: 0,
            end: out.len(),
            out,
            digest,
        }
    }

    /// Compress and append the next piece of the body (as chunks of at
    /// most 64 MiB, the most a reader accepts).
    pub fn push(&mut self, piece: &[u8]) {
        if piece.len() > MAX_CHUNK {
            for p in piece.chunks(MAX_CHUNK) {
                self.push(p);
            }
            return;
        }
        let from = self.end;
        let most = lz4_flex::block::get_maximum_output_size(piece.len());
        // `out` only grows (zero-filled once), `end` marks what is written
        if self.out.len() < from + 8 + most {
            self.out.resize(from + 8 + most, 0);
        }
        let stored = match lz4_flex::block::compress_into(piece, &mut self.out[from + 8..]) {
            Ok(n) if n < piece.len() => n,
            _ => {
                self.out[from + 8..from + 8 + piece.len()].copy_from_slice(piece);
                piece.len()
            }
        };
        self.end = from + 8 + stored;
        self.out[from..from + 4].copy_from_slice(&(piece.len() as u32).to_le_bytes());
        self.out[from + 4..from + 8].copy_from_slice(&(stored as u32).to_le_bytes());
        if let Some(h) = &mut self.digest {
            h.update(&self.out[from..self.end]);
        }
        self.pushed += piece.len() as u64;
    }

    /// The sealed object; an error when the pieces did not add up to the
    /// declared length.
    pub fn finish(self) -> Result<Bytes, RepoError> {
        if self.pushed != self.raw_len {
            return Err(RepoError::SourceChanged {
                object: self.name,
                sealed: self.pushed,
                declared: self.raw_len,
            });
        }
        let mut out = self.out;
        out.truncate(self.end);
        match (self.digest, &self.keys) {
            (Some(h), _) => {
                let d: [u8; 32] = h.finalize().into();
                out.extend_from_slice(&d);
            }
            (None, Some(k)) => {
                let aad = aad(&out[..HEADER_LEN], &self.name);
                let sealed = k.seal(&aad, &out[HEADER_LEN..]);
                out.truncate(HEADER_LEN);
                out.extend_from_slice(&sealed);
            }
            (None, None) => {}
        }
        Ok(Bytes::from(out))
    }
}

/// Decode an [`LZ4_CHUNKS`] body of exactly `raw_len` bytes.
fn decompress_chunks(mut data: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    // nothing is reserved for a length the input could never expand to:
    // each chunk takes 8 header bytes, LZ4 expands a byte at most 255 times
    let most = data.len().saturating_mul(264).saturating_add(64);
    if raw_len > most {
        return Err(format!(
            "{} compressed bytes cannot hold {raw_len} bytes",
            data.len()
        ));
    }
    let mut out = Vec::with_capacity(raw_len);
    while !data.is_empty() {
        if data.len() < 8 {
            return Err(format!(
                "a chunk header cut short at body offset {}",
                out.len()
            ));
        }
        let raw = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let stored = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as usize;
        data = &data[8..];
        if raw > MAX_CHUNK || stored > raw || stored > data.len() || out.len() + raw > raw_len {
            return Err(format!(
                "bad chunk at body offset {}: {raw} bytes stored in {stored}",
                out.len()
            ));
        }
        let c = if stored == raw {
            Compression::None
        } else {
            Compression::Lz4
        };
        c.decompress_into(&data[..stored], raw, &mut out)?;
        data = &data[stored..];
    }
    if out.len() != raw_len {
        return Err(format!(
            "chunks hold {} bytes, expected {raw_len}",
            out.len()
        ));
    }
    Ok(out)
}

/// Encode `body` as object `name` of `kind`; encrypted when `keys` is given.
pub fn seal(
    kind: ObjectKind,
    name: &str,
    body: &[u8],
    compression: Compression,
    keys: Option<&Keys>,
) -> Bytes {
    let (used, compressed) = compression.compress(body);
    let mut out = header(kind, used.id(), keys.is_some(), body.len() as u64);
    out.reserve(compressed.len() + 32);
    match keys {
        Some(k) => {
            let aad = aad(&out[..HEADER_LEN], name);
            let sealed = k.seal(&aad, &compressed);
            out.extend_from_slice(&sealed);
        }
        None => {
            let digest = plain_digest(&out[..HEADER_LEN], name, &compressed);
            out.extend_from_slice(&compressed);
            out.extend_from_slice(&digest);
        }
    }
    Bytes::from(out)
}

/// Decode object `name`, expecting `kind`, verifying its tag or hash.
/// `max_len` bounds the decoded body (a corrupt length never allocates more).
pub fn open(
    kind: ObjectKind,
    name: &str,
    data: &[u8],
    keys: Option<&Keys>,
    max_len: u64,
) -> Result<Vec<u8>, RepoError> {
    let corrupt = |reason: String| RepoError::Corrupt {
        object: name.to_owned(),
        reason,
    };
    if data.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "truncated: {} bytes, shorter than the 16-byte header",
            data.len()
        )));
    }
    if &data[..4] != MAGIC {
        return Err(corrupt("not a walvault object (bad magic)".into()));
    }
    if data[4] > FORMAT_VERSION || data[4] == 0 {
        return Err(RepoError::UnsupportedVersion {
            object: name.to_owned(),
            found: u32::from(data[4]),
            supported: u32::from(FORMAT_VERSION),
        });
    }
    if data[5] != kind as u8 {
        return Err(corrupt(format!(
            "expected a {} object, found kind {}",
            kind.name(),
            data[5]
        )));
    }
    let compression = match data[6] {
        LZ4_CHUNKS => None,
        id => Some(Compression::from_id(id).ok_or_else(|| {
            corrupt(format!(
                "unknown compression {id} (written by a newer walvault? upgrade this one)"
            ))
        })?),
    };
    let encrypted = data[7] & FLAG_ENCRYPTED != 0;
    if data[7] & !FLAG_ENCRYPTED != 0 {
        return Err(corrupt(format!("unknown flags {:#x}", data[7])));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&data[8..16]);
    let raw_len = u64::from_le_bytes(len);
    if raw_len > max_len {
        return Err(corrupt(format!(
            "body of {raw_len} bytes exceeds the limit of {max_len}"
        )));
    }
    let header = &data[..HEADER_LEN];
    let payload = &data[HEADER_LEN..];
    let compressed = match (encrypted, keys) {
        (true, Some(k)) => k
            .open(&aad(header, name), payload)
            .map_err(|e| corrupt(e.to_string()))?,
        (false, None) => {
            if payload.len() < 32 {
                return Err(corrupt("truncated: no room for the checksum".into()));
            }
            let (body, digest) = payload.split_at(payload.len() - 32);
            if plain_digest(header, name, body)[..] != digest[..] {
                return Err(corrupt(
                    "checksum mismatch (the object was changed, truncated or moved)".into(),
                ));
            }
            body.to_vec()
        }
        (true, None) => return Err(RepoError::KeyNeeded),
        (false, Some(_)) => {
            return Err(corrupt(
                "unencrypted object in an encrypted repository".into(),
            ));
        }
    };
    match compression {
        Some(c) => c.decompress(&compressed, raw_len as usize),
        None => decompress_chunks(&compressed, raw_len as usize),
    }
    .map_err(corrupt)
}

fn aad(header: &[u8], name: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + name.len());
    a.extend_from_slice(header);
    a.extend_from_slice(name.as_bytes());
    a
}

fn plain_digest(header: &[u8], name: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(header);
    h.update(name.as_bytes());
    h.update(body);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::MasterKey;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let keys = Keys::derive(&MasterKey::generate(), b"r");
        let body = b"manifest body manifest body manifest body".repeat(10);
        for k in [None, Some(&keys)] {
            let obj = seal(
                ObjectKind::Manifest,
                "main/backups/x",
                &body,
                Compression::Lz4,
                k,
            );
            assert_eq!(
                open(ObjectKind::Manifest, "main/backups/x", &obj, k, 1 << 20).unwrap(),
                body
            );
            for i in 0..obj.len() {
                let mut bad = obj.to_vec();
                bad[i] ^= 0x40;
                assert!(
                    open(ObjectKind::Manifest, "main/backups/x", &bad, k, 1 << 20).is_err(),
                    "flip at {i}"
                );
            }
            // moved to another name
            assert!(open(ObjectKind::Manifest, "main/backups/y", &obj, k, 1 << 20).is_err());
            // truncated anywhere
            for n in 0..obj.len() {
                assert!(open(
                    ObjectKind::Manifest,
                    "main/backups/x",
                    &obj[..n],
                    k,
                    1 << 20
                )
                .is_err());
            }
        }
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let mut obj = seal(ObjectKind::Index, "i", b"x", Compression::None, None).to_vec();
        obj[4] = 9;
        let e = open(ObjectKind::Index, "i", &obj, None, 100).unwrap_err();
        assert!(
            matches!(
                e,
                RepoError::UnsupportedVersion {
                    found: 9,
                    supported: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    fn chunk_sealed(pieces: &[&[u8]], keys: Option<&Keys>) -> Bytes {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let mut s = ChunkSealer::new(
            ObjectKind::Wal,
            "main/wal/x",
            total as u64,
            keys.cloned(),
            0,
        );
        for p in pieces {
            s.push(p);
        }
        s.finish().unwrap()
    }

    #[test]
    fn chunk_sealer_round_trip_and_every_flipped_byte_is_caught() {
        let keys = Keys::derive(&MasterKey::generate(), b"r");
        let text = b"WAL record WAL record WAL record ".repeat(40);
        let noise: Vec<u8> = (0..700u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let body: Vec<u8> = [&text[..], &noise[..], &text[..]].concat();
        for k in [None, Some(&keys)] {
            // compressible, incompressible (stored raw), and empty pieces
            let obj = chunk_sealed(&[&text, &noise, &[], &text], k);
            assert_eq!(obj[6], LZ4_CHUNKS);
            assert!(obj.len() < body.len(), "nothing was compressed");
            assert_eq!(
                open(ObjectKind::Wal, "main/wal/x", &obj, k, 1 << 20).unwrap(),
                body
            );
            for i in 0..obj.len() {
                let mut bad = obj.to_vec();
                bad[i] ^= 0x08;
                assert!(
                    open(ObjectKind::Wal, "main/wal/x", &bad, k, 1 << 20).is_err(),
                    "flip at {i}"
                );
            }
            for n in 0..obj.len() {
                assert!(open(ObjectKind::Wal, "main/wal/x", &obj[..n], k, 1 << 20).is_err());
            }
            assert!(open(ObjectKind::Wal, "main/wal/y", &obj, k, 1 << 20).is_err());
        }
        // pieces that do not add up to the declared length are refused
        let mut s = ChunkSealer::new(ObjectKind::Wal, "w", 10, None, 0);
        s.push(b"12345");
        assert!(s.finish().is_err());
    }

    #[test]
    fn chunk_bodies_with_bad_lengths_are_refused() {
        // an unencrypted object's checksum is recomputed over forged bytes,
        // so only the chunk decoder stands between them and the output
        let forge = |body: &[u8], raw_len: u64| {
            let mut out = header(ObjectKind::Wal, LZ4_CHUNKS, false, raw_len);
            let d = plain_digest(&out, "w", body);
            out.extend_from_slice(body);
            out.extend_from_slice(&d);
            out
        };
        let chunk = |raw: u32, stored: u32, bytes: &[u8]| {
            [&raw.to_le_bytes()[..], &stored.to_le_bytes(), bytes].concat()
        };
        let ok = forge(&chunk(3, 3, b"abc"), 3);
        assert_eq!(open(ObjectKind::Wal, "w", &ok, None, 100).unwrap(), b"abc");
        for (body, len) in [
            (chunk(3, 3, b"abc"), 4),         // fewer bytes than declared
            (chunk(3, 3, b"abc"), 2),         // more
            (chunk(3, 4, b"abcd"), 3),        // stored longer than raw
            (chunk(3, 3, b"ab"), 3),          // cut short
            (b"abc".to_vec(), 3),             // no chunk header
            (chunk(u32::MAX, 2, b"ab"), 100), // absurd length
            (chunk(50, 2, b"\x00\x00"), 50),  // not LZ4
        ] {
            assert!(
                open(ObjectKind::Wal, "w", &forge(&body, len), None, 1 << 40).is_err(),
                "{body:?} {len}"
            );
        }
    }

    proptest! {
        #[test]
        fn random_chunk_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..400), len in 0u64..2000) {
            // checksummed, so only the chunk decoder judges the bytes
            let mut out = header(ObjectKind::Wal, LZ4_CHUNKS, false, len);
            let d = plain_digest(&out, "w", &body);
            out.extend_from_slice(&body);
            out.extend_from_slice(&d);
            if let Ok(v) = open(ObjectKind::Wal, "w", &out, None, 1 << 20) {
                prop_assert_eq!(v.len() as u64, len);
            }
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300), enc: bool) {
            let keys = Keys::derive(&MasterKey([1; 32]), b"r");
            let mut d = data.clone();
            if d.len() >= 6 { d[..4].copy_from_slice(MAGIC); d[4] = 1; d[5] = ObjectKind::Index as u8; }
            let _ = open(ObjectKind::Index, "i", &d, enc.then_some(&keys), 1 << 20);
            let _ = open(ObjectKind::Index, "i", &data, enc.then_some(&keys), 1 << 20);
        }
    }
}
