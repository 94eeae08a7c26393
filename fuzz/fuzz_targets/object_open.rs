//! `repo::object::open` on hostile bytes, for every object kind, with and
//! without keys. Only checks that nothing panics.
//!
//! Input: byte 0 picks the kind; byte 1 the mode (bit 0: open with keys, as an
//! encrypted repository does; bit 1: make the tag or checksum valid, so the
//! header's compression and length fields reach the decompressor); the rest is
//! the object (with bit 1: its 16-byte header, then the payload to protect).

#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use walvault::repo::object::{open, ObjectKind};

const KINDS: [ObjectKind; 10] = [
    ObjectKind::Config,
    ObjectKind::Key,
    ObjectKind::PackHeader,
    ObjectKind::Index,
    ObjectKind::Manifest,
    ObjectKind::GcState,
    ObjectKind::Lease,
    ObjectKind::Wal,
    ObjectKind::WalSummary,
    ObjectKind::RecoveryRates,
];
const NAME: &str = "main/fuzz/object";
/// Bound on the decoded body. Callers pass 1 MiB to 4 GiB; the decompressors
/// allocate the claimed length up front, so a real bound would only make the
/// fuzzer report allocation limits instead of decoding bugs.
const MAX_LEN: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let [pick, mode, rest @ ..] = data else { return };
    let kind = KINDS[usize::from(*pick) % KINDS.len()];
    let keys = common::keys();
    let keys = (mode & 1 != 0).then_some(&keys);
    if mode & 2 != 0 && rest.len() >= common::OBJECT_HEADER_LEN {
        let (header, payload) = rest.split_at(common::OBJECT_HEADER_LEN);
        let object = match keys {
            Some(k) => common::with_valid_tag(k, header, NAME, payload),
            None => common::with_plain_checksum(header, NAME, payload),
        };
        let _ = open(kind, NAME, &object, keys, MAX_LEN);
    } else {
        let _ = open(kind, NAME, rest, keys, MAX_LEN);
    }
});
