//! `walvault daemon`: the sidecar. One long-running process next to
//! PostgreSQL that streams WAL, runs the scheduled jobs (backup, expire,
//! verify, deep verify, drill, copy), starts a backup early when the
//! estimated RTO would exceed its budget, keeps one status model that the
//! status file, the HTTP API, `/metrics` and the status page read, and
//! alerts when recovery is at risk.
//!
//! - [`DaemonOptions`]: the `[daemon]` table of walvault.toml and the
//!   command's flags (one struct for both), validated into a [`Plan`];
//! - [`supervisor`]: the stream, the scheduler, the jobs, health;
//! - [`status`]: the model; [`http`], [`metrics`]: what reads it;
//! - [`alerts`]: conditions, dedup, sinks; [`notify`]: systemd.
//!
//! The daemon's memory of its jobs lives in the repository
//! (`records/job/`): a job whose start is recorded without an end was
//! interrupted (kill -9, power loss) and is reported failed and run again
//! when the daemon next starts.

pub mod alerts;
pub mod claim;
mod health;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod schedule;
pub mod status;
pub mod supervisor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

pub use schedule::CronSchedule;
pub use supervisor::{run, Context, CopyTarget, OpenRepository};

/// The default address of the status page, `/metrics` and the API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

/// The `[daemon]` table of walvault.toml; every key is also a flag of
/// `walvault daemon` (flags win).
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonOptions {
    /// Address of the status page, /metrics and the API [default: 127.0.0.1:9187].
    #[arg(long, env = "WALVAULT_LISTEN")]
    pub listen: Option<String>,
    /// Bearer token the actions (POST /api/jobs/…) require; without one
    /// the page is read-only.
    #[arg(long, env = "WALVAULT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (instead of `token`).
    #[arg(long, env = "WALVAULT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// JSON file rewritten with the status model (what /api/status serves).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Time zone the schedules are read in (e.g. Europe/Berlin) [default: UTC].
    #[arg(long)]
    pub time_zone: Option<String>,
    /// How often health is evaluated: the server, RPO, RTO, budgets,
    /// alerts [default: 10s].
    #[arg(long, value_parser = crate::duration::parse_duration)]
    #[serde(default, with = "crate::duration::text")]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub check_interval: Option<Duration>,
    /// Run `stream` (continuous WAL through a slot) [default: true]; false
    /// when archive_command runs `walvault wal-push`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub stream: Option<bool>,
    /// Replication slot of the stream [default: walvault].
    #[arg(long)]
    pub slot: Option<String>,
    /// Stream for synchronous replication (RPO = 0) [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub synchronous: Option<bool>,
    /// Longest wait before received WAL is made durable [default: 1s].
    #[arg(long, value_parser = crate::duration::parse_duration)]
    #[serde(default, with = "crate::duration::text")]
    #[cfg_attr(test, schemars(with = "Option<String>"))]
    pub partial_interval: Option<Duration>,
    /// Start backups with an immediate checkpoint [default: false].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub fast: Option<bool>,
    /// Limit the server's send rate during backups (e.g. 100MiB, per
    /// second) [default: none].
    #[arg(long, value_name = "SIZE")]
    pub max_rate: Option<String>,
    /// Refuse to back up a standby whose replay lags its primary by more
    /// than this much WAL, or that streams from no primary (`off`: no
    /// limit) [default: 1GiB].
    #[arg(long, value_name = "SIZE|off")]
    pub standby_max_lag: Option<String>,
    /// When each job runs.
    #[command(flatten)]
    #[serde(default)]
    pub schedule: Schedules,
}

/// `[daemon.schedule]`: cron expressions (five fields, or six with
/// seconds first) in `time_zone`.
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Schedules {
    /// Full backups (e.g. "0 2 * * *").
    #[arg(long = "schedule-backup", value_name = "CRON")]
    pub backup: Option<String>,
    /// Expire: "after-backup" (the default when [retention] has a policy),
    /// a cron expression, or "off".
    #[arg(long = "schedule-expire", value_name = "CRON")]
    pub expire: Option<String>,
    /// `verify --since-last` (e.g. "30 3 * * *").
    #[arg(long = "schedule-verify", value_name = "CRON")]
    pub verify: Option<String>,
    /// `verify --since-last --sample` with `deep_verify_sample`: also
    /// re-reads a share of what earlier verifies read (e.g. "0 4 * * 0").
    #[arg(long = "schedule-deep-verify", value_name = "CRON")]
    pub deep_verify: Option<String>,
    /// Share of the repository the deep verify re-reads, percent [default: 1].
    #[arg(long = "deep-verify-sample", value_name = "PERCENT")]
    pub deep_verify_sample: Option<f64>,
    /// `drill` (e.g. "0 5 * * 0").
    #[arg(long = "schedule-drill", value_name = "CRON")]
    pub drill: Option<String>,
    /// `files backup` of every `[files.<set>]` (e.g. "0 3 * * *").
    #[arg(long = "schedule-files", value_name = "CRON")]
    pub files: Option<String>,
    /// `copy` to the repositories of `copy_to`: "continuous" (after each
    /// backup and every minute) or a cron expression.
    #[arg(long = "schedule-copy", value_name = "CRON")]
    pub copy: Option<String>,
    /// The `[[repository]]` names copies go to [default: all].
    #[arg(long = "copy-to", value_name = "NAME", value_delimiter = ',')]
    pub copy_to: Option<Vec<String>>,
}

/// A value of the configuration that cannot work.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key} = {value:?}: {why}")]
pub struct ConfigError {
    /// The key, dotted (`daemon.schedule.backup`).
    pub key: String,
    /// The value given.
    pub value: String,
    /// What is wrong and what to write instead.
    pub why: String,
}

impl ConfigError {
    pub(crate) fn new(key: &str, value: impl ToString, why: impl Into<String>) -> ConfigError {
        ConfigError {
            key: key.to_owned(),
            value: value.to_string(),
            why: why.into(),
        }
    }

    /// ` line N` of the config text where the key is set to the value
    /// (empty when it came from a flag).
    pub fn line_in(&self, text: &str) -> String {
        let last = self.key.rsplit('.').next().unwrap_or(&self.key);
        text.lines()
            .position(|l| {
                let l = l.trim_start();
                l.strip_prefix(last)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
                    && l.contains(self.value.trim_matches('"'))
            })
            .map(|i| format!(" line {}", i + 1))
            .unwrap_or_default()
    }
}

/// When a job runs.
#[derive(Debug, Clone)]
pub enum Trigger {
    /// On a cron schedule.
    Cron(Box<CronSchedule>),
    /// After each successful backup.
    AfterBackup,
    /// After each backup and at a fixed pause after the previous run.
    Continuous(Duration),
}

impl Trigger {
    /// As configured (`0 2 * * *`, `after-backup`, `continuous`).
    pub fn text(&self) -> String {
        match self {
            Trigger::Cron(c) => c.text().to_owned(),
            Trigger::AfterBackup => "after-backup".into(),
            Trigger::Continuous(_) => "continuous".into(),
        }
    }
}

/// The validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where HTTP listens.
    pub listen: SocketAddr,
    /// The bearer token of the actions.
    pub token: Option<String>,
    /// The status file.
    pub status_file: Option<PathBuf>,
    /// The schedules' zone.
    pub time_zone: Tz,
    /// Health evaluation period.
    pub check_interval: Duration,
    /// Each job kind's trigger (kinds not listed do not run on their own).
    pub triggers: Vec<(jobs::JobKind, Trigger)>,
    /// Deep verify sample, percent.
    pub deep_verify_sample: f64,
}

impl DaemonOptions {
    /// Each value given here, else the one in `file` (flags over the file).
    pub fn or(self, file: DaemonOptions) -> DaemonOptions {
        let s = self.schedule;
        let f = file.schedule;
        DaemonOptions {
            listen: self.listen.or(file.listen),
            token: self.token.or(file.token),
            token_file: self.token_file.or(file.token_file),
            status_file: self.status_file.or(file.status_file),
            time_zone: self.time_zone.or(file.time_zone),
            check_interval: self.check_interval.or(file.check_interval),
            stream: self.stream.or(file.stream),
            slot: self.slot.or(file.slot),
            synchronous: self.synchronous.or(file.synchronous),
            partial_interval: self.partial_interval.or(file.partial_interval),
            fast: self.fast.or(file.fast),
            max_rate: self.max_rate.or(file.max_rate),
            standby_max_lag: self.standby_max_lag.or(file.standby_max_lag),
            schedule: Schedules {
                backup: s.backup.or(f.backup),
                expire: s.expire.or(f.expire),
                verify: s.verify.or(f.verify),
                deep_verify: s.deep_verify.or(f.deep_verify),
                deep_verify_sample: s.deep_verify_sample.or(f.deep_verify_sample),
                drill: s.drill.or(f.drill),
                files: s.files.or(f.files),
                copy: s.copy.or(f.copy),
                copy_to: s.copy_to.or(f.copy_to),
            },
        }
    }

    /// Check every value; the first that cannot work is the error. Reads
    /// no file: every command loads walvault.toml (wal-fetch as the
    /// database's OS user too), and the token file is the daemon's alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.checked(false, false).map(|_| ())
    }

    /// The validated plan, the token file read. `has_retention`:
    /// walvault.toml has a `[retention]` policy (expire then defaults to
    /// after each backup).
    pub fn plan(&self, has_retention: bool) -> Result<Plan, ConfigError> {
        self.checked(has_retention, true)
    }

    fn checked(&self, has_retention: bool, read_token: bool) -> Result<Plan, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::new(
                "daemon.listen",
                listen_text,
                "give an address and a port, e.g. 127.0.0.1:9187 or [::]:9187",
            )
        })?;
        let tz_text = self.time_zone.as_deref().unwrap_or("UTC");
        let time_zone: Tz = tz_text.parse().map_err(|_| {
            ConfigError::new(
                "daemon.time_zone",
                tz_text,
                "not a time zone of the tz database (e.g. UTC, Europe/Berlin, America/New_York)",
            )
        })?;
        if let Some(slot) = &self.slot {
            crate::pg::validate_slot_name(slot)
                .map_err(|e| ConfigError::new("daemon.slot", slot, e.to_string()))?;
        }
        let check_interval = self.check_interval.unwrap_or(Duration::from_secs(10));
        if check_interval < Duration::from_secs(1) || check_interval > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "daemon.check_interval",
                crate::duration::format_duration(check_interval),
                "use 1s to 1h",
            ));
        }
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "daemon.token_file",
                    "",
                    "give token or token_file, not both",
                ))
            }
            (Some(t), None) => Some(t.clone()),
            (None, Some(_)) if !read_token => None,
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| {
                        ConfigError::new(
                            "daemon.token_file",
                            p.display(),
                            format!("cannot read it: {e}"),
                        )
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if token.as_deref() == Some("") {
            return Err(ConfigError::new(
                "daemon.token",
                "",
                "the token is empty: give one, or none for a read-only page",
            ));
        }
        let sample = self.schedule.deep_verify_sample.unwrap_or(1.0);
        if !(sample > 0.0 && sample <= 100.0) {
            return Err(ConfigError::new(
                "daemon.schedule.deep_verify_sample",
                sample,
                "a share in percent: more than 0, at most 100",
            ));
        }
        let cron = |key: &str, text: &str| {
            CronSchedule::parse(text, time_zone)
                .map(|c| Trigger::Cron(Box::new(c)))
                .map_err(|why| ConfigError::new(&format!("daemon.schedule.{key}"), text, why))
        };
        use jobs::JobKind;
        let s = &self.schedule;
        let mut triggers = Vec::new();
        for (kind, key, text) in [
            (JobKind::Backup, "backup", &s.backup),
            (JobKind::Verify, "verify", &s.verify),
            (JobKind::DeepVerify, "deep_verify", &s.deep_verify),
            (JobKind::Drill, "drill", &s.drill),
            (JobKind::Files, "files", &s.files),
        ] {
            if let Some(t) = text {
                triggers.push((kind, cron(key, t)?));
            }
        }
        match s.expire.as_deref() {
            Some("off") => {}
            Some("after-backup") => triggers.push((JobKind::Expire, Trigger::AfterBackup)),
            Some(t) => triggers.push((JobKind::Expire, cron("expire", t)?)),
            None if has_retention => triggers.push((JobKind::Expire, Trigger::AfterBackup)),
            None => {}
        }
        match s.copy.as_deref() {
            Some("continuous") => {
                triggers.push((JobKind::Copy, Trigger::Continuous(Duration::from_secs(60))))
            }
            Some(t) => triggers.push((JobKind::Copy, cron("copy", t)?)),
            None => {}
        }
        Ok(Plan {
            listen,
            token,
            status_file: self.status_file.clone(),
            time_zone,
            check_interval,
            triggers,
            deep_verify_sample: sample,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_schedule_names_its_key_and_line() {
        let text = "repo = \"/r\"\n\n[daemon]\nlisten = \"127.0.0.1:1\"\n\n[daemon.schedule]\nbackup = \"0 2 * * *\"\nverify = \"61 * * * *\"\n";
        #[derive(Deserialize)]
        struct F {
            daemon: DaemonOptions,
        }
        let f: F = toml::from_str(&text.replacen("repo = \"/r\"\n", "", 1)).unwrap();
        let e = f.daemon.validate().unwrap_err();
        assert_eq!(e.key, "daemon.schedule.verify");
        assert_eq!(e.line_in(text), " line 8");
        assert!(e.to_string().contains("not a cron expression"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file_and_expire_follows_backups_with_a_policy() {
        let file = DaemonOptions {
            listen: Some("127.0.0.1:1".into()),
            slot: Some("file".into()),
            schedule: Schedules {
                backup: Some("0 2 * * *".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let flags = DaemonOptions {
            listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let o = flags.or(file);
        assert_eq!(o.listen.as_deref(), Some("127.0.0.1:2"));
        assert_eq!(o.slot.as_deref(), Some("file"));
        let p = o.plan(true).unwrap();
        assert_eq!(p.listen.port(), 2);
        let kinds: Vec<_> = p.triggers.iter().map(|(k, t)| (*k, t.text())).collect();
        assert_eq!(
            kinds,
            vec![
                (jobs::JobKind::Backup, "0 2 * * *".to_owned()),
                (jobs::JobKind::Expire, "after-backup".to_owned())
            ]
        );
        assert!(o_without_policy_has_no_expire());
    }

    /// Every command loads walvault.toml, wal-fetch as the database's OS
    /// user: the daemon's token file is read only when the daemon plans.
    #[test]
    fn only_the_daemon_reads_the_token_file() {
        let o = DaemonOptions {
            token_file: Some("/nonexistent/walvault-token".into()),
            ..Default::default()
        };
        o.validate().unwrap();
        let e = o.plan(false).unwrap_err();
        assert_eq!(e.key, "daemon.token_file");
    }

    fn o_without_policy_has_no_expire() -> bool {
        DaemonOptions::default()
            .plan(false)
            .unwrap()
            .triggers
            .is_empty()
    }
}
