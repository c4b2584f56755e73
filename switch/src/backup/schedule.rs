//! `[backup] schedule, dir, retain`: backups of the embedded SQLite store taken by the running
//! switch, named by their UTC time, the newest `retain` kept.
//!
//! The times are pure functions of the cron expression (unit-tested); the loop around them is
//! short: sleep until the next window, copy on a blocking thread, prune, set the metrics. A
//! switch that starts without a backup younger than one interval takes one at once, so a
//! restart or a fresh volume does not wait a whole period (or page as stale).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{BackupError, BackupReport, backup_database, sqlite_path};
use crate::metrics::SwitchMetrics;
use crate::settings::Settings;
use crate::store::Backend;

/// Prefix of scheduled backup files: `switchyard-20261130T193000Z.db`.
const PREFIX: &str = "switchyard-";
/// Suffix of scheduled backup files.
const SUFFIX: &str = ".db";
/// Timestamp format inside the name (sorts by time as text).
const STAMP: &str = "%Y%m%dT%H%M%SZ";

/// A parsed `[backup]` section for one embedded SQLite database.
#[derive(Debug, Clone)]
pub struct BackupPlan {
    db: PathBuf,
    cron: Box<Cron>,
    dir: PathBuf,
    retain: usize,
}

/// Parses a five-field UTC cron expression (the KeyRotation dialect: no seconds, no years).
pub fn parse_cron(expression: &str) -> Result<Cron, BackupError> {
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expression)
        .map_err(|e| BackupError::Schedule {
            expression: expression.to_owned(),
            reason: e.to_string(),
        })
}

fn to_jiff(t: DateTime<Utc>) -> Option<jiff::Timestamp> {
    jiff::Timestamp::from_microsecond(t.timestamp_micros()).ok()
}

fn from_jiff(t: jiff::Timestamp) -> Option<DateTime<Utc>> {
    Utc.timestamp_micros(t.as_microsecond()).single()
}

/// The first window of `cron` strictly after `after` (`None`: the expression never matches).
pub fn next_window(cron: &Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let from = to_jiff(after)?.to_zoned(jiff::tz::TimeZone::UTC);
    let next = cron.find_next_occurrence(&from, false).ok()?;
    from_jiff(next.timestamp())
}

/// The nominal gap between backups: the longest of the next few gaps after `now` (a schedule
/// like `0 2,3 * * *` has a short and a long one; staleness is judged by the long one).
pub fn nominal_interval(cron: &Cron, now: DateTime<Utc>) -> Option<Duration> {
    let mut at = next_window(cron, now)?;
    let mut longest = Duration::ZERO;
    for _ in 0..8 {
        let next = next_window(cron, at)?;
        longest = longest.max((next - at).to_std().ok()?);
        at = next;
    }
    Some(longest)
}

/// The file name of a scheduled backup taken at `at`.
pub fn backup_file_name(at: DateTime<Utc>) -> String {
    format!("{PREFIX}{}{SUFFIX}", at.format(STAMP))
}

/// The time in a scheduled backup's file name; `None` for any other file.
pub fn backup_time(name: &str) -> Option<DateTime<Utc>> {
    let stamp = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    chrono::NaiveDateTime::parse_from_str(stamp, STAMP)
        .ok()
        .map(|t| t.and_utc())
}

/// Scheduled backups in `dir`, oldest first. Other files (a manual backup under another name,
/// a `.partial` being written) are not listed, so pruning never touches them.
pub fn list_backups(dir: &Path) -> Result<Vec<(DateTime<Utc>, PathBuf)>, BackupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(super::io("list", dir)(e)),
    };
    let mut found: Vec<(DateTime<Utc>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let at = backup_time(name.to_str()?)?;
            Some((at, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Deletes the oldest scheduled backups beyond the newest `retain`; returns what it deleted.
pub fn prune(dir: &Path, retain: usize) -> Result<Vec<PathBuf>, BackupError> {
    let backups = list_backups(dir)?;
    let excess = backups.len().saturating_sub(retain);
    let mut removed = Vec::new();
    for (_, path) in backups.into_iter().take(excess) {
        std::fs::remove_file(&path).map_err(super::io("remove the old backup", &path))?;
        removed.push(path);
    }
    Ok(removed)
}

impl BackupPlan {
    /// The plan for these settings: `None` without `[backup] schedule`. A schedule on a
    /// PostgreSQL store is refused (the database backs itself up), as is one that never fires.
    pub fn from_settings(
        settings: &Settings,
        backend: Backend,
    ) -> Result<Option<Self>, BackupError> {
        let Some(expression) = &settings.backup.schedule else {
            return Ok(None);
        };
        if backend == Backend::Postgres {
            return Err(BackupError::Postgres);
        }
        let cron = parse_cron(expression)?;
        if next_window(&cron, Utc::now()).is_none() {
            return Err(BackupError::Schedule {
                expression: expression.clone(),
                reason: "it never matches a time".into(),
            });
        }
        let url = settings
            .database
            .resolve_url()
            .map_err(|e| BackupError::Url(e.to_string()))?;
        Ok(Some(Self {
            db: sqlite_path(&url)?,
            cron: Box::new(cron),
            dir: settings.backup.dir.clone(),
            retain: settings.backup.retain.max(1) as usize,
        }))
    }

    /// Takes one backup into `dir` now, then prunes. Blocking.
    pub fn take(&self, now: DateTime<Utc>) -> Result<BackupReport, BackupError> {
        std::fs::create_dir_all(&self.dir).map_err(super::io("create", &self.dir))?;
        let report = backup_database(&self.db, &self.dir.join(backup_file_name(now)))?;
        for old in prune(&self.dir, self.retain)? {
            info!(file = %old.display(), "removed an old backup (backup.retain)");
        }
        Ok(report)
    }

    /// Runs until `stop`: a backup at start when none is younger than one interval, then one
    /// per window.
    pub async fn run(self, metrics: Arc<SwitchMetrics>, stop: CancellationToken) {
        let plan = Arc::new(self);
        let interval = nominal_interval(&plan.cron, Utc::now()).unwrap_or(Duration::ZERO);
        metrics
            .backup_interval_seconds
            .set(i64::try_from(interval.as_secs()).unwrap_or(i64::MAX));
        let newest = list_backups(&plan.dir)
            .ok()
            .and_then(|b| b.last().map(|(at, _)| *at));
        if let Some(at) = newest {
            metrics.backup_last_success_timestamp.set(at.timestamp());
        }
        info!(
            schedule = %plan.cron.pattern,
            dir = %plan.dir.display(),
            retain = plan.retain,
            "scheduled backups on"
        );
        let overdue =
            newest.is_none_or(|at| (Utc::now() - at).to_std().is_ok_and(|age| age >= interval));
        if overdue {
            take_and_record(&plan, &metrics).await;
        }
        loop {
            let Some(next) = next_window(&plan.cron, Utc::now()) else {
                error!("backup.schedule matches no later time; scheduled backups stop");
                return;
            };
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            take_and_record(&plan, &metrics).await;
        }
    }
}

async fn take_and_record(plan: &Arc<BackupPlan>, metrics: &SwitchMetrics) {
    let job = plan.clone();
    let outcome = tokio::task::spawn_blocking(move || job.take(Utc::now())).await;
    match outcome {
        Ok(Ok(report)) => {
            metrics
                .backup_last_success_timestamp
                .set(Utc::now().timestamp());
            metrics
                .backup_last_duration_seconds
                .set(report.duration.as_secs_f64());
            metrics
                .backup_last_size_bytes
                .set(i64::try_from(report.bytes).unwrap_or(i64::MAX));
            info!(
                file = %report.path.display(),
                bytes = report.bytes,
                duration_ms = report.duration.as_millis() as u64,
                schema_version = report.schema_version,
                "backup taken"
            );
        }
        Ok(Err(err)) => {
            metrics.backup_failures.inc();
            error!(error = %err, "scheduled backup failed");
        }
        Err(err) => {
            metrics.backup_failures.inc();
            warn!(error = %err, "scheduled backup task did not finish");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn windows_and_intervals_follow_the_cron_expression() {
        let hourly = parse_cron("0 * * * *").unwrap();
        assert_eq!(
            next_window(&hourly, at("2026-11-30T19:25:00Z")),
            Some(at("2026-11-30T20:00:00Z"))
        );
        // strictly after: a backup at the window does not schedule itself again
        assert_eq!(
            next_window(&hourly, at("2026-11-30T20:00:00Z")),
            Some(at("2026-11-30T21:00:00Z"))
        );
        assert_eq!(
            nominal_interval(&hourly, at("2026-11-30T19:25:00Z")),
            Some(Duration::from_secs(3600))
        );
        let twice = parse_cron("0 2,3 * * *").unwrap();
        assert_eq!(
            nominal_interval(&twice, at("2026-11-30T00:00:00Z")),
            Some(Duration::from_secs(23 * 3600))
        );
    }

    #[test]
    fn bad_schedules_are_refused_with_the_expression() {
        for bad in ["every hour", "0 0 * * * *", "61 * * * *"] {
            let err = parse_cron(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("five fields"), "{err}");
        }
    }

    #[test]
    fn names_carry_the_time_and_pruning_keeps_the_newest() {
        let name = backup_file_name(at("2026-11-30T19:30:05Z"));
        assert_eq!(name, "switchyard-20261130T193005Z.db");
        assert_eq!(backup_time(&name), Some(at("2026-11-30T19:30:05Z")));
        assert_eq!(backup_time("switchyard-20261130T193005Z.db.partial"), None);
        assert_eq!(backup_time("manual.db"), None);

        let dir = tempfile::tempdir().unwrap();
        for hour in 10..15 {
            let t = at(&format!("2026-11-30T{hour}:00:00Z"));
            std::fs::write(dir.path().join(backup_file_name(t)), b"x").unwrap();
        }
        std::fs::write(dir.path().join("manual.db"), b"x").unwrap();
        let removed = prune(dir.path(), 2).unwrap();
        assert_eq!(removed.len(), 3);
        let left: Vec<_> = list_backups(dir.path())
            .unwrap()
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(
            left,
            [at("2026-11-30T13:00:00Z"), at("2026-11-30T14:00:00Z")]
        );
        assert!(dir.path().join("manual.db").exists());
    }

    #[test]
    fn postgres_refuses_a_schedule() {
        let mut settings = Settings::default();
        settings.backup.schedule = Some("0 * * * *".into());
        assert!(matches!(
            BackupPlan::from_settings(&settings, Backend::Postgres),
            Err(BackupError::Postgres)
        ));
        settings.backup.schedule = None;
        assert!(
            BackupPlan::from_settings(&settings, Backend::Postgres)
                .unwrap()
                .is_none()
        );
    }
}
