//! `walvault extract`: one table (or one database) as of a moment, without
//! recovering the whole cluster.
//!
//! The backup's relation map ([`RelationMap`], recorded with every backup)
//! says which files belong to which relation. A *sparse recovery* restores
//! only what recovery and `pg_dump` read — everything outside the database
//! directories, the chosen database's system catalogs, and the table with
//! its TOAST table, indexes and owned sequences — and creates every other
//! relation file as a hole of its size. That is safe because recovery
//! starts at the backup's checkpoint and, with `full_page_writes`, the first
//! change of every page after it carries a full image of the page: a page
//! of another relation that WAL touches is rebuilt from that image, and the
//! others are never read (decision 035).
//!
//! Then PostgreSQL replays to the target in a scratch directory on a
//! private socket, `pg_amcheck` checks the table, and `pg_dump` writes it to
//! a file or, through `pg_restore`, into a live server under a new name.
//! The scratch directory is removed whatever happens.
//!
//! Everything that can be checked before a byte is downloaded is: the
//! target's reachability (the recovery plan), the database and the table in
//! the relation map, `full_page_writes` when the backup was taken and, from
//! the WAL summaries, in the WAL replayed; the client tools of the backup's
//! major, the `--into` server and the free name there, the output file.
//!
//! The summaries also name the relation files that commits before the
//! target dropped (`DROP`, and the rewrites `TRUNCATE`, `VACUUM FULL`,
//! `CLUSTER`): nothing reads them after the commit, so they are holes too,
//! and when one is the table's, the plan says so with the transaction to
//! stop before.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::scratch::{self, quote, tail, Scratch};
use super::OpsError;
use crate::pg::Lsn;
use crate::pg::{ConnParams, PgConnection};
use crate::repo::{DatabaseRelations, FileKind, Manifest, RelationMap, Repository, StanzaPaths};
use crate::restore::pitr::{locate, Target, TimelineChoice};
use crate::restore::recover::EventSink;
use crate::restore::recovery::TargetAction;
use crate::restore::server::{self, ServerOptions};
use crate::restore::{plan_recovery, recover, RecoverOptions, RecoveryPlan, RecoveryReport};

/// OIDs below this were assigned by `initdb`: the system catalogs (and
/// `information_schema`), which recovery and `pg_dump` read.
const FIRST_NORMAL_OID: u32 = 16384;

/// What to extract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// One table, `schema.name`.
    Table {
        /// Its schema.
        schema: String,
        /// Its name.
        name: String,
    },
    /// The whole database.
    Database,
}

/// Where the result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A `pg_dump` SQL script in this file (written whole, then renamed).
    File(PathBuf),
    /// Into a live server (`pg_restore`), as a new table named `name` in
    /// the table's schema; the original is never touched.
    Into {
        /// Connection string of the live database.
        conninfo: String,
        /// The new table's name.
        name: String,
    },
}

/// How to extract.
#[derive(Clone)]
pub struct ExtractOptions {
    /// The database.
    pub database: String,
    /// The table, or all of the database.
    pub what: What,
    /// The moment.
    pub target: Target,
    /// Stop just before the target.
    pub exclusive: bool,
    /// The backup to start from (default: the newest that reaches the target).
    pub backup: Option<String>,
    /// Where the result goes.
    pub destination: Destination,
    /// Directory the scratch directory is made in.
    pub scratch: PathBuf,
    /// Directory of the server binaries (default: by the backup's major).
    pub pg_bin: Option<PathBuf>,
    /// OS user PostgreSQL runs as when running as root.
    pub run_as: Option<String>,
    /// Role `pg_dump` connects as on the scratch server.
    pub user: String,
    /// The `restore_command` the recovered server runs.
    pub restore_command: String,
    /// Plan and check, download nothing.
    pub dry_run: bool,
    /// Leave the scratch directory (stopped) for inspection.
    pub keep: bool,
    /// Receives the recovery's steps.
    pub events: Option<EventSink>,
}

/// What an extract will do, decided before anything is downloaded.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractPlan {
    /// The backup restored.
    pub backup: String,
    /// The target, in words.
    pub target: String,
    /// The database.
    pub database: String,
    /// `schema.table`, or none for the whole database.
    pub table: Option<String>,
    /// Files whose contents are downloaded, and their bytes.
    pub fetch_files: usize,
    /// Their bytes.
    pub fetch_bytes: u64,
    /// Files created as holes.
    pub sparse_files: usize,
    /// Their bytes.
    pub sparse_bytes: u64,
    /// WAL files to replay.
    pub wal_files: usize,
    /// Their bytes.
    pub wal_bytes: u64,
    /// Estimated time, seconds.
    pub estimated_seconds: f64,
    /// Why the target is reachable.
    pub reachable: String,
    /// What the plan had to assume.
    pub notes: Vec<String>,
    /// When the table's file was dropped before the target (a `DROP`, or
    /// a rewrite), the commit that did it.
    pub table_file_dropped: Option<DroppedBy>,
    /// Filenodes of the database dropped before the target.
    #[serde(skip)]
    pub dropped_filenodes: HashSet<u32>,
}

/// A commit that dropped relation files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DroppedBy {
    /// Its transaction.
    pub xid: u32,
    /// When it committed (RFC 3339).
    pub time: String,
    /// Where its commit record is.
    pub lsn: Lsn,
}

/// What the summaries of the WAL replayed say, read before anything is
/// downloaded.
#[derive(Debug, Default)]
struct WalFacts {
    /// The first record saying `full_page_writes` is off, between the
    /// backup's start and the target.
    fpw_off: Option<Lsn>,
    /// Segments whose summaries do not record `full_page_writes` (written
    /// by a walvault before it did).
    unchecked: usize,
    /// Relation files (database, filenode) that transaction ends before the
    /// target dropped, with the commit.
    dropped: HashMap<(u32, u32), DroppedBy>,
}

/// Read the summaries of the WAL the recovery replays.
async fn wal_facts(
    repo: &Repository,
    stanza: &str,
    rp: &RecoveryPlan,
    exclusive: bool,
) -> Result<WalFacts, OpsError> {
    let p = &rp.plan;
    let sums =
        crate::archive::summaries::load_path(repo, &StanzaPaths::new(stanza), &p.segments, 16)
            .await
            .map_err(|e| refuse(format!("reading the WAL summaries: {e}")))?;
    // where replay stops, and whether the record there is applied
    let stop: Option<(Lsn, bool)> = match &p.target {
        Target::Latest => None,
        Target::Immediate => Some((p.backup.stop_lsn, false)),
        Target::Lsn(l) => Some((*l, false)),
        t => locate(t, exclusive, &sums)
            .ok()
            .and_then(|r| r.record_lsn)
            .map(|l| (l, matches!(t, Target::Xid(_)) && !exclusive)),
    };
    let applied = |lsn: Lsn| match stop {
        None => true,
        Some((s, inclusive)) => lsn < s || (inclusive && lsn == s),
    };
    let mut facts = WalFacts::default();
    for s in &sums {
        match &s.fpw_off {
            None => facts.unchecked += 1,
            Some(off) => {
                if facts.fpw_off.is_none() {
                    facts.fpw_off = off
                        .iter()
                        .copied()
                        .find(|l| *l >= p.backup.start_lsn && applied(*l));
                }
            }
        }
        // (from the backup's start: a number dropped earlier may name
        // another relation's file in the backup by now)
        for x in s
            .xacts
            .iter()
            .filter(|x| x.lsn >= p.backup.start_lsn && applied(x.lsn))
        {
            for f in &x.xact.dropped {
                facts
                    .dropped
                    .entry((f.db, f.rel))
                    .or_insert_with(|| DroppedBy {
                        xid: x.xact.xid,
                        time: crate::wal::records::pg_time(x.xact.time)
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default(),
                        lsn: x.lsn,
                    });
            }
        }
    }
    Ok(facts)
}

/// What an extract did.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractReport {
    /// The plan it carried out.
    pub plan: ExtractPlan,
    /// The recovery (`None` for a dry run).
    pub recovery: Option<RecoveryReport>,
    /// Bytes read from the repository: file contents and WAL.
    pub downloaded_bytes: u64,
    /// Rows of the table at the target (a table extract).
    pub rows: Option<i64>,
    /// `pg_amcheck` on the table and its indexes: what it found, or why
    /// it did not run.
    pub amcheck: Option<String>,
    /// The file written, or the table created (`schema.name`).
    pub output: Option<String>,
    /// Bytes of the dump.
    pub dump_bytes: Option<u64>,
    /// Seconds spent in `pg_dump` (and `pg_restore`).
    pub dump_seconds: Option<f64>,
    /// The whole extract, seconds.
    pub total_seconds: f64,
}

fn refuse(msg: impl Into<String>) -> OpsError {
    OpsError::Extract(msg.into())
}

/// Plan an extract: everything checked, nothing downloaded.
pub async fn plan_extract(
    repo: &Repository,
    stanza: &str,
    opts: &ExtractOptions,
) -> Result<(RecoveryPlan, ExtractPlan, Arc<HashSet<String>>), OpsError> {
    let rp = plan_recovery(
        repo,
        stanza,
        &opts.target,
        opts.exclusive,
        TimelineChoice::Latest,
        opts.backup.as_deref(),
    )
    .await
    .map_err(|e| refuse(e.to_string()))?;
    let m = &rp.plan.backup;
    let mut notes = Vec::new();
    let wal = wal_facts(repo, stanza, &rp, opts.exclusive).await?;
    if let Some(at) = wal.fpw_off {
        return Err(refuse(format!(
            "full_page_writes was off at {at}, in the WAL between backup {} and the target: pages changed then may have no full image, so a sparse recovery is not safe; recover the whole cluster with restore-pitr, or choose a target before {at}",
            m.id
        )));
    }
    if wal.unchecked > 0 {
        notes.push(format!(
            "{} of the {} WAL files were summarized by an older walvault that did not record full_page_writes: a change to off there is not detected before replay",
            wal.unchecked,
            rp.plan.segments.len()
        ));
    }
    let mut table_file_dropped = None;
    let mut dropped_filenodes = HashSet::new();
    let keep = match &m.relations {
        None => {
            notes.push(format!(
                "backup {} has no relation map (taken by an older walvault, or walvault could not read the catalogs): every file is downloaded",
                m.id
            ));
            None
        }
        Some(map) => {
            let sel = select(repo, stanza, m, map, opts, &wal, &mut notes).await?;
            table_file_dropped = sel.table_file_dropped.clone();
            dropped_filenodes = sel.dropped.clone();
            Some(sel)
        }
    };
    let mut fetch = HashSet::new();
    let (mut fetch_bytes, mut sparse_files, mut sparse_bytes) = (0u64, 0usize, 0u64);
    let (mut dropped_files, mut dropped_bytes) = (0usize, 0u64);
    for f in m.files.iter().filter(|f| f.kind == FileKind::File) {
        let wanted = match &keep {
            None => Wanted::Yes,
            Some(k) => k.wants(&f.path),
        };
        if wanted == Wanted::Yes {
            fetch.insert(f.path.clone());
            fetch_bytes += f.size;
        } else {
            sparse_files += 1;
            sparse_bytes += f.size;
            if wanted == Wanted::Dropped {
                dropped_files += 1;
                dropped_bytes += f.size;
            }
        }
    }
    if dropped_files > 0 {
        notes.push(format!(
            "{dropped_files} file(s), {}, of the database were dropped before the target (DROP, TRUNCATE, VACUUM FULL, CLUSTER): not downloaded, nothing reads them after",
            crate::progress::human_bytes(dropped_bytes)
        ));
    }
    let estimate = rp.rates.estimate(fetch_bytes, rp.plan.wal_bytes());
    let plan = ExtractPlan {
        backup: m.id.clone(),
        target: rp.plan.target.to_string(),
        database: opts.database.clone(),
        table: match &opts.what {
            What::Table { schema, name } => Some(format!("{schema}.{name}")),
            What::Database => None,
        },
        fetch_files: fetch.len(),
        fetch_bytes,
        sparse_files,
        sparse_bytes,
        wal_files: rp.plan.segments.len(),
        wal_bytes: rp.plan.wal_bytes(),
        estimated_seconds: estimate,
        reachable: format!(
            "backup {} is consistent at {} and every WAL file from it to the target on timeline {} is in the repository",
            m.id, m.stop_lsn, rp.plan.timeline
        ),
        notes,
        table_file_dropped,
        dropped_filenodes,
    };
    Ok((rp, plan, Arc::new(fetch)))
}

/// What of a database is extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// All of it.
    Database,
    /// The table with this OID in the backup (`None`: created after it,
    /// so built from the WAL alone).
    Table(Option<u32>),
}

/// Which files of a backup a sparse recovery reads.
#[derive(Debug, Clone)]
struct Selection {
    /// The database's OID.
    db: u32,
    /// Every file of the database is read (a database extract, or a map
    /// that could not list it).
    whole: bool,
    /// Filenodes of the database read.
    keep: HashSet<u32>,
    /// Filenodes the map knows (the others, unknown, are read).
    known: HashSet<u32>,
    /// Filenodes of the database dropped before the target: never read.
    dropped: HashSet<u32>,
    /// When the table's own file is one of them, the commit.
    table_file_dropped: Option<DroppedBy>,
}

/// Whether a file's contents are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// Downloaded.
    Yes,
    /// A hole: another relation.
    No,
    /// A hole: dropped before the target.
    Dropped,
}

impl Selection {
    /// The files of `db` a recovery for `scope` reads; `dropped` are the
    /// files commits before the target dropped (database, filenode).
    fn of(
        db: &DatabaseRelations,
        scope: Scope,
        dropped: &HashMap<(u32, u32), DroppedBy>,
    ) -> Selection {
        let (whole, table) = match scope {
            Scope::Database => (true, None),
            Scope::Table(t) => (!db.complete, t),
        };
        let mine = table.map(|t| db.with_dependents(t)).unwrap_or_default();
        let keep = db
            .relations
            .iter()
            // every sequence too: one page each, and pg_dump 18 reads
            // them all whatever it dumps
            .filter(|r| r.oid < FIRST_NORMAL_OID || r.kind == b'S' || mine.contains(&r.oid))
            .map(|r| r.filenode)
            .collect();
        let table_file_dropped = match scope {
            Scope::Table(Some(t)) => db
                .relations
                .iter()
                .find(|r| r.oid == t)
                .and_then(|r| dropped.get(&(db.oid, r.filenode)))
                .cloned(),
            _ => None,
        };
        Selection {
            db: db.oid,
            whole,
            keep,
            known: db.relations.iter().map(|r| r.filenode).collect(),
            dropped: dropped
                .keys()
                .filter(|(d, _)| *d == db.oid)
                .map(|(_, f)| *f)
                .collect(),
            table_file_dropped,
        }
    }

    /// Whether the contents of `path` (as in the manifest) are read.
    fn wants(&self, path: &str) -> Wanted {
        let Some((db, name)) = database_file(path) else {
            // global/, pg_xact/, pg_multixact/, …: recovery needs them
            return Wanted::Yes;
        };
        let Some((filenode, fork)) = relation_file(name) else {
            // PG_VERSION, pg_filenode.map
            return Wanted::Yes;
        };
        if fork == "init" {
            // an unlogged relation's init fork becomes its main fork at
            // the end of recovery: tiny, always read
            return Wanted::Yes;
        }
        if db != self.db {
            return Wanted::No;
        }
        if self.dropped.contains(&filenode) {
            // replay unlinks it at the commit; before, only WAL with full
            // page images touches it, as any hole
            return Wanted::Dropped;
        }
        if self.whole || self.keep.contains(&filenode) || !self.known.contains(&filenode) {
            Wanted::Yes
        } else {
            Wanted::No
        }
    }
}

/// The database OID and file name of a file in a database directory
/// (`base/<db>/<name>`, `pg_tblspc/<ts>/<version dir>/<db>/<name>`).
fn database_file(path: &str) -> Option<(u32, &str)> {
    let parts: Vec<&str> = path.split('/').collect();
    let (db, name) = match parts.as_slice() {
        ["base", db, name] => (db, name),
        ["pg_tblspc", _, _, db, name] => (db, name),
        _ => return None,
    };
    Some((db.parse().ok()?, name))
}

/// A relation file's filenode and fork (`""`, `fsm`, `vm`, `init`):
/// `16384`, `16384.2`, `16384_vm`.
fn relation_file(name: &str) -> Option<(u32, &str)> {
    let base = match name.split_once('.') {
        Some((b, seg)) if !seg.is_empty() && seg.bytes().all(|c| c.is_ascii_digit()) => b,
        Some(_) => return None,
        None => name,
    };
    let (num, fork) = match base.split_once('_') {
        Some((n, f)) if matches!(f, "fsm" | "vm" | "init") => (n, f),
        Some(_) => return None,
        None => (base, ""),
    };
    if num.is_empty() || !num.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((num.parse().ok()?, fork))
}

/// Check the database and the table against the map and choose the files.
async fn select(
    repo: &Repository,
    stanza: &str,
    m: &Manifest,
    map: &RelationMap,
    opts: &ExtractOptions,
    wal: &WalFacts,
    notes: &mut Vec<String>,
) -> Result<Selection, OpsError> {
    if map.full_page_writes == Some(false) {
        return Err(refuse(format!(
            "full_page_writes was off when backup {} was taken: pages the WAL changes may have no full image, so a sparse recovery is not safe; recover the whole cluster with restore-pitr",
            m.id
        )));
    }
    let Some(db) = map.database(&opts.database) else {
        let names: Vec<&str> = map
            .databases
            .iter()
            .map(|d| d.name.as_str())
            .filter(|n| *n != "template0")
            .collect();
        return Err(refuse(format!(
            "there is no database {:?} in backup {} (its databases: {})",
            opts.database,
            m.id,
            names.join(", ")
        )));
    };
    if !db.complete {
        notes.push(format!(
            "walvault could not list database {}'s relations when backup {} was taken: all of its files are downloaded",
            db.name, m.id
        ));
    }
    let scope = match &opts.what {
        What::Database => Scope::Database,
        What::Table { schema, name } => match db.table(schema, name) {
            Some(t) => Scope::Table(Some(t.oid)),
            None if !db.complete => Scope::Table(None),
            None => {
                // created after the backup? then a later backup knows it,
                // and recovery builds it from the WAL alone
                if later_backup_knows(repo, stanza, m, &db.name, schema, name).await? {
                    notes.push(format!(
                        "{schema}.{name} did not exist when backup {} was taken: recovery builds it from the WAL; walvault checks that it exists at the target",
                        m.id
                    ));
                    Scope::Table(None)
                } else {
                    return Err(refuse(format!(
                        "there is no table {schema}.{name} in database {} in backup {} nor in any later backup{}",
                        db.name,
                        m.id,
                        similar(db, name)
                    )));
                }
            }
        },
    };
    let sel = Selection::of(db, scope, &wal.dropped);
    if let (Some(d), What::Table { schema, name }) = (&sel.table_file_dropped, &opts.what) {
        notes.push(format!(
            "{schema}.{name}'s file was dropped at {} by transaction {} (DROP TABLE, or a rewrite: TRUNCATE, VACUUM FULL, CLUSTER, ALTER TABLE): after a rewrite recovery builds the new file from the WAL; if the table was dropped, it is gone at the target: stop before with --target-xid {} --exclusive",
            d.time,
            d.xid,
            d.xid
        ));
    }
    Ok(sel)
}

/// Whether a backup after `m` lists table `schema.name` in `db`.
async fn later_backup_knows(
    repo: &Repository,
    stanza: &str,
    m: &Manifest,
    db: &str,
    schema: &str,
    name: &str,
) -> Result<bool, OpsError> {
    let paths = StanzaPaths::new(stanza);
    for id in Manifest::list_ids(repo, &paths).await? {
        if id.as_str() <= m.id.as_str() {
            continue;
        }
        let later = Manifest::load(repo, &paths, &id).await?;
        let knows = later
            .relations
            .as_ref()
            .and_then(|r| r.database(db))
            .is_some_and(|d| d.table(schema, name).is_some());
        if knows {
            return Ok(true);
        }
    }
    Ok(false)
}

/// " (tables with similar names: …)" or nothing.
fn similar(db: &DatabaseRelations, name: &str) -> String {
    let lower = name.to_lowercase();
    let mut like: Vec<String> = db
        .relations
        .iter()
        .filter(|r| matches!(r.kind, b'r' | b'p') && r.oid >= FIRST_NORMAL_OID)
        .filter(|r| {
            let n = r.name.to_lowercase();
            n.contains(&lower) || lower.contains(&n) || distance(&n, &lower) <= 2
        })
        .map(|r| format!("{}.{}", r.schema, r.name))
        .collect();
    like.sort();
    like.truncate(5);
    if like.is_empty() {
        String::new()
    } else {
        format!(" (tables with similar names: {})", like.join(", "))
    }
}

/// Edits (insertions, deletions, substitutions) between `a` and `b`.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Run an extract: plan, check, sparse recovery, dump, clean up.
pub async fn extract(
    repo: Arc<Repository>,
    stanza: &str,
    opts: &ExtractOptions,
) -> Result<ExtractReport, OpsError> {
    let started = Instant::now();
    let (rp, plan, fetch) = plan_extract(&repo, stanza, opts).await?;
    let m = &rp.plan.backup;
    let tools = tools(m, opts)?;
    preflight(opts).await?;
    let mut report = ExtractReport {
        plan,
        recovery: None,
        downloaded_bytes: 0,
        rows: None,
        amcheck: None,
        output: None,
        dump_bytes: None,
        dump_seconds: None,
        total_seconds: 0.0,
    };
    if opts.dry_run {
        report.total_seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let owner = scratch::owner(opts.run_as.as_deref()).map_err(OpsError::Extract)?;
    let interrupted = scratch::on_interrupt();
    let scratch =
        Scratch::make(&opts.scratch, "walvault-extract-", owner).map_err(OpsError::Extract)?;
    // the other relations are holes: nothing may read them
    let quiet = [("autovacuum".to_owned(), "off".to_owned())];
    let sopts = match scratch.server_options(
        m,
        Some(tools.server.clone()),
        opts.run_as.as_deref(),
        owner,
        &quiet,
    ) {
        Ok(s) => s,
        Err(e) => {
            scratch.remove();
            return Err(OpsError::Extract(e));
        }
    };
    let work = run(
        &repo,
        stanza,
        opts,
        &rp,
        fetch,
        &scratch,
        &sopts,
        &tools,
        &mut report,
        started,
    );
    let (outcome, stopped_by) = tokio::select! {
        r = work => (r, None),
        sig = interrupted => (Err(refuse(format!("interrupted by {sig}"))), Some(sig)),
    };
    // whatever happened, no server is left running and nothing is left
    // behind (unless asked to keep it)
    let pid = scratch.pgdata.join("postmaster.pid");
    if pid.exists() && (!opts.keep || stopped_by.is_some()) {
        // the directory is removed next: no shutdown checkpoint (it would
        // write every page replay dirtied, holes included)
        let _ = server::stop_with(&scratch.pgdata, &sopts, "immediate").await;
    }
    if pid.exists() {
        if let Err(e) = server::stop(&scratch.pgdata, &sopts).await {
            tracing::warn!(
                "extract: stopping the scratch server failed ({e}); stopping it immediately"
            );
            let _ = server::stop_with(&scratch.pgdata, &sopts, "immediate").await;
        }
    }
    if pid.exists() {
        let e = format!(
            "the scratch server on {} could not be stopped: stop it (pg_ctl -D {} stop -m immediate) and remove {}",
            scratch.pgdata.display(),
            scratch.pgdata.display(),
            scratch.root.display()
        );
        return Err(match outcome {
            Err(first) => refuse(format!("{first}; {e}")),
            Ok(()) => refuse(e),
        });
    }
    if opts.keep && stopped_by.is_none() {
        tracing::info!(
            "extract: scratch directory kept: {}",
            scratch.root.display()
        );
    } else {
        scratch.remove();
    }
    if let Some(sig) = stopped_by {
        return Err(refuse(format!(
            "interrupted by {sig}: the scratch server was stopped and {} removed",
            scratch.root.display()
        )));
    }
    outcome?;
    report.total_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The programs an extract runs: the server of the backup's major, and
/// client programs of that major or newer (a newer `pg_dump` dumps an
/// older server; the npm builds of some majors have none of their own).
#[derive(Debug, Clone)]
struct Tools {
    /// `postgres` and `pg_ctl`.
    server: PathBuf,
    pg_dump: PathBuf,
    pg_restore: Option<PathBuf>,
    /// PostgreSQL 14+ servers only.
    pg_amcheck: Option<PathBuf>,
}

/// `program` in `first`, else in Debian's directories of `major` or
/// newer (the newest first).
fn client_program(program: &str, first: &Path, major: u32) -> Option<PathBuf> {
    if first.join(program).is_file() {
        return Some(first.join(program));
    }
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|m| *m >= major)
        .collect();
    majors.sort_unstable_by(|a, b| b.cmp(a));
    majors
        .into_iter()
        .map(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin/{program}")))
        .find(|p| p.is_file())
}

/// Find the programs before anything is downloaded.
fn tools(m: &Manifest, opts: &ExtractOptions) -> Result<Tools, OpsError> {
    let major = if m.pg_version >= 100_000 {
        m.pg_version / 10_000
    } else {
        m.pg_version / 100
    };
    let server = opts
        .pg_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")));
    let into = matches!(opts.destination, Destination::Into { .. });
    let mut missing: Vec<&str> = ["postgres", "pg_ctl"]
        .into_iter()
        .filter(|p| !server.join(p).is_file())
        .collect();
    let pg_dump = client_program("pg_dump", &server, major);
    let pg_restore = client_program("pg_restore", &server, major);
    if pg_dump.is_none() {
        missing.push("pg_dump");
    }
    if into && pg_restore.is_none() {
        missing.push("pg_restore");
    }
    if !missing.is_empty() {
        return Err(refuse(format!(
            "{} of PostgreSQL {major} (backup {}'s major; client programs may be newer) not found in {} nor in /usr/lib/postgresql: install them (apt-get install postgresql-{major}) or give their directory with --pg-bin",
            missing.join(", "),
            m.id,
            server.display()
        )));
    }
    Ok(Tools {
        pg_amcheck: if major >= 14 {
            client_program("pg_amcheck", &server, major)
        } else {
            None
        },
        pg_dump: pg_dump.unwrap_or_default(),
        pg_restore,
        server,
    })
}

/// Checks of the destination before anything is downloaded: the output
/// file can be written and does not exist; the live server answers, the
/// table's schema exists there and the new name is free.
async fn preflight(opts: &ExtractOptions) -> Result<(), OpsError> {
    match &opts.destination {
        Destination::File(path) => {
            if path.exists() {
                return Err(refuse(format!(
                    "{} exists: give a new file (extract never overwrites one)",
                    path.display()
                )));
            }
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                _ => PathBuf::from("."),
            };
            if !dir.is_dir() {
                return Err(refuse(format!(
                    "cannot write {}: {} is not a directory",
                    path.display(),
                    dir.display()
                )));
            }
            // the file is written at the end: find out now that it can be
            let mut probe = path.as_os_str().to_owned();
            probe.push(".partial");
            std::fs::File::create(&probe)
                .and_then(|_| std::fs::remove_file(&probe))
                .map_err(|e| refuse(format!("cannot write {}: {e}", path.display())))?;
        }
        Destination::Into { conninfo, name } => {
            let What::Table { schema, .. } = &opts.what else {
                return Err(refuse(
                    "--into restores one table (with --table); write a whole database to a file with --output",
                ));
            };
            let params = ConnParams::parse(conninfo).map_err(|e| refuse(format!("--into: {e}")))?;
            let mut c = PgConnection::connect(&params, false).await.map_err(|e| {
                refuse(format!(
                    "cannot connect to the --into server ({e}); nothing was downloaded"
                ))
            })?;
            let q = format!(
                "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = {s}) AS schema, \
                 to_regclass({full}) IS NOT NULL AS taken, current_database() AS db",
                s = literal(schema),
                full = literal(&format!("{}.{}", ident(schema), ident(name)))
            );
            let r = c.simple_query(&q).await;
            c.close().await;
            let r = r.map_err(|e| refuse(format!("--into: {e}")))?;
            if r.text(0, "schema").as_deref() != Some("1") {
                return Err(refuse(format!(
                    "schema {schema} does not exist in database {} of the --into server: create it first",
                    r.text(0, "db").unwrap_or_default()
                )));
            }
            if r.text(0, "taken").as_deref() == Some("t") {
                return Err(refuse(format!(
                    "{schema}.{name} already exists in database {} of the --into server: choose another name with --as",
                    r.text(0, "db").unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// Recover, check, dump.
#[allow(clippy::too_many_arguments)]
async fn run(
    repo: &Arc<Repository>,
    stanza: &str,
    opts: &ExtractOptions,
    rp: &RecoveryPlan,
    fetch: Arc<HashSet<String>>,
    scratch: &Scratch,
    sopts: &ServerOptions,
    tools: &Tools,
    report: &mut ExtractReport,
    started: Instant,
) -> Result<(), OpsError> {
    let ropts = RecoverOptions {
        pgdata: scratch.pgdata.clone(),
        restore_command: opts.restore_command.clone(),
        archive_off: true,
        target_action: TargetAction::Promote,
        server: Some(sopts.clone()),
        events: opts.events.clone(),
        // it runs next to production: no quarter of the machine's memory
        no_tuning: true,
        fetch_only: Some(fetch.clone()),
        tablespace_map: scratch.tablespaces(&rp.plan.backup),
        ..Default::default()
    };
    let rec = recover(repo.clone(), stanza, rp, &ropts, started)
        .await
        .map_err(|e| refuse(format!("the sparse recovery failed: {e}")))?;
    report.downloaded_bytes = rec.restore_fetched_bytes + rec.wal_bytes_fetched;
    report.recovery = Some(rec);

    let info = format!(
        "host='{}' port={} user='{}' dbname='{}'",
        quote(&scratch.sock.display().to_string()),
        scratch.port,
        quote(&opts.user),
        quote(&opts.database)
    );
    let params = ConnParams::parse(&info).map_err(|e| refuse(e.to_string()))?;
    let mut c = PgConnection::connect(&params, false)
        .await
        .map_err(|e| refuse(format!("cannot connect to the recovered server: {e}")))?;
    let client = Client {
        tools,
        log: scratch.pgdata.join("walvault-recovery.log"),
        sock: &scratch.sock,
        port: scratch.port,
        user: &opts.user,
        database: &opts.database,
    };
    match &opts.what {
        What::Database => {}
        What::Table { schema, name } => {
            let full = format!("{}.{}", ident(schema), ident(name));
            let files = table_files(&mut c, schema, name).await?;
            let Some(files) = files else {
                c.close().await;
                return Err(refuse(match &report.plan.table_file_dropped {
                    Some(d) => format!(
                        "there was no table {schema}.{name} in database {} at the target: transaction {} dropped it at {}; extract with --target-xid {} --exclusive",
                        opts.database, d.xid, d.time, d.xid
                    ),
                    None => format!(
                        "there was no table {schema}.{name} in database {} at the target ({}); wal-inspect shows when it was created or dropped",
                        opts.database, report.plan.target
                    ),
                }));
            };
            // the map said which files are this table's; the recovered
            // catalogs say so too, or the result would be holes
            let db_oid = rp
                .plan
                .backup
                .relations
                .as_ref()
                .and_then(|r| r.database(&opts.database))
                .map(|d| d.oid);
            // a number dropped before the target and used again is a new
            // file built from the WAL, whatever the backup held under it
            let dropped = &report.plan.dropped_filenodes;
            for f in files.iter().filter(|f| !dropped.contains(f)) {
                let sparse = rp.plan.backup.files.iter().any(|b| {
                    !fetch.contains(&b.path)
                        && b.kind == FileKind::File
                        && database_file(&b.path).is_some_and(|(d, n)| {
                            Some(d) == db_oid
                                && relation_file(n).is_some_and(|(node, _)| node == *f)
                        })
                });
                if sparse {
                    c.close().await;
                    return Err(refuse(format!(
                        "file {f} of {schema}.{name} at the target was not restored (the backup's relation map named another relation for it); recover the whole cluster with restore-pitr"
                    )));
                }
            }
            let r = c
                .simple_query(&format!("SELECT count(*) AS n FROM {full}"))
                .await
                .map_err(|e| refuse(format!("reading {schema}.{name}: {e}")))?;
            report.rows = r.text(0, "n").and_then(|n| n.parse().ok());
        }
    }
    let tree = match &opts.what {
        What::Table { schema, name } => members(&mut c, schema, name).await?,
        What::Database => Vec::new(),
    };
    let t = Instant::now();
    match (&opts.destination, &opts.what) {
        (Destination::File(path), What::Database) => {
            report.dump_bytes = Some(client.dump_to_file(None, path).await?);
            report.output = Some(path.display().to_string());
        }
        (Destination::File(path), What::Table { schema, name }) => {
            // the check and the dump read the table side by side (two
            // cores); a damaged table takes its file away again
            let (checked, dumped) = tokio::join!(
                client.amcheck(&mut c, schema, name, &tree),
                client.dump_to_file(Some(&tree), path)
            );
            match (checked, dumped) {
                (Ok(a), Ok(bytes)) => {
                    report.amcheck = Some(a);
                    report.dump_bytes = Some(bytes);
                    report.output = Some(path.display().to_string());
                }
                (Err(e), dumped) => {
                    if dumped.is_ok() {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(e);
                }
                (Ok(_), Err(e)) => return Err(e),
            }
        }
        (
            Destination::Into {
                conninfo,
                name: new,
            },
            What::Table { schema, name },
        ) => {
            // checked before anything reaches the live server
            report.amcheck = Some(client.amcheck(&mut c, schema, name, &tree).await?);
            let stamp = suffix_of(new, name);
            let renamed = rename_for_restore(&mut c, &tree, new, &stamp).await?;
            client.dump_into(&renamed, conninfo).await?;
            report.output = Some(format!("{schema}.{new}"));
        }
        (Destination::Into { .. }, What::Database) => {
            return Err(refuse("--into restores one table (with --table)"));
        }
    }
    c.close().await;
    report.dump_seconds = Some(t.elapsed().as_secs_f64());
    Ok(())
}

/// The filenodes of table `schema.name` (a partitioned table's: of every
/// partition), its TOAST table and their indexes on the recovered server;
/// `None` when there is no such table.
async fn table_files(
    c: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<Option<Vec<u32>>, OpsError> {
    let q = format!(
        "WITH root AS (SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                    WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p', 'm')), \
              t AS (SELECT c.oid, c.reltoastrelid FROM pg_class c WHERE c.relkind IN ('r', 'm') \
                    AND (c.oid IN (SELECT oid FROM root) \
                         OR c.oid IN (SELECT p.relid FROM root, pg_partition_tree(root.oid) p))), \
              rels AS (SELECT oid FROM t UNION ALL SELECT reltoastrelid FROM t WHERE reltoastrelid <> 0), \
              all_rels AS (SELECT oid FROM rels UNION ALL SELECT indexrelid FROM pg_index WHERE indrelid IN (SELECT oid FROM rels)) \
         SELECT (SELECT count(*) FROM root) AS found, f \
           FROM (SELECT 1) one LEFT JOIN (SELECT pg_relation_filenode(oid) AS f FROM all_rels) x ON true",
        literal(schema),
        literal(name)
    );
    let r = c
        .simple_query(&q)
        .await
        .map_err(|e| refuse(format!("reading the recovered catalogs: {e}")))?;
    if r.rows.is_empty() || r.text(0, "found").as_deref() == Some("0") {
        return Ok(None);
    }
    Ok(Some(
        (0..r.rows.len())
            .filter_map(|i| r.text(i, "f").and_then(|f| f.parse().ok()))
            .collect(),
    ))
}

/// The part of the new name after the table's name (`_restored_1402`),
/// given to its indexes and sequences too so they do not collide with the
/// original's.
fn suffix_of(new: &str, table: &str) -> String {
    match new.strip_prefix(table) {
        Some(rest) if !rest.is_empty() => rest.to_owned(),
        _ => format!("_{new}"),
    }
}

/// `name` with `suffix`, cut to PostgreSQL's 63 bytes (at a character
/// boundary).
fn with_suffix(name: &str, suffix: &str) -> String {
    let mut base = name.to_owned();
    while base.len() + suffix.len() > 63 && !base.is_empty() {
        base.pop();
    }
    format!("{base}{suffix}")
}

/// A table to dump: the table asked for, or a partition below it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    schema: String,
    name: String,
    /// Has files (not a partitioned table).
    storage: bool,
}

impl Member {
    /// `pg_dump`/`pg_amcheck` pattern matching exactly it.
    fn pattern(&self) -> String {
        format!("{}.{}", pattern(&self.schema), pattern(&self.name))
    }
}

/// Table `schema.name` and, when it is partitioned, every partition below
/// it: the root first, then by level and name.
async fn members(c: &mut PgConnection, schema: &str, name: &str) -> Result<Vec<Member>, OpsError> {
    let q = format!(
        "WITH root AS (SELECT {t}::regclass AS oid), \
              m AS (SELECT oid, 0 AS level FROM root \
                    UNION SELECT p.relid, p.level FROM root, pg_partition_tree(root.oid) p) \
         SELECT n.nspname AS s, c.relname AS n, c.relkind <> 'p' AS st, m.level \
           FROM m JOIN pg_class c ON c.oid = m.oid JOIN pg_namespace n ON n.oid = c.relnamespace \
          ORDER BY m.level, n.nspname, c.relname",
        t = literal(&format!("{}.{}", ident(schema), ident(name)))
    );
    let r = c
        .simple_query(&q)
        .await
        .map_err(|e| refuse(format!("listing {schema}.{name}'s partitions: {e}")))?;
    Ok((0..r.rows.len())
        .filter_map(|i| {
            Some(Member {
                schema: r.text(i, "s")?,
                name: r.text(i, "n")?,
                storage: r.text(i, "st")? == "t",
            })
        })
        .collect())
}

/// Prepare the table (and its partitions) for `pg_restore` into a live
/// server, in the scratch server: the table renamed to `new`, its
/// partitions, indexes and owned sequences given `suffix`, its foreign
/// keys dropped (what they pointed to at the target may be gone). Returns
/// the new names, the root first.
async fn rename_for_restore(
    c: &mut PgConnection,
    tree: &[Member],
    new: &str,
    suffix: &str,
) -> Result<Vec<Member>, OpsError> {
    let Some(root) = tree.first() else {
        return Err(refuse("no table to rename"));
    };
    let list = tree
        .iter()
        .map(|m| literal(&format!("{}.{}", ident(&m.schema), ident(&m.name))) + "::regclass")
        .collect::<Vec<_>>()
        .join(", ");
    let q = format!(
        "WITH m(oid) AS (SELECT unnest(ARRAY[{list}]::oid[])) \
         SELECT 'i' AS k, n.nspname AS s, i.relname AS n, '' AS t FROM pg_index x \
           JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_namespace n ON n.oid = i.relnamespace \
          WHERE x.indrelid IN (SELECT oid FROM m) \
         UNION ALL SELECT 'S', n.nspname, s.relname, '' FROM pg_depend d \
           JOIN pg_class s ON s.oid = d.objid JOIN pg_namespace n ON n.oid = s.relnamespace \
          WHERE d.refobjid IN (SELECT oid FROM m) AND d.classid = 'pg_class'::regclass \
            AND s.relkind = 'S' AND d.deptype IN ('a', 'i') \
         UNION ALL SELECT 'f', n.nspname, k.conname, r.relname FROM pg_constraint k \
           JOIN pg_class r ON r.oid = k.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace \
          WHERE k.conrelid IN (SELECT oid FROM m) AND k.contype = 'f' AND k.conparentid = 0"
    );
    let r = c.simple_query(&q).await.map_err(|e| {
        refuse(format!(
            "preparing {}.{} for --into: {e}",
            root.schema, root.name
        ))
    })?;
    let mut sql = vec!["BEGIN".to_owned()];
    for i in 0..r.rows.len() {
        let (Some(k), Some(s), Some(n), Some(t)) = (
            r.text(i, "k"),
            r.text(i, "s"),
            r.text(i, "n"),
            r.text(i, "t"),
        ) else {
            continue;
        };
        let obj = format!("{}.{}", ident(&s), ident(&n));
        match k.as_str() {
            "i" => sql.push(format!(
                "ALTER INDEX {obj} RENAME TO {}",
                ident(&with_suffix(&n, suffix))
            )),
            "S" => sql.push(format!(
                "ALTER SEQUENCE {obj} RENAME TO {}",
                ident(&with_suffix(&n, suffix))
            )),
            // (a partition's copy of its parent's key goes with the parent's)
            _ => sql.push(format!(
                "ALTER TABLE {}.{} DROP CONSTRAINT {}",
                ident(&s),
                ident(&t),
                ident(&n)
            )),
        }
    }
    let mut renamed = Vec::with_capacity(tree.len());
    for (i, m) in tree.iter().enumerate() {
        let to = if i == 0 {
            new.to_owned()
        } else {
            with_suffix(&m.name, suffix)
        };
        sql.push(format!(
            "ALTER TABLE {}.{} RENAME TO {}",
            ident(&m.schema),
            ident(&m.name),
            ident(&to)
        ));
        renamed.push(Member {
            name: to,
            ..m.clone()
        });
    }
    sql.push("COMMIT".to_owned());
    c.simple_query(&sql.join("; ")).await.map_err(|e| {
        refuse(format!(
            "renaming {}.{} for --into: {e}",
            root.schema, root.name
        ))
    })?;
    Ok(renamed)
}

/// The client tools against the scratch server.
struct Client<'a> {
    tools: &'a Tools,
    /// The scratch server's log.
    log: PathBuf,
    sock: &'a Path,
    port: u16,
    user: &'a str,
    database: &'a str,
}

impl Client<'_> {
    fn tool(&self, program: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg("-h")
            .arg(self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(self.user)
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
        cmd
    }

    /// `pg_amcheck` on the table, its TOAST table and indexes (PostgreSQL
    /// 14+), or before 14 amcheck's `bt_index_check` with every heap tuple
    /// looked up in each B-tree index; a finding is an error.
    async fn amcheck(
        &self,
        c: &mut PgConnection,
        schema: &str,
        name: &str,
        tree: &[Member],
    ) -> Result<String, OpsError> {
        let with_files: Vec<&Member> = tree.iter().filter(|m| m.storage).collect();
        if with_files.is_empty() {
            return Ok(format!(
                "{schema}.{name} has no partitions: nothing to check"
            ));
        }
        let partitions = match with_files.len() {
            n if tree.len() > 1 => format!(" ({n} partitions)"),
            _ => String::new(),
        };
        let extension = c
            .simple_query(
                "SELECT count(*) AS n FROM pg_available_extensions WHERE name = 'amcheck'",
            )
            .await
            .ok()
            .and_then(|r| r.text(0, "n"))
            .is_some_and(|n| n != "0");
        if !extension {
            return Ok("not run: the amcheck extension is not installed with the server".into());
        }
        let Some(pg_amcheck) = &self.tools.pg_amcheck else {
            return self.bt_index_check(c, schema, name, &partitions).await;
        };
        let mut cmd = self.tool(pg_amcheck);
        // only this database's catalogs are restored: it may connect
        // nowhere else (another database's are holes), so no database
        // pattern, which would list them through a maintenance database
        cmd.arg(self.database);
        for m in &with_files {
            cmd.arg("-t").arg(m.pattern());
        }
        let out = cmd
            .arg("--install-missing")
            .arg("--heapallindexed")
            .output()
            .await
            .map_err(|e| refuse(format!("cannot run pg_amcheck: {e}")))?;
        if !out.status.success() {
            return Err(refuse(format!(
                "pg_amcheck found {schema}.{name} damaged at the target: {}{}",
                tail(&out, 5),
                self.server_errors()
            )));
        }
        Ok(format!(
            "{schema}.{name}{partitions}, its TOAST table and its B-tree indexes are consistent"
        ))
    }

    /// amcheck's `bt_index_check(index, heapallindexed => true)` on every
    /// B-tree index of the table and its TOAST table (PostgreSQL 13).
    async fn bt_index_check(
        &self,
        c: &mut PgConnection,
        schema: &str,
        name: &str,
        partitions: &str,
    ) -> Result<String, OpsError> {
        let table = literal(&format!("{}.{}", ident(schema), ident(name)));
        let q = format!(
            "CREATE EXTENSION IF NOT EXISTS amcheck; \
             WITH t AS (SELECT {table}::regclass AS oid \
                        UNION SELECT relid FROM pg_partition_tree({table}::regclass)) \
             SELECT count(bt_index_check(i.indexrelid, true)) AS n FROM pg_index i \
               JOIN pg_class r ON r.oid = i.indexrelid JOIN pg_am a ON a.oid = r.relam \
              WHERE a.amname = 'btree' AND r.relkind = 'i' AND i.indrelid IN \
                    (SELECT oid FROM t UNION ALL \
                     SELECT reltoastrelid FROM pg_class WHERE oid IN (SELECT oid FROM t))"
        );
        let r = c.simple_query(&q).await.map_err(|e| {
            refuse(format!(
                "amcheck found {schema}.{name} damaged at the target: {e}{}",
                self.server_errors()
            ))
        })?;
        Ok(format!(
            "{} B-tree index(es) of {schema}.{name}{partitions} and its TOAST table consistent, every row found in each (amcheck bt_index_check; pg_amcheck needs PostgreSQL 14+)",
            r.text(0, "n").unwrap_or_default()
        ))
    }

    /// "; the server logged: …" with its last errors, or nothing.
    fn server_errors(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("PANIC") || l.contains("FATAL") || l.contains("ERROR"))
            .collect();
        match errors.len() {
            0 => String::new(),
            n => format!(
                "; the server logged: {}",
                errors[n.saturating_sub(3)..].join(" / ")
            ),
        }
    }

    /// `pg_dump` of the table with its partitions (or the database) as
    /// SQL into `path`, written to a temporary name, synced, then renamed.
    async fn dump_to_file(&self, table: Option<&[Member]>, path: &Path) -> Result<u64, OpsError> {
        let mut part = path.as_os_str().to_owned();
        part.push(".partial");
        let part = PathBuf::from(part);
        let file = std::fs::File::create(&part)
            .map_err(|e| refuse(format!("cannot write {}: {e}", part.display())))?;
        let mut cmd = self.tool(&self.tools.pg_dump);
        cmd.arg("-d").arg(self.database);
        for m in table.unwrap_or_default() {
            cmd.arg("-t").arg(m.pattern());
        }
        let out = cmd
            .stdout(std::process::Stdio::from(
                file.try_clone()
                    .map_err(|e| refuse(format!("{}: {e}", part.display())))?,
            ))
            .stderr(std::process::Stdio::piped())
            // (not output(): tokio's makes stdout a pipe whatever was set)
            .spawn()
            .map_err(|e| refuse(format!("cannot run pg_dump: {e}")));
        let out = match out {
            Ok(child) => child
                .wait_with_output()
                .await
                .map_err(|e| refuse(format!("pg_dump: {e}"))),
            Err(e) => Err(e),
        };
        let failed = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "pg_dump failed: {}{}",
                tail(&o, 5),
                self.server_errors()
            )),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            let _ = std::fs::remove_file(&part);
            return Err(refuse(e));
        }
        let io = |e: std::io::Error| refuse(format!("{}: {e}", path.display()));
        file.sync_all().map_err(io)?;
        let bytes = file.metadata().map_err(io)?.len();
        std::fs::rename(&part, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(bytes)
    }

    /// `pg_dump -Fc` of the renamed table (with its partitions) piped into
    /// `pg_restore` on the live server, in one transaction (nothing is left
    /// half-created).
    async fn dump_into(&self, tree: &[Member], conninfo: &str) -> Result<(), OpsError> {
        use std::process::Stdio;
        let mut cmd = self.tool(&self.tools.pg_dump);
        cmd.arg("-d").arg(self.database).arg("-Fc");
        for m in tree {
            cmd.arg("-t").arg(m.pattern());
        }
        let mut dump = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| refuse(format!("cannot run pg_dump: {e}")))?;
        let piped: Stdio = dump
            .stdout
            .take()
            .ok_or_else(|| refuse("pg_dump has no output"))?
            .try_into()
            .map_err(|e| refuse(format!("pg_dump's output: {e}")))?;
        let pg_restore = self
            .tools
            .pg_restore
            .as_ref()
            .ok_or_else(|| refuse("no pg_restore"))?;
        let restore = tokio::process::Command::new(pg_restore)
            .arg("--no-owner")
            .arg("--no-privileges")
            .arg("--exit-on-error")
            .arg("--single-transaction")
            .arg("-d")
            .arg(conninfo)
            .stdin(piped)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| refuse(format!("cannot run pg_restore: {e}")))?;
        let (dumped, restored) = tokio::join!(dump.wait_with_output(), restore.wait_with_output());
        let dumped = dumped.map_err(|e| refuse(format!("pg_dump: {e}")))?;
        let restored = restored.map_err(|e| refuse(format!("pg_restore: {e}")))?;
        if !dumped.status.success() {
            return Err(refuse(format!(
                "pg_dump failed (nothing was created on the --into server): {}",
                tail(&dumped, 5)
            )));
        }
        if !restored.status.success() {
            return Err(refuse(format!(
                "pg_restore into the --into server failed (nothing was created there): {}",
                tail(&restored, 5)
            )));
        }
        Ok(())
    }
}

/// An SQL string literal.
fn literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// An SQL identifier, always quoted.
fn ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

/// A `pg_dump -t` pattern matching exactly `v` (quoted: no wildcards, case
/// kept).
fn pattern(v: &str) -> String {
    ident(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::Relation;

    fn rel(oid: u32, filenode: u32, name: &str, kind: u8, owner: u32) -> Relation {
        Relation {
            oid,
            filenode,
            schema: "public".into(),
            name: name.into(),
            kind,
            owner,
        }
    }

    #[test]
    fn relation_file_names_are_parsed() {
        assert_eq!(relation_file("16384"), Some((16384, "")));
        assert_eq!(relation_file("16384.12"), Some((16384, "")));
        assert_eq!(relation_file("16384_vm"), Some((16384, "vm")));
        assert_eq!(relation_file("16384_fsm.1"), Some((16384, "fsm")));
        assert_eq!(relation_file("16384_init"), Some((16384, "init")));
        for other in [
            "PG_VERSION",
            "pg_filenode.map",
            "16384_x",
            "16384.",
            "x1",
            "",
            "1.a",
        ] {
            assert_eq!(relation_file(other), None, "{other}");
        }
        assert_eq!(database_file("base/5/16384"), Some((5, "16384")));
        assert_eq!(
            database_file("pg_tblspc/16390/PG_15_202209061/16385/16400.1"),
            Some((16385, "16400.1"))
        );
        assert_eq!(database_file("global/1262"), None);
        assert_eq!(database_file("base/5"), None);
    }

    /// A table's files, its TOAST table and indexes, the catalogs and files
    /// the map does not know are read; other relations and other
    /// databases' relations are holes.
    #[test]
    fn a_sparse_selection_reads_the_table_catalogs_and_unknown_files() {
        let db = DatabaseRelations {
            oid: 16400,
            name: "app".into(),
            complete: true,
            relations: vec![
                rel(1259, 1259, "pg_class", b'r', 0),
                rel(2619, 2619, "pg_statistic", b'r', 0),
                rel(20000, 20001, "orders", b'r', 0),
                rel(20002, 20002, "pg_toast_20000", b't', 20000),
                rel(20003, 20003, "pg_toast_20000_index", b'i', 20000),
                rel(20004, 20004, "orders_pkey", b'i', 20000),
                rel(20005, 20005, "orders_id_seq", b'S', 20000),
                rel(30000, 30000, "big", b'r', 0),
                rel(30001, 30001, "big_pkey", b'i', 30000),
                rel(30002, 30002, "big_id_seq", b'S', 30000),
            ],
        };
        let none = HashMap::new();
        let s = Selection::of(&db, Scope::Table(Some(20000)), &none);
        for yes in [
            "global/1262",
            "pg_xact/0000",
            "base/16400/PG_VERSION",
            "base/16400/pg_filenode.map",
            "base/16400/1259",
            "base/16400/1259_fsm",
            "base/16400/20001",
            "base/16400/20001.1",
            "base/16400/20001_vm",
            "base/16400/20002",
            "base/16400/20003",
            "base/16400/20004",
            "base/16400/20005",
            "base/16400/30002",
            "base/16400/40000",
            "base/16400/30000_init",
            "base/1/30000_init",
            "base/1/PG_VERSION",
        ] {
            assert_eq!(s.wants(yes), Wanted::Yes, "{yes} should be read");
        }
        for no in [
            "base/16400/30000",
            "base/16400/30000.3",
            "base/16400/30000_fsm",
            "base/16400/30001",
            "base/1/1259",
            "base/5/20001",
            "pg_tblspc/16390/PG_15_202209061/5/1259",
        ] {
            assert_eq!(s.wants(no), Wanted::No, "{no} should be a hole");
        }
        // the whole database
        let all = Selection::of(&db, Scope::Database, &none);
        assert_eq!(all.wants("base/16400/30000"), Wanted::Yes);
        assert_eq!(all.wants("base/1/1259"), Wanted::No);
        // a table created after the backup: the catalogs only
        let later = Selection::of(&db, Scope::Table(None), &none);
        for (path, w) in [
            ("base/16400/1259", Wanted::Yes),
            ("base/16400/40000", Wanted::Yes),
            ("base/16400/20001", Wanted::No),
            ("base/16400/30000", Wanted::No),
        ] {
            assert_eq!(later.wants(path), w, "{path}");
        }
        // a database walvault could not list is read whole
        let partial = DatabaseRelations {
            complete: false,
            ..db.clone()
        };
        assert_eq!(
            Selection::of(&partial, Scope::Table(Some(20000)), &none).wants("base/16400/30000"),
            Wanted::Yes
        );
        // files dropped before the target are holes, the table's own
        // included (a rewrite builds the new one from the WAL), in this
        // database only; the commit is kept for the plan
        let by = DroppedBy {
            xid: 900,
            time: "2000-01-01T00:00:00+00:00".into(),
            lsn: Lsn::new(0x100),
        };
        let dropped: HashMap<(u32, u32), DroppedBy> = [
            ((16400, 20001), by.clone()),
            ((16400, 30000), by.clone()),
            ((5, 40000), by.clone()),
        ]
        .into();
        for scope in [Scope::Table(Some(20000)), Scope::Database] {
            let d = Selection::of(&db, scope, &dropped);
            assert_eq!(d.wants("base/16400/20001.1"), Wanted::Dropped);
            assert_eq!(d.wants("base/16400/30000"), Wanted::Dropped);
            assert_eq!(d.wants("base/16400/40000"), Wanted::Yes);
            assert_eq!(d.wants("base/16400/20004"), Wanted::Yes);
            assert_eq!(d.wants("base/16400/30000_init"), Wanted::Yes);
            assert_eq!(
                d.table_file_dropped,
                (scope == Scope::Table(Some(20000))).then(|| by.clone())
            );
        }
    }

    #[test]
    fn new_names_keep_within_63_bytes() {
        assert_eq!(
            suffix_of("orders_restored_1402", "orders"),
            "_restored_1402"
        );
        assert_eq!(suffix_of("copy", "orders"), "_copy");
        let long = "x".repeat(60);
        let n = with_suffix(&long, "_restored_1402");
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("_restored_1402"));
        assert_eq!(with_suffix("orders_pkey", "_r"), "orders_pkey_r");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(distance("ordres", "orders"), 2);
        assert_eq!(distance("orders", "orders"), 0);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(literal("o'k"), "'o''k'");
    }
}
