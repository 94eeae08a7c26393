//! `walvault files restore`: a snapshot (or the part under `--path`) to a
//! directory or a bucket.
//!
//! To a directory, each file is written under a temporary name beside its
//! place, given its mode, owner (when run as root) and mtime, then renamed;
//! directories get their mode and mtime last, deepest first. Into an empty
//! target one `syncfs` at the end makes all of it durable before success
//! is reported; over existing files (`--overwrite`) each file is fsynced
//! before its rename replaces the old one, and every directory after. To a bucket, each object is one PUT, or a multipart upload
//! from [`MULTIPART_AT`] on (visible only when complete), with its content
//! type and user metadata. Every chunk is authenticated when read.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::source::Place;
use super::{choose, FilesError, Pick};
use crate::repo::files::{EntryCursor, EntryKind, FileEntry, Skipped, SnapshotHead};
use crate::repo::{Index, Repository, StanzaPaths};
use crate::storage::S3Config;

/// Objects of at least this size go up in parts.
pub const MULTIPART_AT: u64 = 16 << 20;
/// Chunks read ahead for one file.
const READ_AHEAD: usize = 4;

/// Options of a files restore.
#[derive(Debug, Clone)]
pub struct FilesRestoreOptions {
    /// The set.
    pub set: String,
    /// Which snapshot.
    pub pick: Pick,
    /// Only entries whose path starts with this.
    pub path_prefix: Option<String>,
    /// A directory or `s3://bucket/prefix`.
    pub to: String,
    /// S3 settings of an S3 target.
    pub s3: S3Config,
    /// Write into a target that holds files already (same paths are
    /// replaced).
    pub overwrite: bool,
    /// Files written at once.
    pub parallel: usize,
}

/// What a restore wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FilesRestoreReport {
    /// The snapshot restored.
    pub snapshot: SnapshotHead,
    /// Where to.
    pub target: String,
    /// Files (objects) written.
    pub files: u64,
    /// Directories made.
    pub dirs: u64,
    /// Links made.
    pub links: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// Entries not written, and why.
    pub skipped: Vec<Skipped>,
}

/// Restore a snapshot.
pub async fn restore(
    repo: Arc<Repository>,
    stanza: &str,
    opts: &FilesRestoreOptions,
) -> Result<FilesRestoreReport, FilesError> {
    let paths = StanzaPaths::new(stanza);
    let head = choose(&repo, &paths, &opts.set, &opts.pick).await?;
    let target = Place::open(&opts.to, &opts.s3).await?;
    // into an empty target, one syncfs at the end makes everything durable
    // (a crash before it leaves a partial restore to run again); over
    // existing files, each is fsynced before its rename replaces the old
    let was_empty = check_empty(&target, opts.overwrite).await?;
    let (index, _) = Index::load(&repo, &paths).await?;
    let index = Arc::new(index);
    let mut report = FilesRestoreReport {
        snapshot: head.clone(),
        target: target.describe(),
        files: 0,
        dirs: 0,
        links: 0,
        bytes: 0,
        skipped: Vec::new(),
    };
    let mut dirs: Vec<(PathBuf, FileEntry)> = Vec::new();
    let mut touched: BTreeSet<PathBuf> = BTreeSet::new();
    let mut real_dirs: std::collections::HashSet<PathBuf> = Default::default();
    let mut cursor = EntryCursor::new(&paths, &head);
    let mut running = FuturesUnordered::new();
    let parallel = opts.parallel.max(1);
    let root_is_root = nix::unistd::geteuid().is_root();
    let outcome = async {
        while let Some(entry) = cursor.next(&repo).await? {
            if let Some(p) = &opts.path_prefix {
                if !entry.path.starts_with(p.as_str()) {
                    continue;
                }
            }
            match &target {
                Place::Dir(root) => {
                    let Some(dest) = safe_join(root, &entry.path) else {
                        report.skipped.push(Skipped {
                            path: entry.path.clone(),
                            reason: "the path leaves the target directory (`..`, `.` or empty parts): not written".into(),
                        });
                        continue;
                    };
                    if !through_no_link(root, &dest, &mut real_dirs) {
                        report.skipped.push(Skipped {
                            path: entry.path.clone(),
                            reason: "a directory above it in the target is a symbolic link: not written (it would land outside the target)".into(),
                        });
                        continue;
                    }
                    if let Some(parent) = dest.parent() {
                        touched.insert(parent.to_owned());
                    }
                    match entry.kind {
                        EntryKind::Dir => {
                            tokio::fs::create_dir_all(&dest)
                                .await
                                .map_err(FilesError::io(format!("create {}", dest.display())))?;
                            touched.insert(dest.clone());
                            report.dirs += 1;
                            dirs.push((dest, entry));
                            continue;
                        }
                        EntryKind::Symlink => {
                            make_link(&dest, &entry).await?;
                            report.links += 1;
                            continue;
                        }
                        EntryKind::File if entry.path.ends_with('/') && entry.size == 0 => {
                            // a bucket's "folder" marker
                            tokio::fs::create_dir_all(&dest)
                                .await
                                .map_err(FilesError::io(format!("create {}", dest.display())))?;
                            report.dirs += 1;
                            continue;
                        }
                        EntryKind::File => {
                            let (repo, paths, index) = (repo.clone(), paths.clone(), index.clone());
                            running.push(
                                async move {
                                    let sync = !was_empty;
                                    write_file(&repo, &paths, &index, &dest, &entry, root_is_root, sync)
                                        .await
                                }
                                .boxed(),
                            );
                        }
                    }
                }
                Place::S3(s3) => match entry.kind {
                    EntryKind::Dir => continue,
                    EntryKind::Symlink => {
                        report.skipped.push(Skipped {
                            path: entry.path.clone(),
                            reason: "a symbolic link cannot be stored in a bucket".into(),
                        });
                        continue;
                    }
                    EntryKind::File => {
                        let (repo, paths, index, s3) =
                            (repo.clone(), paths.clone(), index.clone(), s3.clone());
                        running.push(
                            async move { put_object(&repo, &paths, &index, &s3, &entry).await }.boxed(),
                        );
                    }
                },
            }
            report.files += 1;
            while running.len() >= parallel {
                if let Some(done) = running.next().await {
                    report.bytes += done?;
                }
            }
        }
        while let Some(done) = running.next().await {
            report.bytes += done?;
        }
        Ok::<(), FilesError>(())
    }
    .await;
    if let Err(e) = outcome {
        // what is already being written ends (and removes its temporary
        // file on error) before the error is reported
        while running.next().await.is_some() {}
        return Err(e);
    }
    if let Place::Dir(root) = &target {
        // directories' own metadata last (writing files into them changed
        // their mtime), deepest first; then make everything durable
        for (dest, e) in dirs.iter().rev() {
            set_meta(dest, e, root_is_root).await?;
        }
        if was_empty {
            sync_fs(root).await?;
        } else {
            for d in touched.iter().rev() {
                fsync_dir(d).await?;
            }
        }
    }
    Ok(report)
}

/// Refuse a target holding files unless `overwrite`; whether it was empty.
async fn check_empty(target: &Place, overwrite: bool) -> Result<bool, FilesError> {
    let not_empty = match target {
        Place::Dir(d) => match std::fs::read_dir(d) {
            Ok(mut it) => it.next().is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tokio::fs::create_dir_all(d)
                    .await
                    .map_err(FilesError::io(format!("create {}", d.display())))?;
                false
            }
            Err(e) => {
                return Err(FilesError::Io {
                    what: format!("read {}", d.display()),
                    source: e,
                })
            }
        },
        Place::S3(s3) => !s3.list_objects("", None).await?.0.is_empty(),
    };
    if not_empty && !overwrite {
        return Err(FilesError::NotEmpty {
            target: target.describe(),
        });
    }
    Ok(!not_empty)
}

/// Whether every directory between `root` and `dest` is a real directory
/// or not there yet, never a symbolic link: one already in the target, or
/// one this restore made (a link entry, then entries below it), would lead
/// the write outside the target. `checked` remembers directories seen.
fn through_no_link(
    root: &Path,
    dest: &Path,
    checked: &mut std::collections::HashSet<PathBuf>,
) -> bool {
    let mut above = Vec::new();
    let mut p = dest.parent();
    while let Some(d) = p {
        if d == root || checked.contains(d) {
            break;
        }
        above.push(d);
        p = d.parent();
    }
    for d in above.into_iter().rev() {
        match std::fs::symlink_metadata(d) {
            Ok(m) if m.file_type().is_symlink() => return false,
            Ok(m) if m.is_dir() => {
                checked.insert(d.to_owned());
            }
            // not there yet (made as a directory), or a file in the way
            // (creating the directory fails and says so)
            _ => {}
        }
    }
    true
}

/// `root/rel`, or `None` when `rel` has parts that would leave `root`.
fn safe_join(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel = rel.trim_end_matches('/');
    if rel.is_empty() {
        return None;
    }
    let p = Path::new(rel);
    let plain = rel
        .split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..")
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    plain.then(|| root.join(p))
}

async fn make_link(dest: &Path, e: &FileEntry) -> Result<(), FilesError> {
    let target = e.target.clone().unwrap_or_default();
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(FilesError::io(format!("create {}", parent.display())))?;
    }
    if tokio::fs::symlink_metadata(dest).await.is_ok() {
        tokio::fs::remove_file(dest)
            .await
            .map_err(FilesError::io(format!("replace {}", dest.display())))?;
    }
    tokio::fs::symlink(&target, dest)
        .await
        .map_err(FilesError::io(format!("link {}", dest.display())))
}

/// The content of `e`, chunk by chunk, a few read ahead.
fn content<'a>(
    repo: &'a Arc<Repository>,
    paths: &'a StanzaPaths,
    index: &'a Index,
    ids: &'a [crate::codec::BlockId],
) -> impl futures::Stream<Item = Result<Bytes, FilesError>> + 'a {
    repo.read_blocks(paths, index, ids, READ_AHEAD)
        .map_err(FilesError::from)
}

/// Bytes of content gathered before they are written (a small file is
/// written, given its metadata and renamed in one blocking call).
const WRITE_BATCH: usize = 8 << 20;

async fn write_file(
    repo: &Arc<Repository>,
    paths: &StanzaPaths,
    index: &Index,
    dest: &Path,
    e: &FileEntry,
    as_root: bool,
    sync: bool,
) -> Result<u64, FilesError> {
    let parent = dest.parent().unwrap_or(Path::new("/")).to_owned();
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(
        ".{name}.walvault-{}",
        crate::codec::to_hex(&rand::random::<[u8; 4]>())
    ));
    let blocking = |f: Box<dyn FnOnce() -> Result<Option<std::fs::File>, FilesError> + Send>| async move {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| FilesError::Task(e.to_string()))?
    };
    // writes `batch` to the temporary file, creating it (and its
    // directory) the first time
    let append = |file: Option<std::fs::File>, batch: Vec<Bytes>| {
        let (tmp, parent) = (tmp.clone(), parent.clone());
        move || -> Result<Option<std::fs::File>, FilesError> {
            use std::io::Write;
            let mut f = match file {
                Some(f) => f,
                None => {
                    std::fs::create_dir_all(&parent)
                        .map_err(FilesError::io(format!("create {}", parent.display())))?;
                    std::fs::File::create(&tmp)
                        .map_err(FilesError::io(format!("create {}", tmp.display())))?
                }
            };
            for b in &batch {
                f.write_all(b)
                    .map_err(FilesError::io(format!("write {}", tmp.display())))?;
            }
            Ok(Some(f))
        }
    };
    let written = async {
        let ids: Vec<_> = e.chunks.iter().map(|c| c.id).collect();
        let mut stream = std::pin::pin!(content(repo, paths, index, &ids));
        let mut n = 0u64;
        let mut file = None;
        let mut batch = Vec::new();
        let mut batched = 0usize;
        while let Some(b) = stream.next().await {
            let b = b?;
            n += b.len() as u64;
            batched += b.len();
            batch.push(b);
            if batched >= WRITE_BATCH {
                file = blocking(Box::new(append(file, std::mem::take(&mut batch)))).await?;
                batched = 0;
            }
        }
        if n != e.size {
            return Err(FilesError::Repo(crate::repo::RepoError::Corrupt {
                object: format!("file snapshot entry {}", e.path),
                reason: format!("its chunks hold {n} bytes, the entry says {}", e.size),
            }));
        }
        let last = append(file, batch);
        let (tmp, dest, e) = (tmp.clone(), dest.to_owned(), e.clone());
        blocking(Box::new(move || {
            if let Some(f) = last()? {
                meta_of_file(&f, &tmp, &e, as_root)?;
                if sync {
                    f.sync_all()
                        .map_err(FilesError::io(format!("fsync {}", tmp.display())))?;
                }
            }
            std::fs::rename(&tmp, &dest)
                .map_err(FilesError::io(format!("rename to {}", dest.display())))?;
            Ok(None)
        }))
        .await?;
        Ok(n)
    }
    .await;
    if written.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    written
}

/// Mode, owner (as root) and mtime of `e` on `path`.
async fn set_meta(path: &Path, e: &FileEntry, as_root: bool) -> Result<(), FilesError> {
    let path = path.to_owned();
    let e = e.clone();
    tokio::task::spawn_blocking(move || apply_meta(&path, &e, as_root))
        .await
        .map_err(|e| FilesError::Task(e.to_string()))?
}

fn apply_meta(path: &Path, e: &FileEntry, as_root: bool) -> Result<(), FilesError> {
    let f =
        std::fs::File::open(path).map_err(FilesError::io(format!("open {}", path.display())))?;
    meta_of_file(&f, path, e, as_root)
}

/// [`apply_meta`] through an open handle of `path`.
fn meta_of_file(
    f: &std::fs::File,
    path: &Path,
    e: &FileEntry,
    as_root: bool,
) -> Result<(), FilesError> {
    use std::os::unix::fs::PermissionsExt;
    let what = |w: &str| format!("{w} {}", path.display());
    if as_root && (e.uid != 0 || e.gid != 0) {
        std::os::unix::fs::fchown(f, Some(e.uid), Some(e.gid))
            .map_err(FilesError::io(what("chown")))?;
    }
    if e.mode != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(e.mode))
            .map_err(FilesError::io(what("chmod")))?;
    }
    let mtime = std::time::UNIX_EPOCH
        + std::time::Duration::from_nanos(u64::try_from(e.mtime_ns).unwrap_or(0));
    f.set_modified(mtime)
        .map_err(FilesError::io(what("set the mtime of")))
}

/// Everything written on the file system holding `d`, durable.
async fn sync_fs(d: &Path) -> Result<(), FilesError> {
    let d = d.to_owned();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&d).map_err(FilesError::io(format!("open {}", d.display())))?;
        nix::unistd::syncfs(&f).map_err(|e| FilesError::Io {
            what: format!("syncfs {}", d.display()),
            source: e.into(),
        })
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))?
}

async fn fsync_dir(d: &Path) -> Result<(), FilesError> {
    let d = d.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&d)
            .and_then(|f| f.sync_all())
            .map_err(FilesError::io(format!("fsync {}", d.display())))
    })
    .await
    .map_err(|e| FilesError::Task(e.to_string()))?
}

async fn put_object(
    repo: &Arc<Repository>,
    paths: &StanzaPaths,
    index: &Index,
    s3: &crate::storage::S3,
    e: &FileEntry,
) -> Result<u64, FilesError> {
    let attrs = e.attrs.clone().unwrap_or_default();
    let ids: Vec<_> = e.chunks.iter().map(|c| c.id).collect();
    let mut stream = std::pin::pin!(content(repo, paths, index, &ids));
    if e.size < MULTIPART_AT {
        let mut body = BytesMut::with_capacity(e.size as usize);
        while let Some(b) = stream.next().await {
            body.extend_from_slice(&b?);
        }
        let n = body.len() as u64;
        s3.put_object_with(&e.path, body.freeze(), &attrs).await?;
        return Ok(n);
    }
    let upload = s3.start_multipart(&e.path, &attrs).await?;
    let sent = async {
        let mut part = BytesMut::with_capacity(MULTIPART_AT as usize);
        let mut number = 1;
        let mut n = 0u64;
        while let Some(b) = stream.next().await {
            let b = b?;
            n += b.len() as u64;
            part.extend_from_slice(&b);
            if part.len() as u64 >= MULTIPART_AT {
                upload.upload_part(number, part.split().freeze()).await?;
                number += 1;
            }
        }
        if !part.is_empty() {
            upload.upload_part(number, part.freeze()).await?;
        }
        Ok::<u64, FilesError>(n)
    }
    .await;
    match sent {
        Ok(n) => {
            upload.complete().await?;
            Ok(n)
        }
        Err(err) => {
            upload.abort().await;
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link in the target, or one made by the restore, stops entries
    /// below it.
    #[test]
    fn no_write_through_a_link() {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path();
        std::fs::create_dir_all(root.join("real/sub")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.join("real/link")).expect("link");
        let mut seen = Default::default();
        assert!(through_no_link(root, &root.join("real/sub/f"), &mut seen));
        assert!(through_no_link(root, &root.join("new/deep/f"), &mut seen));
        assert!(through_no_link(root, &root.join("real/link"), &mut seen));
        assert!(!through_no_link(
            root,
            &root.join("real/link/passwd"),
            &mut seen
        ));
        assert!(!through_no_link(
            root,
            &root.join("real/link/x/y"),
            &mut seen
        ));
    }

    #[test]
    fn paths_stay_inside() {
        let r = Path::new("/t");
        assert_eq!(safe_join(r, "a/b"), Some(PathBuf::from("/t/a/b")));
        assert_eq!(safe_join(r, "a/"), Some(PathBuf::from("/t/a")));
        for bad in ["", "/", "../x", "a/../../x", "a//b", "./a", "/etc/passwd"] {
            assert_eq!(safe_join(r, bad), None, "{bad}");
        }
    }
}
