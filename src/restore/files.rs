//! Writing a backup's file contents: which blocks must be written (all of
//! them, or with `--delta` only those whose content differs from the file
//! already there), cut into *windows* of consecutive blocks in file order,
//! each read with one ranged read per pack it draws on, decoded into one
//! buffer per stretch of a file and written in place; windows are fetched
//! in parallel.
//!
//! Memory is bounded by the windows in flight ([`PARALLEL_WINDOWS`] × at most
//! [`MAX_WINDOW_BLOCKS`] blocks decoded and [`MAX_WINDOW_READ`] bytes read),
//! never by the size of a file.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use super::{io, RestoreError};
use crate::codec::BlockId;
use crate::progress::Progress;
use crate::repo::{BackupFile, Index, PackEntry, PackId, Repository, RunBytes, StanzaPaths};

/// Largest span of one ranged read.
pub const MAX_RUN_BYTES: u64 = 4 << 20;
/// Most blocks in one window: bounds the decoded bytes it holds (2 MiB at
/// 8 KiB blocks), whatever the compression ratio; and a file's stretch in
/// one window is long enough to go to disk with `O_DIRECT`.
const MAX_WINDOW_BLOCKS: usize = 256;
/// Most bytes the reads of one window fetch (a window may draw one block
/// from each of many groups).
const MAX_WINDOW_READ: u64 = 4 << 20;
/// Largest gap of unneeded bytes read through rather than starting a new read
/// (blocks deduplicated away or already in place leave holes).
const MAX_GAP: u64 = 256 << 10;
/// Windows fetched at once from an object store: enough to hide its
/// latency.
const PARALLEL_WINDOWS: usize = 16;
/// Windows at once from a local directory, where a read costs no round trip:
/// a window written with `O_DIRECT` waits for the disk holding its decoded
/// bytes, and 8 restore as fast as 16 with half of that memory (scale 100,
/// after churn: 1.40–1.48 s and 88–94 MiB against 1.34–1.42 s and
/// 110–115 MiB).
const PARALLEL_WINDOWS_LOCAL: usize = 8;

/// How blocks are written.
#[derive(Debug, Clone, Copy)]
pub(super) struct WriteMode {
    pub(super) block_size: usize,
    /// Over existing files, only the blocks that differ.
    pub(super) delta: bool,
    /// Block-aligned bytes with `O_DIRECT` (see [`write_blocks`]).
    pub(super) direct: bool,
}

/// A file to write: where, how big, and its blocks.
#[derive(Debug)]
pub(super) struct Target<'m> {
    pub(super) path: PathBuf,
    /// Its entry in the manifest (path, size, mode; the block ids are
    /// not read: see `blocks`).
    pub(super) file: &'m BackupFile,
    /// Its blocks as positions in the restore's [`Index`], 4 bytes each
    /// instead of a 32-byte id (a 15 GB backup's ids are 60 MB).
    pub(super) blocks: Vec<u32>,
    /// Created at its length as a hole, nothing read (`extract`: a
    /// relation recovery does not need).
    pub(super) sparse: bool,
}

/// One block to write: file (index into the targets), offset in it, and the
/// blob.
#[derive(Debug, Clone)]
struct Item {
    target: usize,
    offset: u64,
    entry: PackEntry,
}

/// Neighbouring blobs of one pack, read together.
#[derive(Debug)]
struct Run {
    pack: PackId,
    start: u64,
    end: u64,
    /// Its last blob (offset, stored length).
    last: (u32, u32),
}

impl Run {
    /// The bytes reading `e` with this run adds to it, if it may: `e` is in
    /// the group the run ends with, or after it within [`MAX_GAP`] and the
    /// run stays within [`MAX_RUN_BYTES`].
    fn grows_by(&self, e: &PackEntry) -> Option<u64> {
        let (off, len) = (u64::from(e.offset), u64::from(e.len));
        if self.last == (e.offset, e.len) {
            return Some(0);
        }
        (off >= self.end && off - self.end <= MAX_GAP && off + len - self.start <= MAX_RUN_BYTES)
            .then(|| off + len - self.end)
    }
}

/// Consecutive blocks of the restore, in file order, written together: a
/// churned backup's blocks come from several packs (most from the first
/// backup's, each changed one from a later one), and decoding a window's
/// blocks from all of them into one buffer per stretch of a file makes one
/// long write where per-pack reads made one short write per changed block.
#[derive(Debug, Default)]
struct Window {
    /// One read per pack, or more where a pack's blobs lie far apart.
    runs: Vec<Run>,
    /// Each block and the run in `runs` that reads it.
    items: Vec<(Item, usize)>,
    /// Bytes the runs fetch.
    read: u64,
}

/// What writing the files did.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriteStats {
    /// Bytes written.
    pub written: u64,
    /// Bytes left in place because they already matched (`--delta`).
    pub reused: u64,
    /// Ranged reads made.
    pub reads: u64,
    /// Bytes those reads fetched from the repository.
    pub fetched: u64,
}

/// For each target, the block indexes to write. Files are (re)created at
/// their length, reading as zeros, so all-zero blocks (relations extended
/// ahead of use, PostgreSQL 16+'s `fallocate` extension) are not read,
/// decoded or written. With `delta`, blocks of an existing file whose id
/// matches are skipped instead (hashing runs on the blocking pool, two files
/// at a time).
async fn needed_blocks(
    repo: &Repository,
    index: &Index,
    targets: &[Target<'_>],
    block_size: usize,
    delta: bool,
) -> Result<Vec<Vec<u32>>, RestoreError> {
    if !delta {
        let zero = index.position(&repo.hasher().id(&vec![0u8; block_size]));
        return Ok(targets
            .iter()
            .map(|t| {
                let full = (t.file.size / block_size as u64) as usize;
                if t.sparse {
                    return Vec::new();
                }
                (0..t.blocks.len() as u32)
                    .filter(|&i| i as usize >= full || Some(t.blocks[i as usize]) != zero)
                    .collect()
            })
            .collect());
    }
    let hasher = repo.hasher().clone();
    // by position: a closure taking a reference in a stream's type keeps
    // the command's future from being `Send` (it runs as a task, `cli::run`)
    futures::stream::iter(0..targets.len())
        .map(|i| {
            let t = &targets[i];
            let ids: Vec<BlockId> = t
                .blocks
                .iter()
                .map(|&p| index.at(p).map_or(BlockId([0; 32]), |l| l.entry.id))
                .collect();
            let (path, hasher) = (t.path.clone(), hasher.clone());
            async move {
                tokio::task::spawn_blocking(move || unchanged(&path, &ids, block_size, &hasher))
                    .await
                    .map_err(RestoreError::task("delta"))?
            }
        })
        .buffered(2)
        .map_ok(|same| {
            same.iter()
                .enumerate()
                .filter(|(_, s)| !**s)
                .map(|(i, _)| i as u32)
                .collect()
        })
        .try_collect()
        .await
}

fn block_len(size: u64, i: u32, block_size: usize) -> u64 {
    (size - (u64::from(i) * block_size as u64).min(size)).min(block_size as u64)
}

/// Which blocks of the existing file at `path` already hold `ids`.
fn unchanged(
    path: &Path,
    ids: &[BlockId],
    block_size: usize,
    hasher: &crate::codec::IdHasher,
) -> Result<Vec<bool>, RestoreError> {
    use std::io::Read;
    let mut same = vec![false; ids.len()];
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(same),
        Err(e) => return Err(io(path)(e)),
    };
    if !f.metadata().map_err(io(path))?.is_file() {
        return Ok(same);
    }
    let mut buf = vec![0u8; block_size];
    for (i, id) in ids.iter().enumerate() {
        let mut n = 0;
        while n < block_size {
            match f.read(&mut buf[n..]).map_err(io(path))? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        // a shorter last block matches only if the backup's is as short
        same[i] = hasher.id(&buf[..n]) == *id;
        if n < block_size {
            break;
        }
    }
    Ok(same)
}

/// Cut the blocks to write into windows of at most [`MAX_WINDOW_BLOCKS`]
/// blocks, in file order. Within a window each pack has its open run, which
/// a block extends when it lies just after it: a backup taken after churn
/// takes most blocks from an old pack with every changed block from a new
/// one, and extending only the newest run cut the old pack's run at every
/// changed block (60 000 runs of 25 KiB for a scale-100 database after 20 s
/// of pgbench, instead of a few hundred).
///
/// `first` is the index of `targets[0]` among all targets (windows are
/// planned for a batch of files at a time, see [`plan_batches`]).
fn plan_windows(
    index: &Index,
    targets: &[Target<'_>],
    first: usize,
    needed: &[Vec<u32>],
    block_size: usize,
) -> Result<Vec<Window>, RestoreError> {
    let mut windows: Vec<Window> = Vec::new();
    let mut w = Window::default();
    let mut open: HashMap<PackId, usize> = HashMap::new();
    for (t, (target, blocks)) in targets.iter().zip(needed).enumerate() {
        let t = first + t;
        for &i in blocks {
            let loc = target
                .blocks
                .get(i as usize)
                .and_then(|&p| index.at(p))
                .ok_or_else(|| RestoreError::Task {
                    what: "restore planning",
                    reason: format!("{}: block {i} has no position", target.file.path),
                })?;
            let item = Item {
                target: t,
                offset: u64::from(i) * block_size as u64,
                entry: loc.entry,
            };
            let grow = |w: &Window, open: &HashMap<PackId, usize>| {
                let extend = open
                    .get(&loc.pack)
                    .and_then(|&r| w.runs[r].grows_by(&loc.entry).map(|by| (Some(r), by)));
                extend.unwrap_or((None, u64::from(loc.entry.len)))
            };
            let mut how = grow(&w, &open);
            if !w.items.is_empty()
                && (w.items.len() >= MAX_WINDOW_BLOCKS || w.read + how.1 > MAX_WINDOW_READ)
            {
                windows.push(std::mem::take(&mut w));
                open.clear();
                how = grow(&w, &open);
            }
            let r = match how.0 {
                Some(r) => r,
                None => {
                    let start = u64::from(loc.entry.offset);
                    open.insert(loc.pack, w.runs.len());
                    w.runs.push(Run {
                        pack: loc.pack,
                        start,
                        end: start,
                        last: (loc.entry.offset, loc.entry.len),
                    });
                    w.runs.len() - 1
                }
            };
            let run = &mut w.runs[r];
            run.end = run
                .end
                .max(u64::from(loc.entry.offset) + u64::from(loc.entry.len));
            run.last = (loc.entry.offset, loc.entry.len);
            w.read += how.1;
            w.items.push((item, r));
        }
    }
    if !w.items.is_empty() {
        windows.push(w);
    }
    Ok(windows)
}

/// Blocks whose runs are planned together: 128 Ki blocks (1 GiB at 8 KiB)
/// hold ~8 MiB of plan and still join a churned backup's old blocks into
/// long reads.
const PLAN_BLOCKS: usize = 1 << 17;

/// Consecutive ranges of targets holding about [`PLAN_BLOCKS`] needed
/// blocks each (a file is never split).
fn plan_batches(needed: &[Vec<u32>]) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let (mut start, mut blocks) = (0, 0);
    for (t, n) in needed.iter().enumerate() {
        blocks += n.len();
        if blocks >= PLAN_BLOCKS {
            batches.push(start..t + 1);
            (start, blocks) = (t + 1, 0);
        }
    }
    if start < needed.len() {
        batches.push(start..needed.len());
    }
    batches
}

/// Create the files of `targets` at their final length and write their
/// blocks: all of them, or with `delta` only those that differ.
pub(super) async fn write_files(
    repo: &Arc<Repository>,
    paths: &StanzaPaths,
    index: &Index,
    targets: &[Target<'_>],
    how: WriteMode,
    progress: &Arc<Progress>,
) -> Result<WriteStats, RestoreError> {
    let WriteMode {
        block_size,
        delta,
        direct,
    } = how;
    let needed = needed_blocks(repo, index, targets, block_size, delta).await?;
    let to_write: u64 = targets
        .iter()
        .zip(&needed)
        .map(|(t, n)| {
            n.iter()
                .map(|&i| block_len(t.file.size, i, block_size))
                .sum::<u64>()
        })
        .sum();
    let reused = targets.iter().map(|t| t.file.size).sum::<u64>() - to_write;
    progress.add(reused);
    let files = Arc::new(Files {
        slots: targets
            .iter()
            .map(|t| FileSlot {
                path: t.path.clone(),
                size: t.file.size,
                sparse: t.sparse,
                created: std::sync::Mutex::new(false),
                unsynced: std::sync::Mutex::new(0),
            })
            .collect(),
        direct: AtomicBool::new(direct),
        delta,
    });
    // every file is created by whichever comes first: this task, going
    // through them in order, or the first write to it (file creation is
    // slow and serial on one directory; it overlaps the writes)
    let all = files.clone();
    let creator =
        tokio::task::spawn_blocking(move || all.slots.iter().try_for_each(|s| s.create(all.delta)));
    let files = &files;
    // windows are planned a batch of files at a time as the reads go on,
    // so the plan held is a batch's (64 bytes per block), not the backup's
    let needed = &needed;
    let parallel = match repo.storage().local_dir() {
        Some(_) => PARALLEL_WINDOWS_LOCAL,
        None => PARALLEL_WINDOWS,
    };
    let windows = futures::stream::iter(plan_batches(needed))
        .map(move |range| {
            plan_windows(
                index,
                &targets[range.clone()],
                range.start,
                &needed[range],
                block_size,
            )
            .map(|windows| futures::stream::iter(windows.into_iter().map(Ok)))
        })
        .try_flatten();
    let (written, reads, fetched) = windows
        .map_ok(|window| async move {
            let reads = window.runs.len() as u64;
            let bytes: Vec<RunBytes> =
                futures::future::try_join_all(window.runs.iter().enumerate().map(|(r, run)| {
                    let entries: Vec<PackEntry> = window
                        .items
                        .iter()
                        .filter(|(_, of)| *of == r)
                        .map(|(item, _)| item.entry)
                        .collect();
                    async move { repo.fetch_run(paths, &run.pack, &entries).await }
                }))
                .await?;
            let jobs: Vec<Job> = window
                .items
                .iter()
                .map(|(item, run)| {
                    let t = &targets[item.target];
                    let want = block_len(
                        t.file.size,
                        (item.offset / block_size as u64) as u32,
                        block_size,
                    );
                    Job {
                        target: item.target,
                        offset: item.offset,
                        want,
                        entry: item.entry,
                        run: *run,
                    }
                })
                .collect();
            let (progress, files) = (progress.clone(), files.clone());
            let n =
                tokio::task::spawn_blocking(move || write_blocks(jobs, &bytes, &files, &progress))
                    .await
                    .map_err(RestoreError::task("write"))??;
            Ok::<_, RestoreError>((n, reads, window.read))
        })
        .try_buffer_unordered(parallel)
        .try_fold(
            (0u64, 0u64, 0u64),
            |(bytes, reads, fetched), (n, r, span)| async move {
                Ok((bytes + n, reads + r, fetched + span))
            },
        )
        .await?;
    creator
        .await
        .map_err(RestoreError::task("file creation"))??;
    Ok(WriteStats {
        written,
        reused,
        reads,
        fetched,
    })
}

/// The files being written, and how.
struct Files {
    slots: Vec<FileSlot>,
    /// Block-aligned pieces go to disk with `O_DIRECT` until a file system
    /// refuses it.
    direct: AtomicBool,
    /// Files are written over, not recreated (`--delta`).
    delta: bool,
}

/// A file being written. Its lock makes one writer per file at a time:
/// buffered writes to one file serialize on its inode lock in the kernel,
/// where a waiting thread spins while the owner copies (an eighth of a
/// scale-100 restore's CPU); waiting here parks the thread and frees the
/// core for decoding. The lock guards the bytes written through the page
/// cache since the file's last early sync.
struct FileSlot {
    path: PathBuf,
    size: u64,
    /// A hole: never allocated.
    sparse: bool,
    /// (Re)created at its final length yet? Inode allocation is slow (a
    /// third of a second for a thousand files after a `rm -rf`, under one
    /// directory lock), so files are created while blocks are written: by a
    /// task going through them in order, or by the first write to one.
    created: std::sync::Mutex<bool>,
    unsynced: std::sync::Mutex<u64>,
}

impl FileSlot {
    /// Create the file at its final length, its blocks allocated (blocks
    /// land in place; a delta restore cuts a file that grew since the
    /// backup), once.
    fn create(&self, delta: bool) -> Result<(), RestoreError> {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        if *created {
            return Ok(());
        }
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(!delta)
            .open(&self.path)
            .and_then(|f| {
                f.set_len(self.size)?;
                if self.sparse {
                    return Ok(());
                }
                reserve(&f, self.size)
            })
            .map_err(io(&self.path))?;
        *created = true;
        Ok(())
    }
}

/// Allocate a file's blocks before they are written: blocks of a backup
/// taken after churn arrive scattered, and writing them into holes made
/// the file system map each one separately (a restore at scale 100 after
/// 20 s of churn: 1.3–1.5 s instead of 1.6–1.7 s). A full disk is reported
/// here, before gigabytes are written; a file system without `fallocate`
/// is simply written as before.
fn reserve(f: &std::fs::File, size: u64) -> std::io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    match nix::fcntl::fallocate(f, nix::fcntl::FallocateFlags::empty(), 0, len) {
        Err(nix::errno::Errno::ENOSPC) => Err(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)),
        _ => Ok(()),
    }
}

/// One block of a run and where it goes.
struct Job {
    /// Index of its file in the targets (and the slots).
    target: usize,
    offset: u64,
    /// Bytes the block must hold (the file's last block may be short).
    want: u64,
    entry: PackEntry,
    /// The read (of its window's) that holds its blob.
    run: usize,
}

/// Bytes of one file written through the page cache without a sync after
/// which the writing thread syncs it: the disk writes back while the restore
/// goes on decoding, instead of all at the end.
const EARLY_SYNC_BYTES: u64 = 64 << 20;

/// Alignment of direct writes (offset, length and memory): the page size, a
/// multiple of the logical block size of the disks this runs on.
const DIRECT_ALIGN: usize = 4096;

/// Smallest stretch written with `O_DIRECT`. A direct write waits for the
/// disk; the scattered blocks of a backup taken after churn made thousands
/// of 8 KiB direct writes (6.2 s instead of 1.7 s through the page cache, at
/// scale 100), while a fresh restore's long runs gain from skipping the
/// cache.
const DIRECT_MIN: usize = 1 << 20;

/// Consecutive blocks of one file, gathered into one buffer whose first
/// `aligned` bytes start at a [`DIRECT_ALIGN`]ed address (`buf[pad..]`).
struct Piece {
    target: usize,
    offset: u64,
    buf: Vec<u8>,
    pad: usize,
}

impl Piece {
    fn new(target: usize, offset: u64, len: usize) -> Piece {
        let mut buf: Vec<u8> = Vec::with_capacity(len + DIRECT_ALIGN);
        let pad = buf.as_ptr().align_offset(DIRECT_ALIGN);
        buf.resize(pad, 0);
        Piece {
            target,
            offset,
            buf,
            pad,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.pad..]
    }

    fn end(&self) -> u64 {
        self.offset + (self.buf.len() - self.pad) as u64
    }
}

/// Decode the blocks of one window and write them in place: consecutive
/// blocks of one file are decoded straight into one buffer, from whichever
/// of the window's reads holds each, and written with one call, and
/// consecutive writes to one file share one open file and one hold of its
/// slot's lock.
///
/// With [`WriteMode::direct`], stretches of at least [`DIRECT_MIN`] are
/// written with `O_DIRECT`: they go from this buffer
/// to the disk, with no copy into the page cache, no page-cache memory to
/// find (on a host whose memory is full of cache, reclaiming it cost more
/// than the restore's own work) and nothing left to write back. Shorter
/// stretches, and tails that are not page-aligned, go through the page
/// cache.
fn write_blocks(
    jobs: Vec<Job>,
    bytes: &[RunBytes],
    files: &Files,
    progress: &Progress,
) -> Result<u64, RestoreError> {
    // validate, and size the pieces of consecutive blocks
    let mut sizes: Vec<usize> = Vec::new();
    let mut last: Option<(usize, u64)> = None;
    for job in &jobs {
        if u64::from(job.entry.raw_len) != job.want {
            return Err(RestoreError::BadBlockLength {
                file: files.slots[job.target].path.clone(),
                offset: job.offset,
                found: u64::from(job.entry.raw_len),
                expected: job.want,
            });
        }
        match (last, sizes.last_mut()) {
            (Some((t, end)), Some(n)) if t == job.target && end == job.offset => {
                *n += job.want as usize
            }
            _ => sizes.push(job.want as usize),
        }
        last = Some((job.target, job.offset + job.want));
    }
    let written = jobs.iter().map(|j| j.want).sum();
    let mut pieces: Vec<Piece> = Vec::with_capacity(sizes.len());
    let mut sizes = sizes.into_iter();
    for job in &jobs {
        if !matches!(pieces.last(), Some(p) if p.target == job.target && p.end() == job.offset) {
            let len = sizes.next().unwrap_or(0);
            pieces.push(Piece::new(job.target, job.offset, len));
        }
        let read = bytes.get(job.run).ok_or_else(|| RestoreError::Task {
            what: "restore",
            reason: format!("block at {} has no read", job.offset),
        })?;
        if let Some(p) = pieces.last_mut() {
            read.decode_into(&job.entry, &mut p.buf)?;
        }
    }
    // write them, one file at a time
    let mut rest = &pieces[..];
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|p| p.target == first.target).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        let slot = &files.slots[first.target];
        slot.create(files.delta)?;
        write_group(group, slot, &files.direct, progress)?;
    }
    Ok(written)
}

/// Write the pieces of one file: block-aligned bytes directly (the kernel
/// orders direct writes to one file itself), what is left through the page
/// cache under the file's lock.
fn write_group(
    group: &[Piece],
    slot: &FileSlot,
    direct: &AtomicBool,
    progress: &Progress,
) -> Result<(), RestoreError> {
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(flags)
            .open(&slot.path)
    };
    let mut direct_file: Option<std::fs::File> = None;
    let mut tails: Vec<(&[u8], u64)> = Vec::new();
    for p in group {
        let data = p.data();
        let aligned = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let mut done = 0;
        if aligned >= DIRECT_MIN
            && p.offset % DIRECT_ALIGN as u64 == 0
            && direct.load(Ordering::Relaxed)
        {
            if direct_file.is_none() {
                match open(nix::libc::O_DIRECT) {
                    Ok(f) => direct_file = Some(f),
                    // a file system without direct I/O: the page cache it is
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        direct.store(false, Ordering::Relaxed)
                    }
                    Err(e) => return Err(io(&slot.path)(e)),
                }
            }
            if let Some(f) = &direct_file {
                match f.write_all_at(&data[..aligned], p.offset) {
                    Ok(()) => {
                        done = aligned;
                        progress.add(aligned as u64);
                    }
                    // stricter alignment than a page: the page cache it is
                    Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        direct.store(false, Ordering::Relaxed);
                        direct_file = None;
                    }
                    Err(e) => return Err(io(&slot.path)(e)),
                }
            }
        }
        if done < data.len() {
            tails.push((&data[done..], p.offset + done as u64));
        }
    }
    if tails.is_empty() {
        return Ok(());
    }
    let f = open(0).map_err(io(&slot.path))?;
    let sync_now = {
        let mut unsynced = slot.unsynced.lock().unwrap_or_else(|e| e.into_inner());
        for (data, offset) in tails {
            f.write_all_at(data, offset).map_err(io(&slot.path))?;
            *unsynced += data.len() as u64;
            progress.add(data.len() as u64);
        }
        let due = *unsynced >= EARLY_SYNC_BYTES;
        if due {
            *unsynced = 0;
        }
        due
    };
    if sync_now {
        f.sync_data().map_err(io(&slot.path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `n` blocks whose blocks in `changed` were stored by a later
    /// backup: the old pack holds every block as first stored, the new pack
    /// the changed ones; blobs of 100 bytes.
    fn churned(n: u8, changed: &[u8]) -> (Index, BackupFile, PackId, PackId) {
        let id = |n: u8| BlockId([n; 32]);
        let entry = |n: u8, slot: u32| PackEntry {
            id: id(n),
            offset: slot * 100,
            len: 100,
            raw_len: 8192,
            compression: 0,
        };
        let (old, new) = (PackId([1; 16]), PackId([2; 16]));
        let mut index = Index::new();
        index.add_pack(
            old,
            &(0..n).map(|b| entry(b, u32::from(b))).collect::<Vec<_>>(),
        );
        let fresh: Vec<PackEntry> = changed
            .iter()
            .enumerate()
            .map(|(slot, &b)| entry(128 + b, slot as u32))
            .collect();
        index.add_pack(new, &fresh);
        let blocks: Vec<BlockId> = (0..n)
            .map(|b| {
                if changed.contains(&b) {
                    id(128 + b)
                } else {
                    id(b)
                }
            })
            .collect();
        let file = BackupFile {
            path: "base/5/16384".into(),
            kind: crate::repo::FileKind::File,
            size: u64::from(n) * 8192,
            mode: 0o600,
            mtime: 0,
            blocks,
        };
        (index, file, old, new)
    }

    fn target<'m>(index: &Index, file: &'m BackupFile) -> Target<'m> {
        Target {
            path: PathBuf::from("/x").join(&file.path),
            blocks: file
                .blocks
                .iter()
                .map(|id| index.position(id).unwrap())
                .collect(),
            file,
            sparse: false,
        }
    }

    /// Regression: a backup taken after churn takes most blocks from an old
    /// pack and each changed block from a new one; extending only the newest
    /// run cut the old pack's run at every changed block. And the window
    /// keeps the blocks in file order, so the file is written in one piece.
    #[test]
    fn a_window_reads_each_pack_once_and_keeps_file_order() {
        let (index, file, old, new) = churned(10, &[3, 7]);
        let targets = [target(&index, &file)];
        let windows = plan_windows(&index, &targets, 0, &[(0..10).collect()], 8192).unwrap();
        assert_eq!(windows.len(), 1);
        let w = &windows[0];
        assert_eq!(w.runs.len(), 2, "one read per pack");
        let offsets: Vec<u64> = w.items.iter().map(|(i, _)| i.offset / 8192).collect();
        assert_eq!(offsets, (0..10).collect::<Vec<_>>());
        let from: Vec<PackId> = w.items.iter().map(|(_, r)| w.runs[*r].pack).collect();
        for (b, pack) in from.iter().enumerate() {
            let want = if b == 3 || b == 7 { new } else { old };
            assert_eq!(*pack, want, "block {b}");
        }
        // the old pack is read from block 0 to 9 (its 3 and 7 read through)
        let r = w.runs.iter().find(|r| r.pack == old).unwrap();
        assert_eq!((r.start, r.end), (0, 1000));
        assert_eq!(w.read, 1000 + 200);
    }

    #[test]
    fn windows_are_bounded_in_blocks() {
        let n = 200u8;
        let (index, file, _, _) = churned(n, &[]);
        let big = BackupFile {
            size: 3 * u64::from(n) * 8192,
            blocks: file.blocks.repeat(3),
            ..file.clone()
        };
        let targets = [target(&index, &big)];
        let all: Vec<u32> = (0..u32::from(n) * 3).collect();
        let windows = plan_windows(&index, &targets, 0, &[all], 8192).unwrap();
        let sizes: Vec<usize> = windows.iter().map(|w| w.items.len()).collect();
        assert_eq!(
            sizes,
            [
                MAX_WINDOW_BLOCKS,
                MAX_WINDOW_BLOCKS,
                600 - 2 * MAX_WINDOW_BLOCKS
            ]
        );
        // the same blobs again start a new read of the pack
        assert!(windows
            .iter()
            .all(|w| w.runs.iter().all(|r| r.end > r.start)));
        assert_eq!(windows[0].runs.len(), 2, "blocks 0..199, then 0..55 again");
    }

    #[test]
    fn windows_are_bounded_in_bytes_read() {
        // blobs of 1 MiB (a block from each of many groups): four fit
        let entries: Vec<PackEntry> = (0..6u8)
            .map(|n| PackEntry {
                id: BlockId([n; 32]),
                offset: u32::from(n) << 20,
                len: 1 << 20,
                raw_len: 8192,
                compression: 0,
            })
            .collect();
        let mut index = Index::new();
        index.add_pack(PackId([1; 16]), &entries);
        let file = BackupFile {
            path: "base/5/16384".into(),
            kind: crate::repo::FileKind::File,
            size: 6 * 8192,
            mode: 0o600,
            mtime: 0,
            blocks: entries.iter().map(|e| e.id).collect(),
        };
        let targets = [target(&index, &file)];
        let windows = plan_windows(&index, &targets, 0, &[(0..6).collect()], 8192).unwrap();
        let reads: Vec<(usize, u64)> = windows.iter().map(|w| (w.items.len(), w.read)).collect();
        assert_eq!(reads, [(4, MAX_WINDOW_READ), (2, 2 << 20)]);
    }

    #[test]
    fn plan_batches_cover_every_file_once() {
        let needed: Vec<Vec<u32>> = [PLAN_BLOCKS + 3, 5, PLAN_BLOCKS - 6, 1, 0, 2]
            .iter()
            .map(|&n| (0..n as u32).collect())
            .collect();
        assert_eq!(plan_batches(&needed), [0..1, 1..4, 4..6]);
        assert_eq!(plan_batches(&[]), Vec::<std::ops::Range<usize>>::new());
        let both = plan_batches(&[vec![], vec![]]);
        assert_eq!((both.len(), both.first()), (1, Some(&(0..2))));
    }

    #[test]
    fn block_lengths_cover_the_file() {
        assert_eq!(block_len(20000, 0, 8192), 8192);
        assert_eq!(block_len(20000, 2, 8192), 20000 - 16384);
        assert_eq!(block_len(16384, 2, 8192), 0);
        let total: u64 = (0..3).map(|i| block_len(20000, i, 8192)).sum();
        assert_eq!(total, 20000);
    }
}
