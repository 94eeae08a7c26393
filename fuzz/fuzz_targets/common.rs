//! Helpers shared by the fuzz targets (included with `#[path]`, not a target).
//!
//! Tags and checksums stop random bytes at the first check. To reach the code
//! behind them, targets can make them valid: the plain object checksum is no
//! secret (anyone who can write to an unencrypted repository can compute it),
//! and the fixed key below stands for an attacker who holds the repository key.

#![allow(dead_code)]

use sha2::{Digest, Sha256};
use walvault::codec::{Keys, MasterKey};

/// Length of the object envelope header (`repo::object`).
pub const OBJECT_HEADER_LEN: usize = 16;

/// The keys of the fuzzed "encrypted repository".
pub fn keys() -> Keys {
    Keys::derive(&MasterKey([0x5a; 32]), b"walvault fuzz repository")
}

/// `header || payload || SHA-256(header || name || payload)`: a plain object
/// whose checksum verifies (layout in `repo::object`).
pub fn with_plain_checksum(header: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(header);
    h.update(name.as_bytes());
    h.update(payload);
    let mut out = Vec::with_capacity(header.len() + payload.len() + 32);
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out.extend_from_slice(&h.finalize());
    out
}

/// `header || seal(header || name, payload)`: an encrypted object whose tag
/// verifies under [`keys`].
pub fn with_valid_tag(keys: &Keys, header: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(name.as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(&keys.seal(&aad, payload));
    out
}

/// Split a little-endian u32 off the front of `data` (missing bytes read as 0).
pub fn take_u32(data: &[u8]) -> (u32, &[u8]) {
    let n = data.len().min(4);
    let mut b = [0u8; 4];
    b[..n].copy_from_slice(&data[..n]);
    (u32::from_le_bytes(b), &data[n..])
}
