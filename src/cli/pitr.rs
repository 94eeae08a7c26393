//! `walvault restore-pitr`: the options, the plan and the report as text or
//! JSON; the recovery itself is `restore::recover`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;

use super::duration::parse_duration;
use super::output::outln;
use super::Settings;
use crate::progress::{Progress, Reporter};
use crate::restore::pitr::{parse_target_time, Target, TimelineChoice};
use crate::restore::recovery::TargetAction;
use crate::restore::server::ServerOptions;
use crate::restore::{
    plan_recovery, recover, RecoverError, RecoverOptions, RecoveryPlan, RecoveryReport,
};

/// Options of `walvault restore-pitr`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
pub struct PitrArgs {
    /// Directory to restore into (empty or missing).
    #[arg(long)]
    pub pgdata: PathBuf,
    /// Recover to this time (ISO 8601 or PostgreSQL timestamptz; a time zone
    /// is required unless --timezone is given).
    #[arg(long, group = "target")]
    pub target_time: Option<String>,
    /// Recover to this LSN (X/X).
    #[arg(long, group = "target")]
    pub target_lsn: Option<crate::pg::Lsn>,
    /// Recover to this transaction's commit.
    #[arg(long, group = "target")]
    pub target_xid: Option<u32>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long, group = "target")]
    pub target_name: Option<String>,
    /// Recover only to the backup's consistency point.
    #[arg(long, group = "target")]
    pub immediate: bool,
    /// Recover everything archived, the newest partial segment included.
    #[arg(long, group = "target")]
    pub latest: bool,
    /// Time zone of a --target-time that has none (+02:00, UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    pub exclusive: bool,
    /// Timeline to recover along: latest, current (the backup's) or a number.
    #[arg(long, default_value = "latest")]
    pub target_timeline: TimelineChoice,
    /// What the server does at the target.
    #[arg(long, value_enum, default_value = "promote")]
    pub target_action: TargetAction,
    /// Backup to restore (default: the newest that can reach the target).
    #[arg(long)]
    pub backup: Option<String>,
    /// Put a tablespace elsewhere: OLD=NEW (OLD is its OID or old location).
    #[arg(long = "tablespace-map", value_name = "OLD=NEW")]
    pub tablespace_map: Vec<String>,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// `off` turns WAL archiving off in the restored cluster (so a copy
    /// never archives into the original's archive); `preserve` keeps the
    /// backup's setting.
    #[arg(long, value_enum, default_value = "preserve")]
    pub archive_mode: ArchiveMode,
    /// Start PostgreSQL on the restored directory, wait for the target, and
    /// report (run as the database's OS user, not root).
    #[arg(long)]
    pub start: bool,
    /// Port for --start (default: the restored configuration's).
    #[arg(long)]
    pub port: Option<u16>,
    /// Directory of pg_ctl for --start (default: /usr/lib/postgresql/<major>/bin).
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    /// Warn when the estimated recovery time exceeds this (e.g. 15m, 90s).
    #[arg(long, value_parser = parse_duration)]
    pub rto_budget: Option<Duration>,
    /// With --start: run recovery with the restored configuration as it is.
    /// By default (--target-action promote) shared_buffers (up to a quarter
    /// of memory), max_wal_size and checkpoint_timeout are raised for the
    /// recovery and reverted at promotion (shared_buffers at the next restart).
    #[arg(long)]
    pub no_recovery_tuning: bool,
    /// Also restore the snapshot of this file set (`walvault files`) that
    /// matches the recovery target: the newest started at or before it.
    #[arg(long, value_name = "SET", requires = "files_to")]
    pub with_files: Option<String>,
    /// Where --with-files writes: a directory or s3://bucket/prefix (empty
    /// unless --files-overwrite).
    #[arg(long, value_name = "DIR|S3URL", requires = "with_files")]
    pub files_to: Option<String>,
    /// Let --with-files write into a target that holds files.
    #[arg(long, requires = "with_files")]
    pub files_overwrite: bool,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The moment the database is recovered to, for --with-files: the target
/// time, the backup's end for --immediate, else (with --start) the last
/// transaction PostgreSQL replayed.
fn database_moment(
    target: &Target,
    rp: &RecoveryPlan,
    report: Option<&crate::restore::RecoveryReport>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    match target {
        Target::Time(t) => Some(*t),
        Target::Immediate => chrono::DateTime::from_timestamp_micros(rp.plan.backup.stop_time),
        _ => report
            .and_then(|r| r.last_replayed_commit_time.as_deref())
            .and_then(|t| parse_target_time(t, None).ok()),
    }
}

/// --with-files: the file snapshot matching `moment`, restored.
async fn restore_files_too(
    settings: &Settings,
    repo: Arc<crate::repo::Repository>,
    args: &PitrArgs,
    moment: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let (Some(set), Some(to)) = (&args.with_files, &args.files_to) else {
        return Ok(());
    };
    let opts = crate::files::restore::FilesRestoreOptions {
        set: set.clone(),
        pick: crate::files::Pick::AsOf(moment),
        path_prefix: None,
        to: to.clone(),
        s3: super::files::set_s3(settings, set),
        overwrite: args.files_overwrite,
        parallel: 8,
    };
    let r = crate::files::restore::restore(repo, &settings.stanza, &opts).await?;
    let gap = moment - r.snapshot.started;
    if args.json {
        outln!(
            "{}",
            serde_json::json!({"files": r, "database_moment": moment, "files_older_by_seconds": gap.num_milliseconds() as f64 / 1000.0})
        )?;
    } else {
        super::files::print_restore(&r, false)?;
        outln!(
            "files and database: the database is recovered to {}, the files are as of {}, {} earlier",
            moment.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            r.snapshot.started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            crate::duration::format_duration(gap.to_std().unwrap_or_default())
        )?;
    }
    Ok(())
}

/// `--archive-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveMode {
    /// Keep the backup's archive settings.
    Preserve,
    /// archive_mode = off in postgresql.auto.conf.
    Off,
}

fn target_of(args: &PitrArgs) -> anyhow::Result<Target> {
    Ok(if let Some(t) = &args.target_time {
        Target::Time(parse_target_time(t, args.timezone.as_deref())?)
    } else if let Some(l) = args.target_lsn {
        Target::Lsn(l)
    } else if let Some(x) = args.target_xid {
        Target::Xid(x)
    } else if let Some(n) = &args.target_name {
        Target::Name(n.clone())
    } else if args.immediate {
        Target::Immediate
    } else {
        Target::Latest
    })
}

pub(super) async fn run(settings: &Settings, args: PitrArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    if args.start && nix::unistd::geteuid().is_root() {
        return Err(RecoverError::AsRoot.into());
    }
    let target = target_of(&args)?;
    // the main repository, then each [[repository]]: one that cannot be
    // read, or whose data turns out damaged before anything is started,
    // hands over to the next
    let sources = settings.recovery_sources()?;
    let mut i = 0;
    // the recovered server's restore_command reads the first repository
    // that could be opened: a damaged file there falls back, its "not there"
    // is the answer (a lagging copy's "not there" would end recovery early)
    let mut wal_source: Option<usize> = None;
    let (repo, rp) = loop {
        let last = i + 1 >= sources.len();
        let planned = open_and_plan(
            settings,
            sources[i],
            &target,
            &args,
            args.backup.as_deref(),
            || {
                wal_source.get_or_insert(i);
            },
        )
        .await;
        match planned {
            Ok(p) => break p,
            Err(e) if !last && is_repository_fault(&e) => {
                super::backup::fallback_note(sources[i], &e, sources[i + 1]);
                i += 1;
            }
            Err(e) => return Err(e),
        }
    };
    print_plan(&rp, &args)?;
    if let Some(budget) = args.rto_budget {
        if rp.estimate > budget {
            eprintln!(
                "walvault: warning: the estimated recovery time {:.0} s exceeds the RTO budget {:.0} s",
                rp.estimate.as_secs_f64(),
                budget.as_secs_f64()
            );
        }
    }
    if let Some(set) = &args.with_files {
        // refuse before anything is restored when the files cannot follow
        match database_moment(&target, &rp, None) {
            Some(m) => {
                let paths = crate::repo::StanzaPaths::new(&settings.stanza);
                crate::files::choose(&repo, &paths, set, &crate::files::Pick::AsOf(m)).await?;
            }
            None if !args.start => bail!(
                "--with-files needs the moment the database is recovered to: give --target-time or --immediate, or --start (the last transaction replayed is the moment)"
            ),
            None => {}
        }
    }
    if args.dry_run {
        return Ok(());
    }
    let files_repo = repo.clone();
    let progress = Progress::new();
    let opts = RecoverOptions {
        pgdata: args.pgdata.clone(),
        tablespace_map: super::backup::tablespace_map(&args.tablespace_map)?,
        restore_command: super::backup::restore_command_from(
            settings,
            sources[wal_source.unwrap_or(i)],
        )?,
        archive_off: args.archive_mode == ArchiveMode::Off,
        target_action: args.target_action,
        server: args.start.then(|| ServerOptions {
            port: args.port,
            pg_bin: args.pg_bin.clone(),
            ..Default::default()
        }),
        rto_budget: args.rto_budget,
        no_tuning: args.no_recovery_tuning,
        progress: Some(progress.clone()),
        events: Some(Arc::new(|e| tracing::info!("recovery: {e}"))),
        fetch_only: None,
    };
    let reporter = Reporter::start("restore", progress, !settings.quiet && !args.json);
    let mut result = recover(repo, &settings.stanza, &rp, &opts, t0).await;
    // damaged data found while restoring: the directory (nothing outside
    // it: no tablespaces) is emptied and the recovery starts over from the
    // next repository that holds the same backup
    while let Err(RecoverError::Incomplete { source, .. }) = &result {
        let next = i + 1;
        if next >= sources.len()
            || !source.is_repository_fault()
            || !rp.plan.backup.tablespaces.is_empty()
        {
            break;
        }
        let e = anyhow::anyhow!("{source}");
        super::backup::fallback_note(sources[i], &e, sources[next]);
        i = next;
        empty_dir(&args.pgdata)?;
        let again = open_and_plan(
            settings,
            sources[i],
            &target,
            &args,
            Some(&rp.plan.backup.id),
            || {},
        )
        .await;
        result = match again {
            Ok((repo, rp)) => recover(repo, &settings.stanza, &rp, &opts, t0).await,
            Err(e) => return Err(e),
        };
    }
    reporter.finish();
    let (report, over) = match result {
        Ok(r) => (r, None),
        Err(RecoverError::OverBudget {
            report,
            took,
            budget,
        }) => (*report, Some((took, budget))),
        Err(e) => return Err(e.into()),
    };
    if !args.start {
        if !args.json {
            outln!(
                "restored {} ({:.1} s) and staged {} WAL file(s) ({:.1} s); start PostgreSQL on {} to recover to {}",
                report.backup,
                report.phases.restore_seconds,
                report.wal_files,
                report.phases.wal_fetch_seconds,
                args.pgdata.display(),
                report.target
            )?;
        } else {
            print_report(&report, true)?;
        }
        if let Some(m) = database_moment(&target, &rp, Some(&report)) {
            restore_files_too(settings, files_repo, &args, m).await?;
        }
        return Ok(());
    }
    print_report(&report, args.json)?;
    note_recovery_settings(&report);
    if args.with_files.is_some() {
        let Some(m) = database_moment(&target, &rp, Some(&report)) else {
            bail!("--with-files: PostgreSQL logged no replayed transaction, so the moment the database is at is unknown: restore the files with `walvault files restore --as-of TIME`");
        };
        restore_files_too(settings, files_repo, &args, m).await?;
    }
    if let Some((took, budget)) = over {
        bail!("the recovery took {took:.0} s, over the RTO budget of {budget:.0} s");
    }
    Ok(())
}

/// Whether an error opening or planning comes from the repository (so
/// another copy may do better), not from the target or the options.
fn is_repository_fault(e: &anyhow::Error) -> bool {
    use crate::restore::pitr::PlanError;
    if let Some(p) = e.downcast_ref::<RecoverError>() {
        return match p {
            RecoverError::Plan(p) => plan_fault(p),
            RecoverError::Incomplete { source, .. } => source.is_repository_fault(),
            _ => false,
        };
    }
    if let Some(p) = e.downcast_ref::<PlanError>() {
        return plan_fault(p);
    }
    // opening: storage, key, configuration
    e.downcast_ref::<crate::repo::RepoError>().is_some()
        || e.chain().any(|c| {
            c.downcast_ref::<crate::repo::RepoError>().is_some()
                || c.downcast_ref::<crate::storage::StorageError>().is_some()
        })
}

/// Open the recovery source `source` (then call `opened`) and plan the
/// recovery to `target` there.
async fn open_and_plan(
    settings: &Settings,
    source: Option<&super::config::RepositoryConfig>,
    target: &Target,
    args: &PitrArgs,
    backup: Option<&str>,
    opened: impl FnOnce(),
) -> anyhow::Result<(Arc<crate::repo::Repository>, RecoveryPlan)> {
    let repo = Arc::new(settings.open_source(source).await?);
    opened();
    let rp = plan_recovery(
        &repo,
        &settings.stanza,
        target,
        args.exclusive,
        args.target_timeline,
        backup,
    )
    .await?;
    Ok((repo, rp))
}

/// Remove everything inside `dir`, keeping `dir` itself (a mount point or
/// a symbolic link stays what it is).
fn empty_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if std::fs::symlink_metadata(&p)?.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

fn plan_fault(p: &crate::restore::pitr::PlanError) -> bool {
    use crate::restore::pitr::PlanError;
    matches!(
        p,
        PlanError::Repo(_)
            | PlanError::Archive(_)
            | PlanError::NoBackups { .. }
            | PlanError::NoSuchBackup { .. }
            | PlanError::MissingSegment { .. }
    )
}

/// The report as JSON, or one `key value` line per field.
fn print_report(report: &RecoveryReport, json: bool) -> anyhow::Result<()> {
    let v = serde_json::to_value(report)?;
    if json {
        outln!("{v}")?;
        return Ok(());
    }
    outln!("recovery report")?;
    if let Some(obj) = v.as_object() {
        for (k, v) in obj {
            if !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()) {
                outln!(
                    "  {k:<26} {}",
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                )?;
            }
        }
    }
    Ok(())
}

/// Say what of the recovery's own settings outlives it.
fn note_recovery_settings(report: &RecoveryReport) {
    if let Some(sb) = report
        .recovery_settings
        .iter()
        .find(|s| s.starts_with("shared_buffers"))
    {
        if report.outcome == crate::restore::server::Outcome::Promoted {
            eprintln!(
                "walvault: note: recovery ran with {sb}; it stays in effect until the server restarts (the other recovery settings were reverted at promotion)"
            );
        }
    }
}

fn print_plan(rp: &RecoveryPlan, args: &PitrArgs) -> anyhow::Result<()> {
    let (plan, est, rates) = (&rp.plan, rp.estimate, &rp.rates);
    if args.json && !args.dry_run {
        return Ok(());
    }
    if args.json {
        let v = serde_json::json!({
            "backup": plan.backup.id,
            "backup_consistent_at": plan.backup.stop_lsn.to_string(),
            "target": plan.target.to_string(),
            "timeline": plan.timeline,
            "segments": plan.segments,
            "restore_bytes": plan.restore_bytes,
            "wal_bytes": plan.wal_bytes(),
            "estimated_seconds": est.as_secs_f64(),
            "estimate_basis": if rates.is_measured() { "measured" } else { "assumed" },
            "rates": rates,
        });
        outln!("{v}")?;
        return Ok(());
    }
    outln!(
        "plan: recover to {} on timeline {}",
        plan.target,
        plan.timeline
    )?;
    outln!(
        "  backup   {} (consistent at {}, {})",
        plan.backup.id,
        plan.backup.stop_lsn,
        crate::restore::pitr::micros_to_text(plan.backup.stop_time)
    )?;
    outln!(
        "  restore  {:.1} MiB of files",
        plan.restore_bytes as f64 / (1 << 20) as f64
    )?;
    match (plan.segments.first(), plan.segments.last()) {
        (Some(f), Some(l)) => outln!(
            "  WAL      {} file(s), {f} .. {l} ({:.1} MiB)",
            plan.segments.len(),
            plan.wal_bytes() as f64 / (1 << 20) as f64
        )?,
        _ => outln!("  WAL      none")?,
    }
    outln!("  estimate {:.0} s ({})", est.as_secs_f64(), rates.basis())?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    /// `--rto-budget=v` as clap parses it; a refusal as its message.
    fn rto_budget(v: &str) -> Result<Option<std::time::Duration>, Box<str>> {
        let cli = Cli::try_parse_from([
            "walvault",
            "restore-pitr",
            "--pgdata",
            "/nonexistent",
            "--latest",
            &format!("--rto-budget={v}"),
        ])
        .map_err(|e| e.to_string().into_boxed_str())?;
        match cli.command {
            Command::RestorePitr(a) => Ok(a.rto_budget),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// Regression: `--rto-budget 1e30` (and other values past what a
    /// `Duration` holds) panicked in `Duration::from_secs_f64`.
    #[test]
    fn huge_or_odd_rto_budgets_are_clear_errors() {
        for v in ["1e30", "-5m", "NaN", "inf", "1000000000000000000000h"] {
            let e = rto_budget(v).unwrap_err();
            assert!(e.contains("--rto-budget"), "{v}: {e}");
        }
        assert!(rto_budget("1000000000000000000000h")
            .unwrap_err()
            .contains("too long"));
        assert_eq!(
            rto_budget("1.5m").unwrap(),
            Some(std::time::Duration::from_secs(90))
        );
    }
}
