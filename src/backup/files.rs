//! Archive events → manifest entries: file contents are cut into blocks of the
//! repository's block size and stored through a [`Session`], batched across
//! files so that many small files still keep every CPU busy.
//!
//! Runs on a blocking thread (the session's `put_blocks` blocks on rayon and
//! on upload back-pressure).

use bytes::{Bytes, BytesMut};

use super::stream::ArchiveEvent;
use super::tar::{EntryKind, TarEvent};
use crate::codec::BlockId;
use crate::repo::{BackupFile, FileKind, RepoError, Session};

/// Blocks stored together (spread over the CPU workers).
const BATCH: usize = 256;

/// Builds the file list of a backup from archive events.
pub struct FileAssembler<'s> {
    session: &'s Session,
    block_size: usize,
    prefix: String,
    files: Vec<BackupFile>,
    /// Block ids not known yet (placeholders) per file.
    pending_ids: Vec<Vec<Option<BlockId>>>,
    current: Option<usize>,
    buf: BytesMut,
    batch: Vec<(usize, usize, Bytes)>,
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
            pending_ids: Vec::new(),
            current: None,
            buf: BytesMut::with_capacity(block_size),
            batch: Vec::with_capacity(BATCH),
        }
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
                self.files.push(BackupFile {
                    path: format!("{}{}", self.prefix, h.path),
                    kind,
                    size: h.size,
                    mode: h.mode,
                    mtime: h.mtime,
                    blocks: Vec::new(),
                });
                self.pending_ids.push(Vec::new());
                self.current = Some(self.files.len() - 1);
            }
            ArchiveEvent::Tar(TarEvent::Data(mut d)) => {
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
            }
            ArchiveEvent::Tar(TarEvent::EntryEnd) => {
                if !self.buf.is_empty() {
                    let block = self.buf.split().freeze();
                    self.queue(block)?;
                }
                self.current = None;
            }
        }
        Ok(())
    }

    fn queue(&mut self, block: Bytes) -> Result<(), RepoError> {
        let file = self.current.ok_or(RepoError::MalformedInput(
            "archive data outside of any file",
        ))?;
        let slot = self.pending_ids[file].len();
        self.pending_ids[file].push(None);
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
        for ((file, slot, _), id) in self.batch.drain(..).zip(ids) {
            self.pending_ids[file][slot] = Some(id);
        }
        Ok(())
    }

    /// Store what is left and return the files, in archive order.
    pub fn finish(mut self) -> Result<Vec<BackupFile>, RepoError> {
        if self.current.is_some() {
            return Err(RepoError::MalformedInput("the archive ended inside a file"));
        }
        self.flush()?;
        for (f, ids) in self.files.iter_mut().zip(self.pending_ids) {
            f.blocks =
                ids.into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or(RepoError::MalformedInput(
                        "a block of a file was never stored",
                    ))?;
        }
        Ok(self.files)
    }
}
