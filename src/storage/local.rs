//! The local-directory backend: the embedded default, and the right choice for a
//! repository on a mounted volume (NFS, a second disk).
//!
//! Atomicity: an object is written to `<root>/.tmp/`, fsynced, renamed into place,
//! and the directory holding it is fsynced, so after a crash a key holds the old
//! object or the new one, never a prefix, and a `put` that returned survives power
//! loss. Directories created for a key are fsynced into their parents as well.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, validate_prefix, ListPage, ObjectMeta, Storage, StorageError};

/// Name of the directory under the root that holds objects being written.
pub(crate) const TMP_DIR: &str = ".tmp";

/// Temporary files older than this are left over from a crash and removed on open.
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

/// Objects as files under a root directory; keys are relative paths.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
    page_size: usize,
}

impl LocalDir {
    /// Open the directory at `root`, creating it (and its parents) when missing.
    ///
    /// Fails when `root` exists but is not a directory, or cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> Result<LocalDir, StorageError> {
        let root: PathBuf = root.into();
        let shown = root.display().to_string();
        let bad = |reason: String| StorageError::BadLocation {
            location: shown.clone(),
            reason,
        };
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad(
                "it is a file, not a directory; give the path of a directory for the repository"
                    .into(),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(&root)
                .map_err(|e| bad(format!("cannot create the directory: {}", describe_io(&e))))?,
            Err(e) => return Err(bad(format!("cannot access it: {}", describe_io(&e)))),
        }
        let root = fs::canonicalize(&root).map_err(|e| bad(describe_io(&e)))?;
        let dir = LocalDir {
            root,
            page_size: 1000,
        };
        dir.remove_stale_tmp();
        Ok(dir)
    }

    /// Same directory, listing `page_size` keys per page (tests use small pages).
    pub fn with_page_size(mut self, page_size: usize) -> LocalDir {
        self.page_size = page_size.max(1);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn remove_stale_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.root.join(TMP_DIR)) else {
            return;
        };
        let now = SystemTime::now();
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() > STALE_TMP_AGE)
                .unwrap_or(false);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn err(&self, op: &'static str, key: &str, e: &io::Error) -> StorageError {
        if e.kind() == io::ErrorKind::NotFound && op != "put" {
            return StorageError::NotFound {
                location: self.location(),
                key: key.to_owned(),
            };
        }
        StorageError::Backend {
            op,
            location: self.location(),
            key: key.to_owned(),
            transient: matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut
            ),
            message: describe_io(e),
        }
    }

    fn put_blocking(&self, key: &str, data: &[u8]) -> Result<(), StorageError> {
        let path = self.root.join(key);
        let tmp_dir = self.root.join(TMP_DIR);
        let fail = |e: io::Error| self.err("put", key, &e);
        ensure_dir(&self.root, Path::new(TMP_DIR)).map_err(fail)?;
        if let Some(parent) = Path::new(key).parent() {
            ensure_dir(&self.root, parent).map_err(fail)?;
        }
        let tmp = tmp_dir.join(format!(
            "{:016x}.{}",
            rand::random::<u64>(),
            std::process::id()
        ));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            // the data and the size; the name is made durable by the
            // directory's sync after the rename
            f.sync_data()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            sync_dir(path.parent().unwrap_or(&self.root))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(fail)
    }

    fn get_range_blocking(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StorageError> {
        let mut f = self.open_file(key, "get")?;
        let size = f.metadata().map_err(|e| self.err("get", key, &e))?.len();
        if start > size {
            return Err(StorageError::InvalidRange {
                location: self.location(),
                key: key.to_owned(),
                start,
                size,
            });
        }
        let n = len.min(size - start);
        let mut buf = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.take(n).read_to_end(&mut buf))
            .map_err(|e| self.err("get", key, &e))?;
        Ok(Bytes::from(buf))
    }

    fn open_file(&self, key: &str, op: &'static str) -> Result<File, StorageError> {
        let path = self.root.join(key);
        match File::open(&path) {
            Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => Ok(f),
            Ok(_) => Err(StorageError::NotFound {
                location: self.location(),
                key: key.to_owned(),
            }),
            Err(e) if is_missing(&e) => Err(StorageError::NotFound {
                location: self.location(),
                key: key.to_owned(),
            }),
            Err(e) => Err(self.err(op, key, &e)),
        }
    }

    fn list_blocking(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, StorageError> {
        // Walk only the directory the prefix names, depth first, with entries
        // ordered as their keys sort (a directory sorts as "name/"), so keys come
        // out in byte order and a page stops early.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..=i],
            None => "",
        };
        let mut walk = Walk {
            root: &self.root,
            prefix,
            after: token,
            limit: self.page_size,
            out: Vec::new(),
            more: false,
        };
        walk.dir(dir_part)
            .map_err(|e| self.err("list", prefix, &e))?;
        let next = if walk.more {
            walk.out.last().map(|o| o.key.clone())
        } else {
            None
        };
        Ok(ListPage {
            objects: walk.out,
            next,
        })
    }

    fn delete_blocking(&self, key: &str) -> Result<(), StorageError> {
        let path = self.root.join(key);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().unwrap_or(&self.root))
                .map_err(|e| self.err("delete", key, &e)),
            Err(e) if is_missing(&e) => Ok(()),
            // a directory where the key would be: there is no such object
            Err(_) if path.is_dir() => Ok(()),
            Err(e) => Err(self.err("delete", key, &e)),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(LocalDir) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| StorageError::Backend {
                op: "io",
                location: self.location(),
                key: String::new(),
                transient: false,
                message: format!("I/O task failed: {e}"),
            })?
    }
}

struct Walk<'a> {
    root: &'a Path,
    prefix: &'a str,
    after: Option<&'a str>,
    limit: usize,
    out: Vec<ObjectMeta>,
    more: bool,
}

impl Walk<'_> {
    /// Visit directory `rel` ("" or ending in '/'); returns false once the page is full.
    fn dir(&mut self, rel: &str) -> io::Result<bool> {
        let entries = match fs::read_dir(self.root.join(rel)) {
            Ok(e) => e,
            Err(e) if is_missing(&e) => return Ok(true),
            Err(e) => return Err(e),
        };
        let mut items: Vec<(String, bool, u64)> = Vec::new();
        for e in entries {
            let e = e?;
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue; // not UTF-8: not written by walvault
            };
            if rel.is_empty() && name == TMP_DIR {
                continue;
            }
            let meta = match e.metadata() {
                Ok(m) => m,
                Err(e) if is_missing(&e) => continue, // deleted while we listed
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                items.push((format!("{rel}{name}/"), true, 0));
            } else if meta.is_file() {
                items.push((format!("{rel}{name}"), false, meta.len()));
            }
        }
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, is_dir, size) in items {
            // skip what cannot match the prefix
            let overlaps =
                key.starts_with(self.prefix) || (is_dir && self.prefix.starts_with(&key));
            if !overlaps {
                continue;
            }
            if let Some(after) = self.after {
                // a whole subtree before the token, or a key at or before it
                let before = if is_dir {
                    after > key.as_str() && !after.starts_with(&key)
                } else {
                    key.as_str() <= after
                };
                if before {
                    continue;
                }
            }
            if is_dir {
                if !self.dir(&key)? {
                    return Ok(false);
                }
            } else {
                if self.out.len() == self.limit {
                    self.more = true;
                    return Ok(false);
                }
                self.out.push(ObjectMeta { key, size });
            }
        }
        Ok(true)
    }
}

/// A file of zeros, durable, waiting in `.tmp/` to become an object that
/// takes writes in place ([`LocalDir::prepare_zeroed`]). Removed when dropped
/// unused.
#[derive(Debug)]
pub struct ZeroedFile {
    file: Option<File>,
    tmp: PathBuf,
    size: u64,
}

impl ZeroedFile {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether it is still there to install (another process removes
    /// temporary files an hour old).
    pub fn is_present(&self) -> bool {
        self.tmp.exists()
    }
}

impl Drop for ZeroedFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// An object written in place: every write is one positioned write and one
/// data sync into space allocated and made durable beforehand, so no
/// metadata (size, name) has to reach the disk with it. What makes a
/// synchronous WAL receiver cheap on a local disk, as pg_receivewal's
/// zero-filled segments do.
#[derive(Debug)]
pub struct InPlaceFile {
    file: File,
    key: String,
    location: String,
    size: u64,
}

impl InPlaceFile {
    /// Its size: the space writes may use.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its whole content.
    pub fn read_all(&self) -> Result<Vec<u8>, StorageError> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; usize::try_from(self.size).unwrap_or(0)];
        self.file
            .read_exact_at(&mut buf, 0)
            .map_err(|e| self.fail(&e))?;
        Ok(buf)
    }

    /// Whether the file still has a name (a deleted file open here has
    /// none: writes to it would reach no object).
    pub fn is_linked(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.nlink() > 0).unwrap_or(false)
    }

    /// Write `data` at `offset` and make it durable (one `fdatasync`).
    /// The write must fit in [`InPlaceFile::size`].
    pub fn write_durable(&self, offset: u64, data: &[u8]) -> Result<(), StorageError> {
        use std::os::unix::fs::FileExt;
        if offset + data.len() as u64 > self.size {
            return Err(self.fail(&io::Error::other(format!(
                "a write of {} bytes at {offset} does not fit in {} bytes",
                data.len(),
                self.size
            ))));
        }
        self.file
            .write_all_at(data, offset)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.fail(&e))
    }

    fn fail(&self, e: &io::Error) -> StorageError {
        StorageError::Backend {
            op: "put",
            location: self.location.clone(),
            key: self.key.clone(),
            transient: false,
            message: describe_io(e),
        }
    }
}

impl LocalDir {
    /// A durable file of `size` zero bytes in `.tmp/`, to become an object
    /// with [`LocalDir::install`]. Slow (it writes and syncs every byte):
    /// made ahead of need, off the path that waits.
    pub fn prepare_zeroed(&self, size: u64) -> Result<ZeroedFile, StorageError> {
        let tmp = self.root.join(TMP_DIR).join(format!(
            "{:016x}.{}.zero",
            rand::random::<u64>(),
            std::process::id()
        ));
        let fail = |e: io::Error| self.err("put", TMP_DIR, &e);
        ensure_dir(&self.root, Path::new(TMP_DIR)).map_err(fail)?;
        let mut zeroed = ZeroedFile {
            file: None,
            tmp: tmp.clone(),
            size,
        };
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(fail)?;
        zeroed.file = Some(f.try_clone().map_err(fail)?);
        let chunk = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n]).map_err(fail)?;
            left -= n as u64;
        }
        // real zeros, synced: later writes change no extent and no size
        f.sync_all().map_err(fail)?;
        Ok(zeroed)
    }

    /// Make `zeroed` the object `key` (rename, then the directory synced),
    /// to be written in place. Fails when `key` exists.
    pub fn install(&self, zeroed: ZeroedFile, key: &str) -> Result<InPlaceFile, StorageError> {
        validate_key(key)?;
        let mut zeroed = zeroed;
        let path = self.root.join(key);
        let fail = |e: io::Error| self.err("put", key, &e);
        if let Some(parent) = Path::new(key).parent() {
            ensure_dir(&self.root, parent).map_err(fail)?;
        }
        if path.exists() {
            return Err(fail(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the object exists",
            )));
        }
        let Some(file) = zeroed.file.take() else {
            return Err(fail(io::Error::other("the prepared file was already used")));
        };
        if let Err(e) = fs::rename(&zeroed.tmp, &path) {
            let _ = fs::remove_file(&zeroed.tmp);
            return Err(fail(e));
        }
        sync_dir(path.parent().unwrap_or(&self.root)).map_err(fail)?;
        Ok(InPlaceFile {
            file,
            key: key.to_owned(),
            location: self.location(),
            size: zeroed.size,
        })
    }

    /// The object `key` opened to be written in place, or `None` when there
    /// is none.
    pub fn open_in_place(&self, key: &str) -> Result<Option<InPlaceFile>, StorageError> {
        validate_key(key)?;
        let path = self.root.join(key);
        let file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(self.err("put", key, &e)),
        };
        let size = file.metadata().map_err(|e| self.err("put", key, &e))?.len();
        Ok(Some(InPlaceFile {
            file,
            key: key.to_owned(),
            location: self.location(),
            size,
        }))
    }
}

#[async_trait]
impl Storage for LocalDir {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        validate_key(key)?;
        let key = key.to_owned();
        self.blocking(move |me| me.put_blocking(&key, &data)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StorageError> {
        self.get_range(key, 0, u64::MAX).await
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, StorageError> {
        validate_key(key)?;
        let key = key.to_owned();
        self.blocking(move |me| me.get_range_blocking(&key, start, len))
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        validate_key(key)?;
        let key = key.to_owned();
        self.blocking(move |me| match fs::metadata(me.root.join(&key)) {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta { key, size: m.len() })),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(me.err("head", &key, &e)),
        })
        .await
    }

    async fn list_page(&self, prefix: &str, token: Option<&str>) -> Result<ListPage, StorageError> {
        validate_prefix(prefix)?;
        let prefix = prefix.to_owned();
        let token = token.map(str::to_owned);
        self.blocking(move |me| me.list_blocking(&prefix, token.as_deref()))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        validate_key(key)?;
        let key = key.to_owned();
        self.blocking(move |me| me.delete_blocking(&key)).await
    }

    fn local_dir(&self) -> Option<&LocalDir> {
        Some(self)
    }
}

/// Create `rel` (relative to `root`) and its missing parents, fsyncing each new
/// directory's parent so the new entries survive a crash.
fn ensure_dir(root: &Path, rel: &Path) -> io::Result<()> {
    let full = root.join(rel);
    if full.is_dir() {
        return Ok(());
    }
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        let parent = cur.clone();
        cur.push(comp);
        match fs::create_dir(&cur) {
            Ok(()) => sync_dir(&parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && cur.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Missing file, or a file where a directory of the path should be.
fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory
}

/// An I/O error as one line, with the fix for the errors operators meet.
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::PermissionDenied => format!(
            "{e}; the repository directory must be writable by the user running walvault (uid {})",
            nix::unistd::geteuid()
        ),
        io::ErrorKind::ReadOnlyFilesystem => {
            format!("{e}; mount the repository file system read-write")
        }
        io::ErrorKind::StorageFull => {
            format!("{e}; free space on the repository's file system or move it")
        }
        _ => e.to_string(),
    }
}
