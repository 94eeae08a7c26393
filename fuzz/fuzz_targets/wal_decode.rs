//! The WAL reader and record interpretation on hostile bytes. Page headers
//! are patched to be valid (magic, address, long-header flag) so the fuzzer
//! reaches the record code; records are also interpreted without their CRC
//! so the block-header and xact parsers see random bodies. Only checks that
//! nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walvault::pg::{Lsn, SegmentNo, WalSegSize};
use walvault::wal::decode::{Next, RawRecord, WalReader};
use walvault::wal::records::interpret;

const PAGE: usize = 8192;

fuzz_target!(|data: &[u8]| {
    let [cut, major, rest @ ..] = data else { return };
    let seg = WalSegSize::new(1 << 20).unwrap();
    let base = 7u64 << 20; // segment 7
    let mut wal = rest.to_vec();
    wal.truncate(1 << 20);
    for (i, page) in wal.chunks_mut(PAGE).enumerate() {
        if page.len() < 24 {
            break;
        }
        page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        let mut info = u16::from_le_bytes([page[2], page[3]]) & 0x0009;
        if i == 0 {
            info |= 0x0002;
        }
        page[2..4].copy_from_slice(&info.to_le_bytes());
        page[8..16].copy_from_slice(&(base + (i * PAGE) as u64).to_le_bytes());
    }
    let at = usize::from(*cut) * wal.len() / 256;
    let mut r = WalReader::new(Lsn::new(base), seg);
    r.feed(&wal[..at]);
    let mut fed = false;
    for _ in 0..10_000 {
        match r.next_record() {
            Ok(Next::Record(rec)) => {
                let _ = interpret(&rec, 15);
            }
            Ok(Next::NeedMore) if !fed => {
                r.feed(&wal[at..]);
                fed = true;
            }
            _ => break,
        }
    }
    // record bodies without the CRC gate
    if rest.len() >= 24 {
        let rec = RawRecord {
            lsn: Lsn::new(base + 40),
            end: Lsn::new(base + 40 + rest.len() as u64),
            xid: 1,
            prev: Lsn::new(0),
            info: rest[16],
            rmid: rest[17] % 2,
            bytes: rest.to_vec(),
        };
        let _ = interpret(&rec, 13 + u32::from(*major % 6));
    }
    if wal.len() >= PAGE {
        let mut segment = wal.clone();
        segment.resize(1 << 20, 0);
        let _ = walvault::wal::summary::summarize(&segment, Some(&wal), walvault::pg::TimelineId::FIRST, SegmentNo(7), seg);
    }
});
