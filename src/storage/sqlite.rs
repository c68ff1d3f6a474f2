//! Embedded SQLite: what differs from the shared SQL ([`SqlStore`]). One
//! file, WAL journal, `synchronous = FULL` so a committed write survives power
//! loss, foreign keys on. SQLite has no row-level security, so every
//! tenant-owned query filters by `tenant_id` (the shared SQL always does).
//! Uuids and documents are TEXT, event times integer microseconds; the feed
//! position is `seq` alone (one writer at a time: rows become visible in `seq`
//! order); writes take the database lock up front (`BEGIN IMMEDIATE`); the
//! one process always leads.
//!
//! The write-ahead log is kept bounded (see [`maintenance`]): SQLite's own
//! checkpoints after each commit are PASSIVE, and a WAL file is only reused
//! from its start when a checkpoint has copied all of it back before the
//! next write transaction begins. Under a sustained load (writers back to
//! back, each commit's checkpoint still running when the next writer
//! starts) that moment does not come and the file grows without bound (23 GB
//! beside a 1 GB database in `bench reports` at 1 M events); a file once
//! grown also never shrank (`journal_size_limit` unset).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Sqlite};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::alert::Entity;
use crate::domain::event::{FeedPosition, InsertOutcome, NewEvent};
use crate::storage::dialect::{Col, Dialect, Stmt, Tx};
use crate::storage::sql::{SqlStore, fail};
use crate::storage::{Backend, DroppedDay, Joined, ShardLocks, StoreError, StoreResult};

/// Connection options for `url`, creating the file's directory if needed.
fn options(url: &str) -> anyhow::Result<SqliteConnectOptions> {
    let path = crate::storage::lock::sqlite_path(url);
    if let Some(dir) = path
        .as_deref()
        .and_then(Path::parent)
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).context("failed to create the database directory")?;
    }
    Ok(SqliteConnectOptions::from_str(url)
        .context("invalid SQLite URL")?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10))
        // After a checkpoint resets the log, SQLite truncates the file back
        // to this size (the default keeps its high-water mark for ever).
        .pragma("journal_size_limit", WAL_LIMIT_BYTES.to_string()))
}

/// Size the WAL file is truncated back to after a reset, and the size
/// above which the checkpoint task forces a complete checkpoint.
const WAL_LIMIT_BYTES: u64 = 64 * 1024 * 1024;
/// How often the checkpoint task looks at the WAL file's size.
const WAL_CHECK_EVERY: Duration = Duration::from_millis(250);
/// How long a forced checkpoint waits for the writer lock and for readers
/// of older snapshots before it gives up until the next look. Short: while
/// it waits it holds the checkpoint lock, so the writers' own (PASSIVE)
/// checkpoints cannot run, and the log only grows (a 2 s wait let it grow
/// to 1.3 GB in a 200,000-event load).
const WAL_CHECKPOINT_WAIT: Duration = Duration::from_millis(100);
/// How often the maintenance task lets SQLite refresh the query planner's
/// statistics (a no-op when no table changed much since the last time).
const STATS_EVERY: Duration = Duration::from_secs(60);
/// `PRAGMA optimize` with 0x02 (ANALYZE the tables that may benefit), 0x10
/// (under a temporary analysis limit, so it finishes quickly at any size)
/// and 0x10000 (look at every table, not only those this connection read:
/// the maintenance connection reads none). Without statistics SQLite's
/// planner guesses, and at 1 M events it read a filter matching nothing
/// through the time index instead of the filter's own (p95 2.3 s).
const OPTIMIZE: &str = "PRAGMA optimize=0x10012";

/// When the planner statistics of a SQLite store last changed. SQLite loads
/// them into a connection when it reads the schema, and an ANALYZE on
/// another connection does not reach connections already open (measured: a
/// pooled connection kept planning a filter through the time index after
/// `PRAGMA optimize` elsewhere), so a pooled connection opened before the
/// last change is replaced when it is next acquired.
#[derive(Debug, Default)]
pub(crate) struct StatsEpoch(std::sync::Mutex<Option<std::time::Instant>>);

impl StatsEpoch {
    fn changed(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
    }

    /// Whether a connection of age `age` was opened before the last change.
    fn predates(&self, age: Duration) -> bool {
        let last = *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.is_some_and(|t| {
            std::time::Instant::now()
                .checked_sub(age)
                .is_some_and(|opened| opened < t)
        })
    }
}

/// The statistics SQLite holds (empty before the first ANALYZE).
async fn statistics(c: &mut sqlx::SqliteConnection) -> Result<String, sqlx::Error> {
    let exists: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_schema WHERE name = 'sqlite_stat1'")
            .fetch_one(&mut *c)
            .await?;
    if exists == 0 {
        return Ok(String::new());
    }
    sqlx::query_scalar(
        "SELECT coalesce(group_concat(tbl || ' ' || coalesce(idx, '') || ' ' || stat, ';'), '') \
         FROM sqlite_stat1",
    )
    .fetch_one(&mut *c)
    .await
}

/// Runs [`OPTIMIZE`] on `c`; when the statistics changed, marks `epoch`.
async fn optimize(c: &mut sqlx::SqliteConnection, epoch: &StatsEpoch) -> Result<(), sqlx::Error> {
    let started = std::time::Instant::now();
    let before = statistics(c).await?;
    sqlx::query(OPTIMIZE).execute(&mut *c).await?;
    if statistics(c).await? != before {
        epoch.changed();
        tracing::debug!(
            seconds = started.elapsed().as_secs_f64(),
            "SQLite planner statistics refreshed"
        );
    }
    metrics::histogram!("picket_sqlite_optimize_seconds").record(started.elapsed().as_secs_f64());
    Ok(())
}

/// Keeps the WAL of the database at `path` bounded until `stop` is cancelled
/// or `pool` closes: every [`WAL_CHECK_EVERY`], when the `-wal` file is
/// larger than [`WAL_LIMIT_BYTES`], runs `PRAGMA wal_checkpoint(TRUNCATE)`
/// on a connection of its own. That checkpoint takes the writer lock (so it
/// is not starved by writers following each other), waits at most
/// [`WAL_CHECKPOINT_WAIT`] for readers of older snapshots (SQLite's busy
/// handler), copies the whole log back and truncates the file to zero; busy,
/// it is tried again at the next look. It reads nothing else, so it holds no
/// read transaction between checkpoints. Every [`STATS_EVERY`] it also runs
/// [`OPTIMIZE`] (busy, it is tried at the next look).
async fn maintenance(
    url: String,
    path: std::path::PathBuf,
    pool: sqlx::SqlitePool,
    epoch: std::sync::Arc<StatsEpoch>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut wal = path.into_os_string();
    wal.push("-wal");
    let wal = std::path::PathBuf::from(wal);
    let closed = pool.close_event();
    drop(pool);
    tokio::pin!(closed);
    let mut conn: Option<sqlx::SqliteConnection> = None;
    // Statistics first at the first look (a store opened on a file that grew
    // elsewhere, or that never had them).
    let mut last_stats: Option<std::time::Instant> = None;
    let mut tick = tokio::time::interval(WAL_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
            () = &mut closed => break,
        }
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let stats_due = last_stats.is_none_or(|t| t.elapsed() >= STATS_EVERY);
        if size <= WAL_LIMIT_BYTES && !stats_due {
            continue;
        }
        if conn.is_none() {
            let opened = match options(&url) {
                Ok(o) => o.busy_timeout(WAL_CHECKPOINT_WAIT).connect().await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the SQLite maintenance connection");
                    continue;
                }
            };
            match opened {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the SQLite maintenance connection");
                    continue;
                }
            }
        }
        if stats_due {
            let Some(c) = conn.as_mut() else { continue };
            match optimize(c, &epoch).await {
                Ok(()) => last_stats = Some(std::time::Instant::now()),
                Err(e) => {
                    tracing::debug!(error = %e, "PRAGMA optimize did not run; retrying");
                    conn = None;
                    continue;
                }
            }
            if size <= WAL_LIMIT_BYTES {
                continue;
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let started = std::time::Instant::now();
        let done: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut *c)
                .await;
        match done {
            Ok((0, frames, _)) => {
                metrics::counter!("picket_sqlite_wal_checkpoints_total", "result" => "done")
                    .increment(1);
                tracing::debug!(
                    wal_bytes = size,
                    frames,
                    seconds = started.elapsed().as_secs_f64(),
                    "WAL checkpointed and truncated"
                );
            }
            Ok((_, frames, copied)) => {
                metrics::counter!("picket_sqlite_wal_checkpoints_total", "result" => "busy")
                    .increment(1);
                tracing::debug!(
                    wal_bytes = size,
                    frames,
                    copied,
                    "WAL checkpoint busy; retrying"
                );
            }
            Err(e) => {
                metrics::counter!("picket_sqlite_wal_checkpoints_total", "result" => "error")
                    .increment(1);
                tracing::warn!(error = %e, "WAL checkpoint failed");
                // A fresh connection at the next look.
                conn = None;
            }
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// Runs the SQLite migrations (creating the file if needed).
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let mut conn = options(url)?
        .connect()
        .await
        .context("failed to open the SQLite database")?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&mut conn)
        .await
        .context("failed to run SQLite migrations")?;
    conn.close()
        .await
        .context("failed to close the migration connection")?;
    Ok(())
}

/// Store on an embedded SQLite file; SQLite serializes writers itself (busy
/// timeout 10 s).
pub type SqliteStore = SqlStore<Sqlite>;

impl SqliteStore {
    /// Migrates, then opens a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        Self::connect_locked(url, max_connections, None).await
    }

    /// [`SqliteStore::connect`], keeping `lock` (taken before) as long as the store.
    pub async fn connect_locked(
        url: &str,
        max_connections: u32,
        lock: Option<crate::storage::lock::StoreLock>,
    ) -> anyhow::Result<Self> {
        migrate(url).await?;
        let epoch = std::sync::Arc::new(StatsEpoch::default());
        let stale = epoch.clone();
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .before_acquire(move |_, meta| {
                let keep = !stale.predates(meta.age);
                Box::pin(async move { Ok(keep) })
            })
            .connect_with(options(url)?)
            .await
            .context("failed to open the SQLite pool")?;
        let maintenance = crate::storage::lock::sqlite_path(url).map(|path| {
            let stop = tokio_util::sync::CancellationToken::new();
            tokio::spawn(maintenance(
                url.to_owned(),
                path,
                pool.clone(),
                epoch.clone(),
                stop.clone(),
            ));
            std::sync::Arc::new(stop.drop_guard())
        });
        Ok(Self {
            pool,
            lock: lock.map(std::sync::Arc::new),
            maintenance,
            stats_epoch: Some(epoch),
        })
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| sqlx::Error::Decode("timestamp out of range".into()))
}

#[async_trait]
impl Dialect for Sqlite {
    const BACKEND: Backend = Backend::Sqlite;
    // Write transactions hold the database lock from their first statement.
    const FOR_UPDATE: &'static str = "";
    const API_KEY_BY_ID: &'static str = "api_keys WHERE id = $1";
    const SOURCE_BY_NAME: &'static str = "webhook_sources WHERE name = $1";
    const SOURCE_TENANT: &'static str = "SELECT tenant_id FROM webhook_sources WHERE id = $1";
    // One statement: the write lock makes the claim atomic.
    const CLAIM_RUNS: &'static str = "UPDATE playbook_runs SET lease_owner = $1, lease_until = $2 \
         WHERE rowid IN (SELECT rowid FROM playbook_runs WHERE status IN (2, 4) \
         AND (lease_until IS NULL OR lease_until < $3) ORDER BY updated_at LIMIT $4) \
         RETURNING tenant_id, id";
    const DUE_RUNS: &'static str = "SELECT tenant_id, id FROM playbook_runs \
         WHERE status = 1 AND approval_deadline <= $1 ORDER BY approval_deadline LIMIT $2";
    const DECISION_SCHEDULE: &'static str = "decision_heads";
    const FEED_XID: &'static str = "xid AS feed_xid";
    const READABLE: &'static str = "";
    const FEED_ORDER: &'static str = "seq";
    const FEED_ORDER_DESC: &'static str = "seq DESC";
    const BYTE_ORDER: &'static str = "";
    // The events table holds the keys (its unique index on (tenant_id, idem)).
    const PURGE_KEYS: Option<&'static str> = None;
    const FENCE: &'static str = "";
    const EXPLAIN: &'static str = "EXPLAIN QUERY PLAN ";
    const EXPLAIN_COLUMN: &'static str = "detail";
    const ALERT_ENTITIES: &'static str = "alerts a, json_each(a.doc, '$.body.entities') AS ent";
    const ENTITY: &'static str = "ent.value";

    fn micros(col: &str) -> String {
        // Times are stored as integer microseconds already.
        col.to_owned()
    }

    fn json_text(doc: &str, path: &[&str]) -> String {
        format!("json_extract({doc}, '$.{}')", path.join("."))
    }

    fn add_uuid(q: &mut Stmt<Self>, v: Option<Uuid>) {
        q.add(v.map(|u| u.to_string()));
    }

    fn add_time(q: &mut Stmt<Self>, t: DateTime<Utc>) {
        q.add(micros(t));
    }

    fn add_opt_time(q: &mut Stmt<Self>, t: Option<DateTime<Utc>>) {
        q.add(t.map(micros));
    }

    fn add_doc<T: serde::Serialize + Sync + ?Sized>(q: &mut Stmt<Self>, v: &T) {
        match serde_json::to_string(v) {
            Ok(doc) => q.add(doc),
            Err(e) => q.fail(e.into()),
        }
    }

    fn push_after(q: &mut Stmt<Self>, after: FeedPosition) {
        q.push(" AND seq > ").push_bind(after.seq);
    }

    fn push_upto(q: &mut Stmt<Self>, upto: FeedPosition) {
        q.push(" AND seq <= ").push_bind(upto.seq);
    }

    fn push_uuid_in(q: &mut Stmt<Self>, col: &str, ids: &[Uuid]) {
        let mut sep = format!(" AND {col} IN (");
        for id in ids {
            q.push(&sep).push_uuid(*id);
            sep = ", ".into();
        }
        q.push(")");
    }

    fn push_text_in(q: &mut Stmt<Self>, col: &str, values: &[&str]) {
        q.push_in(col, values.iter().copied());
    }

    fn push_has_entity(q: &mut Stmt<Self>, path: &[&str], entity: &Entity) {
        let kind = serde_json::to_value(entity.kind)
            .ok()
            .and_then(|k| k.as_str().map(str::to_owned))
            .unwrap_or_default();
        q.push(" AND EXISTS (SELECT 1 FROM json_each(doc, ")
            .push_bind(format!("$.{}", path.join(".")))
            .push(") j WHERE json_extract(j.value, '$.kind') = ")
            .push_bind(kind)
            .push(" AND json_extract(j.value, '$.value') = ")
            .push_bind(entity.value.as_str())
            .push(")");
    }

    fn opt_uuid(row: &SqliteRow, col: &str) -> Result<Option<Uuid>, sqlx::Error> {
        row.col::<Option<String>>(col)?
            .map(|s| parse_uuid(&s))
            .transpose()
    }

    fn time(row: &SqliteRow, col: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        from_micros(row.col(col)?)
    }

    fn opt_time(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        row.col::<Option<i64>>(col)?.map(from_micros).transpose()
    }

    fn doc<T: serde::de::DeserializeOwned>(row: &SqliteRow, col: &str) -> Result<T, sqlx::Error> {
        let doc: String = row.col(col)?;
        serde_json::from_str(&doc).map_err(|e| sqlx::Error::Decode(e.into()))
    }

    fn position(row: &SqliteRow) -> Result<FeedPosition, sqlx::Error> {
        Ok(FeedPosition {
            xid: row.col::<i64>("feed_xid")? as u64,
            seq: row.col("seq")?,
        })
    }

    fn affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    async fn begin(
        store: &SqliteStore,
        _tenant: TenantId,
        write: bool,
    ) -> Result<Tx<Self>, sqlx::Error> {
        if write {
            // IMMEDIATE: take the write lock up front so concurrent writers
            // queue on the busy timeout instead of failing a lock upgrade.
            store.pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            store.pool.begin().await
        }
    }

    async fn begin_snapshot(
        store: &SqliteStore,
        _tenant: TenantId,
    ) -> Result<Tx<Self>, sqlx::Error> {
        // A WAL reader keeps the snapshot of its first read until it ends.
        store.pool.begin().await
    }

    async fn lock_fingerprint(_tx: &mut Tx<Self>, _key: String) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn lock_fingerprints(_tx: &mut Tx<Self>, _keys: Vec<String>) -> Result<(), sqlx::Error> {
        Ok(())
    }

    async fn write_alerts(
        tx: &mut Tx<Self>,
        tenant: TenantId,
        snaps: &[(Uuid, &NewEvent)],
        rows: &[&crate::domain::alert::Alert],
        changes: &[(&str, &crate::domain::alert::Alert)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        // Local statements, no round trips: the multi-row statements are fine.
        SqlStore::<Self>::write_alerts_in_chunks(tx, tenant, snaps, rows, changes, now).await
    }

    async fn refresh_statistics(store: &SqliteStore) -> StoreResult<()> {
        let Some(epoch) = &store.stats_epoch else {
            return Ok(());
        };
        // On a connection of its own: a pooled one would keep its old
        // statistics (see `StatsEpoch`).
        let fail = |e: sqlx::Error| {
            crate::storage::sql::fail("statistics", "failed to refresh the planner statistics")(e)
        };
        let mut c = store.pool.connect_options().connect().await.map_err(fail)?;
        optimize(&mut c, epoch).await.map_err(fail)?;
        c.close().await.map_err(fail)
    }

    async fn insert_events(
        store: &SqliteStore,
        groups: &[(TenantId, &[NewEvent])],
    ) -> StoreResult<Vec<Vec<InsertOutcome>>> {
        let classify = fail("events", "failed to insert events");
        let mut tx = store
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(&classify)?;
        let mut out = Vec::with_capacity(groups.len());
        for (tenant, events) in groups {
            let tenant_text = tenant.0.to_string();
            let mut outcomes = Vec::with_capacity(events.len());
            for e in *events {
                let details = serde_json::to_string(&e.details)
                    .map_err(|e| StoreError::Unexpected(e.into()))?;
                let done = sqlx::query(
                    "INSERT INTO events (tenant_id, id, idem, occurred_at, received_at, event_type, ocsf_class_uid, \
                     ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip, \
                     source_system, service, environment, details, resource_segment) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20) \
                     ON CONFLICT (tenant_id, idem) DO NOTHING",
                )
                .bind(&tenant_text)
                .bind(e.id.to_string())
                .bind(&e.idempotency_digest[..])
                .bind(micros(e.occurred_at))
                .bind(micros(e.received_at))
                .bind(&e.event_type)
                .bind(i64::from(e.ocsf_class_uid))
                .bind(i64::from(e.ocsf_category_uid))
                .bind(&e.actor)
                .bind(&e.action)
                .bind(&e.resource)
                .bind(e.outcome.as_i16())
                .bind(e.severity.as_i16())
                .bind(e.source_ip.map(|ip| ip.to_string()))
                .bind(e.destination_ip.map(|ip| ip.to_string()))
                .bind(&e.source_system)
                .bind(&e.service)
                .bind(&e.environment)
                .bind(details)
                .bind(crate::domain::event::resource_segment(&e.resource))
                .execute(&mut *tx)
                .await
                .map_err(&classify)?;
                if done.rows_affected() == 1 {
                    outcomes.push(InsertOutcome::Accepted(e.id));
                } else {
                    let original: String = sqlx::query_scalar(
                        "SELECT id FROM events WHERE tenant_id = ?1 AND idem = ?2",
                    )
                    .bind(&tenant_text)
                    .bind(&e.idempotency_digest[..])
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(&classify)?;
                    outcomes.push(InsertOutcome::Duplicate(
                        parse_uuid(&original).map_err(&classify)?,
                    ));
                }
            }
            out.push(outcomes);
        }
        tx.commit().await.map_err(classify)?;
        Ok(out)
    }

    async fn prepare_event_days(
        _store: &SqliteStore,
        _first: NaiveDate,
        _last: NaiveDate,
    ) -> StoreResult<u32> {
        // One table, no partitions: every day is already covered.
        Ok(0)
    }

    async fn drop_event_days(
        _store: &SqliteStore,
        _keep: &[(TenantId, Option<DateTime<Utc>>)],
    ) -> StoreResult<Vec<DroppedDay>> {
        // Retention deletes rows (EventStore::purge_events).
        Ok(Vec::new())
    }

    async fn join_detection(_store: &SqliteStore, _shards: u32) -> StoreResult<Joined> {
        // One serving process per file (`storage/lock.rs`): it is alone.
        Ok(Joined::Member(ShardLocks::sole()))
    }
}
