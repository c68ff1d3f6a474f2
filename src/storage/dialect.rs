//! What a SQL backend must supply so that [`SqlStore`] can run the shared
//! queries on it: the [`Dialect`] trait (implemented on `sqlx::Postgres` in
//! `postgres.rs` and on `sqlx::Sqlite` in `sqlite.rs`) and [`Stmt`], a
//! statement whose SQL text uses `$1..$n` on both backends (sqlx's SQLite
//! driver maps `$N` to argument N, as Postgres does).
//!
//! sqlx's encode/decode bounds are per value type; [`Bind`] and [`Get`] turn
//! them into supertraits of [`Dialect`], so the generic code names one bound
//! (`DB: Dialect`) instead of a list of `T: Encode<DB> + Type<DB>` clauses.

use std::borrow::Cow;
use std::fmt::Write;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::{Arguments, ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, Type};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::alert::Entity;
use crate::domain::event::{FeedPosition, InsertOutcome, NewEvent};
use crate::storage::store::SqlStore;
use crate::storage::{Backend, DroppedDay, Joined, StoreResult};

/// A transaction on `DB`.
pub(crate) type Tx<DB> = sqlx::Transaction<'static, DB>;

/// `DB` can bind a `T` as a statement argument.
pub(crate) trait Bind<T>: Database {
    /// Appends `value` to `args`.
    fn bind(args: &mut Self::Arguments, value: T) -> Result<(), BoxDynError>;
}

impl<DB: Database, T> Bind<T> for DB
where
    T: for<'t> Encode<'t, DB> + Type<DB>,
{
    fn bind(args: &mut Self::Arguments, value: T) -> Result<(), BoxDynError> {
        args.add(value)
    }
}

/// `DB` can decode a `T` from a named column.
pub(crate) trait Get<T>: Database {
    /// The value of column `col` of `row`.
    fn get(row: &Self::Row, col: &str) -> Result<T, sqlx::Error>;
}

impl<DB: Database, T> Get<T> for DB
where
    T: for<'r> Decode<'r, DB> + Type<DB>,
    for<'c> &'c str: ColumnIndex<DB::Row>,
{
    fn get(row: &Self::Row, col: &str) -> Result<T, sqlx::Error> {
        row.try_get(col)
    }
}

/// Reads a column of a row whose database can decode `T` (`row.col("name")?`).
pub(crate) trait Col: Row {
    /// The value of column `name`.
    fn col<T>(&self, name: &str) -> Result<T, sqlx::Error>
    where
        Self::Database: Get<T>;
}

impl<R: Row> Col for R {
    fn col<T>(&self, name: &str) -> Result<T, sqlx::Error>
    where
        R::Database: Get<T>,
    {
        <R::Database as Get<T>>::get(self, name)
    }
}

/// Runs a statement on a connection (`&mut *tx` or `&mut *pool_connection`).
pub(crate) trait Exec: Database {
    /// Executes; returns the driver's result (see [`Dialect::affected`]).
    fn run<'c>(
        sql: Cow<'static, str>,
        args: Self::Arguments,
        conn: &'c mut Self::Connection,
    ) -> BoxFuture<'c, Result<Self::QueryResult, sqlx::Error>>;

    /// All rows.
    fn rows<'c>(
        sql: Cow<'static, str>,
        args: Self::Arguments,
        conn: &'c mut Self::Connection,
    ) -> BoxFuture<'c, Result<Vec<Self::Row>, sqlx::Error>>;

    /// At most the first row.
    fn first<'c>(
        sql: Cow<'static, str>,
        args: Self::Arguments,
        conn: &'c mut Self::Connection,
    ) -> BoxFuture<'c, Result<Option<Self::Row>, sqlx::Error>>;
}

impl<DB: Database> Exec for DB
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
{
    fn run<'c>(
        sql: Cow<'static, str>,
        args: Self::Arguments,
        conn: &'c mut Self::Connection,
    ) -> BoxFuture<'c, Result<Self::QueryResult, sqlx::Error>> {
        conn.execute(sqlx::query_with(sqlx::AssertSqlSafe(sql), args))
    }

    fn rows<'c>(
        sql: Cow<'static, str>,
        args: Self::Arguments,
        conn: &'c mut Self::Connection,
    ) -> BoxFuture<'c, Result<Vec<Self::Row>, sqlx::Error>> {
        conn.fetch_all(sqlx::query_with(sqlx::AssertSqlSafe(sql), args))
    }

    fn first<'c>(
        sql: Cow<'static, str>,
        args: Self::Arguments,
        conn: &'c mut Self::Connection,
    ) -> BoxFuture<'c, Result<Option<Self::Row>, sqlx::Error>> {
        conn.fetch_optional(sqlx::query_with(sqlx::AssertSqlSafe(sql), args))
    }
}

/// A backend's real differences from the shared SQL. Everything else (the
/// table and column names, the statements, the row decoding, the error
/// classification) is written once in [`SqlStore`].
#[async_trait]
pub(crate) trait Dialect:
    Exec
    + Bind<bool>
    + Bind<i16>
    + Bind<i32>
    + Bind<i64>
    + Bind<Option<i64>>
    + Bind<f64>
    + Bind<String>
    + Bind<Option<String>>
    + for<'a> Bind<&'a str>
    + for<'a> Bind<&'a [u8]>
    + Bind<Option<Vec<u8>>>
    + Bind<DateTime<Utc>>
    + Bind<Option<DateTime<Utc>>>
    + Get<bool>
    + Get<i16>
    + Get<i32>
    + Get<i64>
    + Get<Option<i64>>
    + Get<f64>
    + Get<String>
    + Get<Option<String>>
    + Get<Vec<u8>>
    + Get<Option<Vec<u8>>>
    + Get<DateTime<Utc>>
    + Get<Option<DateTime<Utc>>>
{
    /// Which backend this is.
    const BACKEND: Backend;
    /// Appended to a `SELECT` that reads a row it will update in the same
    /// transaction (` FOR UPDATE` on Postgres; SQLite's write transactions
    /// already hold the database lock).
    const FOR_UPDATE: &'static str;
    /// The `FROM` source of an API key looked up by id (`$1`) across tenants.
    const API_KEY_BY_ID: &'static str;
    /// The `FROM` source of a webhook source looked up by name (`$1`) across tenants.
    const SOURCE_BY_NAME: &'static str;
    /// A query returning the `tenant_id` (maybe NULL, maybe no row) of webhook source `$1`.
    const SOURCE_TENANT: &'static str;
    /// Leases runnable playbook runs across tenants: `$1` owner, `$2` lease
    /// end, `$3` now, `$4` limit; returns `tenant_id, id` of the claimed runs.
    const CLAIM_RUNS: &'static str;
    /// Pending playbook runs past their deadline across tenants: `$1` now,
    /// `$2` limit; returns `tenant_id, id`.
    const DUE_RUNS: &'static str;
    /// The `FROM` source of every tenant's decision schedule (`tenant_id,
    /// next_change_at, active, revision, log_floor`), across tenants.
    const DECISION_SCHEDULE: &'static str;
    /// The select-list expression of a feed row's transaction position, read
    /// back by [`Dialect::position`] as column `feed_xid`.
    const FEED_XID: &'static str;
    /// Condition (starting with ` AND`, or empty) keeping only feed rows that
    /// no transaction still in flight can precede.
    const READABLE: &'static str;
    /// The feed's commit order, ascending.
    const FEED_ORDER: &'static str;
    /// The feed's commit order, descending.
    const FEED_ORDER_DESC: &'static str;
    /// Appended to a text column to compare it in byte order (the order of
    /// the resource index): ` COLLATE "C"` on Postgres, nothing on SQLite
    /// (BINARY is already byte order).
    const BYTE_ORDER: &'static str;
    /// Deletes the idempotency keys of tenant `$1`'s events that occurred
    /// before `$2`, where keys live apart from the events (Postgres's
    /// `event_keys`); `None` where the events table holds them.
    const PURGE_KEYS: Option<&'static str>;
    /// Appended to a subquery so the planner plans it on its own instead of
    /// folding it into the query around it: ` OFFSET 0` on Postgres; nothing
    /// on SQLite, whose planner has not needed it.
    const FENCE: &'static str;
    /// Prefix that turns a query into its plan (one text row per line).
    const EXPLAIN: &'static str;
    /// The column of a plan row holding its text.
    const EXPLAIN_COLUMN: &'static str;
    /// The `FROM` source of alerts (alias `a`) joined with each entity of
    /// their `body.entities` (read with [`Dialect::ENTITY`]).
    const ALERT_ENTITIES: &'static str;
    /// The JSON expression of one entity in [`Dialect::ALERT_ENTITIES`].
    const ENTITY: &'static str;

    /// SQL for time expression `col` as integer microseconds since the epoch.
    fn micros(col: &str) -> String;
    /// SQL for the text (or JSON text, for arrays) at `path` of JSON
    /// expression `doc`; NULL where absent. `path` is made of constants.
    fn json_text(doc: &str, path: &[&str]) -> String;

    /// Binds a uuid (or NULL).
    fn add_uuid(q: &mut Stmt<Self>, v: Option<Uuid>);
    /// Binds an event-time column (events, alerts, incidents, change log).
    fn add_time(q: &mut Stmt<Self>, t: DateTime<Utc>);
    /// Binds an event-time value or NULL.
    fn add_opt_time(q: &mut Stmt<Self>, t: Option<DateTime<Utc>>);
    /// Binds a JSON document.
    fn add_doc<T: serde::Serialize + Sync + ?Sized>(q: &mut Stmt<Self>, v: &T);
    /// Appends the condition ` AND (feed position) > after`.
    fn push_after(q: &mut Stmt<Self>, after: FeedPosition);
    /// Appends the condition ` AND (feed position) <= upto`.
    fn push_upto(q: &mut Stmt<Self>, upto: FeedPosition);
    /// Appends the condition ` AND` the JSON array at `path` of column `doc`
    /// holds `entity`.
    fn push_has_entity(q: &mut Stmt<Self>, path: &[&str], entity: &Entity);
    /// Appends ` AND col` is one of `ids` (non-empty): one array parameter
    /// on Postgres (the same statement, planned once, whatever the count),
    /// an `IN` list on SQLite.
    fn push_uuid_in(q: &mut Stmt<Self>, col: &str, ids: &[Uuid]);
    /// [`Dialect::push_uuid_in`] for text values.
    fn push_text_in(q: &mut Stmt<Self>, col: &str, values: &[&str]);

    /// A uuid column (NULL is `None`).
    fn opt_uuid(row: &Self::Row, col: &str) -> Result<Option<Uuid>, sqlx::Error>;
    /// An event-time column.
    fn time(row: &Self::Row, col: &str) -> Result<DateTime<Utc>, sqlx::Error>;
    /// An event-time column that may be NULL.
    fn opt_time(row: &Self::Row, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error>;
    /// A JSON document column.
    fn doc<T: serde::de::DeserializeOwned>(row: &Self::Row, col: &str) -> Result<T, sqlx::Error>;
    /// The feed position of a row selected with `FEED_XID` and `seq`.
    fn position(row: &Self::Row) -> Result<FeedPosition, sqlx::Error>;
    /// Rows an `INSERT`, `UPDATE` or `DELETE` touched.
    fn affected(done: &Self::QueryResult) -> u64;

    /// Begins a transaction for `tenant`'s data (`write`: it will write).
    async fn begin(
        store: &SqlStore<Self>,
        tenant: TenantId,
        write: bool,
    ) -> Result<Tx<Self>, sqlx::Error>;

    /// Begins a read-only transaction of `tenant` whose statements all see
    /// one snapshot (a report reading rollups, their position and the raw
    /// events after it must not see the rollups move between statements).
    async fn begin_snapshot(
        store: &SqlStore<Self>,
        tenant: TenantId,
    ) -> Result<Tx<Self>, sqlx::Error>;

    /// Serializes raises of one alert fingerprint (`key`) within `tx`.
    async fn lock_fingerprint(tx: &mut Tx<Self>, key: String) -> Result<(), sqlx::Error>;

    /// [`Dialect::lock_fingerprint`] for several keys at once (in a fixed
    /// order, so two batches never wait on each other in a cycle).
    async fn lock_fingerprints(tx: &mut Tx<Self>, keys: Vec<String>) -> Result<(), sqlx::Error>;

    /// Writes alert states inside `tx`, in this order: the evidence
    /// snapshots `snaps` (distinct event ids; one already stored is kept),
    /// the final rows `rows` (distinct alerts, inserted or updated; their
    /// documents as [`crate::storage::sql::stored_alert`] gives them), then
    /// one `alerts` change-log entry per `changes` item, in order. One
    /// statement of column arrays on Postgres, whose text is the same for
    /// any number of rows (prepared once per connection, one round trip);
    /// chunks of multi-row statements on SQLite.
    async fn write_alerts(
        tx: &mut Tx<Self>,
        tenant: TenantId,
        snaps: &[(Uuid, &NewEvent)],
        rows: &[&crate::domain::alert::Alert],
        changes: &[(&str, &crate::domain::alert::Alert)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error>;

    /// See [`crate::storage::EventStore::insert_events`].
    async fn insert_events(
        store: &SqlStore<Self>,
        groups: &[(TenantId, &[NewEvent])],
    ) -> StoreResult<Vec<Vec<InsertOutcome>>>;

    /// See [`crate::storage::EventStore::prepare_event_days`] (`first <= last`).
    async fn prepare_event_days(
        store: &SqlStore<Self>,
        first: NaiveDate,
        last: NaiveDate,
    ) -> StoreResult<u32>;

    /// See [`crate::storage::EventStore::drop_event_days`].
    async fn drop_event_days(
        store: &SqlStore<Self>,
        keep: &[(TenantId, Option<DateTime<Utc>>)],
    ) -> StoreResult<Vec<DroppedDay>>;

    /// See [`crate::storage::EventStore::refresh_statistics`].
    async fn refresh_statistics(store: &SqlStore<Self>) -> StoreResult<()>;

    /// See [`crate::storage::Store::join_detection`].
    async fn join_detection(store: &SqlStore<Self>, shards: u32) -> StoreResult<Joined>;
}

/// One SQL statement and its arguments. Static text names its parameters
/// `$1..$n` and binds them in order with [`Stmt::arg`] and friends; a built
/// statement appends text with [`Stmt::push`] and parameters with
/// [`Stmt::push_bind`] and friends, which write the next `$n`.
pub(crate) struct Stmt<DB: Database> {
    /// The SQL text.
    sql: Cow<'static, str>,
    /// The arguments bound so far.
    args: DB::Arguments,
    /// The first argument that failed to encode, reported when the statement runs.
    error: Option<BoxDynError>,
}

impl<DB: Dialect> Stmt<DB> {
    /// A statement with fixed text.
    pub(crate) fn new(sql: &'static str) -> Self {
        Self::with(Cow::Borrowed(sql))
    }

    /// A statement whose text is assembled from the dialect's fragments.
    pub(crate) fn text(sql: String) -> Self {
        Self::with(Cow::Owned(sql))
    }

    fn with(sql: Cow<'static, str>) -> Self {
        Self {
            sql,
            args: DB::Arguments::default(),
            error: None,
        }
    }

    /// Binds the next argument.
    pub(crate) fn add<T>(&mut self, value: T)
    where
        DB: Bind<T>,
    {
        if self.error.is_none()
            && let Err(e) = <DB as Bind<T>>::bind(&mut self.args, value)
        {
            self.error = Some(e);
        }
    }

    /// Records an argument that could not be encoded.
    pub(crate) fn fail(&mut self, e: BoxDynError) {
        self.error.get_or_insert(e);
    }

    /// Binds the next argument.
    pub(crate) fn arg<T>(mut self, value: T) -> Self
    where
        DB: Bind<T>,
    {
        self.add(value);
        self
    }

    /// Binds a uuid.
    pub(crate) fn uuid(self, v: Uuid) -> Self {
        self.opt_uuid(Some(v))
    }

    /// Binds a uuid or NULL.
    pub(crate) fn opt_uuid(mut self, v: Option<Uuid>) -> Self {
        DB::add_uuid(&mut self, v);
        self
    }

    /// Binds an event-time value.
    pub(crate) fn time(mut self, t: DateTime<Utc>) -> Self {
        DB::add_time(&mut self, t);
        self
    }

    /// Binds an event-time value or NULL.
    pub(crate) fn opt_time(mut self, t: Option<DateTime<Utc>>) -> Self {
        DB::add_opt_time(&mut self, t);
        self
    }

    /// Binds a JSON document.
    pub(crate) fn doc<T: serde::Serialize + Sync + ?Sized>(mut self, v: &T) -> Self {
        DB::add_doc(&mut self, v);
        self
    }

    /// Appends SQL text.
    pub(crate) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.to_mut().push_str(sql);
        self
    }

    /// Appends the placeholder of the argument bound last.
    pub(crate) fn placeholder(&mut self) -> &mut Self {
        let n = self.args.len();
        let _ = write!(self.sql.to_mut(), "${n}");
        self
    }

    /// Binds `value` and appends its placeholder.
    pub(crate) fn push_bind<T>(&mut self, value: T) -> &mut Self
    where
        DB: Bind<T>,
    {
        self.add(value);
        self.placeholder()
    }

    /// Binds a uuid and appends its placeholder.
    pub(crate) fn push_uuid(&mut self, v: Uuid) -> &mut Self {
        DB::add_uuid(self, Some(v));
        self.placeholder()
    }

    /// Binds a uuid or NULL and appends its placeholder.
    pub(crate) fn push_opt_uuid(&mut self, v: Option<Uuid>) -> &mut Self {
        DB::add_uuid(self, v);
        self.placeholder()
    }

    /// Binds a JSON document and appends its placeholder.
    pub(crate) fn push_doc<T: serde::Serialize + Sync + ?Sized>(&mut self, v: &T) -> &mut Self {
        DB::add_doc(self, v);
        self.placeholder()
    }

    /// Binds an event-time value and appends its placeholder.
    pub(crate) fn push_time(&mut self, t: DateTime<Utc>) -> &mut Self {
        DB::add_time(self, t);
        self.placeholder()
    }

    /// Binds an event-time value or NULL and appends its placeholder.
    pub(crate) fn push_opt_time(&mut self, t: Option<DateTime<Utc>>) -> &mut Self {
        DB::add_opt_time(self, t);
        self.placeholder()
    }

    /// Appends ` AND col IN ($a, $b, …)` for a non-empty list.
    pub(crate) fn push_in<T>(&mut self, col: &str, values: impl IntoIterator<Item = T>)
    where
        DB: Bind<T>,
    {
        let mut sep = format!(" AND {col} IN (");
        for v in values {
            self.push(&sep).push_bind(v);
            sep = ", ".into();
        }
        self.push(")");
    }

    fn parts(self) -> Result<(Cow<'static, str>, DB::Arguments), sqlx::Error> {
        match self.error {
            Some(e) => Err(sqlx::Error::Encode(e)),
            None => Ok((self.sql, self.args)),
        }
    }

    /// Executes; returns how many rows it touched.
    pub(crate) async fn execute(self, conn: &mut DB::Connection) -> Result<u64, sqlx::Error> {
        let (sql, args) = self.parts()?;
        let done = DB::run(sql, args, conn).await?;
        Ok(DB::affected(&done))
    }

    /// All rows.
    pub(crate) async fn fetch_all(
        self,
        conn: &mut DB::Connection,
    ) -> Result<Vec<DB::Row>, sqlx::Error> {
        let (sql, args) = self.parts()?;
        DB::rows(sql, args, conn).await
    }

    /// The first row, if any.
    pub(crate) async fn fetch_optional(
        self,
        conn: &mut DB::Connection,
    ) -> Result<Option<DB::Row>, sqlx::Error> {
        let (sql, args) = self.parts()?;
        DB::first(sql, args, conn).await
    }

    /// The first row; `RowNotFound` if there is none.
    pub(crate) async fn fetch_one(self, conn: &mut DB::Connection) -> Result<DB::Row, sqlx::Error> {
        self.fetch_optional(conn)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }
}
