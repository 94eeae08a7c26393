//! Data page checksums, as PostgreSQL computes them (`pg_checksum_page` in
//! storage/checksum_impl.h; unchanged from 9.3 to 18): 32 interleaved
//! FNV-1a-like lanes over the page read as little-endian 32-bit words, with
//! `pd_checksum` taken as zero, folded together, mixed with the block number
//! and reduced to 1..=65535.
//!
//! Used to check a data directory's relation files without the server
//! (restored clusters of any major, where the matching `pg_checksums` may not
//! be installed).

use std::path::{Path, PathBuf};

/// PostgreSQL's page size (BLCKSZ); checksums are defined for this size.
pub const PAGE_SIZE: usize = 8192;
/// Blocks per relation segment file (RELSEG_SIZE, 1 GiB of 8 KiB pages).
pub const RELSEG_BLOCKS: u64 = 131_072;
const LANES: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// Offset of `pd_checksum` in the page header (after the 8-byte `pd_lsn`).
const CHECKSUM_AT: usize = 8;
/// Initial state of each lane (checksumBaseOffsets).
const LANE_SEEDS: [u32; LANES] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

#[inline(always)]
fn mix(lane: u32, value: u32) -> u32 {
    let t = lane ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// The checksum of `page` (exactly [`PAGE_SIZE`] bytes) as block `blkno` of
/// its relation fork (segment number × [`RELSEG_BLOCKS`] + block in file).
/// The stored `pd_checksum` does not enter the computation.
pub fn page_checksum(page: &[u8; PAGE_SIZE], blkno: u32) -> u16 {
    let mut lanes = LANE_SEEDS;
    for (row_no, row) in page.chunks_exact(4 * LANES).enumerate() {
        for (j, word) in row.chunks_exact(4).enumerate() {
            let mut w = [word[0], word[1], word[2], word[3]];
            // pd_checksum (bytes 8..10 of the first row) counts as zero
            if row_no == 0 && j == CHECKSUM_AT / 4 {
                w[0] = 0;
                w[1] = 0;
            }
            lanes[j] = mix(lanes[j], u32::from_le_bytes(w));
        }
    }
    // two rounds of zeros mix the last values into every bit
    for _ in 0..2 {
        for l in &mut lanes {
            *l = mix(*l, 0);
        }
    }
    let folded = lanes.iter().fold(0u32, |a, l| a ^ l) ^ blkno;
    ((folded % 65535) + 1) as u16
}

/// What checking one page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    /// A new (never initialized) page: `pd_upper` is zero; it has no checksum.
    New,
    /// The stored checksum matches.
    Ok,
    /// The stored checksum does not match the computed one.
    Bad {
        /// Stored in the page.
        stored: u16,
        /// Computed from its contents.
        computed: u16,
    },
}

/// Check `page` as block `blkno` of its fork.
pub fn check_page(page: &[u8; PAGE_SIZE], blkno: u32) -> PageCheck {
    let pd_upper = u16::from_le_bytes([page[14], page[15]]);
    if pd_upper == 0 {
        return PageCheck::New;
    }
    let stored = u16::from_le_bytes([page[CHECKSUM_AT], page[CHECKSUM_AT + 1]]);
    let computed = page_checksum(page, blkno);
    if stored == computed {
        PageCheck::Ok
    } else {
        PageCheck::Bad { stored, computed }
    }
}

/// The segment number of a relation file name (`16384`, `16384.2`,
/// `16384_fsm`, `16384_vm.1`, `16384_init`), or `None` for every other file
/// (catalog maps, `PG_VERSION`, temporary relations `t3_16384`, ...).
pub fn relation_segment(file_name: &str) -> Option<u64> {
    let (stem, seg) = match file_name.split_once('.') {
        Some((s, n)) => (s, n.parse::<u64>().ok()?),
        None => (file_name, 0),
    };
    let oid = match stem.split_once('_') {
        Some((o, "fsm" | "vm" | "init")) => o,
        Some(_) => return None,
        None => stem,
    };
    (!oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit())).then_some(seg)
}

/// A page whose checksum failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPage {
    /// The file.
    pub file: PathBuf,
    /// Block number within the file.
    pub block: u64,
    /// Stored and computed checksums.
    pub stored: u16,
    /// Computed from the page.
    pub computed: u16,
}

/// What checking a data directory found.
#[derive(Debug, Clone, Default)]
pub struct DirCheck {
    /// Relation files read.
    pub files: u64,
    /// Pages checked (new pages excluded).
    pub pages: u64,
    /// Pages that failed.
    pub bad: Vec<BadPage>,
}

/// Check every relation file under `base/`, `global/` and the tablespaces
/// (`pg_tblspc/*`, links followed) of the stopped cluster in `datadir`, as
/// `pg_checksums --check` does. A file whose length is not a multiple of the
/// page size is an error (a torn copy).
pub fn check_data_directory(datadir: &Path) -> std::io::Result<DirCheck> {
    let mut out = DirCheck::default();
    let mut roots = vec![datadir.join("base"), datadir.join("global")];
    if let Ok(ts) = std::fs::read_dir(datadir.join("pg_tblspc")) {
        for e in ts {
            roots.push(e?.path());
        }
    }
    for root in roots {
        walk(&root, &mut out)?;
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut DirCheck) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let path = e.path();
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            if !e.file_name().to_string_lossy().starts_with("pgsql_tmp") {
                walk(&path, out)?;
            }
            continue;
        }
        let Some(seg) = relation_segment(&e.file_name().to_string_lossy()) else {
            continue;
        };
        check_file(&path, seg, out)?;
    }
    Ok(())
}

fn check_file(path: &Path, seg: u64, out: &mut DirCheck) -> std::io::Result<()> {
    let data = std::fs::read(path)?;
    if data.len() % PAGE_SIZE != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: {} bytes is not a whole number of pages",
                path.display(),
                data.len()
            ),
        ));
    }
    out.files += 1;
    for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
        let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(page) else {
            continue;
        };
        let blkno = (seg * RELSEG_BLOCKS + i as u64) as u32;
        match check_page(page, blkno) {
            PageCheck::New => {}
            PageCheck::Ok => out.pages += 1,
            PageCheck::Bad { stored, computed } => {
                out.pages += 1;
                out.bad.push(BadPage {
                    file: path.to_owned(),
                    block: i as u64,
                    stored,
                    computed,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        assert_eq!(relation_segment("16384"), Some(0));
        assert_eq!(relation_segment("16384.3"), Some(3));
        assert_eq!(relation_segment("16384_fsm"), Some(0));
        assert_eq!(relation_segment("16384_vm.1"), Some(1));
        assert_eq!(relation_segment("16384_init"), Some(0));
        for no in [
            "PG_VERSION",
            "pg_filenode.map",
            "pg_internal.init",
            "t3_16384",
            "16384_x",
            "",
            ".1",
            "1.x",
        ] {
            assert_eq!(relation_segment(no), None, "{no}");
        }
    }

    #[test]
    fn checksum_ignores_its_own_field_and_depends_on_block_and_content() {
        let mut page = [0u8; PAGE_SIZE];
        page[14] = 0x20; // pd_upper != 0: not new
        for (i, b) in page.iter_mut().enumerate().skip(24) {
            *b = (i * 7) as u8;
        }
        let c = page_checksum(&page, 5);
        assert!(c != 0);
        page[8..10].copy_from_slice(&c.to_le_bytes());
        assert_eq!(page_checksum(&page, 5), c, "pd_checksum must not count");
        assert_eq!(check_page(&page, 5), PageCheck::Ok);
        assert_ne!(page_checksum(&page, 6), c);
        page[4000] ^= 1;
        assert!(matches!(check_page(&page, 5), PageCheck::Bad { .. }));
        assert_eq!(check_page(&[0u8; PAGE_SIZE], 0), PageCheck::New);
    }
}
