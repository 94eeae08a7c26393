//! `--delta`: before restoring over an existing data directory, remove what
//! the backup does not have (or has as another kind of entry), so the result
//! is exactly the backup — stale relation segments left behind would be read
//! by the restored server as data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{io, RestoreError};
use crate::repo::FileKind;

/// Kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
    Link,
}

impl Kind {
    pub(super) fn of(k: &FileKind) -> Kind {
        match k {
            FileKind::File => Kind::File,
            FileKind::Directory => Kind::Dir,
            FileKind::Symlink(_) => Kind::Link,
        }
    }
}

/// Remove, under `root` (not following links), every entry that `expected`
/// does not list with the same kind. Returns how many entries were removed
/// (a removed directory counts once).
pub(super) fn remove_extraneous(
    root: &Path,
    expected: &HashMap<PathBuf, Kind>,
) -> Result<usize, RestoreError> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(root))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(io(&path))?;
        let kind = if ft.is_symlink() {
            Kind::Link
        } else if ft.is_dir() {
            Kind::Dir
        } else {
            Kind::File
        };
        match expected.get(&path) {
            Some(&k) if k == kind => {
                if kind == Kind::Dir {
                    removed += remove_extraneous(&path, expected)?;
                }
            }
            _ => {
                tracing::debug!(path = %path.display(), "delta: removing what the backup does not have");
                if kind == Kind::Dir {
                    std::fs::remove_dir_all(&path).map_err(io(&path))?;
                } else {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
                removed += 1;
            }
        }
    }
    Ok(removed)
}
