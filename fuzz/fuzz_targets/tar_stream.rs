//! The BASE_BACKUP tar parser on hostile bytes, fed in two chunks split where
//! the first input byte says. Only checks that nothing panics.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use walvault::backup::tar::TarParser;

fuzz_target!(|data: &[u8]| {
    let [cut, rest @ ..] = data else { return };
    let at = if rest.is_empty() { 0 } else { usize::from(*cut) * rest.len() / 256 };
    let mut p = TarParser::new();
    let mut events = Vec::new();
    if p.feed(Bytes::copy_from_slice(&rest[..at]), &mut events).is_ok()
        && p.feed(Bytes::copy_from_slice(&rest[at..]), &mut events).is_ok()
    {
        let _ = p.finish();
    }
});
