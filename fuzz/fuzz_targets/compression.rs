//! `Compression::decompress` on hostile bytes for each algorithm, with a
//! bounded raw length; the input is also compressed (encoder paths). Only
//! checks that nothing panics.
//!
//! Input: byte 0 picks the algorithm (byte % 3: none, lz4, zstd); bytes 1..5
//! the raw length (LE, modulo 1 MiB + 1, since the decompressors allocate it up
//! front); the rest is the compressed data.

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use walvault::codec::Compression;

const MAX_RAW: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    let Some(algo) = Compression::from_id(pick % 3) else { return };
    let (raw_len, compressed) = common::take_u32(rest);
    let _ = algo.decompress(compressed, (raw_len % (MAX_RAW + 1)) as usize);
    let _ = algo.compress(compressed);
});
