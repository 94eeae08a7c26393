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

use super::index::Index;
use super::manifest::Manifest;
use super::object::ObjectKind;
use super::pack::PackId;
use super::{RepoError, Repository, StanzaPaths};
use crate::codec::{to_hex, BlockId};
use crate::storage::list_all;

/// Default lease lifetime; refreshed every third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(15 * 60);
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
#[derive(Debug)]
pub struct Lease {
    name: String,
    repo: Arc<Repository>,
    expires: Arc<AtomicI64>,
    refresher: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Write a lease and start refreshing it.
    pub async fn acquire(
        repo: Arc<Repository>,
        paths: &StanzaPaths,
        purpose: &str,
    ) -> Result<Lease, RepoError> {
        let name = format!("{}{}", paths.locks(), to_hex(&rand::random::<[u8; 8]>()));
        let started = now_secs();
        let holder = format!(
            "{}:{}",
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        );
        let mut rec = LeaseRecord {
            version: 1,
            purpose: purpose.to_owned(),
            holder,
            started,
            expires: started + LEASE_TTL.as_secs() as i64,
        };
        write_lease(&repo, &name, &rec).await?;
        let expires = Arc::new(AtomicI64::new(rec.expires));
        let refresher = {
            let (repo, name, expires) = (repo.clone(), name.clone(), expires.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LEASE_TTL / 3).await;
                    rec.expires = now_secs() + LEASE_TTL.as_secs() as i64;
                    match write_lease(&repo, &name, &rec).await {
                        Ok(()) => expires.store(rec.expires, Ordering::Relaxed),
                        Err(e) => tracing::warn!("cannot refresh lease {name}: {e}"),
                    }
                }
            })
        };
        Ok(Lease {
            name,
            repo,
            expires,
            refresher,
        })
    }

    /// True until the lease's last successfully written expiry has passed.
    pub fn valid(&self) -> bool {
        now_secs() < self.expires.load(Ordering::Relaxed)
    }

    /// Stop refreshing and delete the lease.
    pub async fn release(&self) {
        self.refresher.abort();
        if let Err(e) = self.repo.storage().delete(&self.name).await {
            tracing::warn!(
                "cannot remove lease {}: {e} (it lapses by itself)",
                self.name
            );
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
    for o in list_all(repo.storage().as_ref(), &paths.locks()).await? {
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

/// Packs marked for deletion, with the time of marking.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcState {
    /// Version of this structure.
    pub version: u32,
    /// Pack id (hex) → unix seconds when it was marked.
    pub pending: BTreeMap<String, i64>,
}

impl GcState {
    fn name(paths: &StanzaPaths) -> String {
        format!("{}{GC_STATE}", paths.catalog())
    }

    /// The stanza's state (empty when none was written yet).
    pub async fn load(repo: &Repository, paths: &StanzaPaths) -> Result<GcState, RepoError> {
        let name = GcState::name(paths);
        match repo.read_object(ObjectKind::GcState, &name, 1 << 30).await {
            Ok(body) => {
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
            Err(RepoError::Storage(e)) if e.is_not_found() => Ok(GcState {
                version: STATE_VERSION,
                pending: BTreeMap::new(),
            }),
            Err(e) => Err(e),
        }
    }

    async fn store(&self, repo: &Repository, paths: &StanzaPaths) -> Result<(), RepoError> {
        let name = GcState::name(paths);
        let body = serde_json::to_vec(self).map_err(RepoError::encode("the GC state"))?;
        repo.storage()
            .put(&name, repo.seal(ObjectKind::GcState, &name, &body))
            .await?;
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

/// Compute live and unreferenced packs.
pub fn plan(index: &Index, manifests: &[Manifest]) -> GcPlan {
    let mut live = BTreeSet::new();
    let mut missing = Vec::new();
    let mut seen: HashSet<BlockId> = HashSet::new();
    for m in manifests {
        for f in &m.files {
            for id in &f.blocks {
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
    grace: Duration,
    now: i64,
) -> Result<Assessment, RepoError> {
    let mut state = GcState::load(repo, paths).await?;
    let leases = live_leases(repo, paths).await?;
    let (index, index_objects) = Index::load(repo, paths).await?;
    let mut p = plan(&index, manifests);
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
                let no_older_writer = leases.iter().all(|l| l.started > marked);
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

/// What a collection run would do if the stanza's backups were `manifests`:
/// nothing is written. `deleted` and `deleted_bytes` are what it would
/// delete now, `marked` what it would mark for a later run.
pub async fn preview(
    repo: &Repository,
    paths: &StanzaPaths,
    manifests: &[Manifest],
    grace: Duration,
) -> Result<GcReport, RepoError> {
    let a = assess(repo, paths, manifests, grace, now_secs()).await?;
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
    let Assessment {
        mut state,
        index,
        index_objects,
        mut report,
        doomed,
    } = assess(repo, paths, &manifests, grace, now_secs()).await?;
    // marks are durable before anything is deleted
    state.store(repo, paths).await?;
    if doomed.is_empty() {
        return Ok(report);
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
        state.pending.remove(&id.to_string());
        report.deleted += 1;
    }
    state.store(repo, paths).await?;
    Ok(report)
}
