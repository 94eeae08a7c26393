//! Recovery rates measured by `restore-pitr --start`, kept in the repository
//! (`<stanza>/catalog/recovery-rates`) so that the next plan's estimate (its
//! `--dry-run` and `--rto-budget`) comes from what recoveries from this
//! repository really achieved rather than from assumptions.
//!
//! The model is the shape of a recovery: the files are restored (the first
//! WAL staged meanwhile), then PostgreSQL starts and replays while the rest
//! of the WAL is staged; planning, start and promotion are the overhead.

use serde::{Deserialize, Serialize};

use crate::repo::object::ObjectKind;
use crate::repo::{Repository, StanzaPaths};

/// Assumed before anything was measured: conservative for one small host
/// and a local or nearby store.
const ASSUMED: RecoveryRates = RecoveryRates {
    restore_bytes_per_s: 150e6,
    replay_bytes_per_s: 40e6,
    overhead_s: 3.0,
    measured_at: String::new(),
    host: String::new(),
};

/// Throughputs of one recovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryRates {
    /// Bytes of data files restored per second (WAL staged meanwhile).
    pub restore_bytes_per_s: f64,
    /// WAL bytes replayed per second, from PostgreSQL's start to promotion.
    pub replay_bytes_per_s: f64,
    /// Seconds spent outside restore and replay (planning, catalog reads).
    pub overhead_s: f64,
    /// When they were measured (RFC 3339); empty when assumed.
    pub measured_at: String,
    /// The host that measured them.
    pub host: String,
}

impl RecoveryRates {
    /// The rates of a finished recovery; `None` when it had too little to
    /// measure (no files or no WAL replayed).
    pub fn measured(
        restore_bytes: u64,
        restore_secs: f64,
        wal_replayed: u64,
        replay_secs: f64,
        total_secs: f64,
    ) -> Option<RecoveryRates> {
        if restore_bytes == 0 || wal_replayed == 0 || restore_secs <= 0.0 || replay_secs <= 0.0 {
            return None;
        }
        Some(RecoveryRates {
            restore_bytes_per_s: restore_bytes as f64 / restore_secs,
            replay_bytes_per_s: wal_replayed as f64 / replay_secs,
            overhead_s: (total_secs - restore_secs - replay_secs).max(0.0),
            measured_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
    }

    /// Finite rates above 1 kB/s and an overhead under a day: anything
    /// else (a damaged or forged record) is not used.
    fn plausible(&self) -> bool {
        let rate = |r: f64| r.is_finite() && r >= 1e3;
        rate(self.restore_bytes_per_s)
            && rate(self.replay_bytes_per_s)
            && self.overhead_s.is_finite()
            && (0.0..86_400.0).contains(&self.overhead_s)
    }

    /// Whether these were measured (else assumed).
    pub fn is_measured(&self) -> bool {
        !self.measured_at.is_empty()
    }

    /// Seconds to restore `restore_bytes` of files and replay `wal_bytes`.
    pub fn estimate(&self, restore_bytes: u64, wal_bytes: u64) -> f64 {
        restore_bytes as f64 / self.restore_bytes_per_s
            + wal_bytes as f64 / self.replay_bytes_per_s
            + self.overhead_s
    }

    /// One line on where the numbers come from.
    pub fn basis(&self) -> String {
        let rates = format!(
            "files {:.0} MB/s, replay {:.0} MB/s",
            self.restore_bytes_per_s / 1e6,
            self.replay_bytes_per_s / 1e6
        );
        if self.is_measured() {
            format!(
                "rates measured by the recovery on {} at {}: {rates}",
                self.host, self.measured_at
            )
        } else {
            format!("assumed rates, no recovery from this repository measured yet: {rates}")
        }
    }

    /// Where versions before the series kept the single record.
    fn legacy_key(paths: &StanzaPaths) -> String {
        format!("{}recovery-rates", paths.catalog())
    }

    /// The series of records (`catalog/rates/<time>-<random>`).
    fn dir(paths: &StanzaPaths) -> String {
        format!("{}rates/", paths.catalog())
    }

    /// The rates of the stanza's last measured recovery, else the assumed
    /// ones. A missing or unreadable record is not an error: an estimate is
    /// advice.
    pub async fn load(repo: &Repository, paths: &StanzaPaths) -> RecoveryRates {
        let read = repo
            .get_series(
                ObjectKind::RecoveryRates,
                &Self::dir(paths),
                &Self::legacy_key(paths),
                1 << 16,
            )
            .await;
        match read
            .map(|found| found.map(|(_, body)| serde_json::from_slice::<RecoveryRates>(&body)))
        {
            Ok(Some(Ok(r))) if r.plausible() => r,
            Ok(_) => ASSUMED,
            Err(e) => {
                tracing::info!("recovery rates unreadable ({e}); assuming");
                ASSUMED
            }
        }
    }

    /// Record these as the stanza's last measured recovery. Best effort: a
    /// repository opened with read-only credentials keeps the old record.
    pub async fn store(&self, repo: &Repository, paths: &StanzaPaths) {
        let body = match serde_json::to_vec(self) {
            Ok(b) => b,
            Err(_) => return,
        };
        if let Err(e) = repo
            .put_series(ObjectKind::RecoveryRates, &Self::dir(paths), &body)
            .await
        {
            tracing::info!("could not record this recovery's rates ({e})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_rates_estimate_their_own_recovery() {
        let r = RecoveryRates::measured(1_600_000_000, 1.25, 360_000_000, 2.0, 3.5).unwrap();
        assert!(r.is_measured());
        assert!((r.estimate(1_600_000_000, 360_000_000) - 3.5).abs() < 1e-9);
        // twice the WAL: twice the replay
        assert!((r.estimate(1_600_000_000, 720_000_000) - 5.5).abs() < 1e-9);
        assert!(r.basis().starts_with("rates measured"));
        assert!(RecoveryRates::measured(0, 1.0, 1, 1.0, 2.0).is_none());
        assert!(RecoveryRates::measured(1, 1.0, 0, 1.0, 2.0).is_none());
        assert!(!ASSUMED.is_measured());
        assert!(ASSUMED.plausible() && r.plausible());
        for bad in [
            RecoveryRates {
                overhead_s: -100.0,
                ..r.clone()
            },
            RecoveryRates {
                restore_bytes_per_s: 1e-300,
                ..r.clone()
            },
            RecoveryRates {
                replay_bytes_per_s: f64::NAN,
                ..r.clone()
            },
            RecoveryRates {
                overhead_s: f64::INFINITY,
                ..r.clone()
            },
        ] {
            assert!(!bad.plausible(), "{bad:?}");
        }
        assert!(ASSUMED.basis().starts_with("assumed"));
    }
}
