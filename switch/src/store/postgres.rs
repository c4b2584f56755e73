//! PostgreSQL engine: the shared store of many switch replicas and SAF drainers.
//!
//! Each write script runs in its own READ COMMITTED transaction on a pooled connection; the
//! scripts lock exactly what a decision depends on (`{for_no_key_update}` and friends render as
//! row locks here, [`Conn::lock_key`] is a transaction-scoped advisory lock). Lock order is always
//! identity → journal row → account and terminal → keys, so the scripts cannot deadlock each
//! other.
//!
//! Everything here is about the engine: binding [`Arg`]s, decoding rows into [`Cell`]s, pool and
//! migrations. No rule of the switch lives in this file.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, PgValueFormat,
};
use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Column, Postgres, Row as _, TypeInfo, ValueRef};

use super::engine::{CoreStore, Engine, Script};
use super::sql::{Arg, Cell, Conn, Dialect, Kind, Row, Step, guarded_statement, step_then_query};
use super::{
    Backend, ConnectOptions, MigrationStatus, POSTGRES_MIGRATIONS, PoolStats, StoreError,
    build_migrator, migration_status_from, redact_url,
};

/// The PostgreSQL store.
pub type PostgresStore = CoreStore<PgEngine>;

/// A PostgreSQL connection pool. `Debug` shows the URL with its password replaced by `***`.
pub struct PgEngine {
    pool: PgPool,
    url: String,
}

impl fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://…` or `postgresql://…`; `options=-c search_path=…` picks a
    /// schema).
    pub async fn connect(url: &str, opts: &ConnectOptions) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(|_| StoreError::Config {
            what: "invalid postgres URL; expected postgres://USER@HOST:PORT/DATABASE".into(),
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            // lazy: a switch whose database is down starts anyway and reports not-ready
            // (SPEC §2) instead of crash-looping; the first statement connects
            .connect_lazy_with(options);
        Ok(CoreStore {
            engine: PgEngine {
                pool,
                url: redact_url(url),
            },
        })
    }
}

impl Engine for PgEngine {
    type Conn = PgConnection;

    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn write<T: Send + 'static>(
        &self,
        script: Script<T, PgConnection>,
    ) -> Result<T, StoreError> {
        let mut tx = self.pool.begin().await?;
        match script(&mut tx).await {
            Ok(v) => {
                tx.commit().await?;
                Ok(v)
            }
            Err(err) => {
                // explicit: a dropped transaction is only rolled back when its connection is
                // next used, and until then its locks would hold up others
                let _ = tx.rollback().await;
                Err(err)
            }
        }
    }

    async fn autocommit<T: Send + 'static>(
        &self,
        script: Script<T, PgConnection>,
    ) -> Result<T, StoreError> {
        // synchronous_commit=on: each statement's implicit commit is durable before it answers
        let mut conn = self.pool.acquire().await?;
        script(&mut conn).await
    }

    async fn read<T: Send + 'static>(
        &self,
        script: Script<T, PgConnection>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.acquire().await?;
        script(&mut conn).await
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        build_migrator(POSTGRES_MIGRATIONS).run(&self.pool).await?;
        Ok(())
    }

    async fn migration_status(&self) -> Result<MigrationStatus, StoreError> {
        // to_regclass follows search_path, so a per-schema deployment sees its own table
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        let applied: Vec<i64> = if exists {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(migration_status_from(&applied, POSTGRES_MIGRATIONS))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats {
            size: self.pool.size(),
            idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
        }
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// Binds one argument. NULLs are typed, since PostgreSQL checks a parameter's type against its
/// column.
fn bind<'q>(
    q: Query<'q, Postgres, PgArguments>,
    arg: &Arg<'q>,
) -> Query<'q, Postgres, PgArguments> {
    match *arg {
        Arg::Null(Kind::Int) => q.bind(None::<i64>),
        Arg::Null(Kind::Text) => q.bind(None::<&str>),
        Arg::Null(Kind::Bool) => q.bind(None::<bool>),
        Arg::Null(Kind::Time) => q.bind(None::<DateTime<Utc>>),
        Arg::Int(v) => q.bind(v),
        Arg::Text(v) | Arg::Json(v) => q.bind(v),
        Arg::Bool(v) => q.bind(v),
        Arg::Time(v) => q.bind(v),
        Arg::List(v) => q.bind(v),
        Arg::IntList(v) => q.bind(v),
    }
}

/// 2000-01-01T00:00:00Z, PostgreSQL's timestamp epoch, in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// One column of a row as a [`Cell`], by its PostgreSQL type.
fn cell(row: &PgRow, i: usize) -> Result<Cell, StoreError> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Cell::Null);
    }
    let type_name = raw.type_info().name().to_string();
    Ok(match type_name.as_str() {
        "INT8" => Cell::Int(row.try_get::<i64, _>(i)?),
        "INT4" => Cell::Int(i64::from(row.try_get::<i32, _>(i)?)),
        "INT2" => Cell::Int(i64::from(row.try_get::<i16, _>(i)?)),
        "FLOAT8" => Cell::Real(row.try_get::<f64, _>(i)?),
        "FLOAT4" => Cell::Real(f64::from(row.try_get::<f32, _>(i)?)),
        "BOOL" => Cell::Bool(row.try_get::<bool, _>(i)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => Cell::Text(row.try_get::<String, _>(i)?),
        "TIMESTAMPTZ" => match timestamptz(row, i) {
            Ok(t) => Cell::Time(t),
            Err(_) => Cell::Unreadable("out of range".into()),
        },
        other => {
            return Err(StoreError::corrupt(format!(
                "column {}: type {other} is not read by the store (cast it in the query)",
                row.columns()[i].name()
            )));
        }
    })
}

/// A TIMESTAMPTZ column. sqlx's chrono decoding adds the stored offset with `+`, which panics
/// for a value chrono cannot hold (`'infinity'`, the year 200000) — a stored value must never
/// panic the switch (a drainer leasing such a row would die): the microseconds are read as
/// they are stored (binary protocol: microseconds since 2000-01-01) and added checked.
fn timestamptz(row: &PgRow, i: usize) -> Result<DateTime<Utc>, StoreError> {
    let raw = row.try_get_raw(i)?;
    if raw.format() != PgValueFormat::Binary {
        // a text-protocol read: sqlx's own checks and decoding
        return Ok(row.try_get(i)?);
    }
    let micros: i64 = row.try_get_unchecked(i)?;
    micros
        .checked_add(PG_EPOCH_MICROS)
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| StoreError::corrupt(format!("{}: out of range", row.columns()[i].name())))
}

fn to_rows(rows: Vec<PgRow>) -> Result<Vec<Row>, StoreError> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let columns: Arc<[String]> = first
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    rows.iter()
        .map(|r| {
            let cells = (0..columns.len())
                .map(|i| cell(r, i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Row::new(columns.clone(), cells))
        })
        .collect()
}

impl Conn for PgConnection {
    async fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StoreError> {
        let sql = Dialect::Postgres.render(sql);
        let mut q = sqlx::query(AssertSqlSafe(sql.as_ref()));
        for a in args {
            q = bind(q, a);
        }
        to_rows(q.fetch_all(&mut *self).await?)
    }

    async fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let sql = Dialect::Postgres.render(sql);
        let mut q = sqlx::query(AssertSqlSafe(sql.as_ref()));
        for a in args {
            q = bind(q, a);
        }
        Ok(q.execute(&mut *self).await?.rows_affected())
    }

    async fn apply_all(&mut self, steps: &[Step<'_>]) -> Result<Option<i64>, StoreError> {
        // one statement: one round trip, and atomic without a transaction around it
        let sql = guarded_statement(steps);
        let args: Vec<Arg<'_>> = steps.iter().flat_map(|s| s.args.iter().copied()).collect();
        match self.query_one(&sql, &args).await {
            // a deadlock between two postings of one card is resolved by retrying the loser
            Err(StoreError::Unavailable(err))
                if err
                    .downcast_ref::<sqlx::Error>()
                    .and_then(|e| e.as_database_error())
                    .and_then(|db| db.code())
                    .is_some_and(|c| c == "40P01" || c == "40001") =>
            {
                Err(StoreError::Stale)
            }
            other => other?.try_get("yielded"),
        }
    }

    async fn query_after(
        &mut self,
        step: &Step<'_>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<(bool, Vec<Row>), StoreError> {
        let combined = step_then_query(step, sql);
        let all: Vec<Arg<'_>> = step.args.iter().chain(args).copied().collect();
        let rows = self.query(&combined, &all).await?;
        let done = match rows.first() {
            Some(row) => row.try_get::<bool>("step_done")?,
            None => false,
        };
        Ok((done, rows))
    }

    async fn snapshot(&mut self) -> Result<(), StoreError> {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    async fn lock_key(&mut self, key: &str) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(key)
            .execute(&mut *self)
            .await?;
        Ok(())
    }
}
