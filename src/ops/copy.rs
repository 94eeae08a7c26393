//! `walvault copy`: backups and the WAL they need, from one repository to
//! another (3-2-1). Blocks are content-addressed: a block the target
//! already holds is not uploaded again. When both repositories name blocks
//! the same way (unencrypted, or the same key) a block the target has is
//! not even read; otherwise every block of a backup the target lacks is
//! read, decrypted, and re-encrypted under the target's key.
//!
//! Order makes a copy safe to interrupt and resumable: WAL first, then each
//! backup's blocks (packs and index objects, as a backup writes them), then
//! its manifest, the commit point. A second run finds the manifests and the
//! WAL there and moves nothing; an interrupted one finds the blocks it
//! uploaded in the target's index and uploads only the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::records::{self, ExpireRecord, KeptAs};
use super::retention::Role;
use super::OpsError;
use crate::codec::BlockId;
use crate::pg::{Lsn, WalFileName, WalSegSize};
use crate::repo::{
    Index, Manifest, PackEntry, PackId, RepoError, Repository, Session, SessionOptions, StanzaPaths,
};

/// Which backups to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Selection {
    /// Every backup.
    All,
    /// The newest backup.
    Last,
    /// The restore points the source's last `expire` kept by an hourly,
    /// daily, weekly, monthly or yearly rule, and the newest backup.
    Gfs,
}

/// How to copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Which backups.
    pub backups: Selection,
    /// Also all WAL after the backups (point-in-time recovery from the
    /// copy: from the oldest backup copied on, from the newest for `gfs`);
    /// without it, only each backup's own WAL.
    pub wal: bool,
    /// Objects read and written at once.
    pub parallel: usize,
}

/// What a copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CopyReport {
    /// The source.
    pub from: String,
    /// The target.
    pub to: String,
    /// Backups copied now.
    pub backups_copied: Vec<String>,
    /// Selected backups the target already had.
    pub backups_present: Vec<String>,
    /// Blocks read from the source.
    pub blocks_read: u64,
    /// Blocks the target did not have.
    pub blocks_new: u64,
    /// WAL files copied.
    pub wal_files: u64,
    /// Bytes written to the target: packs, WAL objects, manifests.
    pub bytes_moved: u64,
    /// Blocks were re-encrypted under the target's key (the repositories
    /// name blocks differently).
    pub reencrypted: bool,
    /// Seconds.
    pub seconds: f64,
}

/// Blocks read from the source per batch.
const BATCH_BLOCKS: usize = 2048;

/// Blobs of one pack farther apart than this are read with two requests.
const RUN_GAP: u64 = 1 << 20;

/// Copy `stanza` from `src` to `dst`.
pub async fn copy(
    src: Arc<Repository>,
    dst: Arc<Repository>,
    stanza: &str,
    opts: &CopyOptions,
) -> Result<CopyReport, OpsError> {
    let started = Instant::now();
    let paths = StanzaPaths::new(stanza);
    let mut report = CopyReport {
        from: src.storage().location(),
        to: dst.storage().location(),
        ..Default::default()
    };
    if src.config().repo_id == dst.config().repo_id {
        return Err(OpsError::Copy(format!(
            "{} and {} are the same repository (id {}): copy to another one",
            report.from,
            report.to,
            src.config().repo_id
        )));
    }
    if src.config().block_size != dst.config().block_size {
        return Err(OpsError::Copy(format!(
            "the target's block size ({} bytes) differs from the source's ({}): initialize the target with --block-size {}",
            dst.config().block_size,
            src.config().block_size,
            src.config().block_size
        )));
    }
    let backups = Manifest::load_all(&src, &paths).await?;
    let selected = select(&src, &paths, &backups, opts.backups).await?;
    let Some(newest) = selected.last() else {
        return Err(OpsError::Copy(format!(
            "stanza {stanza} of {} has no backup to copy",
            report.from
        )));
    };
    // the target's stanza, if it holds anything, is the same cluster
    let theirs = Manifest::load_all(&dst, &paths).await?;
    if let Some(other) = theirs.iter().find(|m| m.system_id != newest.system_id) {
        return Err(OpsError::Copy(format!(
            "stanza {stanza} of {} holds backups of another cluster (system {}, backup {}; this one is system {}): copy into another stanza or repository",
            report.to, other.system_id, other.id, newest.system_id
        )));
    }
    let probe = [0x5au8; 64];
    let same_ids = src.hasher().id(&probe) == dst.hasher().id(&probe);
    report.reencrypted = !same_ids;

    // WAL first: a backup committed in the target must find its WAL there
    let seg = newest.wal_segment_size;
    let mut ranges: Vec<(u64, u64)> = selected
        .iter()
        .map(|m| (segno(m.start_lsn, seg), segno(m.stop_lsn, seg)))
        .collect();
    // with WAL: point-in-time recovery from every copied backup on, except
    // that GFS points (years apart) bring only their own WAL
    let from = match opts.backups {
        Selection::Gfs => newest,
        Selection::All | Selection::Last => &selected[0],
    };
    if opts.wal {
        ranges.push((segno(from.start_lsn, seg), u64::MAX));
    }
    copy_wal(&src, &dst, &paths, seg, &ranges, opts.parallel, &mut report).await?;

    // the target's backups, as listed before the WAL was copied
    let mut present: BTreeSet<String> = theirs.iter().map(|m| m.id.clone()).collect();
    let mut index: Option<Index> = None;
    for m in &selected {
        if present.contains(&m.id) {
            report.backups_present.push(m.id.clone());
            continue;
        }
        let index = match &mut index {
            Some(i) => &*i,
            None => &*index.insert(Index::load(&src, &paths).await?.0),
        };
        copy_backup(&src, &dst, stanza, m, index, same_ids, opts, &mut report).await?;
        report.backups_copied.push(m.id.clone());
        present.insert(m.id.clone());
    }
    let points_only = !opts.wal || opts.backups == Selection::Gfs;
    if points_only && !report.backups_copied.is_empty() {
        // backups copied without the WAL after them are restore points in
        // the copy: recorded as such, so its verify and wal-verify do not
        // count the WAL between them as missing
        // merged with what earlier copies recorded, for backups still there
        let mut kept: BTreeMap<String, KeptAs> =
            records::newest::<ExpireRecord>(&dst, &paths, records::EXPIRE)
                .await?
                .map(|r| r.kept)
                .unwrap_or_default();
        kept.retain(|id, _| present.contains(id));
        // only this run's newest has all WAL after it for sure
        for k in kept.values_mut() {
            k.role = Role::Point;
        }
        kept.extend(selected.iter().map(|m| {
            let base = opts.wal && m.id == newest.id;
            (
                m.id.clone(),
                KeptAs {
                    role: if base {
                        Role::RecoveryBase
                    } else {
                        Role::Point
                    },
                    rules: vec![if base {
                        "copy, with WAL"
                    } else {
                        "copy, own WAL"
                    }
                    .into()],
                },
            )
        }));
        let rec = ExpireRecord {
            time: chrono::Utc::now(),
            kept,
            expired: Vec::new(),
        };
        records::store(&dst, &paths, records::EXPIRE, &rec).await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The segment number of `lsn`.
fn segno(lsn: Lsn, seg: WalSegSize) -> u64 {
    lsn.get() / seg.bytes()
}

/// The backups `sel` picks, oldest first.
async fn select(
    src: &Repository,
    paths: &StanzaPaths,
    backups: &[Manifest],
    sel: Selection,
) -> Result<Vec<Manifest>, OpsError> {
    Ok(match sel {
        Selection::All => backups.to_vec(),
        Selection::Last => backups.last().cloned().into_iter().collect(),
        Selection::Gfs => {
            let Some(e) = records::newest::<ExpireRecord>(src, paths, records::EXPIRE).await?
            else {
                return Err(OpsError::Copy(
                    "--backups gfs copies the restore points the last expire kept by an hourly, daily, weekly, monthly or yearly rule, and no expire has run: run walvault expire with --keep-daily (or the others) first".into(),
                ));
            };
            let gfs: BTreeSet<&String> = e
                .kept
                .iter()
                .filter(|(_, k)| {
                    k.rules.iter().any(|r| {
                        ["hourly", "daily", "weekly", "monthly", "yearly"]
                            .iter()
                            .any(|g| r.starts_with(g))
                    })
                })
                .map(|(id, _)| id)
                .collect();
            let newest = backups.last().map(|m| m.id.clone());
            backups
                .iter()
                .filter(|m| gfs.contains(&m.id) || Some(&m.id) == newest.as_ref())
                .cloned()
                .collect()
        }
    })
}

/// Copy the WAL files whose segments fall in `ranges` (history files
/// always) that the target lacks, or holds an older `.partial` of.
async fn copy_wal(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    paths: &StanzaPaths,
    seg: WalSegSize,
    ranges: &[(u64, u64)],
    parallel: usize,
    report: &mut CopyReport,
) -> Result<(), OpsError> {
    let wanted = |n: &WalFileName| match n.segment_file() {
        Some(f) => ranges.iter().any(|(a, b)| (*a..=*b).contains(&f.segno.0)),
        None => true,
    };
    let mut todo = Vec::new();
    for tli in src.wal_timelines(paths).await? {
        let have: BTreeMap<String, u64> = dst
            .list_wal_sized(paths, tli, seg)
            .await?
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        for (name, _) in src.list_wal_sized(paths, tli, seg).await? {
            if !wanted(&name) {
                continue;
            }
            let missing = match (have.contains_key(&name.to_string()), name) {
                (false, _) => true,
                // a .partial grows: copied again when its content differs
                (true, WalFileName::Partial(_)) => {
                    src.load_wal(paths, &name).await? != dst.load_wal(paths, &name).await?
                }
                (true, _) => false,
            };
            if missing {
                todo.push(name);
            }
        }
    }
    let moved: Vec<u64> = futures::stream::iter(todo.into_iter().map(|name| {
        let (src, dst, paths) = (src.clone(), dst.clone(), paths.clone());
        async move {
            let Some(data) = src.load_wal(&paths, &name).await? else {
                // removed by the source's expire meanwhile
                return Ok::<u64, OpsError>(0);
            };
            let (key, sealed) = dst.seal_wal(&paths, &name, data.clone()).await?;
            let size = sealed.len() as u64;
            dst.storage()
                .put(&key, sealed)
                .await
                .map_err(RepoError::from)?;
            if name.segment_file().is_some() {
                crate::archive::summaries::store_summary(&dst, &paths, &name, &data).await;
            }
            Ok(size)
        }
    }))
    .buffer_unordered(parallel.max(1))
    .try_collect()
    .await?;
    report.wal_files += moved.iter().filter(|b| **b > 0).count() as u64;
    report.bytes_moved += moved.iter().sum::<u64>();
    Ok(())
}

/// Copy one backup's blocks, then commit its manifest under the session's
/// lease.
#[allow(clippy::too_many_arguments)]
async fn copy_backup(
    src: &Arc<Repository>,
    dst: &Arc<Repository>,
    stanza: &str,
    m: &Manifest,
    index: &Index,
    same_ids: bool,
    opts: &CopyOptions,
    report: &mut CopyReport,
) -> Result<(), OpsError> {
    let paths = StanzaPaths::new(stanza);
    let session = Session::start(
        dst.clone(),
        stanza,
        SessionOptions {
            purpose: "copy".into(),
            ..Default::default()
        },
    )
    .await?;
    // batches of block positions across files; a block the target has
    // (with the same ids) is not read, the others are read, stored (the
    // session skips what the target has) and renamed in the copy
    let mut copied = m.clone();
    // the target's manifest version: its ids may be of another width
    copied.version = dst.manifest_version();
    let positions: Vec<(usize, usize)> = copied
        .files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| (0..f.blocks.len()).map(move |j| (i, j)))
        .collect();
    for batch in positions.chunks(BATCH_BLOCKS) {
        let mut need: Vec<BlockId> = Vec::new();
        let mut seen: HashSet<BlockId> = HashSet::new();
        for &(i, j) in batch {
            let id = copied.files[i].blocks[j];
            if !(same_ids && session.known_index().contains(&id)) && seen.insert(id) {
                need.push(id);
            }
        }
        if need.is_empty() {
            continue;
        }
        let blocks = read_batch(src, &paths, index, &need, opts.parallel, &m.id).await?;
        report.blocks_read += blocks.len() as u64;
        let data: Vec<bytes::Bytes> = blocks.iter().map(|(_, b)| b.clone()).collect();
        let new_ids = tokio::task::block_in_place(|| session.put_blocks(&data))?;
        let renamed: HashMap<BlockId, BlockId> =
            blocks.iter().map(|(old, _)| *old).zip(new_ids).collect();
        for &(i, j) in batch {
            let id = &mut copied.files[i].blocks[j];
            if let Some(new) = renamed.get(id) {
                *id = *new;
            }
        }
    }
    let (stats, lease) = session.finish_keep_lease().await;
    let stats = match stats {
        Ok(s) => s,
        Err(e) => {
            lease.release().await;
            return Err(e.into());
        }
    };
    report.blocks_new += stats.new_blocks;
    report.bytes_moved += stats.stored_bytes;
    if !lease.valid() {
        lease.release().await;
        return Err(OpsError::Copy(format!(
            "the copy of backup {} outlived its lease on the target (a garbage collection may have run): run the copy again",
            m.id
        )));
    }
    // PostgreSQL's manifest of it goes along (re-sealed for the target)
    let server_manifest = async {
        if let Some(body) = Manifest::load_server_manifest(src, &paths, &m.id).await? {
            report.bytes_moved += body.len() as u64;
            Manifest::store_server_manifest(dst, &paths, &m.id, &body).await?;
        }
        Ok::<_, crate::repo::RepoError>(())
    }
    .await;
    if let Err(e) = server_manifest {
        lease.release().await;
        return Err(e.into());
    }
    let committed = copied.store(dst, &paths).await;
    lease.release().await;
    report.bytes_moved += committed?;
    Ok(())
}

/// Read `ids` from the source: grouped by pack, neighbouring blobs with one
/// ranged request; in no particular order.
async fn read_batch(
    src: &Arc<Repository>,
    paths: &StanzaPaths,
    index: &Index,
    ids: &[BlockId],
    parallel: usize,
    backup: &str,
) -> Result<Vec<(BlockId, bytes::Bytes)>, OpsError> {
    let mut by_pack: BTreeMap<PackId, Vec<PackEntry>> = BTreeMap::new();
    for id in ids {
        let loc = index.get(id).ok_or_else(|| {
            OpsError::Copy(format!(
                "block {id} of backup {backup} is not in the source's index: walvault verify names the damage; the backup cannot be copied as it is"
            ))
        })?;
        by_pack.entry(loc.pack).or_default().push(loc.entry);
    }
    let mut runs: Vec<(PackId, Vec<PackEntry>)> = Vec::new();
    for (pack, mut entries) in by_pack {
        // the blocks of one group share its offset
        entries.sort_by_key(|e| (e.offset, e.id.0));
        entries.dedup_by_key(|e| e.id);
        let mut run: Vec<PackEntry> = Vec::new();
        for e in entries {
            if let Some(last) = run.last() {
                let end = u64::from(last.offset) + u64::from(last.len);
                if u64::from(e.offset) > end + RUN_GAP {
                    runs.push((pack, std::mem::take(&mut run)));
                }
            }
            run.push(e);
        }
        if !run.is_empty() {
            runs.push((pack, run));
        }
    }
    let read: Vec<Vec<(BlockId, bytes::Bytes)>> =
        futures::stream::iter(runs.into_iter().map(|(pack, entries)| {
            let (src, paths) = (src.clone(), paths.clone());
            async move {
                let ids: Vec<BlockId> = entries.iter().map(|e| e.id).collect();
                let blocks = src.read_run(&paths, &pack, entries).await?;
                Ok::<_, OpsError>(
                    ids.into_iter()
                        .zip(blocks.into_iter().map(bytes::Bytes::from))
                        .collect(),
                )
            }
        }))
        .buffer_unordered(parallel.max(1))
        .try_collect()
        .await?;
    Ok(read.into_iter().flatten().collect())
}
