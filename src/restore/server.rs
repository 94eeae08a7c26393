//! Running PostgreSQL on a restored directory for a recovery: start it,
//! follow its log until recovery reached the target (promoted, paused or
//! shut down as asked) or failed, and collect what the report needs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::recovery::{self, TargetAction};
use super::{io, RecoverError};
use crate::pg::Lsn;

/// How to run the server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Port (default: the restored configuration's).
    pub port: Option<u16>,
    /// Directory of `pg_ctl` (default: `/usr/lib/postgresql/<major>/bin`).
    pub pg_bin: Option<PathBuf>,
    /// The OS user to run it as when walvault runs as root (PostgreSQL
    /// refuses to run as root); the directory is given to that user.
    pub run_as: Option<String>,
    /// More settings for this run, given on the command line (`-c
    /// name=value`): a scratch recovery's socket directory, say.
    pub settings: Vec<(String, String)>,
}

/// Where recovery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// Files restored and WAL staged; the server was not started.
    #[serde(rename = "staged, not started")]
    Staged,
    /// Recovery ended at the target and the server accepts writes.
    #[serde(rename = "promoted")]
    Promoted,
    /// The server is paused at the target, still in recovery.
    #[serde(rename = "paused at the target")]
    Paused,
    /// The server shut down at the target.
    #[serde(rename = "shut down at the target")]
    ShutDown,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Staged => "staged, not started",
            Outcome::Promoted => "promoted",
            Outcome::Paused => "paused at the target",
            Outcome::ShutDown => "shut down at the target",
        })
    }
}

/// What the server's log said about the end of recovery.
#[derive(Debug, Clone)]
pub struct Ended {
    /// Where replay stopped (the new timeline's switch point after a promotion).
    pub stop_lsn: Option<Lsn>,
    /// PostgreSQL's "recovery stopping …" line.
    pub stop_line: Option<String>,
    /// PostgreSQL's "last completed transaction was at log time …".
    pub last_commit_time: Option<String>,
    /// Promoted, paused or shut down.
    pub outcome: Outcome,
    /// From start to the target.
    pub replay_secs: f64,
}

/// The directory of the server binaries for `pgdata`.
pub fn bindir(pgdata: &Path, given: Option<&Path>) -> Result<PathBuf, RecoverError> {
    if let Some(b) = given {
        return Ok(b.to_owned());
    }
    let file = pgdata.join("PG_VERSION");
    let v = std::fs::read_to_string(&file).map_err(io(&file))?;
    let dir = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", v.trim()));
    if !dir.join("pg_ctl").exists() {
        return Err(RecoverError::NoBinaries {
            version: v.trim().to_owned(),
            dir,
        });
    }
    Ok(dir)
}

/// The uid and gid of OS user `name`.
pub fn os_user(name: &str) -> Result<super::fetch::Owner, RecoverError> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok((u.uid, u.gid)),
        _ => Err(RecoverError::NoSuchUser(name.to_owned())),
    }
}

/// Give `dir` and everything below it to `owner`, the tablespaces its
/// `pg_tblspc` links point to included.
pub fn chown_tree(dir: &Path, owner: super::fetch::Owner) -> Result<(), RecoverError> {
    let (uid, gid) = (Some(owner.0.as_raw()), Some(owner.1.as_raw()));
    std::os::unix::fs::lchown(dir, uid, gid).map_err(io(dir))?;
    let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if meta.file_type().is_symlink() {
        // a tablespace link: its target is the tablespace
        let target = std::fs::canonicalize(dir).map_err(io(dir))?;
        return chown_tree(&target, owner);
    }
    if !meta.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = e.map_err(io(dir))?.path();
        let link = std::fs::symlink_metadata(&path)
            .map_err(io(&path))?
            .file_type()
            .is_symlink();
        if link && !dir.ends_with("pg_tblspc") {
            std::os::unix::fs::lchown(&path, uid, gid).map_err(io(&path))?;
        } else {
            chown_tree(&path, owner)?;
        }
    }
    Ok(())
}

/// A command running `program` of the binaries in `bin`, as `run_as`
/// when given.
pub fn tool(bin: &Path, program: &str, run_as: Option<&str>) -> tokio::process::Command {
    match run_as {
        Some(u) => {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", u, "--"]).arg(bin.join(program));
            c
        }
        None => tokio::process::Command::new(bin.join(program)),
    }
}

fn pg_ctl(bin: &Path, run_as: Option<&str>) -> tokio::process::Command {
    tool(bin, "pg_ctl", run_as)
}

async fn run_pg_ctl(
    mut cmd: tokio::process::Command,
    action: &'static str,
) -> Result<std::process::Output, RecoverError> {
    cmd.output().await.map_err(|source| RecoverError::PgCtl {
        action,
        output: source.to_string(),
    })
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

/// Stop the server on `pgdata` (fast shutdown), waiting for it.
pub async fn stop(pgdata: &Path, opts: &ServerOptions) -> Result<(), RecoverError> {
    stop_with(pgdata, opts, "fast").await
}

/// Stop the server on `pgdata` with shutdown mode `mode` (`fast`,
/// `immediate`), waiting for it.
pub async fn stop_with(
    pgdata: &Path,
    opts: &ServerOptions,
    mode: &str,
) -> Result<(), RecoverError> {
    let bin = bindir(pgdata, opts.pg_bin.as_deref())?;
    let mut cmd = pg_ctl(&bin, opts.run_as.as_deref());
    cmd.arg("-D")
        .arg(pgdata)
        .args(["-m", mode, "-w", "-t", "300", "stop"]);
    let out = run_pg_ctl(cmd, "stop").await?;
    if !out.status.success() {
        return Err(RecoverError::PgCtl {
            action: "stop",
            output: output_text(&out),
        });
    }
    Ok(())
}

/// Start the server on `pgdata` and wait for the end of recovery.
///
/// With `promote_on_pause`, the recovery settings say `pause` and the
/// server is asked to promote (`pg_ctl promote`) as soon as replay runs. A
/// promotion ends recovery with an end-of-recovery record and checkpoints in
/// the background, where reaching a target with `promote` makes the server
/// wait for a full checkpoint — every dirty buffer written and synced, many
/// seconds with large shared_buffers — before it accepts writes. Outside
/// standby mode PostgreSQL only looks at a promote request when it pauses,
/// so an early request changes nothing before the target; it is seen the
/// moment the pause begins (a request sent during the pause waits up to a
/// second for PostgreSQL's poll). This run gets `hot_standby = on` on its
/// command line, since a pause needs it.
pub async fn start_and_wait(
    pgdata: &Path,
    backup: &str,
    opts: &ServerOptions,
    action: TargetAction,
    promote_on_pause: bool,
) -> Result<Ended, RecoverError> {
    let bin = bindir(pgdata, opts.pg_bin.as_deref())?;
    let run_as = opts.run_as.as_deref();
    let log = pgdata.join("walvault-recovery.log");
    let _ = std::fs::remove_file(&log);
    let mut o = "-c lc_messages=C".to_owned();
    if promote_on_pause {
        o.push_str(" -c hot_standby=on");
    }
    if let Some(p) = opts.port {
        o.push_str(&format!(" -p {p}"));
    }
    for (k, v) in &opts.settings {
        // pg_ctl passes -o through a shell: quote the value
        o.push_str(&format!(" -c {k}='{}'", v.replace('\'', "")));
    }
    let started = Instant::now();
    let mut cmd = pg_ctl(&bin, run_as);
    cmd.arg("-D")
        .arg(pgdata)
        .arg("-l")
        .arg(&log)
        .args(["-W", "-o", &o, "start"]);
    let out = run_pg_ctl(cmd, "start").await?;
    if !out.status.success() {
        return Err(RecoverError::PgCtl {
            action: "start",
            output: output_text(&out),
        });
    }
    let find = |text: &str, needle: &str| -> Option<String> {
        text.lines()
            .find(|l| l.contains(needle))
            .map(|l| l[l.find(needle).unwrap_or(0)..].to_owned())
    };
    let mut promoted = false;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let paused = text.contains("pausing at the end of recovery");
        if promote_on_pause && !promoted && (paused || text.contains("redo starts at")) {
            let mut cmd = pg_ctl(&bin, run_as);
            cmd.arg("-D").arg(pgdata).args(["-W", "promote"]);
            let out = run_pg_ctl(cmd, "promote").await?;
            if out.status.success() {
                promoted = true;
            } else if paused {
                return Err(RecoverError::PromoteFailed {
                    output: output_text(&out),
                    pgdata: pgdata.to_owned(),
                });
            }
            // otherwise recovery has not marked the control file yet: again
            // on the next look
        }
        let pid_alive = pgdata.join("postmaster.pid").exists();
        let stop_line = find(&text, "recovery stopping");
        let last_commit_time = find(&text, "last completed transaction was at log time").map(|l| {
            l.trim_start_matches("last completed transaction was at log time ")
                .to_owned()
        });
        let done = match action {
            TargetAction::Promote => {
                text.contains("database system is ready to accept connections")
                    && !pgdata.join("recovery.signal").exists()
            }
            TargetAction::Pause => paused,
            TargetAction::Shutdown => text.contains("database system is shut down") && !pid_alive,
        };
        if done {
            let stop_lsn = match action {
                TargetAction::Promote => {
                    // the recovery's settings go, and those a reload can
                    // change revert now (shared_buffers at the next restart)
                    let _ = recovery::remove(pgdata);
                    let mut cmd = pg_ctl(&bin, run_as);
                    cmd.arg("-D").arg(pgdata).arg("reload");
                    if let Err(e) = run_pg_ctl(cmd, "reload").await {
                        tracing::warn!("pg_ctl reload after the promotion: {e}");
                    }
                    // the end of recovery is where the new timeline begins
                    switch_point(pgdata)
                }
                _ => None,
            };
            return Ok(Ended {
                stop_lsn,
                stop_line,
                last_commit_time,
                outcome: match action {
                    TargetAction::Promote => Outcome::Promoted,
                    TargetAction::Pause => Outcome::Paused,
                    TargetAction::Shutdown => Outcome::ShutDown,
                },
                replay_secs: started.elapsed().as_secs_f64(),
            });
        }
        let failed = text
            .lines()
            .find(|l| l.contains("FATAL:") || l.contains("PANIC:"));
        if let Some(f) = failed {
            if !pid_alive || text.contains("database system is shut down") {
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                return Err(RecoverError::RecoveryFailed {
                    backup: backup.to_owned(),
                    line: f.to_owned(),
                    log: log.clone(),
                    tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                });
            }
        }
    }
}

/// The switch point in the newest timeline history file in pg_wal.
fn switch_point(pgdata: &Path) -> Option<Lsn> {
    let dir = std::fs::read_dir(pgdata.join("pg_wal")).ok()?;
    let newest = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".history"))
        .max()?;
    let text = std::fs::read_to_string(pgdata.join("pg_wal").join(newest)).ok()?;
    crate::wal::history::parse_history(&text)
        .ok()?
        .last()
        .map(|h| h.end)
}
