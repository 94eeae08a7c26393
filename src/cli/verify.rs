//! `walvault verify`: the options and the printing; the work is
//! `ops::verify`.

use clap::Args;

use super::output::outln;
use super::Settings;
use crate::ops::verify::{verify, VerifyOptions};

/// Options of `walvault verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Read every pack and WAL file completely and authenticate every byte.
    #[arg(long)]
    pub deep: bool,
    /// Read deeply only the packs and WAL written since the last passing
    /// deep verify (implies --deep for those).
    #[arg(long)]
    pub since_last: bool,
    /// Also re-read this share of what earlier verifies read (scrubbing),
    /// in percent, e.g. 1.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent, requires = "since_last")]
    pub sample: Option<f64>,
    /// Objects read at once.
    #[arg(long, default_value = "8")]
    pub parallel: usize,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

pub(super) async fn run(settings: &Settings, args: VerifyArgs) -> anyhow::Result<()> {
    let repo = settings.open_repository().await?;
    let opts = VerifyOptions {
        deep: args.deep,
        since_last: args.since_last,
        sample_percent: args.sample,
        parallel: args.parallel,
    };
    let r = verify(&repo, &settings.stanza, &opts).await?;
    if args.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        outln!(
            "{} backup(s), {} pack(s) checked, {} read ({}), {} WAL file(s) read ({})",
            r.backups,
            r.packs_checked,
            r.packs_read,
            super::backup::human(r.pack_bytes_read),
            r.wal_files_read,
            super::backup::human(r.wal_bytes_read)
        )?;
        for p in &r.problems {
            outln!("PROBLEM {p}")?;
        }
        if r.passed {
            outln!("the repository verifies clean")?;
        }
    }
    if !r.passed {
        anyhow::bail!(
            "{} problem(s) found: the backups named above cannot be restored as they are",
            r.problems.len()
        );
    }
    Ok(())
}
