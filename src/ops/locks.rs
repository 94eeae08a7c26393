//! Write-once repositories (S3 Object Lock, `object_lock_days`): every
//! object is written locked for that many days; what kept backups still
//! need gets its lock extended before it runs out. `expire` calls
//! [`extend`] after applying the policy, so a backup never outlives the
//! lock of the data it needs: its manifest and PostgreSQL's, the packs holding its blocks,
//! the WAL of the kept recovery ranges and its summaries, the holds, the
//! repository's config and key slots. A backup kept only because its own
//! lock has not ended is not extended: it goes when the lock ends. Index objects are not extended: they
//! can be rebuilt from the pack headers (`Index::rebuild_from_packs`).

use chrono::{DateTime, Duration, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::records;
use super::OpsError;
use crate::pg::WalFileName;
use crate::repo::{gc, Index, Manifest, Repository, StanzaPaths, CONFIG_KEY, KEYS_PREFIX};
use crate::storage::list_all;

/// Record kind of lock extensions.
pub const LOCKS: &str = "lock";

/// One extension run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// When it ran.
    pub time: DateTime<Utc>,
    /// The locks now end no earlier than this.
    pub until: DateTime<Utc>,
    /// Objects extended.
    pub objects: usize,
}

/// Requests at once.
const PARALLEL: usize = 16;

/// Extend the locks of everything `kept` needs to `now` + the lock period,
/// once every third of the period (the newest [`LockRecord`] says when the
/// last run was). Returns the objects extended (0 when not due, or not a
/// write-once repository).
pub async fn extend(
    repo: &Repository,
    paths: &StanzaPaths,
    kept: &[Manifest],
    kept_wal: &[WalFileName],
    now: DateTime<Utc>,
) -> Result<usize, OpsError> {
    let Some(days) = repo.storage().lock_days() else {
        return Ok(0);
    };
    let period = Duration::days(i64::from(days));
    if let Some(last) = records::newest::<LockRecord>(repo, paths, LOCKS).await? {
        if now - last.time < period / 3 {
            return Ok(0);
        }
    }
    let until = now + period;
    let storage = repo.storage();
    let mut keys: Vec<String> = vec![CONFIG_KEY.to_owned()];
    for prefix in [KEYS_PREFIX.to_owned(), paths.holds()] {
        keys.extend(
            list_all(storage.as_ref(), &prefix)
                .await?
                .into_iter()
                .map(|o| o.key),
        );
    }
    // a segment may have no summary (it is computed when needed)
    let summaries: std::collections::HashSet<String> =
        list_all(storage.as_ref(), &paths.wal_summaries())
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
    // the objects stored for each kept WAL file: itself, and for an open
    // segment its pieces (which may be all there is)
    let stored: std::collections::HashSet<String> = list_all(storage.as_ref(), &paths.wal())
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    for name in kept_wal {
        let key = crate::repo::wal_key(paths, name);
        if stored.contains(&key) {
            keys.push(key);
        }
        if let WalFileName::Partial(f) = name {
            let prefix = format!(
                "{}.",
                crate::repo::wal_key(paths, &WalFileName::Segment(*f))
            );
            keys.extend(stored.iter().filter(|k| k.starts_with(&prefix)).cloned());
        }
        if let (Some(f), false) = (
            name.segment_file(),
            matches!(name, WalFileName::Backup { .. }),
        ) {
            let k = crate::archive::summaries::key(paths, &f);
            if summaries.contains(&k) {
                keys.push(k);
            }
        }
    }
    keys.extend(kept.iter().map(|m| Manifest::object_name(paths, &m.id)));
    // PostgreSQL's own manifest: restore writes it for pg_verifybackup, and
    // the next incremental backup sends it (absent for older backups)
    keys.extend(kept.iter().map(|m| paths.server_manifest(&m.id)));
    // file snapshots: their heads, entries and chunks' packs
    let no_exceptions = std::collections::HashSet::new();
    let file_chunks = crate::repo::files::live_chunks(repo, paths, &no_exceptions).await?;
    for root in [
        crate::repo::files::heads_dir(paths),
        format!("{}/file-entries/", paths.stanza()),
    ] {
        keys.extend(
            crate::storage::list_all(storage.as_ref(), &root)
                .await?
                .into_iter()
                .map(|o| o.key),
        );
    }
    let (index, _) = Index::load(repo, paths).await?;
    keys.extend(
        gc::plan(&index, kept, &file_chunks)
            .live
            .iter()
            .map(|id| paths.pack(id)),
    );
    keys.sort();
    keys.dedup();
    let n = keys.len();
    futures::stream::iter(keys.into_iter().map(|k| async move {
        // never shorter than it is (a compliance lock refuses that, after
        // object_lock_days was lowered)
        match storage.locked_until(&k).await {
            Ok(Some(current)) if current >= until => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            _ => {}
        }
        match storage.extend_lock(&k, until).await {
            Ok(()) => Ok(()),
            // removed meanwhile (a WAL file by a concurrent expire)
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }))
    .buffer_unordered(PARALLEL)
    .try_collect::<Vec<()>>()
    .await?;
    records::store(
        repo,
        paths,
        LOCKS,
        &LockRecord {
            time: now,
            until,
            objects: n,
        },
    )
    .await?;
    Ok(n)
}
