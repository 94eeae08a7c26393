//! `/metrics` in the Prometheus text format (version 0.0.4), rendered from
//! the status model. Every value comes from the same [`CheckReport`] that
//! `walvault check --json` prints, or from the model's backups, jobs and
//! stream; each point in time comes both as a timestamp and as an age.
//!
//! [`CheckReport`]: crate::ops::check::CheckReport

use std::fmt::Write;

use chrono::Utc;

use super::jobs::JobKind;
use super::status::{RunState, Status};

/// Escape a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out {
    text: String,
    base: String,
}

impl Out {
    /// `# HELP` and `# TYPE` of a gauge.
    fn gauge(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} gauge");
    }

    /// A sample with the base labels and `extra` ones.
    fn sample(&mut self, name: &str, extra: &[(&str, &str)], v: f64) {
        let mut labels = self.base.clone();
        for (k, val) in extra {
            let _ = write!(labels, ",{k}=\"{}\"", esc(val));
        }
        let v = if v.is_finite() { v } else { 0.0 };
        let _ = writeln!(self.text, "{name}{{{labels}}} {v}");
    }

    /// A gauge with one sample, when there is a value.
    fn one(&mut self, name: &str, help: &str, v: Option<f64>) {
        if let Some(v) = v {
            self.gauge(name, help);
            self.sample(name, &[], v);
        }
    }
}

fn ts(t: chrono::DateTime<Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

/// The exposition of `s`.
pub fn render(s: &Status) -> String {
    let now = Utc::now();
    let mut o = Out {
        text: String::new(),
        base: format!("stanza=\"{}\",repository=\"main\"", esc(&s.stanza)),
    };
    o.one("walvault_up", "1 while the daemon runs.", Some(1.0));
    o.one(
        "walvault_health_ok",
        "1 when every check passes and no budget is breached.",
        Some(f64::from(u8::from(s.health.state == "healthy"))),
    );
    let newest = s.backups.last();
    o.one(
        "walvault_backup_last_success_timestamp_seconds",
        "When the newest backup became consistent (Unix time).",
        newest.map(|b| ts(b.stop_time)),
    );
    o.one(
        "walvault_backup_since_last_success_seconds",
        "Age of the newest backup.",
        newest.map(|b| (now - b.stop_time).as_seconds_f64().max(0.0)),
    );
    o.one(
        "walvault_backup_last_size_bytes",
        "Logical size of the newest backup.",
        newest.map(|b| b.bytes as f64),
    );
    o.one(
        "walvault_backup_last_new_bytes",
        "Bytes the newest backup added to the repository.",
        newest.map(|b| b.new_bytes as f64),
    );
    o.one(
        "walvault_backup_last_duration_seconds",
        "How long the newest backup took.",
        newest.map(|b| (b.stop_time - b.start_time).as_seconds_f64().max(0.0)),
    );
    o.one(
        "walvault_backups",
        "Backups in the repository.",
        Some(s.backups.len() as f64),
    );
    // without a current check (server or repository unreachable) the
    // values it measures are unknown: absent, not stale
    let c = s.check.as_ref().filter(|_| s.check_error.is_none());
    o.one(
        "walvault_rpo_seconds",
        "Data a crash now would lose, in time (upper bound without a connected stream).",
        c.map(|c| c.rpo_seconds),
    );
    o.one(
        "walvault_rpo_bytes",
        "WAL the server has written that is not durable in the repository.",
        c.map(|c| c.rpo_bytes as f64),
    );
    o.one(
        "walvault_rto_estimate_seconds",
        "Estimated time to recover to now (newest backup plus WAL replay at measured rates).",
        c.map(|c| c.rto_estimate_seconds),
    );
    o.one(
        "walvault_recovery_window_start_timestamp_seconds",
        "The oldest moment point-in-time recovery reaches (Unix time).",
        s.window_start.map(ts),
    );
    o.one(
        "walvault_recovery_window_end_timestamp_seconds",
        "The newest moment recovery reaches: the newest archived commit, or the newest backup's consistent point when later (Unix time).",
        s.window_end.map(ts),
    );
    o.one(
        "walvault_recovery_window_seconds",
        "Length of the recovery window.",
        s.window_start
            .zip(s.window_end)
            .map(|(a, b)| (b - a).as_seconds_f64().max(0.0)),
    );
    o.one(
        "walvault_wal_gaps",
        "Ranges of WAL missing from the repository that recovery cannot cross.",
        Some(s.gaps.len() as f64),
    );
    o.one(
        "walvault_stream_up",
        "1 when the daemon's WAL stream is connected.",
        s.stream.enabled.then_some(f64::from(u8::from(s.stream.up))),
    );
    o.one(
        "walvault_stream_lag_bytes",
        "Bytes between the server's end of WAL and what the stream made durable.",
        s.stream.position.as_ref().map(|p| p.lag_bytes as f64),
    );
    o.one(
        "walvault_stream_lag_seconds",
        "How long the oldest received WAL not yet durable has waited.",
        s.stream.position.as_ref().map(|p| p.lag_seconds),
    );
    o.one(
        "walvault_stream_restarts",
        "Times the stream was restarted after an error since the daemon started.",
        s.stream.enabled.then_some(s.stream.restarts as f64),
    );
    o.one(
        "walvault_slot_retained_bytes",
        "WAL the replication slot holds back on the server.",
        c.and_then(|c| c.slot_retained_bytes).map(|b| b as f64),
    );
    o.one(
        "walvault_repository_bytes",
        "Bytes stored in the repository (packs and WAL).",
        s.repository_bytes.map(|b| b as f64),
    );
    o.one(
        "walvault_dedup_ratio",
        "Logical bytes of all backups per byte stored for them.",
        s.dedup_ratio,
    );
    o.one(
        "walvault_repository_free_bytes",
        "Free space of a directory repository's file system.",
        c.and_then(|c| c.repository_free_bytes).map(|b| b as f64),
    );
    if let Some((t, ok)) = c.and_then(|c| c.last_verify) {
        o.one(
            "walvault_verify_last_timestamp_seconds",
            "When the last verify ran.",
            Some(ts(t)),
        );
        o.one(
            "walvault_verify_since_last_seconds",
            "Age of the last verify.",
            Some((now - t).as_seconds_f64().max(0.0)),
        );
        o.one(
            "walvault_verify_last_success",
            "1 when the last verify passed.",
            Some(f64::from(u8::from(ok))),
        );
    }
    if let Some((t, ok)) = c.and_then(|c| c.last_drill) {
        o.one(
            "walvault_drill_last_timestamp_seconds",
            "When the last drill ran.",
            Some(ts(t)),
        );
        o.one(
            "walvault_drill_since_last_seconds",
            "Age of the last drill.",
            Some((now - t).as_seconds_f64().max(0.0)),
        );
        o.one(
            "walvault_drill_last_success",
            "1 when the last drill passed.",
            Some(f64::from(u8::from(ok))),
        );
        o.one(
            "walvault_drill_last_rto_seconds",
            "The recovery time the last drill measured.",
            c.and_then(|c| c.last_drill_rto_seconds),
        );
    }
    if !s.budgets.is_empty() {
        o.gauge("walvault_budget_seconds", "Each configured budget.");
        for (b, v) in &s.budgets {
            o.sample("walvault_budget_seconds", &[("budget", b)], *v);
        }
        o.gauge(
            "walvault_budget_breached",
            "1 when the budget is breached now.",
        );
        for b in s.budgets.keys() {
            o.sample(
                "walvault_budget_breached",
                &[("budget", b)],
                f64::from(u8::from(s.breached.contains(b))),
            );
        }
    }
    if !s.copies.is_empty() {
        o.gauge(
            "walvault_copy_lag_seconds",
            "How far each copy's newest backup is behind the main repository's.",
        );
        for cp in &s.copies {
            if let Some(l) = cp.lag_seconds {
                o.sample("walvault_copy_lag_seconds", &[("copy", &cp.name)], l);
            }
        }
        o.gauge(
            "walvault_copy_backups_behind",
            "Backups of the main repository a copy lacks.",
        );
        for cp in &s.copies {
            o.sample(
                "walvault_copy_backups_behind",
                &[("copy", &cp.name)],
                cp.backups_behind as f64,
            );
        }
    }
    o.gauge("walvault_job_running", "1 while a job of the kind runs.");
    for k in JobKind::ALL {
        let running = s.running.iter().any(|r| r.kind == k);
        o.sample(
            "walvault_job_running",
            &[("job", k.name())],
            f64::from(u8::from(running)),
        );
    }
    let last = |k: JobKind| s.recent.iter().find(|r| r.kind == k);
    o.gauge(
        "walvault_job_last_duration_seconds",
        "How long the last run of the job took.",
    );
    for k in JobKind::ALL {
        if let Some(secs) = last(k).and_then(|r| r.seconds) {
            o.sample(
                "walvault_job_last_duration_seconds",
                &[("job", k.name())],
                secs,
            );
        }
    }
    o.gauge(
        "walvault_job_last_success",
        "1 when the last run of the job succeeded.",
    );
    for k in JobKind::ALL {
        if let Some(r) = last(k) {
            o.sample(
                "walvault_job_last_success",
                &[("job", k.name())],
                f64::from(u8::from(r.state == RunState::Succeeded)),
            );
        }
    }
    o.gauge(
        "walvault_job_last_end_timestamp_seconds",
        "When the last run of the job ended.",
    );
    for k in JobKind::ALL {
        if let Some(t) = last(k).and_then(|r| r.finished_at) {
            o.sample(
                "walvault_job_last_end_timestamp_seconds",
                &[("job", k.name())],
                ts(t),
            );
        }
    }
    o.one(
        "walvault_alerts_firing",
        "Alert conditions holding now.",
        Some(s.alerts.len() as f64),
    );
    o.text
}
