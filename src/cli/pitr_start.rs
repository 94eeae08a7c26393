//! `restore-pitr --start`: run PostgreSQL on the restored directory, follow
//! its log until recovery reached the target (promoted, paused or shut down
//! as asked) or failed, and collect what the report needs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::pg::Lsn;
use crate::restore::pitr::PitrPlan;
use crate::restore::recovery::{self, TargetAction};

/// How recovery ended.
#[derive(Debug, Clone)]
pub(super) struct Outcome {
    /// Where replay stopped (the new timeline's switch point after a promotion).
    pub stop_lsn: Option<Lsn>,
    /// PostgreSQL's "recovery stopping …" line.
    pub stop_line: Option<String>,
    /// PostgreSQL's "last completed transaction was at log time …".
    pub last_commit_time: Option<String>,
    /// promoted, paused or shut down.
    pub state: &'static str,
    /// From start to the target.
    pub replay_secs: f64,
}

fn bindir(pgdata: &Path, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(b) = given {
        return Ok(b.to_owned());
    }
    let v = std::fs::read_to_string(pgdata.join("PG_VERSION")).context("reading PG_VERSION")?;
    let dir = PathBuf::from(format!("/usr/lib/postgresql/{}/bin", v.trim()));
    if !dir.join("pg_ctl").exists() {
        bail!(
            "no PostgreSQL {} binaries in {}: give their directory with --pg-bin",
            v.trim(),
            dir.display()
        );
    }
    Ok(dir)
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
pub(super) async fn start_and_wait(
    pgdata: &Path,
    plan: &PitrPlan,
    port: Option<u16>,
    pg_bin: Option<&Path>,
    action: TargetAction,
    promote_on_pause: bool,
) -> anyhow::Result<Outcome> {
    let bin = bindir(pgdata, pg_bin)?;
    let log = pgdata.join("walvault-recovery.log");
    let _ = std::fs::remove_file(&log);
    let mut o = "-c lc_messages=C".to_owned();
    if promote_on_pause {
        o.push_str(" -c hot_standby=on");
    }
    if let Some(p) = port {
        o.push_str(&format!(" -p {p}"));
    }
    let started = Instant::now();
    let out = tokio::process::Command::new(bin.join("pg_ctl"))
        .arg("-D")
        .arg(pgdata)
        .arg("-l")
        .arg(&log)
        .args(["-W", "-o", &o, "start"])
        .output()
        .await
        .context("running pg_ctl")?;
    if !out.status.success() {
        bail!(
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
            let out = tokio::process::Command::new(bin.join("pg_ctl"))
                .arg("-D")
                .arg(pgdata)
                .args(["-W", "promote"])
                .output()
                .await
                .context("running pg_ctl promote")?;
            if out.status.success() {
                promoted = true;
            } else if paused {
                bail!(
                    "the server paused at the target, but pg_ctl promote failed: {}{}; it is still paused: promote it with pg_ctl promote -D {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    pgdata.display()
                );
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
            TargetAction::Pause => text.contains("pausing at the end of recovery"),
            TargetAction::Shutdown => text.contains("database system is shut down") && !pid_alive,
        };
        if done {
            let stop_lsn = match action {
                TargetAction::Promote => {
                    // the end of recovery is where the new timeline begins
                    let _ = recovery::remove(pgdata);
                    switch_point(pgdata)
                }
                _ => None,
            };
            return Ok(Outcome {
                stop_lsn,
                stop_line,
                last_commit_time,
                state: match action {
                    TargetAction::Promote => "promoted",
                    TargetAction::Pause => "paused at the target",
                    TargetAction::Shutdown => "shut down at the target",
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
                bail!(
                    "recovery of backup {} failed: {f}\n--- {} (last lines) ---\n{}",
                    plan.backup.id,
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
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
