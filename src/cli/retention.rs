//! `walvault expire`, `hold` and `release`: the options (flags over the
//! `[retention]` table of walvault.toml) and the printing; the work is
//! `ops::expire` and `ops::holds`.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;

use super::duration::parse_duration;
use super::output::outln;
use super::Settings;
use crate::ops::expire::{expire, rule_text, ExpireOptions, ExpireReport};
use crate::ops::retention::{parse_timezone, Policy};
use crate::repo::StanzaPaths;

/// The `[retention]` table of walvault.toml (keys named after the flags;
/// `keep_last` with an underscore, as in the other tables, is read too).
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionConfig {
    /// `--keep-within`.
    #[serde(alias = "keep_within")]
    pub keep_within: Option<String>,
    /// `--keep-last`.
    #[serde(alias = "keep_last")]
    pub keep_last: Option<u32>,
    /// `--keep-hourly`.
    #[serde(alias = "keep_hourly")]
    pub keep_hourly: Option<u32>,
    /// `--keep-daily`.
    #[serde(alias = "keep_daily")]
    pub keep_daily: Option<u32>,
    /// `--keep-weekly`.
    #[serde(alias = "keep_weekly")]
    pub keep_weekly: Option<u32>,
    /// `--keep-monthly`.
    #[serde(alias = "keep_monthly")]
    pub keep_monthly: Option<u32>,
    /// `--keep-yearly`.
    #[serde(alias = "keep_yearly")]
    pub keep_yearly: Option<u32>,
    /// `--retention-timezone`.
    pub timezone: Option<String>,
    /// `--pack-grace`.
    #[serde(alias = "pack_grace")]
    pub pack_grace: Option<String>,
}

impl RetentionConfig {
    /// Whether any rule is set.
    pub fn any_rule(&self) -> bool {
        self.keep_within.is_some()
            || self.keep_last.is_some()
            || self.keep_hourly.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some()
    }
}

/// The policy flags (each overrides the same key of `[retention]`).
#[derive(Debug, Clone, Default, Args)]
pub struct PolicyArgs {
    /// Keep point-in-time recovery possible to every moment of this window
    /// (e.g. 7d, 36h): the newest backup at or before its start is kept
    /// with all WAL after it.
    #[arg(long, value_parser = parse_duration)]
    pub keep_within: Option<Duration>,
    /// Keep the N newest backups.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// … of each of the last N days.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// … of each of the last N ISO weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// … of each of the last N months.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// … of each of the last N years.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Time zone the hourly/daily/… buckets are cut in (IANA name, e.g.
    /// Europe/Berlin; default UTC).
    #[arg(long = "retention-timezone", value_name = "ZONE")]
    pub timezone: Option<String>,
    /// How long an unreferenced pack stays marked before a later run
    /// deletes it (longer than any backup could run; default 1h).
    #[arg(long, value_parser = parse_duration)]
    pub pack_grace: Option<Duration>,
}

/// Default `--pack-grace`.
const PACK_GRACE: Duration = Duration::from_secs(3600);

impl PolicyArgs {
    /// The policy: these flags over `file`; `None` when neither sets a rule.
    pub fn resolve(&self, file: &RetentionConfig) -> anyhow::Result<Option<(Policy, Duration)>> {
        let dur = |key: &str, v: &Option<String>| -> anyhow::Result<Option<Duration>> {
            v.as_deref()
                .map(|s| parse_duration(s).with_context(|| format!("[retention] {key}")))
                .transpose()
        };
        let flags_set = self.keep_within.is_some()
            || self.keep_last.is_some()
            || self.keep_hourly.is_some()
            || self.keep_daily.is_some()
            || self.keep_weekly.is_some()
            || self.keep_monthly.is_some()
            || self.keep_yearly.is_some();
        if !flags_set && !file.any_rule() {
            return Ok(None);
        }
        let timezone = match self.timezone.as_deref().or(file.timezone.as_deref()) {
            Some(z) => parse_timezone(z)?,
            None => chrono_tz::UTC,
        };
        let policy = Policy {
            keep_within: self.keep_within.or(dur("keep-within", &file.keep_within)?),
            keep_last: self.keep_last.or(file.keep_last),
            keep_hourly: self.keep_hourly.or(file.keep_hourly),
            keep_daily: self.keep_daily.or(file.keep_daily),
            keep_weekly: self.keep_weekly.or(file.keep_weekly),
            keep_monthly: self.keep_monthly.or(file.keep_monthly),
            keep_yearly: self.keep_yearly.or(file.keep_yearly),
            timezone,
        };
        let grace = self
            .pack_grace
            .or(dur("pack-grace", &file.pack_grace)?)
            .unwrap_or(PACK_GRACE);
        Ok(Some((policy, grace)))
    }
}

/// Options of `walvault expire`.
#[derive(Debug, Args)]
pub struct ExpireArgs {
    /// The policy.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Show what would go, and why; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also remove this backup, whatever the policy says (repeatable; its
    /// id). Refused when it is held, the newest, or locked; the policy
    /// still decides the WAL and the packs that go with it.
    #[arg(long, value_name = "BACKUP")]
    pub forget: Vec<String>,
    /// Expire in this `[[repository]]` of walvault.toml instead, with its
    /// own `retention` table (default: the top-level `[retention]`).
    #[arg(long, value_name = "NAME")]
    pub repository: Option<String>,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Options of `walvault hold`.
#[derive(Debug, Args)]
pub struct HoldArgs {
    /// The backup to keep (its id, or `latest`).
    pub backup: String,
    /// Keep it until this time (ISO 8601; UTC unless it names a zone;
    /// default: until released).
    #[arg(long)]
    pub until: Option<String>,
    /// Why (shown by list and info).
    #[arg(long, default_value = "")]
    pub reason: String,
}

/// Options of `walvault release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The backup whose holds end.
    pub backup: String,
}

pub(super) async fn run_expire(settings: &Settings, args: ExpireArgs) -> anyhow::Result<()> {
    let entry = match &args.repository {
        Some(name) => Some(settings.repository(name)?),
        None => None,
    };
    let table = entry
        .and_then(|e| e.retention.as_ref())
        .unwrap_or(&settings.retention);
    let Some((policy, pack_grace)) = args.policy.resolve(table)? else {
        anyhow::bail!("no retention policy: give at least one of --keep-within, --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly, --keep-yearly (or set them in the [retention] table of walvault.toml)");
    };
    policy.validate()?;
    let repo = match entry {
        Some(e) => settings.open_entry(e).await?,
        None => settings.open_repository().await?,
    };
    let opts = ExpireOptions {
        policy,
        dry_run: args.dry_run,
        pack_grace,
        now: chrono::Utc::now(),
        forget: args.forget,
    };
    let report = expire(&repo, &settings.stanza, &opts).await?;
    print_report(&report, args.json)
}

/// `backup`'s expire after a successful backup, with the configured policy.
pub(super) async fn after_backup(
    settings: &Settings,
    repo: &crate::repo::Repository,
) -> anyhow::Result<()> {
    let Some((policy, pack_grace)) = PolicyArgs::default().resolve(&settings.retention)? else {
        return Ok(());
    };
    let opts = ExpireOptions {
        policy,
        dry_run: false,
        pack_grace,
        now: chrono::Utc::now(),
        forget: Vec::new(),
    };
    let r = expire(repo, &settings.stanza, &opts).await?;
    let gone = r.backups.iter().filter(|b| !b.keep).count();
    outln!(
        "expire: {gone} backup(s) expired, {} WAL file(s) removed, {} pack(s) deleted, {} freed",
        r.wal_expired.iter().map(|w| w.files).sum::<usize>(),
        r.packs_deleted,
        super::backup::human(r.bytes_freed)
    )?;
    Ok(())
}

fn print_report(r: &ExpireReport, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(r)?)?;
        return Ok(());
    }
    let verb = if r.dry_run { "would go" } else { "expired" };
    for b in &r.backups {
        if b.keep {
            let rules: Vec<String> = b.reasons.iter().map(rule_text).collect();
            outln!(
                "keep     {}  {}  {}",
                b.id,
                b.stop_time.format("%Y-%m-%d %H:%M:%S UTC"),
                rules.join(", ")
            )?;
        } else {
            outln!(
                "{verb:<8} {}  {}  {} ({})",
                b.id,
                b.stop_time.format("%Y-%m-%d %H:%M:%S UTC"),
                if b.forgotten {
                    "forgotten on request"
                } else {
                    "no rule keeps it"
                },
                super::backup::human(b.bytes)
            )?;
        }
    }
    for f in &r.file_snapshots {
        if f.keep {
            let rules: Vec<String> = f.reasons.iter().map(rule_text).collect();
            outln!(
                "keep     files {} {}  {}  {}",
                f.set,
                f.id,
                f.started.format("%Y-%m-%d %H:%M:%S UTC"),
                rules.join(", ")
            )?;
        } else {
            outln!(
                "{verb:<8} files {} {}  {}  no rule keeps it ({})",
                f.set,
                f.id,
                f.started.format("%Y-%m-%d %H:%M:%S UTC"),
                super::backup::human(f.bytes)
            )?;
        }
    }
    for w in &r.wal_expired {
        outln!(
            "{verb:<8} WAL {} .. {} ({} file(s), {}): outside every kept recovery range",
            w.from,
            w.to,
            w.files,
            super::backup::human(w.bytes)
        )?;
    }
    if let Some(why) = &r.wal_kept_because {
        outln!("WAL kept: {why}")?;
    }
    let packs = if r.dry_run {
        format!(
            "{} pack(s) no kept backup needs ({}) would be marked, deleted by a run after --pack-grace; {} marked earlier would be deleted now",
            r.packs_marked,
            super::backup::human(r.packs_marked_bytes),
            r.packs_deleted
        )
    } else {
        format!(
            "{} pack(s) marked ({}, deleted by a run after --pack-grace), {} deleted, {} waiting",
            r.packs_marked,
            super::backup::human(r.packs_marked_bytes),
            r.packs_deleted,
            r.packs_waiting
        )
    };
    outln!("packs: {packs}")?;
    if r.locked > 0 {
        outln!(
            "locked: {} WAL file(s) or pack(s) the policy lets go stay in this write-once repository, locked until {} at the latest; a later run removes them",
            r.locked,
            r.locked_until.map(|u| u.to_rfc3339()).unwrap_or_default()
        )?;
    }
    if r.locks_extended > 0 {
        outln!(
            "locks: extended on {} object(s) the kept backups need",
            r.locks_extended
        )?;
    }
    outln!(
        "{} {}",
        if r.dry_run { "would free" } else { "freed" },
        super::backup::human(r.bytes_freed)
    )?;
    Ok(())
}

pub(super) async fn run_hold(settings: &Settings, args: HoldArgs) -> anyhow::Result<()> {
    let until = args
        .until
        .as_deref()
        .map(|t| crate::restore::pitr::parse_target_time(t, Some("UTC")))
        .transpose()?;
    let repo = settings.open_repository().await?;
    let paths = StanzaPaths::new(&settings.stanza);
    let id = if args.backup == "latest" {
        crate::repo::Manifest::list_ids(&repo, &paths)
            .await?
            .into_iter()
            .max()
            .context("there is no backup in this stanza to hold")?
    } else {
        args.backup.clone()
    };
    crate::ops::holds::hold(&repo, &paths, &id, until, &args.reason).await?;
    match until {
        Some(u) => outln!("backup {id} is held until {}", u.to_rfc3339())?,
        None => outln!("backup {id} is held until released (walvault release {id})")?,
    }
    Ok(())
}

pub(super) async fn run_release(settings: &Settings, args: ReleaseArgs) -> anyhow::Result<()> {
    let repo = settings.open_repository().await?;
    let paths = StanzaPaths::new(&settings.stanza);
    let n = crate::ops::holds::release(&repo, &paths, &args.backup).await?;
    outln!("backup {}: {n} hold(s) released", args.backup)?;
    Ok(())
}
