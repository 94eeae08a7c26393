//! The `walvault` command line: global options, the config file, logging, and
//! one module per command or close group of commands.
//!
//! Commands are options → library calls → printing (`restore-pitr` and the
//! demo call `restore::recover`, `wal-inspect` calls `archive::inspect`).
//! The one exception: `wal-push --async` and `wal-fetch` spawn their
//! background processes here. The library never prints; this module (and
//! `main.rs`) does.

mod backup;
mod check;
mod config;
mod copy;
mod daemon;
mod demo;
mod drill;
mod extract;
mod files;
pub use crate::duration;
mod init;
mod inspect;
mod key;
pub mod output;
mod pitr;
#[cfg(test)]
mod reference;
mod retention;
mod storage_check;
mod verify;
mod wal;

use std::path::PathBuf;

use std::sync::Arc;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

pub use config::{Config, Settings};

/// Keeps a PostgreSQL cluster recoverable to any moment.
#[derive(Debug, Parser)]
#[command(
    name = "walvault",
    version,
    about,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes; each can also come from the environment and,
/// under the same name, from walvault.toml. `--help` lists them under their
/// own heading, after the command's own options.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Repository location: a directory, file:///path, or s3://bucket/prefix.
    #[arg(long, env = "WALVAULT_REPO", global = true)]
    pub repo: Option<String>,
    /// Name of the cluster inside the repository [default: main].
    #[arg(long, env = "WALVAULT_STANZA", global = true)]
    pub stanza: Option<String>,
    /// Config file (TOML) with the same names as these options, plus [s3] and [retry].
    #[arg(long, env = "WALVAULT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// File holding the repository passphrase (else env WALVAULT_PASSPHRASE).
    #[arg(long, env = "WALVAULT_PASSPHRASE_FILE", global = true)]
    pub passphrase_file: Option<PathBuf>,
    /// Key file that opens the repository instead of a passphrase.
    #[arg(long, env = "WALVAULT_KEY_FILE", global = true)]
    pub key_file: Option<PathBuf>,
    /// Log format on standard error [default: text].
    #[arg(long, env = "WALVAULT_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
}

/// How log lines are written.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository (encrypted with --encrypt) in an empty location.
    Init(init::InitArgs),
    /// Show the whole story on a throwaway local cluster: backup, changes,
    /// deduplicated second backup, restore, verification; then a dropped
    /// table found with wal-inspect and recovered with restore-pitr.
    Demo(demo::DemoArgs),
    /// Take a base backup over the replication protocol, with the WAL that
    /// makes it consistent.
    Backup(backup::BackupArgs),
    /// List the backups of the stanza.
    List(backup::ListArgs),
    /// Show one backup in detail.
    Info(backup::InfoArgs),
    /// Restore a backup into an empty directory (or over a stopped copy with
    /// --delta), configured to recover from the repository when started.
    Restore(backup::RestoreArgs),
    /// Point-in-time recovery: plan and prove the target reachable, restore,
    /// pre-stage the WAL, configure recovery (and with --start, run it and
    /// report the recovery time).
    RestorePitr(Box<pitr::PitrArgs>),
    /// List what happened around a time in the archived WAL: commits and
    /// aborts (time, xid, LSN, dropped tables) and restore points — to find
    /// the target for restore-pitr.
    WalInspect(inspect::InspectArgs),
    /// Archive WAL continuously over the replication protocol through a slot
    /// (a sidecar next to PostgreSQL): RPO of seconds, or zero with
    /// --synchronous.
    Stream(wal::StreamArgs),
    /// Archive one WAL file (for archive_command: %p). Succeeds when the same
    /// file is already archived; fails when a different one is.
    WalPush(wal::WalPushArgs),
    /// Prove the archived WAL is continuous from every backup to the newest
    /// segment, across timelines, and that every segment is intact; list gaps.
    WalVerify(wal::WalVerifyArgs),
    /// Copy a WAL file from the repository (for restore_command: %f %p).
    /// Exits 1 when the repository does not have it, 255 on any other error.
    WalFetch(backup::WalFetchArgs),
    /// Check the whole repository: every backup's blocks indexed, every pack
    /// present and intact, WAL continuous over every kept recovery range;
    /// --deep reads and authenticates every byte.
    Verify(verify::VerifyArgs),
    /// Preflight and health in one report: the server and its WAL settings,
    /// the slot, the repository, the newest backup, the current RPO, the
    /// estimated RTO, the last verify. Exits 0 healthy, 1 on error, 3 when a
    /// budget is breached.
    Check(check::CheckArgs),
    /// Prove recovery works: recover to a moment (random inside the
    /// recovery window by default) into a scratch directory, start
    /// PostgreSQL, run the SQL checks, count rows, pg_amcheck and
    /// pg_checksums, remove it, record the result. Exits 0 passed, 3 failed
    /// (recorded), 1 on error.
    Drill(Box<drill::DrillArgs>),
    /// Bring back one table (or one database) as of a moment without
    /// recovering the whole cluster: a sparse recovery downloads only that
    /// table, its indexes and the database's catalogs, replays to the
    /// target in a scratch directory, and writes a pg_dump file or restores
    /// the table into a live server under a new name.
    Extract(Box<extract::ExtractArgs>),
    /// Snapshots of file trees beside the database: a directory, or a bucket
    /// of uploads (backup, list, restore, verify).
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// Apply the retention policy: expire backups no rule keeps, the WAL
    /// only they needed, and (after a grace period) their data.
    Expire(retention::ExpireArgs),
    /// Copy backups and the WAL they need to another repository of
    /// walvault.toml (`[[repository]]`): only what it lacks, re-encrypted
    /// for its key; resumable.
    Copy(copy::CopyArgs),
    /// The sidecar: stream WAL, run the scheduled backups, expire, verify,
    /// drills and copies, start a backup early when the estimated RTO
    /// nears its budget, serve a status page, /metrics and a JSON API, and
    /// alert (webhook, Slack, email, command) when recovery is at risk.
    /// SIGHUP reads the configuration again, between jobs.
    Daemon(Box<daemon::DaemonArgs>),
    /// Keep a backup whatever the retention policy says (until a date, or
    /// until released).
    Hold(retention::HoldArgs),
    /// End the holds on a backup.
    Release(retention::ReleaseArgs),
    /// Manage the passphrases and key files that open an encrypted repository.
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// Prove the repository location works: write, read back, list and delete a
    /// probe object, and report each step's latency.
    StorageCheck(storage_check::StorageCheckArgs),
}

/// An error that asks for its own exit code (`check`'s 3 for a breached
/// budget); every other error exits 1.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The exit code.
    pub code: u8,
    /// The one line printed.
    pub message: String,
}

/// The exit code for an error `run` returned.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<Exit>().map_or(1, |x| x.code)
}

/// Run the parsed command line. Errors are returned to `main`, which prints
/// them as one line and picks the exit code.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Arc::new(Settings::resolve(&cli.global)?);
    init_logging(&settings, cli.global.verbose, cli.global.quiet);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The command runs as a task on the runtime's workers, not on this
    // thread: a future `block_on` polls here is woken by the worker that
    // polls the sockets, one more thread hop (two context switches) for
    // every readiness event. A backup's stream from the server made ~80 000
    // of those hops for 1.5 GB; as a task it takes 25 % less wall time and
    // half the system time (docs/benchmarks.md, session 20).
    rt.block_on(async move {
        match tokio::spawn(dispatch(settings, cli.global, cli.command)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(e.into()),
        }
    })
}

/// Run one command (on a runtime worker, see [`run`]).
async fn dispatch(
    settings: Arc<Settings>,
    global: GlobalArgs,
    command: Command,
) -> anyhow::Result<()> {
    match command {
        Command::Init(args) => init::run(&settings, args).await,
        Command::Demo(args) => demo::run(&settings, args).await,
        Command::Backup(args) => backup::backup(&settings, args).await,
        Command::List(args) => backup::list(&settings, args).await,
        Command::Info(args) => backup::info(&settings, args).await,
        Command::Restore(args) => backup::restore(&settings, args).await,
        Command::Stream(args) => wal::stream(&settings, args).await,
        Command::RestorePitr(args) => pitr::run(&settings, *args).await,
        Command::WalInspect(args) => inspect::run(&settings, args).await,
        Command::WalPush(args) => wal::wal_push(&settings, args).await,
        Command::WalVerify(args) => wal::wal_verify(&settings, args).await,
        Command::Verify(args) => verify::run(&settings, args).await,
        Command::Drill(args) => drill::run(&settings, *args).await,
        Command::Extract(args) => extract::run(&settings, *args).await,
        Command::Files(cmd) => files::run(&settings, cmd).await,
        Command::Copy(args) => copy::run(&settings, args).await,
        // the daemon reads the configuration again on SIGHUP
        Command::Daemon(args) => daemon::run(&settings, *args, &global).await,
        Command::Check(args) => check::run(&settings, args).await,
        Command::Expire(args) => retention::run_expire(&settings, args).await,
        Command::Hold(args) => retention::run_hold(&settings, args).await,
        Command::Release(args) => retention::run_release(&settings, args).await,
        Command::WalFetch(args) => match backup::wal_fetch(&settings, args).await {
            Ok(true) => Ok(()),
            // "not found" (exit 1) is how recovery learns the archive ends
            Ok(false) => std::process::exit(1),
            // Any other failure must not look like "not found": that would
            // end recovery early. Exit codes above 125 make PostgreSQL stop
            // recovery with an error instead.
            Err(e) => {
                eprintln!("walvault: error: {}", one_line(&e));
                std::process::exit(255)
            }
        },
        Command::Key(cmd) => key::run(&settings, cmd).await,
        Command::StorageCheck(args) => storage_check::run(&settings, args).await,
    }
}

/// The log filter, swapped by [`set_log_level`]; `None` when the level
/// was pinned by `-v`/`-q` or WALVAULT_LOG (or logging is not set up).
static LOG_FILTER: std::sync::OnceLock<
    Option<
        tracing_subscriber::reload::Handle<
            tracing_subscriber::EnvFilter,
            tracing_subscriber::Registry,
        >,
    >,
> = std::sync::OnceLock::new();

/// The filter without `log_level`, `-v`/`-q` or WALVAULT_LOG.
const DEFAULT_FILTER: &str = "warn,walvault=info";

/// The filter a `log_level` stands for: a level name applies to walvault
/// (other crates log warnings and errors), anything else is a filter.
pub(crate) fn log_filter(level: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    use tracing_subscriber::EnvFilter;
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let level = level.trim();
    let hint = "use error, warn, info, debug, trace, or a filter such as \"warn,walvault=debug\"";
    let lower = level.to_ascii_lowercase();
    let directive =
        match lower.as_str() {
            l @ ("error" | "warn" | "info" | "debug" | "trace") => format!("warn,walvault={l}"),
            _ => {
                // a bare word is a target at every level in a filter: a typo
                // of a level would turn every other line off
                if let Some(d) = level.split(',').map(str::trim).find(|d| {
                    !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str())
                }) {
                    anyhow::bail!("log_level {level:?}: {d:?} is not a level ({hint})");
                }
                level.to_owned()
            }
        };
    EnvFilter::try_new(&directive).map_err(|e| anyhow::anyhow!("log_level {level:?}: {e} ({hint})"))
}

fn init_logging(settings: &Settings, verbose: u8, quiet: u8) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let flag = match (verbose, quiet) {
        (0, 0) => None,
        (1, _) => Some("debug"),
        (2.., _) => Some("trace"),
        (_, 1) => Some("warn"),
        (_, _) => Some("error"),
    };
    let pinned = std::env::var("WALVAULT_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| flag.and_then(|l| log_filter(l).ok()));
    let reloadable = pinned.is_none();
    let filter = pinned
        .or_else(|| {
            settings
                .log_level
                .as_deref()
                .and_then(|l| log_filter(l).ok())
        })
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(colour_on_stderr())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match settings.log_format {
        LogFormat::Json => registry.with(fmt.json()).try_init(),
        LogFormat::Text => registry.with(fmt.with_target(false)).try_init(),
    };
    let _ = LOG_FILTER.set((installed.is_ok() && reloadable).then_some(handle));
}

/// Apply walvault.toml's `log_level` (unset: info) to the running process,
/// unless `-v`/`-q` or WALVAULT_LOG set the level at the start.
pub(crate) fn set_log_level(level: Option<&str>) {
    let Some(Some(handle)) = LOG_FILTER.get() else {
        return;
    };
    let filter = match level.map(log_filter).transpose() {
        Ok(f) => f.unwrap_or_else(|| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER)),
        Err(e) => {
            tracing::warn!("the log level stays: {e}");
            return;
        }
    };
    if let Err(e) = handle.reload(filter) {
        tracing::warn!("the log level stays: {e}");
    }
}

/// This program, to start a copy of itself (the `wal-push --async` worker,
/// the `wal-fetch` prefetcher): `/proc/self/exe`, which still runs this
/// binary after a package upgrade replaced the file, where
/// `current_exe()` names a path that is gone ("… (deleted)").
pub(crate) fn own_program() -> std::io::Result<std::path::PathBuf> {
    let proc_self = std::path::PathBuf::from("/proc/self/exe");
    if proc_self.exists() {
        return Ok(proc_self);
    }
    std::env::current_exe()
}

/// Whether log lines may carry ANSI colours: only on a terminal, and never
/// when `NO_COLOR` is set to anything but the empty string (no-color.org).
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An error and its causes on one line, each cause once: errors that
/// already quote their cause (`writing X: No space left on device`) are not
/// followed by it again.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// `e`, then that restoring into `dir` stopped half-way and what finishes
/// it (`remedy`): such a directory must not be started.
pub(crate) fn incomplete(e: &anyhow::Error, dir: &std::path::Path, remedy: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{}; {} is incomplete and must not be started: once the cause is fixed, {remedy}",
        one_line(e),
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A level name is walvault's level (others warn); a filter passes as
    /// it is; a word that is no level is refused, not taken for a target
    /// (which would silence everything else).
    #[test]
    fn log_levels_and_filters() {
        for (given, shown) in [
            ("debug", "warn,walvault=debug"),
            (" WARN ", "warn,walvault=warn"),
            ("warn,walvault::repo=trace", "warn,walvault::repo=trace"),
            ("off", "off"),
        ] {
            let f = log_filter(given).unwrap().to_string();
            let want = tracing_subscriber::EnvFilter::new(shown).to_string();
            assert_eq!(f, want, "{given}");
        }
        for bad in ["debgu", "warn,walvault", "walvault=loud", ""] {
            let e = log_filter(bad).unwrap_err().to_string();
            assert!(
                e.contains("log_level") && e.contains("warn,walvault=debug"),
                "{bad}: {e}"
            );
        }
    }

    /// `CMD --help` lists the command's own options first and the global
    /// ones under their own heading after them.
    #[test]
    fn global_options_have_their_own_heading_after_the_commands() {
        let mut cli = Cli::command();
        cli.build();
        let help = cli
            .find_subcommand_mut("restore-pitr")
            .expect("restore-pitr")
            .render_long_help()
            .to_string();
        let at = |s: &str| {
            help.find(s)
                .unwrap_or_else(|| panic!("{s} not in:\n{help}"))
        };
        assert!(at("--target-time") < at("Global options:"), "{help}");
        assert!(at("--json") < at("Global options:"), "{help}");
        assert!(at("Global options:") < at("--repo"), "{help}");
        assert!(at("Global options:") < at("--key-file"), "{help}");
    }

    #[test]
    fn one_line_names_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = anyhow::Error::new(crate::restore::RestoreError::Io {
            path: "/data/base/1/1259".into(),
            source: io,
        });
        let text = one_line(&e);
        assert_eq!(text.matches("No space left on device").count(), 1, "{text}");
        let e = anyhow::anyhow!("disk full").context("storing pack 1");
        assert_eq!(one_line(&e), "storing pack 1: disk full");
    }
}
