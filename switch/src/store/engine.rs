//! How a transaction script reaches a database: an [`Engine`] runs a script in a write
//! transaction (committed and durable before its result is returned) or as a read, and the one
//! store type, [`CoreStore`], implements [`Database`](super::Database) once over any engine.
//!
//! The PostgreSQL engine gives each script its own transaction on a pooled connection. The
//! SQLite engine hands scripts to one writer thread that owns the connection and runs every
//! script waiting at that moment in one transaction, a savepoint each (group commit).

use std::fmt;
use std::future::Future;

use futures::future::BoxFuture;

use super::sql::Conn;
use super::{Backend, MigrationStatus, PoolStats, StoreError};

/// A transaction script: a closure over the connection that returns its result. Boxed so an
/// engine can move it to the thread or task that owns the connection.
pub(crate) type Script<T, C> =
    Box<dyn for<'c> FnOnce(&'c mut C) -> BoxFuture<'c, Result<T, StoreError>> + Send>;

/// A database engine the store core runs its scripts on.
pub(crate) trait Engine: Send + Sync + fmt::Debug + 'static {
    /// The connection scripts get.
    type Conn: Conn;

    /// Which engine this is.
    fn backend(&self) -> Backend;

    /// Runs `script` in one write transaction: on `Ok` it is committed (durably) before the
    /// result is returned, on `Err` nothing it did remains.
    fn write<T: Send + 'static>(
        &self,
        script: Script<T, Self::Conn>,
    ) -> impl Future<Output = Result<T, StoreError>> + Send;

    /// Runs a script whose statements are each atomic on their own (single-statement writes),
    /// durably: PostgreSQL runs them outside a transaction (no BEGIN/COMMIT round trips),
    /// SQLite on the writer like any write.
    fn autocommit<T: Send + 'static>(
        &self,
        script: Script<T, Self::Conn>,
    ) -> impl Future<Output = Result<T, StoreError>> + Send;

    /// Runs a script that only reads, each statement seeing committed data.
    fn read<T: Send + 'static>(
        &self,
        script: Script<T, Self::Conn>,
    ) -> impl Future<Output = Result<T, StoreError>> + Send;

    /// Applies pending migrations.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Applied vs expected migrations; works on an empty database.
    fn migration_status(&self) -> impl Future<Output = Result<MigrationStatus, StoreError>> + Send;

    /// Round trip to the database.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Connection occupancy.
    fn pool_stats(&self) -> PoolStats;

    /// Waits for running scripts, then closes; later calls fail as `Unavailable`.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// The store: every [`Database`](super::Database) method is a script from `scripts/`, run on
/// engine `E`. `Debug` is the engine's (which hides credentials).
pub struct CoreStore<E> {
    pub(crate) engine: E,
}

impl<E: fmt::Debug> fmt::Debug for CoreStore<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.engine.fmt(f)
    }
}

/// `write!(self, |c| script(c, …))`: runs the body, an expression over the connection `c`, as a
/// write script. Everything the body uses must be owned (clone borrowed arguments first).
macro_rules! write_script {
    ($store:expr, |$c:ident| $body:expr) => {
        $store
            .engine
            .write(Box::new(move |$c| Box::pin(async move { $body })))
            .await
    };
}

/// Like `write_script!`, for [`Engine::autocommit`].
macro_rules! autocommit_script {
    ($store:expr, |$c:ident| $body:expr) => {
        $store
            .engine
            .autocommit(Box::new(move |$c| Box::pin(async move { $body })))
            .await
    };
}

/// Like `write_script!`, as a read.
macro_rules! read_script {
    ($store:expr, |$c:ident| $body:expr) => {
        $store
            .engine
            .read(Box::new(move |$c| Box::pin(async move { $body })))
            .await
    };
}

pub(crate) use {autocommit_script, read_script, write_script};
