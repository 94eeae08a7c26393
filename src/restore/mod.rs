//! Restoring a backup into a data directory ([`restore`]): files in parallel,
//! every block verified on read; directories, modes, modification times and
//! tablespace links recreated; recovery configured so the directory starts,
//! fetches the backup's WAL from the repository and becomes consistent with
//! nothing else.
//!
//! Also what recovery needs afterwards: [`fetch`] (`wal-fetch` and its
//! spool), [`pitr`] (point-in-time recovery planning), [`recovery`] (the
//! settings in `postgresql.auto.conf`) and [`rates`] (measured recovery
//! rates for estimates).

use std::collections::{HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod delta;
pub mod fetch;
mod files;
pub mod pg_manifest;
pub mod pitr;
pub mod rates;
pub mod recover;
pub mod recovery;
pub mod server;
pub mod tuning;

pub use fetch::wal_fetch;
pub use recover::{
    plan_recovery, recover, RecoverError, RecoverOptions, RecoveryPlan, RecoveryReport,
};

use files::Target;
pub use files::WriteStats;

use crate::progress::Progress;
use crate::repo::{BackupFile, FileKind, Index, Manifest, RepoError, Repository, StanzaPaths};

impl RestoreError {
    /// Whether another copy of the repository could succeed where this
    /// one failed: the repository was unreachable or its content damaged,
    /// not the target directory.
    pub fn is_repository_fault(&self) -> bool {
        matches!(
            self,
            RestoreError::Repo(_)
                | RestoreError::NoBackups
                | RestoreError::DamagedManifest { .. }
                | RestoreError::MissingBlock { .. }
                | RestoreError::BadBlockLength { .. }
                | RestoreError::WalVanished(_)
        )
    }
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Writing the target failed.
    #[error("writing {path}: {source}{}", io_hint(source))]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The stanza has no backup to restore.
    #[error("the stanza has no backups yet; take one with `walvault backup`")]
    NoBackups,
    /// `--delta` over a directory a server may be running on.
    #[error("{dir} has a postmaster.pid: a server may be running on it; stop it cleanly first (pg_ctl stop -D {dir}), or remove the stale postmaster.pid if it crashed", dir = .0.display())]
    ServerRunning(PathBuf),
    /// A restore into a directory that holds files, without `--delta`.
    #[error("{} is not empty; restore into an empty or new directory, or pass --delta to restore over a stopped server's data directory (only changed blocks are written)", .0.display())]
    NotEmpty(PathBuf),
    /// A tablespace whose destination holds files.
    #[error("tablespace {oid} would go to {}, which is not empty; map it elsewhere with --tablespace-map {location}=DIR", dest.display())]
    TablespaceNotEmpty {
        /// The tablespace's OID.
        oid: u32,
        /// Where it would be restored.
        dest: PathBuf,
        /// Its location on the source server.
        location: String,
    },
    /// A manifest whose content contradicts itself.
    #[error("backup {backup}: {reason}; its manifest is damaged")]
    DamagedManifest {
        /// The backup.
        backup: String,
        /// What does not add up.
        reason: String,
    },
    /// A block a manifest names is missing from the index.
    #[error("{file}: block {id} is not in the repository's index (the repository is damaged: restore another backup)")]
    MissingBlock {
        /// The file (relative to the data directory) the block belongs to.
        file: String,
        /// The block.
        id: crate::codec::BlockId,
    },
    /// A stored block of the wrong length.
    #[error("{}: the block at offset {offset} holds {found} bytes, expected {expected}; the repository is damaged", file.display())]
    BadBlockLength {
        /// The file being written.
        file: PathBuf,
        /// Byte offset of the block in the file.
        offset: u64,
        /// Length stored.
        found: u64,
        /// Length the manifest implies.
        expected: u64,
    },
    /// A WAL file the plan proved present is gone.
    #[error("{0} vanished from the repository after the recovery was planned (did `expire` remove it meanwhile?); plan again")]
    WalVanished(crate::pg::WalFileName),
    /// A background task (writing, syncing, comparing) panicked or was cancelled.
    #[error("{what} task failed: {reason}")]
    Task {
        /// What the task did.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
}

impl RestoreError {
    /// A failed background task.
    pub(crate) fn task(
        what: &'static str,
    ) -> impl Fn(tokio::task::JoinError) -> RestoreError + Copy {
        move |e| RestoreError::Task {
            what,
            reason: e.to_string(),
        }
    }
}

/// What to do about a write error, where there is something to do.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            "; the target file system is full: free space there, or restore elsewhere (--pgdata, --tablespace-map); `walvault info` shows the backup's size"
        }
        std::io::ErrorKind::QuotaExceeded => {
            "; the disk quota of the user running walvault is exhausted: raise it, or restore elsewhere"
        }
        std::io::ErrorKind::ReadOnlyFilesystem => {
            "; the target file system is mounted read-only"
        }
        std::io::ErrorKind::PermissionDenied => {
            "; the target must be writable by the user running walvault"
        }
        _ => "",
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What to restore where.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Backup id; `None` for the newest.
    pub backup: Option<String>,
    /// Where tablespaces go: OID or old location → new location. Unmapped
    /// tablespaces go back to their original location.
    pub tablespace_map: HashMap<String, PathBuf>,
    /// The `restore_command` to write, or `None` to configure no recovery.
    pub restore_command: Option<String>,
    /// Restore over an existing data directory (of a stopped server): files
    /// whose blocks already match are kept, only differing blocks are
    /// written, and files the backup does not have are removed.
    pub delta: bool,
    /// Counts bytes as they are written (or found in place with `delta`).
    pub progress: Option<Arc<Progress>>,
    /// The target may already hold `pg_wal/walvault-spool` (WAL staged by
    /// restore-pitr at the same time).
    pub staged_wal: bool,
    /// Write through the page cache: PostgreSQL starts replaying on the
    /// files right away (restore-pitr, the demo) and reads what it changes
    /// from memory. Otherwise block-aligned bytes are written with
    /// `O_DIRECT` (see `files`).
    pub page_cache: bool,
    /// Make the copy a standby on purpose (`restore --as-standby`): it
    /// catches up from the repository, then streams from the primary.
    pub standby: Option<StandbyOptions>,
    /// Restore only these files' contents (paths as in the manifest); every
    /// other regular file is created at its size as a hole, nothing read
    /// (`extract`'s sparse recovery). `None`: every file.
    pub fetch_only: Option<Arc<HashSet<String>>>,
}

/// How a copy restored as a standby reaches its primary.
#[derive(Debug, Clone, Default)]
pub struct StandbyOptions {
    /// `primary_conninfo` (none: it only replays from the repository, a
    /// warm standby).
    pub primary_conninfo: Option<String>,
    /// `primary_slot_name`.
    pub slot: Option<String>,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The backup restored (its files' block lists emptied: the restore
    /// drops them as it resolves them).
    pub backup: Manifest,
    /// Files written.
    pub files: usize,
    /// Bytes of the restored files.
    pub bytes: u64,
    /// Files created as holes (not in `fetch_only`), and their bytes.
    pub sparse_files: usize,
    /// Bytes of those files.
    pub sparse_bytes: u64,
    /// Bytes written, bytes found in place (`delta`), ranged reads made.
    pub stats: WriteStats,
    /// Files and directories removed because the backup does not have them
    /// (`delta`).
    pub removed: usize,
    /// Replication settings of the backup's source that were commented out
    /// (`primary_conninfo`, `primary_slot_name`: the backup was taken on a
    /// standby).
    pub replication_disabled: Vec<String>,
    /// The `backup_manifest` written was computed from the restored files
    /// (the server sent the backup as changes against an earlier one),
    /// not the server's own.
    pub manifest_computed: bool,
}

/// Choose the backup: `id`, or the newest one.
pub async fn choose_backup(
    repo: &Repository,
    paths: &StanzaPaths,
    id: Option<&str>,
) -> Result<Manifest, RestoreError> {
    let id = match id {
        Some(i) if i != "latest" => i.to_owned(),
        _ => Manifest::list_ids(repo, paths)
            .await?
            .pop()
            .ok_or(RestoreError::NoBackups)?,
    };
    Ok(Manifest::load(repo, paths, &id).await?)
}

/// Whether `dir` is missing or empty. With `staged_wal`, a
/// `pg_wal/walvault-spool` holding nothing else does not count: restore-pitr
/// stages WAL there while the files are restored.
pub(crate) fn is_empty_dir(dir: &Path, staged_wal: bool) -> Result<bool, RestoreError> {
    if !dir.exists() {
        return Ok(true);
    }
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        if staged_wal && e.file_name() == "pg_wal" {
            let wal = e.path();
            let mut inside = std::fs::read_dir(&wal).map_err(io(&wal))?;
            if inside.all(|x| x.is_ok_and(|x| x.file_name() == fetch::SPOOL_DIR)) {
                continue;
            }
        }
        return Ok(false);
    }
    Ok(true)
}

/// Restore into `target`, which must be empty or missing (or, with
/// `delta`, a stopped server's data directory).
pub async fn restore(
    repo: Arc<Repository>,
    stanza: &str,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let paths = StanzaPaths::new(stanza);
    if opts.delta {
        if target.join("postmaster.pid").exists() {
            return Err(RestoreError::ServerRunning(target.to_owned()));
        }
    } else if !is_empty_dir(target, opts.staged_wal)? {
        return Err(RestoreError::NotEmpty(target.to_owned()));
    }
    let mut manifest = choose_backup(&repo, &paths, opts.backup.as_deref()).await?;
    check_block_counts(&manifest)?;
    let (index, _) = Index::load(&repo, &paths).await?;
    let fetch_only = opts.fetch_only.clone();
    let (manifest, index, positions) = tokio::task::spawn_blocking(move || {
        let positions = resolve_blocks(&mut manifest, &index, fetch_only.as_deref());
        (manifest, index, positions)
    })
    .await
    .map_err(RestoreError::task("resolving blocks"))?;
    let positions = positions?;
    std::fs::create_dir_all(target).map_err(io(target))?;
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o700)).map_err(io(target))?;

    // tablespace locations
    let mut ts_dirs: HashMap<u32, PathBuf> = HashMap::new();
    for t in &manifest.tablespaces {
        let dest = opts
            .tablespace_map
            .get(&t.oid.to_string())
            .or_else(|| opts.tablespace_map.get(&t.location))
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&t.location));
        if !opts.delta && !is_empty_dir(&dest, false)? {
            return Err(RestoreError::TablespaceNotEmpty {
                oid: t.oid,
                dest,
                location: t.location.clone(),
            });
        }
        std::fs::create_dir_all(&dest).map_err(io(&dest))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&dest))?;
        ts_dirs.insert(t.oid, dest);
    }
    let resolve = |path: &str| -> PathBuf { restored_path(target, &ts_dirs, path) };

    let mut removed = 0;
    if opts.delta {
        let mut expected: HashMap<PathBuf, delta::Kind> = manifest
            .files
            .iter()
            .map(|f| (resolve(&f.path), delta::Kind::of(&f.kind)))
            .collect();
        for t in &manifest.tablespaces {
            // the link is recreated below, pointing at the restored location
            expected.insert(
                target.join("pg_tblspc").join(t.oid.to_string()),
                delta::Kind::Link,
            );
        }
        let mut roots = vec![target.to_owned()];
        roots.extend(ts_dirs.values().cloned());
        for root in roots {
            removed += delta::remove_extraneous(&root, &expected)?;
        }
    }

    // directories and links first, then files
    for f in &manifest.files {
        let p = resolve(&f.path);
        match &f.kind {
            FileKind::Directory => {
                std::fs::create_dir_all(&p).map_err(io(&p))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode.max(0o700)))
                    .map_err(io(&p))?;
            }
            FileKind::Symlink(old) => {
                let oid = f
                    .path
                    .strip_prefix("pg_tblspc/")
                    .and_then(|o| o.parse::<u32>().ok());
                let to = oid
                    .and_then(|o| ts_dirs.get(&o))
                    .cloned()
                    .unwrap_or_else(|| PathBuf::from(old));
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent).map_err(io(parent))?;
                }
                if std::fs::symlink_metadata(&p).is_ok() {
                    std::fs::remove_file(&p).map_err(io(&p))?;
                }
                std::os::unix::fs::symlink(&to, &p).map_err(io(&p))?;
            }
            FileKind::File => {}
        }
    }
    let targets: Vec<Target<'_>> = manifest
        .files
        .iter()
        .zip(positions)
        .filter(|(f, _)| f.kind == FileKind::File)
        .map(|(f, blocks)| Target {
            path: resolve(&f.path),
            file: f,
            blocks,
            sparse: is_hole(opts.fetch_only.as_deref(), f),
        })
        .collect();
    let sparse_files = targets.iter().filter(|t| t.sparse).count();
    let sparse_bytes = targets
        .iter()
        .filter(|t| t.sparse)
        .map(|t| t.file.size)
        .sum();
    let bytes: u64 = targets.iter().map(|t| t.file.size).sum();
    let progress = opts.progress.clone().unwrap_or_default();
    progress.set_total(bytes);
    let block_size = manifest.block_size as usize;
    let how = files::WriteMode {
        block_size,
        delta: opts.delta,
        direct: !opts.page_cache,
    };
    let stats = files::write_files(&repo, &paths, &index, &targets, how, &progress).await?;
    drop(index);
    // modes and times last: a read-only mode would stop the writes
    let finish: Vec<(PathBuf, u32, i64)> = targets
        .iter()
        .map(|t| (t.path.clone(), t.file.mode, t.file.mtime))
        .collect();
    tokio::task::spawn_blocking(move || -> Result<(), RestoreError> {
        for (path, mode, mtime) in finish {
            let out = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime.max(0) as u64);
            out.set_modified(time).map_err(io(&path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(io(&path))?;
        }
        Ok(())
    })
    .await
    .map_err(RestoreError::task("finishing"))??;

    // The backup carries a tablespace_map naming the *source's* locations,
    // and PostgreSQL recreates pg_tblspc/<oid> from it when it starts: rewrite
    // it with the restored locations, or the restored server would write into
    // the source's tablespaces. Make the links now too.
    if !manifest.tablespaces.is_empty() {
        let mut map = String::new();
        for t in &manifest.tablespaces {
            let dest = &ts_dirs[&t.oid];
            map.push_str(&format!("{} {}\n", t.oid, dest.display()));
            let link = target.join("pg_tblspc").join(t.oid.to_string());
            if std::fs::symlink_metadata(&link).is_err() {
                std::fs::create_dir_all(target.join("pg_tblspc")).map_err(io(target))?;
                std::os::unix::fs::symlink(dest, &link).map_err(io(&link))?;
            }
        }
        let path = target.join("tablespace_map");
        std::fs::write(&path, map).map_err(io(&path))?;
    }

    // PostgreSQL's own manifest of the backup, when it was kept: then
    // pg_verifybackup can check the directory before the server starts
    let server_manifest = target.join("backup_manifest");
    let mut manifest_computed = false;
    match Manifest::load_server_manifest(&repo, &paths, &manifest.id).await? {
        // the server sent this backup as changes: its manifest describes
        // INCREMENTAL files the restored directory does not have
        Some(body) if manifest.incremental_from.is_some() => {
            let (root, ts) = (target.to_owned(), ts_dirs.clone());
            let locate = move |p: &str| restored_path(&root, &ts, p);
            let body = tokio::task::spawn_blocking(move || pg_manifest::synthesize(&body, &locate))
                .await
                .map_err(RestoreError::task("backup_manifest"))?
                .map_err(|reason| RestoreError::DamagedManifest {
                    backup: manifest.id.clone(),
                    reason: format!("its backup_manifest could not be completed: {reason}"),
                })?;
            std::fs::write(&server_manifest, body).map_err(io(&server_manifest))?;
            std::fs::set_permissions(&server_manifest, std::fs::Permissions::from_mode(0o600))
                .map_err(io(&server_manifest))?;
            manifest_computed = true;
        }
        Some(body) => {
            std::fs::write(&server_manifest, body).map_err(io(&server_manifest))?;
            std::fs::set_permissions(&server_manifest, std::fs::Permissions::from_mode(0o600))
                .map_err(io(&server_manifest))?;
        }
        // (a delta restore over a copy of another backup leaves no stale one)
        None => match std::fs::remove_file(&server_manifest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&server_manifest)(e))
            }
            _ => {}
        },
    }

    // a copy of a standby must not become a standby of the live primary
    let replication_disabled = recovery::forget_replication(target)?;
    if let Some(cmd) = &opts.restore_command {
        // a standby: standby.signal, and where its primary is
        let signal = target.join(if opts.standby.is_some() {
            "standby.signal"
        } else {
            "recovery.signal"
        });
        std::fs::write(&signal, "").map_err(io(&signal))?;
        let auto = target.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
        let quote = |s: &str| s.replace('\'', "''");
        conf.push_str(&format!(
            "\n# added by walvault restore of backup {}\nrestore_command = '{}'\n",
            manifest.id,
            quote(cmd)
        ));
        if let Some(sb) = &opts.standby {
            conf.push_str("# a standby seeded from the repository: it replays the archived WAL, then streams\n");
            conf.push_str("recovery_target_timeline = 'latest'\n");
            if let Some(c) = &sb.primary_conninfo {
                conf.push_str(&format!("primary_conninfo = '{}'\n", quote(c)));
            }
            if let Some(slot) = &sb.slot {
                conf.push_str(&format!("primary_slot_name = '{}'\n", quote(slot)));
            }
        }
        std::fs::write(&auto, conf).map_err(io(&auto))?;
    }
    // durable before "restored" is reported: every file written, then
    // every directory (their entries)
    // (the source's signal files are gone unless restore wrote its own)
    let signals = [
        target.join("standby.signal"),
        target.join("recovery.signal"),
    ];
    let mut files: Vec<PathBuf> = targets
        .iter()
        .map(|t| t.path.clone())
        .filter(|p| !signals.contains(p) || p.exists())
        .collect();
    for extra in [
        "backup_manifest",
        "tablespace_map",
        "recovery.signal",
        "standby.signal",
        "postgresql.auto.conf",
    ] {
        let p = target.join(extra);
        if p.exists() && !files.contains(&p) {
            files.push(p);
        }
    }
    sync_all(files).await?;
    let mut dirs: Vec<PathBuf> = manifest
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Directory)
        .map(|f| resolve(&f.path))
        .collect();
    dirs.push(target.to_owned());
    dirs.extend(ts_dirs.values().cloned());
    sync_all(dirs).await?;
    Ok(RestoreReport {
        files: targets.len(),
        backup: manifest,
        bytes,
        sparse_files,
        sparse_bytes,
        stats,
        removed,
        replication_disabled,
        manifest_computed,
    })
}

/// With `fetch_only`, a file not in it is created as a hole.
fn is_hole(fetch_only: Option<&HashSet<String>>, f: &BackupFile) -> bool {
    fetch_only.is_some_and(|only| !only.contains(&f.path))
}

/// Every block of the files to fetch, as its 4-byte position in `index`
/// (one `Vec` per manifest entry), resolved before anything is written: a
/// block the index lacks fails here. The manifest's 32-byte ids are
/// dropped file by file as they are resolved (60 MB for a 15 GB backup).
/// Blocking: millions of lookups.
fn resolve_blocks(
    manifest: &mut Manifest,
    index: &Index,
    fetch_only: Option<&HashSet<String>>,
) -> Result<Vec<Vec<u32>>, RestoreError> {
    let mut positions = Vec::with_capacity(manifest.files.len());
    for f in &mut manifest.files {
        let ids = std::mem::take(&mut f.blocks);
        if f.kind != FileKind::File || is_hole(fetch_only, f) {
            positions.push(Vec::new());
            continue;
        }
        let mut p = Vec::with_capacity(ids.len());
        for id in ids {
            p.push(
                index
                    .position(&id)
                    .ok_or_else(|| RestoreError::MissingBlock {
                        file: f.path.clone(),
                        id,
                    })?,
            );
        }
        positions.push(p);
    }
    Ok(positions)
}

/// Every file of `manifest` lists as many blocks as its size needs.
fn check_block_counts(manifest: &Manifest) -> Result<(), RestoreError> {
    let damaged = |reason: String| RestoreError::DamagedManifest {
        backup: manifest.id.clone(),
        reason,
    };
    let block_size = u64::from(manifest.block_size);
    if block_size == 0 {
        return Err(damaged("block size 0".into()));
    }
    for f in manifest.files.iter().filter(|f| f.kind == FileKind::File) {
        let expect = f.size.div_ceil(block_size);
        if f.blocks.len() as u64 != expect {
            return Err(damaged(format!(
                "it lists {} blocks for {} ({} bytes), expected {expect}",
                f.blocks.len(),
                f.path,
                f.size
            )));
        }
    }
    Ok(())
}

/// Where a path of the backup is restored: under `target`, or in its
/// tablespace's restored directory.
fn restored_path(target: &Path, ts_dirs: &HashMap<u32, PathBuf>, path: &str) -> PathBuf {
    if let Some(rest) = path.strip_prefix("pg_tblspc/") {
        if let Some((oid, inner)) = rest.split_once('/') {
            if let Some(dir) = oid.parse().ok().and_then(|o: u32| ts_dirs.get(&o)) {
                return dir.join(inner);
            }
        }
    }
    target.join(path)
}

/// fsync each of `paths` (files or directories), many at once: the dirty
/// pages of a restore are written back in parallel, and only this
/// restore's — where one `syncfs` would also wait for everything else
/// written to the file system (the source cluster's churn, another
/// restore). PostgreSQL syncs the data directory again when it starts from
/// a backup; after this, that pass finds nothing dirty.
async fn sync_all(paths: Vec<PathBuf>) -> Result<(), RestoreError> {
    futures::stream::iter(paths)
        .map(|p| async move {
            tokio::task::spawn_blocking(move || {
                std::fs::File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(io(&p))
            })
            .await
            .map_err(RestoreError::task("sync"))?
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}
