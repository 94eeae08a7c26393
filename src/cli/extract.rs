//! `walvault extract`: one table or one database as of a moment, through a
//! sparse recovery in a scratch directory (`ops::extract`); this file holds
//! the options and prints the plan and the report.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use super::output::outln;
use super::Settings;
use crate::ops::extract::{extract, Destination, ExtractOptions, ExtractPlan, ExtractReport, What};
use crate::progress::human_bytes;
use crate::restore::pitr::{parse_target_time, Target};

/// Options of `walvault extract`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
#[command(group(clap::ArgGroup::new("dest").required(true).multiple(false)))]
pub struct ExtractArgs {
    /// The table: SCHEMA.TABLE, or TABLE in schema public (double quotes
    /// keep case and dots: '"Sales"."Q1.orders"'). Without it, the whole
    /// --database.
    #[arg(long)]
    pub table: Option<String>,
    /// The database [default: postgres].
    #[arg(long)]
    pub database: Option<String>,
    /// The moment (ISO 8601 or PostgreSQL timestamptz; a time zone is
    /// required unless --timezone is given).
    #[arg(long, group = "target")]
    pub target_time: Option<String>,
    /// Up to this transaction's commit (with --exclusive: just before it,
    /// e.g. the transaction that deleted the rows).
    #[arg(long, group = "target")]
    pub target_xid: Option<u32>,
    /// Up to this LSN (X/X).
    #[arg(long, group = "target")]
    pub target_lsn: Option<crate::pg::Lsn>,
    /// Time zone of a --target-time that has none (+02:00, UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    pub exclusive: bool,
    /// Backup to start from (default: the newest that reaches the target).
    #[arg(long)]
    pub backup: Option<String>,
    /// Write a pg_dump SQL script to this file (a new file).
    #[arg(long, group = "dest", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Restore the table straight into this live database (a connection
    /// string) under a new name (--as); the original is not touched.
    #[arg(long, group = "dest", value_name = "CONNINFO")]
    pub into: Option<String>,
    /// The restored table's name with --into [default:
    /// <table>_restored_<HHMM of the target> or _<xid>/_<lsn>]; its indexes
    /// and sequences get the same suffix.
    #[arg(long = "as", value_name = "NAME")]
    pub as_name: Option<String>,
    /// Role pg_dump connects as on the scratch server [default: [drill]
    /// user, or postgres].
    #[arg(long)]
    pub user: Option<String>,
    /// OS user PostgreSQL runs as when walvault runs as root [default:
    /// [drill] run_as, or postgres].
    #[arg(long)]
    pub run_as: Option<String>,
    /// Directory for the scratch directory [default: [drill] scratch, or
    /// the system's temporary directory].
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Directory of the server and client binaries of the backup's major
    /// [default: /usr/lib/postgresql/<major>/bin].
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    /// Print the plan (what is downloaded, the WAL, the estimate) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the (stopped) scratch directory for inspection.
    #[arg(long)]
    pub keep: bool,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `SCHEMA.TABLE`, `TABLE` (schema public) or quoted parts.
fn parse_table(s: &str) -> anyhow::Result<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut was_quoted) = (false, false);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            '.' if !quoted => {
                parts.push((std::mem::take(&mut cur), was_quoted));
                was_quoted = false;
            }
            c => cur.push(c),
        }
    }
    if quoted {
        bail!("--table {s:?}: a double quote is not closed");
    }
    parts.push((cur, was_quoted));
    // unquoted names are folded to lower case, as PostgreSQL does
    let fold = |(p, q): (String, bool)| if q { p } else { p.to_lowercase() };
    let mut parts: Vec<String> = parts.into_iter().map(fold).collect();
    if parts.iter().any(|p| p.is_empty()) || parts.len() > 2 {
        bail!("--table {s:?}: give SCHEMA.TABLE or TABLE");
    }
    let name = parts.pop().unwrap_or_default();
    let schema = parts.pop().unwrap_or_else(|| "public".to_owned());
    Ok((schema, name))
}

/// The default --as name: `<table>_restored_<HHMM>` for a time target.
fn default_name(table: &str, target: &Target) -> String {
    let stamp = match target {
        Target::Time(t) => t.format("%H%M").to_string(),
        Target::Xid(x) => format!("x{x}"),
        Target::Lsn(l) => l.to_string().replace('/', "_").to_lowercase(),
        _ => "latest".to_owned(),
    };
    let suffix = format!("_restored_{stamp}");
    let mut base = table.to_owned();
    while base.len() + suffix.len() > 63 && !base.is_empty() {
        base.pop();
    }
    format!("{base}{suffix}")
}

pub(super) async fn run(settings: &Settings, args: ExtractArgs) -> anyhow::Result<()> {
    let cfg = &settings.drill;
    let target = if let Some(t) = &args.target_time {
        Target::Time(parse_target_time(t, args.timezone.as_deref())?)
    } else if let Some(x) = args.target_xid {
        Target::Xid(x)
    } else if let Some(l) = args.target_lsn {
        Target::Lsn(l)
    } else {
        bail!("give the moment: --target-time, --target-xid or --target-lsn");
    };
    let what = match &args.table {
        Some(t) => {
            let (schema, name) = parse_table(t)?;
            What::Table { schema, name }
        }
        None => What::Database,
    };
    let destination = match (&args.output, &args.into) {
        (Some(f), _) => Destination::File(f.clone()),
        (None, Some(c)) => {
            let What::Table { name, .. } = &what else {
                bail!("--into restores one table: give --table (a whole database goes to a file with --output)");
            };
            Destination::Into {
                conninfo: c.clone(),
                name: args
                    .as_name
                    .clone()
                    .unwrap_or_else(|| default_name(name, &target)),
            }
        }
        (None, None) => bail!("give --output FILE or --into CONNINFO"),
    };
    if args.as_name.is_some() && args.into.is_none() {
        bail!(
            "--as names the table --into creates; with --output the dump keeps the original name"
        );
    }
    let opts = ExtractOptions {
        database: args
            .database
            .clone()
            .unwrap_or_else(|| "postgres".to_owned()),
        what,
        target,
        exclusive: args.exclusive,
        backup: args.backup.clone(),
        destination,
        scratch: args
            .scratch
            .clone()
            .or_else(|| cfg.scratch.clone())
            .unwrap_or_else(std::env::temp_dir),
        pg_bin: args.pg_bin.clone().or_else(|| cfg.pg_bin.clone()),
        run_as: args.run_as.clone().or_else(|| cfg.run_as.clone()),
        user: args
            .user
            .clone()
            .or_else(|| cfg.user.clone())
            .unwrap_or_else(|| "postgres".into()),
        restore_command: super::backup::restore_command(settings)?,
        dry_run: args.dry_run,
        keep: args.keep,
        events: Some(Arc::new(|e| tracing::info!("extract: {e}"))),
    };
    let repo = Arc::new(settings.open_repository().await?);
    let r = extract(repo, &settings.stanza, &opts)
        .await
        .context("extract")?;
    if args.json {
        outln!("{}", serde_json::to_string(&r)?)?;
        return Ok(());
    }
    print_plan(&r.plan)?;
    if opts.dry_run {
        outln!("dry run: nothing was downloaded")?;
        return Ok(());
    }
    print_report(&r)
}

fn print_plan(p: &ExtractPlan) -> anyhow::Result<()> {
    let all = p.fetch_bytes + p.sparse_bytes;
    outln!(
        "plan: {} of database {} as of {} from backup {}",
        p.table.as_deref().unwrap_or("all"),
        p.database,
        p.target,
        p.backup
    )?;
    outln!(
        "  download   {} file(s), {} of the backup's {} ({:.1} %); {} file(s) left as holes",
        p.fetch_files,
        human_bytes(p.fetch_bytes),
        human_bytes(all),
        100.0 * p.fetch_bytes as f64 / all.max(1) as f64,
        p.sparse_files
    )?;
    outln!(
        "  WAL        {} file(s), {} to replay",
        p.wal_files,
        human_bytes(p.wal_bytes)
    )?;
    outln!("  estimated  {:.0} s", p.estimated_seconds)?;
    outln!("  reachable  {}", p.reachable)?;
    for n in &p.notes {
        outln!("  note       {n}")?;
    }
    Ok(())
}

fn print_report(r: &ExtractReport) -> anyhow::Result<()> {
    if let Some(rec) = &r.recovery {
        outln!(
            "recovered   {}{} in {:.1} s: files {:.1} s ({} read), WAL {} fetched, replay {:.1} s",
            rec.outcome,
            rec.last_replayed_commit_time
                .as_deref()
                .map(|t| format!(" (last transaction {t})"))
                .unwrap_or_default(),
            rec.total_seconds,
            rec.phases.restore_seconds,
            human_bytes(rec.restore_fetched_bytes),
            human_bytes(rec.wal_bytes_fetched),
            rec.phases.replay_seconds.unwrap_or(0.0)
        )?;
    }
    outln!(
        "downloaded  {} in all ({:.1} % of the backup's files)",
        human_bytes(r.downloaded_bytes),
        100.0 * r.downloaded_bytes as f64
            / (r.plan.fetch_bytes + r.plan.sparse_bytes).max(1) as f64
    )?;
    if let Some(a) = &r.amcheck {
        outln!("pg_amcheck  {a}")?;
    }
    if let Some(n) = r.rows {
        outln!("rows        {n}")?;
    }
    if let Some(out) = &r.output {
        outln!(
            "written     {out}{} in {:.1} s; total {:.1} s",
            r.dump_bytes
                .map(|b| format!(" ({})", human_bytes(b)))
                .unwrap_or_default(),
            r.dump_seconds.unwrap_or(0.0),
            r.total_seconds
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_like_postgresql() {
        let p = |s: &str| parse_table(s).unwrap();
        assert_eq!(p("orders"), ("public".into(), "orders".into()));
        assert_eq!(p("Sales.Orders"), ("sales".into(), "orders".into()));
        assert_eq!(
            p("\"Sales\".\"Q1.orders\""),
            ("Sales".into(), "Q1.orders".into())
        );
        assert_eq!(p("s.\"a\"\"b\""), ("s".into(), "a\"b".into()));
        for bad in ["", "a.", ".b", "a.b.c", "\"open"] {
            assert!(parse_table(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_names_say_the_moment() {
        let t = Target::Time("2026-12-04T14:02:00Z".parse().unwrap());
        assert_eq!(default_name("orders", &t), "orders_restored_1402");
        assert_eq!(
            default_name("orders", &Target::Xid(991)),
            "orders_restored_x991"
        );
        let long = "t".repeat(63);
        assert_eq!(default_name(&long, &Target::Xid(1)).len(), 63);
    }
}
