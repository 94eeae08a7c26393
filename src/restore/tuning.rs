//! Settings for the recovery run only (issue 14, item 7): replay is
//! PostgreSQL's own and, once walvault's restore is fast, the floor of the
//! RTO. A restored copy starts with its source's configuration, often the
//! 128 MB default `shared_buffers` that thrashes on a gigabytes-large
//! working set, and restartpoints every `checkpoint_timeout` or
//! `max_wal_size` of WAL that write and sync everything dirty mid-replay.
//!
//! For the recovery walvault raises, never lowers:
//! - `shared_buffers` to the restored data's size, at most a quarter of the
//!   machine's (or the cgroup's) memory;
//! - `max_wal_size` to twice the WAL to replay plus 1 GB, and
//!   `checkpoint_timeout` to 1 h, so no restartpoint interrupts replay.
//!
//! They go into walvault's block in `postgresql.auto.conf`, which is
//! removed at promotion and the configuration reloaded: `max_wal_size` and
//! `checkpoint_timeout` revert then; `shared_buffers` stays until the
//! server restarts, and the report says so. Only for `--target-action
//! promote` (the default): a recovery that pauses or shuts down at the
//! target ends after walvault has gone, and nothing would remove them.

use std::path::Path;

use super::server::tool;

/// A setting raised for the recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raised {
    /// Its name.
    pub name: &'static str,
    /// The value for the recovery, as written (`1536MB`).
    pub value: String,
    /// What the restored configuration says, in words.
    pub was: String,
}

impl Raised {
    /// The `postgresql.auto.conf` line.
    pub fn line(&self) -> String {
        format!("{} = '{}'", self.name, self.value)
    }
}

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {} (was {})", self.name, self.value, self.was)
    }
}

/// The current value of `name` for `pgdata`, in the setting's base unit
/// (`postgres -C`, as the server's user).
async fn current(bin: &Path, pgdata: &Path, run_as: Option<&str>, name: &str) -> Option<u64> {
    let out = tool(bin, "postgres", run_as)
        .arg("-D")
        .arg(pgdata)
        .args(["-C", name])
        .output()
        .await
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Memory this machine (or its cgroup) has, in bytes.
fn memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?
        * 1024;
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(limit.map_or(total, |l| l.min(total)))
}

const MB: u64 = 1 << 20;

/// What to raise for a recovery of `data_bytes` of files replaying
/// `wal_bytes` of WAL, from the current values (`shared_buffers` in 8 KiB
/// pages, `max_wal_size` in MB, `checkpoint_timeout` in seconds).
pub fn plan(
    data_bytes: u64,
    wal_bytes: u64,
    memory: Option<u64>,
    shared_buffers: Option<u64>,
    max_wal_size: Option<u64>,
    checkpoint_timeout: Option<u64>,
) -> Vec<Raised> {
    let mut out = Vec::new();
    if let (Some(mem), Some(pages)) = (memory, shared_buffers) {
        let now = pages * 8192;
        let want = (data_bytes.max(128 * MB)).min(mem / 4) / MB * MB;
        if want > now {
            out.push(Raised {
                name: "shared_buffers",
                value: format!("{}MB", want / MB),
                was: format!("{}MB", now / MB),
            });
        }
    }
    if let Some(now) = max_wal_size {
        let want = wal_bytes * 2 / MB + 1024;
        if want > now {
            out.push(Raised {
                name: "max_wal_size",
                value: format!("{want}MB"),
                was: format!("{now}MB"),
            });
        }
    }
    if let Some(now) = checkpoint_timeout {
        if now < 3600 {
            out.push(Raised {
                name: "checkpoint_timeout",
                value: "1h".into(),
                was: format!("{now}s"),
            });
        }
    }
    out
}

/// The settings to raise for this recovery (none when a value cannot be
/// read: the restored configuration then runs as it is).
pub async fn recovery_settings(
    bin: &Path,
    pgdata: &Path,
    run_as: Option<&str>,
    data_bytes: u64,
    wal_bytes: u64,
) -> Vec<Raised> {
    let (sb, mws, ct) = tokio::join!(
        current(bin, pgdata, run_as, "shared_buffers"),
        current(bin, pgdata, run_as, "max_wal_size"),
        current(bin, pgdata, run_as, "checkpoint_timeout"),
    );
    plan(data_bytes, wal_bytes, memory(), sb, mws, ct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_never_lowers() {
        const GB: u64 = 1 << 30;
        // 1.5 GB of data, 640 MB of WAL, 24 GB of memory, the defaults
        let r = plan(
            1536 * MB,
            640 * MB,
            Some(24 * GB),
            Some(16384),
            Some(1024),
            Some(300),
        );
        let lines: Vec<String> = r.iter().map(Raised::line).collect();
        assert_eq!(
            lines,
            [
                "shared_buffers = '1536MB'",
                "max_wal_size = '2304MB'",
                "checkpoint_timeout = '1h'"
            ]
        );
        assert_eq!(r[0].to_string(), "shared_buffers = 1536MB (was 128MB)");
        // a quarter of memory at most
        let r = plan(
            100 * GB,
            0,
            Some(8 * GB),
            Some(16384),
            Some(1024),
            Some(300),
        );
        assert_eq!(r[0].value, "2048MB");
        // already larger: nothing
        let r = plan(
            GB,
            100 * MB,
            Some(64 * GB),
            Some(1 << 20),
            Some(65536),
            Some(86400),
        );
        assert!(r.is_empty(), "{r:?}");
        // unknown values are left alone
        assert!(plan(GB, GB, None, None, None, None).is_empty());
    }
}
