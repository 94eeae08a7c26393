//! `walvault backup`, `walvault list`, `walvault info`, `walvault restore`,
//! `walvault wal-fetch`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use super::output::outln;
use super::Settings;
use crate::backup::stream::BaseBackupOptions;
use crate::pg::ConnParams;
pub(super) use crate::progress::human_bytes as human;
use crate::progress::{Progress, Reporter};
use crate::repo::{Manifest, StanzaPaths};
use crate::restore::RestoreOptions;

/// Options of `walvault backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Connection to the server (libpq conninfo or postgres:// URL), as a
    /// role with the REPLICATION attribute.
    #[arg(long, env = "WALVAULT_PG")]
    pub pg: Option<String>,
    /// Label of the backup (shown by `list`, stored in backup_label).
    #[arg(long, default_value = "walvault")]
    pub label: String,
    /// Start with an immediate checkpoint instead of waiting for a spread one.
    #[arg(long)]
    pub fast: bool,
    /// Limit the server's send rate (e.g. 50MiB per second).
    #[arg(long, value_parser = super::init::parse_size)]
    pub max_rate: Option<u64>,
    /// Compression of new blocks: lz4, zstd, zstd:LEVEL or none (default: the
    /// repository's, set at init).
    #[arg(long)]
    pub compress: Option<crate::codec::Compression>,
    /// Keep the backup when the server finds pages with bad checksums (they
    /// are logged and listed by `info`) instead of failing it.
    #[arg(long)]
    pub allow_checksum_failures: bool,
    /// Do not run `expire` after the backup (it runs when walvault.toml has
    /// a [retention] policy).
    #[arg(long)]
    pub no_expire: bool,
    /// On a standby: refuse when its replay lags its primary by more than
    /// this much WAL, or when it streams from no primary; `off` backs it up
    /// whatever its lag.
    #[arg(long, value_name = "SIZE|off", default_value = "1GiB", value_parser = parse_max_lag)]
    pub standby_max_lag: MaxLag,
    /// Read every file from the server. By default, on PostgreSQL 17+
    /// with summarize_wal = on, the server sends only the blocks changed
    /// since the previous backup (the backup is stored complete all the same).
    #[arg(long)]
    pub no_incremental: bool,
}

/// `--standby-max-lag`: bytes of WAL, or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxLag(pub Option<u64>);

/// `1GiB`, `256MB`, or `off`.
pub fn parse_max_lag(s: &str) -> Result<MaxLag, crate::pg::ParseError> {
    match s {
        "off" => Ok(MaxLag(None)),
        s => super::init::parse_size(s).map(|b| MaxLag(Some(b))),
    }
}

pub(super) async fn backup(settings: &Settings, args: BackupArgs) -> anyhow::Result<()> {
    let params = ConnParams::parse(settings.pg(args.pg.as_deref())?)?;
    let repo = Arc::new(settings.open_repository().await?);
    let progress = Progress::new();
    let opts = BaseBackupOptions {
        label: args.label,
        fast_checkpoint: args.fast,
        max_rate: args.max_rate,
        compression: args.compress,
        allow_checksum_failures: args.allow_checksum_failures,
        standby_max_lag: args.standby_max_lag.0,
        no_incremental: args.no_incremental,
        progress: Some(progress.clone()),
        ..Default::default()
    };
    let t = Instant::now();
    let reporter = Reporter::start("backup", progress, !settings.quiet);
    let m = crate::backup::run_backup(repo.clone(), &settings.stanza, &params, &opts).await;
    reporter.finish();
    let m = m?;
    let secs = t.elapsed().as_secs_f64();
    if !m.corrupt_pages.is_empty() {
        eprintln!(
            "walvault: warning: backup {} holds {} page(s) whose checksum failed on the server (see `walvault info {0}`)",
            m.id,
            m.corrupt_pages.len()
        );
    }
    let incremental = match &m.incremental_from {
        Some(from) => format!(
            " (the server sent {} of changes since {from})",
            human(m.received_bytes.unwrap_or(0))
        ),
        None => String::new(),
    };
    outln!(
        "backup {} complete: {} in {secs:.1} s ({:.0} MB/s), {} new ({} stored), WAL {}..{}{incremental}",
        m.id,
        human(m.totals.logical_bytes),
        m.totals.logical_bytes as f64 / secs.max(1e-3) / 1e6,
        human(m.totals.new_raw_bytes),
        human(m.totals.new_stored_bytes),
        m.start_lsn,
        m.stop_lsn,
    )?;
    if !args.no_expire {
        // the backup is safe whatever happens here: a failed expire is an
        // error of its own, reported after the backup's success
        super::retention::after_backup(settings, &repo)
            .await
            .context("the backup is complete, but expire after it failed")?;
    }
    Ok(())
}

/// Options of `walvault list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// As one JSON document: an array of backups, oldest first (`[]` when
    /// the stanza has none).
    #[arg(long)]
    pub json: bool,
    /// List this `[[repository]]` of walvault.toml instead.
    #[arg(long, value_name = "NAME")]
    pub repository: Option<String>,
}

pub(super) async fn list(settings: &Settings, args: ListArgs) -> anyhow::Result<()> {
    let repo = match &args.repository {
        Some(name) => settings.open_entry(settings.repository(name)?).await?,
        None => settings.open_repository().await?,
    };
    let paths = StanzaPaths::new(&settings.stanza);
    let manifests = Manifest::load_all_headers(&repo, &paths).await?;
    let status = crate::ops::status::backup_status(&repo, &paths).await?;
    if !args.json {
        outln!(
            "{:<22}  {:<16}  {:>10}  {:>10}  {:>6}  {:<12}  {:<12}  tli  notes",
            "id",
            "label",
            "size",
            "new",
            "dedup",
            "start lsn",
            "stop lsn"
        )?;
    }
    let mut listed = Vec::new();
    // for the copies' lag
    let ids: Vec<String> = manifests.iter().map(|m| m.id.clone()).collect();
    let seg = manifests
        .last()
        .map_or(crate::pg::WalSegSize::DEFAULT, |m| m.wal_segment_size);
    for m in manifests {
        let dedup = m.totals.logical_bytes as f64 / m.totals.new_stored_bytes.max(1) as f64;
        let st = status.get(&m.id).cloned().unwrap_or_default();
        if args.json {
            listed.push(serde_json::json!({
                "id": m.id, "label": m.label, "system_id": m.system_id.to_string(), "pg_version": m.pg_version,
                "timeline": m.timeline, "start_lsn": m.start_lsn.to_string(),
                "stop_lsn": m.stop_lsn.to_string(),
                "start_time": chrono::DateTime::from_timestamp_micros(m.start_time).map(|t| t.to_rfc3339()),
                "stop_time": chrono::DateTime::from_timestamp_micros(m.stop_time).map(|t| t.to_rfc3339()),
                "duration_s": (m.stop_time - m.start_time) as f64 / 1e6,
                "logical_bytes": m.totals.logical_bytes, "new_raw_bytes": m.totals.new_raw_bytes,
                "new_stored_bytes": m.totals.new_stored_bytes, "dedup_ratio": dedup, "status": "complete",
                "holds": st.holds, "last_verify": st.last_verify, "last_drill": st.last_drill, "retention": st.retention,
            }));
        } else {
            outln!(
                "{:<22}  {:<16}  {:>10}  {:>10}  {:>5.0}x  {:<12}  {:<12}  {:<3}  {}",
                m.id,
                m.label,
                human(m.totals.logical_bytes),
                human(m.totals.new_stored_bytes),
                dedup,
                m.start_lsn.to_string(),
                m.stop_lsn.to_string(),
                m.timeline,
                notes(&st)
            )?;
        }
    }
    if args.json {
        outln!("{}", serde_json::Value::Array(listed))?;
    } else if args.repository.is_none() && !settings.repositories.is_empty() {
        let newest = newest_segment(&repo, &paths, seg).await?;
        for r in &settings.repositories {
            let lag = copy_lag(settings, r, &ids, newest, seg, &paths).await;
            outln!("{lag}")?;
        }
    }
    Ok(())
}

/// The newest WAL segment stored: (timeline, segment number).
async fn newest_segment(
    repo: &crate::repo::Repository,
    paths: &StanzaPaths,
    seg: crate::pg::WalSegSize,
) -> anyhow::Result<Option<(u32, u64)>> {
    let mut best: Option<(u32, u64)> = None;
    for tli in repo.wal_timelines(paths).await? {
        for (n, _) in repo.list_wal_sized(paths, tli, seg).await? {
            if let Some(f) = n.segment_file() {
                best = best.max(Some((tli.get(), f.segno.0)));
            }
        }
    }
    Ok(best)
}

/// One line on a `[[repository]]`: what it holds of the main repository's
/// backups and how far its WAL lags.
/// `here`: the main repository's backups; `newest`: its newest segment.
async fn copy_lag(
    settings: &Settings,
    r: &super::config::RepositoryConfig,
    here: &[String],
    newest: Option<(u32, u64)>,
    seg: crate::pg::WalSegSize,
    paths: &StanzaPaths,
) -> String {
    let lag = async {
        let copy = settings.open_entry(r).await?;
        let there = Manifest::list_ids(&copy, paths).await?;
        let missing = here.iter().filter(|id| !there.contains(id)).count();
        let (a, b) = (newest, newest_segment(&copy, paths, seg).await?);
        let behind = match (a, b) {
            (Some(a), Some(b)) => a.1.saturating_sub(b.1),
            (Some(a), None) => a.1 + 1,
            _ => 0,
        };
        Ok::<_, anyhow::Error>(format!(
            "copy {} ({}): {} of {} backup(s){}; WAL {} segment(s) behind",
            r.name,
            r.repo,
            there.iter().filter(|id| here.contains(id)).count(),
            here.len(),
            if missing > 0 {
                format!(", {missing} not copied")
            } else {
                String::new()
            },
            behind
        ))
    }
    .await;
    lag.unwrap_or_else(|e| {
        format!(
            "copy {} ({}): cannot be read: {}",
            r.name,
            r.repo,
            super::one_line(&e)
        )
    })
}

/// The notes column of `list`: holds, the last verify and drill, the
/// retention rule.
fn notes(st: &crate::ops::status::BackupStatus) -> String {
    let mut n = Vec::new();
    let now = chrono::Utc::now();
    for h in st.holds.iter().filter(|h| h.until.is_none_or(|u| u > now)) {
        n.push(match h.until {
            Some(u) => format!("held until {}", u.format("%Y-%m-%d %H:%M")),
            None => "held".to_owned(),
        });
    }
    if let Some(v) = &st.last_verify {
        n.push(format!(
            "{} {}",
            if v.ok { "verified" } else { "VERIFY FAILED" },
            v.time.format("%Y-%m-%d %H:%M")
        ));
    }
    if let Some(d) = &st.last_drill {
        n.push(format!(
            "{} {}",
            if d.passed { "drilled" } else { "DRILL FAILED" },
            d.time.format("%Y-%m-%d %H:%M")
        ));
    }
    if let Some(k) = &st.retention {
        n.push(format!("kept: {}", k.rules.join(", ")));
    }
    n.join("; ")
}

/// Options of `walvault restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Backup id, or `latest`.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Directory to restore into (empty or missing).
    #[arg(long)]
    pub pgdata: PathBuf,
    /// Put a tablespace elsewhere: OLD=NEW (OLD is its OID or old location).
    #[arg(long = "tablespace-map", value_name = "OLD=NEW")]
    pub tablespace_map: Vec<String>,
    /// Restore over an existing data directory of a stopped server: keep
    /// blocks that already match, write only those that differ, remove files
    /// the backup does not have.
    #[arg(long)]
    pub delta: bool,
    /// Seed a new standby from the repository (to rebuild a lost replica
    /// without loading the primary): standby.signal, the restore_command,
    /// and --primary-conninfo; it replays the archived WAL, then streams
    /// from the primary.
    #[arg(long)]
    pub as_standby: bool,
    /// With --as-standby: how the standby connects to its primary (a role
    /// with REPLICATION); without it, a warm standby that only replays the
    /// archive.
    #[arg(long, requires = "as_standby", value_name = "CONNINFO")]
    pub primary_conninfo: Option<String>,
    /// With --as-standby: the primary's replication slot it streams through
    /// (create it on the primary first).
    #[arg(long, requires = "as_standby", value_name = "NAME")]
    pub slot: Option<String>,
}

pub(super) async fn restore(settings: &Settings, args: RestoreArgs) -> anyhow::Result<()> {
    if let Some(slot) = &args.slot {
        crate::pg::validate_slot_name(slot)?;
    }
    let map = tablespace_map(&args.tablespace_map)?;
    let progress = Progress::new();
    let mut opts = RestoreOptions {
        backup: Some(args.backup),
        tablespace_map: map,
        // set for the repository that opens (below)
        restore_command: None,
        delta: args.delta,
        progress: Some(progress.clone()),
        staged_wal: false,
        page_cache: false,
        standby: args.as_standby.then(|| crate::restore::StandbyOptions {
            primary_conninfo: args.primary_conninfo.clone(),
            slot: args.slot.clone(),
        }),
        fetch_only: None,
    };
    let t = Instant::now();
    let was_empty = crate::restore::is_empty_dir(&args.pgdata, false).unwrap_or(false);
    let reporter = Reporter::start("restore", progress.clone(), !settings.quiet);
    // the main repository, then each [[repository]] when one cannot be
    // read or holds damaged data; a restore that stopped half-way is
    // finished from the next one as a delta restore
    let sources = settings.recovery_sources()?;
    let mut r = Err(crate::restore::RestoreError::NoBackups);
    // the restored server's restore_command reads the first repository that
    // could be opened (see restore-pitr)
    let mut wal_source = None;
    for (i, source) in sources.iter().enumerate() {
        let last = i + 1 == sources.len();
        let repo = match settings.open_source(*source).await {
            Ok(repo) => {
                let first = *wal_source.get_or_insert(*source);
                opts.restore_command = Some(restore_command_from(settings, first)?);
                Arc::new(repo)
            }
            Err(e) if !last => {
                fallback_note(*source, &e, sources[i + 1]);
                continue;
            }
            Err(e) => {
                reporter.finish();
                return Err(e);
            }
        };
        r = crate::restore::restore(repo, &settings.stanza, &args.pgdata, &opts).await;
        match &r {
            Err(e) if e.is_repository_fault() && !last => {
                fallback_note(*source, &anyhow::anyhow!("{e}"), sources[i + 1]);
                opts.delta = opts.delta
                    || !crate::restore::is_empty_dir(&args.pgdata, false).unwrap_or(false);
            }
            _ => break,
        }
    }
    reporter.finish();
    let r = r.map_err(|e| {
        // a restore that stopped half-way leaves a directory that must
        // not be started; say how to finish it
        let touched = progress.done() > 0
            || (was_empty && !crate::restore::is_empty_dir(&args.pgdata, false).unwrap_or(true));
        let e = anyhow::Error::from(e);
        if touched {
            super::incomplete(
                &e,
                &args.pgdata,
                "run the same restore with --delta to finish it (or remove the directory)",
            )
        } else {
            e
        }
    })?;
    let secs = t.elapsed().as_secs_f64();
    if r.manifest_computed {
        eprintln!(
            "walvault: note: PostgreSQL sent backup {} as changes since {}; its backup_manifest was computed from the restored files (pg_verifybackup reads it)",
            r.backup.id,
            r.backup.incremental_from.as_deref().unwrap_or("an earlier backup")
        );
    }
    for l in &r.replication_disabled {
        eprintln!(
            "walvault: note: the backup was taken on a standby; its `{l}` is commented out in postgresql.auto.conf{}",
            if args.as_standby {
                " (this standby's own settings follow it)"
            } else {
                " so this copy does not connect to that primary"
            }
        );
    }
    let delta = if args.delta {
        format!(
            " ({} written, {} already in place, {} stale entries removed)",
            human(r.stats.written),
            human(r.stats.reused),
            r.removed
        )
    } else {
        String::new()
    };
    outln!(
        "restored backup {} into {}: {} files, {} in {secs:.1} s ({:.0} MB/s){delta}; {}",
        r.backup.id,
        args.pgdata.display(),
        r.files,
        human(r.bytes),
        r.bytes as f64 / secs.max(1e-3) / 1e6,
        match (args.as_standby, &args.primary_conninfo) {
            (true, Some(_)) => "start PostgreSQL on it: a standby that replays the repository's WAL, then streams from its primary",
            (true, None) => "start PostgreSQL on it: a warm standby that replays the repository's WAL (no --primary-conninfo)",
            _ => "start PostgreSQL on it to recover",
        }
    )?;
    Ok(())
}

/// `--tablespace-map OLD=NEW` values as a map.
pub(super) fn tablespace_map(args: &[String]) -> anyhow::Result<HashMap<String, PathBuf>> {
    args.iter()
        .map(|m| {
            let (old, new) = m
                .split_once('=')
                .context("--tablespace-map takes OLD=NEW")?;
            Ok((old.to_owned(), PathBuf::from(new)))
        })
        .collect()
}

/// The `restore_command` line a restored server runs: this binary with the
/// same repository, stanza and key.
pub(super) fn restore_command(settings: &Settings) -> anyhow::Result<String> {
    restore_command_from(settings, None)
}

/// [`restore_command`] for a recovery restored from the `[[repository]]`
/// `source` (`None`: the main repository): its wal-fetch reads that one
/// first.
pub(super) fn restore_command_from(
    settings: &Settings,
    source: Option<&super::config::RepositoryConfig>,
) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("cannot find the walvault binary")?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\\\""));
    // PostgreSQL runs restore_command in the data directory: a relative
    // repository path must not be read from there
    let repo = settings.repo()?;
    let repo = if repo.contains("://") {
        repo.to_owned()
    } else {
        std::path::absolute(repo)
            .with_context(|| format!("cannot make the repository path {repo} absolute"))?
            .display()
            .to_string()
    };
    let mut cmd = format!(
        "{} wal-fetch --repo {} --stanza {}",
        quote(&exe.display().to_string()),
        quote(&repo),
        quote(&settings.stanza)
    );
    if let Some(k) = &settings.key_file {
        cmd.push_str(&format!(
            " --key-file {}",
            quote(&std::fs::canonicalize(k)?.display().to_string())
        ));
    } else if let Some(p) = &settings.passphrase_file {
        cmd.push_str(&format!(
            " --passphrase-file {}",
            quote(&std::fs::canonicalize(p)?.display().to_string())
        ));
    } else if settings.secret()?.is_some() {
        bail!("the restored server must open the repository by itself: give the secret as --passphrase-file or --key-file, not WALVAULT_PASSPHRASE");
    }
    if let Some(c) = &settings.config_path {
        cmd.push_str(&format!(
            " --config {}",
            quote(&std::fs::canonicalize(c)?.display().to_string())
        ));
    }
    if let Some(r) = source {
        cmd.push_str(&format!(" --repository {}", quote(&r.name)));
    }
    Ok(cmd + " %f %p")
}

/// Options of `walvault wal-fetch`.
#[derive(Debug, Args)]
pub struct WalFetchArgs {
    /// WAL file name PostgreSQL asks for (%f).
    pub name: String,
    /// Where to write it (%p).
    pub dest: PathBuf,
    /// After a segment, download this many following segments in the
    /// background into the spool, so replay never waits on the network
    /// (0: off).
    #[arg(long, default_value = "8")]
    pub prefetch: usize,
    /// Spool directory [default: walvault-spool beside DEST, in pg_wal].
    #[arg(long)]
    pub spool: Option<PathBuf>,
    /// Read only the first repository, never another of walvault.toml
    /// (drills use it: they prove the main repository).
    #[arg(long)]
    pub no_fallback: bool,
    /// Read this `[[repository]]` of walvault.toml first (restore and
    /// restore-pitr set it when they restored from it): its "not there" is
    /// the answer.
    #[arg(long, value_name = "NAME")]
    pub repository: Option<String>,
}

/// Longest wait for a segment another process is putting in the spool.
const SPOOL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Set in the detached copy of `wal-fetch` that prefetches.
const PREFETCH_CHILD: &str = "WALVAULT_PREFETCH_CHILD";

pub(super) async fn wal_fetch(settings: &Settings, args: WalFetchArgs) -> anyhow::Result<bool> {
    use crate::restore::fetch::{
        following_segments, from_busy_spool, from_spool, prefetch, with_segment_size,
    };
    // the segment size is not known before a segment is served: the name
    // is exact, its segment arithmetic waits for the served size
    let name = crate::pg::WalFileName::parse_any_size(&args.name)
        .with_context(|| format!("PostgreSQL asked for {:?}", args.name))?;
    let spool = args
        .spool
        .clone()
        .unwrap_or_else(|| crate::restore::fetch::default_spool(&args.dest));
    if let Some(seg) = std::env::var_os(PREFETCH_CHILD) {
        let repo = prefetch_source(settings, &args).await?;
        let seg: u64 = seg.to_string_lossy().parse().unwrap_or(0);
        let Some(after) = with_segment_size(&name, seg) else {
            return Ok(true);
        };
        let names = following_segments(&after, args.prefetch);
        prefetch(
            &repo,
            &settings.stanza,
            &after,
            &names,
            &spool,
            args.prefetch,
        )
        .await?;
        return Ok(true);
    }
    // the spool first: a rename, no repository to open; while another
    // process fills it, wait for the file rather than race it
    let spooled = match from_spool(&name, &args.dest, &spool)? {
        Some(seg) => Some(seg),
        None => from_busy_spool(&name, &args.dest, &spool, SPOOL_PATIENCE).await?,
    };
    let seg = match spooled {
        Some(seg) => seg,
        None => match fetch_with_fallback(
            settings,
            &name,
            &args.dest,
            args.repository.as_deref(),
            !args.no_fallback,
        )
        .await?
        {
            Some(seg) => seg,
            None => return Ok(false),
        },
    };
    let next = with_segment_size(&name, seg)
        .map(|n| following_segments(&n, args.prefetch))
        .unwrap_or_default();
    if !next.is_empty() && !next.iter().all(|n| spool.join(n.to_string()).exists()) {
        // a detached copy of this command fills the spool; PostgreSQL goes
        // on replaying meanwhile
        use std::os::unix::process::CommandExt;
        let spawned = std::process::Command::new(super::own_program()?)
            .args(std::env::args_os().skip(1))
            .env(PREFETCH_CHILD, seg.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn();
        if let Err(e) = spawned {
            tracing::warn!("cannot start prefetching: {e}");
        }
    }
    Ok(true)
}

/// The repository the prefetching copy reads: the first of the recovery
/// sources (`--repository` first) that opens. After the main repository
/// is lost, the segments come from the one the foreground fetches fall
/// back to, into the spool, instead of one call at a time, each first
/// failing on the lost one.
async fn prefetch_source(
    settings: &Settings,
    args: &WalFetchArgs,
) -> anyhow::Result<crate::repo::Repository> {
    let mut sources = settings.recovery_sources_from(args.repository.as_deref())?;
    if args.no_fallback {
        sources.truncate(1);
    }
    let mut first_error = None;
    for source in sources {
        match settings.open_source(source).await {
            Ok(repo) => return Ok(repo),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| anyhow::anyhow!("no repository to prefetch from")))
}

/// Fetch WAL file `name` from the main repository, or from the next
/// `[[repository]]` when one cannot be read or holds the file damaged.
/// "Not there" in a readable repository is the answer: the next is not
/// asked (recovery asks for files beyond the archive at its end).
///
/// After a repository failed, "not there" from the next one is not an
/// answer: the failed one may hold the file, and "not found" (exit 1) would
/// end recovery early; the first failure is returned instead (exit 255).
async fn fetch_with_fallback(
    settings: &Settings,
    name: &crate::pg::WalFileName,
    dest: &std::path::Path,
    first: Option<&str>,
    fallback: bool,
) -> anyhow::Result<Option<u64>> {
    let mut sources = settings.recovery_sources_from(first)?;
    if !fallback {
        sources.truncate(1);
    }
    let mut first_error: Option<anyhow::Error> = None;
    for (i, source) in sources.iter().enumerate() {
        let last = i + 1 == sources.len();
        let result = match settings.open_source(*source).await {
            Ok(repo) => crate::restore::wal_fetch(&repo, &settings.stanza, name, dest, None)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match result {
            Ok(Some(seg)) => return Ok(Some(seg)),
            Ok(None) => {
                return match first_error {
                    Some(e) => Err(e.context(format!(
                        "{name} could not be read there, and {} does not have it",
                        super::config::source_name(*source)
                    ))),
                    None => Ok(None),
                }
            }
            Err(e) if !last => {
                fallback_note(*source, &e, sources[i + 1]);
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(first_error.unwrap_or(e)),
        }
    }
    Ok(None)
}

/// Say that a recovery goes on from the next repository.
pub(super) fn fallback_note(
    failed: Option<&super::config::RepositoryConfig>,
    e: &anyhow::Error,
    next: Option<&super::config::RepositoryConfig>,
) {
    eprintln!(
        "walvault: warning: {} failed ({}); going on with {}",
        super::config::source_name(failed),
        super::one_line(e),
        super::config::source_name(next)
    );
}

/// Options of `walvault info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Backup id, or `latest`.
    #[arg(default_value = "latest")]
    pub backup: String,
    /// As JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn info(settings: &Settings, args: InfoArgs) -> anyhow::Result<()> {
    let repo = settings.open_repository().await?;
    let paths = StanzaPaths::new(&settings.stanza);
    let m = crate::restore::choose_backup(&repo, &paths, Some(&args.backup)).await?;
    let st = crate::ops::status::backup_status(&repo, &paths)
        .await?
        .remove(&m.id)
        .unwrap_or_default();
    let seg_files = m
        .files
        .iter()
        .filter(|f| f.kind == crate::repo::FileKind::File)
        .count();
    let time = |us: i64| {
        chrono::DateTime::from_timestamp_micros(us)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    };
    let v = serde_json::json!({
        "id": m.id, "label": m.label, "status": "complete",
        "system_id": m.system_id.to_string(), "pg_version": m.pg_version, "timeline": m.timeline,
        "source": match m.from_standby {
            Some(true) => format!("standby of system {}, timeline {}", m.system_id, m.timeline),
            Some(false) => "primary".to_owned(),
            None => "unknown (before PostgreSQL 14, or an older walvault)".to_owned(),
        },
        // PostgreSQL 17+ sent only the changes since this backup (the files
        // here are complete all the same)
        "incremental_from": m.incremental_from, "received_bytes": m.received_bytes,
        "start_lsn": m.start_lsn.to_string(), "stop_lsn": m.stop_lsn.to_string(),
        "start_time": time(m.start_time), "stop_time": time(m.stop_time),
        "duration_s": (m.stop_time - m.start_time) as f64 / 1e6,
        "files": seg_files, "blocks": m.totals.blocks, "new_blocks": m.totals.new_blocks,
        "logical_bytes": m.totals.logical_bytes, "new_raw_bytes": m.totals.new_raw_bytes,
        "new_stored_bytes": m.totals.new_stored_bytes,
        "dedup_ratio": m.totals.logical_bytes as f64 / m.totals.new_stored_bytes.max(1) as f64,
        "block_size": m.block_size, "wal_segment_size": m.wal_segment_size,
        "corrupt_pages": m.corrupt_pages.iter().map(|p| serde_json::json!({"file": p.file, "block": p.block})).collect::<Vec<_>>(),
        "tablespaces": m.tablespaces.iter().map(|t| serde_json::json!({"oid": t.oid, "location": t.location})).collect::<Vec<_>>(),
        "holds": st.holds, "last_verify": st.last_verify, "last_drill": st.last_drill, "retention": st.retention,
    });
    if args.json {
        outln!("{v}")?;
        return Ok(());
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            outln!(
                "{k:<18} {}",
                val.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| val.to_string())
            )?;
        }
    }
    Ok(())
}
