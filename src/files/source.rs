//! Where file snapshots come from and go to: a directory tree or the
//! objects of a bucket under a prefix. Listings are streamed in path order
//! (directories: component by component, children sorted by name; buckets:
//! key byte order, as S3 lists), so a run merges them with the previous
//! snapshot's entries without holding either in memory.

use std::cmp::Ordering;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use tokio::sync::mpsc;

use super::FilesError;
use crate::repo::files::{EntryKind, FileEntry, Skipped, SourceKind};
use crate::storage::{Location, S3Config, S3};

/// An opened source or target.
#[derive(Debug, Clone)]
pub enum Place {
    /// A local directory.
    Dir(PathBuf),
    /// A bucket and a prefix ("" or ending in '/').
    S3(S3),
}

impl Place {
    /// Open `url` (a path or `s3://bucket/prefix`) with the `[s3]` settings
    /// `s3`. No request is made.
    pub async fn open(url: &str, s3: &S3Config) -> Result<Place, FilesError> {
        match Location::parse(url)? {
            Location::Local(p) => Ok(Place::Dir(p)),
            Location::S3 { bucket, prefix } => {
                Ok(Place::S3(S3::connect(&bucket, &prefix, s3).await?))
            }
        }
    }

    /// Directory or bucket.
    pub fn kind(&self) -> SourceKind {
        match self {
            Place::Dir(_) => SourceKind::Dir,
            Place::S3(_) => SourceKind::S3,
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Place::Dir(p) => p.display().to_string(),
            Place::S3(s) => format!("s3://{}/{}", s.bucket(), s.prefix()),
        }
    }
}

/// The order entries of a `kind` source are listed in.
pub fn path_order(kind: SourceKind, a: &str, b: &str) -> Ordering {
    match kind {
        SourceKind::Dir => a.split('/').cmp(b.split('/')),
        SourceKind::S3 => a.as_bytes().cmp(b.as_bytes()),
    }
}

/// `--exclude` patterns (globs matched against the relative path; `*`
/// crosses `/`, so `*.tmp` excludes every `.tmp` file).
pub fn excludes(patterns: &[String]) -> Result<GlobSet, FilesError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| FilesError::Usage(format!("--exclude {p:?}: {e}")))?);
    }
    b.build()
        .map_err(|e| FilesError::Usage(format!("--exclude: {e}")))
}

/// What a listing sends: an entry without content, or one left out.
#[derive(Debug)]
pub enum Listed {
    /// An entry to store.
    Entry(Box<FileEntry>),
    /// An entry that cannot be stored.
    Skipped(Skipped),
}

/// Check that the source can be listed before anything is written: a
/// missing directory, a missing bucket, denied access or an unreachable
/// endpoint is one error here.
pub async fn probe(place: &Place) -> Result<(), FilesError> {
    match place {
        Place::Dir(p) => match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(FilesError::Usage(format!(
                "source {} is not a directory",
                p.display()
            ))),
            Err(e) => Err(FilesError::Usage(format!(
                "source directory {}: {e}",
                p.display()
            ))),
        },
        Place::S3(s) => s
            .list_objects("", None)
            .await
            .map(|_| ())
            .map_err(Into::into),
    }
}

/// List `place` into `tx` in path order, leaving out what `exclude`
/// matches. Returns when the listing is complete or the receiver is gone.
pub async fn list(place: Place, exclude: GlobSet, tx: mpsc::Sender<Result<Listed, FilesError>>) {
    match place {
        Place::Dir(root) => {
            let done = tokio::task::spawn_blocking(move || walk(&root, &exclude, &tx)).await;
            if let Err(e) = done {
                tracing::error!("directory listing stopped: {e}");
            }
        }
        Place::S3(s3) => {
            let mut token: Option<String> = None;
            loop {
                let page = match s3.list_objects("", token.as_deref()).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                for o in page.0 {
                    if exclude.is_match(&o.key) {
                        continue;
                    }
                    let entry = FileEntry {
                        path: o.key,
                        kind: EntryKind::File,
                        size: o.size,
                        mode: 0,
                        uid: 0,
                        gid: 0,
                        mtime_ns: o
                            .last_modified
                            .and_then(|t| t.timestamp_nanos_opt())
                            .unwrap_or(0),
                        inode: 0,
                        etag: Some(o.etag),
                        attrs: None,
                        target: None,
                        chunks: Vec::new(),
                    };
                    if tx.send(Ok(Listed::Entry(Box::new(entry)))).await.is_err() {
                        return;
                    }
                }
                match page.1 {
                    Some(t) => token = Some(t),
                    None => return,
                }
            }
        }
    }
}

/// The entry for `path` (relative `rel`) from its metadata (not followed).
pub fn dir_entry(path: &Path, rel: String, m: &std::fs::Metadata) -> Result<FileEntry, Skipped> {
    let ft = m.file_type();
    let (kind, target) = if ft.is_file() {
        (EntryKind::File, None)
    } else if ft.is_dir() {
        (EntryKind::Dir, None)
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).map_err(|e| Skipped {
            path: rel.clone(),
            reason: format!("cannot read the link: {e}"),
        })?;
        let t = t.into_os_string().into_string().map_err(|_| Skipped {
            path: rel.clone(),
            reason: "the link's target is not UTF-8".into(),
        })?;
        (EntryKind::Symlink, Some(t))
    } else {
        return Err(Skipped {
            path: rel,
            reason: "not a regular file, directory or link (socket, FIFO or device)".into(),
        });
    };
    Ok(FileEntry {
        size: if kind == EntryKind::File { m.len() } else { 0 },
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        inode: m.ino(),
        etag: None,
        attrs: None,
        target,
        chunks: Vec::new(),
        path: rel,
    })
}

/// Depth-first, children in name order: the component order of
/// [`path_order`].
fn walk(root: &Path, exclude: &GlobSet, tx: &mpsc::Sender<Result<Listed, FilesError>>) {
    // a stack of directories, each with its children still to visit
    // (sorted, reversed to pop the first)
    let mut stack: Vec<(String, Vec<String>)> = Vec::new();
    let send = |l: Listed| tx.blocking_send(Ok(l)).is_ok();
    match children(root, "") {
        Ok((names, skipped)) => {
            for s in skipped {
                if !send(Listed::Skipped(s)) {
                    return;
                }
            }
            stack.push((String::new(), names));
        }
        Err(e) => {
            let _ = tx.blocking_send(Err(FilesError::Usage(format!(
                "cannot list source directory {}: {e}",
                root.display()
            ))));
            return;
        }
    }
    while let Some((dir, names)) = stack.last_mut() {
        let Some(name) = names.pop() else {
            stack.pop();
            continue;
        };
        let rel = if dir.is_empty() {
            name
        } else {
            format!("{dir}/{name}")
        };
        if exclude.is_match(&rel) {
            continue;
        }
        let full = root.join(&rel);
        let entry = match std::fs::symlink_metadata(&full) {
            Ok(m) => dir_entry(&full, rel.clone(), &m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
            Err(e) => Err(Skipped {
                path: rel.clone(),
                reason: e.to_string(),
            }),
        };
        let entry = match entry {
            Ok(e) => e,
            Err(s) => {
                if !send(Listed::Skipped(s)) {
                    return;
                }
                continue;
            }
        };
        let is_dir = entry.kind == EntryKind::Dir;
        if !send(Listed::Entry(Box::new(entry))) {
            return;
        }
        if is_dir {
            match children(&full, &rel) {
                Ok((names, skipped)) => {
                    for s in skipped {
                        if !send(Listed::Skipped(s)) {
                            return;
                        }
                    }
                    stack.push((rel, names));
                }
                Err(e) => {
                    if !send(Listed::Skipped(Skipped {
                        path: rel,
                        reason: format!("cannot list the directory: {e}"),
                    })) {
                        return;
                    }
                }
            }
        }
    }
}

/// The names in `dir`, sorted and reversed (pop gives the first), and the
/// names that are not UTF-8.
fn children(dir: &Path, rel: &str) -> std::io::Result<(Vec<String>, Vec<Skipped>)> {
    let mut names = Vec::new();
    let mut skipped = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        match e.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(raw) => skipped.push(Skipped {
                path: format!("{rel}/{}", raw.to_string_lossy()),
                reason: "the name is not UTF-8".into(),
            }),
        }
    }
    names.sort_unstable_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
    Ok((names, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        use SourceKind::*;
        assert_eq!(path_order(Dir, "a/b", "a.txt"), Ordering::Less);
        assert_eq!(path_order(S3, "a/b", "a.txt"), Ordering::Greater);
        assert_eq!(path_order(Dir, "a", "a/b"), Ordering::Less);
        assert_eq!(path_order(Dir, "b", "a/z"), Ordering::Greater);
        let g = excludes(&["*.tmp".into(), "cache/**".into()]).expect("globs");
        assert!(g.is_match("x/y/z.tmp"));
        assert!(g.is_match("cache/a/b"));
        assert!(!g.is_match("cached"));
    }

    /// The walk lists in component order, skips excluded subtrees, and
    /// reports what it cannot store.
    #[tokio::test]
    async fn a_walk_is_in_component_order() {
        let d = tempfile::tempdir().expect("tmp");
        for p in ["a/b", "a.txt", "z", "a/c/d", "skip/x", "e.tmp"] {
            let f = d.path().join(p);
            std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
            std::fs::write(&f, p).expect("write");
        }
        std::os::unix::fs::symlink("z", d.path().join("link")).expect("symlink");
        let (tx, mut rx) = mpsc::channel(4);
        let g = excludes(&["skip".into(), "*.tmp".into()]).expect("globs");
        tokio::spawn(list(Place::Dir(d.path().to_owned()), g, tx));
        let mut got = Vec::new();
        while let Some(l) = rx.recv().await {
            match l.expect("listing") {
                Listed::Entry(e) => got.push(e.path),
                Listed::Skipped(s) => panic!("skipped {s:?}"),
            }
        }
        assert_eq!(got, ["a", "a/b", "a/c", "a/c/d", "a.txt", "link", "z"]);
        let mut sorted = got.clone();
        sorted.sort_by(|a, b| path_order(SourceKind::Dir, a, b));
        assert_eq!(sorted, got);
    }
}
