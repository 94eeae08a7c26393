//! Archive events → manifest entries: file contents are cut into blocks of the
//! repository's block size and stored through a [`Session`], batched across
//! files so that many small files still keep every CPU busy.
//!
//! In an incremental backup (PostgreSQL 17+, [`super::incremental`]) each
//! `INCREMENTAL.<name>` file becomes the complete `<name>`: its blocks go
//! to their places, the previous backup's block ids fill the rest.
//!
//! Runs on a blocking thread (the session's `put_blocks` blocks on rayon and
//! on upload back-pressure).
//!
//! The block ids of the files read so far (32 bytes a block, needed for the
//! manifest at the end) go to an unnamed temporary file once they pass
//! [`HELD_IDS`] (8 MiB), and are read back when the archive ends: a 15 GB
//! backup held 58 MB of them at its peak, a 1 TB one would hold 4 GB.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::incremental::{self, Header, IncrementalBase};
use super::stream::ArchiveEvent;
use super::tar::{EntryKind, TarEvent};
use crate::codec::BlockId;
use crate::repo::{BackupFile, FileKind, RepoError, Session};

/// Blocks stored together (spread over the CPU workers).
const BATCH: usize = 256;

/// Most block ids reserved for a file before its data arrives.
const MAX_RESERVE: u64 = 1 << 17;

/// The id a queued block holds until its batch is stored.
const PLACEHOLDER: BlockId = BlockId([0; 32]);

/// Block ids of finished files held in memory before they are written to
/// the spill file (8 MiB).
const HELD_IDS: usize = 1 << 18;

/// Finished files' block ids, moved out of memory.
struct Spill {
    /// The unnamed temporary file (`$TMPDIR`), made at the first spill
    /// (if it cannot be made, `limit` becomes unreachable and the ids stay
    /// in memory).
    file: Option<std::io::BufWriter<std::fs::File>>,
    /// Ids each spilled file had: files `0..counts.len()` are spilled.
    counts: Vec<u32>,
    /// Files `0..counted` are in `held` (or spilled).
    counted: usize,
    /// Ids of finished files still in memory.
    held: usize,
    /// How many may be before they are spilled.
    limit: usize,
}

/// What the entry being read is.
enum Entry {
    /// None, or a plain file: its blocks in order.
    Plain,
    /// `backup_label` of an incremental backup, held whole until its end.
    Label(Vec<u8>),
    /// An incremental file's header, until it is complete.
    IncrementalHeader(Vec<u8>),
    /// An incremental file's blocks: the slot of each, and how many came.
    IncrementalBlocks(Vec<u32>, usize),
}

/// Builds the file list of a backup from archive events.
pub struct FileAssembler<'s> {
    session: &'s Session,
    block_size: usize,
    prefix: String,
    /// The files so far; a block's id is a placeholder until its batch
    /// is stored (`missing` counts them).
    files: Vec<BackupFile>,
    /// Blocks queued whose id is not filled in yet.
    missing: usize,
    current: Option<usize>,
    entry: Entry,
    buf: BytesMut,
    batch: Vec<(usize, usize, Bytes)>,
    /// The previous backup, and whether the server is sending an
    /// incremental backup against it (set before the first event).
    base: Option<(Arc<IncrementalBase>, Arc<AtomicBool>)>,
    zero_block: Option<BlockId>,
    spill: Spill,
}

impl std::fmt::Debug for FileAssembler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileAssembler")
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

impl<'s> FileAssembler<'s> {
    /// Store into `session`.
    pub fn new(session: &'s Session) -> FileAssembler<'s> {
        let block_size = session.block_size();
        FileAssembler {
            session,
            block_size,
            prefix: String::new(),
            files: Vec::new(),
            missing: 0,
            current: None,
            entry: Entry::Plain,
            buf: BytesMut::with_capacity(block_size),
            batch: Vec::with_capacity(BATCH),
            base: None,
            zero_block: None,
            spill: Spill {
                file: None,
                counts: Vec::new(),
                counted: 0,
                held: 0,
                limit: HELD_IDS,
            },
        }
    }

    /// Complete the incremental files of a backup taken against `base`,
    /// when `active` is set by the time the first event arrives.
    pub fn with_base(mut self, base: Arc<IncrementalBase>, active: Arc<AtomicBool>) -> Self {
        self.base = Some((base, active));
        self
    }

    /// Spill finished files' ids once more than `ids` are held (default
    /// [`HELD_IDS`]; tests use a few).
    pub fn with_held_ids(mut self, ids: usize) -> Self {
        self.spill.limit = ids;
        self
    }

    fn incremental(&self) -> bool {
        self.base
            .as_ref()
            .is_some_and(|(_, on)| on.load(Ordering::Acquire))
    }

    /// Take one event.
    pub fn push(&mut self, event: ArchiveEvent) -> Result<(), RepoError> {
        match event {
            ArchiveEvent::Archive(None) => self.prefix.clear(),
            ArchiveEvent::Archive(Some(oid)) => self.prefix = format!("pg_tblspc/{oid}/"),
            ArchiveEvent::Progress(_) | ArchiveEvent::Tar(TarEvent::End) => {}
            ArchiveEvent::Tar(TarEvent::Entry(h)) => {
                let kind = match h.kind {
                    EntryKind::File => FileKind::File,
                    EntryKind::Directory => FileKind::Directory,
                    EntryKind::Symlink(t) => FileKind::Symlink(t),
                };
                let mut path = format!("{}{}", self.prefix, h.path);
                self.entry = Entry::Plain;
                if kind == FileKind::File && self.incremental() {
                    let (dir, name) = match path.rsplit_once('/') {
                        Some((d, n)) => (format!("{d}/"), n),
                        None => (String::new(), path.as_str()),
                    };
                    if let Some(rel) = name.strip_prefix(incremental::PREFIX) {
                        path = format!("{dir}{rel}");
                        self.entry = Entry::IncrementalHeader(Vec::new());
                    } else if path == "backup_label" {
                        self.entry = Entry::Label(Vec::new());
                    }
                }
                // ids are 32 bytes a block, held until the manifest is
                // written: room for exactly the blocks the header's size
                // needs (an incremental file is laid out once its header
                // is read)
                let blocks = match (&kind, &self.entry) {
                    (FileKind::File, Entry::Plain) => {
                        // (at most a relation segment's worth up front: the
                        // size comes from the server's tar header)
                        let n = h.size.div_ceil(self.block_size as u64).min(MAX_RESERVE);
                        Vec::with_capacity(n as usize)
                    }
                    _ => Vec::new(),
                };
                self.files.push(BackupFile {
                    path,
                    kind,
                    size: h.size,
                    mode: h.mode,
                    mtime: h.mtime,
                    blocks,
                });
                self.current = Some(self.files.len() - 1);
            }
            ArchiveEvent::Tar(TarEvent::Data(mut d)) => {
                match &mut self.entry {
                    Entry::Label(held) => {
                        held.extend_from_slice(&d);
                        return Ok(());
                    }
                    Entry::IncrementalHeader(held) => {
                        let mut complete = false;
                        while !d.is_empty() {
                            let need = match Header::needed(held) {
                                Ok(n) => n.unwrap_or(12),
                                Err(e) => return Err(self.bad_incremental(&e)),
                            };
                            if held.len() >= need {
                                complete = true;
                                break;
                            }
                            let take = (need - held.len()).min(d.len());
                            held.extend_from_slice(&d.split_to(take));
                        }
                        if complete || Header::needed(held) == Ok(Some(held.len())) {
                            self.start_incremental_blocks()?;
                        }
                        if d.is_empty() {
                            return Ok(());
                        }
                    }
                    Entry::Plain | Entry::IncrementalBlocks(..) => {}
                }
                self.cut(d)?;
            }
            ArchiveEvent::Tar(TarEvent::EntryEnd) => {
                match std::mem::replace(&mut self.entry, Entry::Plain) {
                    Entry::Label(held) => {
                        let label = incremental::complete_label(&held);
                        self.set_size(label.len() as u64)?;
                        self.cut(Bytes::from(label))?;
                    }
                    Entry::IncrementalHeader(held) => {
                        // a header alone: no block changed
                        if Header::needed(&held) != Ok(Some(held.len())) {
                            return Err(self.bad_incremental("the file ends inside its header"));
                        }
                        self.entry = Entry::IncrementalHeader(held);
                        self.start_incremental_blocks()?;
                        self.entry = Entry::Plain;
                    }
                    Entry::IncrementalBlocks(slots, got) => {
                        if got != slots.len() || !self.buf.is_empty() {
                            return Err(self.bad_incremental("fewer blocks than its header lists"));
                        }
                    }
                    Entry::Plain => {}
                }
                if !self.buf.is_empty() {
                    let block = self.buf.split().freeze();
                    self.queue(block)?;
                }
                self.current = None;
            }
        }
        Ok(())
    }

    /// Cut data into blocks.
    fn cut(&mut self, mut d: Bytes) -> Result<(), RepoError> {
        while !d.is_empty() {
            if self.buf.is_empty() && d.len() >= self.block_size {
                // a whole block straight from the network buffer, no copy
                let block = d.split_to(self.block_size);
                self.queue(block)?;
                continue;
            }
            let take = (self.block_size - self.buf.len()).min(d.len());
            self.buf.extend_from_slice(&d.split_to(take));
            if self.buf.len() == self.block_size {
                let block = self.buf.split().freeze();
                self.queue(block)?;
            }
        }
        Ok(())
    }

    fn bad_incremental(&self, what: &str) -> RepoError {
        let path = self
            .current
            .map(|f| self.files[f].path.as_str())
            .unwrap_or("?");
        RepoError::Corrupt {
            object: format!("the server's incremental file for {path}"),
            reason: what.to_owned(),
        }
    }

    fn set_size(&mut self, size: u64) -> Result<(), RepoError> {
        let file = self.current.ok_or(RepoError::MalformedInput(
            "archive data outside of any file",
        ))?;
        self.files[file].size = size;
        Ok(())
    }

    /// The header is complete: lay out the whole file, the previous
    /// backup's blocks in place, and wait for the changed ones.
    fn start_incremental_blocks(&mut self) -> Result<(), RepoError> {
        let Entry::IncrementalHeader(held) = &self.entry else {
            return Ok(());
        };
        let header = Header::parse(held).map_err(|e| self.bad_incremental(&e))?;
        let file = self.current.ok_or(RepoError::MalformedInput(
            "archive data outside of any file",
        ))?;
        let Some((base, _)) = self.base.as_ref() else {
            return Err(self.bad_incremental("an incremental file in a full backup"));
        };
        let path = &self.files[file].path;
        let prior = base.blocks(path).cloned().ok_or_else(|| RepoError::Corrupt {
            object: format!("backup {}", base.id),
            reason: format!("has no whole-page file {path}, which the server sent as changes against it; take the next backup with --no-incremental"),
        })?;
        let total = header.reconstructed_blocks() as usize;
        let zero = match self.zero_block {
            Some(z) => z,
            None => {
                let z = self.session.put_block(&[0u8; incremental::PAGE])?;
                self.zero_block = Some(z);
                z
            }
        };
        // the changed blocks' places are filled in as they are stored
        // (`queue` counts them in `missing`, `EntryEnd` checks they all came)
        let ids: Vec<BlockId> = (0..total)
            .map(|b| {
                if b < header.truncation as usize {
                    prior.get(b).copied().unwrap_or(zero)
                } else {
                    zero
                }
            })
            .collect();
        self.files[file].blocks = ids;
        self.files[file].size = (total * incremental::PAGE) as u64;
        self.entry = Entry::IncrementalBlocks(header.blocks, 0);
        Ok(())
    }

    fn queue(&mut self, block: Bytes) -> Result<(), RepoError> {
        let file = self.current.ok_or(RepoError::MalformedInput(
            "archive data outside of any file",
        ))?;
        let slot = match &mut self.entry {
            Entry::IncrementalBlocks(slots, got) => {
                let Some(&slot) = slots.get(*got) else {
                    return Err(self.bad_incremental("more blocks than its header lists"));
                };
                *got += 1;
                slot as usize
            }
            _ => {
                let blocks = &mut self.files[file].blocks;
                blocks.push(PLACEHOLDER);
                blocks.len() - 1
            }
        };
        self.missing += 1;
        self.batch.push((file, slot, block));
        if self.batch.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RepoError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let blocks: Vec<Bytes> = self.batch.iter().map(|(_, _, b)| b.clone()).collect();
        let ids = self.session.put_blocks(&blocks)?;
        let n = self.batch.len();
        if ids.len() != n {
            return Err(RepoError::MalformedInput(
                "a block of a file was never stored",
            ));
        }
        for ((file, slot, _), id) in self.batch.drain(..).zip(ids) {
            let place = self
                .files
                .get_mut(file)
                .and_then(|f| f.blocks.get_mut(slot));
            *place.ok_or(RepoError::MalformedInput(
                "a block of a file was never stored",
            ))? = id;
        }
        self.missing -= n;
        self.spill_finished()
    }

    /// Every queued block is stored: the files before the current one are
    /// finished. Once their ids pass [`HELD_IDS`], write them to the spill
    /// file and free them.
    fn spill_finished(&mut self) -> Result<(), RepoError> {
        let end = self.current.unwrap_or(self.files.len());
        if end <= self.spill.counted {
            return Ok(());
        }
        self.spill.held += self.files[self.spill.counted..end]
            .iter()
            .map(|f| f.blocks.len())
            .sum::<usize>();
        self.spill.counted = end;
        if self.spill.held < self.spill.limit {
            return Ok(());
        }
        if self.spill.file.is_none() {
            match tempfile::tempfile() {
                Ok(f) => self.spill.file = Some(std::io::BufWriter::with_capacity(1 << 20, f)),
                Err(e) => {
                    // a full or read-only temporary directory costs memory,
                    // not the backup
                    tracing::warn!(
                        "the block ids of the files read stay in memory: no temporary file ({e})"
                    );
                    self.spill.limit = usize::MAX;
                    return Ok(());
                }
            }
        }
        let Some(out) = self.spill.file.as_mut() else {
            return Ok(());
        };
        let done = self.spill.counts.len();
        for f in &mut self.files[done..end] {
            let ids = std::mem::take(&mut f.blocks);
            for id in &ids {
                std::io::Write::write_all(out, &id.0).map_err(spill_failed)?;
            }
            self.spill.counts.push(
                u32::try_from(ids.len())
                    .map_err(|_| RepoError::MalformedInput("a file of more than 2^32 blocks"))?,
            );
        }
        self.spill.held = 0;
        Ok(())
    }

    /// Store what is left and return the files, in archive order.
    pub fn finish(mut self) -> Result<AssembledFiles, RepoError> {
        if self.current.is_some() {
            return Err(RepoError::MalformedInput("the archive ended inside a file"));
        }
        self.flush()?;
        if self.missing != 0 {
            return Err(RepoError::MalformedInput(
                "a block of a file was never stored",
            ));
        }
        Ok(AssembledFiles {
            files: self.files,
            spilled: self.spill.file.map(|f| (f, self.spill.counts)),
        })
    }
}

fn spill_failed(source: std::io::Error) -> RepoError {
    RepoError::Spill {
        dir: std::env::temp_dir(),
        source,
    }
}

/// The files of a finished archive. The block ids of the first ones may
/// still be in the temporary file: [`AssembledFiles::into_files`] reads them
/// back (call it after the session finished, so its dedup set is freed
/// first).
pub struct AssembledFiles {
    files: Vec<BackupFile>,
    spilled: Option<(std::io::BufWriter<std::fs::File>, Vec<u32>)>,
}

impl std::fmt::Debug for AssembledFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssembledFiles")
            .field("files", &self.files.len())
            .field("spilled", &self.spilled.as_ref().map(|(_, c)| c.len()))
            .finish()
    }
}

impl AssembledFiles {
    /// The files with every block id (blocking: reads the temporary file).
    pub fn into_files(self) -> Result<Vec<BackupFile>, RepoError> {
        let AssembledFiles { mut files, spilled } = self;
        let Some((out, counts)) = spilled else {
            return Ok(files);
        };
        let mut file = out.into_inner().map_err(|e| spill_failed(e.into_error()))?;
        std::io::Seek::rewind(&mut file).map_err(spill_failed)?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, file);
        for (f, &n) in files.iter_mut().zip(&counts) {
            let mut ids = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let mut id = [0u8; 32];
                std::io::Read::read_exact(&mut r, &mut id).map_err(spill_failed)?;
                ids.push(BlockId(id));
            }
            f.blocks = ids;
        }
        Ok(files)
    }
}
