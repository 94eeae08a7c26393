//! WAL files in the repository: `<stanza>/wal/<timeline>/<file name>`, one
//! envelope (kind 8; LZ4, or LZ4 chunks from `wal-push`; encrypted when the
//! repository is) per segment, `.partial` segment, or `.history` file. The
//! object name is bound into the tag or checksum, so a segment stored under
//! another name never verifies.

use bytes::Bytes;

use super::object::{self, ObjectKind};
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::Compression;

/// Largest WAL object body accepted: a 1 GiB segment.
const MAX_WAL: u64 = 1 << 30;

/// Whether `name` looks like a file PostgreSQL archives: 24 upper-case hex
/// digits, optionally `.partial` or `.XXXXXXXX.backup`, or 8 hex + `.history`.
/// (The segment size is not needed to store or fetch by name.)
pub fn valid_wal_name(name: &str) -> bool {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    };
    if let Some(t) = name.strip_suffix(".history") {
        return hex(t, 8);
    }
    if let Some(s) = name.strip_suffix(".partial") {
        return hex(s, 24);
    }
    if let Some(rest) = name.strip_suffix(".backup") {
        return rest
            .split_once('.')
            .is_some_and(|(s, o)| hex(s, 24) && hex(o, 8));
    }
    hex(name, 24)
}

/// The object key of WAL file `name` (its timeline is its first 8 digits).
pub fn wal_key(paths: &StanzaPaths, name: &str) -> Result<String, RepoError> {
    if !valid_wal_name(name) {
        return Err(RepoError::Invalid(format!(
            "{name:?} is not a WAL file name"
        )));
    }
    Ok(format!("{}{}/{name}", paths.wal(), &name[..8]))
}

/// What [`Repository::store_wal_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalStored {
    /// Stored now.
    New,
    /// The repository already had the same content under this name.
    AlreadyThere,
}

impl Repository {
    /// Store WAL file `name` unless the repository already has it: with the
    /// same content that is success (archiving is retried after crashes),
    /// with other content it is [`RepoError::WalConflict`] and nothing is
    /// overwritten. `.partial` files are replaced (they grow).
    pub async fn store_wal_once(
        &self,
        paths: &StanzaPaths,
        name: &str,
        data: Vec<u8>,
    ) -> Result<WalStored, RepoError> {
        if !name.ends_with(".partial") && self.has_wal(paths, name).await? {
            if let Some(found) = self.compare_wal(paths, name, &data).await? {
                return Ok(found);
            }
        }
        self.store_wal(paths, name, data).await?;
        Ok(WalStored::New)
    }

    /// Names of the WAL files stored for timeline directory `tli` (8 hex
    /// digits), sorted.
    pub async fn list_wal(&self, paths: &StanzaPaths, tli: &str) -> Result<Vec<String>, RepoError> {
        let prefix = format!("{}{tli}/", paths.wal());
        let mut names: Vec<String> = crate::storage::list_all(self.storage().as_ref(), &prefix)
            .await?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(&prefix).map(str::to_owned))
            .filter(|n| valid_wal_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Timeline directories present under `<stanza>/wal/`, sorted.
    pub async fn wal_timelines(&self, paths: &StanzaPaths) -> Result<Vec<String>, RepoError> {
        let prefix = paths.wal();
        let mut tlis: Vec<String> = crate::storage::list_all(self.storage().as_ref(), &prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&prefix)?;
                let (t, _) = rest.split_once('/')?;
                (t.len() == 8).then(|| t.to_owned())
            })
            .collect();
        tlis.sort();
        tlis.dedup();
        Ok(tlis)
    }

    /// Store WAL file `name`.
    pub async fn store_wal(
        &self,
        paths: &StanzaPaths,
        name: &str,
        data: Vec<u8>,
    ) -> Result<(), RepoError> {
        let (key, sealed) = self.seal_wal(paths, name, Bytes::from(data)).await?;
        self.storage().put(&key, sealed).await?;
        Ok(())
    }

    /// WAL file `name` encoded as its object (LZ4, then the tag or the
    /// encryption), on the blocking pool: the CPU half of
    /// [`Repository::store_wal`], for callers that overlap it with other
    /// work and store the result with `storage().put(key, sealed)`.
    pub async fn seal_wal(
        &self,
        paths: &StanzaPaths,
        name: &str,
        data: Bytes,
    ) -> Result<(String, Bytes), RepoError> {
        let key = wal_key(paths, name)?;
        let keys = self.keys().cloned();
        let k = key.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            object::seal(ObjectKind::Wal, &k, &data, Compression::Lz4, keys.as_ref())
        })
        .await
        .map_err(|e| RepoError::Invalid(format!("WAL encode task failed: {e}")))?;
        Ok((key, sealed))
    }

    /// Whether WAL file `name` is stored.
    pub async fn has_wal(&self, paths: &StanzaPaths, name: &str) -> Result<bool, RepoError> {
        Ok(self.storage().head(&wal_key(paths, name)?).await?.is_some())
    }

    /// Compare `data` with the stored WAL file `name` by downloading it:
    /// [`WalStored::AlreadyThere`] when equal, [`RepoError::WalConflict`]
    /// when not, `None` when nothing is stored under the name.
    pub async fn compare_wal(
        &self,
        paths: &StanzaPaths,
        name: &str,
        data: &[u8],
    ) -> Result<Option<WalStored>, RepoError> {
        match self.load_wal(paths, name).await? {
            Some(existing) if existing[..] == *data => Ok(Some(WalStored::AlreadyThere)),
            Some(_) => Err(RepoError::WalConflict {
                name: name.to_owned(),
                stanza: paths.stanza().to_owned(),
            }),
            None => Ok(None),
        }
    }

    /// WAL file `name`, or `None` when the repository does not have it.
    pub async fn load_wal(
        &self,
        paths: &StanzaPaths,
        name: &str,
    ) -> Result<Option<Bytes>, RepoError> {
        let key = wal_key(paths, name)?;
        match self.read_object(ObjectKind::Wal, &key, MAX_WAL).await {
            Ok(body) => Ok(Some(Bytes::from(body))),
            Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "000000010000000000000003",
            "00000002.history",
            "000000010000000000000003.partial",
            "000000010000000000000002.00000028.backup",
        ] {
            assert!(valid_wal_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "00000001000000000000000",
            "0000000100000000000000g3",
            "00000002.history.x",
            "000000010000000000000003.backup",
        ] {
            assert!(!valid_wal_name(bad), "{bad}");
        }
        assert_eq!(
            wal_key(&StanzaPaths::new("main"), "000000020000000000000003").unwrap(),
            "main/wal/00000002/000000020000000000000003"
        );
    }
}
