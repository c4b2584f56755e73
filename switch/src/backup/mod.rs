//! Backups of the embedded SQLite store (issue 14 item 6).
//!
//! - [`backup_database`] takes an online, consistent copy while the switch serves: `VACUUM INTO`
//!   on a connection of its own reads one snapshot (WAL lets the writer go on committing), writes
//!   a compact file next to the destination, checks it and renames it into place, so a file with
//!   the final name is always a complete backup.
//! - [`restore_database`] puts a backup in place of the database. It refuses while any process
//!   has the database open (the switch holds a shared [`DatabaseLock`]; SQLite's own locks catch
//!   any other process), checks the backup (`PRAGMA integrity_check`, the migrations it carries
//!   against this binary's) on a staged copy before it touches the database, keeps the replaced
//!   database (and its WAL) under a `.pre-restore-<time>` name, and swaps with one rename.
//! - [`schedule`] runs `[backup] schedule` inside `serve`.
//!
//! A PostgreSQL store is not backed up by the switch: pg_dump or CloudNativePG do it (continuous
//! WAL archiving, point-in-time recovery); see docs/backup-restore.md.

pub mod schedule;

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

/// Why a backup or restore did not happen. Every variant says what to do; none carries a
/// database URL (it may hold a password) or data from the database.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store is PostgreSQL.
    #[error(
        "the store is PostgreSQL: its backups come from the database, not the switch (pg_dump, or CloudNativePG's continuous WAL archiving and point-in-time recovery); see docs/backup-restore.md"
    )]
    Postgres,
    /// The URL names an in-memory database.
    #[error("the store is an in-memory SQLite database: there is nothing to back up or restore")]
    InMemory,
    /// The URL is neither SQLite nor PostgreSQL, or does not parse.
    #[error("failed to read the database URL: {0}")]
    Url(String),
    /// `[backup] schedule` is not a five-field cron expression.
    #[error(
        "invalid backup.schedule `{expression}`: {reason} (five fields, UTC: minute hour day-of-month month day-of-week, e.g. \"0 * * * *\" for hourly)"
    )]
    Schedule {
        /// The expression as written.
        expression: String,
        /// What the parser objected to.
        reason: String,
    },
    /// There is no database file to back up.
    #[error("database {0} does not exist; nothing to back up")]
    NoDatabase(PathBuf),
    /// The backup to restore is missing.
    #[error("backup {0} does not exist")]
    NoBackup(PathBuf),
    /// A backup never overwrites a file.
    #[error("{0} already exists; a backup never overwrites, choose another file name")]
    Exists(PathBuf),
    /// A process has the database open.
    #[error(
        "database {0} is in use by a running switch or another process; stop it first (in Kubernetes: kubectl scale bankswitch NAME --replicas=0) and retry"
    )]
    InUse(PathBuf),
    /// A restore holds the lock the switch takes at start.
    #[error(
        "a restore of database {db} is in progress (it holds {lock}); start the switch when it has finished"
    )]
    RestoreInProgress {
        /// The database.
        db: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// The file is damaged or not a SQLite database.
    #[error("{path} failed the integrity check: {detail}")]
    Corrupt {
        /// The file checked.
        path: PathBuf,
        /// The first problems SQLite reported.
        detail: String,
    },
    /// The file has no applied migrations: not a Switchyard database.
    #[error("{0} is not a Switchyard database: it has no applied migrations")]
    NotSwitchyard(PathBuf),
    /// The backup was taken by a newer switch.
    #[error(
        "{path} carries migrations this binary does not know ({unknown:?}): it was taken by a newer switch version; restore it with that version"
    )]
    NewerSchema {
        /// The backup.
        path: PathBuf,
        /// Versions applied in the backup but not embedded here.
        unknown: Vec<i64>,
    },
    /// A file operation failed.
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A SQLite call failed.
    #[error("SQLite failed to {action} {path}: {source}")]
    Sqlite {
        /// What we were doing.
        action: &'static str,
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Io {
        action,
        path,
        source,
    }
}

fn sqlite(action: &'static str, path: &Path) -> impl FnOnce(rusqlite::Error) -> BackupError {
    let path = path.to_path_buf();
    move |source| BackupError::Sqlite {
        action,
        path,
        source,
    }
}

/// The file of the embedded SQLite database a store URL names.
pub fn sqlite_path(url: &str) -> Result<PathBuf, BackupError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Err(BackupError::Postgres);
    }
    if !url.starts_with("sqlite:") {
        return Err(BackupError::Url(
            "only sqlite:// and postgres:// URLs are supported".into(),
        ));
    }
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Err(BackupError::InMemory);
    }
    // the same parser the store uses, so `?mode=rwc` and friends mean what they mean there
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map_err(|_| BackupError::Url("expected sqlite://PATH".into()))?;
    Ok(options.get_filename().to_path_buf())
}

/// `<db>` plus a suffix (`switchyard.db` → `switchyard.db-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The lock file next to a database: every switch process using the database holds it shared,
/// a restore holds it exclusively. An OS file lock (flock), so a killed process leaves no stale
/// lock behind.
pub fn lock_path(db: &Path) -> PathBuf {
    with_suffix(db, ".lock")
}

/// A held lock on `<db>.lock`; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DatabaseLock {
    _file: File,
    path: PathBuf,
}

impl DatabaseLock {
    /// Takes the lock shared, as every switch process that opens the database does (`serve`,
    /// `drain`, `migrate`, `backup`): many may hold it, a restore cannot start meanwhile, and a
    /// switch cannot start while a restore runs.
    pub fn shared(db: &Path) -> Result<Self, BackupError> {
        let (file, path) = open_lock_file(db)?;
        match file.try_lock_shared() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(BackupError::RestoreInProgress {
                db: db.to_path_buf(),
                lock: path,
            }),
            Err(TryLockError::Error(e)) => Err(io("lock", &path)(e)),
        }
    }

    /// Takes the lock exclusively (a restore): fails at once while any switch process holds it.
    pub fn exclusive(db: &Path) -> Result<Self, BackupError> {
        let (file, path) = open_lock_file(db)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(TryLockError::WouldBlock) => Err(BackupError::InUse(db.to_path_buf())),
            Err(TryLockError::Error(e)) => Err(io("lock", &path)(e)),
        }
    }

    /// For the store URL a switch process opens: a shared lock on an embedded SQLite file,
    /// nothing for PostgreSQL or an in-memory database.
    pub fn for_store_url(url: &str) -> Result<Option<Self>, BackupError> {
        match sqlite_path(url) {
            Ok(db) => Self::shared(&db).map(Some),
            Err(BackupError::Postgres | BackupError::InMemory) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_lock_file(db: &Path) -> Result<(File, PathBuf), BackupError> {
    let path = lock_path(db);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("open the lock file", &path))?;
    Ok((file, path))
}

/// What [`backup_database`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long the copy and its check took.
    pub duration: Duration,
    /// Highest migration applied in it (`None` for a database never migrated).
    pub schema_version: Option<i64>,
}

/// Copies the live database `db` to `dest` while it serves. `dest` must not exist. The copy is
/// one consistent snapshot: every transaction committed before it started is in it, none that
/// committed later. Blocking: call it from a blocking thread.
pub fn backup_database(db: &Path, dest: &Path) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    if !db.is_file() {
        return Err(BackupError::NoDatabase(db.to_path_buf()));
    }
    if dest.exists() {
        return Err(BackupError::Exists(dest.to_path_buf()));
    }
    // written under another name and renamed when complete and checked: a file with the final
    // name is never half a backup, whatever happens to this process
    let partial = with_suffix(dest, ".partial");
    remove_if_exists(&partial)?;
    {
        // read-write without create: a read-only connection cannot recover a WAL index after a
        // crash; this connection never writes to the database itself
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(sqlite("open", db))?;
        // a checkpoint or a writer holding a lock briefly must not fail the backup
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(sqlite("configure", db))?;
        let target = partial
            .to_str()
            .ok_or_else(|| BackupError::Url(format!("{} is not UTF-8", partial.display())))?;
        conn.execute("VACUUM INTO ?1", [target])
            .map_err(sqlite("copy (VACUUM INTO)", db))?;
    }
    let check = check_file(&partial, None).inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    sync_file(&partial)?;
    std::fs::rename(&partial, dest).map_err(io("rename the backup to", dest))?;
    sync_parent(dest)?;
    let bytes = std::fs::metadata(dest)
        .map_err(io("read the size of", dest))?
        .len();
    Ok(BackupReport {
        path: dest.to_path_buf(),
        bytes,
        duration: started.elapsed(),
        schema_version: check.schema_version,
    })
}

/// What [`restore_database`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Where the replaced database was moved (`None` when there was none).
    pub previous: Option<PathBuf>,
    /// Highest migration applied in the restored database.
    pub schema_version: i64,
    /// Migrations of this binary not applied in it yet (`migrate` applies them).
    pub pending_migrations: usize,
}

/// Replaces database `db` with `backup`. `known_migrations` are this binary's
/// ([`crate::store::embedded_migration_versions`]). Refuses while the database is in use;
/// changes nothing unless the backup passes its checks. Blocking.
pub fn restore_database(
    db: &Path,
    backup: &Path,
    known_migrations: &[i64],
) -> Result<RestoreReport, BackupError> {
    if !backup.is_file() {
        return Err(BackupError::NoBackup(backup.to_path_buf()));
    }
    // held until the new database is in place: a switch starting meanwhile fails fast
    let _lock = DatabaseLock::exclusive(db)?;
    if db.exists() {
        ensure_not_open(db)?;
    }
    let staged = with_suffix(db, ".restore-partial");
    remove_if_exists(&staged)?;
    std::fs::copy(backup, &staged).map_err(io("copy the backup to", &staged))?;
    let check = match check_file(&staged, Some(known_migrations)) {
        Ok(check) => check,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            // name the file the user gave, not our staging copy
            return Err(match e {
                BackupError::Corrupt { detail, .. } => BackupError::Corrupt {
                    path: backup.to_path_buf(),
                    detail,
                },
                BackupError::NotSwitchyard(_) => BackupError::NotSwitchyard(backup.to_path_buf()),
                BackupError::NewerSchema { unknown, .. } => BackupError::NewerSchema {
                    path: backup.to_path_buf(),
                    unknown,
                },
                other => other,
            });
        }
    };
    sync_file(&staged)?;

    // keep what is replaced: the database and any WAL, journal or shared-memory file of it
    // (a WAL left behind would be replayed into the restored file; a hot journal too)
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let mut previous = None;
    for suffix in ["", "-wal", "-journal", "-shm"] {
        let file = with_suffix(db, suffix);
        if file.exists() {
            let kept = with_suffix(db, &format!(".pre-restore-{stamp}{suffix}"));
            std::fs::rename(&file, &kept).map_err(io("move aside", &file))?;
            if suffix.is_empty() {
                previous = Some(kept);
            }
        }
    }
    std::fs::rename(&staged, db).map_err(io("move the restored database to", db))?;
    sync_parent(db)?;
    let schema_version = check.schema_version.unwrap_or_default();
    Ok(RestoreReport {
        previous,
        schema_version,
        pending_migrations: check.pending,
    })
}

/// Fails with [`BackupError::InUse`] when any connection (of any process) has `db` open.
///
/// Leaving WAL mode needs the database to itself: every connection to a WAL database holds a
/// shared lock on it for as long as it is open, so with another connection the change fails at
/// once (busy timeout 0). This catches processes that do not take [`DatabaseLock`] (an older
/// switch, the sqlite3 shell). Converting an unused database is harmless: it is about to be
/// replaced, and the conversion checkpoints its WAL into the file that is kept.
fn ensure_not_open(db: &Path) -> Result<(), BackupError> {
    let conn = match Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) {
        Ok(conn) => conn,
        // a file SQLite cannot open is not in use by a switch; the restore replaces it
        Err(_) => return Ok(()),
    };
    let _ = conn.busy_timeout(Duration::ZERO);
    match conn.query_row("PRAGMA journal_mode = DELETE", [], |r| {
        r.get::<_, String>(0)
    }) {
        Ok(mode) if mode.eq_ignore_ascii_case("wal") => Err(BackupError::InUse(db.to_path_buf())),
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Err(BackupError::InUse(db.to_path_buf()))
        }
        // damaged or not a database: nothing can be using it as one
        Err(_) => Ok(()),
    }
}

/// What checking a database file found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileCheck {
    schema_version: Option<i64>,
    pending: usize,
}

/// `PRAGMA integrity_check`, then (with `known`) the migrations table against this binary's;
/// leaves the file in rollback-journal mode so it is complete without a `-wal` next to it.
fn check_file(path: &Path, known: Option<&[i64]>) -> Result<FileCheck, BackupError> {
    let corrupt = |detail: String| BackupError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| corrupt(e.to_string()))?;
    let problems: Vec<String> = conn
        .prepare("PRAGMA integrity_check(20)")
        .and_then(|mut stmt| {
            stmt.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| corrupt(e.to_string()))?;
    if problems != ["ok"] {
        return Err(corrupt(problems.join("; ")));
    }
    conn.query_row("PRAGMA journal_mode = DELETE", [], |r| {
        r.get::<_, String>(0)
    })
    .map_err(sqlite("leave WAL mode in", path))?;
    let has_table: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            [],
            |r| r.get(0),
        )
        .map_err(sqlite("read the schema of", path))?;
    let (applied, failed) = if has_table == 0 {
        (Vec::new(), Vec::new())
    } else {
        let versions = |sql: &str| -> Result<Vec<i64>, rusqlite::Error> {
            let mut stmt = conn.prepare(sql)?;
            stmt.query_map([], |r| r.get::<_, i64>(0))?.collect()
        };
        (
            versions("SELECT version FROM _sqlx_migrations WHERE success = 1 ORDER BY version")
                .map_err(sqlite("read the migrations of", path))?,
            versions("SELECT version FROM _sqlx_migrations WHERE success = 0 ORDER BY version")
                .map_err(sqlite("read the migrations of", path))?,
        )
    };
    let Some(known) = known else {
        return Ok(FileCheck {
            schema_version: applied.iter().copied().max(),
            pending: 0,
        });
    };
    if !failed.is_empty() {
        return Err(corrupt(format!(
            "migrations {failed:?} are recorded as failed half-way"
        )));
    }
    if applied.is_empty() {
        return Err(BackupError::NotSwitchyard(path.to_path_buf()));
    }
    let unknown: Vec<i64> = applied
        .iter()
        .copied()
        .filter(|v| !known.contains(v))
        .collect();
    if !unknown.is_empty() {
        return Err(BackupError::NewerSchema {
            path: path.to_path_buf(),
            unknown,
        });
    }
    Ok(FileCheck {
        schema_version: applied.iter().copied().max(),
        pending: known.iter().filter(|v| !applied.contains(v)).count(),
    })
}

fn remove_if_exists(path: &Path) -> Result<(), BackupError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path)(e)),
    }
}

fn sync_file(path: &Path) -> Result<(), BackupError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io("flush", path))
}

/// Makes a rename durable: the directory entry is on disk once its directory is synced.
fn sync_parent(path: &Path) -> Result<(), BackupError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io("flush the directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(path: &Path, migrations: &[(i64, bool)], rows: i64) {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(
            "CREATE TABLE _sqlx_migrations (version INTEGER PRIMARY KEY, success INTEGER);
             CREATE TABLE money (id INTEGER PRIMARY KEY, amount INTEGER);",
        )
        .unwrap();
        for (v, ok) in migrations {
            conn.execute(
                "INSERT INTO _sqlx_migrations VALUES (?1, ?2)",
                rusqlite::params![v, ok],
            )
            .unwrap();
        }
        for i in 0..rows {
            conn.execute("INSERT INTO money (amount) VALUES (?1)", [i])
                .unwrap();
        }
    }

    fn rows(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM money", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn urls_name_a_file_or_say_why_not() {
        assert_eq!(
            sqlite_path("sqlite:///var/lib/switchyard/switchyard.db?mode=rwc").unwrap(),
            PathBuf::from("/var/lib/switchyard/switchyard.db")
        );
        assert_eq!(
            sqlite_path("sqlite://switchyard.db").unwrap(),
            PathBuf::from("switchyard.db")
        );
        assert!(matches!(
            sqlite_path("postgres://u:secret@db/x"),
            Err(BackupError::Postgres)
        ));
        assert!(matches!(
            sqlite_path("sqlite::memory:"),
            Err(BackupError::InMemory)
        ));
        let err = sqlite_path("mysql://u:secret@db/x")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn a_backup_is_a_checked_copy_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("live.db");
        database(&db, &[(1, true), (2, true)], 50);
        // the live connection stays open (WAL), as the switch's would
        let live = Connection::open(&db).unwrap();
        let dest = dir.path().join("b.db");
        let report = backup_database(&db, &dest).unwrap();
        assert_eq!(report.schema_version, Some(2));
        assert!(report.bytes > 0);
        assert_eq!(rows(&dest), 50);
        assert!(!with_suffix(&dest, "-wal").exists());
        assert!(!with_suffix(&dest, ".partial").exists());
        assert!(matches!(
            backup_database(&db, &dest),
            Err(BackupError::Exists(_))
        ));
        drop(live);
        assert!(matches!(
            backup_database(&dir.path().join("missing.db"), &dir.path().join("c.db")),
            Err(BackupError::NoDatabase(_))
        ));
    }

    #[test]
    fn restore_refuses_a_database_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("live.db");
        database(&db, &[(1, true)], 3);
        let backup = dir.path().join("b.db");
        backup_database(&db, &backup).unwrap();

        // a switch process holds the shared lock
        let lock = DatabaseLock::shared(&db).unwrap();
        assert!(matches!(
            restore_database(&db, &backup, &[1]),
            Err(BackupError::InUse(_))
        ));
        drop(lock);

        // a process without the lock (sqlite3 shell, an older switch) has it open
        let conn = Connection::open(&db).unwrap();
        conn.query_row("SELECT COUNT(*) FROM money", [], |r| r.get::<_, i64>(0))
            .unwrap();
        assert!(matches!(
            restore_database(&db, &backup, &[1]),
            Err(BackupError::InUse(_))
        ));
        drop(conn);

        // while a restore holds the lock, a switch cannot start
        let restoring = DatabaseLock::exclusive(&db).unwrap();
        assert!(matches!(
            DatabaseLock::shared(&db),
            Err(BackupError::RestoreInProgress { .. })
        ));
        drop(restoring);
    }

    #[test]
    fn restore_replaces_the_database_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("live.db");
        database(&db, &[(1, true)], 10);
        let backup = dir.path().join("b.db");
        backup_database(&db, &backup).unwrap();
        {
            let conn = Connection::open(&db).unwrap();
            conn.execute("INSERT INTO money (amount) VALUES (99)", [])
                .unwrap();
        }
        assert_eq!(rows(&db), 11);
        let report = restore_database(&db, &backup, &[1, 2]).unwrap();
        assert_eq!(report.schema_version, 1);
        assert_eq!(report.pending_migrations, 1);
        assert_eq!(rows(&db), 10);
        let previous = report.previous.expect("the replaced database is kept");
        assert_eq!(rows(&previous), 11);
        for suffix in ["-wal", "-shm", "-journal", ".restore-partial"] {
            assert!(!with_suffix(&db, suffix).exists(), "{suffix} left behind");
        }
    }

    #[test]
    fn restore_checks_the_backup_before_touching_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("live.db");
        database(&db, &[(1, true)], 7);
        /// A name, how to make the bad backup, and the refusal expected.
        type Case = (&'static str, Box<dyn Fn(&Path)>, fn(&BackupError) -> bool);
        let cases: Vec<Case> = vec![
            (
                "garbage",
                Box::new(|p: &Path| {
                    std::fs::write(p, b"not a database at all, just bytes").unwrap()
                }),
                |e| matches!(e, BackupError::Corrupt { .. }),
            ),
            (
                "no migrations",
                Box::new(|p: &Path| database(p, &[], 1)),
                |e| matches!(e, BackupError::NotSwitchyard(_)),
            ),
            (
                "newer",
                Box::new(|p: &Path| database(p, &[(1, true), (9, true)], 1)),
                |e| matches!(e, BackupError::NewerSchema { unknown, .. } if unknown == &[9]),
            ),
            (
                "half-applied",
                Box::new(|p: &Path| database(p, &[(1, false)], 1)),
                |e| matches!(e, BackupError::Corrupt { .. }),
            ),
        ];
        for (name, make, expected) in cases {
            let backup = dir.path().join(format!("{name}.db"));
            make(&backup);
            let err = restore_database(&db, &backup, &[1]).unwrap_err();
            assert!(expected(&err), "{name}: {err:?}");
            assert!(err.to_string().contains(&backup.display().to_string()));
            assert_eq!(rows(&db), 7, "{name} changed the database");
        }
        assert!(matches!(
            restore_database(&db, &dir.path().join("missing.db"), &[1]),
            Err(BackupError::NoBackup(_))
        ));
    }

    #[test]
    fn a_truncated_backup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("live.db");
        database(&db, &[(1, true)], 2000);
        let backup = dir.path().join("b.db");
        backup_database(&db, &backup).unwrap();
        let bytes = std::fs::read(&backup).unwrap();
        let cut = dir.path().join("cut.db");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = restore_database(&db, &cut, &[1]).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err:?}");
        assert_eq!(rows(&db), 2000);
    }
}
