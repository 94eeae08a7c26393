//! `walvault drill`: the options (flags over the `[drill]` table of
//! walvault.toml) and the printing; the work is `ops::drill`. Exit codes:
//! 0 the drill passed, 3 it ran and failed (recovery is not proven; the
//! failure is recorded), 1 it could not run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use super::duration::parse_duration;
use super::output::outln;
use super::{Exit, Settings};
use crate::ops::drill::{drill, CheckStatus, DrillOptions, DrillTarget};
use crate::restore::pitr::parse_target_time;

/// The `[drill]` table of walvault.toml (keys named after the flags;
/// `pg_bin` with an underscore, as in the other tables, is read too).
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DrillConfig {
    /// Queries that must return true on the recovered server (added to
    /// those of `--sql`).
    #[serde(default)]
    pub sql: Vec<String>,
    /// `--database`.
    pub database: Option<String>,
    /// `--user`.
    pub user: Option<String>,
    /// `--run-as`.
    #[serde(alias = "run_as")]
    pub run_as: Option<String>,
    /// `--scratch`.
    pub scratch: Option<PathBuf>,
    /// `--pg-bin`.
    #[serde(alias = "pg_bin")]
    pub pg_bin: Option<PathBuf>,
    /// `--set`, as a table: `settings = { shared_buffers = "128MB" }`.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

/// Options of `walvault drill`.
#[derive(Debug, Default, Args)]
#[command(group(clap::ArgGroup::new("moment").multiple(false)))]
pub struct DrillArgs {
    /// Recover to this time (default: a random moment inside the recovery
    /// window).
    #[arg(long, group = "moment")]
    pub target_time: Option<String>,
    /// Recover everything archived.
    #[arg(long, group = "moment")]
    pub latest: bool,
    /// A random moment between the oldest backup with WAL after it and the
    /// newest archived commit (the default).
    #[arg(long, group = "moment")]
    pub random: bool,
    /// Time zone of a --target-time that has none (+02:00, UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// Backup to restore (default: the newest that reaches the moment).
    #[arg(long)]
    pub backup: Option<String>,
    /// A file of checks: SQL queries separated by `;`, each of which must
    /// return true on the recovered server (e.g. `select count(*) > 0
    /// from orders;`).
    #[arg(long, value_name = "FILE")]
    pub sql: Option<PathBuf>,
    /// Database the checks run in [default: postgres].
    #[arg(long)]
    pub database: Option<String>,
    /// Role the checks connect as [default: postgres].
    #[arg(long)]
    pub user: Option<String>,
    /// OS user PostgreSQL runs as when walvault runs as root [default:
    /// postgres]; it must be able to run walvault and read the repository
    /// (its restore_command is wal-fetch).
    #[arg(long)]
    pub run_as: Option<String>,
    /// Directory for the scratch directory (needs the backup's size free)
    /// [default: the system's temporary directory].
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Directory of the server binaries [default: /usr/lib/postgresql/<major>/bin].
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    /// A server setting for the scratch run: NAME=VALUE (e.g.
    /// shared_buffers=128MB); repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Fail when the recovery takes longer (e.g. 15m).
    #[arg(long, value_parser = parse_duration)]
    pub max_rto: Option<Duration>,
    /// Keep the (stopped) scratch directory for inspection.
    #[arg(long)]
    pub keep: bool,
    /// The result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The checks in an `--sql` file: statements separated by `;`, comments
/// (`--` to the end of the line, `/* */`, nested) dropped, runs of
/// whitespace made one space — all outside quoted text: `'…'` strings,
/// `"…"` identifiers and `$tag$…$tag$` bodies are kept as written.
fn sql_checks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let quoted_end = |open: &str, close: &str| -> usize {
            // (a doubled quote inside is the quote itself: found again)
            rest[open.len()..]
                .find(close)
                .map_or(rest.len(), |i| i + open.len() + close.len())
        };
        let take = if rest.starts_with("--") {
            rest = rest.find('\n').map_or("", |i| &rest[i..]);
            continue;
        } else if rest.starts_with("/*") {
            let mut depth = 0usize;
            let mut i = 0;
            while i < rest.len() {
                if rest[i..].starts_with("/*") {
                    depth += 1;
                    i += 2;
                } else if rest[i..].starts_with("*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += rest[i..].chars().next().map_or(1, char::len_utf8);
                }
            }
            rest = &rest[i.min(rest.len())..];
            if !cur.ends_with(' ') {
                cur.push(' ');
            }
            continue;
        } else if c == '\'' || c == '"' {
            let q = &rest[..1];
            quoted_end(q, q)
        } else if let Some(tag) = dollar_tag(rest) {
            quoted_end(tag, tag)
        } else if c == ';' {
            out.push(cur.trim().to_owned());
            cur.clear();
            rest = &rest[1..];
            continue;
        } else if c.is_whitespace() {
            if !cur.ends_with(' ') {
                cur.push(' ');
            }
            rest = &rest[c.len_utf8()..];
            continue;
        } else {
            c.len_utf8()
        };
        cur.push_str(&rest[..take]);
        rest = &rest[take..];
    }
    out.push(cur.trim().to_owned());
    out.retain(|s| !s.is_empty());
    out
}

/// The `$tag$` (or `$$`) that opens a dollar-quoted body at the start of
/// `s`, if one does.
fn dollar_tag(s: &str) -> Option<&str> {
    let body = s.strip_prefix('$')?;
    let end = body.find('$')?;
    let tag = &body[..end];
    let ident = tag.chars().all(|c| c.is_alphanumeric() || c == '_')
        && !tag.starts_with(|c: char| c.is_ascii_digit());
    ident.then(|| &s[..end + 2])
}

/// A drill's options: the flags over `[drill]`.
pub(super) fn options(settings: &Settings, args: &DrillArgs) -> anyhow::Result<DrillOptions> {
    let cfg = &settings.drill;
    let target = if let Some(t) = &args.target_time {
        DrillTarget::Time(parse_target_time(t, args.timezone.as_deref())?)
    } else if args.latest {
        DrillTarget::Latest
    } else {
        DrillTarget::Random
    };
    let mut sql = cfg.sql.clone();
    if let Some(f) = &args.sql {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the checks in {}", f.display()))?;
        let checks = sql_checks(&text);
        anyhow::ensure!(
            !checks.is_empty(),
            "{} holds no query: write one check per statement, each ending with ;",
            f.display()
        );
        sql.extend(checks);
    }
    let mut set: Vec<(String, String)> = cfg
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for s in &args.set {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set {s:?}: give NAME=VALUE"))?;
        set.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(DrillOptions {
        target,
        backup: args.backup.clone(),
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
        database: args
            .database
            .clone()
            .or_else(|| cfg.database.clone())
            .unwrap_or_else(|| "postgres".into()),
        sql,
        settings: set,
        // the drill proves the main repository: its server never reads a copy
        restore_command: super::backup::restore_command(settings)?
            .strip_suffix(" %f %p")
            .map(|c| format!("{c} --no-fallback %f %p"))
            .context("unexpected restore_command")?,
        max_rto: args.max_rto,
        keep: args.keep,
        events: Some(Arc::new(|e| tracing::info!("drill: {e}"))),
    })
}

pub(super) async fn run(settings: &Settings, args: DrillArgs) -> anyhow::Result<()> {
    let opts = options(settings, &args)?;
    let repo = Arc::new(settings.open_repository().await?);
    let r = drill(repo, &settings.stanza, &opts).await?;
    if args.json {
        outln!("{}", serde_json::to_string(&r)?)?;
    } else {
        outln!(
            "drill to {} from backup {}",
            r.target,
            r.backup.as_deref().unwrap_or("(none)")
        )?;
        for c in &r.checks {
            let tag = match c.status {
                CheckStatus::Passed => "ok",
                CheckStatus::Failed => "FAILED",
                CheckStatus::Skipped => "skipped",
            };
            outln!("{tag:<8} {:<14} {}", c.name, c.detail)?;
        }
        if let Some(rto) = r.rto_seconds {
            outln!("measured RTO {rto:.1} s")?;
        }
        for (t, n) in &r.row_counts {
            outln!("rows     {t} {n}")?;
        }
        if r.passed {
            outln!("the drill passed: recovery to {} works", r.target)?;
        }
    }
    if !r.passed {
        return Err(Exit {
            code: 3,
            message: format!(
                "the drill failed ({}); it is recorded",
                r.failure().unwrap_or_else(|| "no check ran".into())
            ),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{sql_checks, DrillConfig};

    #[test]
    fn keys_read_with_dashes_or_underscores() {
        let d: DrillConfig = toml::from_str("pg_bin = \"/a\"\nrun-as = \"b\"").unwrap();
        assert_eq!(d.pg_bin.unwrap(), std::path::PathBuf::from("/a"));
        assert_eq!(d.run_as.unwrap(), "b");
        let r: crate::cli::retention::RetentionConfig =
            toml::from_str("keep_last = 3\nkeep-daily = 2\npack_grace = \"1h\"").unwrap();
        assert_eq!((r.keep_last, r.keep_daily), (Some(3), Some(2)));
        assert_eq!(r.pack_grace.as_deref(), Some("1h"));
        assert!(toml::from_str::<DrillConfig>("pgbin = \"/a\"").is_err());
    }

    #[test]
    fn sql_files_split_into_one_check_per_statement() {
        let text = "-- orders must exist\nselect count(*) > 0\n  from orders;\n\nselect true; -- trailing\n  ;\n";
        assert_eq!(
            sql_checks(text),
            vec!["select count(*) > 0 from orders", "select true"]
        );
        assert!(sql_checks("-- nothing\n").is_empty());
        // quoted text is kept whole: no split, no comment, no squeezing
        assert_eq!(
            sql_checks(
                "select 'a;b -- c  d' = x from t; /* one; /* nested; */ */ select \"odd;name\" from t;\n\
                 select $$x; -- y$$, $f$ ; $f$, $1 from t; select 'it''s;'"
            ),
            vec![
                "select 'a;b -- c  d' = x from t",
                "select \"odd;name\" from t",
                "select $$x; -- y$$, $f$ ; $f$, $1 from t",
                "select 'it''s;'",
            ]
        );
    }
}
