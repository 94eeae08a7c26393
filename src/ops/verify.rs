//! `walvault verify`: is the whole repository restorable?
//!
//! Always: every manifest's blocks are in the index; every pack the index
//! names exists, ends in an intact header (trailer, authenticated header,
//! entries inside the pack) that lists the blocks the index places there;
//! the WAL is continuous over every kept recovery range (`wal-verify`'s
//! walk, with retention's restore points needing only their own range).
//! With `--deep`, every pack and every needed WAL file is read completely
//! and every blob authenticated and decoded.
//!
//! The ledger: a passing deep run records every pack and WAL file it (or
//! an earlier passing deep run) found whole. `--since-last` reads deeply
//! only what is not in the newest passing ledger, plus with `--sample P` a
//! random P % of what is (scrubbing).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::Utc;
use futures::StreamExt;
use rand::seq::SliceRandom;
use serde::Serialize;

use super::records::{self, BackupCheck, VerifyRecord};
use super::OpsError;
use crate::archive::verify::{wal_verify, WalVerifyOptions};
use crate::codec::BlockId;
use crate::pg::WalFileName;
use crate::repo::{read_pack_header, GroupCache, PackEntry, PackId};
use crate::repo::{Index, Manifest, Repository, StanzaPaths};

/// How to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Read every byte.
    pub deep: bool,
    /// Read deeply only what the newest passing ledger lacks.
    pub since_last: bool,
    /// Re-read this share (percent) of what the ledger has.
    pub sample_percent: Option<f64>,
    /// Objects read at once.
    pub parallel: usize,
}

/// One problem: the object, what is wrong, and what it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The object (pack, manifest, WAL file).
    pub object: String,
    /// What is wrong.
    pub what: String,
    /// The backups it breaks.
    pub backups: Vec<String>,
    /// The LSN (or WAL file) range recovery cannot cross because of it.
    pub breaks: Option<String>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.object, self.what)?;
        if !self.backups.is_empty() {
            write!(f, "; breaks backup(s) {}", self.backups.join(", "))?;
        }
        if let Some(b) = &self.breaks {
            write!(f, "; {b}")?;
        }
        Ok(())
    }
}

/// What verify found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Nothing wrong.
    pub passed: bool,
    /// Backups checked.
    pub backups: usize,
    /// Packs checked (header and size).
    pub packs_checked: usize,
    /// Packs read completely.
    pub packs_read: usize,
    /// Their bytes.
    pub pack_bytes_read: u64,
    /// WAL files read completely.
    pub wal_files_read: u64,
    /// Their bytes.
    pub wal_bytes_read: u64,
    /// Every problem.
    pub problems: Vec<Problem>,
}

/// Verify `stanza` and record the result.
pub async fn verify(
    repo: &Repository,
    stanza: &str,
    opts: &VerifyOptions,
) -> Result<VerifyReport, OpsError> {
    let paths = StanzaPaths::new(stanza);
    let parallel = opts.parallel.max(1);
    // before the index: a pack garbage collection deletes while this runs
    // was marked before (a grace period earlier), so it is in this set
    let collecting = crate::repo::gc::GcState::load(repo, &paths)
        .await?
        .pending_packs();
    let manifests = Manifest::load_all(repo, &paths).await?;
    let (index, _, marked) = Index::load_marked(repo, &paths).await?;
    let deep = opts.deep || opts.since_last;
    let ledger: Option<VerifyRecord> = if opts.since_last {
        newest_passing_deep(repo, &paths).await?
    } else {
        None
    };
    let mut problems = Vec::new();

    // which backups need each pack; blocks the index does not know
    let mut users: HashMap<PackId, BTreeSet<String>> = HashMap::new();
    for m in &manifests {
        let mut missing: Vec<(&str, BlockId)> = Vec::new();
        for f in &m.files {
            for id in &f.blocks {
                match index.get(id) {
                    Some(loc) => {
                        users.entry(loc.pack).or_default().insert(m.id.clone());
                    }
                    None => missing.push((&f.path, *id)),
                }
            }
        }
        if let Some((file, id)) = missing.first() {
            problems.push(Problem {
                object: format!("{}{}", paths.backups(), m.id),
                what: format!(
                    "{} block(s) are not in the index, the first {id} of {file}",
                    missing.len()
                ),
                backups: vec![m.id.clone()],
                breaks: Some(format!("restoring backup {} at all", m.id)),
            });
        }
    }
    let breaks_of = |pack: &PackId| -> (Vec<String>, Option<String>) {
        let ids: Vec<String> = users
            .get(pack)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let b = (!ids.is_empty()).then(|| "restoring these backups".to_owned());
        (ids, b)
    };

    // every pack the index names: header and entries (all), then content
    let entries: BTreeMap<PackId, Vec<PackEntry>> = index.pack_entries().into_iter().collect();
    let ledger_packs: HashSet<String> = ledger
        .as_ref()
        .map(|l| l.packs_read.iter().cloned().collect())
        .unwrap_or_default();
    let mut to_read: Vec<PackId> = Vec::new();
    let mut in_ledger: Vec<PackId> = Vec::new();
    for id in entries.keys() {
        if ledger_packs.contains(&id.to_string()) {
            in_ledger.push(*id);
        } else {
            to_read.push(*id);
        }
    }
    if let Some(p) = opts.sample_percent {
        let n = ((in_ledger.len() as f64) * p / 100.0).ceil() as usize;
        in_ledger.shuffle(&mut rand::rng());
        to_read.extend(in_ledger.iter().take(n.min(in_ledger.len())));
    }
    let to_read: HashSet<PackId> = if deep {
        to_read.into_iter().collect()
    } else {
        HashSet::new()
    };
    // the futures made first: a closure inside the stream's type keeps the
    // command's future from being `Send` (higher-ranked lifetimes)
    let paths_ref = &paths;
    let futures: Vec<_> = entries
        .iter()
        .map(|(id, listed)| {
            let read = to_read.contains(id);
            async move { (*id, check_pack(repo, paths_ref, id, listed, read).await) }
        })
        .collect();
    let checks = futures::stream::iter(futures)
        .buffer_unordered(parallel)
        .collect::<Vec<_>>()
        .await;
    let mut report = VerifyReport {
        passed: false,
        backups: manifests.len(),
        packs_checked: entries.len(),
        packs_read: 0,
        pack_bytes_read: 0,
        wal_files_read: 0,
        wal_bytes_read: 0,
        problems: Vec::new(),
    };
    let mut packs_ok: BTreeSet<String> = BTreeSet::new();
    let mut damaged: Vec<(PackId, String)> = Vec::new();
    for (id, r) in checks {
        match r? {
            PackCheck::Fine(read) => {
                if let Some(bytes) = read {
                    report.packs_read += 1;
                    report.pack_bytes_read += bytes;
                    packs_ok.insert(id.to_string());
                    // read in full and whole: no longer damaged (a header
                    // check alone cannot say so: content damage passes it)
                    if marked.contains(&id) {
                        match crate::repo::clear_damaged(repo, &paths, &id).await {
                            Ok(()) => {
                                tracing::info!(pack = %id, "whole again: no longer recorded as damaged")
                            }
                            Err(e) => {
                                tracing::warn!(pack = %id, "cannot clear the damage record: {e}")
                            }
                        }
                    }
                }
            }
            // garbage collection deleted it meanwhile: no backup needs it
            PackCheck::Missing if collecting.contains(&id) && !users.contains_key(&id) => {
                tracing::debug!(pack = %id, "deleted by garbage collection meanwhile");
            }
            PackCheck::Missing => damaged.push((id, "the pack is missing".to_owned())),
            PackCheck::Damaged(what) => damaged.push((id, what)),
        }
    }
    for (id, what) in damaged {
        // the next backup stores its blocks again (`repo::damaged`)
        match crate::repo::mark_damaged(repo, &paths, &id).await {
            Ok(()) => tracing::warn!(
                pack = %id,
                "{what}: the next backup stores the blocks it held again"
            ),
            Err(e) => tracing::warn!(pack = %id, "cannot record the damage: {e}"),
        }
        let (backups, breaks) = breaks_of(&id);
        problems.push(Problem {
            object: paths.pack(&id),
            what,
            backups,
            breaks,
        });
    }

    // WAL: continuity over every kept recovery range; content when deep
    let points = records::restore_points(repo, &paths).await?;
    let w_points = points.clone();
    let seg = manifests.iter().map(|m| m.wal_segment_size).max();
    let wal_ledger: HashSet<WalFileName> = match (&ledger, seg) {
        (Some(l), Some(seg)) => l
            .wal_read
            .iter()
            .filter_map(|n| WalFileName::parse(n, seg).ok())
            .filter(|n| !matches!(n, WalFileName::Partial(_))) // a .partial grows
            .collect(),
        _ => HashSet::new(),
    };
    let w = wal_verify(
        repo,
        stanza,
        &WalVerifyOptions {
            read_content: deep,
            parallel,
            points,
            already_read: wal_ledger.clone(),
        },
    )
    .await?;
    report.wal_files_read = w.segments_read;
    report.wal_bytes_read = w.bytes_read;
    for g in &w.gaps {
        problems.push(Problem {
            object: format!("{} .. {}", crate::repo::wal_key(&paths, &g.from), g.to),
            what: format!("{} WAL segment(s) missing", g.segments),
            backups: g.backups.clone(),
            breaks: Some(format!(
                "recovery from these backups cannot pass {} (targets before it still work)",
                g.from
            )),
        });
    }
    for d in &w.damaged {
        let needing: Vec<String> = manifests
            .iter()
            .filter(|m| {
                let seg = m.wal_segment_size;
                d.name.timeline() >= m.timeline
                    && d.name.segment_file().is_some_and(|f| {
                        f.segno >= m.start_lsn.segment(seg)
                            // a restore point needs only its own range
                            && (!w_points.contains(&m.id) || f.segno <= m.stop_lsn.segment(seg))
                    })
            })
            .map(|m| m.id.clone())
            .collect();
        problems.push(Problem {
            object: crate::repo::wal_key(&paths, &d.name),
            what: d.error.clone(),
            backups: needing,
            breaks: Some(format!("recovery cannot pass {}", d.name)),
        });
    }

    // per backup, the record
    report.passed = problems.is_empty();
    let mut backups: BTreeMap<String, BackupCheck> = manifests
        .iter()
        .map(|m| {
            (
                m.id.clone(),
                BackupCheck {
                    ok: true,
                    problems: Vec::new(),
                },
            )
        })
        .collect();
    for p in &problems {
        for id in &p.backups {
            if let Some(c) = backups.get_mut(id) {
                c.ok = false;
                c.problems.push(p.to_string());
            }
        }
    }
    // the ledger carries forward what an earlier passing run found whole
    // and still exists
    let existing: HashSet<String> = entries.keys().map(|p| p.to_string()).collect();
    let mut ledger_out: BTreeSet<String> = ledger_packs
        .into_iter()
        .filter(|p| existing.contains(p))
        .collect();
    ledger_out.extend(packs_ok);
    let mut wal_out: BTreeSet<String> = wal_ledger.iter().map(|n| n.to_string()).collect();
    wal_out.extend(w.read_ok.iter().map(|n| n.to_string()));
    let record = VerifyRecord {
        time: Utc::now(),
        deep,
        since_last: opts.since_last,
        sample_percent: opts.sample_percent,
        passed: report.passed,
        backups,
        packs_read: if deep {
            ledger_out.into_iter().collect()
        } else {
            Vec::new()
        },
        wal_read: if deep {
            wal_out.into_iter().collect()
        } else {
            Vec::new()
        },
        bytes_read: report.pack_bytes_read + report.wal_bytes_read,
        problems: problems.iter().map(|p| p.to_string()).collect(),
    };
    records::store(repo, &paths, records::VERIFY, &record).await?;
    report.problems = problems;
    Ok(report)
}

/// The newest deep verify that passed (its ledger), if any.
async fn newest_passing_deep(
    repo: &Repository,
    paths: &StanzaPaths,
) -> Result<Option<VerifyRecord>, OpsError> {
    Ok(records::all::<VerifyRecord>(repo, paths, records::VERIFY)
        .await?
        .into_iter()
        .rev()
        .find(|r| r.deep && r.passed))
}

/// What one pack's check found.
enum PackCheck {
    /// Whole; the bytes read when it was read.
    Fine(Option<u64>),
    /// Not there.
    Missing,
    /// Damaged: what is wrong.
    Damaged(String),
}

/// Check one pack: its header lists what the index places there; with
/// `read`, every blob is read, authenticated and decoded. A storage error
/// that is not about the pack (a timeout, a refused request) is an error of
/// the run, not damage.
async fn check_pack(
    repo: &Repository,
    paths: &StanzaPaths,
    id: &PackId,
    listed: &[PackEntry],
    read: bool,
) -> Result<PackCheck, crate::repo::RepoError> {
    use crate::repo::RepoError;
    let name = paths.pack(id);
    let header = match read_pack_header(
        repo.storage().as_ref(),
        &name,
        repo.keys(),
        repo.entry_format(),
    )
    .await
    {
        Ok(h) => h,
        Err(RepoError::Storage(e)) if e.is_not_found() => return Ok(PackCheck::Missing),
        Err(RepoError::Corrupt { reason, .. }) => return Ok(PackCheck::Damaged(reason)),
        Err(e) => return Err(e),
    };
    let by_id: HashMap<BlockId, PackEntry> = header.iter().map(|e| (e.id, *e)).collect();
    for e in listed {
        match by_id.get(&e.id) {
            Some(h) if h.offset == e.offset && h.len == e.len => {}
            Some(_) => {
                return Ok(PackCheck::Damaged(format!(
                    "block {} lies elsewhere in the pack than the index says",
                    e.id
                )))
            }
            None => {
                return Ok(PackCheck::Damaged(format!(
                    "the pack's header does not list block {}",
                    e.id
                )))
            }
        }
    }
    if !read {
        return Ok(PackCheck::Fine(None));
    }
    let data = match repo.storage().get(&name).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => {
            return Ok(PackCheck::Damaged(
                "the pack vanished while being read".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let len = data.len() as u64;
    let keys = repo.keys().cloned();
    let hasher = repo.hasher().clone();
    let checked = tokio::task::spawn_blocking(move || -> Result<(), String> {
        // the blocks of a group are neighbours: it is decoded once for all
        let mut header = header;
        header.sort_by_key(|e| (e.offset, e.len));
        let mut group = GroupCache::default();
        let mut block = Vec::new();
        for e in &header {
            let blob = data
                .get(e.offset as usize..(e.offset as usize).saturating_add(e.len as usize))
                .ok_or_else(|| format!("block {} lies past the pack's end", e.id))?;
            block.clear();
            group
                .decode_into(blob, e, keys.as_ref(), &hasher, &mut block)
                .map_err(|why| format!("block {} at byte {}: {why}", e.id, e.offset))?;
        }
        Ok(())
    })
    .await
    .map_err(RepoError::task("verify"))?;
    Ok(match checked {
        Ok(()) => PackCheck::Fine(Some(len)),
        Err(why) => PackCheck::Damaged(why),
    })
}
