//! `walvault restore-pitr`: plan, prove, restore, pre-stage WAL, configure
//! recovery, and with `--start` run it and report the measured RTO.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;

use super::duration::parse_duration;
use super::output::outln;
use super::Settings;
use crate::progress::{Progress, Reporter};
use crate::restore::pitr::{parse_target_time, plan, PitrPlan, Target, TimelineChoice};
use crate::restore::rates::RecoveryRates;
use crate::restore::recovery::{self, TargetAction};
use crate::restore::RestoreOptions;

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
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
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
        bail!("--start runs PostgreSQL, which refuses to run as root: run restore-pitr as the database's OS user (sudo -u postgres walvault restore-pitr …), or restore without --start, chown the directory and start it yourself");
    }
    let repo = Arc::new(settings.open_repository().await?);
    let target = target_of(&args)?;
    let plan = plan(
        &repo,
        &settings.stanza,
        &target,
        args.exclusive,
        args.target_timeline,
        args.backup.as_deref(),
    )
    .await?;
    let paths = crate::repo::StanzaPaths::new(&settings.stanza);
    let rates = RecoveryRates::load(&repo, &paths).await;
    // (whole segments: a little more than replay will cover)
    let est = Duration::try_from_secs_f64(rates.estimate(plan.restore_bytes, plan.wal_bytes()))
        .unwrap_or(Duration::MAX);
    print_plan(&plan, est, &rates, &args)?;
    if let Some(budget) = args.rto_budget {
        if est > budget {
            eprintln!(
                "walvault: warning: the estimated recovery time {:.0} s exceeds the RTO budget {:.0} s",
                est.as_secs_f64(),
                budget.as_secs_f64()
            );
        }
    }
    if args.dry_run {
        return Ok(());
    }

    // Restore the files and, at the same time, pre-stage the WAL where
    // wal-fetch serves it from: downloading and decoding WAL overlaps the
    // block writes. Nothing is created before the directory is known empty.
    if !crate::restore::is_empty_dir(&args.pgdata, false)? {
        bail!(
            "{} is not empty; restore into an empty or new directory",
            args.pgdata.display()
        );
    }
    let spool = args
        .pgdata
        .join("pg_wal")
        .join(crate::restore::fetch::SPOOL_DIR);
    std::fs::create_dir_all(&spool).with_context(|| format!("creating {}", spool.display()))?;
    std::fs::set_permissions(&args.pgdata, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", args.pgdata.display()))?;
    let map = super::backup::tablespace_map(&args.tablespace_map)?;
    let progress = Progress::new();
    let opts = RestoreOptions {
        backup: Some(plan.backup.id.clone()),
        tablespace_map: map,
        restore_command: Some(super::backup::restore_command(settings)?),
        delta: false,
        progress: Some(progress.clone()),
        staged_wal: true,
        page_cache: true,
    };
    let reporter = Reporter::start("restore", progress, !settings.quiet && !args.json);
    let restore_files = async {
        let t = Instant::now();
        crate::restore::restore(repo.clone(), &settings.stanza, &args.pgdata, &opts).await?;
        anyhow::Ok(t.elapsed().as_secs_f64())
    };
    // Only the first segments must be there when PostgreSQL starts; with
    // --start the rest is staged while it replays (replay takes one core,
    // staging the other) instead of competing with the restore for both
    let t_stage = Instant::now();
    let ahead = if args.start {
        STAGE_AHEAD.min(plan.segments.len())
    } else {
        plan.segments.len()
    };
    let (head, rest) = plan.segments.split_at(ahead);
    let done = tokio::try_join!(restore_files, stage_wal(&repo, &paths, &spool, head));
    reporter.finish();
    let (restore_secs, head_bytes) = done
        .map_err(|e| super::incomplete(&e, &args.pgdata, "remove it and run restore-pitr again"))?;
    let mut fetch_secs = t_stage.elapsed().as_secs_f64();

    let timeline = match args.target_timeline {
        TimelineChoice::Latest => "latest".to_owned(),
        TimelineChoice::Current => "current".to_owned(),
        TimelineChoice::Id(n) => n.to_string(),
    };
    // with --start, "promote" is carried out as pause, then pg_ctl promote
    // (see pitr_start): the same stop point without waiting for a full
    // checkpoint. `--latest` has no target to pause at.
    let promote_on_pause = args.start
        && args.target_action == TargetAction::Promote
        && !matches!(target, Target::Latest);
    let written_action = if promote_on_pause {
        TargetAction::Pause
    } else {
        args.target_action
    };
    let lines = recovery::settings(&target, args.exclusive, &timeline, written_action);
    if args.archive_mode == ArchiveMode::Off {
        let auto = args.pgdata.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
        text.push_str(
            "# added by walvault restore-pitr --archive-mode off\narchive_mode = 'off'\n",
        );
        std::fs::write(&auto, text).with_context(|| format!("writing {}", auto.display()))?;
    }
    for l in recovery::write(&args.pgdata, &lines)? {
        eprintln!("walvault: warning: postgresql.conf sets `{l}`, which conflicts with the target; remove it before starting");
    }
    if !args.start {
        if !args.json {
            outln!(
                "restored {} ({:.1} s) and staged {} WAL file(s) ({:.1} s); start PostgreSQL on {} to recover to {}",
                plan.backup.id,
                restore_secs,
                plan.segments.len(),
                fetch_secs,
                args.pgdata.display(),
                plan.target
            )?;
        }
        return Ok(());
    }
    // the spool's lock keeps wal-fetch's own prefetching out while the rest
    // is staged, and makes wal-fetch wait for a segment replay reaches
    // before it is staged instead of downloading it a second time. It is
    // released as soon as staging is done: after that nothing more will
    // appear in the spool, and a segment beyond the archive (which recovery
    // asks for at its end) must be "not found" at once, not after a wait.
    let held = crate::restore::fetch::lock_spool(&spool, true)?;
    let (outcome, rest_bytes) = tokio::join!(
        super::pitr_start::start_and_wait(
            &args.pgdata,
            &plan,
            args.port,
            args.pg_bin.as_deref(),
            args.target_action,
            promote_on_pause,
        ),
        async {
            let r = stage_wal(&repo, &paths, &spool, rest).await;
            drop(held);
            fetch_secs = t_stage.elapsed().as_secs_f64();
            r
        }
    );
    let outcome = outcome?;
    let wal_bytes = head_bytes
        + rest_bytes.unwrap_or_else(|e| {
            tracing::warn!(
                "staging WAL ahead of replay failed ({e:#}); restore_command fetched it"
            );
            0
        });
    if outcome.state != "paused at the target" {
        // staged files replay did not consume (beyond the target)
        let _ = std::fs::remove_dir_all(&spool);
    }
    let total = t0.elapsed().as_secs_f64();
    let replayed = outcome
        .stop_lsn
        .and_then(|l| l.checked_sub(plan.backup.start_lsn));
    if let Some(measured) = RecoveryRates::measured(
        plan.restore_bytes,
        restore_secs,
        replayed.unwrap_or(0),
        outcome.replay_secs,
        total,
    ) {
        measured.store(&repo, &paths).await;
    }
    let report = serde_json::json!({
        "backup": plan.backup.id,
        "target": plan.target.to_string(),
        "exclusive": args.exclusive,
        "timeline": plan.timeline,
        "stopped_at_lsn": outcome.stop_lsn.map(|l| l.to_string()),
        "stop_detail": outcome.stop_line,
        "last_replayed_commit_time": outcome.last_commit_time,
        "state": outcome.state,
        "wal_files": plan.segments.len(),
        "wal_bytes_fetched": wal_bytes,
        "wal_bytes_replayed": replayed,
        "restore_bytes": plan.restore_bytes,
        "restore_seconds": restore_secs,
        "wal_fetch_seconds": fetch_secs,
        "replay_seconds": outcome.replay_secs,
        "total_seconds": total,
        "estimated_seconds": est.as_secs_f64(),
        "rto_budget_seconds": args.rto_budget.map(|b| b.as_secs_f64()),
        "budget_held": args.rto_budget.map(|b| total <= b.as_secs_f64()),
    });
    if args.json {
        outln!("{report}")?;
    } else {
        outln!("recovery report")?;
        if let Some(obj) = report.as_object() {
            for (k, v) in obj {
                if !v.is_null() {
                    outln!(
                        "  {k:<26} {}",
                        v.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string())
                    )?;
                }
            }
        }
    }
    if args.rto_budget.is_some_and(|b| total > b.as_secs_f64()) {
        bail!("the recovery took {total:.0} s, over the RTO budget");
    }
    Ok(())
}

/// Segments staged before PostgreSQL starts when the rest can follow during
/// replay (`--start`).
const STAGE_AHEAD: usize = 4;

/// Download `names` into the spool (4 at once), each written beside, synced
/// and renamed into place. Returns the bytes staged.
async fn stage_wal(
    repo: &crate::repo::Repository,
    paths: &crate::repo::StanzaPaths,
    spool: &std::path::Path,
    names: &[crate::pg::WalFileName],
) -> anyhow::Result<u64> {
    use crate::pg::WalFileName;
    let fetched: Vec<anyhow::Result<u64>> = futures::stream::iter(names.iter().copied())
        .map(|name| async move {
            let data = repo
                .load_wal(paths, &name)
                .await?
                .with_context(|| format!("{name} vanished from the repository"))?;
            // a .partial is served under its segment's name
            let served = match name {
                WalFileName::Partial(f) => WalFileName::Segment(f),
                other => other,
            };
            let file = spool.join(served.to_string());
            let len = data.len() as u64;
            // synced here: PostgreSQL fsyncs the whole data directory
            // (pg_wal included) before it replays anything, one file after
            // the other; files staged later are read after a crash too
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let tmp = file.with_extension("walvault-tmp");
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &data)?;
                f.sync_data()?;
                std::fs::rename(&tmp, &file)
            })
            .await??;
            Ok(len)
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut bytes = 0;
    for f in fetched {
        bytes += f?;
    }
    Ok(bytes)
}

fn print_plan(
    plan: &PitrPlan,
    est: Duration,
    rates: &RecoveryRates,
    args: &PitrArgs,
) -> anyhow::Result<()> {
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
