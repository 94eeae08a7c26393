//! `repo::decode_blob` on hostile blobs for a fixed index entry (block id,
//! offset), whose compression byte and raw length come from the input. Only
//! checks that nothing panics.
//!
//! Input: byte 0 is the entry's compression id (any byte: unknown ids too);
//! byte 1 the mode (bit 0: encrypted repository; bit 1: seal the blob so its
//! tag verifies and the decompressor sees hostile bytes); bytes 2..6 the raw
//! length (LE, modulo 1 MiB + 1; real blocks are 8 KiB to 16 MiB, and the
//! decompressors allocate it up front); the rest is the blob.

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use walvault::codec::{BlockId, IdHasher};
use walvault::repo::{decode_blob, PackEntry};

const MAX_RAW: u32 = 1 << 20;
const ID: BlockId = BlockId([0x42; 32]);

fuzz_target!(|data: &[u8]| {
    let [compression, mode, rest @ ..] = data else { return };
    let (raw_len, blob) = common::take_u32(rest);
    let keys = common::keys();
    let keys = (mode & 1 != 0).then_some(&keys);
    let hasher = IdHasher::new(keys);
    let blob = match keys {
        Some(k) if mode & 2 != 0 => {
            // associated data "block" || id, as repo::pack writes it
            let mut aad = b"block".to_vec();
            aad.extend_from_slice(&ID.0);
            k.seal(&aad, blob)
        }
        _ => blob.to_vec(),
    };
    let entry = PackEntry {
        id: ID,
        offset: 0,
        len: blob.len() as u32,
        raw_len: raw_len % (MAX_RAW + 1),
        compression: *compression,
    };
    let _ = decode_blob(&blob, &entry, keys, &hasher);
});
