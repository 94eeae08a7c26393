//! kill -9 of a whole server, as a crash would, and the process checks it
//! waits on.

use std::fs;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::super::wait_for;

/// True while process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// kill -9 the server of `datadir` and wait until it is entirely gone: the
/// postmaster first, then every process whose working directory is the data
/// directory (PostgreSQL's processes all chdir there; a child forked by a
/// postmaster that was mid crash-restart is found this way even after it was
/// re-parented). Waits until no such process is left and no process is
/// attached to the SysV shared memory segment named in postmaster.pid.
/// Panics after 30 s, naming what is still there.
pub fn crash(datadir: &Path) {
    let pidfile = fs::read_to_string(datadir.join("postmaster.pid")).unwrap_or_default();
    let postmaster = pidfile
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok());
    // line 7: "<key> <shmid>"
    let shmid = pidfile
        .lines()
        .nth(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<i64>().ok());
    let dir = fs::canonicalize(datadir).unwrap_or_else(|_| datadir.to_path_buf());
    // a stale postmaster.pid may name a pid that now belongs to someone else
    if let Some(pid) = postmaster.filter(|p| runs_in(*p, &dir)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let what = format!("the server of {} to go away after kill -9", dir.display());
    wait_for(Duration::from_secs(30), &what, || {
        // a process forked meanwhile is killed on the next round
        let procs = processes_in(&dir);
        for p in &procs {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        let attached = shmid.map_or(0, shm_attached);
        let postmaster_alive = postmaster.is_some_and(|p| runs_in(p, &dir));
        if procs.is_empty() && attached == 0 && !postmaster_alive {
            Ok(())
        } else {
            Err(format!(
                "processes {procs:?}, {attached} attached to shared memory {shmid:?}, \
                 postmaster alive: {postmaster_alive}"
            ))
        }
    });
}

/// Live (non-zombie) processes whose working directory is `dir` (a server's
/// processes, for a canonical data directory).
pub fn processes_in(dir: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| runs_in(*pid, dir))
        .collect()
}

/// True while `pid` is a live (non-zombie) process working in `dir`.
fn runs_in(pid: i32, dir: &Path) -> bool {
    fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir) && alive(pid)
}

/// How many processes are attached to SysV shared memory segment `shmid`
/// (0 when it no longer exists), from /proc/sysvipc/shm.
fn shm_attached(shmid: i64) -> u64 {
    let Ok(table) = fs::read_to_string("/proc/sysvipc/shm") else {
        return 0;
    };
    // columns: key shmid perms size cpid lpid nattch ...
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(1)?.parse::<i64>().ok()? == shmid).then(|| cols.get(6)?.parse().ok())?
        })
        .next()
        .unwrap_or(0)
}
