//! `walvault copy`: the options and the printing; the work is `ops::copy`.

use std::sync::Arc;

use clap::Args;

use super::output::outln;
use super::Settings;
use crate::ops::copy::{copy, CopyOptions, Selection};

/// Options of `walvault copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The `[[repository]]` of walvault.toml to copy to.
    #[arg(long)]
    pub to: String,
    /// Which backups: all, last, or gfs (the restore points the last
    /// expire kept by an hourly, daily, weekly, monthly or yearly rule, and
    /// the newest backup).
    #[arg(long, default_value = "all")]
    pub backups: String,
    /// Copy only each backup's own WAL: the copy restores the backups but
    /// cannot recover past them.
    #[arg(long)]
    pub no_wal: bool,
    /// Objects read and written at once.
    #[arg(long, default_value = "8")]
    pub parallel: usize,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn selection(s: &str) -> anyhow::Result<Selection> {
    Ok(match s {
        "all" => Selection::All,
        "last" => Selection::Last,
        "gfs" => Selection::Gfs,
        other => anyhow::bail!("--backups {other:?}: give all, last or gfs"),
    })
}

pub(super) async fn run(settings: &Settings, args: CopyArgs) -> anyhow::Result<()> {
    let backups = selection(&args.backups)?;
    let target = settings.repository(&args.to)?;
    let src = Arc::new(settings.open_repository().await?);
    let dst = Arc::new(settings.open_entry(target).await?);
    let opts = CopyOptions {
        backups,
        wal: !args.no_wal,
        parallel: args.parallel,
    };
    let r = copy(src, dst, &settings.stanza, &opts).await?;
    if args.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        outln!(
            "copied {} backup(s) to {} ({} already there), {} WAL file(s); {} block(s) read, {} new{}; {} written in {:.1} s",
            r.backups_copied.len(),
            args.to,
            r.backups_present.len(),
            r.wal_files,
            r.blocks_read,
            r.blocks_new,
            if r.reencrypted { ", re-encrypted" } else { "" },
            super::backup::human(r.bytes_moved),
            r.seconds
        )?;
        for b in &r.backups_copied {
            outln!("  {b}")?;
        }
    }
    Ok(())
}
