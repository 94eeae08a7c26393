//! The content-addressed repository (format: `docs/repository-format.md`).
//!
//! Files are cut into blocks; a block's id is the SHA-256 of its bytes (an
//! HMAC under a derived key when encrypted). Blocks never stored before are
//! compressed, encrypted and appended to packs; an index maps ids to packs;
//! a backup manifest lists files as sequences of block ids. Every backup is a
//! full backup that stores only new blocks.
//!
//! Invariants:
//! - objects are written packs → index → manifest, so a crash leaves only
//!   unreferenced data, never a manifest pointing at a missing block;
//! - packs are immutable; names are random or content-derived, never reused,
//!   so nothing depends on conditional writes;
//! - every read is verified: AEAD tag when encrypted; otherwise a SHA-256
//!   digest (objects) or a CRC-32C of id and bytes (blobs).

mod config;
mod damaged;
pub mod files;
mod fresh;
pub mod gc;
mod index;
mod keys;
mod manifest;
pub mod object;
mod pack;
mod read;
pub use read::RunBytes;
mod session;
mod wal;

use std::sync::Arc;

use bytes::Bytes;

pub use config::{InitParams, RepoConfig, CONFIG_KEY};
pub use damaged::{clear_damaged, damaged_packs, mark_damaged};
pub use index::{BlockLocation, Index, IndexBuilder, PackId};
pub use keys::{validate_secret, KdfCost, KeySlot, Secret, KEYS_PREFIX};
pub use manifest::{
    BackupFile, DatabaseRelations, FileKind, Manifest, ManifestTotals, PageRef, RelName, Relation,
    RelationMap, Tablespace, MANIFEST_VERSION,
};
pub use pack::{
    decode_blob, encode_blob, encode_group, read_pack_header, EntryFormat, GroupCache, PackEntry,
    BLOB_GROUP,
};
pub use session::{Session, SessionOptions, SessionStats};
pub use wal::{journal_size, timeline_dir, wal_key, WalJournal, WalStored};

use crate::codec::{IdHasher, Keys, MasterKey};
use crate::storage::{list_all, Storage, StorageError};

/// Default bytes per block: one PostgreSQL page. Chosen by measurement
/// (docs/block-size-study.md): under sparse updates every doubling of the
/// block size nearly doubles what a backup uploads.
pub const DEFAULT_BLOCK_SIZE: u32 = 8 * 1024;
/// Default target size of a pack: 16 MiB, few enough requests to keep S3
/// request costs negligible, small enough that the packs a backup holds
/// at once (one filling, one queued, up to four uploading) stay within
/// its memory bound (32 MiB before 2026-12-07: a 15 GB backup then peaked
/// at 285 MiB, two packs of 36 MiB at a time).
pub const DEFAULT_PACK_SIZE: u32 = 16 << 20;

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An object failed verification or does not parse.
    #[error("repository object {object} is damaged: {reason}")]
    Corrupt {
        /// Object key.
        object: String,
        /// What is wrong.
        reason: String,
    },
    /// An object written by a newer walvault.
    #[error("repository object {object} has format version {found}, this walvault reads up to version {supported}: upgrade walvault")]
    UnsupportedVersion {
        /// Object key.
        object: String,
        /// Version found.
        found: u32,
        /// Newest version known.
        supported: u32,
    },
    /// No `config` object.
    #[error("no walvault repository at {location}: run `walvault init` first")]
    NotARepository {
        /// The location.
        location: String,
    },
    /// `init` on a location that already holds objects.
    #[error("{location} is not empty ({what}); a repository is created only in an empty location")]
    NotEmpty {
        /// The location.
        location: String,
        /// What was found there.
        what: String,
    },
    /// An encrypted repository opened without a secret.
    #[error("the repository is encrypted: give its passphrase (WALVAULT_PASSPHRASE or --passphrase-file) or key file (WALVAULT_KEY_FILE)")]
    KeyNeeded,
    /// No key slot opens with the secret given.
    #[error(
        "wrong passphrase or key file: none of the {slots} key slot(s) in keys/ opens with it"
    )]
    WrongKey {
        /// Slots tried.
        slots: usize,
    },
    /// A block a manifest or a read names is not in the index.
    #[error("block {id} is not in the index{}", context.map(|c| format!(" ({c})")).unwrap_or_default())]
    MissingBlock {
        /// The block.
        id: crate::codec::BlockId,
        /// Where it was looked up, when that is not the index itself.
        context: Option<&'static str>,
    },
    /// Manifests reference blocks the index lacks: garbage collection refuses to run.
    #[error(
        "{count} block(s) referenced by manifests are missing from the index (first: {first}); \
         refusing to collect garbage in a damaged repository"
    )]
    DamagedForGc {
        /// How many blocks are missing.
        count: usize,
        /// The first of them.
        first: crate::codec::BlockId,
    },
    /// A parameter of the repository or of a call is out of range.
    #[error("{what} {value} {rule}")]
    OutOfRange {
        /// What the parameter is ("block size").
        what: &'static str,
        /// The value given.
        value: u64,
        /// What it must be ("must be a multiple of 8192 from 8 KiB to 16 MiB").
        rule: &'static str,
    },
    /// A passphrase or key file too weak to protect the repository key.
    #[error("{0}")]
    WeakSecret(&'static str),
    /// The key derivation (argon2) refused its parameters or input.
    #[error("key derivation (argon2): {0}")]
    KeyDerivation(String),
    /// A key operation on a repository that has no keys.
    #[error("the repository is not encrypted: it has no keys")]
    NotEncrypted,
    /// `key remove` of a slot that does not exist.
    #[error("no key slot {id}; `walvault key list` shows them")]
    NoSuchKeySlot {
        /// The slot id given.
        id: String,
    },
    /// `key remove` of the last slot.
    #[error("refusing to remove the only key slot: the repository could never be opened again; add another first")]
    LastKeySlot,
    /// A structure could not be encoded (a bug, or out of memory).
    #[error("encoding {what}: {reason}")]
    Encode {
        /// What was encoded.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A background task (encoding, decoding, uploading) panicked or was cancelled.
    #[error("{what} task failed: {reason}")]
    Task {
        /// What the task did.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// The data handed to a writer changed while it was read.
    #[error("{object}: {sealed} bytes were sealed, {declared} declared (the source changed while it was read?)")]
    SourceChanged {
        /// The object being written.
        object: String,
        /// Bytes actually pushed.
        sealed: u64,
        /// Bytes declared up front.
        declared: u64,
    },
    /// Reading the input of a backup session failed.
    #[error("reading input: {0}")]
    Input(std::io::Error),

    /// The temporary file a backup moves the block ids of the files it has
    /// read to failed.
    #[error("the temporary file of block ids in {}: {source}; set TMPDIR to a directory with room", dir.display())]
    Spill {
        /// The temporary directory.
        dir: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A session used after it finished or after an upload failed.
    #[error("{0}")]
    SessionClosed(&'static str),
    /// Input handed to a writer does not have the structure it must have
    /// (a base backup stream with data outside any file, or ending inside one).
    #[error("malformed input: {0}")]
    MalformedInput(&'static str),
    /// The blocks asked of one ranged read overlap or are out of order (a bug).
    #[error("blocks of a read of {object} overlap or are out of order")]
    BadRead {
        /// The pack read.
        object: String,
    },
    /// A WAL file already stored under this name has other content: two
    /// clusters (or two histories of one) archive into the same stanza.
    #[error("the repository already has WAL file {name} with different content: two servers are archiving into stanza {stanza} (split brain, or a restored copy archiving as the original); nothing was overwritten — give the other server its own stanza")]
    WalConflict {
        /// The WAL file name.
        name: crate::pg::WalFileName,
        /// The stanza.
        stanza: String,
    },
}

impl RepoError {
    /// A failed background task.
    pub(crate) fn task(what: &'static str) -> impl Fn(tokio::task::JoinError) -> RepoError + Copy {
        move |e| RepoError::Task {
            what,
            reason: e.to_string(),
        }
    }

    /// A structure that could not be encoded.
    pub(crate) fn encode<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> RepoError {
        move |e| RepoError::Encode {
            what,
            reason: e.to_string(),
        }
    }
}

/// Where one stanza's objects live.
#[derive(Debug, Clone)]
pub struct StanzaPaths {
    root: String,
}

impl StanzaPaths {
    /// Paths of stanza `name`.
    pub fn new(name: &str) -> StanzaPaths {
        StanzaPaths {
            root: format!("{name}/"),
        }
    }
    /// The stanza's name.
    pub fn stanza(&self) -> &str {
        self.root.trim_end_matches('/')
    }
    /// `<stanza>/wal-summary/`.
    pub fn wal_summaries(&self) -> String {
        format!("{}wal-summary/", self.root)
    }
    /// `<stanza>/packs/`.
    pub fn packs(&self) -> String {
        format!("{}packs/", self.root)
    }
    /// `<stanza>/packs/<first two hex digits>/<pack id>`.
    pub fn pack(&self, id: &PackId) -> String {
        let hex = id.to_string();
        format!("{}packs/{}/{hex}", self.root, &hex[..2])
    }
    /// `<stanza>/index/`.
    pub fn index_dir(&self) -> String {
        format!("{}index/", self.root)
    }
    /// `<stanza>/damaged/`: packs verify found damaged.
    pub fn damaged_dir(&self) -> String {
        format!("{}damaged/", self.root)
    }
    /// `<stanza>/damaged/<pack id>`.
    pub fn damaged(&self, pack: &PackId) -> String {
        format!("{}{pack}", self.damaged_dir())
    }
    /// `<stanza>/backups/`.
    pub fn backups(&self) -> String {
        format!("{}backups/", self.root)
    }
    /// `<stanza>/pg-manifest/<id>`: PostgreSQL's `backup_manifest` of
    /// backup `id`.
    pub fn server_manifest(&self, id: &str) -> String {
        format!("{}pg-manifest/{id}", self.root)
    }
    /// `<stanza>/locks/`.
    pub fn locks(&self) -> String {
        format!("{}locks/", self.root)
    }
    /// `<stanza>/wal/`.
    pub fn wal(&self) -> String {
        format!("{}wal/", self.root)
    }
    /// `<stanza>/catalog/`.
    pub fn catalog(&self) -> String {
        format!("{}catalog/", self.root)
    }
    /// `<stanza>/holds/`: one object per hold, `<backup id>/<random>`.
    pub fn holds(&self) -> String {
        format!("{}holds/", self.root)
    }
    /// `<stanza>/records/<kind>/`: results of verify runs and drills, one
    /// new object per result (never rewritten).
    pub fn records(&self, kind: &str) -> String {
        format!("{}records/{kind}/", self.root)
    }

    /// The key of a new record of `kind`: named by time (the newest sorts
    /// last) and a random suffix (two writers never collide).
    pub fn new_record(&self, kind: &str) -> String {
        format!(
            "{}{}-{}",
            self.records(kind),
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
            crate::codec::to_hex(&rand::random::<[u8; 4]>())
        )
    }
}

/// An open repository.
#[derive(Debug)]
pub struct Repository {
    storage: Arc<dyn Storage>,
    config: RepoConfig,
    master: Option<MasterKey>,
    keys: Option<Keys>,
    hasher: IdHasher,
}

impl Repository {
    /// Create a repository in an empty location; encrypted when `secret` is given.
    pub async fn init(
        storage: Arc<dyn Storage>,
        params: &InitParams,
        secret: Option<&Secret>,
        cost: KdfCost,
    ) -> Result<Repository, RepoError> {
        if let Some(s) = secret {
            validate_secret(s)?;
        }
        let existing = storage.list_page("", None).await?;
        if let Some(first) = existing.objects.first() {
            let what = if first.key == CONFIG_KEY {
                "a walvault repository is already there".to_owned()
            } else {
                format!("found {}", first.key)
            };
            return Err(RepoError::NotEmpty {
                location: storage.location(),
                what,
            });
        }
        let repo_id: [u8; 16] = rand::random();
        let mut config = RepoConfig::new(repo_id, params, secret.is_some())?;
        let (master, keys) = match secret {
            Some(s) => {
                let master = MasterKey::generate();
                let keys = Keys::derive(&master, config.repo_id.as_bytes());
                config.make_key_check(&keys);
                let slot = KeySlot::create(&master, s, &config.repo_id, "created by init", cost)?;
                storage.put(&slot.object_name(), slot.encode()?).await?;
                (Some(master), Some(keys))
            }
            None => (None, None),
        };
        // config last: a repository exists once its config does
        storage.put(CONFIG_KEY, config.encode()?).await?;
        Ok(Repository::assemble(storage, config, master, keys))
    }

    fn assemble(
        storage: Arc<dyn Storage>,
        config: RepoConfig,
        master: Option<MasterKey>,
        keys: Option<Keys>,
    ) -> Repository {
        Repository {
            // (a name `RepoConfig::decode` checked; a keyed function without
            // keys computes no id anyone reads)
            hasher: IdHasher::named(&config.block_id, keys.as_ref())
                .unwrap_or_else(|| IdHasher::new(keys.as_ref())),
            storage,
            config,
            master,
            keys,
        }
    }

    /// Open an existing repository; `secret` is needed when it is encrypted.
    pub async fn open(
        storage: Arc<dyn Storage>,
        secret: Option<&Secret>,
    ) -> Result<Repository, RepoError> {
        let data = match storage.get(CONFIG_KEY).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => {
                return Err(RepoError::NotARepository {
                    location: storage.location(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let config = RepoConfig::decode(&data)?;
        let (master, keys) = if config.encrypted() {
            let secret = secret.ok_or(RepoError::KeyNeeded)?;
            let slots = read_slots(storage.as_ref()).await?;
            let mut found = None;
            for slot in &slots {
                if let Some(m) = slot.unwrap_key(secret, &config.repo_id)? {
                    let keys = Keys::derive(&m, config.repo_id.as_bytes());
                    if !config.key_matches(&keys) {
                        return Err(RepoError::Corrupt {
                            object: slot.object_name(),
                            reason: "the key slot opens, but its key belongs to another repository"
                                .into(),
                        });
                    }
                    found = Some((m, keys));
                    break;
                }
            }
            let (m, k) = found.ok_or(RepoError::WrongKey { slots: slots.len() })?;
            (Some(m), Some(k))
        } else {
            (None, None)
        };
        Ok(Repository::assemble(storage, config, master, keys))
    }

    /// The storage underneath.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The repository's config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// The working keys (encrypted repositories).
    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// The block id function of this repository.
    pub fn hasher(&self) -> &IdHasher {
        &self.hasher
    }

    /// How this repository's pack headers and index objects list entries.
    pub fn entry_format(&self) -> pack::EntryFormat {
        pack::EntryFormat::of(&self.config)
    }

    /// The manifest version backups are stored with here: 7 (128-bit
    /// ids) in a repository of config version 4, else 6.
    pub fn manifest_version(&self) -> u32 {
        if self.config.compact() {
            MANIFEST_VERSION
        } else {
            manifest::MANIFEST_WIDE
        }
    }

    /// The key slots.
    pub async fn list_keys(&self) -> Result<Vec<KeySlot>, RepoError> {
        read_slots(self.storage.as_ref()).await
    }

    /// Add a key slot for another secret.
    pub async fn add_key(
        &self,
        secret: &Secret,
        label: &str,
        cost: KdfCost,
    ) -> Result<KeySlot, RepoError> {
        let master = self.master.as_ref().ok_or(RepoError::NotEncrypted)?;
        let slot = KeySlot::create(master, secret, &self.config.repo_id, label, cost)?;
        self.storage
            .put(&slot.object_name(), slot.encode()?)
            .await?;
        Ok(slot)
    }

    /// Remove key slot `id`; the last slot is never removed.
    pub async fn remove_key(&self, id: &str) -> Result<(), RepoError> {
        let slots = self.list_keys().await?;
        if !slots.iter().any(|s| s.id == id) {
            return Err(RepoError::NoSuchKeySlot { id: id.to_owned() });
        }
        if slots.len() == 1 {
            return Err(RepoError::LastKeySlot);
        }
        self.storage.delete(&format!("{KEYS_PREFIX}{id}")).await?;
        Ok(())
    }

    /// Seal an object body for storage under `name`.
    pub(crate) fn seal(&self, kind: object::ObjectKind, name: &str, body: &[u8]) -> Bytes {
        object::seal(
            kind,
            name,
            body,
            crate::codec::Compression::Lz4,
            self.keys.as_ref(),
        )
    }

    /// [`Repository::seal`] on the blocking pool: for large bodies (index
    /// objects, manifests) whose compression and encryption must not stall
    /// the async executor.
    pub(crate) async fn seal_blocking(
        &self,
        kind: object::ObjectKind,
        name: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, RepoError> {
        let keys = self.keys.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            object::seal(
                kind,
                &name,
                &body,
                crate::codec::Compression::Lz4,
                keys.as_ref(),
            )
        })
        .await
        .map_err(RepoError::task("encode"))
    }

    /// Store `value` as a small sealed JSON object `name`.
    pub async fn put_json<T: serde::Serialize>(
        &self,
        kind: object::ObjectKind,
        name: &str,
        value: &T,
    ) -> Result<(), RepoError> {
        let body = serde_json::to_vec(value).map_err(RepoError::encode(kind.label()))?;
        self.storage.put(name, self.seal(kind, name, &body)).await?;
        Ok(())
    }

    /// The sealed JSON object `name`; `None` when there is none.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: object::ObjectKind,
        name: &str,
    ) -> Result<Option<T>, RepoError> {
        let body = match self.read_object(kind, name, 64 << 20).await {
            Ok(b) => b,
            Err(RepoError::Storage(e)) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| RepoError::Corrupt {
                object: name.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Write a new version of the catalog object series `dir` (which ends
    /// in '/'): a new object `<dir><time>-<random>`, never a rewrite in
    /// place (a write-once repository keeps every object), then the older
    /// versions but the previous one are deleted where they can be (a
    /// locked one stays until its lock ends). Returns the new key.
    pub async fn put_series(
        &self,
        kind: object::ObjectKind,
        dir: &str,
        body: &[u8],
    ) -> Result<String, RepoError> {
        let key = format!(
            "{dir}{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
            crate::codec::to_hex(&rand::random::<[u8; 4]>())
        );
        self.storage.put(&key, self.seal(kind, &key, body)).await?;
        let mut older: Vec<String> = list_all(self.storage.as_ref(), dir)
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| *k < key)
            .collect();
        older.sort();
        older.pop(); // the previous version stays: a reader may be on it
        for k in older {
            if let Err(e) = self.storage.delete(&k).await {
                tracing::debug!("old version {k} stays for now: {e}");
            }
        }
        Ok(key)
    }

    /// The body of the newest readable version of the series `dir`, else
    /// of the single object `legacy` (where older versions kept it);
    /// `None` when there is neither.
    pub async fn get_series(
        &self,
        kind: object::ObjectKind,
        dir: &str,
        legacy: &str,
        max: u64,
    ) -> Result<Option<(String, Vec<u8>)>, RepoError> {
        let mut keys: Vec<String> = list_all(self.storage.as_ref(), dir)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        keys.sort();
        keys.push(legacy.to_owned());
        // newest first, the legacy object last
        let legacy_last = keys.pop();
        keys.reverse();
        keys.extend(legacy_last);
        for k in keys {
            match self.read_object(kind, &k, max).await {
                Ok(body) => return Ok(Some((k, body))),
                Err(RepoError::Storage(e)) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Every sealed JSON object under `prefix`, oldest name first; objects
    /// removed while listing are skipped.
    pub async fn list_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: object::ObjectKind,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, RepoError> {
        let mut out = Vec::new();
        for o in list_all(self.storage.as_ref(), prefix).await? {
            let body = match self.read_object(kind, &o.key, 64 << 20).await {
                Ok(b) => b,
                Err(RepoError::Storage(e)) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let v = serde_json::from_slice(&body).map_err(|e| RepoError::Corrupt {
                object: o.key.clone(),
                reason: e.to_string(),
            })?;
            out.push((o.key, v));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Read and verify object `name`.
    pub(crate) async fn read_object(
        &self,
        kind: object::ObjectKind,
        name: &str,
        max_len: u64,
    ) -> Result<Vec<u8>, RepoError> {
        let data = self.storage.get(name).await?;
        let keys = self.keys.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            object::open(kind, &name, &data, keys.as_ref(), max_len)
        })
        .await
        .map_err(RepoError::task("decode"))?
    }
}

async fn read_slots(storage: &dyn Storage) -> Result<Vec<KeySlot>, RepoError> {
    let mut slots = Vec::new();
    for obj in list_all(storage, KEYS_PREFIX).await? {
        let data = match storage.get(&obj.key).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => continue, // removed while we listed
            Err(e) => return Err(e.into()),
        };
        slots.push(KeySlot::decode(&obj.key, &data)?);
    }
    Ok(slots)
}
