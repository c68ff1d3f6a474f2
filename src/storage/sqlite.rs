//! Embedded SQLite: what differs from the shared SQL ([`SqlStore`]). One
//! file, WAL journal, `synchronous = FULL` so a committed write survives power
//! loss, foreign keys on. SQLite has no row-level security, so every
//! tenant-owned query filters by `tenant_id` (the shared SQL always does).
//! Uuids and documents are TEXT, event times integer microseconds; the feed
//! position is `seq` alone (one writer at a time: rows become visible in `seq`
//! order); writes take the database lock up front (`BEGIN IMMEDIATE`); the
//! one process always leads.

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
        .busy_timeout(Duration::from_secs(10)))
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
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options(url)?)
            .await
            .context("failed to open the SQLite pool")?;
        Ok(Self {
            pool,
            lock: lock.map(std::sync::Arc::new),
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
                     source_system, service, environment, details) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
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
