//! PostgreSQL 17+ incremental backups over the protocol, stored chain-free.
//!
//! With `summarize_wal = on` the server keeps a summary of the blocks every
//! range of WAL touched. Given the previous backup's `backup_manifest`
//! (`UPLOAD_MANIFEST`), `BASE_BACKUP (INCREMENTAL)` sends each relation
//! file that existed then as `INCREMENTAL.<name>`: a header (magic, block
//! count, truncation length, the changed blocks' numbers, padded to a block)
//! and only the changed blocks. Everything else comes whole.
//!
//! walvault turns each incremental file back into the complete file while
//! it stores it: the changed blocks go through the block pipeline, every
//! other block below the truncation length is the previous backup's block
//! id for the same place (a reference, nothing is read), and blocks past
//! the previous file's end that the server did not send are zeros, as
//! `pg_combinebackup` makes them. The manifest that results lists whole
//! files, like any other backup's: restore, retention and verify never see
//! a chain (decision 032).
//!
//! `backup_label` of an incremental backup names the backup it depends on
//! (`INCREMENTAL FROM LSN/TLI`), and PostgreSQL refuses to start from such
//! a label; those two lines are dropped, as `pg_combinebackup` does.

use std::collections::HashMap;
use std::sync::Arc;

use crate::codec::BlockId;
use crate::repo::{FileKind, Manifest, RepoError, Repository, StanzaPaths};

/// The name prefix of an incremental file.
pub use crate::pg::INCREMENTAL_PREFIX as PREFIX;
/// The first four bytes of an incremental file (native byte order).
pub const MAGIC: u32 = 0xd3ae_1f0d;
/// PostgreSQL's page size: incremental backups are taken only when both
/// the server's and the repository's block size are this.
pub const PAGE: usize = 8192;
/// Blocks in a relation segment (1 GiB of 8 KiB pages): no incremental
/// file names a block at or past it.
const RELSEG_BLOCKS: u32 = 131_072;

/// The previous backup an incremental backup is taken against.
#[derive(Debug)]
pub struct IncrementalBase {
    /// Its id.
    pub id: String,
    /// PostgreSQL's `backup_manifest` of it, sent with `UPLOAD_MANIFEST`.
    pub server_manifest: Vec<u8>,
    /// Its regular files' block ids by path.
    files: HashMap<String, Arc<[BlockId]>>,
}

impl IncrementalBase {
    /// A base from its parts: backup `id`, its server manifest, and the
    /// block ids of its whole-page files by path.
    pub fn new(
        id: String,
        server_manifest: Vec<u8>,
        files: impl IntoIterator<Item = (String, Vec<BlockId>)>,
    ) -> IncrementalBase {
        IncrementalBase {
            id,
            server_manifest,
            files: files.into_iter().map(|(p, b)| (p, Arc::from(b))).collect(),
        }
    }

    /// The block ids of `path` in the previous backup.
    pub fn blocks(&self, path: &str) -> Option<&Arc<[BlockId]>> {
        self.files.get(path)
    }

    /// Every block id the previous backup's files use.
    pub fn all_blocks(&self) -> impl Iterator<Item = &BlockId> {
        self.files.values().flat_map(|b| b.iter())
    }
}

/// What the server reports that decides whether an incremental backup is
/// possible.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    /// `server_version_num`.
    pub version: u32,
    /// `SHOW summarize_wal` (PostgreSQL 17+).
    pub summarize_wal: Option<String>,
    /// `SHOW block_size`.
    pub block_size: Option<String>,
    /// The cluster's system identifier.
    pub system_id: crate::pg::SystemId,
}

/// The previous backup to take an incremental backup against, or why
/// every file is read in full (`Err`: one line for the log).
pub async fn choose_base(
    repo: &Repository,
    paths: &StanzaPaths,
    facts: &ServerFacts,
) -> Result<Result<IncrementalBase, String>, RepoError> {
    if facts.version < 170_000 {
        return Ok(Err(format!(
            "PostgreSQL {} sends no incremental backups (17 and later do)",
            facts.version / 10_000
        )));
    }
    if facts.summarize_wal.as_deref() != Some("on") {
        return Ok(Err(
            "summarize_wal is off on the server; with summarize_wal = on PostgreSQL sends only the blocks that changed"
                .into(),
        ));
    }
    if facts.block_size.as_deref() != Some("8192") || repo.config().block_size as usize != PAGE {
        return Ok(Err(format!(
            "incremental backups need 8 KiB blocks on the server ({}) and in the repository ({})",
            facts.block_size.as_deref().unwrap_or("unknown"),
            repo.config().block_size
        )));
    }
    let ids = Manifest::list_ids(repo, paths).await?;
    let mut newest = None;
    for id in ids.iter().rev() {
        let m = Manifest::load(repo, paths, id).await?;
        if m.system_id == facts.system_id {
            newest = Some(m);
            break;
        }
    }
    let Some(prev) = newest else {
        return Ok(Err("no earlier backup of this cluster in the stanza".into()));
    };
    if prev.block_size as usize != PAGE {
        return Ok(Err(format!(
            "the previous backup {} was cut at {} bytes, not 8 KiB",
            prev.id, prev.block_size
        )));
    }
    let Some(server_manifest) = Manifest::load_server_manifest(repo, paths, &prev.id).await? else {
        return Ok(Err(format!(
            "the previous backup {} was stored without PostgreSQL's backup_manifest",
            prev.id
        )));
    };
    let files = prev
        .files
        .into_iter()
        // (relation files are whole pages; nothing else is sent incrementally)
        .filter(|f| f.kind == FileKind::File && f.size % PAGE as u64 == 0)
        .map(|f| (f.path, Arc::from(f.blocks)))
        .collect();
    Ok(Ok(IncrementalBase {
        id: prev.id,
        server_manifest,
        files,
    }))
}

/// The header of an incremental file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Numbers of the blocks that follow, ascending, relative to the segment.
    pub blocks: Vec<u32>,
    /// The reconstructed file has at least this many blocks; blocks below
    /// it that are not sent come from the previous backup.
    pub truncation: u32,
}

impl Header {
    /// The header's length in bytes with `n` blocks: 12 bytes plus 4 per
    /// block, rounded up to a whole page when any block follows.
    pub fn len_for(n: u32) -> usize {
        let raw = 12 + 4 * n as usize;
        if n == 0 {
            raw
        } else {
            raw.div_ceil(PAGE) * PAGE
        }
    }

    /// How many bytes the header takes, once its first 12 are known
    /// (`Ok(None)` before); an error as soon as they are not a header's.
    pub fn needed(prefix: &[u8]) -> Result<Option<usize>, String> {
        let (Some(magic), Some(n)) = (prefix.get(0..4), prefix.get(4..8)) else {
            return Ok(None);
        };
        let word = |b: &[u8]| b.try_into().map(u32::from_ne_bytes).unwrap_or(0);
        if word(magic) != MAGIC {
            return Err(format!("bad magic number {:#x}", word(magic)));
        }
        let n = word(n);
        if n > RELSEG_BLOCKS {
            return Err(format!("{n} blocks: more than a segment holds"));
        }
        Ok(Some(Header::len_for(n)))
    }

    /// Parse a whole header (exactly [`Header::needed`] bytes).
    pub fn parse(bytes: &[u8]) -> Result<Header, String> {
        let word = |i: usize| -> Result<u32, String> {
            bytes
                .get(i * 4..i * 4 + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_ne_bytes)
                .ok_or_else(|| format!("header cut short at {} bytes", bytes.len()))
        };
        let magic = word(0)?;
        if magic != MAGIC {
            return Err(format!("bad magic number {magic:#x}"));
        }
        let n = word(1)?;
        let truncation = word(2)?;
        if n > RELSEG_BLOCKS || truncation > RELSEG_BLOCKS {
            return Err(format!(
                "{n} blocks, truncation length {truncation}: more than a segment holds"
            ));
        }
        let blocks = (0..n as usize)
            .map(|i| word(3 + i))
            .collect::<Result<Vec<_>, _>>()?;
        if blocks.windows(2).any(|w| w[0] >= w[1])
            || blocks.last().is_some_and(|&b| b >= RELSEG_BLOCKS)
        {
            return Err("block numbers not ascending within a segment".into());
        }
        if bytes.len() != Header::len_for(n) {
            return Err(format!(
                "header of {} bytes, expected {}",
                bytes.len(),
                Header::len_for(n)
            ));
        }
        Ok(Header { blocks, truncation })
    }

    /// Blocks in the reconstructed file.
    pub fn reconstructed_blocks(&self) -> u32 {
        self.blocks
            .last()
            .map_or(self.truncation, |&b| self.truncation.max(b + 1))
    }
}

/// `backup_label` without the lines that make PostgreSQL refuse to start
/// from it (`INCREMENTAL FROM LSN:` and `INCREMENTAL FROM TLI:`).
pub fn complete_label(label: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len());
    for line in label.split_inclusive(|&b| b == b'\n') {
        if !line.starts_with(b"INCREMENTAL FROM ") {
            out.extend_from_slice(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(blocks: &[u32], truncation: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(MAGIC.to_ne_bytes());
        h.extend((blocks.len() as u32).to_ne_bytes());
        h.extend(truncation.to_ne_bytes());
        for b in blocks {
            h.extend(b.to_ne_bytes());
        }
        h.resize(Header::len_for(blocks.len() as u32), 0);
        h
    }

    #[test]
    fn headers_parse_and_pad_to_a_page() {
        let h = header(&[], 10);
        assert_eq!(h.len(), 12);
        assert_eq!(Header::needed(&h[..4]), Ok(None));
        assert_eq!(Header::needed(&h[..12]), Ok(Some(12)));
        assert_eq!(
            Header::parse(&h).unwrap(),
            Header {
                blocks: vec![],
                truncation: 10
            }
        );
        let h = header(&[1, 7, 40], 20);
        assert_eq!(h.len(), PAGE);
        assert_eq!(Header::needed(&h[..12]), Ok(Some(PAGE)));
        let parsed = Header::parse(&h).unwrap();
        assert_eq!(parsed.blocks, vec![1, 7, 40]);
        // a block past the truncation length extends the file
        assert_eq!(parsed.reconstructed_blocks(), 41);
        // 2045 numbers fill the first page exactly; one more needs a second
        assert_eq!(Header::len_for(2045), PAGE);
        assert_eq!(Header::len_for(2046), 2 * PAGE);
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut h = header(&[3], 5);
        h[0] ^= 1;
        assert!(Header::parse(&h).unwrap_err().contains("magic"));
        assert!(Header::needed(&h[..8]).unwrap_err().contains("magic"));
        let h = header(&[5, 3], 5);
        assert!(Header::parse(&h).unwrap_err().contains("ascending"));
        let h = header(&[3], RELSEG_BLOCKS + 1);
        assert!(Header::parse(&h).unwrap_err().contains("segment"));
        let h = header(&[3], 5);
        assert!(Header::parse(&h[..100]).is_err());
    }

    #[test]
    fn the_label_loses_only_the_incremental_lines() {
        let label = b"START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\n\
CHECKPOINT LOCATION: 0/4000080\n\
BACKUP METHOD: streamed\n\
INCREMENTAL FROM LSN: 0/2000028\n\
INCREMENTAL FROM TLI: 1\n\
START TIMELINE: 1\n";
        let out = String::from_utf8(complete_label(label)).unwrap();
        assert!(!out.contains("INCREMENTAL"));
        assert!(out.contains(
            "CHECKPOINT LOCATION: 0/4000080\nBACKUP METHOD: streamed\nSTART TIMELINE: 1\n"
        ));
        // a full backup's label is unchanged
        let full = b"START WAL LOCATION: 0/4000028\nSTART TIMELINE: 1\n";
        assert_eq!(complete_label(full), full.to_vec());
    }
}
