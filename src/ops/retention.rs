//! The retention policy: which backups of a stanza `expire` keeps, why, and
//! what WAL each kept one needs. Pure logic: no I/O, no clock (the caller
//! passes `now`), no async. The caller reads the repository, turns each
//! backup into a [`Candidate`], calls [`decide`], keeps the WAL each
//! [`Role`] asks for and deletes the rest.
//!
//! The rules, over the backups ordered by stop time (ties broken by id):
//! - the newest backup is always kept ([`Reason::Newest`]), whatever the policy;
//! - `--keep-within W`: the window starts at `now − W`. Every backup that
//!   stopped at or after the start is kept ([`Reason::Window`]), and so is the
//!   newest one that stopped at or before it ([`Reason::WindowBase`]): recovery
//!   to the window's first moment starts from that backup. When no backup is
//!   that old, the oldest one is the base, so recovery reaches back as far as
//!   it can. A window reaching before chrono's calendar (±262,000 years)
//!   covers every backup;
//! - `--keep-last N`: the N newest ([`Reason::Last`], rank 1 = newest);
//! - `--keep-hourly/-daily/-weekly/-monthly/-yearly N`, as in restic and
//!   borg: walking from the newest backup to the oldest, keep the newest
//!   backup of each of the N most recent buckets that hold a backup. A
//!   bucket is the stop time in the policy's time zone truncated to the hour,
//!   day, ISO 8601 week, month or year, named by its local label
//!   (`2026-12-04T13`, `2026-12-04`, `2026-W49`, `2026-12`, `2026`);
//! - a hold whose `until` is unset or later than `now` ([`Reason::Held`]);
//! - the verified guard, last (see [`decide`]).
//!
//! **Buckets are local wall-clock labels.** When clocks fall back, the repeated
//! hour (Europe/Berlin, last Sunday of October: 02:00–03:00 happens at +02:00
//! and again at +01:00) is *one* hourly bucket two real hours long: the bucket
//! is what a user reads on a clock, as in restic and borg. The hour skipped in
//! spring has no bucket. Buckets are counted as distinct labels, not as
//! changes of label between neighbours, so a label that comes back after
//! another (a zone whose clocks go back across midnight) still counts once,
//! and its newest backup represents it. A stop time so near the ends of
//! chrono's calendar that its local time does not exist is bucketed in UTC.
//!
//! Invariants of the result: one [`Decision`] per candidate; a kept one has a
//! role and an expired one none; reasons come in the order of [`Reason`]'s
//! variants (holds in the order the candidate lists them); no input (stop
//! times, durations, counts) makes it panic.

#![deny(clippy::indexing_slicing)]

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// The retention policy (flags `--keep-within 7d --keep-last N --keep-hourly N
/// --keep-daily N --keep-weekly N --keep-monthly N --keep-yearly N --retention-timezone
/// Europe/Berlin`, or `[retention]` in walvault.toml). Missing keys
/// deserialize as unset; `timezone` is an IANA name string.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Keep every moment of the last `W` recoverable (see the module docs).
    pub keep_within: Option<Duration>,
    /// Keep the N newest backups.
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the N most recent local hours.
    pub keep_hourly: Option<u32>,
    /// … local days.
    pub keep_daily: Option<u32>,
    /// … ISO 8601 weeks (Monday to Sunday, local).
    pub keep_weekly: Option<u32>,
    /// … local months.
    pub keep_monthly: Option<u32>,
    /// … local years.
    pub keep_yearly: Option<u32>,
    /// Time zone the GFS buckets are cut in (serde as its IANA name string);
    /// default UTC.
    pub timezone: Tz,
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The backup's id; unique among the candidates.
    pub id: String,
    /// When the backup became consistent.
    pub stop_time: DateTime<Utc>,
    /// Holds on it (`walvault hold`); a hold whose `until` has passed no
    /// longer protects.
    pub holds: Vec<Hold>,
    /// Whether the last verify of this backup passed (false when never
    /// verified or failed).
    pub verified: bool,
}

/// A hold on a backup: kept while `until` is unset or later than `now`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    /// When the hold ends; `None`: until released.
    pub until: Option<DateTime<Utc>>,
    /// Why it is held, as the operator wrote it.
    pub reason: String,
    /// When the hold was placed.
    pub created: DateTime<Utc>,
}

/// Why a backup is kept. A backup may have several reasons; they are listed
/// in the order of these variants.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Reason {
    /// The newest backup: always kept.
    Newest,
    /// The newest backup at or before the window's start (or, if none is that
    /// old, the oldest backup): recovery to every moment of the window starts
    /// from it.
    WindowBase,
    /// Stopped inside the window.
    Window,
    /// One of the `--keep-last` newest.
    Last {
        /// 1 = newest.
        rank: u32,
    },
    /// Newest of its local hour, e.g. `2026-12-04T13`.
    Hourly {
        /// The bucket's label in the policy's time zone.
        bucket: String,
    },
    /// Newest of its local day, e.g. `2026-12-04`.
    Daily {
        /// The bucket's label in the policy's time zone.
        bucket: String,
    },
    /// Newest of its ISO week, e.g. `2026-W49`.
    Weekly {
        /// The bucket's label in the policy's time zone.
        bucket: String,
    },
    /// Newest of its local month, e.g. `2026-12`.
    Monthly {
        /// The bucket's label in the policy's time zone.
        bucket: String,
    },
    /// Newest of its local year, e.g. `2026`.
    Yearly {
        /// The bucket's label in the policy's time zone.
        bucket: String,
    },
    /// An active hold (one reason per active hold).
    Held {
        /// The hold's reason.
        reason: String,
        /// When the hold ends; `None`: until released.
        until: Option<DateTime<Utc>>,
    },
    /// Kept as the fallback for `protects`, the oldest kept backup, until that
    /// one passes verify.
    Unverified {
        /// Id of the unverified oldest kept backup.
        protects: String,
    },
    /// Expired by the policy, but its manifest is still locked in a
    /// write-once repository: kept as a restore point until the lock ends.
    Locked {
        /// When the lock ends.
        until: DateTime<Utc>,
    },
}

/// What a kept backup is needed for, which decides the WAL kept for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The recovery window starts from it: keep all WAL from its start onward.
    RecoveryBase,
    /// A restore point outside the window (GFS, last-N, held; the newest
    /// backup is always a recovery base): keep only its own consistency WAL,
    /// start to stop LSN.
    Point,
}

/// The verdict on one backup.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    /// The candidate's id.
    pub id: String,
    /// The candidate's stop time.
    pub stop_time: DateTime<Utc>,
    /// Why it is kept; empty: expire it.
    pub reasons: Vec<Reason>,
    /// `None` when expired.
    pub role: Option<Role>,
}

impl Decision {
    /// Whether the backup is kept.
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// A policy that cannot be applied, or candidates that are not a stanza's
/// backups.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No rule at all.
    #[error(
        "a retention policy needs at least one of --keep-within, --keep-last, --keep-hourly, \
         --keep-daily, --keep-weekly, --keep-monthly or --keep-yearly (or those keys under \
         [retention] in walvault.toml): without one, expire would keep only the newest backup"
    )]
    NoRule,
    /// A count of 0 or a window of 0s.
    #[error("{}", keeps_nothing(.flag))]
    KeepsNothing {
        /// The option, e.g. `--keep-daily`.
        flag: &'static str,
    },
    /// Not an IANA time zone name.
    #[error(
        "{given:?} is not an IANA time zone name: give one such as UTC, Europe/Berlin or \
         America/New_York"
    )]
    UnknownTimezone {
        /// What was given.
        given: String,
    },
    /// Two candidates with one id: a bug in the caller.
    #[error(
        "backup {id} is given to retention twice: the caller must pass each backup once \
         (a bug in walvault, not in the repository)"
    )]
    DuplicateId {
        /// The repeated id.
        id: String,
    },
}

fn keeps_nothing(flag: &str) -> String {
    if flag == "--keep-within" {
        format!("{flag} 0s keeps no backup: give a window such as 7d, or leave {flag} out")
    } else {
        format!("{flag} 0 keeps no backup: give a count of at least 1, or leave {flag} out")
    }
}

impl Policy {
    /// Checks the policy itself (called before anything is read): at least
    /// one rule, and none that keeps nothing (a count of 0, a window of 0s).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.keep_within == Some(Duration::ZERO) {
            return Err(PolicyError::KeepsNothing {
                flag: "--keep-within",
            });
        }
        let counts = [
            ("--keep-last", self.keep_last),
            ("--keep-hourly", self.keep_hourly),
            ("--keep-daily", self.keep_daily),
            ("--keep-weekly", self.keep_weekly),
            ("--keep-monthly", self.keep_monthly),
            ("--keep-yearly", self.keep_yearly),
        ];
        if let Some((flag, _)) = counts.iter().find(|(_, n)| *n == Some(0)) {
            return Err(PolicyError::KeepsNothing { flag });
        }
        if self.keep_within.is_none() && counts.iter().all(|(_, n)| n.is_none()) {
            return Err(PolicyError::NoRule);
        }
        Ok(())
    }
}

/// Parses an IANA time zone name (`UTC`, `Europe/Berlin`), case-sensitive.
pub fn parse_timezone(s: &str) -> Result<Tz, PolicyError> {
    s.parse::<Tz>().map_err(|_| PolicyError::UnknownTimezone {
        given: s.to_owned(),
    })
}

/// Decides for every candidate; the result is in the candidates' order sorted
/// by stop time (oldest first; ties broken by id). `now` is passed in: the
/// clock is never read here. The policy is validated first; an empty list of
/// candidates gives an empty result.
///
/// After the rules of the [module docs](self), the **verified guard**: let O
/// be the oldest kept backup. If O's last verify did not pass, the next older
/// backup (if any) is kept too, as [`Reason::Unverified`] with O's role. Expire
/// deletes for good, and the oldest kept backup bounds how far back anything
/// can be restored; if O turned out to be unrestorable, every older restore
/// point would already be gone. So retention never leaves the oldest kept
/// backup without a fallback until it has passed verify. The fallback takes
/// O's role: when O is the window's base, WAL is then kept from the
/// fallback's start, so every moment of the window stays recoverable without
/// O. One step only, no cascade: when verify has never run this costs one
/// extra backup, not every backup.
pub fn decide(
    policy: &Policy,
    backups: &[Candidate],
    now: DateTime<Utc>,
) -> Result<Vec<Decision>, PolicyError> {
    policy.validate()?;
    let mut ids = HashSet::with_capacity(backups.len());
    if let Some(dup) = backups.iter().find(|c| !ids.insert(c.id.as_str())) {
        return Err(PolicyError::DuplicateId { id: dup.id.clone() });
    }
    let mut slots: Vec<Slot<'_>> = backups.iter().map(Slot::new).collect();
    slots.sort_by(|a, b| (a.c.stop_time, &a.c.id).cmp(&(b.c.stop_time, &b.c.id)));

    if let Some(newest) = slots.last_mut() {
        newest.keep(Reason::Newest, true);
    }
    if let Some(within) = policy.keep_within {
        let start = window_start(now, within);
        let base = slots
            .iter()
            .rposition(|s| start.is_some_and(|st| s.c.stop_time <= st))
            .unwrap_or(0);
        if let Some(base) = slots.get_mut(base) {
            base.keep(Reason::WindowBase, true);
        }
        for s in slots.iter_mut() {
            if start.is_none_or(|st| s.c.stop_time >= st) {
                s.keep(Reason::Window, true);
            }
        }
    }
    if let Some(n) = policy.keep_last {
        for (s, rank) in slots.iter_mut().rev().zip(1..=n) {
            s.keep(Reason::Last { rank }, false);
        }
    }
    let periods = [
        (Period::Hour, policy.keep_hourly),
        (Period::Day, policy.keep_daily),
        (Period::Week, policy.keep_weekly),
        (Period::Month, policy.keep_monthly),
        (Period::Year, policy.keep_yearly),
    ];
    for (period, count) in periods {
        let Some(count) = count else { continue };
        let limit = usize::try_from(count).unwrap_or(usize::MAX);
        let mut buckets = HashSet::new();
        for s in slots.iter_mut().rev() {
            if buckets.len() >= limit {
                break;
            }
            let label = period.label(local_time(s.c.stop_time, policy.timezone));
            if buckets.insert(label.clone()) {
                s.keep(period.reason(label), false);
            }
        }
    }
    for s in slots.iter_mut() {
        for hold in s.c.holds.iter().filter(|h| h.until.is_none_or(|u| u > now)) {
            let reason = Reason::Held {
                reason: hold.reason.clone(),
                until: hold.until,
            };
            s.keep(reason, false);
        }
    }
    if let Some(oldest) = slots.iter().position(|s| !s.reasons.is_empty()) {
        let (older, kept) = slots.split_at_mut(oldest);
        if let (Some(o), Some(fallback)) = (kept.first(), older.last_mut()) {
            if !o.c.verified {
                let protects = o.c.id.clone();
                fallback.keep(Reason::Unverified { protects }, o.recovery_base);
            }
        }
    }
    Ok(slots.into_iter().map(Slot::decision).collect())
}

/// A candidate while rules are applied.
struct Slot<'a> {
    c: &'a Candidate,
    reasons: Vec<Reason>,
    /// Kept by a rule that makes it a [`Role::RecoveryBase`].
    recovery_base: bool,
}

impl<'a> Slot<'a> {
    fn new(c: &'a Candidate) -> Self {
        Slot {
            c,
            reasons: Vec::new(),
            recovery_base: false,
        }
    }

    fn keep(&mut self, reason: Reason, recovery_base: bool) {
        self.reasons.push(reason);
        self.recovery_base |= recovery_base;
    }

    fn decision(self) -> Decision {
        let role = match (self.reasons.is_empty(), self.recovery_base) {
            (true, _) => None,
            (false, true) => Some(Role::RecoveryBase),
            (false, false) => Some(Role::Point),
        };
        Decision {
            id: self.c.id.clone(),
            stop_time: self.c.stop_time,
            reasons: self.reasons,
            role,
        }
    }
}

/// The window's start, `now − within`; `None` when that is before chrono's
/// calendar begins, i.e. the window covers every backup.
fn window_start(now: DateTime<Utc>, within: Duration) -> Option<DateTime<Utc>> {
    let within = chrono::TimeDelta::from_std(within).ok()?;
    now.checked_sub_signed(within)
}

/// The wall-clock time of `t` in `tz`, or `t` in UTC when the local time
/// falls outside chrono's calendar. (`DateTime::naive_local` would panic.)
fn local_time(t: DateTime<Utc>, tz: Tz) -> NaiveDateTime {
    let utc = t.naive_utc();
    let offset = tz.offset_from_utc_datetime(&utc).fix();
    utc.checked_add_offset(offset).unwrap_or(utc)
}

/// The GFS bucket sizes.
#[derive(Debug, Clone, Copy)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    /// The bucket's label: its identity and what [`Reason`] shows.
    fn label(self, t: NaiveDateTime) -> String {
        let (y, m, d, h) = (t.year(), t.month(), t.day(), t.hour());
        match self {
            Period::Hour => format!("{y:04}-{m:02}-{d:02}T{h:02}"),
            Period::Day => format!("{y:04}-{m:02}-{d:02}"),
            Period::Week => {
                let week = t.iso_week();
                format!("{:04}-W{:02}", week.year(), week.week())
            }
            Period::Month => format!("{y:04}-{m:02}"),
            Period::Year => format!("{y:04}"),
        }
    }

    fn reason(self, bucket: String) -> Reason {
        match self {
            Period::Hour => Reason::Hourly { bucket },
            Period::Day => Reason::Daily { bucket },
            Period::Week => Reason::Weekly { bucket },
            Period::Month => Reason::Monthly { bucket },
            Period::Year => Reason::Yearly { bucket },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use Reason::{Newest, Window, WindowBase};
    use Role::{Point, RecoveryBase};

    /// A UTC time written `2026-05-20T00:00`.
    fn t(s: &str) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
            .unwrap()
            .and_utc()
    }

    /// A verified backup, without holds, whose id is its stop time.
    fn b(stop: &str) -> Candidate {
        Candidate {
            id: stop.to_owned(),
            stop_time: t(stop),
            holds: Vec::new(),
            verified: true,
        }
    }

    fn unverified(stop: &str) -> Candidate {
        Candidate {
            verified: false,
            ..b(stop)
        }
    }

    /// `b(stop)` with holds `(reason, until)`.
    fn held(stop: &str, holds: &[(&str, Option<&str>)]) -> Candidate {
        let holds = holds
            .iter()
            .map(|(reason, until)| Hold {
                until: until.map(t),
                reason: (*reason).to_owned(),
                created: t("2026-01-01T00:00"),
            })
            .collect();
        Candidate { holds, ..b(stop) }
    }

    /// One backup a day at `hh:mm`, `days` days from `first` (a date).
    fn daily_backups(first: &str, days: i64, hh_mm: &str) -> Vec<Candidate> {
        let first = t(&format!("{first}T{hh_mm}"));
        (0..days)
            .map(|d| {
                let stop = first + chrono::TimeDelta::days(d);
                b(&stop.format("%Y-%m-%dT%H:%M").to_string())
            })
            .collect()
    }

    fn last(rank: u32) -> Reason {
        Reason::Last { rank }
    }
    fn hourly(bucket: &str) -> Reason {
        Reason::Hourly {
            bucket: bucket.into(),
        }
    }
    fn daily(bucket: &str) -> Reason {
        Reason::Daily {
            bucket: bucket.into(),
        }
    }
    fn weekly(bucket: &str) -> Reason {
        Reason::Weekly {
            bucket: bucket.into(),
        }
    }
    fn monthly(bucket: &str) -> Reason {
        Reason::Monthly {
            bucket: bucket.into(),
        }
    }
    fn yearly(bucket: &str) -> Reason {
        Reason::Yearly {
            bucket: bucket.into(),
        }
    }
    fn hold(reason: &str, until: Option<&str>) -> Reason {
        Reason::Held {
            reason: reason.into(),
            until: until.map(t),
        }
    }
    fn fallback_for(protects: &str) -> Reason {
        Reason::Unverified {
            protects: protects.into(),
        }
    }

    fn days(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    fn tz(name: &str) -> Tz {
        parse_timezone(name).unwrap()
    }

    struct Case {
        name: &'static str,
        policy: Policy,
        now: DateTime<Utc>,
        backups: Vec<Candidate>,
        /// Exactly the kept backups, oldest first; every other one is expired.
        kept: Vec<Row>,
    }

    type Row = (String, Vec<Reason>, Role);

    fn rows<const N: usize>(rows: [(&str, Vec<Reason>, Role); N]) -> Vec<Row> {
        rows.into_iter()
            .map(|(id, reasons, role)| (id.to_owned(), reasons, role))
            .collect()
    }

    /// `[Window]` rows for the backups at 01:00 on these days of May 2026.
    fn in_window(days: std::ops::RangeInclusive<u32>) -> Vec<Row> {
        days.map(|d| (format!("2026-05-{d:02}T01:00"), vec![Window], RecoveryBase))
            .collect()
    }

    fn run(cases: Vec<Case>) {
        for case in cases {
            let name = case.name;
            let got = decide(&case.policy, &case.backups, case.now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut order: Vec<_> = case
                .backups
                .iter()
                .map(|c| (c.stop_time, c.id.clone()))
                .collect();
            order.sort();
            let got_order: Vec<_> = got.iter().map(|d| (d.stop_time, d.id.clone())).collect();
            assert_eq!(
                got_order, order,
                "{name}: one decision per backup, in order"
            );
            for d in &got {
                assert_eq!(d.keep(), d.role.is_some(), "{name}: {} role", d.id);
            }
            let kept: Vec<_> = got
                .into_iter()
                .filter_map(|d| Some((d.id, d.reasons, d.role?)))
                .collect();
            assert_eq!(kept, case.kept, "{name}");
        }
    }

    #[test]
    fn window() {
        let three = || {
            vec![
                b("2026-05-10T01:00"),
                b("2026-05-11T01:00"),
                b("2026-05-12T01:00"),
            ]
        };
        let all_three = || {
            rows([
                ("2026-05-10T01:00", vec![WindowBase, Window], RecoveryBase),
                ("2026-05-11T01:00", vec![Window], RecoveryBase),
                ("2026-05-12T01:00", vec![Newest, Window], RecoveryBase),
            ])
        };
        let within = |d: Duration| Policy {
            keep_within: Some(d),
            ..Policy::default()
        };
        run(vec![
            Case {
                name: "7d: the window, and the newest backup at or before its start",
                policy: within(days(7)),
                now: t("2026-05-20T00:00"),
                backups: daily_backups("2026-05-10", 10, "01:00"),
                kept: [
                    rows([("2026-05-12T01:00", vec![WindowBase], RecoveryBase)]),
                    in_window(13..=18),
                    rows([("2026-05-19T01:00", vec![Newest, Window], RecoveryBase)]),
                ]
                .concat(),
            },
            Case {
                name: "a backup exactly at the start is the base and in the window",
                policy: within(days(1)),
                now: t("2026-05-20T00:00"),
                backups: vec![
                    b("2026-05-18T23:00"),
                    b("2026-05-19T00:00"),
                    b("2026-05-19T01:00"),
                ],
                kept: rows([
                    ("2026-05-19T00:00", vec![WindowBase, Window], RecoveryBase),
                    ("2026-05-19T01:00", vec![Newest, Window], RecoveryBase),
                ]),
            },
            Case {
                name: "no backup is older than the start: the oldest is the base",
                policy: within(days(30)),
                now: t("2026-05-20T00:00"),
                backups: three(),
                kept: all_three(),
            },
            Case {
                name: "every backup older than the start: the newest alone, as the base",
                policy: within(Duration::from_secs(3600)),
                now: t("2026-05-20T00:00"),
                backups: three(),
                kept: rows([("2026-05-12T01:00", vec![Newest, WindowBase], RecoveryBase)]),
            },
            Case {
                name: "Duration::MAX (beyond chrono's TimeDelta) covers everything",
                policy: within(Duration::MAX),
                now: t("2026-05-20T00:00"),
                backups: three(),
                kept: all_three(),
            },
            Case {
                name: "a start before chrono's calendar covers everything",
                policy: within(Duration::from_secs(10_000_000_000_000)),
                now: t("2026-05-20T00:00"),
                backups: three(),
                kept: all_three(),
            },
            Case {
                name: "now at chrono's first instant: any window covers everything",
                policy: within(Duration::from_secs(1)),
                now: DateTime::<Utc>::MIN_UTC,
                backups: three(),
                kept: all_three(),
            },
        ]);
    }

    #[test]
    fn gfs() {
        let gfs = |hourly, daily, weekly, monthly, yearly, zone| Policy {
            keep_hourly: hourly,
            keep_daily: daily,
            keep_weekly: weekly,
            keep_monthly: monthly,
            keep_yearly: yearly,
            timezone: tz(zone),
            ..Policy::default()
        };
        let hourly2 = |zone| gfs(Some(2), None, None, None, None, zone);
        let daily2 = |zone| gfs(None, Some(2), None, None, None, zone);
        let kolkata_backups = || {
            ["09:00", "10:00", "10:20", "10:40", "11:00", "11:20"]
                .map(|hm| b(&format!("2026-06-01T{hm}")))
                .to_vec()
        };
        // 25 October 2026, Berlin: 03:00 CEST (01:00 UTC) falls back to 02:00 CET.
        let fall_back = || {
            vec![
                b("2026-10-24T23:50"), // 01:50 CEST
                b("2026-10-25T00:10"), // 02:10 CEST
                b("2026-10-25T00:40"), // 02:40 CEST
                b("2026-10-25T01:10"), // 02:10 CET
                b("2026-10-25T01:40"), // 02:40 CET
            ]
        };
        // 23:45 and 00:15 in Berlin (+02:00).
        let midnight = || {
            vec![
                b("2026-05-31T12:00"),
                b("2026-06-01T21:45"),
                b("2026-06-01T22:15"),
            ]
        };
        let april_dailies = |days: std::ops::RangeInclusive<u32>| -> Vec<Row> {
            let day = |d| format!("2026-04-{d:02}");
            days.map(|d| (format!("{}T12:00", day(d)), vec![daily(&day(d))], Point))
                .collect()
        };
        let hundred_days = [
            rows([
                ("2026-02-28T12:00", vec![monthly("2026-02")], Point),
                ("2026-03-22T12:00", vec![weekly("2026-W12")], Point),
                ("2026-03-29T12:00", vec![weekly("2026-W13")], Point),
                ("2026-03-31T12:00", vec![monthly("2026-03")], Point),
            ]),
            april_dailies(4..=4),
            rows([(
                "2026-04-05T12:00",
                vec![daily("2026-04-05"), weekly("2026-W14")],
                Point,
            )]),
            april_dailies(6..=9),
            rows([(
                "2026-04-10T12:00",
                vec![
                    Newest,
                    daily("2026-04-10"),
                    weekly("2026-W15"),
                    monthly("2026-04"),
                    yearly("2026"),
                ],
                RecoveryBase,
            )]),
        ]
        .concat();
        let now = t("2026-12-31T00:00");
        run(vec![
            Case {
                name: "daily 7, weekly 4, monthly 3, yearly 2 over 100 daily backups",
                policy: gfs(None, Some(7), Some(4), Some(3), Some(2), "UTC"),
                now: t("2026-04-10T18:00"),
                backups: daily_backups("2026-01-01", 100, "12:00"),
                kept: hundred_days,
            },
            Case {
                name: "hourly in Asia/Kolkata (+05:30): 15:50 and 16:50 local",
                policy: hourly2("Asia/Kolkata"),
                now,
                backups: kolkata_backups(),
                kept: rows([
                    ("2026-06-01T10:20", vec![hourly("2026-06-01T15")], Point),
                    (
                        "2026-06-01T11:20",
                        vec![Newest, hourly("2026-06-01T16")],
                        RecoveryBase,
                    ),
                ]),
            },
            Case {
                name: "the same backups hourly in UTC",
                policy: hourly2("UTC"),
                now,
                backups: kolkata_backups(),
                kept: rows([
                    ("2026-06-01T10:40", vec![hourly("2026-06-01T10")], Point),
                    (
                        "2026-06-01T11:20",
                        vec![Newest, hourly("2026-06-01T11")],
                        RecoveryBase,
                    ),
                ]),
            },
            Case {
                name: "the repeated hour at a fall-back is one hourly bucket",
                policy: hourly2("Europe/Berlin"),
                now,
                backups: fall_back(),
                kept: rows([
                    ("2026-10-24T23:50", vec![hourly("2026-10-25T01")], Point),
                    (
                        "2026-10-25T01:40",
                        vec![Newest, hourly("2026-10-25T02")],
                        RecoveryBase,
                    ),
                ]),
            },
            Case {
                name: "the same instants are two hours in UTC",
                policy: hourly2("UTC"),
                now,
                backups: fall_back(),
                kept: rows([
                    ("2026-10-25T00:40", vec![hourly("2026-10-25T00")], Point),
                    (
                        "2026-10-25T01:40",
                        vec![Newest, hourly("2026-10-25T01")],
                        RecoveryBase,
                    ),
                ]),
            },
            Case {
                name: "30 minutes across Berlin's midnight are two days there",
                policy: daily2("Europe/Berlin"),
                now,
                backups: midnight(),
                kept: rows([
                    ("2026-06-01T21:45", vec![daily("2026-06-01")], Point),
                    (
                        "2026-06-01T22:15",
                        vec![Newest, daily("2026-06-02")],
                        RecoveryBase,
                    ),
                ]),
            },
            Case {
                name: "and one day in UTC",
                policy: daily2("UTC"),
                now,
                backups: midnight(),
                kept: rows([
                    ("2026-05-31T12:00", vec![daily("2026-05-31")], Point),
                    (
                        "2026-06-01T22:15",
                        vec![Newest, daily("2026-06-01")],
                        RecoveryBase,
                    ),
                ]),
            },
            Case {
                name: "ISO weeks cross the calendar year (1 January 2027 is in 2026-W53)",
                policy: gfs(None, None, Some(2), None, Some(5), "UTC"),
                now: t("2027-01-05T00:00"),
                backups: vec![
                    b("2026-12-28T12:00"),
                    b("2027-01-01T12:00"),
                    b("2027-01-04T12:00"),
                ],
                kept: rows([
                    ("2026-12-28T12:00", vec![yearly("2026")], Point),
                    ("2027-01-01T12:00", vec![weekly("2026-W53")], Point),
                    (
                        "2027-01-04T12:00",
                        vec![Newest, weekly("2027-W01"), yearly("2027")],
                        RecoveryBase,
                    ),
                ]),
            },
        ]);
    }

    #[test]
    fn last_and_holds() {
        let keep_last = |n| Policy {
            keep_last: Some(n),
            ..Policy::default()
        };
        let tie = |id: &str, stop: &str| Candidate {
            id: id.to_owned(),
            ..b(stop)
        };
        run(vec![
            Case {
                name: "keep-last 3 of 5",
                policy: keep_last(3),
                now: t("2026-05-20T00:00"),
                backups: daily_backups("2026-05-01", 5, "00:00"),
                kept: rows([
                    ("2026-05-03T00:00", vec![last(3)], Point),
                    ("2026-05-04T00:00", vec![last(2)], Point),
                    ("2026-05-05T00:00", vec![Newest, last(1)], RecoveryBase),
                ]),
            },
            Case {
                name: "keep-last u32::MAX keeps all",
                policy: keep_last(u32::MAX),
                now: t("2026-05-20T00:00"),
                backups: daily_backups("2026-05-01", 2, "00:00"),
                kept: rows([
                    ("2026-05-01T00:00", vec![last(2)], Point),
                    ("2026-05-02T00:00", vec![Newest, last(1)], RecoveryBase),
                ]),
            },
            Case {
                name: "equal stop times are ordered by id",
                policy: keep_last(1),
                now: t("2026-05-20T00:00"),
                backups: vec![
                    tie("b", "2026-05-02T00:00"),
                    tie("a", "2026-05-02T00:00"),
                    tie("c", "2026-05-01T00:00"),
                ],
                kept: rows([("b", vec![Newest, last(1)], RecoveryBase)]),
            },
            Case {
                name: "active holds keep; a hold until now or earlier does not",
                policy: keep_last(1),
                now: t("2026-05-20T00:00"),
                backups: vec![
                    held("2026-05-01T00:00", &[("legal", None), ("INC-7", None)]),
                    held("2026-05-02T00:00", &[("audit", Some("2026-05-21T00:00"))]),
                    held("2026-05-03T00:00", &[("old", Some("2026-05-19T00:00"))]),
                    held(
                        "2026-05-04T00:00",
                        &[("ends now", Some("2026-05-20T00:00")), ("x", None)],
                    ),
                    held(
                        "2026-05-05T00:00",
                        &[("ends now", Some("2026-05-20T00:00"))],
                    ),
                    b("2026-05-06T00:00"),
                ],
                kept: rows([
                    (
                        "2026-05-01T00:00",
                        vec![hold("legal", None), hold("INC-7", None)],
                        Point,
                    ),
                    (
                        "2026-05-02T00:00",
                        vec![hold("audit", Some("2026-05-21T00:00"))],
                        Point,
                    ),
                    ("2026-05-04T00:00", vec![hold("x", None)], Point),
                    ("2026-05-06T00:00", vec![Newest, last(1)], RecoveryBase),
                ]),
            },
        ]);
    }

    #[test]
    fn verified_guard() {
        let keep_last = |n| Policy {
            keep_last: Some(n),
            ..Policy::default()
        };
        let four = |verified: [bool; 4]| {
            daily_backups("2026-05-01", 4, "00:00")
                .into_iter()
                .zip(verified)
                .map(|(c, verified)| Candidate { verified, ..c })
                .collect::<Vec<_>>()
        };
        let mut window_backups = daily_backups("2026-05-10", 10, "01:00");
        window_backups.retain(|c| c.id != "2026-05-12T01:00");
        window_backups.push(unverified("2026-05-12T01:00"));
        let window_kept = [
            rows([
                (
                    "2026-05-11T01:00",
                    vec![fallback_for("2026-05-12T01:00")],
                    RecoveryBase,
                ),
                ("2026-05-12T01:00", vec![WindowBase], RecoveryBase),
            ]),
            in_window(13..=18),
            rows([("2026-05-19T01:00", vec![Newest, Window], RecoveryBase)]),
        ]
        .concat();
        run(vec![
            Case {
                name: "oldest kept unverified: the one before it is kept, one step only",
                policy: keep_last(2),
                now: t("2026-05-20T00:00"),
                backups: four([false; 4]),
                kept: rows([
                    (
                        "2026-05-02T00:00",
                        vec![fallback_for("2026-05-03T00:00")],
                        Point,
                    ),
                    ("2026-05-03T00:00", vec![last(2)], Point),
                    ("2026-05-04T00:00", vec![Newest, last(1)], RecoveryBase),
                ]),
            },
            Case {
                name: "oldest kept verified: nothing more",
                policy: keep_last(2),
                now: t("2026-05-20T00:00"),
                backups: four([false, false, true, false]),
                kept: rows([
                    ("2026-05-03T00:00", vec![last(2)], Point),
                    ("2026-05-04T00:00", vec![Newest, last(1)], RecoveryBase),
                ]),
            },
            Case {
                name: "oldest kept is the oldest backup: nothing to fall back on",
                policy: keep_last(5),
                now: t("2026-05-20T00:00"),
                backups: vec![unverified("2026-05-01T00:00"), b("2026-05-02T00:00")],
                kept: rows([
                    ("2026-05-01T00:00", vec![last(2)], Point),
                    ("2026-05-02T00:00", vec![Newest, last(1)], RecoveryBase),
                ]),
            },
            Case {
                name: "unverified window base: the fallback is a recovery base too",
                policy: Policy {
                    keep_within: Some(days(7)),
                    ..Policy::default()
                },
                now: t("2026-05-20T00:00"),
                backups: window_backups,
                kept: window_kept,
            },
        ]);
    }

    #[test]
    fn window_with_gfs_and_holds() {
        let mut backups = daily_backups("2026-05-10", 10, "12:00");
        backups.retain(|c| c.id != "2026-05-11T12:00");
        backups.push(Candidate {
            verified: false,
            ..held("2026-05-11T12:00", &[("audit", None)])
        });
        run(vec![Case {
            name: "window 2d + daily 5: GFS points outside the window are points",
            policy: Policy {
                keep_within: Some(days(2)),
                keep_daily: Some(5),
                timezone: tz("Europe/Berlin"),
                ..Policy::default()
            },
            now: t("2026-05-20T00:00"),
            backups,
            kept: rows([
                (
                    "2026-05-10T12:00",
                    vec![fallback_for("2026-05-11T12:00")],
                    Point,
                ),
                ("2026-05-11T12:00", vec![hold("audit", None)], Point),
                ("2026-05-15T12:00", vec![daily("2026-05-15")], Point),
                ("2026-05-16T12:00", vec![daily("2026-05-16")], Point),
                (
                    "2026-05-17T12:00",
                    vec![WindowBase, daily("2026-05-17")],
                    RecoveryBase,
                ),
                (
                    "2026-05-18T12:00",
                    vec![Window, daily("2026-05-18")],
                    RecoveryBase,
                ),
                (
                    "2026-05-19T12:00",
                    vec![Newest, Window, daily("2026-05-19")],
                    RecoveryBase,
                ),
            ]),
        }]);
    }

    #[test]
    fn invalid_policies_are_refused_before_deciding() {
        let ok = Policy {
            keep_daily: Some(7),
            ..Policy::default()
        };
        let cases: [(Policy, PolicyError); 8] = [
            (Policy::default(), PolicyError::NoRule),
            (
                Policy {
                    timezone: tz("Europe/Berlin"),
                    ..Policy::default()
                },
                PolicyError::NoRule,
            ),
            (
                Policy {
                    keep_within: Some(Duration::ZERO),
                    ..ok.clone()
                },
                PolicyError::KeepsNothing {
                    flag: "--keep-within",
                },
            ),
            (
                Policy {
                    keep_last: Some(0),
                    ..Policy::default()
                },
                PolicyError::KeepsNothing {
                    flag: "--keep-last",
                },
            ),
            (
                Policy {
                    keep_hourly: Some(0),
                    ..ok.clone()
                },
                PolicyError::KeepsNothing {
                    flag: "--keep-hourly",
                },
            ),
            (
                Policy {
                    keep_daily: Some(0),
                    ..Policy::default()
                },
                PolicyError::KeepsNothing {
                    flag: "--keep-daily",
                },
            ),
            (
                Policy {
                    keep_weekly: Some(0),
                    keep_monthly: Some(0),
                    ..ok.clone()
                },
                PolicyError::KeepsNothing {
                    flag: "--keep-weekly",
                },
            ),
            (
                Policy {
                    keep_yearly: Some(0),
                    ..ok.clone()
                },
                PolicyError::KeepsNothing {
                    flag: "--keep-yearly",
                },
            ),
        ];
        for (policy, want) in cases {
            assert_eq!(policy.validate(), Err(want.clone()), "{policy:?}");
            let backups = [b("2026-05-01T00:00")];
            let now = t("2026-05-20T00:00");
            assert_eq!(decide(&policy, &backups, now), Err(want.clone()));
            assert_eq!(decide(&policy, &[], now), Err(want));
        }
        let nano = Policy {
            keep_within: Some(Duration::from_nanos(1)),
            ..Policy::default()
        };
        assert_eq!(nano.validate(), Ok(()));
        assert_eq!(ok.validate(), Ok(()));

        let message = |e: PolicyError| e.to_string();
        assert!(message(PolicyError::NoRule).contains("--keep-within, --keep-last"));
        assert_eq!(
            message(PolicyError::KeepsNothing {
                flag: "--keep-daily"
            }),
            "--keep-daily 0 keeps no backup: give a count of at least 1, or leave --keep-daily out"
        );
        assert_eq!(
            message(PolicyError::KeepsNothing {
                flag: "--keep-within"
            }),
            "--keep-within 0s keeps no backup: give a window such as 7d, or leave --keep-within out"
        );
    }

    #[test]
    fn empty_and_duplicated_candidates() {
        let policy = Policy {
            keep_last: Some(3),
            ..Policy::default()
        };
        let now = t("2026-05-20T00:00");
        assert_eq!(decide(&policy, &[], now), Ok(Vec::new()));
        let twice = [
            b("2026-05-01T00:00"),
            b("2026-05-02T00:00"),
            b("2026-05-01T00:00"),
        ];
        assert_eq!(
            decide(&policy, &twice, now),
            Err(PolicyError::DuplicateId {
                id: "2026-05-01T00:00".into()
            })
        );
    }

    #[test]
    fn stop_times_at_the_ends_of_the_calendar_do_not_panic() {
        let ends = [
            Candidate {
                id: "min".into(),
                stop_time: DateTime::<Utc>::MIN_UTC,
                holds: Vec::new(),
                verified: false,
            },
            Candidate {
                id: "max".into(),
                stop_time: DateTime::<Utc>::MAX_UTC,
                holds: Vec::new(),
                verified: false,
            },
        ];
        for zone in [
            "UTC",
            "Asia/Kolkata",
            "America/New_York",
            "Pacific/Kiritimati",
        ] {
            for now in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
                let policy = Policy {
                    keep_within: Some(Duration::MAX),
                    keep_last: Some(u32::MAX),
                    keep_hourly: Some(u32::MAX),
                    keep_daily: Some(1),
                    keep_weekly: Some(1),
                    keep_monthly: Some(1),
                    keep_yearly: Some(u32::MAX),
                    timezone: tz(zone),
                };
                let got = decide(&policy, &ends, now).unwrap();
                assert_eq!(got.len(), 2);
                assert!(got.iter().all(Decision::keep), "{zone}");
                let max = got.iter().find(|d| d.id == "max").unwrap();
                assert!(max.reasons.contains(&yearly("262142")), "{zone}: {max:?}");
                if zone != "America/New_York" {
                    // Ahead of UTC, the local time does not exist: UTC buckets.
                    let want = vec![
                        Newest,
                        Window,
                        last(1),
                        hourly("262142-12-31T23"),
                        daily("262142-12-31"),
                        weekly("262143-W01"),
                        monthly("262142-12"),
                        yearly("262142"),
                    ];
                    assert_eq!(max.reasons, want, "{zone}");
                }
            }
        }
    }

    #[test]
    fn timezones_parse_by_iana_name() {
        assert_eq!(parse_timezone("UTC"), Ok(Tz::UTC));
        assert_eq!(parse_timezone("Europe/Berlin"), Ok(Tz::Europe__Berlin));
        let err = parse_timezone("Mars/Olympus").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"Mars/Olympus\" is not an IANA time zone name: give one such as UTC, \
             Europe/Berlin or America/New_York"
        );
        assert!(parse_timezone("").is_err());
        assert!(parse_timezone("+05:30").is_err());
    }

    #[test]
    fn policy_and_decisions_serialize() {
        let policy: Policy =
            toml::from_str("keep_daily = 7\nkeep_weekly = 4\ntimezone = \"Europe/Berlin\"\n")
                .unwrap();
        let want = Policy {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            timezone: Tz::Europe__Berlin,
            ..Policy::default()
        };
        assert_eq!(policy, want);
        assert!(toml::from_str::<Policy>("timezone = \"Mars/Olympus\"").is_err());
        assert!(toml::from_str::<Policy>("keep_dayly = 7").is_err());
        assert_eq!(
            serde_json::to_value(&want).unwrap().get("timezone"),
            Some(&serde_json::json!("Europe/Berlin"))
        );

        let decision = Decision {
            id: "x".into(),
            stop_time: t("2026-05-19T12:00"),
            reasons: vec![Newest, daily("2026-05-19"), last(1)],
            role: Some(RecoveryBase),
        };
        assert_eq!(
            serde_json::to_value(&decision).unwrap(),
            serde_json::json!({
                "id": "x",
                "stop_time": "2026-05-19T12:00:00Z",
                "reasons": [
                    {"rule": "newest"},
                    {"rule": "daily", "bucket": "2026-05-19"},
                    {"rule": "last", "rank": 1},
                ],
                "role": "recovery_base",
            })
        );
    }
}
