//! The backend protocol message parser (what a server, or anything answering
//! on its port, sends: authentication, rows, CopyData of BASE_BACKUP and
//! START_REPLICATION) on hostile bytes. Only checks that nothing panics.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use walvault::pg::wire;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = wire::parse(&mut buf) {}
});
