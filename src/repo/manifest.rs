//! Backup manifests: `<stanza>/backups/<backup-id>`, compressed and (when the
//! repository is) encrypted like every object. Body: postcard encoding of
//! [`Manifest`], whose first field is its version, so an unknown version is
//! refused before the rest is parsed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::object::{ChunkSealer, ObjectKind};
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::BlockId;
use crate::pg::{Lsn, SystemId, TimelineId, WalSegSize};
use crate::storage::list_all;

/// The manifest version this build writes and the newest it reads.
/// Version 2 added `wal_segment_size`, `corrupt_pages` and `relnames`
/// (version 1 was never released and is not read). Version 3 stores the
/// same bytes with PostgreSQL types (timeline, LSNs, system id, segment
/// size) that are checked when read: a timeline 0 or an impossible segment
/// size is refused as corrupt instead of being carried along. Version 4
/// appends a trailer ([`ManifestTrailer`]) after the same layout: the role
/// of the server the backup was taken on. Version 5's trailer adds the
/// incremental base and the bytes received; version 6's the relation map
/// ([`RelationMap`]). Version 7 is version 6 with 128-bit block ids (16
/// bytes each, in repositories of config version 4; decision 040).
pub const MANIFEST_VERSION: u32 = 7;
/// The newest manifest version with 256-bit block ids: what repositories
/// before config version 4 store.
pub const MANIFEST_WIDE: u32 = 6;

/// Bytes per block id in a manifest of `version`.
fn id_width(version: u32) -> usize {
    if version > MANIFEST_WIDE {
        16
    } else {
        32
    }
}
/// The oldest manifest version this build reads.
pub const MANIFEST_OLDEST: u32 = 2;
/// Largest manifest body accepted (4 GiB: 100 M+ blocks).
const MAX_MANIFEST: u64 = 4 << 30;

/// Bytes of encoded manifest handed on at a time ([`Manifest::encode_to`]).
pub const ENCODE_PIECE: usize = 1 << 20;

/// A postcard output that hands the encoding on in pieces.
struct Pieces<'a> {
    buf: Vec<u8>,
    sink: &'a mut dyn FnMut(&[u8]),
}

impl Pieces<'_> {
    fn hand_on(&mut self) {
        if !self.buf.is_empty() {
            (self.sink)(&self.buf);
            self.buf.clear();
        }
    }
}

impl postcard::ser_flavors::Flavor for Pieces<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.buf.push(data);
        if self.buf.len() >= ENCODE_PIECE {
            self.hand_on();
        }
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= ENCODE_PIECE {
            self.hand_on();
        }
        Ok(())
    }

    fn finalize(mut self) -> postcard::Result<()> {
        self.hand_on();
        Ok(())
    }
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    /// Path relative to the data directory (`base/5/16384`), or
    /// `pg_tblspc/<oid>/...` for tablespace files.
    pub path: String,
    /// File, directory or symbolic link.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Unix mode bits.
    pub mode: u32,
    /// Modification time, unix seconds.
    pub mtime: i64,
    /// Block ids in order; their lengths add up to `size`.
    pub blocks: Vec<BlockId>,
}

/// What a manifest entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file (its blocks hold the content).
    File,
    /// A directory (no blocks).
    Directory,
    /// A symbolic link to the target (no blocks), e.g. `pg_tblspc/<oid>`.
    Symlink(String),
}

/// A tablespace of the backed-up cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    /// Its OID (the name of its symlink in `pg_tblspc/`).
    pub oid: u32,
    /// Its location on the source server.
    pub location: String,
}

/// Sizes of a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTotals {
    /// Bytes of all files.
    pub logical_bytes: u64,
    /// Bytes of blocks this backup stored that the repository did not have,
    /// before compression.
    pub new_raw_bytes: u64,
    /// Bytes of packs this backup wrote (after compression and encryption).
    pub new_stored_bytes: u64,
    /// Blocks in all files.
    pub blocks: u64,
    /// Blocks this backup stored.
    pub new_blocks: u64,
}

/// Everything needed to restore one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Version of this structure (first, so it is read first).
    pub version: u32,
    /// Backup id (also the object name after `backups/`).
    pub id: String,
    /// Operator's label.
    pub label: String,
    /// PostgreSQL system identifier.
    pub system_id: SystemId,
    /// `server_version_num` of the source.
    pub pg_version: u32,
    /// Timeline the backup started on.
    pub timeline: TimelineId,
    /// LSN where the backup started (redo point of its checkpoint).
    pub start_lsn: Lsn,
    /// LSN where the backup became consistent.
    pub stop_lsn: Lsn,
    /// Unix microseconds at start.
    pub start_time: i64,
    /// Unix microseconds at stop.
    pub stop_time: i64,
    /// Block size files were cut at.
    pub block_size: u32,
    /// The files.
    pub files: Vec<BackupFile>,
    /// Tablespaces.
    pub tablespaces: Vec<Tablespace>,
    /// Sizes.
    pub totals: ManifestTotals,
    /// WAL segment size of the cluster.
    pub wal_segment_size: WalSegSize,
    /// Pages whose checksum failed while the backup was taken (kept only with
    /// `--allow-checksum-failures`; otherwise such a backup is refused).
    pub corrupt_pages: Vec<PageRef>,
    /// Relation names by file, as the catalogs said when the backup started
    /// (empty when walvault could not connect to the databases): lets
    /// `wal-inspect` name the tables a transaction dropped.
    pub relnames: Vec<RelName>,
    /// Taken on a standby (`Some(true)`) or a primary; `None` when not
    /// known (versions before 4, or a server before PostgreSQL 14, which
    /// does not report it over a replication connection). Stored in the
    /// trailer, not in the layout versions 2 and 3 share.
    #[serde(skip)]
    pub from_standby: Option<bool>,
    /// The backup PostgreSQL (17+) sent only the changed blocks against;
    /// the files here are complete all the same (trailer, version 5).
    #[serde(skip)]
    pub incremental_from: Option<String>,
    /// Bytes of file contents the server sent (`None` before version 5).
    #[serde(skip)]
    pub received_bytes: Option<u64>,
    /// Every database's relations and their files, as the catalogs said
    /// when the backup started (`None` before version 6, or when walvault
    /// could not read them): what `extract` downloads for one table.
    #[serde(skip)]
    pub relations: Option<RelationMap>,
}

/// The relations of every database, by file (version 6).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationMap {
    /// `full_page_writes` when the backup started (`None`: not known).
    pub full_page_writes: Option<bool>,
    /// The databases, in name order.
    pub databases: Vec<DatabaseRelations>,
}

/// One database's relations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseRelations {
    /// Its OID (the directory `base/<oid>`).
    pub oid: u32,
    /// Its name.
    pub name: String,
    /// Every relation with storage was listed (false: walvault could not
    /// connect to it, e.g. `datallowconn` is off).
    pub complete: bool,
    /// Relations with storage.
    pub relations: Vec<Relation>,
}

/// A relation with storage, or a partitioned table (since 2026-12-06;
/// maps recorded before list neither partitioned tables nor partitions'
/// parents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    /// `pg_class.oid`.
    pub oid: u32,
    /// Its file number (`pg_relation_filenode`); 0 for a partitioned
    /// table, which has none.
    pub filenode: u32,
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `relkind`: `r` table, `p` partitioned table, `i` index, `t` TOAST
    /// table, `S` sequence, `m` materialized view.
    pub kind: u8,
    /// The table it belongs to: an index's table, a TOAST table's (or its
    /// index's) owner, a partition's partitioned table, an owned
    /// sequence's table; 0 for none.
    pub owner: u32,
}

impl RelationMap {
    /// The database called `name`.
    pub fn database(&self, name: &str) -> Option<&DatabaseRelations> {
        self.databases.iter().find(|d| d.name == name)
    }
}

impl DatabaseRelations {
    /// The table (`r`, `p` or `m`) `schema.name`.
    pub fn table(&self, schema: &str, name: &str) -> Option<&Relation> {
        self.relations
            .iter()
            .find(|r| r.schema == schema && r.name == name && matches!(r.kind, b'r' | b'p' | b'm'))
    }

    /// Relation `oid` and everything that belongs to it, directly or
    /// through another (a partitioned table's partitions with their
    /// indexes and TOAST tables).
    pub fn with_dependents(&self, oid: u32) -> std::collections::HashSet<u32> {
        let mut set = std::collections::HashSet::from([oid]);
        loop {
            let before = set.len();
            for r in &self.relations {
                if r.owner != 0 && set.contains(&r.owner) {
                    set.insert(r.oid);
                }
            }
            if set.len() == before {
                return set;
            }
        }
    }
}

/// What version 4 appends after the version-3 layout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ManifestTrailer {
    /// [`Manifest::from_standby`].
    pub from_standby: Option<bool>,
}

/// What version 5 appends after the version-3 layout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ManifestTrailerV5 {
    /// [`Manifest::from_standby`].
    pub from_standby: Option<bool>,
    /// [`Manifest::incremental_from`].
    pub incremental_from: Option<String>,
    /// [`Manifest::received_bytes`].
    pub received_bytes: Option<u64>,
}

/// What version 6 appends after the version-3 layout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ManifestTrailerV6 {
    /// [`Manifest::from_standby`].
    pub from_standby: Option<bool>,
    /// [`Manifest::incremental_from`].
    pub incremental_from: Option<String>,
    /// [`Manifest::received_bytes`].
    pub received_bytes: Option<u64>,
    /// [`Manifest::relations`].
    pub relations: Option<RelationMap>,
}

/// A relation's name and file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelName {
    /// Database OID.
    pub db: u32,
    /// Relfilenode.
    pub relfilenode: u32,
    /// `database.schema.relation`.
    pub name: String,
}

/// A page of a relation file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    /// File, relative to the data directory.
    pub file: String,
    /// Block number within the file.
    pub block: u64,
}

/// The time in a backup id.
const ID_TIME: &str = "%Y%m%dT%H%M%SZ";

impl Manifest {
    /// A new backup id: sortable UTC time plus 4 random hex digits,
    /// `20261123T140500Z-a1b2`, later in sort order than `newest` (the
    /// stanza's newest id), since "the newest backup" is the last id.
    ///
    /// Two backups finishing in the same second would otherwise be ordered
    /// by their random digits (still the case for two writers committing
    /// at the same moment: each sees the other's id only once it exists). When `newest` holds this second (or the next:
    /// clocks of two hosts differ), the answer is `Err(wait)`: ask again
    /// after `wait`, as the id is the backup's time. A `newest` further
    /// ahead (the clock went back) gets the second after it.
    pub fn next_id(newest: Option<&str>, now: DateTime<Utc>) -> Result<String, Duration> {
        let now_s = now.timestamp();
        let newest_s = newest.and_then(Manifest::id_time).map(|t| t.timestamp());
        let second = match newest_s {
            Some(n) if n >= now_s && n - now_s <= 1 => {
                let next = DateTime::<Utc>::from_timestamp(n + 1, 0).unwrap_or(now);
                return Err((next - now).to_std().unwrap_or(Duration::from_millis(100)));
            }
            Some(n) if n > now_s => DateTime::<Utc>::from_timestamp(n + 1, 0).unwrap_or(now),
            _ => now,
        };
        Ok(format!(
            "{}-{}",
            second.format(ID_TIME),
            crate::codec::to_hex(&rand::random::<[u8; 2]>())
        ))
    }

    /// The time a backup id names (when the backup was stored), to the
    /// second.
    pub fn id_time(id: &str) -> Option<DateTime<Utc>> {
        let t = id.split('-').next()?;
        chrono::NaiveDateTime::parse_from_str(t, ID_TIME)
            .ok()
            .map(|t| t.and_utc())
    }

    pub fn object_name(paths: &StanzaPaths, id: &str) -> String {
        format!("{}{id}", paths.backups())
    }

    /// The trailer of the version (empty before version 4).
    fn trailer(&self) -> Result<Vec<u8>, RepoError> {
        let t = match self.version {
            0..=3 => return Ok(Vec::new()),
            4 => postcard::to_stdvec(&ManifestTrailer {
                from_standby: self.from_standby,
            }),
            5 => postcard::to_stdvec(&ManifestTrailerV5 {
                from_standby: self.from_standby,
                incremental_from: self.incremental_from.clone(),
                received_bytes: self.received_bytes,
            }),
            _ => postcard::to_stdvec(&ManifestTrailerV6 {
                from_standby: self.from_standby,
                incremental_from: self.incremental_from.clone(),
                received_bytes: self.received_bytes,
                relations: self.relations.clone(),
            }),
        };
        t.map_err(RepoError::encode("a manifest"))
    }

    /// Bytes of the encoded body.
    pub fn encoded_len(&self) -> Result<u64, RepoError> {
        let layout = crate::codec::with_id_width(id_width(self.version), || {
            postcard::serialize_with_flavor(self, postcard::ser_flavors::Size::default())
        })
        .map_err(RepoError::encode("a manifest"))?;
        Ok((layout + self.trailer()?.len()) as u64)
    }

    /// Encode the body, handing it to `sink` in pieces of about
    /// [`ENCODE_PIECE`] bytes as it is produced (32 bytes per block: a
    /// large cluster's manifest is never held encoded whole).
    pub fn encode_to(&self, sink: &mut dyn FnMut(&[u8])) -> Result<(), RepoError> {
        crate::codec::with_id_width(id_width(self.version), || {
            postcard::serialize_with_flavor(
                self,
                Pieces {
                    buf: Vec::with_capacity(ENCODE_PIECE),
                    sink: &mut *sink,
                },
            )
        })
        .map_err(RepoError::encode("a manifest"))?;
        let trailer = self.trailer()?;
        if !trailer.is_empty() {
            sink(&trailer);
        }
        Ok(())
    }

    /// Encode as an object body.
    pub fn encode(&self) -> Result<Vec<u8>, RepoError> {
        let len = usize::try_from(self.encoded_len()?).unwrap_or(0);
        let mut body = Vec::with_capacity(len);
        self.encode_to(&mut |p| body.extend_from_slice(p))?;
        Ok(body)
    }

    /// The sealed object of this manifest in `repo`, encoded and
    /// compressed piece by piece into one buffer of its final size.
    pub fn seal(&self, repo: &Repository, name: &str) -> Result<bytes::Bytes, RepoError> {
        self.seal_with(name, repo.keys().cloned())
    }

    fn seal_with(
        &self,
        name: &str,
        keys: Option<crate::codec::Keys>,
    ) -> Result<bytes::Bytes, RepoError> {
        let len = self.encoded_len()?;
        // LZ4 never stores a piece longer than it is; a last piece may need
        // 10 % more room while it is compressed, each piece 8 header bytes
        let room = usize::try_from(len).unwrap_or(0);
        let expect = room + room / 64 + ENCODE_PIECE / 8 + 1024;
        let mut sealer = ChunkSealer::new(ObjectKind::Manifest, name, len, keys, expect);
        self.encode_to(&mut |p| sealer.push(p))?;
        sealer.finish()
    }

    /// Decode an object body; `object` names it in errors.
    pub fn decode(body: &[u8], object: &str) -> Result<Manifest, RepoError> {
        let (version, _) =
            postcard::take_from_bytes::<u32>(body).map_err(|e| RepoError::Corrupt {
                object: object.to_owned(),
                reason: format!("no version: {e}"),
            })?;
        // versions 2 and 3 share one layout (3 checks the typed fields)
        if !(MANIFEST_OLDEST..=MANIFEST_VERSION).contains(&version) {
            return Err(RepoError::UnsupportedVersion {
                object: object.to_owned(),
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let corrupt = |e: postcard::Error| RepoError::Corrupt {
            object: object.to_owned(),
            reason: e.to_string(),
        };
        let (mut m, rest): (Manifest, &[u8]) =
            crate::codec::with_id_width(id_width(version), || postcard::take_from_bytes(body))
                .map_err(corrupt)?;
        if version >= 4 {
            let (trailer, rest) = if version == 4 {
                let (t, rest) =
                    postcard::take_from_bytes::<ManifestTrailer>(rest).map_err(corrupt)?;
                let t = ManifestTrailerV6 {
                    from_standby: t.from_standby,
                    ..Default::default()
                };
                (t, rest)
            } else if version == 5 {
                let (t, rest) =
                    postcard::take_from_bytes::<ManifestTrailerV5>(rest).map_err(corrupt)?;
                let t = ManifestTrailerV6 {
                    from_standby: t.from_standby,
                    incremental_from: t.incremental_from,
                    received_bytes: t.received_bytes,
                    relations: None,
                };
                (t, rest)
            } else {
                postcard::take_from_bytes::<ManifestTrailerV6>(rest).map_err(corrupt)?
            };
            if !rest.is_empty() {
                return Err(RepoError::Corrupt {
                    object: object.to_owned(),
                    reason: format!("{} bytes after the trailer", rest.len()),
                });
            }
            m.from_standby = trailer.from_standby;
            m.incremental_from = trailer.incremental_from;
            m.received_bytes = trailer.received_bytes;
            m.relations = trailer.relations;
        } else if !rest.is_empty() {
            return Err(RepoError::Corrupt {
                object: object.to_owned(),
                reason: format!("{} bytes after the manifest", rest.len()),
            });
        }
        let blocks: u64 = m.files.iter().map(|f| f.blocks.len() as u64).sum();
        if blocks != m.totals.blocks {
            return Err(RepoError::Corrupt {
                object: object.to_owned(),
                reason: format!(
                    "lists {blocks} blocks but its totals say {}",
                    m.totals.blocks
                ),
            });
        }
        Ok(m)
    }

    /// Whether backup `id` has a manifest.
    pub async fn exists(
        repo: &Repository,
        paths: &StanzaPaths,
        id: &str,
    ) -> Result<bool, RepoError> {
        Ok(repo
            .storage()
            .head(&Manifest::object_name(paths, id))
            .await?
            .is_some())
    }

    /// Delete backup `id`'s manifest (retention); the blocks only it
    /// referenced become garbage for `gc::collect`.
    pub async fn delete(repo: &Repository, paths: &StanzaPaths, id: &str) -> Result<(), RepoError> {
        match repo
            .storage()
            .delete(&Manifest::object_name(paths, id))
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        // then PostgreSQL's manifest of it (nothing needs it once the
        // backup is gone; a write-once lock keeps it until the lock ends)
        match repo.storage().delete(&paths.server_manifest(id)).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(crate::storage::StorageError::Locked { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Store PostgreSQL's `backup_manifest` of backup `id` (before its
    /// manifest commits the backup).
    pub async fn store_server_manifest(
        repo: &Repository,
        paths: &StanzaPaths,
        id: &str,
        body: &[u8],
    ) -> Result<(), RepoError> {
        let name = paths.server_manifest(id);
        let sealed = repo
            .seal_blocking(ObjectKind::ServerManifest, &name, body.to_vec())
            .await?;
        repo.storage().put(&name, sealed).await?;
        Ok(())
    }

    /// PostgreSQL's `backup_manifest` of backup `id`; `None` for a backup
    /// stored without one (before walvault kept them).
    pub async fn load_server_manifest(
        repo: &Repository,
        paths: &StanzaPaths,
        id: &str,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        match repo
            .read_object(
                ObjectKind::ServerManifest,
                &paths.server_manifest(id),
                4 << 30,
            )
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write the manifest: the commit point of a backup. Returns the bytes
    /// stored.
    pub async fn store(&self, repo: &Repository, paths: &StanzaPaths) -> Result<u64, RepoError> {
        let name = Manifest::object_name(paths, &self.id);
        if self.version != repo.manifest_version() {
            // ids of one width in a repository of the other: a bug, never stored
            return Err(RepoError::Corrupt {
                object: name,
                reason: format!(
                    "a manifest of version {} cannot be stored in a repository of config version {} (it takes version {})",
                    self.version,
                    repo.config().version,
                    repo.manifest_version()
                ),
            });
        }
        let sealed = self.seal(repo, &name)?;
        let stored = sealed.len() as u64;
        repo.storage().put(&name, sealed).await?;
        Ok(stored)
    }

    /// Read backup `id`.
    pub async fn load(
        repo: &Repository,
        paths: &StanzaPaths,
        id: &str,
    ) -> Result<Manifest, RepoError> {
        let name = Manifest::object_name(paths, id);
        let body = repo
            .read_object(ObjectKind::Manifest, &name, MAX_MANIFEST)
            .await?;
        let m = Manifest::decode(&body, &name)?;
        if m.id != id {
            return Err(RepoError::Corrupt {
                object: name,
                reason: format!("holds backup {} instead", m.id),
            });
        }
        Ok(m)
    }

    /// Ids of all backups of a stanza, oldest first.
    pub async fn list_ids(
        repo: &Repository,
        paths: &StanzaPaths,
    ) -> Result<Vec<String>, RepoError> {
        Ok(Manifest::list_sized(repo, paths)
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Ids of all backups of a stanza with their manifests' stored sizes,
    /// oldest first.
    async fn list_sized(
        repo: &Repository,
        paths: &StanzaPaths,
    ) -> Result<Vec<(String, u64)>, RepoError> {
        let prefix = paths.backups();
        Ok(list_all(repo.storage().as_ref(), &prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                o.key
                    .strip_prefix(&prefix)
                    .map(|id| (id.to_owned(), o.size))
            })
            .collect())
    }

    /// Every manifest of a stanza, oldest first.
    pub async fn load_all(
        repo: &Repository,
        paths: &StanzaPaths,
    ) -> Result<Vec<Manifest>, RepoError> {
        Manifest::load_listed(repo, paths, 8, false).await
    }

    /// Every backup's manifest, oldest first, without block lists (each
    /// file's `blocks` is empty): what planning and listing read, in
    /// memory that does not grow with the number of backups. Up to 8 load
    /// at once (on an object store each is a round trip), but no more than
    /// 16 MiB of stored manifests ([`HEADER_LOAD_KIB`]): a 15 GB backup's ids are
    /// 60 MB, its decoded body as much again, so such manifests load one at
    /// a time. Never for what needs the blocks: storing a manifest,
    /// verifying, copying, or finding the packs backups need (garbage
    /// collection, extending write-once locks).
    pub async fn load_all_headers(
        repo: &Repository,
        paths: &StanzaPaths,
    ) -> Result<Vec<Manifest>, RepoError> {
        Manifest::load_listed(repo, paths, 8, true).await
    }

    /// Every listed manifest, `at_once` at a time, block lists dropped
    /// with `headers` (and then at most [`HEADER_LOAD_KIB`] of stored
    /// manifests in flight); one deleted meanwhile is left out.
    async fn load_listed(
        repo: &Repository,
        paths: &StanzaPaths,
        at_once: usize,
        headers: bool,
    ) -> Result<Vec<Manifest>, RepoError> {
        let listed = Manifest::list_sized(repo, paths).await?;
        let budget = tokio::sync::Semaphore::new(HEADER_LOAD_KIB as usize);
        let budget = &budget;
        let loaded: Vec<Result<Option<Manifest>, RepoError>> = futures::stream::iter(listed)
            .map(|(id, size)| async move {
                // a manifest larger than the budget takes all of it
                let kib = u32::try_from(size.div_ceil(1024))
                    .unwrap_or(u32::MAX)
                    .clamp(1, HEADER_LOAD_KIB);
                // (the semaphore is never closed)
                let _permit = match headers {
                    true => budget.acquire_many(kib).await.ok(),
                    false => None,
                };
                match Manifest::load(repo, paths, &id).await {
                    Ok(mut m) => {
                        if headers {
                            for f in &mut m.files {
                                f.blocks = Vec::new();
                            }
                        }
                        Ok(Some(m))
                    }
                    Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None), // deleted meanwhile
                    Err(e) => Err(e),
                }
            })
            .buffered(at_once)
            .collect()
            .await;
        loaded.into_iter().filter_map(Result::transpose).collect()
    }
}

/// KiB of stored manifests [`Manifest::load_all_headers`] loads at once
/// (16 MiB): small manifests load 8 at a time, large ones alone.
const HEADER_LOAD_KIB: u32 = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn next_id_sorts_after_the_newest() {
        let at = |s: &str| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%S%.3f")
                .unwrap()
                .and_utc()
        };
        // no backup yet, or an older one: this second
        let id = Manifest::next_id(None, at("20261123T140500.250")).unwrap();
        assert!(id.starts_with("20261123T140500Z-"), "{id}");
        let id =
            Manifest::next_id(Some("20261123T140459Z-ffff"), at("20261123T140500.250")).unwrap();
        assert!(id.starts_with("20261123T140500Z-"), "{id}");
        assert!(id.as_str() > "20261123T140459Z-ffff");
        // one in this second: wait for the next
        assert_eq!(
            Manifest::next_id(Some("20261123T140500Z-0000"), at("20261123T140500.250")),
            Err(Duration::from_millis(750))
        );
        // a second ahead (another host's clock): wait for it to pass
        assert_eq!(
            Manifest::next_id(Some("20261123T140501Z-0000"), at("20261123T140500.250")),
            Err(Duration::from_millis(1750))
        );
        // far ahead (the clock went back): the second after it, still ordered
        let id =
            Manifest::next_id(Some("20261123T150000Z-ffff"), at("20261123T140500.250")).unwrap();
        assert!(id.starts_with("20261123T150001Z-"), "{id}");
        assert!(id.as_str() > "20261123T150000Z-ffff");
    }

    /// A 128-bit id (16 zero bytes after it), as version 7 stores.
    fn short_id(b: u8) -> BlockId {
        let mut id = [0u8; 32];
        id[..16].fill(b);
        BlockId(id)
    }

    fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            id: "20261123T140500Z-a1b2".into(),
            label: "nightly".into(),
            system_id: SystemId(7_000_000_000_000_000_001),
            pg_version: 150018,
            timeline: TimelineId::FIRST,
            start_lsn: Lsn::new(0x300_0028),
            stop_lsn: Lsn::new(0x300_0100),
            start_time: 1,
            stop_time: 2,
            block_size: 131072,
            files: vec![BackupFile {
                path: "base/5/16384".into(),
                kind: FileKind::File,
                size: 8192,
                mode: 0o600,
                mtime: 3,
                blocks: vec![short_id(4)],
            }],
            tablespaces: vec![Tablespace {
                oid: 16390,
                location: "/srv/ts".into(),
            }],
            totals: ManifestTotals {
                logical_bytes: 8192,
                blocks: 1,
                ..Default::default()
            },
            wal_segment_size: WalSegSize::DEFAULT,
            corrupt_pages: vec![PageRef {
                file: "base/5/16384".into(),
                block: 0,
            }],
            relnames: vec![RelName {
                db: 5,
                relfilenode: 16384,
                name: "postgres.public.t".into(),
            }],
            from_standby: Some(true),
            incremental_from: Some("20261206T040000Z-0a0b".into()),
            received_bytes: Some(12345),
            relations: Some(RelationMap {
                full_page_writes: Some(true),
                databases: vec![DatabaseRelations {
                    oid: 5,
                    name: "postgres".into(),
                    complete: true,
                    relations: vec![Relation {
                        oid: 16385,
                        filenode: 16384,
                        schema: "public".into(),
                        name: "t".into(),
                        kind: b'r',
                        owner: 0,
                    }],
                }],
            }),
        }
    }

    /// Version 4 carries the source's role in a trailer; a version-3 body
    /// (the same layout, no trailer) still reads, with the role unknown.
    #[test]
    fn the_trailer_carries_the_role_and_version_3_reads_without_it() {
        let m = sample();
        assert_eq!(
            Manifest::decode(&m.encode().unwrap(), "m")
                .unwrap()
                .from_standby,
            Some(true)
        );
        let mut v3 = m.clone();
        v3.version = 3;
        let body = v3.encode().unwrap();
        let back = Manifest::decode(&body, "m").unwrap();
        assert_eq!(back.from_standby, None);
        assert_eq!(back.files, m.files);
        // version 4: the role, not yet the incremental fields
        let mut v4 = m.clone();
        v4.version = 4;
        let back = Manifest::decode(&v4.encode().unwrap(), "m").unwrap();
        assert_eq!(back.from_standby, Some(true));
        assert_eq!((back.incremental_from, back.received_bytes), (None, None));
        assert_eq!(back.relations, None);
        // version 5: the incremental fields, not yet the relation map
        let mut v5 = m.clone();
        v5.version = 5;
        let back = Manifest::decode(&v5.encode().unwrap(), "m").unwrap();
        assert_eq!(back.incremental_from, m.incremental_from);
        assert_eq!(back.received_bytes, Some(12345));
        assert_eq!(back.relations, None);
        let back = Manifest::decode(&m.encode().unwrap(), "m").unwrap();
        assert_eq!(back.relations, m.relations);
        assert_eq!(
            back.relations
                .as_ref()
                .and_then(|r| r.database("postgres"))
                .and_then(|d| d.table("public", "t"))
                .map(|t| t.filenode),
            Some(16384)
        );
    }

    /// Version 7 stores 16 bytes per block id, version 6 the same ids in
    /// 32; a 256-bit id never goes into a version 7 manifest cut short.
    #[test]
    fn version_7_stores_128_bit_ids() {
        let mut m = sample();
        let n = 1000;
        m.files[0].blocks = (0..n).map(|i| short_id(i as u8)).collect();
        m.totals.blocks = n as u64;
        let v7 = m.encode().unwrap();
        let mut v6 = m.clone();
        v6.version = MANIFEST_WIDE;
        let wide = v6.encode().unwrap();
        assert_eq!(wide.len() - v7.len(), 16 * n);
        assert_eq!(Manifest::decode(&v7, "m").unwrap(), m);
        assert_eq!(Manifest::decode(&wide, "m").unwrap(), v6);
        m.files[0].blocks[7] = BlockId([9; 32]);
        // (postcard keeps no message: "Serde Serialization Error")
        assert!(m.encode().is_err());
        assert!(v6.encode().is_ok());
        // the width is put back after a failed encoding
        assert_eq!(Manifest::decode(&wide, "m").unwrap(), v6);
    }

    #[test]
    fn round_trip_and_versions() {
        let m = sample();
        let body = m.encode().unwrap();
        assert_eq!(Manifest::decode(&body, "m").unwrap(), m);
        let mut newer = m.clone();
        newer.version = MANIFEST_VERSION + 1;
        let e = Manifest::decode(&newer.encode().unwrap(), "m").unwrap_err();
        assert!(
            matches!(e, RepoError::UnsupportedVersion { found, .. } if found == MANIFEST_VERSION + 1),
            "{e}"
        );
        for n in 0..body.len() {
            assert!(
                Manifest::decode(&body[..n], "m").is_err(),
                "truncated at {n} accepted"
            );
        }
    }

    /// A manifest larger than a piece is encoded in pieces that add up to
    /// exactly the whole encoding, and seals into an object that opens to it
    /// (encrypted or not).
    #[test]
    fn a_large_manifest_is_encoded_in_pieces() {
        let mut m = sample();
        let n = 3 * ENCODE_PIECE / 16 + 7;
        m.files[0].blocks = (0..n).map(|_| short_id(rand::random())).collect();
        m.files[0].size = n as u64 * 8192;
        m.totals.blocks = n as u64;
        let mut whole = crate::codec::with_id_width(16, || postcard::to_stdvec(&m)).unwrap();
        whole.extend(m.trailer().unwrap());
        let (mut pieces, mut got) = (0, Vec::new());
        m.encode_to(&mut |p| {
            pieces += 1;
            got.extend_from_slice(p);
        })
        .unwrap();
        assert!(got == whole, "the pieces differ from the whole encoding");
        assert!(pieces > 3, "{pieces} pieces");
        assert_eq!(m.encoded_len().unwrap(), whole.len() as u64);
        assert!(m.encode().unwrap() == whole);
        let keys = crate::codec::Keys::derive(&crate::codec::MasterKey::generate(), b"r");
        for k in [None, Some(keys)] {
            let sealed = m.seal_with("main/backups/x", k.clone()).unwrap();
            let body = super::super::object::open(
                ObjectKind::Manifest,
                "main/backups/x",
                &sealed,
                k.as_ref(),
                MAX_MANIFEST,
            )
            .unwrap();
            assert_eq!(Manifest::decode(&body, "m").unwrap(), m);
        }
    }

    /// Version 2 stored the same layout with plain integers: it still reads,
    /// and a timeline 0 (never valid) is refused as corrupt.
    #[test]
    fn version_2_still_reads_and_typed_fields_are_checked() {
        let mut m = sample();
        m.version = 2;
        // (before version 4 the source's role is not stored)
        m.from_standby = None;
        m.incremental_from = None;
        m.received_bytes = None;
        m.relations = None;
        let body = m.encode().unwrap();
        assert_eq!(Manifest::decode(&body, "m").unwrap(), m);
        // version 1 was never released
        m.version = MANIFEST_OLDEST - 1;
        assert!(matches!(
            Manifest::decode(&m.encode().unwrap(), "m"),
            Err(RepoError::UnsupportedVersion { .. })
        ));
        // the timeline follows version, id, label, system id and PostgreSQL
        // version: the same layout written with timeline 0 is corrupt
        let raw = (MANIFEST_VERSION, "id", "", 7u64, 150018u32, 0u32);
        let e = Manifest::decode(&postcard::to_stdvec(&raw).unwrap(), "m").unwrap_err();
        assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
    }

    proptest! {
        #[test]
        fn random_bodies_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut d = data.clone();
            if !d.is_empty() { d[0] = 1; }
            let _ = Manifest::decode(&d, "m");
            let _ = Manifest::decode(&data, "m");
        }
    }
}
