//! WAL files in the repository: `<stanza>/wal/<timeline>/<file name>`, one
//! envelope (kind 8; LZ4, or LZ4 chunks from `wal-push`; encrypted when the
//! repository is) per segment, `.partial` segment, or `.history` file. The
//! object name is bound into the tag or checksum, so a segment stored under
//! another name never verifies.

use bytes::Bytes;

use super::object::{self, ObjectKind};
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::Compression;
use crate::pg::{TimelineId, WalFileName, WalSegSize};

/// Largest WAL object body accepted: a 1 GiB segment.
const MAX_WAL: u64 = 1 << 30;

/// The object key of WAL file `name`: its timeline's directory, then the
/// name as PostgreSQL writes it.
pub fn wal_key(paths: &StanzaPaths, name: &WalFileName) -> String {
    format!("{}{}/{name}", paths.wal(), timeline_dir(name.timeline()))
}

/// The directory of a timeline under `wal/` and `wal-summary/`: 8 hex digits.
pub fn timeline_dir(tli: TimelineId) -> String {
    format!("{:08X}", tli.get())
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
        name: &WalFileName,
        data: Vec<u8>,
    ) -> Result<WalStored, RepoError> {
        if !matches!(name, WalFileName::Partial(_)) && self.has_wal(paths, name).await? {
            if let Some(found) = self.compare_wal(paths, name, &data).await? {
                return Ok(found);
            }
        }
        self.store_wal(paths, name, data).await?;
        Ok(WalStored::New)
    }

    /// The WAL files stored for timeline `tli`, sorted by name; names are
    /// read for segments of `seg` bytes (objects whose name is not a WAL file
    /// name of that size are left out).
    pub async fn list_wal(
        &self,
        paths: &StanzaPaths,
        tli: TimelineId,
        seg: WalSegSize,
    ) -> Result<Vec<WalFileName>, RepoError> {
        Ok(self
            .list_wal_sized(paths, tli, seg)
            .await?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// [`Repository::list_wal`] with each object's stored size.
    pub async fn list_wal_sized(
        &self,
        paths: &StanzaPaths,
        tli: TimelineId,
        seg: WalSegSize,
    ) -> Result<Vec<(WalFileName, u64)>, RepoError> {
        let prefix = format!("{}{}/", paths.wal(), timeline_dir(tli));
        let mut found: Vec<(WalFileName, u64)> =
            crate::storage::list_all(self.storage().as_ref(), &prefix)
                .await?
                .into_iter()
                .filter_map(|o| {
                    let name = WalFileName::parse(o.key.strip_prefix(&prefix)?, seg).ok()?;
                    (name.timeline() == tli).then_some((name, o.size))
                })
                .collect();
        found.sort_by_key(|(n, _)| n.to_string());
        Ok(found)
    }

    /// Delete WAL file `name` (retention); a missing one is not an error.
    pub async fn delete_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
    ) -> Result<(), RepoError> {
        match self.storage().delete(&wal_key(paths, name)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Timelines with a directory under `<stanza>/wal/`, sorted.
    pub async fn wal_timelines(&self, paths: &StanzaPaths) -> Result<Vec<TimelineId>, RepoError> {
        let prefix = paths.wal();
        let mut tlis: Vec<TimelineId> = crate::storage::list_all(self.storage().as_ref(), &prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix(&prefix)?;
                let (t, _) = rest.split_once('/')?;
                if t.len() != 8 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                TimelineId::new(u32::from_str_radix(t, 16).ok()?)
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
        name: &WalFileName,
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
        name: &WalFileName,
        data: Bytes,
    ) -> Result<(String, Bytes), RepoError> {
        let key = wal_key(paths, name);
        let keys = self.keys().cloned();
        let k = key.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            object::seal(ObjectKind::Wal, &k, &data, Compression::Lz4, keys.as_ref())
        })
        .await
        .map_err(RepoError::task("WAL encode"))?;
        Ok((key, sealed))
    }

    /// Whether WAL file `name` is stored.
    pub async fn has_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
    ) -> Result<bool, RepoError> {
        Ok(self.storage().head(&wal_key(paths, name)).await?.is_some())
    }

    /// Compare `data` with the stored WAL file `name` by downloading it:
    /// [`WalStored::AlreadyThere`] when equal, [`RepoError::WalConflict`]
    /// when not, `None` when nothing is stored under the name.
    pub async fn compare_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
        data: &[u8],
    ) -> Result<Option<WalStored>, RepoError> {
        match self.load_wal(paths, name).await? {
            Some(existing) if existing[..] == *data => Ok(Some(WalStored::AlreadyThere)),
            Some(_) => Err(RepoError::WalConflict {
                name: *name,
                stanza: paths.stanza().to_owned(),
            }),
            None => Ok(None),
        }
    }

    /// WAL file `name`, or `None` when the repository does not have it.
    pub async fn load_wal(
        &self,
        paths: &StanzaPaths,
        name: &WalFileName,
    ) -> Result<Option<Bytes>, RepoError> {
        let key = wal_key(paths, name);
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
    fn keys() {
        let n = WalFileName::parse("000000020000000000000003", WalSegSize::DEFAULT).unwrap();
        assert_eq!(
            wal_key(&StanzaPaths::new("main"), &n),
            "main/wal/00000002/000000020000000000000003"
        );
        let h = WalFileName::parse("0000000A.history", WalSegSize::DEFAULT).unwrap();
        assert_eq!(
            wal_key(&StanzaPaths::new("s"), &h),
            "s/wal/0000000A/0000000A.history"
        );
    }
}
