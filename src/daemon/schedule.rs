//! Cron schedules in a time zone: `0 2 * * *` (five fields) or with a
//! leading seconds field (`*/20 * * * * *`), evaluated in the configured
//! zone so `0 2 * * *` is 02:00 local time across daylight-saving changes.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// A parsed cron expression and its zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    text: String,
    cron: Cron,
    tz: Tz,
}

impl CronSchedule {
    /// Parse `text`; an expression that never fires (`0 0 31 2 *`) is an
    /// error too, not a job that silently never runs.
    pub fn parse(text: &str, tz: Tz) -> Result<CronSchedule, String> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(text)
            .map_err(|e| format!("{text:?} is not a cron expression: {e}"))?;
        let s = CronSchedule {
            text: text.to_owned(),
            cron,
            tz,
        };
        if s.next_after(Utc::now()).is_none() {
            return Err(format!(
                "{text:?} never fires (no such date): check the day of month against the month"
            ));
        }
        Ok(s)
    }

    /// The first moment strictly after `t` the schedule fires.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The expression as given.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn fires_in_its_time_zone() {
        let s = CronSchedule::parse("0 2 * * *", "Europe/Berlin".parse().unwrap()).unwrap();
        // 02:00 in Berlin is 01:00 UTC in winter, 00:00 UTC in summer
        assert_eq!(
            s.next_after(at("2026-12-05T12:00:00Z")).unwrap(),
            at("2026-12-06T01:00:00Z")
        );
        assert_eq!(
            s.next_after(at("2026-07-05T12:00:00Z")).unwrap(),
            at("2026-07-06T00:00:00Z")
        );
    }

    #[test]
    fn seconds_are_optional() {
        let s = CronSchedule::parse("*/20 * * * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.next_after(at("2026-12-05T12:00:05Z")).unwrap(),
            at("2026-12-05T12:00:20Z")
        );
        // strictly after
        assert_eq!(
            s.next_after(at("2026-12-05T12:00:20Z")).unwrap(),
            at("2026-12-05T12:00:40Z")
        );
    }

    #[test]
    fn impossible_and_malformed_expressions_are_refused() {
        let e = CronSchedule::parse("0 0 31 2 *", Tz::UTC).unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        for bad in ["61 * * * *", "* * *", "every day", "0 25 * * *"] {
            let e = CronSchedule::parse(bad, Tz::UTC).unwrap_err();
            assert!(e.contains("not a cron expression"), "{bad}: {e}");
        }
    }
}
