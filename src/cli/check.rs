//! `walvault check`: the options and the printing; the work is
//! `ops::check`. Exit codes: 0 healthy, 1 error (server or repository
//! unreachable, bad input), 3 a budget breached.

use std::time::Duration;

use clap::Args;

use super::duration::parse_duration;
use super::output::outln;
use super::{Exit, Settings};
use crate::ops::check::{check, Budgets, Level};
use crate::pg::ConnParams;

/// Options of `walvault check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Connection to the server, as a role with REPLICATION (and the right
    /// to read pg_replication_slots and pg_stat_replication).
    #[arg(long, env = "WALVAULT_PG")]
    pub pg: String,
    /// The slot `walvault stream` uses.
    #[arg(long, default_value = "walvault")]
    pub slot: String,
    /// Breach when a crash now would lose more than this (e.g. 1m).
    #[arg(long, value_parser = parse_duration)]
    pub max_rpo: Option<Duration>,
    /// Breach when recovering to now is estimated to take longer (e.g. 15m).
    #[arg(long, value_parser = parse_duration)]
    pub max_rto: Option<Duration>,
    /// Breach when the newest backup is older (e.g. 26h).
    #[arg(long, value_parser = parse_duration)]
    pub max_backup_age: Option<Duration>,
    /// Breach when the newest drill is older, or failed (e.g. 8d).
    #[arg(long, value_parser = parse_duration)]
    pub max_drill_age: Option<Duration>,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(settings: &Settings, args: CheckArgs) -> anyhow::Result<()> {
    let params = ConnParams::parse(&args.pg)?;
    let repo = settings.open_repository().await?;
    let budgets = Budgets {
        max_rpo: args.max_rpo,
        max_rto: args.max_rto,
        max_backup_age: args.max_backup_age,
        max_drill_age: args.max_drill_age,
    };
    let r = check(&repo, &settings.stanza, &params, &args.slot, &budgets).await?;
    if args.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        for f in &r.findings {
            let tag = match f.level {
                Level::Ok => "ok",
                Level::Warning => "WARNING",
                Level::Breach => "BREACH",
            };
            outln!("{tag:<8} {:<22} {}", f.check, f.detail)?;
        }
    }
    if r.breached() {
        let which: Vec<&str> = r
            .findings
            .iter()
            .filter(|f| f.level == Level::Breach)
            .map(|f| f.check)
            .collect();
        return Err(Exit {
            code: 3,
            message: format!("breached: {}", which.join(", ")),
        }
        .into());
    }
    Ok(())
}
