//! PostgreSQL: what differs from the shared SQL ([`SqlStore`]). Connections
//! run as `picket_app` (see `migrations/postgres/0001_foundation.sql`), so
//! row-level security applies to every query; tenant-owned work happens in a
//! transaction that first sets `picket.tenant_id` ([`PgStore::tenant_tx`]).
//! Uuids are `uuid`, documents `jsonb`, times `timestamptz`; the feed position
//! is `(xid, seq)`, read only below `pg_snapshot_xmin`; events are inserted
//! with one UNNEST statement per tenant; detection shards and presence are
//! session advisory locks on one dedicated connection.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgQueryResult, PgRow};
use sqlx::{Connection, Executor, PgConnection, Postgres, Transaction};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::alert::Entity;
use crate::domain::event::{FeedPosition, InsertOutcome, NewEvent};
use crate::storage::dialect::{Col, Dialect, Stmt, Tx};
use crate::storage::sql::{SqlStore, fail};
use crate::storage::{Backend, DroppedDay, Joined, LockSession, ShardLocks, StoreResult};

/// Runs the Postgres migrations on a dedicated connection as the owner role.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(url)
        .await
        .context("failed to connect to Postgres")?;
    sqlx::migrate!("./migrations/postgres")
        .run(&mut conn)
        .await
        .context("failed to run Postgres migrations")?;
    conn.close()
        .await
        .context("failed to close the migration connection")?;
    Ok(())
}

/// Store on PostgreSQL.
pub type PgStore = SqlStore<Postgres>;

/// Most tables one statistics refresh analyzes.
const ANALYZE_MAX_TABLES: usize = 64;

/// A pooled connection idle longer than this is pinged before it is handed out.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// How often the connection holding the shard locks is checked.
const LOCKS_CHECK: Duration = Duration::from_secs(1);

/// Advisory lock keys of detection, in the two-`int4` form whose first key is
/// a namespace (disjoint from the one-`bigint` keys of the fingerprint locks).
/// Presence: `(PRESENCE, shard count)`, shared, one per replica.
const PRESENCE: i32 = 0x7069_6b01;
/// Shard `s`: `(SHARD, s)`, exclusive.
const SHARD: i32 = 0x7069_6b02;
/// Serializes joining (transaction-scoped).
const JOIN: i32 = 0x7069_6b03;
/// The one detection lock of versions before shards (`bigint` form). Members
/// hold it shared, so such a version cannot lead beside them, nor they
/// beside it.
const LEGACY_LEADER: &str = "SELECT pg_try_advisory_lock_shared(hashtext('picket:detection'))";
/// Advisory locks held in this database under namespace `$1` (granted ones).
const HELD: &str = "SELECT objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted \
     AND objsubid = 2 AND classid::int8 = $1 \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

impl PgStore {
    /// Migrates, then opens a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        migrate(url).await?;
        let options = PgConnectOptions::from_str(url).context("invalid Postgres URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings every connection it hands out (a round trip before
            // each transaction). Like HikariCP's bypass window, a connection
            // used within the last second is handed out as it is: under
            // load every one is, and on two busy cores each round trip
            // waits for both processes to be scheduled (issue 12). One idle
            // longer is still checked, so a restarted server's dead
            // connections are dropped here, not failed on.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET ROLE picket_app").await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .context("failed to open the Postgres pool")?;
        Ok(Self {
            pool,
            lock: None,
            maintenance: None,
            stats_epoch: None,
        })
    }

    /// Begins a transaction bound to `tenant` for row-level security.
    pub(crate) async fn tenant_tx(
        &self,
        tenant: TenantId,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin_with(begin_as(tenant, "BEGIN")).await
    }
}

/// `begin` (a `BEGIN` statement) and the binding of the transaction to
/// `tenant` (see [`set_tenant`]) as one simple-protocol query: one round trip
/// instead of two for every tenant transaction. The tenant is a `Uuid`
/// formatted by its `Display` (hex digits and dashes only), so inlining it
/// cannot inject anything.
fn begin_as(tenant: TenantId, begin: &str) -> sqlx::AssertSqlSafe<String> {
    let id: Uuid = tenant.0;
    sqlx::AssertSqlSafe(format!(
        "{begin}; SELECT set_config('picket.tenant_id', '{id}', true)"
    ))
}

/// Binds the rest of `tx` to `tenant` for row-level security.
async fn set_tenant(tx: &mut Tx<Postgres>, tenant: TenantId) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('picket.tenant_id', $1, true)")
        .bind(tenant.0.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[async_trait]
impl Dialect for Postgres {
    const BACKEND: Backend = Backend::Postgres;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    // Definer-rights functions: the lookups run before the tenant is known.
    const API_KEY_BY_ID: &'static str = "picket_find_api_key($1)";
    const SOURCE_BY_NAME: &'static str = "picket_find_webhook_source($1)";
    const SOURCE_TENANT: &'static str = "SELECT picket_webhook_source_tenant($1) AS tenant_id";
    // Definer-rights functions: workers claim runs before they know the tenant.
    const CLAIM_RUNS: &'static str =
        "SELECT tenant_id, id FROM picket_claim_playbook_runs($1, $2, $3, $4)";
    const DUE_RUNS: &'static str = "SELECT tenant_id, id FROM picket_due_playbook_runs($1, $2)";
    const DECISION_SCHEDULE: &'static str = "picket_decision_schedule()";
    const FEED_XID: &'static str = "xid::text AS feed_xid";
    // A transaction still in flight may commit rows with a smaller xid than
    // rows already visible; stop below the oldest one.
    const READABLE: &'static str = " AND xid < pg_snapshot_xmin(pg_current_snapshot())";
    const FEED_ORDER: &'static str = "xid, seq";
    const FEED_ORDER_DESC: &'static str = "xid DESC, seq DESC";
    const BYTE_ORDER: &'static str = " COLLATE \"C\"";
    const PURGE_KEYS: Option<&'static str> =
        Some("DELETE FROM event_keys WHERE tenant_id = $1 AND occurred_at < $2");
    const FENCE: &'static str = " OFFSET 0";
    const EXPLAIN: &'static str = "EXPLAIN ";
    const EXPLAIN_COLUMN: &'static str = "QUERY PLAN";
    const ALERT_ENTITIES: &'static str =
        "alerts a CROSS JOIN LATERAL jsonb_array_elements(a.doc #> '{body,entities}') AS ent(v)";
    const ENTITY: &'static str = "ent.v";

    fn micros(col: &str) -> String {
        // EXTRACT gives numeric seconds with the microseconds exact.
        format!("(EXTRACT(EPOCH FROM {col}) * 1000000)::bigint")
    }

    fn json_text(doc: &str, path: &[&str]) -> String {
        format!("({doc} #>> '{{{}}}')", path.join(","))
    }

    fn add_uuid(q: &mut Stmt<Self>, v: Option<Uuid>) {
        q.add(v);
    }

    fn add_time(q: &mut Stmt<Self>, t: DateTime<Utc>) {
        q.add(t);
    }

    fn add_opt_time(q: &mut Stmt<Self>, t: Option<DateTime<Utc>>) {
        q.add(t);
    }

    fn add_doc<T: serde::Serialize + Sync + ?Sized>(q: &mut Stmt<Self>, v: &T) {
        // Serialized once, straight to text (a `Value` tree would be built
        // and then serialized again).
        match serde_json::value::to_raw_value(v) {
            Ok(doc) => q.add(sqlx::types::Json(doc)),
            Err(e) => q.fail(e.into()),
        }
    }

    fn push_after(q: &mut Stmt<Self>, after: FeedPosition) {
        q.push(" AND (xid, seq) > (")
            .push_bind(after.xid.to_string())
            .push("::text::xid8, ")
            .push_bind(after.seq)
            .push(")");
    }

    fn push_upto(q: &mut Stmt<Self>, upto: FeedPosition) {
        q.push(" AND (xid, seq) <= (")
            .push_bind(upto.xid.to_string())
            .push("::text::xid8, ")
            .push_bind(upto.seq)
            .push(")");
    }

    fn push_uuid_in(q: &mut Stmt<Self>, col: &str, ids: &[Uuid]) {
        q.push(&format!(" AND {col} = ANY("))
            .push_bind(ids.to_vec())
            .push(")");
    }

    fn push_text_in(q: &mut Stmt<Self>, col: &str, values: &[&str]) {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        q.push(&format!(" AND {col} = ANY("))
            .push_bind(values)
            .push(")");
    }

    fn push_has_entity(q: &mut Stmt<Self>, path: &[&str], entity: &Entity) {
        let mut needle = serde_json::json!([entity]);
        for key in path.iter().rev() {
            let mut outer = serde_json::Map::new();
            outer.insert((*key).to_owned(), needle);
            needle = serde_json::Value::Object(outer);
        }
        q.push(" AND doc @> ").push_bind(needle);
    }

    fn opt_uuid(row: &PgRow, col: &str) -> Result<Option<Uuid>, sqlx::Error> {
        row.col(col)
    }

    fn time(row: &PgRow, col: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        row.col(col)
    }

    fn opt_time(row: &PgRow, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        row.col(col)
    }

    fn doc<T: serde::de::DeserializeOwned>(row: &PgRow, col: &str) -> Result<T, sqlx::Error> {
        // Straight from the column's bytes into `T`, without a
        // `serde_json::Value` tree in between (the detection pipeline reads
        // every event's details this way).
        let sqlx::types::Json(doc) = sqlx::Row::try_get::<sqlx::types::Json<T>, _>(row, col)?;
        Ok(doc)
    }

    fn position(row: &PgRow) -> Result<FeedPosition, sqlx::Error> {
        let xid: String = row.col("feed_xid")?;
        Ok(FeedPosition {
            xid: xid
                .parse()
                .map_err(|_| sqlx::Error::Decode("bad xid".into()))?,
            seq: row.col("seq")?,
        })
    }

    fn affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    async fn begin(
        store: &PgStore,
        tenant: TenantId,
        _write: bool,
    ) -> Result<Tx<Self>, sqlx::Error> {
        store.tenant_tx(tenant).await
    }

    async fn begin_snapshot(store: &PgStore, tenant: TenantId) -> Result<Tx<Self>, sqlx::Error> {
        store
            .pool
            .begin_with(begin_as(
                tenant,
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            ))
            .await
    }

    async fn lock_fingerprint(tx: &mut Tx<Self>, key: String) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(key)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn lock_fingerprints(tx: &mut Tx<Self>, keys: Vec<String>) -> Result<(), sqlx::Error> {
        // One round trip; the subquery's order is the order the locks are taken.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(h) FROM \
             (SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY 1) AS l",
        )
        .bind(keys)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// One statement whose data-modifying CTEs insert the snapshots and
    /// upsert the rows, and whose main `INSERT` appends the change-log entries in `changes` order (`seq` is assigned
    /// above the `ORDER BY`). Its text does not depend on the row counts, so it
    /// is prepared once per connection; the multi-row `VALUES` statements it
    /// replaces had a new text (a parse and describe round trip, and planning)
    /// for nearly every raise, and a raise holds its xid, which every feed
    /// reader waits for, from its first locking read to its commit.
    async fn write_alerts(
        tx: &mut Tx<Self>,
        tenant: TenantId,
        snaps: &[(Uuid, &NewEvent)],
        rows: &[&crate::domain::alert::Alert],
        changes: &[(&str, &crate::domain::alert::Alert)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        use crate::storage::sql::{snapshots_to_store, stored_alert};
        let started = std::time::Instant::now();
        let json = |e: serde_json::Error| sqlx::Error::Encode(e.into());
        let snaps = snapshots_to_store(snaps, rows);
        let snap_ids: Vec<Uuid> = snaps.iter().map(|(id, _)| *id).collect();
        let snap_docs = snaps
            .iter()
            .map(|(_, s)| serde_json::to_string(s))
            .collect::<Result<Vec<String>, _>>()
            .map_err(json)?;
        let n = rows.len();
        let (mut ids, mut fps, mut sev, mut status, mut cat) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut last_seen, mut created, mut incident, mut docs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for a in rows {
            ids.push(a.id);
            fps.push(a.fingerprint.as_str());
            sev.push(a.severity.as_i16());
            status.push(a.status.as_i16());
            cat.push(a.category.as_str());
            last_seen.push(a.last_seen);
            created.push(a.created_at);
            incident.push(a.incident_id);
            docs.push(serde_json::to_string(&*stored_alert(a)).map_err(json)?);
        }
        let subjects: Vec<Uuid> = changes.iter().map(|(_, a)| a.id).collect();
        let kinds: Vec<&str> = changes.iter().map(|(k, _)| *k).collect();
        let payloads = changes
            .iter()
            .map(|(_, a)| serde_json::to_string(&*stored_alert(a)))
            .collect::<Result<Vec<String>, _>>()
            .map_err(json)?;
        metrics::histogram!("picket_alert_transaction_stage_seconds", "stage" => "encode")
            .record(started.elapsed().as_secs_f64());
        sqlx::query(
            "WITH s AS (INSERT INTO evidence_snapshots (tenant_id, event_id, snapshot)                     SELECT $1, u.id, u.snapshot::jsonb FROM unnest($2::uuid[], $3::text[]) AS u(id, snapshot)                     ON CONFLICT (tenant_id, event_id) DO NOTHING),               a AS (INSERT INTO alerts (tenant_id, id, fingerprint, severity, status, category, last_seen,                                         created_at, incident_id, doc)                     SELECT $1, u.id, u.fingerprint, u.severity, u.status, u.category, u.last_seen,                            u.created_at, u.incident_id, u.doc::jsonb                     FROM unnest($4::uuid[], $5::text[], $6::int2[], $7::int2[], $8::text[],                                 $9::timestamptz[], $10::timestamptz[], $11::uuid[], $12::text[])                          AS u(id, fingerprint, severity, status, category, last_seen, created_at, incident_id, doc)                     ON CONFLICT (tenant_id, id) DO UPDATE SET fingerprint = excluded.fingerprint,                        severity = excluded.severity, status = excluded.status, category = excluded.category,                        last_seen = excluded.last_seen, created_at = excluded.created_at,                        incident_id = excluded.incident_id, doc = excluded.doc)          INSERT INTO change_log (tenant_id, stream, subject_id, kind, payload, created_at)          SELECT $1, 'alerts', u.id, u.kind, u.payload::jsonb, $16          FROM unnest($13::uuid[], $14::text[], $15::text[]) WITH ORDINALITY AS u(id, kind, payload, n)          ORDER BY u.n",
        )
        .bind(tenant.0)
        .bind(&snap_ids)
        .bind(&snap_docs)
        .bind(&ids)
        .bind(&fps)
        .bind(&sev)
        .bind(&status)
        .bind(&cat)
        .bind(&last_seen)
        .bind(&created)
        .bind(&incident)
        .bind(&docs)
        .bind(&subjects)
        .bind(&kinds)
        .bind(&payloads)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn refresh_statistics(store: &PgStore) -> StoreResult<()> {
        // The application role does not own the tables: a function of the
        // migrations' owner analyzes the busiest table that changed much
        // since its last ANALYZE (migration 0019); autovacuum does the rest.
        // One statement, so one transaction, per table: a transaction that
        // has written statistics holds an xid, and the detection feed reads
        // nothing newer than the oldest xid still running (`READABLE`).
        let fail = fail("statistics", "failed to refresh planner statistics");
        let started = std::time::Instant::now();
        let mut analyzed: Vec<String> = Vec::new();
        // Bounded: `done` grows by one table per call, and there are only
        // so many busy tables; the cap is for a statistics view gone wrong.
        while analyzed.len() < ANALYZE_MAX_TABLES {
            let next: Option<String> =
                sqlx::query_scalar("SELECT picket_analyze_busy_table($1::text[])")
                    .bind(&analyzed)
                    .fetch_one(&store.pool)
                    .await
                    .map_err(&fail)?;
            match next {
                Some(table) => analyzed.push(table),
                None => break,
            }
        }
        if !analyzed.is_empty() {
            metrics::counter!("picket_postgres_analyze_total").increment(analyzed.len() as u64);
            metrics::histogram!("picket_postgres_analyze_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(tables = ?analyzed, "planner statistics refreshed");
        }
        Ok(())
    }

    async fn insert_events(
        store: &PgStore,
        groups: &[(TenantId, &[NewEvent])],
    ) -> StoreResult<Vec<Vec<InsertOutcome>>> {
        let fail = fail("events", "failed to insert events");
        let mut tx = store.pool.begin().await.map_err(&fail)?;
        let mut out = Vec::with_capacity(groups.len());
        for (tenant, events) in groups {
            out.push(
                insert_group(&mut tx, *tenant, events)
                    .await
                    .map_err(&fail)?,
            );
        }
        tx.commit().await.map_err(fail)?;
        Ok(out)
    }

    async fn prepare_event_days(
        store: &PgStore,
        first: NaiveDate,
        last: NaiveDate,
    ) -> StoreResult<u32> {
        let fail = fail("event partitions", "failed to create event partitions");
        let created: i32 = sqlx::query_scalar("SELECT picket_ensure_event_partitions($1, $2)")
            .bind(first)
            .bind(last)
            .fetch_one(&store.pool)
            .await
            .map_err(fail)?;
        Ok(u32::try_from(created).unwrap_or(0))
    }

    async fn drop_event_days(
        store: &PgStore,
        keep: &[(TenantId, Option<DateTime<Utc>>)],
    ) -> StoreResult<Vec<DroppedDay>> {
        let fail = fail("event partitions", "failed to drop event partitions");
        let tenants: Vec<Uuid> = keep.iter().map(|(t, _)| t.0).collect();
        // `-infinity`: kept forever (sqlx has no infinite timestamps, so
        // the cutoffs travel as text).
        let cutoffs: Vec<String> = keep
            .iter()
            .map(|(_, c)| c.map_or_else(|| "-infinity".to_owned(), |c| c.to_rfc3339()))
            .collect();
        let rows: Vec<(NaiveDate, i64)> = sqlx::query_as(
            "SELECT part_day, held_rows FROM picket_drop_event_partitions($1, $2::text[]::timestamptz[])",
        )
        .bind(&tenants)
        .bind(&cutoffs)
        .fetch_all(&store.pool)
        .await
        .map_err(fail)?;
        Ok(rows
            .into_iter()
            .map(|(day, events)| DroppedDay {
                day,
                events: u64::try_from(events).unwrap_or(0),
            })
            .collect())
    }

    async fn join_detection(store: &PgStore, shards: u32) -> StoreResult<Joined> {
        let fail = fail("join_detection", "failed to join detection");
        let shards_key = i32::try_from(shards).map_err(|e| fail(sqlx::Error::Encode(e.into())))?;
        let options = store.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await.map_err(&fail)?;
        let refused = {
            let mut tx = conn.begin().await.map_err(&fail)?;
            sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
                .bind(JOIN)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
            let legacy_free: bool = sqlx::query_scalar(LEGACY_LEADER)
                .fetch_one(&mut *tx)
                .await
                .map_err(&fail)?;
            let counts: Vec<i64> = sqlx::query_scalar(HELD)
                .bind(i64::from(PRESENCE))
                .fetch_all(&mut *tx)
                .await
                .map_err(&fail)?;
            let refused = if !legacy_free {
                Some(
                    "a replica of an earlier version (one detection leader, no shards) runs detection on this database"
                        .to_owned(),
                )
            } else {
                counts.iter().find(|c| **c != i64::from(shards)).map(|c| {
                    format!(
                        "the replicas running detection use --detect-shards {c} and this one {shards}; every replica must use the same count"
                    )
                })
            };
            if refused.is_none() {
                sqlx::query("SELECT pg_advisory_lock_shared($1, $2)")
                    .bind(PRESENCE)
                    .bind(shards_key)
                    .execute(&mut *tx)
                    .await
                    .map_err(&fail)?;
            }
            tx.commit().await.map_err(&fail)?;
            refused
        };
        if let Some(why) = refused {
            // Closing the connection drops the shared legacy lock too.
            let _ = conn.close().await;
            return Ok(Joined::Refused(why));
        }
        let conn = std::sync::Arc::new(tokio::sync::Mutex::new(conn));
        let lost = tokio_util::sync::CancellationToken::new();
        let flag = lost.clone();
        let checked = conn.clone();
        let checker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCKS_CHECK).await;
                let mut conn = checked.lock().await;
                if sqlx::query("SELECT 1").execute(&mut *conn).await.is_err() {
                    flag.cancel();
                    return;
                }
            }
        });
        Ok(Joined::Member(ShardLocks::held(
            Box::new(PgLocks { conn, shards_key }),
            lost,
            checker,
        )))
    }
}

/// Shard locks on one dedicated connection (see [`ShardLocks`]).
struct PgLocks {
    /// The connection holding every lock of this replica.
    conn: std::sync::Arc<tokio::sync::Mutex<PgConnection>>,
    /// The shard count, the second key of the presence lock.
    shards_key: i32,
}

#[async_trait]
impl LockSession for PgLocks {
    async fn try_lock(&self, shards: &[u32], want: usize) -> StoreResult<Vec<u32>> {
        let fail = fail("shard locks", "failed to lock detection shards");
        let mut conn = self.conn.lock().await;
        // Skip the shards other replicas hold (one query instead of one
        // refused attempt each); a shard taken meanwhile is refused below.
        let taken: std::collections::HashSet<i64> = sqlx::query_scalar(HELD)
            .bind(i64::from(SHARD))
            .fetch_all(&mut *conn)
            .await
            .map_err(&fail)?
            .into_iter()
            .collect();
        let mut locked = Vec::new();
        for &shard in shards {
            if locked.len() >= want {
                break;
            }
            if taken.contains(&i64::from(shard)) {
                continue;
            }
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(SHARD)
                .bind(shard as i32)
                .fetch_one(&mut *conn)
                .await
                .map_err(&fail)?;
            if got {
                locked.push(shard);
            }
        }
        Ok(locked)
    }

    async fn unlock(&self, shard: u32) -> StoreResult<()> {
        let fail = fail("shard locks", "failed to unlock a detection shard");
        let mut conn = self.conn.lock().await;
        let held: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1, $2)")
            .bind(SHARD)
            .bind(shard as i32)
            .fetch_one(&mut *conn)
            .await
            .map_err(&fail)?;
        if !held {
            tracing::warn!(shard, "a detection shard to unlock was not locked");
        }
        Ok(())
    }

    async fn replicas(&self) -> StoreResult<u32> {
        let fail = fail("shard locks", "failed to count the detection replicas");
        let mut conn = self.conn.lock().await;
        let present: Vec<i64> = sqlx::query_scalar(HELD)
            .bind(i64::from(PRESENCE))
            .fetch_all(&mut *conn)
            .await
            .map_err(&fail)?;
        let same = present
            .iter()
            .filter(|c| **c == i64::from(self.shards_key))
            .count();
        Ok(u32::try_from(same).unwrap_or(u32::MAX).max(1))
    }
}

/// Inserts one tenant's events inside `tx` with one statement (UNNEST of
/// column arrays): the keys first into `event_keys`, skipping those already
/// there, then the events whose key was new; returns each event's outcome.
async fn insert_group(
    tx: &mut Transaction<'static, Postgres>,
    tenant: TenantId,
    events: &[NewEvent],
) -> Result<Vec<InsertOutcome>, sqlx::Error> {
    set_tenant(tx, tenant).await?;
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut idem = Vec::with_capacity(n);
    let mut occurred = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut classes = Vec::with_capacity(n);
    let mut categories = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut actions = Vec::with_capacity(n);
    let mut resources = Vec::with_capacity(n);
    let mut segments = Vec::with_capacity(n);
    let mut outcomes = Vec::with_capacity(n);
    let mut severities = Vec::with_capacity(n);
    let mut src = Vec::with_capacity(n);
    let mut dst = Vec::with_capacity(n);
    let mut systems = Vec::with_capacity(n);
    let mut services = Vec::with_capacity(n);
    let mut envs = Vec::with_capacity(n);
    let mut details = Vec::with_capacity(n);
    for e in events {
        ids.push(e.id);
        idem.push(e.idempotency_digest.to_vec());
        occurred.push(e.occurred_at);
        received.push(e.received_at);
        types.push(e.event_type.as_str());
        classes.push(e.ocsf_class_uid as i32);
        categories.push(e.ocsf_category_uid as i32);
        actors.push(e.actor.as_str());
        actions.push(e.action.as_str());
        resources.push(e.resource.as_str());
        segments.push(crate::domain::event::resource_segment(&e.resource));
        outcomes.push(e.outcome.as_i16());
        severities.push(e.severity.as_i16());
        src.push(e.source_ip.map(|ip| ip.to_string()));
        dst.push(e.destination_ip.map(|ip| ip.to_string()));
        systems.push(e.source_system.as_str());
        services.push(e.service.as_str());
        envs.push(e.environment.as_str());
        details.push(serde_json::to_string(&e.details).map_err(|e| sqlx::Error::Encode(e.into()))?);
    }
    let inserted: Vec<uuid::Uuid> = sqlx::query_scalar(
        "WITH u AS (SELECT * FROM unnest($2::uuid[], $3::bytea[], $4::timestamptz[], $5::timestamptz[], \
                     $6::text[], $7::int4[], $8::int4[], $9::text[], $10::text[], $11::text[], $12::int2[], \
                     $13::int2[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], \
                     $20::text[]) \
              AS u(id, idem, occurred_at, received_at, event_type, class, category, actor, action, resource, \
                   outcome, severity, src, dst, system, service, env, details, segment)), \
         keys AS (INSERT INTO event_keys (tenant_id, idem, id, occurred_at) \
                  SELECT $1, u.idem, u.id, u.occurred_at FROM u \
                  ON CONFLICT (tenant_id, idem) DO NOTHING RETURNING id) \
         INSERT INTO events (tenant_id, id, idem, occurred_at, received_at, event_type, ocsf_class_uid, \
         ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip, \
         source_system, service, environment, details, resource_segment) \
         SELECT $1, u.id, u.idem, u.occurred_at, u.received_at, u.event_type, u.class, u.category, u.actor, \
                u.action, u.resource, u.outcome, u.severity, u.src, u.dst, u.system, u.service, u.env, u.details::jsonb, \
                u.segment \
         FROM u \
         JOIN keys ON keys.id = u.id \
         RETURNING id",
    )
    .bind(tenant.0)
    .bind(&ids)
    .bind(&idem)
    .bind(&occurred)
    .bind(&received)
    .bind(&types)
    .bind(&classes)
    .bind(&categories)
    .bind(&actors)
    .bind(&actions)
    .bind(&resources)
    .bind(&outcomes)
    .bind(&severities)
    .bind(&src)
    .bind(&dst)
    .bind(&systems)
    .bind(&services)
    .bind(&envs)
    .bind(&details)
    .bind(&segments)
    .fetch_all(&mut **tx)
    .await?;
    let inserted: std::collections::HashSet<uuid::Uuid> = inserted.into_iter().collect();
    let missing: Vec<Vec<u8>> = events
        .iter()
        .filter(|e| !inserted.contains(&e.id))
        .map(|e| e.idempotency_digest.to_vec())
        .collect();
    let mut originals = std::collections::HashMap::new();
    if !missing.is_empty() {
        let rows: Vec<(Vec<u8>, uuid::Uuid)> = sqlx::query_as(
            "SELECT idem, id FROM event_keys WHERE tenant_id = $1 AND idem = ANY($2::bytea[])",
        )
        .bind(tenant.0)
        .bind(&missing)
        .fetch_all(&mut **tx)
        .await?;
        originals.extend(rows);
    }
    events
        .iter()
        .map(|e| {
            if inserted.contains(&e.id) {
                Ok(InsertOutcome::Accepted(e.id))
            } else {
                originals
                    .get(e.idempotency_digest.as_slice())
                    .map(|id| InsertOutcome::Duplicate(*id))
                    .ok_or_else(|| sqlx::Error::Protocol("conflicting row not found".into()))
            }
        })
        .collect()
}
