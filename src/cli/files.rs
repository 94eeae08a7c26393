//! `walvault files …`: snapshots of file trees beside the database
//! (`crate::files`), and the `[files.<set>]` tables of walvault.toml.

use std::sync::Arc;

use clap::{Args, Subcommand};
use serde::Deserialize;

use super::backup::human;
use super::output::outln;
use super::Settings;
use crate::files::backup::{backup, FilesBackupOptions};
use crate::files::restore::{restore, FilesRestoreOptions, FilesRestoreReport};
use crate::files::verify::verify;
use crate::files::Pick;
use crate::repo::files::{list_heads, SnapshotHead};
use crate::repo::StanzaPaths;
use crate::restore::pitr::parse_target_time;
use crate::storage::S3Config;

/// A `[files.<set>]` table of walvault.toml: what `files backup --set
/// <set>` backs up when no `--source` is given.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSetConfig {
    /// A directory or `s3://bucket/prefix`.
    pub source: Option<String>,
    /// Glob patterns left out (`*.tmp`, `cache/**`), added to `--exclude`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// The source bucket's S3 settings (default: the top-level `[s3]`).
    pub s3: Option<S3Config>,
}

/// `walvault files` subcommands.
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Take a snapshot of a directory or a bucket into the repository
    /// (unchanged files are not read again).
    Backup(FilesBackupArgs),
    /// List the snapshots.
    List(FilesListArgs),
    /// Write a snapshot to a directory or a bucket.
    Restore(FilesRestoreArgs),
    /// Check that every chunk of every snapshot is in the repository
    /// (--deep: read and authenticate each).
    Verify(FilesVerifyArgs),
    /// Restore a random sample of the newest snapshot's files and compare
    /// them with the source's files that have not changed since.
    Drill(FilesDrillArgs),
}

/// Options of `walvault files drill`.
#[derive(Debug, Args)]
pub struct FilesDrillArgs {
    /// The set.
    #[arg(long)]
    pub set: String,
    /// Files in the sample.
    #[arg(long, default_value = "100")]
    pub sample: usize,
    /// Compare with this source [default: the one the snapshot was taken of].
    #[arg(long)]
    pub source: Option<String>,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Options of `walvault files backup`.
#[derive(Debug, Args)]
pub struct FilesBackupArgs {
    /// The set's name (its snapshots are listed, restored and expired together).
    #[arg(long)]
    pub set: String,
    /// A directory or s3://bucket/prefix [default: `source` of [files.<set>]].
    #[arg(long)]
    pub source: Option<String>,
    /// Leave out paths matching this glob (`*` crosses `/`); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Files read at once.
    #[arg(long, default_value = "8")]
    pub parallel: usize,
    /// The snapshot as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Options of `walvault files list`.
#[derive(Debug, Args)]
pub struct FilesListArgs {
    /// Only this set.
    #[arg(long)]
    pub set: Option<String>,
    /// The snapshots as a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// Options of `walvault files restore`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").multiple(false)))]
pub struct FilesRestoreArgs {
    /// The set.
    #[arg(long)]
    pub set: String,
    /// The newest snapshot started at or before this time (ISO 8601 with a
    /// time zone) [default: the newest].
    #[arg(long, group = "which")]
    pub as_of: Option<String>,
    /// This snapshot.
    #[arg(long, group = "which")]
    pub snapshot: Option<String>,
    /// Only paths (keys) starting with this.
    #[arg(long)]
    pub path: Option<String>,
    /// A directory or s3://bucket/prefix; must be empty unless --overwrite.
    #[arg(long)]
    pub to: String,
    /// Write into a target that holds files (same paths are replaced).
    #[arg(long)]
    pub overwrite: bool,
    /// Files written at once.
    #[arg(long, default_value = "8")]
    pub parallel: usize,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Options of `walvault files verify`.
#[derive(Debug, Args)]
pub struct FilesVerifyArgs {
    /// Only this set.
    #[arg(long)]
    pub set: Option<String>,
    /// Read every chunk and authenticate it.
    #[arg(long)]
    pub deep: bool,
    /// Chunks read at once.
    #[arg(long, default_value = "8")]
    pub parallel: usize,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(settings: &Settings, cmd: FilesCommand) -> anyhow::Result<()> {
    match cmd {
        FilesCommand::Backup(a) => run_backup(settings, a).await,
        FilesCommand::List(a) => run_list(settings, a).await,
        FilesCommand::Restore(a) => run_restore(settings, a).await,
        FilesCommand::Verify(a) => run_verify(settings, a).await,
        FilesCommand::Drill(a) => run_drill(settings, a).await,
    }
}

/// The S3 settings of set `set`'s bucket: its own `[files.<set>.s3]`, else `[s3]`.
pub(super) fn set_s3(settings: &Settings, set: &str) -> S3Config {
    settings
        .files
        .get(set)
        .and_then(|c| c.s3.clone())
        .unwrap_or_else(|| settings.storage.s3.clone())
}

async fn run_backup(settings: &Settings, a: FilesBackupArgs) -> anyhow::Result<()> {
    let conf = settings.files.get(&a.set).cloned().unwrap_or_default();
    let Some(source) = a.source.clone().or(conf.source.clone()) else {
        anyhow::bail!(
            "no source for set {:?}: give --source DIR|s3://bucket/prefix, or `source` in [files.{}] of walvault.toml",
            a.set,
            a.set
        );
    };
    let repo = Arc::new(settings.open_repository().await?);
    let opts = FilesBackupOptions {
        set: a.set.clone(),
        source,
        s3: set_s3(settings, &a.set),
        exclude: conf.exclude.iter().chain(&a.exclude).cloned().collect(),
        parallel: a.parallel,
        ..FilesBackupOptions::default()
    };
    let head = backup(repo, &settings.stanza, &opts).await?;
    if a.json {
        outln!("{}", serde_json::to_string(&head)?)?;
    } else {
        outln!(
            "snapshot {} of set {}: {} entries, {} of content; read {}, new {}, stored {} ({:.1} s)",
            head.id,
            head.set,
            head.entries,
            human(head.bytes),
            human(head.read_bytes),
            human(head.new_bytes),
            human(head.stored_bytes),
            (head.finished - head.started).num_milliseconds() as f64 / 1000.0
        )?;
        for s in &head.skipped {
            outln!("LEFT OUT {}: {}", s.path, s.reason)?;
        }
    }
    if head.skipped_count > 0 {
        return Err(super::Exit {
            code: 2,
            message: format!(
                "snapshot {} is stored without {} entr{}: each is named above with the reason",
                head.id,
                head.skipped_count,
                if head.skipped_count == 1 { "y" } else { "ies" }
            ),
        }
        .into());
    }
    Ok(())
}

async fn run_list(settings: &Settings, a: FilesListArgs) -> anyhow::Result<()> {
    let repo = settings.open_repository().await?;
    let paths = StanzaPaths::new(&settings.stanza);
    let heads = list_heads(&repo, &paths, a.set.as_deref()).await?;
    if a.json {
        outln!("{}", serde_json::to_string(&heads)?)?;
        return Ok(());
    }
    if heads.is_empty() {
        outln!("no file snapshots in stanza {}", settings.stanza)?;
        return Ok(());
    }
    outln!(
        "{:<16} {:<24} {:<20} {:>9} {:>10} {:>10}  source",
        "set",
        "snapshot",
        "as of (UTC)",
        "entries",
        "size",
        "stored"
    )?;
    for h in &heads {
        outln!("{}", list_line(h))?;
    }
    Ok(())
}

fn list_line(h: &SnapshotHead) -> String {
    format!(
        "{:<16} {:<24} {:<20} {:>9} {:>10} {:>10}  {}{}",
        h.set,
        h.id,
        h.started.format("%Y-%m-%d %H:%M:%S"),
        h.entries,
        human(h.bytes),
        human(h.stored_bytes),
        h.source,
        if h.skipped_count > 0 {
            format!(" ({} left out)", h.skipped_count)
        } else {
            String::new()
        }
    )
}

/// The snapshot `--as-of`/`--snapshot` name.
pub(super) fn pick(as_of: Option<&str>, snapshot: Option<&str>) -> anyhow::Result<Pick> {
    Ok(match (as_of, snapshot) {
        (Some(t), _) => Pick::AsOf(parse_target_time(t, None)?),
        (None, Some(id)) => Pick::Id(id.to_owned()),
        (None, None) => Pick::Newest,
    })
}

async fn run_restore(settings: &Settings, a: FilesRestoreArgs) -> anyhow::Result<()> {
    let repo = Arc::new(settings.open_repository().await?);
    let opts = FilesRestoreOptions {
        pick: pick(a.as_of.as_deref(), a.snapshot.as_deref())?,
        path_prefix: a.path.clone(),
        to: a.to.clone(),
        s3: set_s3(settings, &a.set),
        overwrite: a.overwrite,
        parallel: a.parallel,
        set: a.set,
    };
    let r = restore(repo, &settings.stanza, &opts).await?;
    print_restore(&r, a.json)
}

/// The restore's report, as text or JSON.
pub(super) fn print_restore(r: &FilesRestoreReport, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(r)?)?;
        return Ok(());
    }
    outln!(
        "restored snapshot {} of set {} (as of {}) to {}: {} file(s), {} {}, {} link(s), {}",
        r.snapshot.id,
        r.snapshot.set,
        r.snapshot
            .started
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        r.target,
        r.files,
        r.dirs,
        if r.dirs == 1 {
            "directory"
        } else {
            "directories"
        },
        r.links,
        human(r.bytes)
    )?;
    for s in &r.skipped {
        outln!("NOT WRITTEN {}: {}", s.path, s.reason)?;
    }
    Ok(())
}

async fn run_verify(settings: &Settings, a: FilesVerifyArgs) -> anyhow::Result<()> {
    let repo = Arc::new(settings.open_repository().await?);
    let r = verify(repo, &settings.stanza, a.set.as_deref(), a.deep, a.parallel).await?;
    if a.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        outln!(
            "{} snapshot(s), {} entries, {} chunk(s) checked, {} read ({})",
            r.snapshots,
            r.entries,
            r.chunks,
            r.chunks_read,
            human(r.bytes_read)
        )?;
        for p in &r.problems {
            outln!("PROBLEM {p}")?;
        }
        if r.passed {
            outln!("the file snapshots verify clean")?;
        }
    }
    if !r.passed {
        anyhow::bail!(
            "{} problem(s) found: the snapshots named above cannot be restored as they are",
            r.problems.len()
        );
    }
    Ok(())
}

async fn run_drill(settings: &Settings, a: FilesDrillArgs) -> anyhow::Result<()> {
    let repo = Arc::new(settings.open_repository().await?);
    let opts = crate::files::drill::FilesDrillOptions {
        sample: a.sample,
        source: a.source.clone(),
        s3: set_s3(settings, &a.set),
        set: a.set.clone(),
    };
    let r = crate::files::drill::drill(repo, &settings.stanza, &opts).await?;
    if a.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        outln!(
            "snapshot {} of set {}: {} file(s) sampled, {} restored ({}), {} equal to the source, {} changed in the source since (not compared)",
            r.snapshot,
            a.set,
            r.sampled,
            r.restored,
            human(r.restored_bytes),
            r.matched,
            r.changed_since
        )?;
        for m in &r.mismatches {
            outln!("MISMATCH {}: {}", m.path, m.reason)?;
        }
    }
    if !r.passed {
        anyhow::bail!(
            "{} of {} sampled file(s) do not match: the snapshot does not hold what the source held",
            r.mismatches.len(),
            r.sampled
        );
    }
    Ok(())
}
