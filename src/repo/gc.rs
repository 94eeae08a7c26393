//! Leases and garbage collection of unreferenced packs, with delayed delete.
//!
//! Safety argument (the rustic/kopia model, adapted to stores without
//! conditional writes):
//! 1. A writer takes a lease `<stanza>/locks/<id>` (start time, expiry) before
//!    it loads the index, refreshes it while it runs, and checks it is still
//!    valid right before committing a manifest.
//! 2. A collection run computes the unreferenced packs U (no block any live
//!    manifest needs is located in them) and *marks* them in
//!    `<stanza>/catalog/gc-state` with the time of marking M. It deletes nothing
//!    it has not marked in an earlier run.
//! 3. Writers that start after a mark exclude marked packs from their dedup
//!    index, so they can never come to need a marked pack.
//! 4. A marked pack is deleted only when (a) it is still unreferenced, (b) it
//!    was marked at least `grace` ago, and (c) no unexpired lease started
//!    before its mark — a writer that loaded the index before the mark may
//!    have deduplicated against it and not committed yet. A writer whose lease
//!    expired (crashed, or cut off from storage longer than the lease TTL)
//!    refuses to commit, so ignoring it is safe.
//! 5. A marked pack that becomes referenced again (a writer covered by (c)
//!    committed) is unmarked.
//! 6. Deleting: a new index object without the doomed packs is written first,
//!    then the index objects it replaces, then the packs. A reader racing this
//!    sees either the old or the new index objects, and only ever needs blocks
//!    in live packs.
//!
//! Clocks: writers and collectors compare wall-clock times; `grace` (default
//! one hour) must exceed the clock skew between hosts by a wide margin.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::index::{Index, PackList};
use super::manifest::Manifest;
use super::object::ObjectKind;
use super::pack::PackId;
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::{to_hex, BlockId};
use crate::storage::list_all;

/// Default lease lifetime; refreshed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(15 * 60);
/// The purpose of the lease a running daemon holds on its stanza
/// (`crate::daemon::claim`): it writes nothing under it, so collection
/// does not wait for it.
pub const DAEMON_PURPOSE: &str = "daemon";
const GC_STATE: &str = "gc-state";
const STATE_VERSION: u32 = 1;

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A lease as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Version of this structure.
    pub version: u32,
    /// What holds it ("backup", ...).
    pub purpose: String,
    /// Host name and process id of the holder.
    pub holder: String,
    /// Unix seconds when it was taken.
    pub started: i64,
    /// Unix seconds when it lapses unless refreshed.
    pub expires: i64,
}

/// A lease held by this process; refreshed in the background until released.
///
/// Each write of the lease is a new object, `locks/<id>.<n>` (the previous
/// one is then deleted), never a rewrite in place; releasing deletes it, or
/// where a write-once repository refuses that, writes `locks/<id>.released`.
#[derive(Debug)]
pub struct Lease {
    name: Arc<std::sync::Mutex<String>>,
    repo: Arc<Repository>,
    started: i64,
    expires: Arc<AtomicI64>,
    refresher: tokio::task::JoinHandle<()>,
}

/// Who this process is in a lease: `<host name>:<process id>`.
pub fn this_holder() -> String {
    format!(
        "{}:{}",
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    )
}

impl Lease {
    /// Write a lease and start refreshing it.
    pub async fn acquire(
        repo: Arc<Repository>,
        paths: &StanzaPaths,
        purpose: &str,
    ) -> Result<Lease, RepoError> {
        Lease::acquire_as(repo, paths, purpose, this_holder()).await
    }

    /// [`Lease::acquire`] in the name of `holder` (tests stand in for
    /// other hosts with it).
    pub(crate) async fn acquire_as(
        repo: Arc<Repository>,
        paths: &StanzaPaths,
        purpose: &str,
        holder: String,
    ) -> Result<Lease, RepoError> {
        let base = format!("{}{}", paths.locks(), to_hex(&rand::random::<[u8; 8]>()));
        let name = format!("{base}.1");
        let started = now_secs();
        let mut rec = LeaseRecord {
            version: 1,
            purpose: purpose.to_owned(),
            holder,
            started,
            expires: started + LEASE_TTL.as_secs() as i64,
        };
        write_lease(&repo, &name, &rec).await?;
        let expires = Arc::new(AtomicI64::new(rec.expires));
        let name = Arc::new(std::sync::Mutex::new(name));
        let refresher = {
            let (repo, name, expires) = (repo.clone(), name.clone(), expires.clone());
            tokio::spawn(async move {
                let mut n = 1u64;
                loop {
                    tokio::time::sleep(LEASE_TTL / 3).await;
                    rec.expires = now_secs() + LEASE_TTL.as_secs() as i64;
                    let next = format!("{base}.{}", n + 1);
                    match write_lease(&repo, &next, &rec).await {
                        Ok(()) => {
                            expires.store(rec.expires, Ordering::Relaxed);
                            n += 1;
                            let old = std::mem::replace(
                                &mut *name.lock().unwrap_or_else(|e| e.into_inner()),
                                next,
                            );
                            if let Err(e) = repo.storage().delete(&old).await {
                                tracing::debug!("{old} stays until it lapses: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("cannot refresh lease {next}: {e}"),
                    }
                }
            })
        };
        Ok(Lease {
            name,
            repo,
            started,
            expires,
            refresher,
        })
    }

    /// Unix seconds when it was taken.
    pub fn started(&self) -> i64 {
        self.started
    }

    /// True until the lease's last successfully written expiry has passed.
    pub fn valid(&self) -> bool {
        now_secs() < self.expires.load(Ordering::Relaxed)
    }

    /// Stop refreshing and delete the lease (in a write-once repository
    /// that keeps it: mark it released).
    pub async fn release(&self) {
        self.refresher.abort();
        let name = self.name.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match self.repo.storage().delete(&name).await {
            Ok(()) => {}
            Err(crate::storage::StorageError::Locked { .. }) => {
                let marker = match name.rsplit_once('.') {
                    Some((base, _)) => format!("{base}.released"),
                    None => format!("{name}.released"),
                };
                if let Err(e) = self.repo.storage().put(&marker, bytes::Bytes::new()).await {
                    tracing::warn!("cannot mark lease {name} released: {e} (it lapses by itself)");
                }
            }
            Err(e) => tracing::warn!("cannot remove lease {name}: {e} (it lapses by itself)"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

async fn write_lease(repo: &Repository, name: &str, rec: &LeaseRecord) -> Result<(), RepoError> {
    let body = serde_json::to_vec(rec).map_err(RepoError::encode("a lease"))?;
    repo.storage()
        .put(name, repo.seal(ObjectKind::Lease, name, &body))
        .await?;
    Ok(())
}

/// Unexpired leases of a stanza.
pub async fn live_leases(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<Vec<LeaseRecord>, RepoError> {
    let now = now_secs();
    let mut out = Vec::new();
    let objects = list_all(repo.storage().as_ref(), &paths.locks()).await?;
    let released: HashSet<&str> = objects
        .iter()
        .filter_map(|o| o.key.strip_suffix(".released"))
        .collect();
    for o in &objects {
        let base = o.key.rsplit_once('.').map_or(o.key.as_str(), |(b, _)| b);
        if o.key.ends_with(".released") || released.contains(base) || is_probe(&o.key, paths) {
            continue;
        }
        let body = match repo.read_object(ObjectKind::Lease, &o.key, 1 << 20).await {
            Ok(b) => b,
            Err(RepoError::Storage(e)) if e.is_not_found() => continue,
            // storage-check probes and other non-lease objects
            Err(RepoError::Corrupt { .. }) => continue,
            Err(e) => return Err(e),
        };
        let rec: LeaseRecord = serde_json::from_slice(&body).map_err(|e| RepoError::Corrupt {
            object: o.key.clone(),
            reason: e.to_string(),
        })?;
        if rec.expires > now {
            out.push(rec);
        }
    }
    Ok(out)
}

/// `check`'s and `storage-check`'s probe objects under `locks/`.
fn is_probe(key: &str, paths: &StanzaPaths) -> bool {
    key.strip_prefix(&paths.locks())
        .is_some_and(|n| n.starts_with("check-") || n.starts_with("storage-check-"))
}

/// Delete what is left in `locks/` of writers that are gone: leases expired
/// for longer than a lease lives, released ones and their markers, probes.
/// A write-once repository keeps what is still locked (a later run takes
/// it). Returns the objects deleted.
pub async fn sweep_leases(repo: &Repository, paths: &StanzaPaths) -> Result<usize, RepoError> {
    let objects = list_all(repo.storage().as_ref(), &paths.locks()).await?;
    let released: HashSet<String> = objects
        .iter()
        .filter_map(|o| o.key.strip_suffix(".released").map(str::to_owned))
        .collect();
    let stale_before = now_secs() - LEASE_TTL.as_secs() as i64;
    let mut gone = 0;
    for o in &objects {
        let base = o.key.rsplit_once('.').map_or(o.key.as_str(), |(b, _)| b);
        let stale = o.key.ends_with(".released")
            || released.contains(base)
            || is_probe(&o.key, paths)
            || match repo.read_object(ObjectKind::Lease, &o.key, 1 << 20).await {
                Ok(body) => serde_json::from_slice::<LeaseRecord>(&body)
                    .map(|r| r.expires < stale_before)
                    .unwrap_or(false),
                Err(_) => false,
            };
        if !stale {
            continue;
        }
        match repo.storage().delete(&o.key).await {
            Ok(()) => gone += 1,
            Err(crate::storage::StorageError::Locked { .. }) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(gone)
}

/// Packs marked for deletion, with the time of marking.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcState {
    /// Version of this structure.
    pub version: u32,
    /// Pack id (hex) → unix seconds when it was marked.
    pub pending: BTreeMap<String, i64>,
}

impl GcState {
    /// Where versions before the series kept the single state object.
    fn legacy_name(paths: &StanzaPaths) -> String {
        format!("{}{GC_STATE}", paths.catalog())
    }

    /// The series of state versions (`catalog/gc/<time>-<random>`).
    fn dir(paths: &StanzaPaths) -> String {
        format!("{}gc/", paths.catalog())
    }

    /// The stanza's state (empty when none was written yet).
    pub async fn load(repo: &Repository, paths: &StanzaPaths) -> Result<GcState, RepoError> {
        match repo
            .get_series(
                ObjectKind::GcState,
                &GcState::dir(paths),
                &GcState::legacy_name(paths),
                1 << 30,
            )
            .await
        {
            Ok(Some((name, body))) => {
                let st: GcState =
                    serde_json::from_slice(&body).map_err(|e| RepoError::Corrupt {
                        object: name.clone(),
                        reason: e.to_string(),
                    })?;
                if st.version > STATE_VERSION {
                    return Err(RepoError::UnsupportedVersion {
                        object: name,
                        found: st.version,
                        supported: STATE_VERSION,
                    });
                }
                Ok(st)
            }
            Ok(None) => Ok(GcState {
                version: STATE_VERSION,
                pending: BTreeMap::new(),
            }),
            Err(e) => Err(e),
        }
    }

    async fn store(&self, repo: &Repository, paths: &StanzaPaths) -> Result<(), RepoError> {
        let body = serde_json::to_vec(self).map_err(RepoError::encode("the GC state"))?;
        repo.put_series(ObjectKind::GcState, &GcState::dir(paths), &body)
            .await?;
        // the single object older versions rewrote in place goes once a
        // version of the series exists
        let legacy = GcState::legacy_name(paths);
        if repo.storage().head(&legacy).await?.is_some() {
            if let Err(e) = repo.storage().delete(&legacy).await {
                tracing::debug!("{legacy} stays for now: {e}");
            }
        }
        Ok(())
    }

    /// The pending packs as ids.
    pub fn pending_packs(&self) -> HashSet<PackId> {
        self.pending
            .keys()
            .filter_map(|k| PackId::parse(k))
            .collect()
    }
}

/// Which packs live manifests need.
#[derive(Debug, Clone, Default)]
pub struct GcPlan {
    /// Packs holding at least one block a manifest needs.
    pub live: BTreeSet<PackId>,
    /// Packs no manifest needs (the collector adds packs no index names).
    pub unreferenced: BTreeSet<PackId>,
    /// Blocks a manifest needs that the index does not know: damage.
    pub missing: Vec<BlockId>,
}

/// Compute live and unreferenced packs: those the blocks of `manifests`
/// and the chunks of file snapshots (`file_chunks`) are in.
pub fn plan(index: &Index, manifests: &[Manifest], file_chunks: &HashSet<BlockId>) -> GcPlan {
    let mut live = BTreeSet::new();
    let mut missing = Vec::new();
    let mut seen: HashSet<BlockId> = HashSet::new();
    let blocks = manifests
        .iter()
        .flat_map(|m| m.files.iter().flat_map(|f| f.blocks.iter()));
    for id in blocks.chain(file_chunks.iter()) {
        if !seen.insert(*id) {
            continue;
        }
        match index.get(id) {
            Some(loc) => {
                live.insert(loc.pack);
            }
            None => missing.push(*id),
        }
    }
    let unreferenced = index
        .packs()
        .iter()
        .filter(|p| !live.contains(p))
        .copied()
        .collect();
    GcPlan {
        live,
        unreferenced,
        missing,
    }
}

/// What a collection run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Packs marked in this run.
    pub marked: usize,
    /// Their bytes (freed by a later run, once the grace period has passed).
    pub marked_bytes: u64,
    /// Marks removed because the pack is needed again.
    pub unmarked: usize,
    /// Packs deleted.
    pub deleted: usize,
    /// Their bytes.
    pub deleted_bytes: u64,
    /// Marked packs kept because their grace period has not passed or a
    /// writer older than the mark still runs.
    pub waiting: usize,
    /// Packs due for deletion that a write-once repository still locks
    /// (the pack, or an index object naming it): deleted by a later run.
    pub locked: usize,
    /// When the last of those locks ends.
    pub locked_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// The deleting half of [`collect`] in a write-once repository: index
/// objects are not compacted (new ones are always younger than the lock);
/// only those naming doomed packs are replaced, and a doomed pack waits
/// while it, or an index object naming it, is locked.
async fn collect_locked(
    repo: &Repository,
    paths: &StanzaPaths,
    mut state: GcState,
    index_objects: Vec<String>,
    mut report: GcReport,
    doomed: Vec<PackId>,
) -> Result<GcReport, RepoError> {
    let storage = repo.storage();
    let mut doomed: HashSet<PackId> = doomed.into_iter().collect();
    let wait = |report: &mut GcReport, until: chrono::DateTime<chrono::Utc>| {
        report.locked += 1;
        report.locked_until = report.locked_until.max(Some(until));
    };
    for id in doomed.clone() {
        if let Some(until) = storage.locked_until(&paths.pack(&id)).await? {
            doomed.remove(&id);
            wait(&mut report, until);
        }
    }
    // the index objects naming doomed packs, and what else they name
    let mut affected: Vec<(String, PackList)> = Vec::new();
    for name in &index_objects {
        let body = match repo
            .read_object(ObjectKind::Index, name, super::index::MAX_INDEX_BODY)
            .await
        {
            Ok(b) => b,
            Err(RepoError::Storage(e)) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        let packs = Index::decode_object(&body, repo.entry_format(), name)?;
        if !packs.iter().any(|(id, _)| doomed.contains(id)) {
            continue;
        }
        if let Some(until) = storage.locked_until(name).await? {
            for (id, _) in &packs {
                if doomed.remove(id) {
                    wait(&mut report, until);
                }
            }
            continue;
        }
        affected.push((name.clone(), packs));
    }
    if doomed.is_empty() {
        report.deleted_bytes = 0;
        return Ok(report);
    }
    let keep: PackList = affected
        .iter()
        .flat_map(|(_, packs)| packs.iter())
        .filter(|(id, _)| !doomed.contains(id))
        .cloned()
        .collect();
    if !keep.is_empty() {
        Index::store_object(repo, paths, &keep).await?;
    }
    for (name, _) in &affected {
        storage.delete(name).await?;
    }
    let mut sizes = 0u64;
    for id in &doomed {
        let key = paths.pack(id);
        sizes += storage.head(&key).await?.map_or(0, |m| m.size);
        storage.delete(&key).await?;
        state.pending.remove(&id.to_string());
        report.deleted += 1;
    }
    report.deleted_bytes = sizes;
    state.store(repo, paths).await?;
    Ok(report)
}

/// What a collection would find, computed without changing anything.
struct Assessment {
    state: GcState,
    index: Index,
    index_objects: Vec<String>,
    report: GcReport,
    doomed: Vec<PackId>,
}

/// Which packs `manifests` leave unreferenced, which of those a run marks
/// and which it may delete now (see the module docs).
async fn assess(
    repo: &Repository,
    paths: &StanzaPaths,
    manifests: &[Manifest],
    file_chunks: &HashSet<BlockId>,
    grace: Duration,
    now: i64,
) -> Result<Assessment, RepoError> {
    let mut state = GcState::load(repo, paths).await?;
    let leases = live_leases(repo, paths).await?;
    let (index, index_objects) = Index::load(repo, paths).await?;
    let mut p = plan(&index, manifests, file_chunks);
    // packs no index object names: left by a crashed writer, or still being
    // written by a live one (whose lease protects them below)
    let mut sizes: HashMap<PackId, u64> = HashMap::new();
    for o in list_all(repo.storage().as_ref(), &paths.packs()).await? {
        if let Some(id) = o.key.rsplit('/').next().and_then(PackId::parse) {
            sizes.insert(id, o.size);
            if !p.live.contains(&id) {
                p.unreferenced.insert(id);
            }
        }
    }
    if !p.missing.is_empty() {
        return Err(RepoError::DamagedForGc {
            count: p.missing.len(),
            first: p.missing[0],
        });
    }
    let mut report = GcReport::default();
    let before = state.pending.len();
    state
        .pending
        .retain(|k, _| PackId::parse(k).is_some_and(|id| p.unreferenced.contains(&id)));
    report.unmarked = before - state.pending.len();
    let mut doomed = Vec::new();
    for id in &p.unreferenced {
        let key = id.to_string();
        let size = sizes.get(id).copied().unwrap_or(0);
        match state.pending.get(&key) {
            None => {
                state.pending.insert(key, now);
                report.marked += 1;
                report.marked_bytes += size;
            }
            Some(&marked) => {
                let old_enough = now - marked >= grace.as_secs() as i64;
                // (a daemon's lease says one runs, not that it wrote)
                let no_older_writer = leases
                    .iter()
                    .filter(|l| l.purpose != DAEMON_PURPOSE)
                    .all(|l| l.started > marked);
                if old_enough && no_older_writer {
                    doomed.push(*id);
                    report.deleted_bytes += size;
                } else {
                    report.waiting += 1;
                }
            }
        }
    }
    Ok(Assessment {
        state,
        index,
        index_objects,
        report,
        doomed,
    })
}

/// What a collection run would do if the stanza's backups were `manifests`
/// and its file snapshots named `file_chunks`: nothing is written.
/// `deleted` and `deleted_bytes` are what it would delete now, `marked`
/// what it would mark for a later run.
pub async fn preview(
    repo: &Repository,
    paths: &StanzaPaths,
    manifests: &[Manifest],
    file_chunks: &HashSet<BlockId>,
    grace: Duration,
) -> Result<GcReport, RepoError> {
    let a = assess(repo, paths, manifests, file_chunks, grace, now_secs()).await?;
    Ok(GcReport {
        deleted: a.doomed.len(),
        ..a.report
    })
}

/// One garbage-collection run on a stanza (see the module docs).
pub async fn collect(
    repo: &Repository,
    paths: &StanzaPaths,
    grace: Duration,
) -> Result<GcReport, RepoError> {
    let manifests = Manifest::load_all(repo, paths).await?;
    let file_chunks = super::files::live_chunks(repo, paths, &HashSet::new()).await?;
    let Assessment {
        mut state,
        index,
        index_objects,
        mut report,
        doomed,
    } = assess(repo, paths, &manifests, &file_chunks, grace, now_secs()).await?;
    // marks are durable before anything is deleted
    state.store(repo, paths).await?;
    if doomed.is_empty() {
        return Ok(report);
    }
    if repo.storage().lock_days().is_some() {
        return collect_locked(repo, paths, state, index_objects, report, doomed).await;
    }
    let doomed_set: HashSet<PackId> = doomed.iter().copied().collect();
    let keep: Vec<_> = index
        .pack_entries()
        .into_iter()
        .filter(|(id, _)| !doomed_set.contains(id))
        .collect();
    if !keep.is_empty() {
        Index::store_object(repo, paths, &keep).await?;
    }
    for name in &index_objects {
        repo.storage().delete(name).await?;
    }
    for id in &doomed {
        repo.storage().delete(&paths.pack(id)).await?;
        // a damage mark outlives its pack harmlessly; remove it all the same
        if let Err(e) = repo.storage().delete(&paths.damaged(id)).await {
            tracing::debug!(pack = %id, "damage mark stays: {e}");
        }
        state.pending.remove(&id.to_string());
        report.deleted += 1;
    }
    state.store(repo, paths).await?;
    Ok(report)
}
