//! `Index::decode_object` on hostile index bodies, and on pack header bodies
//! (the same entry list, parsed by the same code). Decoded entries go into an
//! in-memory index and are looked up again. Only checks that nothing panics.
//!
//! Input: byte 0 picks the shape (even: an index object body; odd: a pack
//! header body, i.e. one pack's `count, entries...`); the rest is the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::repo::Index;

const NAME: &str = "main/index/fuzz";

fuzz_target!(|data: &[u8]| {
    let [shape, body @ ..] = data else { return };
    let decoded = if shape & 1 == 0 {
        Index::decode_object(body, NAME)
    } else {
        // pack count 1, a zero pack id, then the header body
        let mut wrapped = Vec::with_capacity(20 + body.len());
        wrapped.extend_from_slice(&1u32.to_le_bytes());
        wrapped.extend_from_slice(&[0u8; 16]);
        wrapped.extend_from_slice(body);
        Index::decode_object(&wrapped, NAME)
    };
    let Ok(packs) = decoded else { return };
    let mut index = Index::new();
    for (pack, entries) in &packs {
        index.add_pack(*pack, entries);
    }
    for entry in packs.iter().flat_map(|(_, e)| e) {
        let _ = index.get(&entry.id);
    }
    let _ = Index::encode_object(&packs);
});
