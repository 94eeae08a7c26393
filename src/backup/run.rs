//! A whole base backup: WAL streamed over a second replication connection
//! (through a temporary slot, so the server keeps it) from before the
//! backup's checkpoint to its end, the files through BASE_BACKUP, and the
//! manifest — written last, only when files and WAL are durable.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::incremental::{choose_base, ServerFacts};
use super::stream::BaseBackupOptions;
use super::{store_base_backup, BackupError};
use crate::pg::wire::Backend;
use crate::pg::{ConnParams, Lsn, PgConnection, PgError, TimelineId, WalSegSize};
use crate::repo::{
    DatabaseRelations, Manifest, ManifestTotals, PageRef, RelName, Relation, RelationMap,
    Repository, StanzaPaths, Tablespace,
};
use crate::wal::receive::{parse_message, status_update, SegmentAssembler, WalMessage};

/// How long to wait, once the backup ended, for the WAL up to its end.
const WAL_TAIL_TIMEOUT: Duration = Duration::from_secs(120);

fn protocol(target: &str, reason: String) -> BackupError {
    BackupError::Pg(PgError::Protocol {
        target: target.to_owned(),
        reason,
    })
}

/// A replication connection, with the fix spelled out when the server
/// accepts none.
async fn connect(params: &ConnParams) -> Result<PgConnection, BackupError> {
    match PgConnection::connect(params, true).await {
        Err(e) if e.sqlstate() == Some("53300") && e.to_string().contains("max_wal_senders") => Err(protocol(
            &params.describe(),
            format!(
                "{e}; walvault needs replication connections (two during a backup): set wal_level = replica and \
                 max_wal_senders = 10 (or more) in postgresql.conf and restart the server"
            ),
        )),
        Err(e) if e.sqlstate() == Some("57P03") && e.to_string().contains("Hot standby mode is disabled") => Err(protocol(
            &params.describe(),
            format!(
                "{e}; a standby takes no connection at all, replication ones included, with hot_standby = off: set hot_standby = on \
                 on the standby and restart it, or back up the primary"
            ),
        )),
        other => Ok(other?),
    }
}

/// Take a complete, self-contained backup of the cluster at `params` into
/// `stanza`; returns its manifest.
pub async fn run_backup(
    repo: Arc<Repository>,
    stanza: &str,
    params: &ConnParams,
    opts: &BaseBackupOptions,
) -> Result<Manifest, BackupError> {
    let paths = StanzaPaths::new(stanza);
    let started = chrono::Utc::now();
    let mut wal_conn = connect(params).await?;
    // every connection of the backup goes to the server the first one
    // reached (a multi-host conninfo may name several)
    let params = &wal_conn.server_params().clone();
    let target = wal_conn.target().to_owned();
    let wal_level = wal_conn.show("wal_level").await?;
    if wal_level == "minimal" {
        return Err(protocol(
            &target,
            "wal_level is 'minimal', which keeps no WAL to back up with; set wal_level = replica and restart the server".into(),
        ));
    }
    let sys = wal_conn.identify_system().await?;
    let seg = wal_conn.wal_segment_size().await?;
    let version = wal_conn.server_version_num().unwrap_or(0);
    // in_hot_standby (PostgreSQL 14+) is the one way a replication
    // connection learns the server's role
    let from_standby = if version >= 140_000 {
        wal_conn
            .show("in_hot_standby")
            .await
            .ok()
            .map(|v| v == "on")
    } else {
        None
    };
    if from_standby != Some(false) {
        standby_preflight(params, opts.standby_max_lag).await?;
    }
    // PostgreSQL 17+ with summarize_wal sends only what changed since the
    // previous backup; the files are completed from it as they arrive
    let incremental_base = if opts.no_incremental {
        None
    } else {
        let facts = ServerFacts {
            version,
            summarize_wal: if version >= 170_000 {
                Some(wal_conn.show("summarize_wal").await?)
            } else {
                None
            },
            block_size: Some(wal_conn.show("block_size").await?),
            system_id: sys.system_id,
        };
        match choose_base(&repo, &paths, &facts).await? {
            Ok(base) => Some(Arc::new(base)),
            Err(why) if version >= 170_000 => {
                tracing::info!("reading every file: {why}");
                None
            }
            Err(why) => {
                tracing::debug!("reading every file: {why}");
                None
            }
        }
    };
    let slot = format!(
        "walvault_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    // the slot reserves WAL from the last checkpoint's (or, on a standby,
    // restartpoint's) redo point, which the backup's start cannot precede;
    // streaming starts at the backup's start once the server names it
    wal_conn.create_temporary_physical_slot(&slot).await?;
    if sys.timeline.get() > 1 {
        let (name, content) = wal_conn.timeline_history(sys.timeline).await?;
        let name = crate::pg::WalFileName::parse(&name, seg).map_err(|e| {
            protocol(
                &target,
                format!("TIMELINE_HISTORY sent file name {name:?}: {e}"),
            )
        })?;
        repo.store_wal(&paths, &name, content.to_vec()).await?;
    }
    let (stop_tx, stop_rx) = watch::channel(None);
    let (start_tx, start_rx) = watch::channel(None);
    let wal_task = tokio::spawn(stream_wal(
        repo.clone(),
        paths.clone(),
        wal_conn,
        slot,
        start_rx,
        sys.timeline,
        seg,
        stop_rx,
    ));

    let (relnames, relations) = relation_names(params).await;
    let mut conn = connect(params).await?;
    let opts = &BaseBackupOptions {
        on_start: Some(Arc::new(start_tx)),
        incremental_base,
        ..opts.clone()
    };
    let stored = match store_base_backup(repo.clone(), stanza, &mut conn, opts, |_| {}).await {
        Ok(s) => s,
        Err(e) => {
            wal_task.abort();
            return Err(e);
        }
    };
    conn.close().await;
    if stored.start.timeline != sys.timeline {
        wal_task.abort();
        return Err(protocol(
            &target,
            format!(
                "the backup started on timeline {}, but the server was on timeline {} (a promotion during the backup?); run it again",
                stored.start.timeline, sys.timeline
            ),
        ));
    }
    let (stop_lsn, _) = stored.end;
    let _ = stop_tx.send(Some(stop_lsn));
    let wal = wal_task
        .await
        .map_err(|e| protocol(&target, format!("WAL stream task failed: {e}")))??;
    tracing::debug!(segments = wal, "backup WAL stored");

    let totals = ManifestTotals {
        logical_bytes: stored.files.iter().map(|f| f.size).sum(),
        new_raw_bytes: stored.stats.new_raw_bytes,
        new_stored_bytes: stored.stats.stored_bytes,
        blocks: stored.files.iter().map(|f| f.blocks.len() as u64).sum(),
        new_blocks: stored.stats.new_blocks,
    };
    let tablespaces = stored
        .start
        .tablespaces
        .iter()
        .filter_map(|t| {
            Some(Tablespace {
                oid: t.oid?,
                location: t.location.clone()?,
            })
        })
        .collect();
    // the id orders the backups: after every one already committed
    let id = loop {
        let newest = Manifest::list_ids(&repo, &paths).await?.pop();
        match Manifest::next_id(newest.as_deref(), chrono::Utc::now()) {
            // (another writer's manifest of this very second and digits
            // is never overwritten)
            Ok(id) if !Manifest::exists(&repo, &paths, &id).await? => break id,
            Ok(_) => {}
            Err(wait) => tokio::time::sleep(wait).await,
        }
    };
    let manifest = Manifest {
        version: repo.manifest_version(),
        id,
        label: opts.label.clone(),
        system_id: sys.system_id,
        pg_version: version,
        timeline: stored.start.timeline,
        start_lsn: stored.start.start_lsn,
        stop_lsn,
        start_time: started.timestamp_micros(),
        stop_time: chrono::Utc::now().timestamp_micros(),
        block_size: repo.config().block_size,
        files: stored.files,
        tablespaces,
        totals,
        wal_segment_size: seg,
        corrupt_pages: stored
            .corrupt_pages
            .iter()
            .map(|p| PageRef {
                file: p.file.clone(),
                block: p.block,
            })
            .collect(),
        relnames,
        from_standby,
        incremental_from: stored.incremental_from,
        received_bytes: Some(stored.received_bytes),
        relations,
    };
    // PostgreSQL's own manifest, before the commit: a restore writes it
    // into the data directory for pg_verifybackup
    if let Some(m) = &stored.server_manifest {
        if let Err(e) = Manifest::store_server_manifest(&repo, &paths, &manifest.id, m).await {
            stored.lease.release().await;
            return Err(e.into());
        }
    }
    // commit only under a live lease: garbage collection may delete packs
    // this backup deduplicated against once a writer's lease has lapsed
    if !stored.lease.valid() {
        stored.lease.release().await;
        return Err(BackupError::LeaseExpired);
    }
    let committed = manifest.store(&repo, &paths).await;
    stored.lease.release().await;
    committed?;
    Ok(manifest)
}

/// Stream WAL from `start` until everything up to the stop position (sent
/// through `stop`) is stored; complete segments are stored as they fill, the
/// last incomplete one as `.partial`. Returns the number of files stored.
#[allow(clippy::too_many_arguments)]
async fn stream_wal(
    repo: Arc<Repository>,
    paths: StanzaPaths,
    mut conn: PgConnection,
    slot: String,
    mut start_rx: watch::Receiver<Option<Lsn>>,
    tli: TimelineId,
    seg: WalSegSize,
    mut stop: watch::Receiver<Option<Lsn>>,
) -> Result<usize, BackupError> {
    let target = conn.target().to_owned();
    let begin = start_rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| protocol(&target, "the backup ended before it started".into()))?
        .unwrap_or_default();
    let start = begin
        .segment(seg)
        .start_lsn(seg)
        .ok_or_else(|| protocol(&target, format!("WAL position {begin} out of range")))?;
    conn.send_query(&format!(
        "START_REPLICATION SLOT {slot} PHYSICAL {start} TIMELINE {}",
        tli.get()
    ))
    .await?;
    match conn.recv().await? {
        Backend::CopyBothResponse => {}
        Backend::Error(m) => {
            return Err(BackupError::Pg(PgError::Server {
                target,
                message: Box::new(m),
            }))
        }
        other => {
            return Err(protocol(
                &target,
                format!("unexpected {other:?} after START_REPLICATION"),
            ))
        }
    }
    let mut asm =
        SegmentAssembler::new(start, tli, seg).map_err(|r| protocol(&target, r.to_string()))?;
    let mut durable = start;
    let mut stored = 0;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if let Some(s) = *stop.borrow() {
            if asm.position() >= s {
                break;
            }
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + WAL_TAIL_TIMEOUT);
        }
        let sleep_until =
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            msg = conn.copy_data() => {
                let Some(data) = msg? else {
                    return Err(protocol(&target, format!("the server ended the WAL stream at {}", asm.position())));
                };
                match parse_message(data).map_err(|r| protocol(&target, r.to_string()))? {
                    WalMessage::XLogData { start, data, .. } => {
                        for s in asm.push(start, &data).map_err(|r| protocol(&target, r.to_string()))? {
                            let name = s.name;
                            crate::archive::summaries::store_summary(&repo, &paths, &name, &s.data).await;
                            repo.store_wal(&paths, &name, s.data).await?;
                            stored += 1;
                            durable = asm.position().segment(seg).start_lsn(seg).unwrap_or(durable);
                        }
                    }
                    WalMessage::Keepalive { reply_requested: true, .. } => {
                        let now = chrono::Utc::now().timestamp_micros();
                        conn.send_copy_data(&status_update(asm.position(), durable, durable, now, false)).await?;
                    }
                    WalMessage::Keepalive { .. } => {}
                }
            }
            _ = stop.changed() => {}
            _ = tokio::time::sleep_until(sleep_until) => {
                return Err(protocol(&target, format!(
                    "the WAL up to the end of the backup did not arrive within {} s (received up to {})",
                    WAL_TAIL_TIMEOUT.as_secs(), asm.position())));
            }
        }
    }
    if let Some(p) = asm.partial() {
        repo.store_wal(&paths, &p.name, p.data).await?;
        stored += 1;
    }
    // the temporary slot goes with the connection
    conn.close().await;
    Ok(stored)
}

/// On a standby, refuse to back up one that has fallen too far behind its
/// primary (the backup would be older than the DBA expects) or follows no
/// primary at all, saying how far behind it is. The lag is the WAL the
/// standby knows its primary has written (the WAL receiver's latest end, or
/// what it received) but has not replayed yet. A server that is no standby,
/// or whose views cannot be read, passes (the latter with a warning).
async fn standby_preflight(params: &ConnParams, max_lag: Option<u64>) -> Result<(), BackupError> {
    // a WAL receiver that is (re)starting gets a moment to connect
    let deadline = tokio::time::Instant::now() + RECEIVER_GRACE;
    loop {
        let Some(state) = standby_state(params).await else {
            return Ok(());
        };
        match check_standby(&params.describe(), &state, max_lag) {
            Err(e) if !state.streaming && tokio::time::Instant::now() < deadline => {
                tracing::debug!("{e}; checking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// How long a standby's WAL receiver may take to (re)connect before the
/// standby counts as following no primary.
const RECEIVER_GRACE: Duration = Duration::from_secs(10);

/// What a standby reports of its replication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StandbyState {
    /// Replayed up to.
    replayed: String,
    /// Where its primary is, as far as it knows.
    primary_end: String,
    /// WAL known to exist but not replayed, bytes.
    lag: u64,
    /// A WAL receiver streams from a primary.
    streaming: bool,
    /// The WAL receiver's state (`None`: there is none).
    receiver: Option<String>,
    /// Seconds since the last replayed commit was made on the primary.
    commit_age: Option<u64>,
}

/// The replication state of the server at `params` when it is a standby;
/// `None` for a primary, or when it cannot be read (logged).
async fn standby_state(params: &ConnParams) -> Option<StandbyState> {
    let mut c = match PgConnection::connect(params, false).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "cannot check the server's replication state ({e}); backing up as it is"
            );
            return None;
        }
    };
    let q = c
        .simple_query(
            "SELECT pg_is_in_recovery()::text AS standby, pg_last_wal_replay_lsn()::text AS replayed, \
             greatest(r.latest_end_lsn, pg_last_wal_receive_lsn())::text AS primary_end, \
             (greatest(r.latest_end_lsn, pg_last_wal_receive_lsn()) - pg_last_wal_replay_lsn())::bigint::text AS lag, \
             r.pid::text AS receiver, r.status, \
             round(extract(epoch from now() - pg_last_xact_replay_timestamp()))::bigint::text AS commit_age \
             FROM (SELECT 1) one LEFT JOIN pg_stat_wal_receiver r ON true",
        )
        .await;
    c.close().await;
    let q = match q {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(
                "cannot read the standby's replication state ({e}); backing up as it is"
            );
            return None;
        }
    };
    let text = |col: &str| q.text(0, col);
    if text("standby").as_deref() != Some("true") {
        return None;
    }
    let status = text("status");
    let state = StandbyState {
        replayed: text("replayed").unwrap_or_default(),
        primary_end: text("primary_end").unwrap_or_default(),
        lag: text("lag").and_then(|l| l.parse().ok()).unwrap_or(0),
        // (a role without pg_read_all_stats sees the receiver's pid only)
        streaming: text("receiver").is_some() && status.as_deref().is_none_or(|s| s == "streaming"),
        receiver: text("receiver").map(|_| status.unwrap_or_else(|| "unknown".into())),
        commit_age: text("commit_age")
            .and_then(|a| a.parse::<i64>().ok())
            .map(|a| a.max(0) as u64),
    };
    tracing::debug!(?state, "backing up a standby");
    Some(state)
}

/// Refuse a standby that follows no primary, or lags it by more than
/// `max_lag` bytes (`None`: any lag), saying how far behind it is.
fn check_standby(target: &str, s: &StandbyState, max_lag: Option<u64>) -> Result<(), BackupError> {
    let Some(max) = max_lag else {
        return Ok(());
    };
    let commit_age = s
        .commit_age
        .map(|a| {
            format!(
                "; its last replayed commit is {} old",
                crate::duration::format_duration(Duration::from_secs(a))
            )
        })
        .unwrap_or_default();
    let off = "pass --standby-max-lag off (or a larger size) to back it up anyway";
    if !s.streaming {
        return Err(BackupError::Standby(format!(
            "{target} is a standby that is not streaming from a primary (WAL receiver: {}); it has replayed up to {}{commit_age}, \
             so a backup of it may be far older than the primary. Fix its replication (primary_conninfo, the primary's pg_hba.conf), \
             back up the primary, or {off}",
            s.receiver.as_deref().unwrap_or("none"),
            s.replayed
        )));
    }
    if s.lag > max {
        return Err(BackupError::Standby(format!(
            "{target} is a standby {} behind its primary: it has replayed up to {}, its primary is at {}{commit_age}; \
             the limit is {} (--standby-max-lag). Wait for it to catch up (is replay paused? see pg_is_wal_replay_paused()), \
             back up the primary, or {off}",
            crate::progress::human_bytes(s.lag),
            s.replayed,
            s.primary_end,
            crate::progress::human_bytes(max),
        )));
    }
    Ok(())
}

/// The relations of one database: one row per relation with storage and
/// per partitioned table (file number 0), with the table it belongs to (an
/// index's table, a TOAST table's owner and its index's, a partition's
/// partitioned table, an owned sequence's table).
const RELATIONS_SQL: &str = "\
WITH toast AS (SELECT reltoastrelid AS toast, oid AS tab FROM pg_class WHERE reltoastrelid <> 0) \
SELECT d.oid AS db, c.oid AS oid, COALESCE(pg_relation_filenode(c.oid), 0) AS f, n.nspname AS schema, \
       c.relname AS name, c.relkind AS kind, \
       COALESCE(t.tab, ti.tab, i.indrelid, \
                (SELECT inh.inhparent FROM pg_inherits inh WHERE c.relispartition AND inh.inhrelid = c.oid), \
                (SELECT dep.refobjid FROM pg_depend dep \
                  WHERE c.relkind = 'S' AND dep.classid = 'pg_class'::regclass AND dep.objid = c.oid \
                    AND dep.refclassid = 'pg_class'::regclass AND dep.deptype IN ('a', 'i') LIMIT 1), \
                0) AS owner \
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
JOIN pg_database d ON d.datname = current_database() \
LEFT JOIN toast t ON t.toast = c.oid \
LEFT JOIN pg_index i ON i.indexrelid = c.oid \
LEFT JOIN toast ti ON ti.toast = i.indrelid \
WHERE (pg_relation_filenode(c.oid) IS NOT NULL OR c.relkind = 'p') AND c.relpersistence <> 't'";

/// Every database's relation files: their names (for `wal-inspect`) and
/// the relation map (for `extract`). Best effort: a role that may not
/// connect to a database leaves it out of the names and marks it
/// incomplete in the map; no connection at all records no map.
async fn relation_names(params: &ConnParams) -> (Vec<RelName>, Option<RelationMap>) {
    let mut names = Vec::new();
    let (dbs, full_page_writes) = match PgConnection::connect(params, false).await {
        Ok(mut c) => {
            let r = c
                .simple_query("SELECT oid, datname, datallowconn FROM pg_database ORDER BY datname")
                .await;
            let fpw = c
                .simple_query("SHOW full_page_writes")
                .await
                .ok()
                .and_then(|r| r.text(0, "full_page_writes"))
                .map(|v| v == "on");
            c.close().await;
            match r {
                Ok(r) => (
                    (0..r.rows.len())
                        .filter_map(|i| {
                            Some((
                                r.text(i, "oid")?.parse::<u32>().ok()?,
                                r.text(i, "datname")?,
                                r.text(i, "datallowconn")? == "t",
                            ))
                        })
                        .collect::<Vec<_>>(),
                    fpw,
                ),
                Err(e) => {
                    tracing::info!("relation names not recorded: {e}");
                    return (names, None);
                }
            }
        }
        Err(e) => {
            tracing::info!("relation names not recorded: {e}");
            return (names, None);
        }
    };
    let mut map = RelationMap {
        full_page_writes,
        databases: Vec::new(),
    };
    for (oid, db, allowed) in dbs {
        let mut rels = DatabaseRelations {
            oid,
            name: db.clone(),
            complete: false,
            relations: Vec::new(),
        };
        let p = ConnParams {
            dbname: Some(db.clone()),
            ..params.clone()
        };
        let conn = if allowed {
            PgConnection::connect(&p, false).await.ok()
        } else {
            None
        };
        if let Some(mut c) = conn {
            if let Ok(r) = c.simple_query(RELATIONS_SQL).await {
                rels.complete = true;
                for i in 0..r.rows.len() {
                    let num = |col: &str| r.text(i, col).and_then(|v| v.parse::<u32>().ok());
                    let (Some(oid), Some(filenode), Some(owner), Some(schema), Some(name)) = (
                        num("oid"),
                        num("f"),
                        num("owner"),
                        r.text(i, "schema"),
                        r.text(i, "name"),
                    ) else {
                        rels.complete = false;
                        continue;
                    };
                    let kind = r
                        .text(i, "kind")
                        .and_then(|k| k.bytes().next())
                        .unwrap_or(b'?');
                    if schema != "pg_catalog" && schema != "information_schema" && filenode != 0 {
                        names.push(RelName {
                            db: rels.oid,
                            relfilenode: filenode,
                            name: format!("{db}.{schema}.{name}"),
                        });
                    }
                    rels.relations.push(Relation {
                        oid,
                        filenode,
                        schema,
                        name,
                        kind,
                        owner,
                    });
                }
            }
            c.close().await;
        }
        map.databases.push(rels);
    }
    (names, Some(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_is_refused_past_its_limit_or_without_a_primary() {
        let s = StandbyState {
            replayed: "0/3000000".into(),
            primary_end: "0/5000000".into(),
            lag: 32 << 20,
            streaming: true,
            receiver: Some("streaming".into()),
            commit_age: Some(90),
        };
        let e = check_standby("db2:5432", &s, Some(16 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("db2:5432 is a standby 32.0 MiB behind its primary")
                && e.contains("0/5000000")
                && e.contains("90s old")
                && e.contains("limit is 16.0 MiB"),
            "{e}"
        );
        assert!(check_standby("db2", &s, Some(32 << 20)).is_ok());
        assert!(check_standby("db2", &s, None).is_ok());
        let orphan = StandbyState {
            streaming: false,
            receiver: None,
            ..s
        };
        let e = check_standby("db2", &orphan, Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not streaming from a primary (WAL receiver: none)"),
            "{e}"
        );
        assert!(check_standby("db2", &orphan, None).is_ok());
    }
}
