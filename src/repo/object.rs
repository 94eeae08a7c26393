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

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::RepoError;
use crate::codec::{Compression, DecompressError, Keys};
use crate::reader::{ByteReader, Truncated};

/// Magic bytes at the start of every object.
pub const MAGIC: &[u8; 4] = b"WVLT";
/// The envelope version this build writes and the newest it reads.
pub const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 16;
/// AES-GCM nonce, first of an encrypted payload.
const NONCE_LEN: usize = 12;
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
    /// A hold on a backup (`walvault hold`).
    Hold = 11,
    /// The result of a verify or a drill.
    Record = 12,
    /// PostgreSQL's own `backup_manifest` of a backup, verbatim.
    ServerManifest = 13,
    /// The head of a file snapshot (`walvault files`).
    FileSnapshot = 14,
    /// Entries of a file snapshot.
    FileEntries = 15,
}

impl ObjectKind {
    /// What the object is, in words.
    pub fn label(self) -> &'static str {
        self.name()
    }

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
            ObjectKind::Hold => "hold",
            ObjectKind::Record => "record",
            ObjectKind::ServerManifest => "server backup manifest",
            ObjectKind::FileSnapshot => "file snapshot",
            ObjectKind::FileEntries => "file snapshot entries",
        }
    }
}

/// The 16-byte header.
fn header(kind: ObjectKind, compression: u8, encrypted: bool, raw_len: u64) -> [u8; HEADER_LEN] {
    let [m0, m1, m2, m3] = *MAGIC;
    let [l0, l1, l2, l3, l4, l5, l6, l7] = raw_len.to_le_bytes();
    let flags = if encrypted { FLAG_ENCRYPTED } else { 0 };
    [
        m0,
        m1,
        m2,
        m3,
        FORMAT_VERSION,
        kind as u8,
        compression,
        flags,
        l0,
        l1,
        l2,
        l3,
        l4,
        l5,
        l6,
        l7,
    ]
}

/// Why an [`LZ4_CHUNKS`] body does not decode; offsets are in the body
/// after decompression (bytes produced before the failing chunk).
#[derive(Debug, thiserror::Error)]
enum ChunkError {
    /// A length the input could never expand to.
    #[error("{stored} compressed bytes cannot hold {raw_len} bytes")]
    CannotHold { stored: usize, raw_len: usize },
    /// The input ends inside a chunk's header or its stored bytes.
    #[error("a chunk cut short at body offset {offset}: {source}")]
    Cut { offset: usize, source: Truncated },
    /// A chunk whose lengths cannot be.
    #[error("bad chunk at body offset {offset}: {raw} bytes stored in {stored}")]
    Bad {
        offset: usize,
        raw: usize,
        stored: usize,
    },
    /// A chunk that does not decompress.
    #[error("chunk at body offset {offset}: {source}")]
    Decompress {
        offset: usize,
        source: DecompressError,
    },
    /// Chunks that add up to another length than the header's.
    #[error("chunks hold {got} bytes, expected {expected}")]
    WrongLength { got: usize, expected: usize },
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
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + expect + 64);
        out.extend_from_slice(&header(kind, LZ4_CHUNKS, keys.is_some(), raw_len));
        if keys.is_some() {
            // room for the nonce: the body is encrypted in place at the end
            out.resize(HEADER_LEN + NONCE_LEN, 0);
        }
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
        // the buffer was sized above, so the splits below always succeed;
        // were one to fail, the piece would not count and `finish` would
        // refuse the object (never a silently short body)
        let Some((chunk_header, room)) = self
            .out
            .get_mut(from..)
            .and_then(|o| o.split_at_mut_checked(8))
        else {
            return;
        };
        let stored = match lz4_flex::block::compress_into(piece, room) {
            Ok(n) if n < piece.len() => n,
            _ => match room.get_mut(..piece.len()) {
                Some(dst) => {
                    dst.copy_from_slice(piece);
                    piece.len()
                }
                None => return,
            },
        };
        for (d, s) in chunk_header.iter_mut().zip(
            (piece.len() as u32)
                .to_le_bytes()
                .into_iter()
                .chain((stored as u32).to_le_bytes()),
        ) {
            *d = s;
        }
        self.end = from + 8 + stored;
        if let (Some(h), Some(written)) = (&mut self.digest, self.out.get(from..self.end)) {
            h.update(written);
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
                let aad = aad(out.get(..HEADER_LEN).unwrap_or_default(), &self.name);
                if !k.seal_in_place(&aad, &mut out, HEADER_LEN) {
                    return Err(RepoError::Corrupt {
                        object: self.name,
                        reason: "no room for the nonce while sealing".into(),
                    });
                }
            }
            (None, None) => {}
        }
        Ok(Bytes::from(out))
    }
}

/// Decode an [`LZ4_CHUNKS`] body of exactly `raw_len` bytes.
fn decompress_chunks(data: &[u8], raw_len: usize) -> Result<Vec<u8>, ChunkError> {
    // nothing is reserved for a length the input could never expand to:
    // each chunk takes 8 header bytes, LZ4 expands a byte at most 255 times
    let most = data.len().saturating_mul(264).saturating_add(64);
    if raw_len > most {
        return Err(ChunkError::CannotHold {
            stored: data.len(),
            raw_len,
        });
    }
    let mut out = Vec::with_capacity(raw_len);
    let mut r = ByteReader::new(data);
    while !r.is_empty() {
        let offset = out.len();
        let cut = |source| ChunkError::Cut { offset, source };
        let raw = r.u32_le().map_err(cut)? as usize;
        let stored = r.u32_le().map_err(cut)? as usize;
        if raw > MAX_CHUNK || stored > raw || offset + raw > raw_len {
            return Err(ChunkError::Bad {
                offset,
                raw,
                stored,
            });
        }
        let bytes = r.bytes(stored).map_err(cut)?;
        let c = if stored == raw {
            Compression::None
        } else {
            Compression::Lz4
        };
        c.decompress_into(bytes, raw, &mut out)
            .map_err(|source| ChunkError::Decompress { offset, source })?;
    }
    if out.len() != raw_len {
        return Err(ChunkError::WrongLength {
            got: out.len(),
            expected: raw_len,
        });
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
    let header = header(kind, used.id(), keys.is_some(), body.len() as u64);
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len() + 32);
    out.extend_from_slice(&header);
    match keys {
        Some(k) => {
            let sealed = k.seal(&aad(&header, name), &compressed);
            out.extend_from_slice(&sealed);
        }
        None => {
            let digest = plain_digest(&header, name, &compressed);
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
    let short = || {
        corrupt(format!(
            "truncated: {} bytes, shorter than the 16-byte header",
            data.len()
        ))
    };
    let (header, payload) = data.split_at_checked(HEADER_LEN).ok_or_else(short)?;
    let mut r = ByteReader::new(header);
    let (Ok(magic), Ok(version), Ok(found_kind), Ok(compression), Ok(flags), Ok(raw_len)) =
        (r.array::<4>(), r.u8(), r.u8(), r.u8(), r.u8(), r.u64_le())
    else {
        return Err(short());
    };
    if &magic != MAGIC {
        return Err(corrupt("not a walvault object (bad magic)".into()));
    }
    if version > FORMAT_VERSION || version == 0 {
        return Err(RepoError::UnsupportedVersion {
            object: name.to_owned(),
            found: u32::from(version),
            supported: u32::from(FORMAT_VERSION),
        });
    }
    if found_kind != kind as u8 {
        return Err(corrupt(format!(
            "expected a {} object, found kind {found_kind}",
            kind.name(),
        )));
    }
    let compression = match compression {
        LZ4_CHUNKS => None,
        id => Some(Compression::from_id(id).ok_or_else(|| {
            corrupt(format!(
                "unknown compression {id} (written by a newer walvault? upgrade this one)"
            ))
        })?),
    };
    let encrypted = flags & FLAG_ENCRYPTED != 0;
    if flags & !FLAG_ENCRYPTED != 0 {
        return Err(corrupt(format!("unknown flags {flags:#x}")));
    }
    if raw_len > max_len {
        return Err(corrupt(format!(
            "body of {raw_len} bytes exceeds the limit of {max_len}"
        )));
    }
    // (an unencrypted body is decompressed where it lies: no copy of a
    // large manifest or index object)
    let compressed: std::borrow::Cow<'_, [u8]> = match (encrypted, keys) {
        (true, Some(k)) => k
            .open(&aad(header, name), payload)
            .map_err(|e| corrupt(e.to_string()))?
            .into(),
        (false, None) => {
            let (body, digest) = payload
                .split_last_chunk::<32>()
                .ok_or_else(|| corrupt("truncated: no room for the checksum".into()))?;
            if &plain_digest(header, name, body) != digest {
                return Err(corrupt(
                    "checksum mismatch (the object was changed, truncated or moved)".into(),
                ));
            }
            body.into()
        }
        (true, None) => return Err(RepoError::KeyNeeded),
        (false, Some(_)) => {
            return Err(corrupt(
                "unencrypted object in an encrypted repository".into(),
            ));
        }
    };
    // raw_len <= max_len, a bound the caller chose to allocate
    let raw_len = usize::try_from(raw_len).unwrap_or(usize::MAX);
    match compression {
        Some(c) => c
            .decompress(&compressed, raw_len)
            .map_err(|e| e.to_string()),
        None => decompress_chunks(&compressed, raw_len).map_err(|e| e.to_string()),
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
#[allow(clippy::indexing_slicing)]
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
            let mut out = header(ObjectKind::Wal, LZ4_CHUNKS, false, raw_len).to_vec();
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
            let mut out = header(ObjectKind::Wal, LZ4_CHUNKS, false, len).to_vec();
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
