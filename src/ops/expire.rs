//! `walvault expire`: apply the retention policy ([`super::retention`]) to
//! a stanza — backups, the WAL only they needed, and (through the delayed
//! two-phase collection of `repo::gc`) the packs only they referenced.
//!
//! Safety, in the order it is applied:
//! 1. The decision: the newest backup and held ones are always kept;
//!    backups still being taken have no manifest yet and are not
//!    candidates.
//! 2. WAL to keep: from each recovery base's start to the end of every
//!    timeline that passes through it (the timeline history decides), and
//!    each restore point's own consistency range. While a backup lease is
//!    live (a backup in progress, whose start is not known yet), no WAL is
//!    deleted.
//! 3. Apply: the record of the decision first (so `wal-verify` knows which
//!    backups are points), then the manifests (the commit point: a crash
//!    after it leaves only unreferenced WAL and packs, which the next run
//!    removes), then the WAL and its summaries, then a collection run.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::records::{self, ExpireRecord, KeptAs};
use super::retention::{decide, Candidate, Decision, Policy, Reason, Role};
use super::OpsError;
use crate::archive::catalog::WalCatalog;
use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileName, WalSegSize};
use crate::repo::files::{self, SnapshotHead};
use crate::repo::gc::{self, GcReport};
use crate::repo::{Manifest, Repository, StanzaPaths};
use crate::wal::history::TimelinePath;

/// How to expire.
#[derive(Debug, Clone)]
pub struct ExpireOptions {
    /// The policy.
    pub policy: Policy,
    /// Decide and report; change nothing.
    pub dry_run: bool,
    /// How long an unreferenced pack stays marked before it is deleted
    /// (must exceed the clock skew between hosts by a wide margin).
    pub pack_grace: Duration,
    /// The time the policy is evaluated at.
    pub now: DateTime<Utc>,
    /// Backups to remove whatever the policy says (`--forget`): refused
    /// when held, the newest, or locked in a write-once repository.
    pub forget: Vec<String>,
}

/// One backup's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct BackupVerdict {
    /// The backup.
    pub id: String,
    /// When it became consistent.
    pub stop_time: DateTime<Utc>,
    /// Kept or expired.
    pub keep: bool,
    /// The rules that keep it (empty: expired).
    pub reasons: Vec<Reason>,
    /// What its WAL is kept for.
    pub role: Option<Role>,
    /// Its logical size.
    pub bytes: u64,
    /// Removed on request (`--forget`), not by the policy.
    pub forgotten: bool,
}

/// One file snapshot's verdict (`walvault files`): the same policy, per set.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotVerdict {
    /// The set.
    pub set: String,
    /// The snapshot.
    pub id: String,
    /// The moment it stands for (its start).
    pub started: DateTime<Utc>,
    /// Kept or expired.
    pub keep: bool,
    /// The rules that keep it (empty: expired).
    pub reasons: Vec<Reason>,
    /// Its content bytes.
    pub bytes: u64,
}

/// A run of consecutive WAL files of one timeline that goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalRange {
    /// The timeline.
    pub timeline: TimelineId,
    /// First file.
    pub from: WalFileName,
    /// Last file.
    pub to: WalFileName,
    /// Files in the run.
    pub files: usize,
    /// Their stored bytes.
    pub bytes: u64,
}

/// What expire did, or would do with `dry_run`.
#[derive(Debug, Clone, Serialize)]
pub struct ExpireReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Every backup, oldest first.
    pub backups: Vec<BackupVerdict>,
    /// Every file snapshot, by set, oldest first.
    pub file_snapshots: Vec<SnapshotVerdict>,
    /// WAL that goes: outside every kept recovery range.
    pub wal_expired: Vec<WalRange>,
    /// Why no WAL goes, when that is so.
    pub wal_kept_because: Option<String>,
    /// Packs: marked now (deleted by a later run after the grace period),
    /// deleted now (marked by an earlier run).
    pub packs_marked: usize,
    /// Bytes of the packs marked.
    pub packs_marked_bytes: u64,
    /// Packs deleted.
    pub packs_deleted: usize,
    /// Marked packs still waiting (grace period, or an older writer).
    pub packs_waiting: usize,
    /// Bytes freed now: WAL and packs deleted.
    pub bytes_freed: u64,
    /// Objects the policy lets go that a write-once repository still
    /// locks (left for a later run), and the latest of their locks.
    pub locked: usize,
    /// When the last of those locks ends.
    pub locked_until: Option<DateTime<Utc>>,
    /// Objects whose lock this run extended (write-once repositories).
    pub locks_extended: usize,
}

/// The policy applied to each file set on its own (the verified guard does
/// not apply: `files verify` keeps no ledger).
fn file_verdicts(
    policy: &Policy,
    heads: &[SnapshotHead],
    holds: &BTreeMap<String, Vec<super::retention::Hold>>,
    now: DateTime<Utc>,
) -> Result<Vec<SnapshotVerdict>, OpsError> {
    let mut out = Vec::new();
    let sets: std::collections::BTreeSet<&str> = heads.iter().map(|h| h.set.as_str()).collect();
    for set in sets {
        let of_set: Vec<&SnapshotHead> = heads.iter().filter(|h| h.set == set).collect();
        let candidates: Vec<Candidate> = of_set
            .iter()
            .map(|h| Candidate {
                id: h.id.clone(),
                stop_time: h.started,
                holds: holds.get(&h.id).cloned().unwrap_or_default(),
                verified: true,
            })
            .collect();
        for d in decide(policy, &candidates, now)? {
            let bytes = of_set.iter().find(|h| h.id == d.id).map_or(0, |h| h.bytes);
            out.push(SnapshotVerdict {
                set: set.to_owned(),
                keep: d.keep(),
                id: d.id,
                started: d.stop_time,
                reasons: d.reasons,
                bytes,
            });
        }
    }
    Ok(out)
}

/// Delete the expired file snapshots, then entries no head names (left by
/// runs that failed) unless a files backup is running now.
async fn expire_files(
    repo: &Repository,
    paths: &StanzaPaths,
    expired: &HashSet<(String, String)>,
) -> Result<(), OpsError> {
    // in a write-once repository an entries object may still be locked:
    // it stays, an orphan a later run removes
    let tolerate_lock = |r: Result<(), crate::repo::RepoError>| match r {
        Err(crate::repo::RepoError::Storage(crate::storage::StorageError::Locked { .. })) => Ok(()),
        other => other,
    };
    for (set, id) in expired {
        tolerate_lock(files::delete_snapshot(repo, paths, set, id).await)?;
        super::holds::forget(repo, paths, id).await?;
    }
    let running = gc::live_leases(repo, paths)
        .await?
        .iter()
        .any(|l| l.purpose == "files");
    if !running {
        for (set, id) in files::orphan_entries(repo, paths).await? {
            tolerate_lock(files::delete_snapshot(repo, paths, &set, &id).await)?;
        }
    }
    Ok(())
}

/// Turn a decision into "expire" for `--forget`, unless something must
/// keep the backup whatever is asked.
fn forget(d: &mut Decision) -> Result<(), OpsError> {
    for r in &d.reasons {
        let why = match r {
            Reason::Newest => "it is the newest backup, the recovery base of everything after it: take another backup first".to_owned(),
            Reason::Held { reason, .. } => format!(
                "it is held ({reason:?}): `walvault release {}` first",
                d.id
            ),
            _ => continue,
        };
        return Err(OpsError::Forget(format!(
            "cannot forget backup {}: {why}",
            d.id
        )));
    }
    d.reasons.clear();
    d.role = None;
    Ok(())
}

/// Apply (or with `dry_run`, only decide) the policy on `stanza`, and
/// remove the backups `forget` names.
pub async fn expire(
    repo: &Repository,
    stanza: &str,
    opts: &ExpireOptions,
) -> Result<ExpireReport, OpsError> {
    opts.policy.validate()?;
    let paths = StanzaPaths::new(stanza);
    // whole manifests: the write-once lock extension below finds the
    // packs the kept backups need from their block ids
    let manifests = Manifest::load_all(repo, &paths).await?;
    let holds = super::holds::load(repo, &paths).await?;
    let verified = super::records::verified_backups(repo, &paths).await?;
    let candidates: Vec<Candidate> = manifests
        .iter()
        .map(|m| Candidate {
            id: m.id.clone(),
            stop_time: DateTime::from_timestamp_micros(m.stop_time).unwrap_or_default(),
            holds: holds.get(&m.id).cloned().unwrap_or_default(),
            verified: verified.contains(&m.id),
        })
        .collect();
    let mut decisions = decide(&opts.policy, &candidates, opts.now)?;
    for id in &opts.forget {
        let Some(d) = decisions.iter_mut().find(|d| &d.id == id) else {
            return Err(OpsError::UnknownBackup(id.clone()));
        };
        forget(d)?;
    }
    let locking = repo.storage().lock_days().is_some();
    if locking {
        // a backup whose manifest is still locked cannot go: it stays as a
        // restore point (its own WAL) until the lock ends
        for d in decisions.iter_mut().filter(|d| !d.keep()) {
            let key = Manifest::object_name(&paths, &d.id);
            if let Some(until) = repo.storage().locked_until(&key).await? {
                d.reasons.push(Reason::Locked { until });
                d.role = Some(Role::Point);
            }
        }
    }
    // (checked after the locks are read: one a policy keeps is not)
    for d in decisions.iter().filter(|d| opts.forget.contains(&d.id)) {
        if let Some(Reason::Locked { until }) = d.reasons.first() {
            return Err(OpsError::Forget(format!(
                "cannot forget backup {}: its manifest is locked in this write-once repository until {}",
                d.id,
                until.to_rfc3339()
            )));
        }
    }
    let by_id: BTreeMap<&str, &Manifest> = manifests.iter().map(|m| (m.id.as_str(), m)).collect();
    let file_heads = files::list_heads(repo, &paths, None).await?;
    let mut report = ExpireReport {
        dry_run: opts.dry_run,
        backups: decisions
            .iter()
            .map(|d| BackupVerdict {
                id: d.id.clone(),
                stop_time: d.stop_time,
                keep: d.keep(),
                reasons: d.reasons.clone(),
                role: d.role,
                bytes: by_id
                    .get(d.id.as_str())
                    .map_or(0, |m| m.totals.logical_bytes),
                forgotten: opts.forget.contains(&d.id),
            })
            .collect(),
        file_snapshots: file_verdicts(&opts.policy, &file_heads, &holds, opts.now)?,
        wal_expired: Vec::new(),
        wal_kept_because: None,
        packs_marked: 0,
        packs_marked_bytes: 0,
        packs_deleted: 0,
        packs_waiting: 0,
        bytes_freed: 0,
        locked: 0,
        locked_until: None,
        locks_extended: 0,
    };
    if locking {
        // a snapshot whose head is still locked stays until the lock ends
        for v in report.file_snapshots.iter_mut().filter(|v| !v.keep) {
            let key = files::head_key(&paths, &v.set, &v.id);
            if let Some(until) = repo.storage().locked_until(&key).await? {
                v.reasons.push(Reason::Locked { until });
                v.keep = true;
            }
        }
    }
    let expired_files: HashSet<(String, String)> = report
        .file_snapshots
        .iter()
        .filter(|v| !v.keep)
        .map(|v| (v.set.clone(), v.id.clone()))
        .collect();
    let Some(seg) = manifests.iter().map(|m| m.wal_segment_size).max() else {
        // no backups: no WAL to judge; file snapshots may still go
        if opts.dry_run {
            return Ok(report);
        }
        expire_files(repo, &paths, &expired_files).await?;
        gc::sweep_leases(repo, &paths).await?;
        let g = gc::collect(repo, &paths, opts.pack_grace).await?;
        add_packs(&mut report, &g);
        return Ok(report);
    };
    let kept: Vec<(&Manifest, Role)> = decisions
        .iter()
        .filter_map(|d| Some((*by_id.get(d.id.as_str())?, d.role?)))
        .collect();
    let expired: Vec<&Manifest> = decisions
        .iter()
        .filter(|d| !d.keep())
        .filter_map(|d| by_id.get(d.id.as_str()).copied())
        .collect();

    // the WAL that goes
    let leases = gc::live_leases(repo, &paths).await?;
    let mut doomed_wal: Vec<(WalFileName, u64)> = Vec::new();
    // the WAL kept for a kept range (its locks are extended); None while a
    // backup runs and the ranges are not known
    let mut kept_wal: Option<Vec<WalFileName>> = None;
    if let Some(l) = leases.iter().find(|l| l.purpose == "backup") {
        report.wal_kept_because = Some(format!(
            "a backup is in progress ({}, lease since {}): its WAL's start is not known yet, so no WAL is expired in this run",
            l.holder,
            DateTime::from_timestamp(l.started, 0).unwrap_or_default().to_rfc3339()
        ));
    } else {
        let cat = WalCatalog::load(repo, &paths, seg).await?;
        let spans: Vec<Span> = kept
            .iter()
            .map(|(m, role)| Span {
                timeline: m.timeline,
                start: m.start_lsn,
                stop: m.stop_lsn,
                role: *role,
            })
            .collect();
        let keep = WalKeep::new(&cat, &spans, seg)?;
        let mut keeps = Vec::new();
        for tli in repo.wal_timelines(&paths).await? {
            for (name, size) in repo.list_wal_sized(&paths, tli, seg).await? {
                if keep.keeps(&name) {
                    keeps.push(name);
                    continue;
                }
                if locking {
                    let key = crate::repo::wal_key(&paths, &name);
                    if let Some(until) = repo.storage().locked_until(&key).await? {
                        report.locked += 1;
                        report.locked_until = report.locked_until.max(Some(until));
                        continue;
                    }
                }
                doomed_wal.push((name, size));
            }
        }
        report.wal_expired = ranges(&doomed_wal);
        kept_wal = Some(keeps);
    }
    report.bytes_freed = doomed_wal.iter().map(|(_, s)| s).sum();

    let remaining: Vec<Manifest> = kept.iter().map(|(m, _)| (*m).clone()).collect();
    // (also refuses a damaged repository, before anything is changed)
    let file_chunks = files::live_chunks(repo, &paths, &expired_files).await?;
    let preview = gc::preview(repo, &paths, &remaining, &file_chunks, opts.pack_grace).await?;
    if opts.dry_run {
        add_packs(&mut report, &preview);
        return Ok(report);
    }

    // apply: the record, the manifests, the WAL, the packs
    let record = ExpireRecord {
        time: opts.now,
        kept: decisions
            .iter()
            .filter_map(|d| {
                Some((
                    d.id.clone(),
                    KeptAs {
                        role: d.role?,
                        rules: d.reasons.iter().map(rule_text).collect(),
                    },
                ))
            })
            .collect(),
        expired: expired.iter().map(|m| m.id.clone()).collect(),
    };
    records::store(repo, &paths, records::EXPIRE, &record).await?;
    for m in &expired {
        Manifest::delete(repo, &paths, &m.id).await?;
        super::holds::forget(repo, &paths, &m.id).await?;
    }
    for (name, _) in &doomed_wal {
        repo.delete_wal(&paths, name).await?;
        if let Some(f) = name.segment_file() {
            if !matches!(name, WalFileName::Backup { .. }) {
                crate::archive::summaries::delete_summary(repo, &paths, &f).await?;
            }
        }
    }
    expire_files(repo, &paths, &expired_files).await?;
    gc::sweep_leases(repo, &paths).await?;
    let g = gc::collect(repo, &paths, opts.pack_grace).await?;
    add_packs(&mut report, &g);
    report.locked += g.locked;
    report.locked_until = report.locked_until.max(g.locked_until);
    for kind in [
        records::EXPIRE,
        records::VERIFY,
        records::DRILL,
        records::JOB,
        crate::archive::stream::STREAM_RECORD,
        super::locks::LOCKS,
    ] {
        records::prune(repo, &paths, kind).await?;
    }
    if locking {
        // only what a rule of the policy keeps: a backup kept just because
        // its lock has not ended yet must be let go when it ends
        let by_rule: Vec<Manifest> = decisions
            .iter()
            .filter(|d| {
                d.reasons
                    .iter()
                    .any(|r| !matches!(r, Reason::Locked { .. }))
            })
            .filter_map(|d| by_id.get(d.id.as_str()).map(|m| (*m).clone()))
            .collect();
        if let Some(wal) = &kept_wal {
            report.locks_extended =
                super::locks::extend(repo, &paths, &by_rule, wal, opts.now).await?;
        }
    }
    Ok(report)
}

fn add_packs(report: &mut ExpireReport, g: &GcReport) {
    report.packs_marked = g.marked;
    report.packs_marked_bytes = g.marked_bytes;
    report.packs_deleted = g.deleted;
    report.packs_waiting = g.waiting;
    report.bytes_freed += g.deleted_bytes;
}

/// A reason in words, as the expire record and `list` show it.
pub fn rule_text(r: &Reason) -> String {
    match r {
        Reason::Newest => "newest".into(),
        Reason::WindowBase => "window base".into(),
        Reason::Window => "window".into(),
        Reason::Last { rank } => format!("last {rank}"),
        Reason::Hourly { bucket } => format!("hourly {bucket}"),
        Reason::Daily { bucket } => format!("daily {bucket}"),
        Reason::Weekly { bucket } => format!("weekly {bucket}"),
        Reason::Monthly { bucket } => format!("monthly {bucket}"),
        Reason::Yearly { bucket } => format!("yearly {bucket}"),
        Reason::Held { reason, until } => match until {
            Some(u) => format!("held until {} ({reason})", u.to_rfc3339()),
            None => format!("held ({reason})"),
        },
        Reason::Unverified { protects } => {
            format!("fallback while {protects} is unverified")
        }
        Reason::Locked { until } => format!("locked until {}", until.to_rfc3339()),
    }
}

/// Consecutive files of one timeline, merged into ranges.
fn ranges(files: &[(WalFileName, u64)]) -> Vec<WalRange> {
    let mut sorted: Vec<&(WalFileName, u64)> = files.iter().collect();
    sorted.sort_by_key(|(n, _)| {
        (
            n.timeline(),
            n.segment_file().map(|f| f.segno),
            n.to_string(),
        )
    });
    let mut out: Vec<WalRange> = Vec::new();
    for (name, size) in sorted {
        let seg = name.segment_file().map(|f| f.segno);
        match out.last_mut() {
            Some(r)
                if r.timeline == name.timeline()
                    && match (r.to.segment_file().map(|f| f.segno), seg) {
                        (Some(a), Some(b)) => b.0 <= a.0 + 1,
                        _ => false,
                    } =>
            {
                r.to = *name;
                r.files += 1;
                r.bytes += size;
            }
            _ => out.push(WalRange {
                timeline: name.timeline(),
                from: *name,
                to: *name,
                files: 1,
                bytes: *size,
            }),
        }
    }
    out
}

/// A kept backup as the WAL sees it.
#[derive(Debug, Clone, Copy)]
struct Span {
    timeline: TimelineId,
    start: Lsn,
    stop: Lsn,
    role: Role,
}

/// Which WAL files the kept backups need.
struct WalKeep {
    /// (timeline, first segment, last segment or open): a file of that
    /// timeline in that range is kept.
    ranges: BTreeSet<(TimelineId, SegmentNo, Option<SegmentNo>)>,
}

impl WalKeep {
    fn new(cat: &WalCatalog, kept: &[Span], seg: WalSegSize) -> Result<WalKeep, OpsError> {
        let timelines: BTreeSet<TimelineId> = cat
            .full
            .keys()
            .chain(cat.partial.keys())
            .chain(cat.histories.keys())
            .copied()
            .collect();
        let mut paths: Vec<TimelinePath> = Vec::new();
        for t in &timelines {
            paths.push(cat.path_to(*t)?);
        }
        let mut ranges = BTreeSet::new();
        for m in kept {
            let first = m.start.segment(seg);
            match m.role {
                Role::Point => {
                    let own = cat.path_to(m.timeline)?;
                    add_path(&mut ranges, &own, first, Some(m.stop.segment(seg)));
                }
                Role::RecoveryBase => {
                    // every timeline recovery from this backup can follow
                    let mut any = false;
                    for p in paths.iter().filter(|p| p.contains(m.timeline, m.start)) {
                        add_path(&mut ranges, p, first, None);
                        any = true;
                    }
                    if !any {
                        // (its timeline has no WAL listed yet)
                        ranges.insert((m.timeline, first, None));
                    }
                }
            }
        }
        Ok(WalKeep { ranges })
    }

    fn keeps(&self, name: &WalFileName) -> bool {
        let Some(f) = name.segment_file() else {
            return true; // history files: tiny, and every path needs them
        };
        self.ranges.iter().any(|(t, from, to)| {
            *t == f.timeline && f.segno >= *from && to.is_none_or(|to| f.segno <= to)
        })
    }
}

/// Add the segments `from..=to` (open when `to` is `None`) of `path`, each
/// on the timeline the path reads it from.
fn add_path(
    ranges: &mut BTreeSet<(TimelineId, SegmentNo, Option<SegmentNo>)>,
    path: &TimelinePath,
    from: SegmentNo,
    to: Option<SegmentNo>,
) {
    let steps = &path.steps;
    for (i, (tli, begin, _)) in steps.iter().enumerate() {
        // this step covers segments [begin, next step's begin)
        let end = steps.get(i + 1).map(|(_, b, _)| *b);
        let lo = from.max(*begin);
        // a step's last segment holds the switch: read from the next
        // timeline, but the old timeline's copy is kept too (recovery
        // along the old timeline reads it)
        let hi = match (end, to) {
            (Some(e), Some(t)) => Some(e.min(t)),
            (Some(e), None) => Some(e),
            (None, t) => t,
        };
        if hi.is_some_and(|h| h < lo) {
            continue;
        }
        ranges.insert((*tli, lo, hi));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const SEG: u64 = 16 << 20;

    fn tli(n: u32) -> TimelineId {
        TimelineId::new(n).unwrap()
    }

    /// Timeline 1 holds segments 1..=20 (its old primary went on after the
    /// switch); timeline 2 branched at the start of segment 10 and holds
    /// 10..=15.
    fn catalog() -> WalCatalog {
        let seg = WalSegSize::new(SEG).unwrap();
        let mut full = BTreeMap::new();
        full.insert(tli(1), (1..=20).map(SegmentNo).collect());
        full.insert(tli(2), (10..=15).map(SegmentNo).collect());
        let mut histories = BTreeMap::new();
        histories.insert(
            tli(2),
            "1\t0/A000000\tno recovery target specified\n".to_owned(),
        );
        WalCatalog {
            seg,
            full,
            partial: BTreeMap::new(),
            histories,
        }
    }

    /// The stored segments `spans` keep, as (timeline, segment).
    fn kept(spans: &[Span]) -> Vec<(u32, u64)> {
        let cat = catalog();
        let keep = WalKeep::new(&cat, spans, cat.seg).unwrap();
        let mut out = Vec::new();
        for (t, segs) in &cat.full {
            for s in segs {
                if keep.keeps(&WalFileName::Segment(cat.segment(*s, *t))) {
                    out.push((t.get(), s.0));
                }
            }
        }
        out
    }

    fn span(t: u32, start_seg: u64, stop_seg: u64, role: Role) -> Span {
        Span {
            timeline: tli(t),
            start: Lsn::new(start_seg * SEG + 40),
            stop: Lsn::new(stop_seg * SEG + 100),
            role,
        }
    }

    fn range(t: u32, r: std::ops::RangeInclusive<u64>) -> Vec<(u32, u64)> {
        r.map(|s| (t, s)).collect()
    }

    #[test]
    fn a_recovery_base_keeps_every_timeline_through_it() {
        // before the switch: both the old timeline and the new one
        let got = kept(&[span(1, 5, 5, Role::RecoveryBase)]);
        let want = [range(1, 5..=20), range(2, 10..=15)].concat();
        assert_eq!(got, want);
    }

    #[test]
    fn a_base_after_the_switch_does_not_keep_the_other_branch() {
        let got = kept(&[span(1, 12, 12, Role::RecoveryBase)]);
        assert_eq!(got, range(1, 12..=20));
        let got = kept(&[span(2, 13, 13, Role::RecoveryBase)]);
        assert_eq!(got, range(2, 13..=15));
    }

    #[test]
    fn a_point_keeps_only_its_own_range() {
        let got = kept(&[span(1, 3, 4, Role::Point)]);
        assert_eq!(got, range(1, 3..=4));
        // a point and a later base: the WAL between them goes
        let got = kept(&[
            span(1, 3, 4, Role::Point),
            span(2, 14, 14, Role::RecoveryBase),
        ]);
        assert_eq!(got, [range(1, 3..=4), range(2, 14..=15)].concat());
    }

    #[test]
    fn history_files_are_always_kept() {
        let cat = catalog();
        let keep = WalKeep::new(&cat, &[], cat.seg).unwrap();
        assert!(keep.keeps(&WalFileName::History(tli(2))));
    }

    #[test]
    fn ranges_merge_consecutive_files_per_timeline() {
        let cat = catalog();
        let f = |t: u32, s: u64| (WalFileName::Segment(cat.segment(SegmentNo(s), tli(t))), 10);
        let r = ranges(&[f(1, 3), f(1, 1), f(1, 2), f(1, 7), f(2, 7)]);
        let got: Vec<(String, String, usize, u64)> = r
            .iter()
            .map(|w| (w.from.to_string(), w.to.to_string(), w.files, w.bytes))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "000000010000000000000001".into(),
                    "000000010000000000000003".into(),
                    3,
                    30
                ),
                (
                    "000000010000000000000007".into(),
                    "000000010000000000000007".into(),
                    1,
                    10
                ),
                (
                    "000000020000000000000007".into(),
                    "000000020000000000000007".into(),
                    1,
                    10
                ),
            ]
        );
    }
}
