//! `Manifest::decode` on hostile manifest bodies (postcard, version first).
//! A manifest that decodes is encoded again. Only checks that nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::repo::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::decode(data, "main/backups/fuzz") {
        let _ = manifest.encode();
    }
});
