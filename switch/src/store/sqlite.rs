//! SQLite engine: the embedded store of a single switch replica (and of `demo`).
//!
//! One writer thread owns the write connection. Write scripts are queued to it; it takes every
//! script waiting at that moment (up to [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE`
//! transaction with a savepoint each — a script that fails rolls back to its savepoint and only
//! itself — and commits once (group commit). No result leaves before that commit returned, and
//! the commit is durable (`synchronous=FULL`, WAL), so batching changes how many fsyncs a
//! thousand withdrawals cost, not what a committed answer means.
//!
//! Running a whole script on the thread that owns the connection makes a request one hop to
//! the store rather than one per statement: the statements themselves are plain rusqlite calls,
//! and the scripts' futures (written once for both engines, see `scripts/`) complete at their
//! first poll here, since nothing in a SQLite [`Conn`] waits.
//!
//! Reads run on a small pool of read-only connections on tokio's blocking threads (WAL lets them
//! read committed data while the writer writes). An in-memory database has no such pool: each
//! connection would see its own database, so everything runs on the writer.
//!
//! Timestamps are stored as integer microseconds so comparisons are numeric.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{OpenFlags, ToSql};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::engine::{CoreStore, Engine, Script};
use super::error::BoxError;
use super::idempotency;
use super::sql::{Arg, Cell, Conn, Dialect, Row, Violation};
use super::{
    Backend, ConnectOptions, IdempotencyClaim, MigrationStatus, PoolStats, SQLITE_MIGRATIONS,
    StoreError, build_migrator, migration_status_from, redact_url,
};

/// The SQLite store.
pub type SqliteStore = CoreStore<SqliteEngine>;

/// Most scripts one group commit takes. Bounds how long the first script of a batch waits for
/// the others (and the size of the transaction a failed commit undoes).
const MAX_BATCH: usize = 256;

/// Scripts that may wait for the writer before callers wait to queue (backpressure).
const QUEUE: usize = 4096;

/// Where the database lives.
#[derive(Debug, Clone)]
enum Location {
    File(String),
    /// A named in-memory database shared by this store's connections (`cache=shared`).
    Memory(String),
}

/// The SQLite engine. `Debug` shows the database path only.
pub struct SqliteEngine {
    url: String,
    location: Location,
    busy_timeout: Duration,
    /// The writer's queue; `None` once closed.
    writer: Mutex<Option<mpsc::Sender<Box<dyn Job>>>>,
    /// Read connections (file databases only).
    readers: Option<Arc<Readers>>,
    /// What the writer has done so far.
    commits: Arc<GroupCommits>,
}

/// Counts of the writer's work: how many scripts share a commit.
#[derive(Debug, Default)]
struct GroupCommits {
    /// Transactions the writer ended (committed or rolled back).
    batches: std::sync::atomic::AtomicU64,
    /// Scripts it ran in them.
    scripts: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for SqliteEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path` or `sqlite::memory:`).
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self, StoreError> {
        let config_error = || StoreError::Config {
            what: "invalid sqlite URL; expected sqlite://PATH".into(),
        };
        let location = if url.contains(":memory:") || url.contains("mode=memory") {
            Location::Memory(format!("file:switchyard-{}", uuid::Uuid::new_v4()))
        } else {
            let options = SqliteConnectOptions::from_str(url).map_err(|_| config_error())?;
            let path = options.get_filename().to_str().ok_or_else(config_error)?;
            Location::File(path.to_string())
        };
        let busy_timeout = opts.acquire_timeout;
        let conn = open(&location, busy_timeout, false)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let commits = Arc::new(GroupCommits::default());
        let counted = commits.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, &counted))
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        let readers = match &location {
            Location::File(_) => Some(Arc::new(Readers {
                idle: Mutex::new(Vec::new()),
                open: AtomicU32::new(0),
                permits: Arc::new(Semaphore::new(
                    opts.max_connections.saturating_sub(1).max(1) as usize,
                )),
                timeout: opts.acquire_timeout,
            })),
            Location::Memory(_) => None,
        };
        Ok(CoreStore {
            engine: SqliteEngine {
                url: redact_url(url),
                location,
                busy_timeout,
                writer: Mutex::new(Some(tx)),
                readers,
                commits,
            },
        })
    }
}

/// Opens a connection with the pragmas every connection of the store has.
fn open(
    location: &Location,
    busy_timeout: Duration,
    read_only: bool,
) -> Result<SqliteConn, StoreError> {
    let conn = match location {
        Location::File(path) => {
            // readers open read-write and are made query-only below: a connection opened
            // read-only cannot recover the WAL index after a crash, and would fail until a
            // writer had
            let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_READ_WRITE;
            if !read_only {
                flags |= OpenFlags::SQLITE_OPEN_CREATE;
            }
            rusqlite::Connection::open_with_flags(path, flags)?
        }
        Location::Memory(name) => rusqlite::Connection::open_with_flags(
            name,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_MEMORY
                | OpenFlags::SQLITE_OPEN_SHARED_CACHE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?,
    };
    conn.busy_timeout(busy_timeout)?;
    if let Location::File(_) = location
        && !read_only
    {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    // money: a committed withdrawal must survive a power cut
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    if read_only {
        conn.pragma_update(None, "query_only", "ON")?;
    }
    conn.set_prepared_statement_cache_capacity(256);
    Ok(SqliteConn {
        conn,
        rendered: HashMap::new(),
    })
}

impl Engine for SqliteEngine {
    type Conn = SqliteConn;

    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn write<T: Send + 'static>(
        &self,
        script: Script<T, SqliteConn>,
    ) -> Result<T, StoreError> {
        self.submit(script).await
    }

    async fn autocommit<T: Send + 'static>(
        &self,
        script: Script<T, SqliteConn>,
    ) -> Result<T, StoreError> {
        self.submit(script).await
    }

    async fn read<T: Send + 'static>(
        &self,
        script: Script<T, SqliteConn>,
    ) -> Result<T, StoreError> {
        let Some(readers) = &self.readers else {
            return self.submit(script).await;
        };
        if self.writer.lock().map_or(true, |w| w.is_none()) {
            return Err(closed());
        }
        let permit = tokio::time::timeout(readers.timeout, readers.permits.clone().acquire_owned())
            .await
            .map_err(|_| unavailable("no read connection became free in time"))?
            .map_err(|_| closed())?;
        let readers = readers.clone();
        let location = self.location.clone();
        let busy = self.busy_timeout;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = match readers.take() {
                Some(c) => c,
                None => {
                    let c = open(&location, busy, true)?;
                    readers.open.fetch_add(1, Ordering::Relaxed);
                    c
                }
            };
            let result = run_script(&mut conn, script);
            readers.put_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(Box::new(e)))?
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let url = match &self.location {
            Location::File(path) => format!("sqlite://{path}"),
            Location::Memory(name) => format!("sqlite:{name}?mode=memory&cache=shared"),
        };
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(|_| StoreError::Config {
                what: "invalid sqlite URL; expected sqlite://PATH".into(),
            })?
            .create_if_missing(true)
            .foreign_keys(true)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(self.busy_timeout);
        let options = match self.location {
            Location::File(_) => options.journal_mode(SqliteJournalMode::Wal),
            Location::Memory(_) => options,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let result = build_migrator(SQLITE_MIGRATIONS).run(&pool).await;
        pool.close().await;
        result?;
        Ok(())
    }

    async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        let applied: Vec<i64> = self
            .read(Box::new(|c: &mut SqliteConn| {
                Box::pin(async move {
                    let exists: i64 = c
                        .scalar(
                            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' \
                             AND name = '_sqlx_migrations'",
                            &[],
                        )
                        .await?;
                    if exists == 0 {
                        return Ok(Vec::new());
                    }
                    c.query(
                        "SELECT version FROM _sqlx_migrations WHERE success = 1",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| r.first())
                    .collect()
                })
            }))
            .await?;
        Ok(migration_status_from(&applied, SQLITE_MIGRATIONS))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(Box::new(|c: &mut SqliteConn| {
            Box::pin(async move { c.scalar::<i64>("SELECT 1", &[]).await.map(drop) })
        }))
        .await
    }

    fn pool_stats(&self) -> PoolStats {
        let (open, idle) = match &self.readers {
            Some(r) => (
                r.open.load(Ordering::Relaxed),
                r.idle.lock().map_or(0, |i| i.len() as u32),
            ),
            None => (0, 0),
        };
        let writer_idle = self.queued() == 0;
        PoolStats {
            size: 1 + open,
            idle: idle + u32::from(writer_idle),
        }
    }

    async fn close(&self) {
        let sender = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(sender) = sender {
            // a barrier: every script queued before it has run and been answered
            let barrier: Script<(), SqliteConn> = Box::new(|_| Box::pin(async { Ok(()) }));
            let _ = send(&sender, barrier, Instant::now() + Duration::from_secs(3600)).await;
        }
        if let Some(readers) = &self.readers {
            readers.permits.close();
            if let Ok(mut idle) = readers.idle.lock() {
                idle.clear();
            }
        }
    }
}

impl SqliteEngine {
    /// Scripts waiting for the writer.
    fn queued(&self) -> usize {
        self.writer
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|s| s.max_capacity() - s.capacity()))
            .unwrap_or(0)
    }

    /// (transactions, scripts) the writer has run so far: scripts per transaction is the
    /// group commit's batching.
    pub fn group_commits(&self) -> (u64, u64) {
        (
            self.commits.batches.load(Ordering::Relaxed),
            self.commits.scripts.load(Ordering::Relaxed),
        )
    }

    async fn submit<T: Send + 'static>(
        &self,
        script: Script<T, SqliteConn>,
    ) -> Result<T, StoreError> {
        let sender = self
            .writer
            .lock()
            .ok()
            .and_then(|w| w.clone())
            .ok_or_else(closed)?;
        send(&sender, script, Instant::now() + self.busy_timeout).await
    }
}

/// Queues `script` for the writer and waits for its committed result. A script still queued
/// at `deadline` is not run at all (answered `Unavailable`), so a caller that gave up never has
/// a write land behind its back.
async fn send<T: Send + 'static>(
    sender: &mpsc::Sender<Box<dyn Job>>,
    script: Script<T, SqliteConn>,
    deadline: Instant,
) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    let job = Box::new(ScriptJob {
        claim: idempotency::current_claim(),
        script: Some(script),
        result: None,
        reply,
        deadline,
    });
    sender.send(job).await.map_err(|_| closed())?;
    answer
        .await
        .map_err(|_| unavailable("the SQLite writer stopped"))?
}

fn closed() -> StoreError {
    unavailable("the store is closed")
}

fn unavailable(what: &str) -> StoreError {
    StoreError::Unavailable(what.to_string().into())
}

/// Read connections handed out to blocking threads.
struct Readers {
    idle: Mutex<Vec<SqliteConn>>,
    open: AtomicU32,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl Readers {
    fn take(&self) -> Option<SqliteConn> {
        self.idle.lock().ok().and_then(|mut i| i.pop())
    }

    fn put_back(&self, conn: SqliteConn) {
        if !self.permits.is_closed()
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(conn);
        }
    }
}

/// Runs a script to completion on this thread. A SQLite [`Conn`] never waits, so the future is
/// ready at its first poll; a panic in a script is an error of that script, not of the thread.
fn run_script<T>(conn: &mut SqliteConn, script: Script<T, SqliteConn>) -> Result<T, StoreError> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        futures::executor::block_on(script(conn))
    }))
    .unwrap_or_else(|_| Err(StoreError::corrupt("a store script panicked")))
}

/// A queued script, as the writer sees it.
trait Job: Send {
    /// Runs the script (unless its caller's deadline passed); `false` when it failed.
    fn run(&mut self, conn: &mut SqliteConn) -> bool;
    /// Answers the caller once the batch's transaction ended: `committed` is `Err` when the
    /// batch was rolled back.
    fn finish(self: Box<Self>, committed: Result<(), &str>);
}

struct ScriptJob<T> {
    /// The admin write's `Idempotency-Key` claim of the task that queued the script.
    claim: Option<IdempotencyClaim>,
    script: Option<Script<T, SqliteConn>>,
    result: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
    deadline: Instant,
}

impl<T: Send + 'static> Job for ScriptJob<T> {
    fn run(&mut self, conn: &mut SqliteConn) -> bool {
        let Some(script) = self.script.take() else {
            return false;
        };
        let result = if Instant::now() > self.deadline {
            Err(unavailable(
                "the SQLite writer was busy past the caller's deadline",
            ))
        } else {
            idempotency::in_claim_scope(self.claim.take(), || run_script(conn, script))
        };
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn finish(self: Box<Self>, committed: Result<(), &str>) {
        let result = match (self.result, committed) {
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (Some(Ok(_)), Err(why)) | (None, Err(why)) => Err(unavailable(why)),
            (None, Ok(())) => Err(unavailable("the script did not run")),
        };
        // the caller may have gone away (its task was cancelled); nothing to tell then
        let _ = self.reply.send(result);
    }
}

/// The writer thread: group commits until every sender is gone.
fn writer_loop(mut conn: SqliteConn, mut rx: mpsc::Receiver<Box<dyn Job>>, counts: &GroupCommits) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while let Some(job) = rx.blocking_recv() {
        batch.push(job);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let committed = run_batch(&mut conn, &mut batch);
        counts.batches.fetch_add(1, Ordering::Relaxed);
        counts
            .scripts
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for job in batch.drain(..) {
            job.finish(committed);
        }
    }
}

/// One group commit. `Err` says why nothing of the batch remains.
fn run_batch(conn: &mut SqliteConn, batch: &mut [Box<dyn Job>]) -> Result<(), &'static str> {
    let c = &conn.conn;
    if c.execute_batch("BEGIN IMMEDIATE").is_err() {
        return Err("the SQLite write transaction could not begin");
    }
    for job in batch.iter_mut() {
        if conn.conn.execute_batch("SAVEPOINT script").is_err() {
            return abort(conn, "a savepoint could not be set");
        }
        let ok = job.run(conn);
        let end = if ok {
            "RELEASE script"
        } else {
            "ROLLBACK TO script; RELEASE script"
        };
        // SQLite ends the whole transaction on some errors (disk full, I/O): then none of the
        // batch's work remains, including scripts that had succeeded
        if conn.conn.is_autocommit() || conn.conn.execute_batch(end).is_err() {
            return abort(conn, "the SQLite write transaction was rolled back");
        }
    }
    if conn.conn.execute_batch("COMMIT").is_err() {
        return abort(conn, "the SQLite commit failed");
    }
    Ok(())
}

fn abort(conn: &mut SqliteConn, why: &'static str) -> Result<(), &'static str> {
    if !conn.conn.is_autocommit() {
        let _ = conn.conn.execute_batch("ROLLBACK");
    }
    tracing::error!(reason = why, "SQLite group commit rolled back");
    Err(why)
}

/// A rusqlite connection as the store core uses it.
pub struct SqliteConn {
    conn: rusqlite::Connection,
    /// Script SQL → SQLite SQL ([`Dialect::render`]), and its result column names.
    rendered: HashMap<String, (String, Arc<[String]>)>,
}

impl SqliteConn {
    fn prepare(
        &mut self,
        sql: &str,
    ) -> Result<(rusqlite::CachedStatement<'_>, Arc<[String]>), StoreError> {
        if !self.rendered.contains_key(sql) {
            let rendered = Dialect::Sqlite.render(sql).into_owned();
            let columns: Arc<[String]> = {
                let stmt = self.conn.prepare_cached(&rendered)?;
                stmt.column_names().iter().map(|c| c.to_string()).collect()
            };
            self.rendered.insert(sql.to_string(), (rendered, columns));
        }
        let (rendered, columns) = &self.rendered[sql];
        let stmt = self.conn.prepare_cached(rendered)?;
        Ok((stmt, columns.clone()))
    }
}

/// An [`Arg`] as SQLite stores it.
struct Bound<'a>(&'a Arg<'a>);

impl ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self.0 {
            Arg::Null(_) => ToSqlOutput::Owned(Value::Null),
            Arg::Int(v) => ToSqlOutput::Owned(Value::Integer(v)),
            Arg::Bool(v) => ToSqlOutput::Owned(Value::Integer(i64::from(v))),
            Arg::Time(t) => ToSqlOutput::Owned(Value::Integer(t.timestamp_micros())),
            Arg::Text(v) | Arg::Json(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            Arg::List(v) => ToSqlOutput::Owned(Value::Text(json_array(v)?)),
            Arg::IntList(v) => ToSqlOutput::Owned(Value::Text(json_array(v)?)),
        })
    }
}

/// A list argument as the JSON array `json_each` reads.
fn json_array<T: serde::Serialize>(v: &[T]) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))
}

fn bind_all(stmt: &mut rusqlite::CachedStatement<'_>, args: &[Arg<'_>]) -> Result<(), StoreError> {
    for (i, a) in args.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, Bound(a))?;
    }
    Ok(())
}

impl Conn for SqliteConn {
    async fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StoreError> {
        let (mut stmt, columns) = self.prepare(sql)?;
        bind_all(&mut stmt, args)?;
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let cells = (0..columns.len())
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Null => Cell::Null,
                        ValueRef::Integer(v) => Cell::Int(v),
                        ValueRef::Real(v) => Cell::Real(v),
                        ValueRef::Text(t) => Cell::Text(
                            std::str::from_utf8(t)
                                .map_err(|_| {
                                    StoreError::corrupt(format!("{}: not UTF-8", columns[i]))
                                })?
                                .to_string(),
                        ),
                        ValueRef::Blob(_) => {
                            return Err(StoreError::corrupt(format!("{}: a blob", columns[i])));
                        }
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            out.push(Row::new(columns.clone(), cells));
        }
        Ok(out)
    }

    async fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let (mut stmt, _) = self.prepare(sql)?;
        bind_all(&mut stmt, args)?;
        Ok(stmt.raw_execute()? as u64)
    }

    async fn snapshot(&mut self) -> Result<(), StoreError> {
        // a script runs inside one transaction on one connection: one snapshot already
        Ok(())
    }

    async fn lock_key(&mut self, _key: &str) -> Result<(), StoreError> {
        // one writer: every write script already runs alone
        Ok(())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        let Some(code) = err.sqlite_error() else {
            return StoreError::Database {
                violation: None,
                source: Box::new(err),
            };
        };
        let extended = code.extended_code;
        match code.code {
            C::DatabaseBusy
            | C::DatabaseLocked
            | C::CannotOpen
            | C::DiskFull
            | C::SystemIoFailure
            | C::OutOfMemory
            | C::FileLockingProtocolFailed => StoreError::Unavailable(Box::new(err) as BoxError),
            C::ConstraintViolation => StoreError::Database {
                violation: match extended {
                    // SQLITE_CONSTRAINT_FOREIGNKEY
                    787 => Some(Violation::ForeignKey),
                    // SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_PRIMARYKEY
                    2067 | 1555 => Some(Violation::Unique),
                    _ => None,
                },
                source: Box::new(err),
            },
            _ => StoreError::Database {
                violation: None,
                source: Box::new(err),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store(dir: &tempfile::TempDir) -> SqliteStore {
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url, &ConnectOptions::default())
            .await
            .unwrap();
        let _: () = store
            .engine
            .write(Box::new(|c: &mut SqliteConn| {
                Box::pin(async move {
                    c.execute("CREATE TABLE t (x INTEGER NOT NULL UNIQUE)", &[])
                        .await
                        .map(drop)
                })
            }))
            .await
            .unwrap();
        store
    }

    /// A script that holds the writer until `release` is sent, so that what the test queues
    /// meanwhile is waiting together when the writer takes its next batch.
    fn hold(
        started: tokio::sync::oneshot::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    ) -> Script<(), SqliteConn> {
        Box::new(move |_| {
            Box::pin(async move {
                let _ = started.send(());
                let _ = release.recv_timeout(Duration::from_secs(30));
                Ok(())
            })
        })
    }

    /// Inserts `x`, then fails when `fail` is set: its insert must not survive.
    fn insert(x: i64, fail: bool) -> Script<i64, SqliteConn> {
        Box::new(move |c: &mut SqliteConn| {
            Box::pin(async move {
                c.execute("INSERT INTO t (x) VALUES ($1)", &[Arg::from(x)])
                    .await?;
                if fail {
                    return Err(StoreError::invalid("told to fail"));
                }
                Ok(x)
            })
        })
    }

    async fn rows(store: &SqliteStore) -> Vec<i64> {
        store
            .engine
            .read(Box::new(|c: &mut SqliteConn| {
                Box::pin(async move {
                    c.query("SELECT x FROM t ORDER BY x", &[])
                        .await?
                        .iter()
                        .map(|r| r.first())
                        .collect()
                })
            }))
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scripts_waiting_together_share_one_commit_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(store(&dir).await);
        let (release, held) = std::sync::mpsc::channel();
        let (started, running) = tokio::sync::oneshot::channel();
        let (before_batches, before_scripts) = store.engine.group_commits();
        let holder = {
            let store = store.clone();
            tokio::spawn(async move { store.engine.write(hold(started, held)).await })
        };
        running.await.unwrap();
        let mut tasks = Vec::new();
        for x in 1..=40 {
            let store = store.clone();
            // every 7th fails after its insert; x = 40 collides with x = 20's value below
            let script = if x == 40 {
                insert(20, false)
            } else {
                insert(x, x % 7 == 0)
            };
            tasks.push(tokio::spawn(
                async move { store.engine.write(script).await },
            ));
        }
        // all forty are queued behind the holder
        while store.engine.queued() < 40 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let mut ok = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let x = i as i64 + 1;
            match t.await.unwrap() {
                Ok(v) => {
                    assert!(x % 7 != 0 && x != 40, "script {x} should have failed");
                    assert_eq!(v, x);
                    ok += 1;
                }
                Err(StoreError::Invalid { .. }) => assert_eq!(x % 7, 0),
                Err(StoreError::Database { violation, .. }) => {
                    assert_eq!(x, 40);
                    assert_eq!(violation, Some(Violation::Unique));
                }
                Err(other) => panic!("script {x}: unexpected {other}"),
            }
        }
        let expected: Vec<i64> = (1..40).filter(|x| x % 7 != 0).collect();
        assert_eq!(ok, expected.len());
        assert_eq!(rows(&store).await, expected);
        let (batches, scripts) = store.engine.group_commits();
        assert_eq!(scripts - before_scripts, 41);
        // the holder's batch, then the forty together
        assert_eq!(
            batches - before_batches,
            2,
            "the queued scripts shared one commit"
        );
    }

    #[tokio::test]
    async fn a_panicking_script_is_an_error_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let boom: Script<(), SqliteConn> = Box::new(|c: &mut SqliteConn| {
            Box::pin(async move {
                c.execute("INSERT INTO t (x) VALUES (99)", &[]).await?;
                panic!("a bug in a script");
            })
        });
        let err = store.engine.write(boom).await.unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(store.engine.write(insert(1, false)).await.unwrap(), 1);
        assert_eq!(rows(&store).await, vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_script_queued_past_its_deadline_never_runs() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let opts = ConnectOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_millis(100),
        };
        let store = Arc::new(SqliteStore::connect(&url, &opts).await.unwrap());
        store
            .engine
            .write(Box::new(|c: &mut SqliteConn| {
                Box::pin(async move {
                    c.execute("CREATE TABLE t (x INTEGER NOT NULL UNIQUE)", &[])
                        .await
                        .map(drop)
                })
            }))
            .await
            .unwrap();
        let (release, held) = std::sync::mpsc::channel();
        let (started, running) = tokio::sync::oneshot::channel();
        let holder = {
            let store = store.clone();
            tokio::spawn(async move { store.engine.write(hold(started, held)).await })
        };
        running.await.unwrap();
        let late = {
            let store = store.clone();
            tokio::spawn(async move { store.engine.write(insert(5, false)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        release.send(()).unwrap();
        holder.await.unwrap().unwrap();
        let err = late.await.unwrap().unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(rows(&store).await.is_empty(), "the late script did not run");
    }

    #[tokio::test]
    async fn closing_answers_queued_work_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        assert_eq!(store.engine.write(insert(1, false)).await.unwrap(), 1);
        store.engine.close().await;
        assert!(
            store
                .engine
                .write(insert(2, false))
                .await
                .unwrap_err()
                .is_unavailable()
        );
        assert!(store.engine.ping().await.unwrap_err().is_unavailable());
    }
}
