//! When the next KeyRotation run is due: `every` durations and five-field UTC cron expressions.
//!
//! Pure: the caller passes the anchor (last run start, or creation time) and `now`, so tests use
//! explicit times. A run missed during operator downtime is due once (`now`), not once per missed
//! window, because the next window is always computed from the anchor and the anchor moves to the
//! start of the run that catches up.

use std::time::Duration;

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::bank_switch::validate::parse_duration;
use crate::crd::key_rotation::RotationSchedule;

/// Errors from reading or evaluating `spec.schedule`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    /// Neither or both of `every` and `cron` are set.
    #[error("failed to read spec.schedule: set exactly one of schedule.every or schedule.cron")]
    NotExactlyOne,
    /// `every` is not a positive duration.
    #[error("failed to parse spec.schedule.every: {0}")]
    Every(String),
    /// `cron` is not a five-field cron expression.
    #[error(
        "failed to parse spec.schedule.cron `{expression}`: {reason} (five fields, UTC: minute hour day-of-month month day-of-week)"
    )]
    Cron {
        /// The expression as written.
        expression: String,
        /// What the parser objected to.
        reason: String,
    },
    /// The expression parses but never matches (e.g. `0 0 30 2 *`).
    #[error("failed to find a time matching spec.schedule.cron `{expression}` after {after}")]
    NoMatch {
        /// The expression as written.
        expression: String,
        /// Where the search started.
        after: Timestamp,
    },
    /// The next time is outside the representable range.
    #[error("failed to add spec.schedule.every to {after}: the result is out of range")]
    OutOfRange {
        /// Where the addition started.
        after: Timestamp,
    },
}

/// A parsed `spec.schedule`.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A fixed period after the anchor.
    Every(SignedDuration),
    /// A cron expression evaluated in UTC.
    Cron(Box<Cron>),
}

/// When the next run starts, relative to `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextRun {
    /// The first scheduled window after the anchor (may be in the past after downtime).
    pub window: Timestamp,
    /// When the run actually starts: `window`, or `now` when the window has passed.
    pub at: Timestamp,
    /// True when `window` is not in the future: start a run now (exactly one).
    pub due: bool,
}

impl Schedule {
    /// Parses `spec.schedule`, naming the field that is wrong.
    pub fn parse(spec: &RotationSchedule) -> Result<Self, ScheduleError> {
        match (&spec.every, &spec.cron) {
            (Some(every), None) => {
                let d: Duration = parse_duration(every).map_err(ScheduleError::Every)?;
                let d = SignedDuration::try_from(d)
                    .map_err(|e| ScheduleError::Every(format!("`{every}` is too long ({e})")))?;
                Ok(Self::Every(d))
            }
            (None, Some(cron)) => {
                // Five fields only: a seconds or year field would silently change the meaning
                // of an expression copied from a crontab.
                let parser = CronParser::builder()
                    .seconds(Seconds::Disallowed)
                    .year(Year::Disallowed)
                    .build();
                let parsed = parser.parse(cron).map_err(|e| ScheduleError::Cron {
                    expression: cron.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Self::Cron(Box::new(parsed)))
            }
            _ => Err(ScheduleError::NotExactlyOne),
        }
    }

    /// The first window strictly after `after`.
    pub fn window_after(&self, after: Timestamp) -> Result<Timestamp, ScheduleError> {
        match self {
            Self::Every(d) => after
                .checked_add(*d)
                .map_err(|_| ScheduleError::OutOfRange { after }),
            Self::Cron(cron) => {
                let from = after.to_zoned(TimeZone::UTC);
                cron.find_next_occurrence(&from, false)
                    .map(|z| z.timestamp())
                    .map_err(|_| ScheduleError::NoMatch {
                        expression: cron.pattern.to_string(),
                        after,
                    })
            }
        }
    }

    /// The next run given the anchor (last run start, or creation time) and `now`.
    pub fn next_run(&self, anchor: Timestamp, now: Timestamp) -> Result<NextRun, ScheduleError> {
        let window = self.window_after(anchor)?;
        let due = window <= now;
        Ok(NextRun {
            window,
            at: if due { now } else { window },
            due,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("valid timestamp")
    }

    fn cron(expr: &str) -> Schedule {
        Schedule::parse(&RotationSchedule {
            every: None,
            cron: Some(expr.into()),
        })
        .expect("valid cron")
    }

    fn every(d: &str) -> Schedule {
        Schedule::parse(&RotationSchedule {
            every: Some(d.into()),
            cron: None,
        })
        .expect("valid duration")
    }

    #[rstest]
    #[case::monthly_first_at_3("0 3 1 * *", "2026-01-31T12:00:00Z", "2026-02-01T03:00:00Z")]
    #[case::day_31_skips_short_months("0 0 31 * *", "2026-01-31T00:00:00Z", "2026-03-31T00:00:00Z")]
    #[case::day_31_skips_april_and_june(
        "0 0 31 * *",
        "2026-03-31T00:00:00Z",
        "2026-05-31T00:00:00Z"
    )]
    #[case::feb_29_waits_for_leap_year(
        "0 0 29 2 *",
        "2026-03-01T00:00:00Z",
        "2028-02-29T00:00:00Z"
    )]
    #[case::feb_29_from_leap_day_itself(
        "0 0 29 2 *",
        "2028-02-29T00:00:00Z",
        "2032-02-29T00:00:00Z"
    )]
    #[case::last_day_of_february_non_leap(
        "59 23 28 2 *",
        "2027-01-01T00:00:00Z",
        "2027-02-28T23:59:00Z"
    )]
    #[case::year_end_rollover("30 23 31 12 *", "2026-12-31T23:30:00Z", "2027-12-31T23:30:00Z")]
    #[case::strictly_after_anchor("0 3 * * *", "2026-05-10T03:00:00Z", "2026-05-11T03:00:00Z")]
    #[case::second_after_window("0 3 * * *", "2026-05-10T02:59:59Z", "2026-05-10T03:00:00Z")]
    #[case::sunday_weekly("0 2 * * 0", "2026-11-22T02:00:00Z", "2026-11-29T02:00:00Z")]
    #[case::march_dst_date_is_plain_utc(
        "30 2 29 3 *",
        "2026-03-01T00:00:00Z",
        "2026-03-29T02:30:00Z"
    )]
    fn cron_windows_in_utc(#[case] expr: &str, #[case] after: &str, #[case] expected: &str) {
        assert_eq!(cron(expr).window_after(ts(after)), Ok(ts(expected)));
    }

    #[rstest]
    #[case::thirty_days("720h", "2026-01-01T00:00:00Z", "2026-01-31T00:00:00Z")]
    #[case::compound("1h30m", "2026-01-01T23:00:00Z", "2026-01-02T00:30:00Z")]
    #[case::across_leap_day("24h", "2028-02-28T12:00:00Z", "2028-02-29T12:00:00Z")]
    fn every_adds_the_period(#[case] d: &str, #[case] after: &str, #[case] expected: &str) {
        assert_eq!(every(d).window_after(ts(after)), Ok(ts(expected)));
    }

    #[test]
    fn future_window_is_not_due() {
        let next = every("720h")
            .next_run(ts("2026-01-01T00:00:00Z"), ts("2026-01-20T00:00:00Z"))
            .expect("next");
        assert_eq!(
            next,
            NextRun {
                window: ts("2026-01-31T00:00:00Z"),
                at: ts("2026-01-31T00:00:00Z"),
                due: false
            }
        );
    }

    #[test]
    fn window_exactly_now_is_due() {
        let next = cron("0 3 * * *")
            .next_run(ts("2026-05-09T03:00:00Z"), ts("2026-05-10T03:00:00Z"))
            .expect("next");
        assert!(next.due);
        assert_eq!(next.at, ts("2026-05-10T03:00:00Z"));
    }

    #[test]
    fn missed_windows_after_downtime_rotate_once() {
        // Daily at 03:00; the operator was down from May 10 to May 15 (five windows missed).
        let schedule = cron("0 3 * * *");
        let anchor = ts("2026-05-10T03:00:00Z");
        let now = ts("2026-05-15T10:17:00Z");
        let next = schedule.next_run(anchor, now).expect("next");
        assert!(next.due);
        assert_eq!(next.window, ts("2026-05-11T03:00:00Z"));
        assert_eq!(next.at, now, "one catch-up run, now");
        // The catch-up run started now becomes the anchor: the next window is tomorrow, not the
        // remaining missed ones.
        let after = schedule.next_run(now, now).expect("next");
        assert!(!after.due);
        assert_eq!(after.at, ts("2026-05-16T03:00:00Z"));
    }

    #[test]
    fn missed_every_period_rotates_once() {
        let schedule = every("24h");
        let now = ts("2026-01-10T08:00:00Z");
        assert!(
            schedule
                .next_run(ts("2026-01-01T00:00:00Z"), now)
                .expect("next")
                .due
        );
        let after = schedule.next_run(now, now).expect("next");
        assert_eq!(after.at, ts("2026-01-11T08:00:00Z"));
    }

    #[rstest]
    #[case::garbage("every day")]
    #[case::six_fields_with_seconds("0 0 3 1 * *")]
    #[case::minute_out_of_range("60 3 * * *")]
    #[case::month_out_of_range("0 3 1 13 *")]
    #[case::empty("")]
    fn invalid_cron_names_the_field(#[case] expr: &str) {
        let err = Schedule::parse(&RotationSchedule {
            every: None,
            cron: Some(expr.into()),
        })
        .expect_err("invalid");
        assert!(matches!(err, ScheduleError::Cron { .. }), "{err:?}");
        assert!(err.to_string().contains("spec.schedule.cron"), "{err}");
    }

    #[test]
    fn impossible_date_is_a_clear_error_not_a_hang() {
        let err = cron("0 0 30 2 *")
            .window_after(ts("2026-01-01T00:00:00Z"))
            .expect_err("never matches");
        assert!(err.to_string().contains("spec.schedule.cron"), "{err}");
    }

    #[rstest]
    #[case::words("monthly")]
    #[case::zero("0s")]
    #[case::negative("-5m")]
    fn invalid_every_names_the_field(#[case] d: &str) {
        let err = Schedule::parse(&RotationSchedule {
            every: Some(d.into()),
            cron: None,
        })
        .expect_err("invalid");
        assert!(matches!(err, ScheduleError::Every(_)), "{err:?}");
        assert!(err.to_string().contains("spec.schedule.every"), "{err}");
    }

    #[rstest]
    #[case::neither(None, None)]
    #[case::both(Some("24h"), Some("0 3 * * *"))]
    fn exactly_one_schedule(#[case] e: Option<&str>, #[case] c: Option<&str>) {
        let err = Schedule::parse(&RotationSchedule {
            every: e.map(Into::into),
            cron: c.map(Into::into),
        })
        .expect_err("invalid");
        assert_eq!(err, ScheduleError::NotExactlyOne);
    }
}
