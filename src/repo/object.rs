//! The envelope every repository object (other than pack blobs) is stored in.
//!
//! ```text
//! 0   magic "WVLT"
//! 4   format version (u8, currently 1)
//! 5   kind (u8, ObjectKind)
//! 6   compression of the body (u8: 0 none, 1 lz4, 2 zstd)
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
        }
    }
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
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len() + 32);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    out.push(used.id());
    out.push(if keys.is_some() { FLAG_ENCRYPTED } else { 0 });
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
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
    let compression = Compression::from_id(data[6])
        .ok_or_else(|| corrupt(format!("unknown compression {}", data[6])))?;
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
    compression
        .decompress(&compressed, raw_len as usize)
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

    proptest! {
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
