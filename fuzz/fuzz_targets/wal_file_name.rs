//! `WalFileName::parse` and the parsers of the other Postgres quantities (LSN,
//! timeline, segment size, system id) on hostile text, e.g. a file name
//! `restore_command` was asked for or a name listed in the repository. Parsed
//! values are displayed and used. Only checks that nothing panics.
//!
//! Input: byte 0 picks the segment size (1 MiB << (byte % 11): every size
//! PostgreSQL allows); the rest, if UTF-8, is the text.

#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use walvault::pg::{Lsn, SystemId, TimelineId, WalFileName, WalSegSize};

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let Ok(seg_size) = WalSegSize::new(1u64 << (20 + u32::from(pick % 11))) else { return };

    if let Ok(name) = WalFileName::parse(text, seg_size) {
        let _ = name.to_string();
        let _ = name.timeline();
        match name {
            WalFileName::Segment(s) | WalFileName::Partial(s) => {
                let _ = s.start_lsn().to_string();
                let _ = s.next().to_string();
            }
            WalFileName::Backup { segment, offset } => {
                let _ = segment.start_lsn().checked_add(u64::from(offset));
            }
            WalFileName::History(t) => {
                let _ = t.get();
            }
        }
    }
    if let Ok(lsn) = Lsn::from_str(text) {
        let _ = lsn.to_string();
        let _ = lsn.segment_offset(seg_size);
        let _ = lsn.is_segment_start(seg_size);
        let _ = lsn.segment(seg_size).start_lsn(seg_size);
        if let Some(tli) = TimelineId::new(1) {
            let _ = WalFileName::segment_of(tli, lsn, seg_size).to_string();
        }
    }
    if let Ok(tli) = TimelineId::from_str(text) {
        let _ = tli.to_string();
    }
    if let Ok(size) = WalSegSize::from_str(text) {
        let _ = size.to_string();
        let _ = size.segments_per_xlog_id();
    }
    let _ = SystemId::from_str(text).map(|s| s.to_string());
});
