//! A whole base backup: WAL streamed over a second replication connection
//! (through a temporary slot, so the server keeps it) from before the
//! backup's checkpoint to its end, the files through BASE_BACKUP, and the
//! manifest — written last, only when files and WAL are durable.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::stream::BaseBackupOptions;
use super::{store_base_backup, BackupError};
use crate::pg::wire::Backend;
use crate::pg::{ConnParams, Lsn, PgConnection, PgError, TimelineId, WalSegSize};
use crate::repo::{
    Manifest, ManifestTotals, PageRef, RelName, Repository, StanzaPaths, Tablespace,
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

    let relnames = relation_names(params).await;
    let mut conn = connect(params).await?;
    let opts = &BaseBackupOptions {
        on_start: Some(Arc::new(start_tx)),
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
        version: crate::repo::MANIFEST_VERSION,
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
    };
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

/// Every database's relation files and names (best effort: a role that may
/// not connect to a database only loses names in `wal-inspect`).
async fn relation_names(params: &ConnParams) -> Vec<RelName> {
    let mut out = Vec::new();
    let dbs = match PgConnection::connect(params, false).await {
        Ok(mut c) => {
            let r = c
                .simple_query("SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
                .await;
            c.close().await;
            match r {
                Ok(r) => (0..r.rows.len())
                    .filter_map(|i| r.text(i, "datname"))
                    .collect::<Vec<String>>(),
                Err(e) => {
                    tracing::info!("relation names not recorded: {e}");
                    return out;
                }
            }
        }
        Err(e) => {
            tracing::info!("relation names not recorded: {e}");
            return out;
        }
    };
    for db in dbs {
        let p = ConnParams {
            dbname: Some(db.clone()),
            ..params.clone()
        };
        let Ok(mut c) = PgConnection::connect(&p, false).await else {
            continue;
        };
        let q = "SELECT d.oid AS db, pg_relation_filenode(c.oid) AS f, \
                 current_database() || '.' || n.nspname || '.' || c.relname AS name \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, pg_database d \
                 WHERE d.datname = current_database() AND pg_relation_filenode(c.oid) IS NOT NULL \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema')";
        if let Ok(r) = c.simple_query(q).await {
            for i in 0..r.rows.len() {
                let (Some(d), Some(f), Some(name)) =
                    (r.text(i, "db"), r.text(i, "f"), r.text(i, "name"))
                else {
                    continue;
                };
                if let (Ok(db), Ok(relfilenode)) = (d.parse(), f.parse()) {
                    out.push(RelName {
                        db,
                        relfilenode,
                        name,
                    });
                }
            }
        }
        c.close().await;
    }
    out
}
