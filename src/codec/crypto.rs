//! Keys, authenticated encryption and block ids.
//!
//! - The master key is 32 random bytes, stored only wrapped (see `repo::keys`).
//! - Two subkeys are derived from it with HKDF-SHA-256: one for AES-256-GCM
//!   (ring's), one for keyed block ids (keyed BLAKE3 since config version 2,
//!   HMAC-SHA-256 before), so ids of an encrypted repository reveal nothing
//!   about the plaintext (no confirmation of a guessed page).
//! - Every sealed value has a fresh random 96-bit nonce, and associated data
//!   naming what it is (object kind and id), so a blob moved or renamed fails
//!   authentication instead of being read as something else.

use std::fmt;

use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};

use super::to_hex;

/// Bytes a sealed value adds: nonce (12) + tag (16).
pub const AEAD_OVERHEAD: usize = 12 + 16;

/// Why decryption failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The tag did not verify: wrong key, or the bytes were changed or moved.
    #[error("authentication failed (wrong key, or the data was changed or moved)")]
    Authentication,
    /// Shorter than a nonce and a tag.
    #[error("sealed value is truncated ({0} bytes)")]
    Truncated(usize),
}

/// The repository's 256-bit master key.
#[derive(Clone)]
pub struct MasterKey(pub [u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> MasterKey {
        MasterKey(rand::random())
    }
}

/// An AES-256-GCM key (ring's implementation: one pass with AES-NI and
/// PCLMULQDQ/VAES, about three times the `aes-gcm` crate's speed here; the
/// format is the same, decision 031).
#[derive(Clone)]
pub(crate) struct Cipher(LessSafeKey);

/// Seal `plaintext` with `cipher`: `nonce || ciphertext || tag`.
pub(crate) fn seal_with(cipher: &Cipher, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce: [u8; 12] = rand::random();
    let mut out = Vec::with_capacity(plaintext.len() + AEAD_OVERHEAD);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    // Encryption with a valid key and nonce cannot fail for inputs below 64 GiB.
    match cipher.0.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut out[12..],
    ) {
        Ok(tag) => out.extend_from_slice(tag.as_ref()),
        Err(_) => unreachable!("AES-GCM encryption of a value below 64 GiB"),
    }
    out
}

/// [`seal_with`] without a copy: `buf[from..from + 12]` is room for the
/// nonce, the plaintext follows it to the end of `buf`, and the tag is
/// appended (for large objects sealed as they are built). Returns `false`,
/// leaving `buf` as it was, when there is no room for the nonce.
pub(crate) fn seal_in_place_with(
    cipher: &Cipher,
    aad: &[u8],
    buf: &mut Vec<u8>,
    from: usize,
) -> bool {
    let nonce: [u8; 12] = rand::random();
    let Some((room, plaintext)) = buf.get_mut(from..).and_then(|b| b.split_at_mut_checked(12))
    else {
        return false;
    };
    room.copy_from_slice(&nonce);
    match cipher.0.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        plaintext,
    ) {
        Ok(tag) => buf.extend_from_slice(tag.as_ref()),
        Err(_) => unreachable!("AES-GCM encryption of a value below 64 GiB"),
    }
    true
}

/// Open what [`seal_with`] produced.
pub(crate) fn open_with(
    cipher: &Cipher,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < AEAD_OVERHEAD {
        return Err(CryptoError::Truncated(sealed.len()));
    }
    let (nonce, ct) = sealed.split_at(12);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Authentication)?;
    let mut buf = ct.to_vec();
    let len = cipher
        .0
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| CryptoError::Authentication)?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// An AES-256-GCM cipher for a raw 32-byte key.
pub(crate) fn cipher(key: &[u8; 32]) -> Cipher {
    match UnboundKey::new(&AES_256_GCM, key) {
        Ok(k) => Cipher(LessSafeKey::new(k)),
        Err(_) => unreachable!("a 32-byte key is a valid AES-256 key"),
    }
}

/// The working keys of an encrypted repository, derived from the master key.
#[derive(Clone)]
pub struct Keys {
    enc: Cipher,
    id_key: [u8; 32],
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Derive the encryption and id keys from the master key (HKDF-SHA-256,
    /// salt = repository id, one info label per key).
    pub fn derive(master: &MasterKey, repo_id: &[u8]) -> Keys {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(repo_id), &master.0);
        let mut enc = [0u8; 32];
        let mut id_key = [0u8; 32];
        // 32-byte outputs are far below HKDF's 255 * 32 limit.
        let _ = hk.expand(b"walvault encryption key v1", &mut enc);
        let _ = hk.expand(b"walvault block id key v1", &mut id_key);
        Keys {
            enc: cipher(&enc),
            id_key,
        }
    }

    /// Seal with associated data `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.enc, aad, plaintext)
    }

    /// [`Keys::seal`] in place (see [`seal_in_place_with`]).
    pub(crate) fn seal_in_place(&self, aad: &[u8], buf: &mut Vec<u8>, from: usize) -> bool {
        seal_in_place_with(&self.enc, aad, buf, from)
    }

    /// Open a sealed value with associated data `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        open_with(&self.enc, aad, sealed)
    }
}

/// The id of a block: the function the repository's `config` names
/// ([`IdHasher`]). Ids of 128 bits (config version 4) are held with 16 zero
/// bytes after them, so every repository's ids share one type; a stored
/// structure writes the width its format says ([`with_id_width`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockId(pub [u8; 32]);

thread_local! {
    /// Bytes of a block id serde writes and reads on this thread.
    static ID_WIDTH: std::cell::Cell<usize> = const { std::cell::Cell::new(32) };
}

/// Run `f` with block ids (de)serialized `width` bytes wide (16 or 32) on
/// this thread: a manifest of version 7 stores 16 bytes per id. Writing an
/// id whose bytes past `width` are not zero is an error, never a silent cut.
pub fn with_id_width<T>(width: usize, f: impl FnOnce() -> T) -> T {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            ID_WIDTH.with(|w| w.set(self.0));
        }
    }
    let _restore = Restore(ID_WIDTH.with(|w| w.replace(width.clamp(1, 32))));
    f()
}

impl serde::Serialize for BlockId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeTuple};
        let width = ID_WIDTH.with(|w| w.get());
        let (kept, cut) = self.0.split_at(width);
        if cut.iter().any(|&b| b != 0) {
            return Err(S::Error::custom(format!(
                "block id {self} is wider than the {width} bytes this structure stores"
            )));
        }
        let mut t = s.serialize_tuple(width)?;
        for b in kept {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> serde::Deserialize<'de> for BlockId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BlockId, D::Error> {
        struct Bytes(usize);
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = BlockId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a block id of {} bytes", self.0)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<BlockId, A::Error> {
                let mut id = [0u8; 32];
                for (i, b) in id.iter_mut().take(self.0).enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(BlockId(id))
            }
        }
        let width = ID_WIDTH.with(|w| w.get());
        d.deserialize_tuple(width, Bytes(width))
    }
}

/// Ids are uniformly distributed already: hashing feeds their first 8 bytes
/// as one word (the index uses a pass-through hasher on it).
impl std::hash::Hash for BlockId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(w));
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({})", &to_hex(&self.0)[..16])
    }
}

impl BlockId {
    /// The bytes that carry the id: 16 for a 128-bit id (its last 16 bytes
    /// zero), else 32. (A 256-bit id ends in 16 zero bytes with
    /// probability 2⁻¹²⁸; it would only print shorter.)
    pub fn significant(&self) -> &[u8] {
        match self.0.split_at(16) {
            (short, tail) if tail.iter().all(|&b| b == 0) => short,
            _ => &self.0,
        }
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(self.significant()))
    }
}

/// The block id functions, by their name in the repository's `config`.
pub const BLOCK_ID_FUNCTIONS: [&str; 6] = [
    "sha256",
    "hmac-sha256",
    "blake3",
    "blake3-keyed",
    "blake3-128",
    "blake3-keyed-128",
];

/// Computes block ids for one repository.
#[derive(Clone)]
pub enum IdHasher {
    /// Plain SHA-256 (unencrypted repositories of config version 1).
    Sha256,
    /// HMAC-SHA-256 under the derived id key (encrypted, config version 1).
    Hmac(Hmac<Sha256>),
    /// Plain BLAKE3 (unencrypted repositories since config version 2).
    Blake3,
    /// BLAKE3 in keyed mode under a key derived from the id key (encrypted
    /// repositories since config version 2).
    Blake3Keyed([u8; 32]),
    /// The first 128 bits of plain BLAKE3 (unencrypted, config version 4).
    Blake3Short,
    /// The first 128 bits of [`IdHasher::Blake3Keyed`] (encrypted, config
    /// version 4).
    Blake3KeyedShort([u8; 32]),
}

impl fmt::Debug for IdHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdHasher::Sha256 => "IdHasher::Sha256",
            IdHasher::Hmac(_) => "IdHasher::Hmac",
            IdHasher::Blake3 => "IdHasher::Blake3",
            IdHasher::Blake3Keyed(_) => "IdHasher::Blake3Keyed",
            IdHasher::Blake3Short => "IdHasher::Blake3Short",
            IdHasher::Blake3KeyedShort(_) => "IdHasher::Blake3KeyedShort",
        })
    }
}

impl IdHasher {
    /// The version-1 hasher of a repository with (or without) keys:
    /// HMAC-SHA-256 or SHA-256.
    pub fn new(keys: Option<&Keys>) -> IdHasher {
        match keys {
            None => IdHasher::Sha256,
            Some(k) => match <Hmac<Sha256> as Mac>::new_from_slice(&k.id_key) {
                Ok(m) => IdHasher::Hmac(m),
                Err(_) => unreachable!("HMAC accepts keys of any length"),
            },
        }
    }

    /// The hasher a repository's `config` names (`block_id`); `None` for a
    /// name this build does not know, or a keyed function without keys.
    pub fn named(name: &str, keys: Option<&Keys>) -> Option<IdHasher> {
        match (name, keys) {
            ("sha256", None) => Some(IdHasher::Sha256),
            ("hmac-sha256", Some(_)) => Some(IdHasher::new(keys)),
            ("blake3", None) => Some(IdHasher::Blake3),
            ("blake3-keyed", Some(k)) => Some(IdHasher::Blake3Keyed(blake3_id_key(k))),
            ("blake3-128", None) => Some(IdHasher::Blake3Short),
            ("blake3-keyed-128", Some(k)) => Some(IdHasher::Blake3KeyedShort(blake3_id_key(k))),
            _ => None,
        }
    }

    /// The id of `data`.
    pub fn id(&self, data: &[u8]) -> BlockId {
        match self {
            IdHasher::Sha256 => BlockId(Sha256::digest(data).into()),
            IdHasher::Hmac(m) => {
                let mut m = m.clone();
                m.update(data);
                BlockId(m.finalize().into_bytes().into())
            }
            IdHasher::Blake3 => BlockId(*blake3::hash(data).as_bytes()),
            IdHasher::Blake3Keyed(k) => BlockId(*blake3::keyed_hash(k, data).as_bytes()),
            IdHasher::Blake3Short => short(blake3::hash(data).as_bytes()),
            IdHasher::Blake3KeyedShort(k) => short(blake3::keyed_hash(k, data).as_bytes()),
        }
    }
}

/// The BLAKE3 key of keyed ids, derived from the id key.
fn blake3_id_key(k: &Keys) -> [u8; 32] {
    blake3::derive_key("walvault 2026-12 block id blake3 keyed v1", &k.id_key)
}

/// The first 128 bits of a 256-bit hash, zero-padded.
fn short(full: &[u8; 32]) -> BlockId {
    let mut id = [0u8; 32];
    for (d, s) in id.iter_mut().zip(&full[..16]) {
        *d = *s;
    }
    BlockId(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let keys = Keys::derive(&MasterKey::generate(), b"repo");
        let sealed = keys.seal(b"pack/1", b"hello");
        assert_eq!(keys.open(b"pack/1", &sealed).unwrap(), b"hello");
        assert_eq!(
            keys.open(b"pack/2", &sealed),
            Err(CryptoError::Authentication),
            "moved blob accepted"
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(keys.open(b"pack/1", &bad), Err(CryptoError::Authentication));
        }
        assert_eq!(
            keys.open(b"pack/1", &sealed[..20]),
            Err(CryptoError::Truncated(20))
        );
        let other = Keys::derive(&MasterKey::generate(), b"repo");
        assert!(other.open(b"pack/1", &sealed).is_err());
    }

    /// ring's AES-256-GCM and the `aes-gcm` crate's (which sealed every
    /// repository before 2026-12) read each other's values.
    #[test]
    fn ring_and_the_aes_gcm_crate_agree() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let key: [u8; 32] = rand::random();
        let theirs = aes_gcm::Aes256Gcm::new((&key).into());
        let ours = cipher(&key);
        for len in [0usize, 1, 15, 16, 17, 8192, 100_000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let sealed = seal_with(&ours, b"aad", &plain);
            let (nonce, ct) = sealed.split_at(12);
            let opened = theirs
                .decrypt(
                    nonce.into(),
                    Payload {
                        msg: ct,
                        aad: b"aad",
                    },
                )
                .unwrap();
            assert_eq!(opened, plain);
            let nonce: [u8; 12] = rand::random();
            let mut old = nonce.to_vec();
            old.extend(
                theirs
                    .encrypt(
                        (&nonce).into(),
                        Payload {
                            msg: &plain,
                            aad: b"aad",
                        },
                    )
                    .unwrap(),
            );
            assert_eq!(open_with(&ours, b"aad", &old).unwrap(), plain);
            assert_eq!(
                open_with(&ours, b"other", &old),
                Err(CryptoError::Authentication)
            );
        }
    }

    #[test]
    fn blake3_ids_are_keyed_per_repository() {
        let a = Keys::derive(&MasterKey::generate(), b"r");
        let b = Keys::derive(&MasterKey::generate(), b"r");
        let data = [42u8; 8192];
        let ka = IdHasher::named("blake3-keyed", Some(&a)).unwrap();
        let kb = IdHasher::named("blake3-keyed", Some(&b)).unwrap();
        let plain = IdHasher::named("blake3", None).unwrap();
        // deterministic within a repository, unrelated across keys and functions
        assert_eq!(ka.id(&data), ka.id(&data));
        assert_ne!(ka.id(&data), kb.id(&data));
        assert_ne!(ka.id(&data), plain.id(&data));
        assert_ne!(ka.id(&data), IdHasher::new(Some(&a)).id(&data));
        assert_eq!(plain.id(&data).0, *blake3::hash(&data).as_bytes());
        // a keyed function needs keys; an unknown name is none
        assert!(IdHasher::named("blake3-keyed", None).is_none());
        assert!(IdHasher::named("blake3", Some(&a)).is_none());
        assert!(IdHasher::named("md5", None).is_none());
    }

    #[test]
    fn ids_differ_between_keys_and_from_sha256() {
        let a = Keys::derive(&MasterKey::generate(), b"r");
        let b = Keys::derive(&MasterKey::generate(), b"r");
        let page = [7u8; 8192];
        let plain = IdHasher::new(None).id(&page);
        assert_eq!(plain.0, <[u8; 32]>::from(Sha256::digest(page)));
        assert_ne!(IdHasher::new(Some(&a)).id(&page), plain);
        assert_ne!(
            IdHasher::new(Some(&a)).id(&page),
            IdHasher::new(Some(&b)).id(&page)
        );
        assert_eq!(
            IdHasher::new(Some(&a)).id(&page),
            IdHasher::new(Some(&a)).id(&page)
        );
    }
}
