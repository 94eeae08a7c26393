//! The one parser of durations given on the command line and in the
//! configuration (`--window 5m`, `--rto-budget 15m`, `--partial-interval 0.2`,
//! and later `--keep-within 7d`, `--max-rpo 1m`, `--max-backup-age 26h`).
//!
//! Grammar: a decimal number (`90`, `1.5`, `.5`) and an optional unit: `s`
//! (the default), `m` or `min`, `h`, `d`, `w`. The arithmetic is exact in
//! nanoseconds and checked: a value too large for a [`Duration`] is an
//! error, never a panic or a silent wrap (`1e30`, `-1`, `NaN` are not
//! numbers in this grammar).

#![deny(clippy::indexing_slicing, clippy::string_slice)]

use std::time::Duration;

/// Why a duration does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not a number followed by a unit.
    #[error("{input:?} is not a duration: give a number and a unit, e.g. 90s, 15m, 1.5h, 7d, 2w (no unit: seconds)")]
    Syntax {
        /// What was given.
        input: String,
    },
    /// A unit that is not s, m, min, h, d or w.
    #[error("{input:?}: unknown unit {unit:?}; use s, m, h, d or w")]
    Unit {
        /// What was given.
        input: String,
        /// The unit found.
        unit: String,
    },
    /// More than fits in a [`Duration`] (about 584 billion years).
    #[error("{input:?} is too long a duration")]
    Overflow {
        /// What was given.
        input: String,
    },
    /// Outside the range an option accepts.
    #[error("{input:?} is out of range: {min} to {max} s")]
    Range {
        /// What was given.
        input: String,
        /// The least accepted, seconds.
        min: u64,
        /// The most accepted, seconds.
        max: u64,
    },
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Parse a duration (see the [module docs](self)).
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    let syntax = || DurationError::Syntax {
        input: input.to_owned(),
    };
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at_checked(split).ok_or_else(syntax)?;
    let unit_secs: u128 = match unit.trim_start() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => {
            return Err(if number.is_empty() {
                syntax()
            } else {
                DurationError::Unit {
                    input: input.to_owned(),
                    unit: other.to_owned(),
                }
            })
        }
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(syntax());
    }
    let overflow = || DurationError::Overflow {
        input: input.to_owned(),
    };
    // digits only, so the only parse failure left is a value too large
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| overflow())?
    };
    // the fraction in nanoseconds (digits past the ninth are dropped)
    let mut frac_nanos: u128 = 0;
    let mut scale = NANOS_PER_SEC;
    for c in frac.bytes() {
        scale /= 10;
        frac_nanos += u128::from(c - b'0') * scale;
    }
    let nanos = whole
        .checked_mul(NANOS_PER_SEC)
        .and_then(|n| n.checked_add(frac_nanos))
        .and_then(|n| n.checked_mul(unit_secs))
        .ok_or_else(overflow)?;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| overflow())?;
    // below a billion: fits
    let sub = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Ok(Duration::new(secs, sub))
}

/// [`parse_duration`], refused outside `min..=max` seconds (for options
/// whose meaning breaks outside a range).
pub fn parse_duration_within(input: &str, min: u64, max: u64) -> Result<Duration, DurationError> {
    let d = parse_duration(input)?;
    if d < Duration::from_secs(min) || d > Duration::from_secs(max) {
        return Err(DurationError::Range {
            input: input.to_owned(),
            min,
            max,
        });
    }
    Ok(d)
}

/// Serde for an optional duration written as text in walvault.toml
/// (`max_rpo = "1m"`), with the same grammar as the command line:
/// `#[serde(default, with = "crate::duration::text")]`.
pub mod text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Read `"90s"`, `"15m"`, … (a bare number is seconds).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Secs(u64),
            Float(f64),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Text(s)) => super::parse_duration(&s)
                .map(Some)
                .map_err(serde::de::Error::custom),
            Some(Raw::Secs(n)) => Ok(Some(Duration::from_secs(n))),
            Some(Raw::Float(f)) => Duration::try_from_secs_f64(f)
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("{f} is not a duration in seconds"))),
        }
    }

    /// Write it back as text (`--check-config` prints the effective file).
    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

/// A duration as the grammar reads it back: `90s`, `15m`, `26h`, `0.2s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        return format!("{}s", d.as_secs_f64());
    }
    for (unit, n) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= n && secs % n == 0 {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn formatted_durations_parse_back() {
        for s in [0u64, 1, 59, 60, 90, 3600, 86_400, 7 * 86_400, 100_000] {
            let d = Duration::from_secs(s);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(
            parse_duration(&format_duration(Duration::from_millis(200))).unwrap(),
            Duration::from_millis(200)
        );
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units() {
        let d = |s: &str| parse_duration(s).unwrap();
        assert_eq!(d("90"), Duration::from_secs(90));
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("1m"), Duration::from_secs(60));
        assert_eq!(d("15min"), Duration::from_secs(900));
        assert_eq!(d("26h"), Duration::from_secs(26 * 3600));
        assert_eq!(d("7d"), Duration::from_secs(7 * 86_400));
        assert_eq!(d("2w"), Duration::from_secs(14 * 86_400));
        assert_eq!(d("0"), Duration::ZERO);
        assert_eq!(d(" 5m "), Duration::from_secs(300));
        assert_eq!(d("5 m"), Duration::from_secs(300));
    }

    #[test]
    fn fractions_are_exact() {
        let d = |s: &str| parse_duration(s).unwrap();
        assert_eq!(d("0.2"), Duration::from_millis(200));
        assert_eq!(d(".5s"), Duration::from_millis(500));
        assert_eq!(d("1.5h"), Duration::from_secs(5400));
        assert_eq!(d("2."), Duration::from_secs(2));
        assert_eq!(d("0.1d"), Duration::from_secs(8640));
        assert_eq!(d("1.0000000019"), Duration::new(1, 1));
    }

    /// Regression: `--window` multiplied without a check (a panic in debug
    /// builds, a wrap in release) and `--rto-budget 1e30` panicked in
    /// `Duration::from_secs_f64`.
    #[test]
    fn overflow_is_an_error_not_a_panic() {
        for s in [
            "18446744073709551615m",
            "99999999999999999999999999999999999999999999",
            "30600000000000w",
            "18446744073709551616",
        ] {
            assert!(
                matches!(parse_duration(s), Err(DurationError::Overflow { .. })),
                "{s}"
            );
        }
        assert_eq!(
            parse_duration("18446744073709551615").unwrap(),
            Duration::from_secs(u64::MAX)
        );
        for s in ["1e30", "-1", "NaN", "inf", "-0.5s"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    #[test]
    fn garbage_is_refused_clearly() {
        for s in [
            "",
            " ",
            ".",
            "m",
            "s5",
            "1..2",
            "1.2.3",
            "5mm",
            "1y",
            "5 minutes",
            "٣s",
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(
                matches!(e, DurationError::Syntax { .. } | DurationError::Unit { .. }),
                "{s}: {e}"
            );
        }
        assert_eq!(
            parse_duration("1y").unwrap_err().to_string(),
            "\"1y\": unknown unit \"y\"; use s, m, h, d or w"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_duration_within("1d", 0, 86_400).unwrap(),
            Duration::from_secs(86_400)
        );
        assert!(matches!(
            parse_duration_within("86400.5", 0, 86_400),
            Err(DurationError::Range { .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,30}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn numbers_with_units_never_panic(n in "[0-9]{0,40}(\\.[0-9]{0,20})?", u in "(|s|m|min|h|d|w)") {
            let _ = parse_duration(&format!("{n}{u}"));
        }

        #[test]
        fn whole_seconds_round_trip(n: u32, unit in prop::sample::select(vec![("s", 1u64), ("m", 60), ("h", 3600), ("d", 86_400), ("w", 604_800)])) {
            prop_assert_eq!(
                parse_duration(&format!("{n}{}", unit.0)).unwrap(),
                Duration::from_secs(u64::from(n) * unit.1)
            );
        }
    }
}
