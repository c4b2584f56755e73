//! What the store core needs of a database connection, and nothing more: run one statement with
//! positional arguments, get rows of plain values back, and take the few locks whose form
//! differs between engines. The transaction scripts (`scripts/`) are written once over [`Conn`];
//! `postgres.rs` and `sqlite.rs` implement it.
//!
//! SQL in the scripts is written once, with `$1…$n` placeholders and a handful of `{marker}`s
//! that each dialect renders ([`Dialect::render`]): row locks exist only on PostgreSQL (SQLite's
//! single writer already serializes every write transaction), PostgreSQL needs a cast to store
//! text in a `jsonb` column, and a list argument is an array on PostgreSQL and a JSON array on
//! SQLite.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::StoreError;

/// The SQL dialects the store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Sqlite,
}

/// `{marker}` → (PostgreSQL, SQLite).
const MARKERS: &[(&str, &str, &str)] = &[
    // row locks: SQLite's write transactions are serialized by its single writer
    ("{for_update}", " FOR UPDATE", ""),
    ("{for_no_key_update}", " FOR NO KEY UPDATE", ""),
    ("{for_update_skip_locked}", " FOR UPDATE SKIP LOCKED", ""),
    // text into a jsonb column (SQLite keeps JSON as TEXT)
    ("{jsonb}", "::jsonb", ""),
    // a jsonb column read back as text
    ("{as_text}", "::text", ""),
    // a list argument ([`Arg::List`]): `x {in_list} $1`
    ("{in_list}", "= ANY(", "IN (SELECT value FROM json_each("),
    ("{end_list}", ")", "))"),
];

impl Dialect {
    /// `sql` as this dialect runs it: markers rendered; on SQLite `$n` becomes `?n` (SQLite
    /// numbers `$name` parameters by first appearance, not by their digits).
    pub(crate) fn render<'a>(self, sql: &'a str) -> Cow<'a, str> {
        let needs_markers = sql.contains('{');
        let needs_numbers = self == Dialect::Sqlite && sql.contains('$');
        if !needs_markers && !needs_numbers {
            return Cow::Borrowed(sql);
        }
        let mut out = sql.to_string();
        if needs_markers {
            for (marker, pg, lite) in MARKERS {
                if out.contains(marker) {
                    out = out.replace(marker, if self == Dialect::Postgres { pg } else { lite });
                }
            }
        }
        if needs_numbers {
            out = number_placeholders(&out);
        }
        Cow::Owned(out)
    }
}

/// `$n` → `?n`; a `$` not followed by a digit (a JSON path, say) is left alone.
fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// One statement argument. Times are TIMESTAMPTZ on PostgreSQL and integer microseconds on
/// SQLite (so comparisons stay numeric); booleans are 0/1 on SQLite. (No `Debug`: an argument
/// may be a PVV, a PAN token or a key block.)
#[derive(Clone, Copy)]
pub(crate) enum Arg<'a> {
    /// NULL, typed (PostgreSQL checks parameter types against their columns).
    Null(Kind),
    Int(i64),
    Text(&'a str),
    Bool(bool),
    Time(DateTime<Utc>),
    /// A list for `{in_list} $n {end_list}`: `text[]` on PostgreSQL, a JSON array on SQLite.
    List(&'a [String]),
    /// A list of integers, likewise.
    IntList(&'a [i64]),
    /// JSON text (use `{jsonb}` after the placeholder when the column is `jsonb`).
    Json(&'a str),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}
impl From<i32> for Arg<'_> {
    fn from(v: i32) -> Self {
        Arg::Int(i64::from(v))
    }
}
impl From<u32> for Arg<'_> {
    fn from(v: u32) -> Self {
        Arg::Int(i64::from(v))
    }
}
impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}
impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}
impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(v)
    }
}
impl From<DateTime<Utc>> for Arg<'_> {
    fn from(v: DateTime<Utc>) -> Self {
        Arg::Time(v)
    }
}
impl<'a> From<&'a [String]> for Arg<'a> {
    fn from(v: &'a [String]) -> Self {
        Arg::List(v)
    }
}
/// The type of a NULL argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Int,
    Text,
    Bool,
    Time,
}

macro_rules! optional_arg {
    ($($t:ty => $kind:ident),* $(,)?) => {$(
        impl<'a> From<Option<$t>> for Arg<'a> {
            fn from(v: Option<$t>) -> Self {
                v.map_or(Arg::Null(Kind::$kind), Into::into)
            }
        }
    )*};
}
optional_arg!(i64 => Int, i32 => Int, u32 => Int, bool => Bool, &'a str => Text,
    &'a String => Text, DateTime<Utc> => Time);

/// One value of a result row, as the engine returned it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bool(bool),
    Time(DateTime<Utc>),
    /// A stored value the engine could not decode (a timestamp no clock can hold, say). It is
    /// an error only for the one who reads this column, so a caller can still pick the rest of
    /// the row apart (the SAF lease dead-letters such advices instead of failing).
    Unreadable(String),
}

/// A result row: the statement's column names (shared by its rows) and this row's values.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    columns: Arc<[String]>,
    cells: Vec<Cell>,
}

impl Row {
    pub(crate) fn new(columns: Arc<[String]>, cells: Vec<Cell>) -> Self {
        Self { columns, cells }
    }

    fn cell(&self, col: &str) -> Result<&Cell, StoreError> {
        self.columns
            .iter()
            .position(|c| c == col)
            .and_then(|i| self.cells.get(i))
            .ok_or_else(|| StoreError::corrupt(format!("{col}: no such column in the result")))
    }

    /// The value of column `col` as `T`; a NULL or a value of another kind is `Corrupt`.
    pub(crate) fn try_get<T: FromCell>(&self, col: &str) -> Result<T, StoreError> {
        let cell = self.cell(col)?;
        if let Cell::Unreadable(why) = cell {
            return Err(StoreError::corrupt(format!("{col}: {why}")));
        }
        T::from_cell(cell).ok_or_else(|| StoreError::corrupt(col.to_string()))
    }

    /// The columns named `<prefix><name>`, as a row of `<name>`s (one table's part of a row
    /// that joins several); `None` when the part's `<prefix>id` is NULL (no such row joined).
    pub(crate) fn part(&self, prefix: &str) -> Option<Row> {
        let mut columns = Vec::new();
        let mut cells = Vec::new();
        for (name, cell) in self.columns.iter().zip(&self.cells) {
            if let Some(rest) = name.strip_prefix(prefix) {
                if rest == "id" && *cell == Cell::Null {
                    return None;
                }
                columns.push(rest.to_string());
                cells.push(cell.clone());
            }
        }
        (!columns.is_empty()).then(|| Row::new(Arc::from(columns), cells))
    }

    /// The first column (scalar queries).
    pub(crate) fn first<T: FromCell>(&self) -> Result<T, StoreError> {
        let cell = self
            .cells
            .first()
            .ok_or_else(|| StoreError::corrupt("empty result row"))?;
        T::from_cell(cell)
            .ok_or_else(|| StoreError::corrupt(self.columns.first().cloned().unwrap_or_default()))
    }
}

/// A Rust value read from a [`Cell`].
pub(crate) trait FromCell: Sized {
    fn from_cell(cell: &Cell) -> Option<Self>;
}

impl FromCell for i64 {
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Int(v) => Some(*v),
            _ => None,
        }
    }
}
impl FromCell for i32 {
    fn from_cell(cell: &Cell) -> Option<Self> {
        i64::from_cell(cell).and_then(|v| i32::try_from(v).ok())
    }
}
impl FromCell for f64 {
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Real(v) => Some(*v),
            // SQLite hands back whole-number aggregates as integers
            Cell::Int(v) => Some(*v as f64),
            _ => None,
        }
    }
}
impl FromCell for bool {
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Bool(v) => Some(*v),
            Cell::Int(0) => Some(false),
            Cell::Int(1) => Some(true),
            _ => None,
        }
    }
}
impl FromCell for String {
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Text(v) => Some(v.clone()),
            _ => None,
        }
    }
}
impl FromCell for DateTime<Utc> {
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Time(t) => Some(*t),
            Cell::Int(us) => DateTime::from_timestamp_micros(*us),
            _ => None,
        }
    }
}
impl<T: FromCell> FromCell for Option<T> {
    fn from_cell(cell: &Cell) -> Option<Self> {
        match cell {
            Cell::Null => Some(None),
            other => T::from_cell(other).map(Some),
        }
    }
}

/// Why a statement failed, when the caller may want to answer it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A foreign key pointed at nothing.
    ForeignKey,
    /// A unique or primary key would have been duplicated.
    Unique,
}

/// One write of a guarded posting ([`Conn::apply_all`]): an `INSERT … SELECT … WHERE …` or an
/// `UPDATE … WHERE …` whose `WHERE` repeats what the decision was based on, so that it changes no
/// row when that is no longer true. `{after}` marks where the step waits for the step before it
/// (see `apply_all`); put it at the end of the step's `WHERE`. (No `Debug`: its arguments may
/// hold a PVV.)
pub(crate) struct Step<'a> {
    pub(crate) sql: &'static str,
    pub(crate) args: Vec<Arg<'a>>,
    /// Whether the posting is stale when this step changes no row. Steps that may legitimately
    /// change nothing (an advice already queued under its key) come last.
    pub(crate) required: bool,
    /// An integer column of the row this step changed, as it is after the change: later steps
    /// of the posting use it as `{yielded}`, and `apply_all` returns it. At most one step of a
    /// posting yields.
    pub(crate) yields: Option<&'static str>,
}

/// A connection inside one transaction (or, for reads, outside any). Implemented by each engine.
pub(crate) trait Conn: Send {
    /// Runs one statement and returns every row it produced.
    fn query(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<Vec<Row>, StoreError>> + Send;

    /// Runs one statement and returns how many rows it changed.
    fn execute(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Serializes the rest of this transaction with every other transaction that locks the same
    /// `key` (PostgreSQL: a transaction-scoped advisory lock; SQLite: nothing to do, its write
    /// transactions are already serialized).
    fn lock_key(&mut self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes the rest of this script read one snapshot (PostgreSQL: REPEATABLE READ, READ
    /// ONLY; must come first in the script. SQLite: a script already reads one snapshot).
    fn snapshot(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Applies the steps of one guarded posting all together or not at all: [`StoreError::Stale`]
    /// (and nothing changed) when a `required` step changes no row, because what the posting
    /// was decided on has changed since it was read. This default runs the steps one by one
    /// under a savepoint (SQLite: the writer runs whole scripts, a statement is no round trip);
    /// PostgreSQL overrides it with one statement, so a posting costs one round trip.
    fn apply_all(
        &mut self,
        steps: &[Step<'_>],
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send {
        async move {
            self.execute("SAVEPOINT guarded_posting", &[]).await?;
            let mut yielded = None;
            let mut outcome = Ok(());
            for step in steps {
                match self.apply_step(step, &mut yielded).await {
                    Ok(0) if step.required => {
                        outcome = Err(StoreError::Stale);
                        break;
                    }
                    Ok(_) => {}
                    Err(err) => {
                        outcome = Err(err);
                        break;
                    }
                }
            }
            if outcome.is_err() {
                self.execute("ROLLBACK TO guarded_posting", &[]).await?;
            }
            self.execute("RELEASE guarded_posting", &[]).await?;
            outcome.map(|()| yielded)
        }
    }

    /// One step of the default [`Conn::apply_all`]: `{yielded}` bound as one more argument,
    /// and the yielded column read back with `RETURNING`. Returns the rows changed.
    fn apply_step(
        &mut self,
        step: &Step<'_>,
        yielded: &mut Option<i64>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move {
            let mut sql = step.sql.replace("{after}", "");
            let mut args = step.args.clone();
            if sql.contains("{yielded}") {
                let value = yielded.ok_or_else(|| {
                    StoreError::corrupt("a posting step uses {yielded} before a step yields")
                })?;
                sql = sql.replace("{yielded}", &format!("${}", args.len() + 1));
                args.push(Arg::Int(value));
            }
            match step.yields {
                None => self.execute(&sql, &args).await,
                Some(column) => {
                    let rows = self
                        .query(&format!("{sql} RETURNING {column}"), &args)
                        .await?;
                    if let Some(row) = rows.first() {
                        *yielded = Some(row.first()?);
                    }
                    Ok(rows.len() as u64)
                }
            }
        }
    }

    /// Runs one step on its own (outside a posting) and returns how many rows it changed.
    fn execute_step(
        &mut self,
        step: &Step<'_>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move {
            self.execute(&step.sql.replace("{after}", ""), &step.args)
                .await
        }
    }

    /// Runs the write `step`, then the query `sql` with its own `args`, and says whether the
    /// step changed a row. PostgreSQL overrides it
    /// with one statement (one round trip; the query sees the data as before the step).
    fn query_after(
        &mut self,
        step: &Step<'_>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<(bool, Vec<Row>), StoreError>> + Send {
        async move {
            let changed = self.execute_step(step).await?;
            let rows = self.query(sql, args).await?;
            Ok((changed > 0, rows))
        }
    }

    /// The first row, if any.
    fn query_opt(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<Option<Row>, StoreError>> + Send {
        async move { Ok(self.query(sql, args).await?.into_iter().next()) }
    }

    /// Exactly one row (a missing one is `Corrupt`: the scripts only ask this where a row must
    /// exist).
    fn query_one(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<Row, StoreError>> + Send {
        async move {
            self.query_opt(sql, args)
                .await?
                .ok_or_else(|| StoreError::corrupt("a row the statement must return"))
        }
    }

    /// The first column of the first row, if any.
    fn scalar_opt<T: FromCell + Send>(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<Option<T>, StoreError>> + Send {
        async move {
            match self.query_opt(sql, args).await? {
                Some(row) => Ok(Some(row.first()?)),
                None => Ok(None),
            }
        }
    }

    /// The first column of the one row.
    fn scalar<T: FromCell + Send>(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<T, StoreError>> + Send {
        async move { self.query_one(sql, args).await?.first() }
    }
}

/// The steps of a guarded posting as one PostgreSQL statement: each step a data-modifying CTE
/// returning a row per row it changed, each waiting for the one before it (`{after}`: so every
/// posting takes its row locks in the same order, and a step after a stale one changes nothing),
/// and a final `SELECT` that raises `SYSTL` (see the `guarded_posts` migration) unless every
/// required step changed a row, which undoes the whole statement. A yielding step returns its
/// column and later steps read it as `(SELECT column FROM sN)`; the final row carries it as
/// `yielded`. Placeholders are renumbered into one list; the arguments are the steps' in order.
pub(crate) fn guarded_statement(steps: &[Step<'_>]) -> String {
    let mut sql = String::from("WITH ");
    let mut offset = 0;
    let mut checks = Vec::new();
    let mut yielded: Option<String> = None;
    for (i, step) in steps.iter().enumerate() {
        let after = if i == 0 {
            String::new()
        } else {
            format!(" AND EXISTS (SELECT 1 FROM s{})", i - 1)
        };
        let mut body = shift_placeholders(&step.sql.replace("{after}", &after), offset);
        if let Some(value) = &yielded {
            body = body.replace("{yielded}", value);
        }
        if i > 0 {
            sql.push_str(", ");
        }
        let returning = step.yields.unwrap_or("1");
        sql.push_str(&format!("s{i} AS ({body} RETURNING {returning})"));
        if let Some(column) = step.yields {
            yielded = Some(format!("(SELECT {column} FROM s{i})"));
        }
        if step.required {
            checks.push(format!("EXISTS (SELECT 1 FROM s{i})"));
        }
        offset += step.args.len();
    }
    if checks.is_empty() {
        checks.push("TRUE".into());
    }
    sql.push_str(&format!(
        " SELECT switchyard_require({}) AS ok, {} AS yielded",
        checks.join(" AND "),
        yielded.as_deref().unwrap_or("NULL::BIGINT")
    ));
    sql
}

/// [`Conn::query_after`] as one PostgreSQL statement: the step as a data-modifying CTE, the
/// query as a subquery, and a last column `step_done`. The query's `$n` follow the step's.
///
/// The statement commits without waiting for its WAL to reach the disk
/// (`synchronous_commit = off` for this one transaction): the steps run this way are
/// reservations (a PIN try, a station's share of its ceiling) that only matter together with the
/// posting that follows them, and that posting's commit is durable and comes later in the WAL,
/// so flushing it flushes the reservation too. A crash in between loses at most a reservation
/// whose request was never answered. It spares every request one disk flush, and a station's
/// advices no longer queue behind each other's flushes on the station's row.
pub(crate) fn step_then_query(step: &Step<'_>, sql: &str) -> String {
    format!(
        "WITH w AS ({} RETURNING 1) SELECT q.*, EXISTS (SELECT 1 FROM w) AS step_done, \
         set_config('synchronous_commit', 'off', true) AS commit_mode FROM ({}) AS q",
        step.sql.replace("{after}", ""),
        shift_placeholders(sql, step.args.len())
    )
}

/// `$n` → `$(n + offset)`.
fn shift_placeholders(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            let mut n = 0usize;
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n * 10 + d as usize;
                chars.next();
            }
            out.push_str(&format!("${}", n + offset));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_steps_become_one_statement_in_order() {
        let steps = [
            Step {
                sql: "INSERT INTO t (a, b) SELECT $1, $2 WHERE TRUE{after} ON CONFLICT (a) DO NOTHING",
                args: vec![Arg::Int(1), Arg::Int(2)],
                required: true,
                yields: None,
            },
            Step {
                sql: "UPDATE u SET x = $2 WHERE id = $1 AND x = $3{after}",
                args: vec![Arg::Int(1), Arg::Int(2), Arg::Int(3)],
                required: true,
                yields: None,
            },
            Step {
                sql: "INSERT INTO v (k) SELECT $1 WHERE TRUE{after} ON CONFLICT (k) DO NOTHING",
                args: vec![Arg::Int(9)],
                required: false,
                yields: None,
            },
        ];
        assert_eq!(
            guarded_statement(&steps),
            "WITH s0 AS (INSERT INTO t (a, b) SELECT $1, $2 WHERE TRUE ON CONFLICT (a) DO NOTHING \
             RETURNING 1), s1 AS (UPDATE u SET x = $4 WHERE id = $3 AND x = $5 AND EXISTS \
             (SELECT 1 FROM s0) RETURNING 1), s2 AS (INSERT INTO v (k) SELECT $6 WHERE TRUE AND \
             EXISTS (SELECT 1 FROM s1) ON CONFLICT (k) DO NOTHING RETURNING 1) SELECT \
             switchyard_require(EXISTS (SELECT 1 FROM s0) AND EXISTS (SELECT 1 FROM s1)) AS ok, \
             NULL::BIGINT AS yielded"
        );
    }

    #[test]
    fn a_yielded_column_feeds_the_later_steps_and_the_final_row() {
        let steps = [
            Step {
                sql: "UPDATE u SET x = x - $2 WHERE id = $1{after}",
                args: vec![Arg::Int(1), Arg::Int(2)],
                required: true,
                yields: Some("x"),
            },
            Step {
                sql: "INSERT INTO j (k, x) SELECT $1, {yielded} WHERE TRUE{after}",
                args: vec![Arg::Int(3)],
                required: true,
                yields: None,
            },
        ];
        assert_eq!(
            guarded_statement(&steps),
            "WITH s0 AS (UPDATE u SET x = x - $2 WHERE id = $1 RETURNING x), s1 AS (INSERT INTO j \
             (k, x) SELECT $3, (SELECT x FROM s0) WHERE TRUE AND EXISTS (SELECT 1 FROM s0) \
             RETURNING 1) SELECT switchyard_require(EXISTS (SELECT 1 FROM s0) AND EXISTS (SELECT \
             1 FROM s1)) AS ok, (SELECT x FROM s0) AS yielded"
        );
    }

    #[test]
    fn sqlite_numbers_placeholders_by_their_digits_and_drops_row_locks() {
        let sql = "SELECT a FROM t WHERE b = $2 AND c = $1{for_no_key_update}";
        assert_eq!(
            Dialect::Sqlite.render(sql),
            "SELECT a FROM t WHERE b = ?2 AND c = ?1"
        );
        assert_eq!(
            Dialect::Postgres.render(sql),
            "SELECT a FROM t WHERE b = $2 AND c = $1 FOR NO KEY UPDATE"
        );
    }

    #[test]
    fn list_arguments_render_per_dialect() {
        let sql = "SELECT id FROM t WHERE id {in_list}$1{end_list}";
        assert_eq!(
            Dialect::Postgres.render(sql),
            "SELECT id FROM t WHERE id = ANY($1)"
        );
        assert_eq!(
            Dialect::Sqlite.render(sql),
            "SELECT id FROM t WHERE id IN (SELECT value FROM json_each(?1))"
        );
    }

    #[test]
    fn plain_sql_is_not_copied() {
        assert!(matches!(
            Dialect::Postgres.render("SELECT 1"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn cells_convert_only_to_what_they_hold() {
        let row = Row::new(
            Arc::from(vec!["n".to_string(), "t".to_string(), "z".to_string()]),
            vec![Cell::Int(7), Cell::Text("x".into()), Cell::Null],
        );
        assert_eq!(row.try_get::<i64>("n").unwrap(), 7);
        assert_eq!(row.try_get::<Option<String>>("z").unwrap(), None);
        assert!(row.try_get::<String>("n").is_err());
        assert!(row.try_get::<i64>("z").is_err());
        assert!(row.try_get::<i64>("missing").is_err());
        let t = DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let row = Row::new(
            Arc::from(vec!["at".to_string()]),
            vec![Cell::Int(t.timestamp_micros())],
        );
        assert_eq!(row.try_get::<DateTime<Utc>>("at").unwrap(), t);
        assert!(bool::from_cell(&Cell::Int(2)).is_none());
    }
}
