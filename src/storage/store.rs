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
}

impl<DB: Database> Clone for SqlStore<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            lock: self.lock.clone(),
        }
    }
}

impl<DB: Database> SqlStore<DB> {
    /// The pool (for the conformance suite's checks and for benchmarks).
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }
}
