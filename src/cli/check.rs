//! `walvault check`: the options and the printing; the work is
//! `ops::check`. Exit codes: 0 healthy, 1 error (server or repository
//! unreachable, bad input), 3 a budget breached.

use clap::Args;

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
    pub pg: Option<String>,
    /// The slot `walvault stream` uses.
    #[arg(long, default_value = "walvault")]
    pub slot: String,
    /// The budgets (else `[budgets]` of walvault.toml).
    #[command(flatten)]
    pub budgets: Budgets,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(settings: &Settings, args: CheckArgs) -> anyhow::Result<()> {
    let params = ConnParams::parse(settings.pg(args.pg.as_deref())?)?;
    let repo = settings.open_repository().await?;
    let budgets = args.budgets.or(&settings.budgets);
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
