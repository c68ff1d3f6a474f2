//! The store handle both SQL backends share: a connection pool and, for a
//! SQLite store a process serves, its lock. Its behaviour is written once in
//! `sql.rs`; what each backend supplies is the [`crate::storage::dialect::Dialect`]
//! trait. Kept apart from both so that neither imports the other back.

use sqlx::{Database, Pool};

/// Store on a SQL database `DB` (see [`crate::storage::PgStore`] and
/// [`crate::storage::SqliteStore`]).
pub struct SqlStore<DB: Database> {
    /// The connection pool (on Postgres, connections that have all run
    /// `SET ROLE picket_app`).
    pub(crate) pool: Pool<DB>,
    /// The serving lock of a SQLite store (one process per file, see
    /// `storage/lock.rs`), held as long as any clone of the store.
    pub(crate) lock: Option<std::sync::Arc<crate::storage::lock::StoreLock>>,
    /// Stops the SQLite store's WAL checkpoint task (`sqlite.rs`) when the
    /// last clone of the store is dropped; `None` on Postgres and for an
    /// in-memory SQLite store.
    pub(crate) maintenance: Option<std::sync::Arc<tokio_util::sync::DropGuard>>,
    /// When a SQLite store's planner statistics last changed (see
    /// `sqlite.rs`); `None` on Postgres.
    pub(crate) stats_epoch: Option<std::sync::Arc<crate::storage::sqlite::StatsEpoch>>,
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            lock: self.lock.clone(),
            maintenance: self.maintenance.clone(),
            stats_epoch: self.stats_epoch.clone(),
        }
    }
}

impl<DB: Database> SqlStore<DB> {
    /// The pool (for the conformance suite's checks and for benchmarks).
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}
