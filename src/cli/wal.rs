//! `walvault stream`, `walvault wal-push` (and the `--async` background
//! process), `walvault wal-verify`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::output::outln;
use super::Settings;
use crate::archive::stream::{run_stream, StreamOptions};
use crate::pg::ConnParams;
use crate::repo::WalStored;

/// Options of `walvault stream`.
#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Connection to the server (libpq conninfo or postgres:// URL), as a
    /// role with the REPLICATION attribute. For --synchronous, set
    /// application_name and list it in synchronous_standby_names.
    #[arg(long, env = "WALVAULT_PG")]
    pub pg: Option<String>,
    /// Physical replication slot to use (created when missing).
    #[arg(long, default_value = "walvault")]
    pub slot: String,
    /// Upload the open segment at most this long after new WAL arrived
    /// (seconds, fractions allowed): the RPO bound.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    pub partial_interval: Duration,
    /// Make every received message durable and acknowledge it at once, for
    /// synchronous replication (RPO = 0).
    #[arg(long)]
    pub synchronous: bool,
    /// Seconds between status updates to the server and lag log lines.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub status_interval: Duration,
    /// JSON file kept current with the received and durable positions and
    /// the lag (bytes and seconds).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
}

/// A duration of at most a day (plain seconds, fractions allowed, or with a
/// unit: 0.2, 10s, 1m).
fn parse_secs(s: &str) -> Result<Duration, super::duration::DurationError> {
    super::duration::parse_duration_within(s, 0, 86_400)
}

pub(super) async fn stream(settings: &Settings, args: StreamArgs) -> anyhow::Result<()> {
    let params = ConnParams::parse(settings.pg(args.pg.as_deref())?)?;
    let repo = Arc::new(settings.open_repository().await?);
    let opts = StreamOptions {
        slot: args.slot,
        partial_interval: args.partial_interval,
        synchronous: args.synchronous,
        status_interval: args.status_interval,
        status_file: args.status_file,
        ..StreamOptions::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: uploading what was received");
        let _ = stop_tx.send(true);
    });
    run_stream(repo, &settings.stanza, &params, &opts, stop_rx).await?;
    Ok(())
}

/// Options of `walvault wal-push`.
#[derive(Debug, Args)]
pub struct WalPushArgs {
    /// The WAL file to archive (%p).
    pub path: PathBuf,
    /// Archive ahead: a background process pushes every file PostgreSQL has
    /// marked ready (pg_wal/archive_status), several at once, and this call
    /// only waits until its own file is durable — usually it already is.
    /// For high WAL rates.
    #[arg(long = "async")]
    pub async_: bool,
    /// With --async: the directory for the background process's marks, lock
    /// and log [default: walvault-push in the WAL file's directory].
    #[arg(long)]
    pub spool: Option<PathBuf>,
    /// With --async: files the background process pushes at once (small
    /// switched segments wait on the disk or network more than the CPU).
    #[arg(long, default_value = "4")]
    pub async_parallel: usize,
    /// With --async: seconds to wait for the file before failing (PostgreSQL
    /// calls again).
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    pub async_timeout: Duration,
}

/// The background process's log is started afresh beyond this size.
const WORKER_LOG_MAX: u64 = 1 << 20;

/// Set in the background process `wal-push --async` starts.
const PUSH_WORKER: &str = "WALVAULT_PUSH_WORKER";

pub(super) async fn wal_push(settings: &Settings, args: WalPushArgs) -> anyhow::Result<()> {
    if args.async_ {
        return wal_push_async(settings, args).await;
    }
    push_now(settings, &args.path).await
}

async fn push_now(settings: &Settings, path: &std::path::Path) -> anyhow::Result<()> {
    let repo = settings.open_repository().await?;
    match crate::archive::push::wal_push(&repo, &settings.stanza, path).await? {
        WalStored::New => tracing::debug!(path = %path.display(), "archived"),
        WalStored::AlreadyThere => tracing::info!(
            path = %path.display(),
            "already archived with the same content"
        ),
    }
    Ok(())
}

async fn wal_push_async(settings: &Settings, args: WalPushArgs) -> anyhow::Result<()> {
    use crate::archive::push_async::{default_spool, mark_error, run_worker, wait_for, WORKER_LOG};
    let spool = args
        .spool
        .clone()
        .unwrap_or_else(|| default_spool(&args.path));
    let wal_dir = args
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_owned();
    let file_name = args
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} names no file", args.path.display()))?;
    let name = crate::pg::WalFileName::parse_any_size(file_name).with_context(|| {
        format!(
            "{} is not a WAL file name (segment, .partial, .history or .backup)",
            args.path.display()
        )
    })?;
    if std::env::var_os(PUSH_WORKER).is_some() {
        let worked = async {
            let repo = settings.open_repository().await?;
            run_worker(
                &repo,
                &settings.stanza,
                &wal_dir,
                &spool,
                args.async_parallel,
            )
            .await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = &worked {
            // the call that started this process is waiting for its file
            let _ = mark_error(&spool, &name, &format!("{e:#}"));
        }
        return worked;
    }
    if !wal_dir
        .join("archive_status")
        .join(format!("{name}.ready"))
        .exists()
    {
        // not a file PostgreSQL's archiver is waiting for (a manual push):
        // the background process would never see it
        return push_now(settings, &args.path).await;
    }
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    let start_worker = || -> std::io::Result<()> {
        use std::os::unix::process::CommandExt;
        // the log lives in pg_wal: kept to what the last runs said
        let log_path = spool.join(WORKER_LOG);
        let fresh = std::fs::metadata(&log_path).is_ok_and(|m| m.len() > WORKER_LOG_MAX);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(!fresh)
            .write(true)
            .truncate(fresh)
            .open(&log_path)?;
        std::process::Command::new(super::own_program()?)
            .args(std::env::args_os().skip(1))
            .env(PUSH_WORKER, "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map(|_| ())
    };
    wait_for(&spool, &name, args.async_timeout, start_worker).await?;
    Ok(())
}

/// Options of `walvault wal-verify`.
#[derive(Debug, Args)]
pub struct WalVerifyArgs {
    /// Only check that the files exist (do not download and check them).
    #[arg(long)]
    pub names_only: bool,
    /// Segments downloaded at once.
    #[arg(long, default_value = "8")]
    pub parallel: usize,
    /// As JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn wal_verify(settings: &Settings, args: WalVerifyArgs) -> anyhow::Result<()> {
    let repo = settings.open_repository().await?;
    let paths = crate::repo::StanzaPaths::new(&settings.stanza);
    let points = crate::ops::records::restore_points(&repo, &paths).await?;
    let opts = crate::archive::verify::WalVerifyOptions {
        read_content: !args.names_only,
        parallel: args.parallel,
        points: points.clone(),
        already_read: Default::default(),
    };
    let r = crate::archive::verify::wal_verify(&repo, &settings.stanza, &opts).await?;
    if args.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        outln!(
            "{} backup(s); {} segment(s) needed, {} read; newest {}",
            r.backups,
            r.segments_needed,
            r.segments_read,
            r.newest.map_or_else(|| "-".to_owned(), |n| n.to_string())
        )?;
        for g in &r.gaps {
            outln!(
                "GAP {} .. {} ({} segment(s)), needed by backup(s) {}",
                g.from,
                g.to,
                g.segments,
                g.backups.join(", ")
            )?;
        }
        for d in &r.damaged {
            outln!("DAMAGED {}: {}", d.name, d.error)?;
        }
        if r.ok() && points.is_empty() {
            outln!("WAL is continuous from every backup to the newest segment")?;
        } else if r.ok() {
            outln!(
                "WAL is continuous from every recovery base to the newest segment; {} restore point(s) kept by retention have their own WAL",
                points.len()
            )?;
        }
    }
    if !r.ok() {
        anyhow::bail!(
            "{} gap(s) and {} damaged segment(s): point-in-time recovery cannot cross them; take a new backup after the last gap",
            r.gaps.len(),
            r.damaged.len()
        );
    }
    Ok(())
}
