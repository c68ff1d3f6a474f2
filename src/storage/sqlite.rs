//! Embedded SQLite store: one file, WAL journal, `synchronous = FULL` so a
//! committed write survives power loss, foreign keys on. SQLite has no
//! row-level security, so every tenant-owned query filters by `tenant_id`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row};
use uuid::Uuid;

use crate::domain::alert::{Alert, AlertQuery, AlertStatus, Change, NewAlert};
use crate::domain::event::{
    EventQuery, FeedPosition, InsertOutcome, NewEvent, Outcome, StoredEvent,
};
use crate::domain::incident::{Incident, IncidentQuery, TimelineEntry};
use crate::domain::rule::{StoredModel, TenantRule};
use crate::domain::webhook::{DeliveryOutcome, WebhookSource};
use crate::domain::{ApiKey, ApiKeyId, ScopeSet, Severity, Tenant, TenantId};
use crate::storage::{
    AlertStore, Backend, EventStore, IncidentStore, ModelStore, RuleStore, Store, StoreError,
    StoreResult, WebhookStore,
};

/// Connection options for `url`, creating the file's directory if needed.
fn options(url: &str) -> anyhow::Result<SqliteConnectOptions> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:")
        .split('?')
        .next()
        .unwrap_or_default();
    if let Some(dir) = Path::new(path)
        .parent()
        .filter(|d| !path.is_empty() && path != ":memory:" && !d.as_os_str().is_empty())
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

/// Store on an embedded SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    /// Connection pool; SQLite serializes writers itself (busy timeout 10 s).
    pool: SqlitePool,
    /// The serving lock, held as long as the store (see `storage/lock.rs`).
    _lock: Option<std::sync::Arc<crate::storage::lock::StoreLock>>,
}

impl SqliteStore {
    /// Migrates, then opens a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        Self::connect_locked(url, max_connections, None).await
    }

    /// [`SqliteStore::connect`], keeping `lock` (taken before) as long as the store.
    pub async fn connect_locked(
        url: &str,
        max_connections: u32,
        _lock: Option<crate::storage::lock::StoreLock>,
    ) -> anyhow::Result<Self> {
        migrate(url).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options(url)?)
            .await
            .context("failed to open the SQLite pool")?;
        let _lock = _lock.map(std::sync::Arc::new);
        Ok(Self { pool, _lock })
    }

    /// The pool (for the conformance suite and benchmarks).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(s).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn tenant_from_row(row: &SqliteRow) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: TenantId(parse_uuid(row.try_get("id")?)?),
        name: row.try_get("name")?,
        display_name: row.try_get("display_name")?,
        retention_days: row.try_get::<i64, _>("retention_days")?.max(0) as u32,
        created_at: row.try_get("created_at")?,
    })
}

fn key_from_row(row: &SqliteRow) -> Result<ApiKey, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(ApiKey {
        id: ApiKeyId::parse(&id)
            .ok_or_else(|| sqlx::Error::Decode("malformed api key id".into()))?,
        tenant_id: TenantId(parse_uuid(row.try_get("tenant_id")?)?),
        name: row.try_get("name")?,
        scopes: ScopeSet::from_bits(row.try_get("scopes")?),
        secret_hash: row.try_get("secret_hash")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

macro_rules! tenant_columns {
    () => {
        "id, name, display_name, retention_days, created_at"
    };
}
macro_rules! key_columns {
    () => {
        "id, tenant_id, name, scopes, secret_hash, created_at, expires_at, revoked_at"
    };
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, "ping", "failed to ping SQLite"))?;
        Ok(())
    }

    async fn try_lead(&self, _role: &str) -> StoreResult<Option<super::Leadership>> {
        Ok(Some(super::Leadership::sole()))
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = ?1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, "setting", "failed to read a setting"))
    }

    async fn put_setting_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "setting", "failed to write a setting"))?;
        self.get_setting(key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("setting {key}")))
    }

    async fn create_tenant(&self, t: &Tenant) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO tenants (id, name, display_name, retention_days, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(t.id.0.to_string())
        .bind(&t.name)
        .bind(&t.display_name)
        .bind(i64::from(t.retention_days))
        .bind(t.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, &format!("tenant `{}`", t.name), "failed to insert a tenant"))?;
        Ok(())
    }

    async fn get_tenant(&self, id: TenantId) -> StoreResult<Tenant> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE id = ?1"
        ))
        .bind(id.0.to_string())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, &format!("tenant {id}"), "failed to read a tenant"))?;
        tenant_from_row(&row)
            .map_err(|e| StoreError::classify(e, "tenant", "failed to decode a tenant"))
    }

    async fn find_tenant_by_name(&self, name: &str) -> StoreResult<Option<Tenant>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE name = ?1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "tenant", "failed to read a tenant"))?;
        row.as_ref()
            .map(tenant_from_row)
            .transpose()
            .map_err(|e| StoreError::classify(e, "tenant", "failed to decode a tenant"))
    }

    async fn list_tenants(&self, after_name: Option<&str>, limit: u32) -> StoreResult<Vec<Tenant>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE name > ?1 ORDER BY name LIMIT ?2"
        ))
        .bind(after_name.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "tenants", "failed to list tenants"))?;
        rows.iter()
            .map(tenant_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::classify(e, "tenant", "failed to decode a tenant"))
    }

    async fn update_tenant(&self, t: &Tenant) -> StoreResult<()> {
        let done =
            sqlx::query("UPDATE tenants SET display_name = ?2, retention_days = ?3 WHERE id = ?1")
                .bind(t.id.0.to_string())
                .bind(&t.display_name)
                .bind(i64::from(t.retention_days))
                .execute(&self.pool)
                .await
                .map_err(|e| StoreError::classify(e, "tenant", "failed to update a tenant"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("tenant {}", t.id)));
        }
        Ok(())
    }

    async fn create_api_key(&self, k: &ApiKey) -> StoreResult<()> {
        sqlx::query(concat!(
            "INSERT INTO api_keys (",
            key_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
        ))
        .bind(k.id.as_str())
        .bind(k.tenant_id.0.to_string())
        .bind(&k.name)
        .bind(k.scopes.bits())
        .bind(&k.secret_hash)
        .bind(k.created_at)
        .bind(k.expires_at)
        .bind(k.revoked_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                StoreError::NotFound(format!("tenant {}", k.tenant_id))
            }
            _ => StoreError::classify(e, "api key", "failed to insert an API key"),
        })?;
        Ok(())
    }

    async fn find_api_key(&self, id: &ApiKeyId) -> StoreResult<Option<ApiKey>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE id = ?1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "api key", "failed to look up an API key"))?;
        row.as_ref()
            .map(key_from_row)
            .transpose()
            .map_err(|e| StoreError::classify(e, "api key", "failed to decode an API key"))
    }

    async fn list_api_keys(&self, tenant: TenantId) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE tenant_id = ?1 ORDER BY created_at DESC, id"
        ))
        .bind(tenant.0.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "api keys", "failed to list API keys"))?;
        rows.iter()
            .map(key_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::classify(e, "api key", "failed to decode an API key"))
    }

    async fn revoke_api_key(
        &self,
        tenant: TenantId,
        id: &ApiKeyId,
        at: DateTime<Utc>,
    ) -> StoreResult<ApiKey> {
        let what = format!("api key {id}");
        let row = sqlx::query(concat!("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?3) WHERE tenant_id = ?1 AND id = ?2 RETURNING ", key_columns!()))
        .bind(tenant.0.to_string())
        .bind(id.as_str())
        .bind(at)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, &what, "failed to revoke an API key"))?;
        key_from_row(&row)
            .map_err(|e| StoreError::classify(e, &what, "failed to decode an API key"))
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| sqlx::Error::Decode("timestamp out of range".into()))
}

macro_rules! event_columns {
    () => {
        "tenant_id, id, xid, seq, idem, occurred_at, received_at, event_type, ocsf_class_uid, \
         ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip, \
         source_system, service, environment, details"
    };
}

fn event_from_row(row: &SqliteRow) -> Result<StoredEvent, sqlx::Error> {
    let decode = |e: String| sqlx::Error::Decode(e.into());
    let ip = |col: &str| -> Result<Option<std::net::IpAddr>, sqlx::Error> {
        row.try_get::<Option<String>, _>(col)?
            .map(|s| s.parse().map_err(|_| decode(format!("bad ip in {col}"))))
            .transpose()
    };
    let idem: Vec<u8> = row.try_get("idem")?;
    let details: String = row.try_get("details")?;
    Ok(StoredEvent {
        tenant_id: TenantId(parse_uuid(row.try_get("tenant_id")?)?),
        position: FeedPosition {
            xid: row.try_get::<i64, _>("xid")? as u64,
            seq: row.try_get("seq")?,
        },
        event: NewEvent {
            id: parse_uuid(row.try_get("id")?)?,
            idempotency_digest: idem
                .try_into()
                .map_err(|_| decode("bad idempotency digest".into()))?,
            occurred_at: from_micros(row.try_get("occurred_at")?)?,
            received_at: from_micros(row.try_get("received_at")?)?,
            event_type: row.try_get("event_type")?,
            ocsf_class_uid: row.try_get::<i64, _>("ocsf_class_uid")? as u32,
            ocsf_category_uid: row.try_get::<i64, _>("ocsf_category_uid")? as u32,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            resource: row.try_get("resource")?,
            outcome: Outcome::from_i16(row.try_get("outcome")?),
            severity: Severity::from_i16(row.try_get("severity")?).unwrap_or_default(),
            source_ip: ip("source_ip")?,
            destination_ip: ip("destination_ip")?,
            source_system: row.try_get("source_system")?,
            service: row.try_get("service")?,
            environment: row.try_get("environment")?,
            details: serde_json::from_str(&details).map_err(|e| decode(e.to_string()))?,
        },
    })
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn insert_events(
        &self,
        groups: &[(TenantId, &[NewEvent])],
    ) -> StoreResult<Vec<Vec<InsertOutcome>>> {
        let classify = |e| StoreError::classify(e, "events", "failed to insert events");
        // IMMEDIATE: take the write lock up front so concurrent writers queue
        // on the busy timeout instead of failing a lock upgrade.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
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
                .map_err(classify)?;
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
                    .map_err(classify)?;
                    outcomes.push(InsertOutcome::Duplicate(
                        parse_uuid(&original).map_err(classify)?,
                    ));
                }
            }
            out.push(outcomes);
        }
        tx.commit().await.map_err(classify)?;
        Ok(out)
    }

    async fn query_events(
        &self,
        tenant: TenantId,
        q: &EventQuery,
    ) -> StoreResult<Vec<StoredEvent>> {
        let classify = |e| StoreError::classify(e, "events", "failed to query events");
        let mut b = sqlx::QueryBuilder::<sqlx::Sqlite>::new(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE tenant_id = "
        ));
        b.push_bind(tenant.0.to_string());
        push_range(&mut b, "occurred_at", q.start, q.end);
        if !q.event_types.is_empty() {
            b.push(" AND event_type IN (");
            let mut sep = b.separated(", ");
            for t in &q.event_types {
                sep.push_bind(t.clone());
            }
            b.push(")");
        }
        if !q.ocsf_class_uids.is_empty() {
            b.push(" AND ocsf_class_uid IN (");
            let mut sep = b.separated(", ");
            for c in &q.ocsf_class_uids {
                sep.push_bind(i64::from(*c));
            }
            b.push(")");
        }
        if let Some(a) = &q.actor {
            b.push(" AND actor = ").push_bind(a.clone());
        }
        if let Some(ip) = q.source_ip {
            b.push(" AND source_ip = ").push_bind(ip.to_string());
        }
        if let Some(p) = &q.resource_prefix {
            b.push(" AND substr(resource, 1, length(")
                .push_bind(p.clone())
                .push(")) = ")
                .push_bind(p.clone());
        }
        if let Some(o) = q.outcome {
            b.push(" AND outcome = ").push_bind(o.as_i16());
        }
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if let Some(t) = q.received_before {
            b.push(" AND received_at <= ").push_bind(micros(t));
        }
        push_newest_first(&mut b, "occurred_at", q.before, q.limit);
        let rows = b.build().fetch_all(&self.pool).await.map_err(classify)?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn events_after(
        &self,
        tenant: TenantId,
        after: FeedPosition,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        let classify = |e| StoreError::classify(e, "events", "failed to read the event feed");
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE tenant_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
        ))
        .bind(tenant.0.to_string())
        .bind(after.seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn events_head(&self, tenant: TenantId) -> StoreResult<Option<FeedPosition>> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT max(seq) FROM events WHERE tenant_id = ?1")
                .bind(tenant.0.to_string())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| {
                    StoreError::classify(e, "events", "failed to read the event feed head")
                })?;
        Ok(seq.map(|seq| FeedPosition { xid: 0, seq }))
    }

    async fn get_events(
        &self,
        tenant: TenantId,
        ids: &[uuid::Uuid],
    ) -> StoreResult<Vec<StoredEvent>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut b = sqlx::QueryBuilder::<sqlx::Sqlite>::new(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE tenant_id = "
        ));
        b.push_bind(tenant.0.to_string()).push(" AND id IN (");
        let mut sep = b.separated(", ");
        for id in ids {
            sep.push_bind(id.to_string());
        }
        b.push(") ORDER BY occurred_at, id");
        let rows = b
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, "events", "failed to read events"))?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::classify(e, "events", "failed to decode events"))
    }

    async fn purge_events(&self, tenant: TenantId, before: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM events WHERE tenant_id = ?1 AND occurred_at < ?2")
            .bind(tenant.0.to_string())
            .bind(micros(before))
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, "events", "failed to purge events"))?;
        Ok(done.rows_affected())
    }
}

fn alert_from_doc(doc: &str) -> Result<Alert, sqlx::Error> {
    serde_json::from_str(doc).map_err(|e| sqlx::Error::Decode(e.into()))
}

/// Raises or folds `new` inside `tx` (see [`AlertStore::raise_alert`]).
async fn raise_in(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    tenant: TenantId,
    new: NewAlert,
    suppression: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<(Alert, bool), sqlx::Error> {
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT doc FROM alerts WHERE tenant_id = ?1 AND fingerprint = ?2 AND status IN (1, 2) \
         AND last_seen >= ?3 ORDER BY last_seen DESC LIMIT 1",
    )
    .bind(tenant.0.to_string())
    .bind(&new.fingerprint)
    .bind(micros(new.first_seen - suppression))
    .fetch_optional(&mut **tx)
    .await?;
    Ok(match existing {
        Some(doc) => {
            let mut alert = alert_from_doc(&doc)?;
            alert.fold(new, now);
            save_alert(tx, &alert, "updated", false, now).await?;
            (alert, false)
        }
        None => {
            let alert = Alert::from_new(tenant, new, now);
            save_alert(tx, &alert, "created", true, now).await?;
            (alert, true)
        }
    })
}

/// Writes an alert row (insert or update) and its change-log entry inside `tx`.
async fn save_alert(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    alert: &Alert,
    kind: &str,
    insert: bool,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let doc = serde_json::to_string(alert).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let sql = if insert {
        "INSERT INTO alerts (tenant_id, id, fingerprint, severity, status, category, last_seen, created_at, incident_id, doc) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    } else {
        "UPDATE alerts SET fingerprint = ?3, severity = ?4, status = ?5, category = ?6, last_seen = ?7, \
         created_at = ?8, incident_id = ?9, doc = ?10 WHERE tenant_id = ?1 AND id = ?2"
    };
    sqlx::query(sql)
        .bind(alert.tenant_id.0.to_string())
        .bind(alert.id.to_string())
        .bind(&alert.fingerprint)
        .bind(alert.severity.as_i16())
        .bind(alert.status.as_i16())
        .bind(&alert.category)
        .bind(micros(alert.last_seen))
        .bind(micros(alert.created_at))
        .bind(alert.incident_id.map(|i| i.to_string()))
        .bind(&doc)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO change_log (tenant_id, stream, subject_id, kind, payload, created_at) VALUES (?1, 'alerts', ?2, ?3, ?4, ?5)",
    )
    .bind(alert.tenant_id.0.to_string())
    .bind(alert.id.to_string())
    .bind(kind)
    .bind(&doc)
    .bind(micros(now))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl AlertStore for SqliteStore {
    async fn raise_alert(
        &self,
        tenant: TenantId,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<(Alert, bool)> {
        let classify = |e| StoreError::classify(e, "alert", "failed to raise an alert");
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        let raised = raise_in(&mut tx, tenant, new, suppression, now)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(raised)
    }

    async fn get_alert(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Alert> {
        let what = format!("alert {id}");
        let doc: String =
            sqlx::query_scalar("SELECT doc FROM alerts WHERE tenant_id = ?1 AND id = ?2")
                .bind(tenant.0.to_string())
                .bind(id.to_string())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| StoreError::classify(e, &what, "failed to read an alert"))?;
        alert_from_doc(&doc)
            .map_err(|e| StoreError::classify(e, &what, "failed to decode an alert"))
    }

    async fn list_alerts(&self, tenant: TenantId, q: &AlertQuery) -> StoreResult<Vec<Alert>> {
        let classify = |e| StoreError::classify(e, "alerts", "failed to list alerts");
        let mut b =
            sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT doc FROM alerts WHERE tenant_id = ");
        b.push_bind(tenant.0.to_string());
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if !q.statuses.is_empty() {
            b.push(" AND status IN (");
            let mut sep = b.separated(", ");
            for s in &q.statuses {
                sep.push_bind(s.as_i16());
            }
            b.push(")");
        }
        if let Some(c) = &q.category {
            b.push(" AND category = ").push_bind(c.clone());
        }
        if let Some(fp) = &q.fingerprint {
            b.push(" AND fingerprint = ").push_bind(fp.clone());
        }
        if let Some(e) = &q.entity {
            let kind =
                serde_json::to_value(e.kind).map_err(|e| StoreError::Unexpected(e.into()))?;
            b.push(" AND EXISTS (SELECT 1 FROM json_each(doc, '$.body.entities') j WHERE json_extract(j.value, '$.kind') = ")
                .push_bind(kind.as_str().unwrap_or_default().to_owned())
                .push(" AND json_extract(j.value, '$.value') = ")
                .push_bind(e.value.clone())
                .push(")");
        }
        push_range(&mut b, "last_seen", q.start, q.end);
        push_newest_first(&mut b, "last_seen", q.before, q.limit);
        let docs: Vec<String> = b
            .build_query_scalar()
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        docs.iter()
            .map(|d| alert_from_doc(d))
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn update_alert_status(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        status: AlertStatus,
        by: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Alert> {
        let what = format!("alert {id}");
        let classify = |e| StoreError::classify(e, &what, "failed to update an alert");
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        let doc: String =
            sqlx::query_scalar("SELECT doc FROM alerts WHERE tenant_id = ?1 AND id = ?2")
                .bind(tenant.0.to_string())
                .bind(id.to_string())
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        let mut alert = alert_from_doc(&doc).map_err(classify)?;
        alert.body.history.push(crate::domain::alert::StatusChange {
            from: alert.status,
            to: status,
            by: by.to_owned(),
            at: now,
            note: note.to_owned(),
        });
        alert.status = status;
        alert.updated_at = now;
        save_alert(&mut tx, &alert, "updated", false, now)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(alert)
    }

    async fn changes_after(
        &self,
        tenant: TenantId,
        stream: &str,
        after: FeedPosition,
        limit: u32,
    ) -> StoreResult<Vec<Change>> {
        let classify = |e| StoreError::classify(e, "changes", "failed to read the change log");
        let rows: Vec<(i64, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, stream, subject_id, kind, payload FROM change_log \
             WHERE tenant_id = ?1 AND stream = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
        )
        .bind(tenant.0.to_string())
        .bind(stream)
        .bind(after.seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.into_iter()
            .map(|(seq, stream, subject, kind, payload)| {
                Ok(Change {
                    position: FeedPosition { xid: 0, seq },
                    stream,
                    subject_id: parse_uuid(&subject)?,
                    kind,
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| sqlx::Error::Decode(e.into()))?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(classify)
    }

    async fn changes_head(
        &self,
        tenant: TenantId,
        stream: &str,
    ) -> StoreResult<Option<FeedPosition>> {
        let seq: Option<i64> = sqlx::query_scalar(
            "SELECT max(seq) FROM change_log WHERE tenant_id = ?1 AND stream = ?2",
        )
        .bind(tenant.0.to_string())
        .bind(stream)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "changes", "failed to read the change log head"))?;
        Ok(seq.map(|seq| FeedPosition { xid: 0, seq }))
    }
}

fn rule_from_row(row: &SqliteRow) -> Result<TenantRule, sqlx::Error> {
    Ok(TenantRule {
        tenant_id: TenantId(parse_uuid(row.try_get("tenant_id")?)?),
        rule_id: row.try_get("rule_id")?,
        title: row.try_get("title")?,
        sigma_yaml: row.try_get("sigma_yaml")?,
        enabled: row.try_get("enabled")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

#[async_trait]
impl RuleStore for SqliteStore {
    async fn insert_tenant_rule(&self, r: &TenantRule) -> StoreResult<()> {
        let what = format!("rule {}", r.rule_id);
        sqlx::query(
            "INSERT INTO tenant_rules (tenant_id, rule_id, title, sigma_yaml, enabled, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(r.tenant_id.0.to_string())
        .bind(&r.rule_id)
        .bind(&r.title)
        .bind(&r.sigma_yaml)
        .bind(r.enabled)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, &what, "failed to store a rule"))?;
        Ok(())
    }

    async fn save_tenant_rule(&self, r: &TenantRule) -> StoreResult<()> {
        let what = format!("rule {}", r.rule_id);
        sqlx::query(
            "INSERT INTO tenant_rules (tenant_id, rule_id, title, sigma_yaml, enabled, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (tenant_id, rule_id) DO UPDATE SET \
             title = excluded.title, sigma_yaml = excluded.sigma_yaml, enabled = excluded.enabled, updated_at = excluded.updated_at",
        )
        .bind(r.tenant_id.0.to_string())
        .bind(&r.rule_id)
        .bind(&r.title)
        .bind(&r.sigma_yaml)
        .bind(r.enabled)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, &what, "failed to store a rule"))?;
        Ok(())
    }

    async fn list_tenant_rules(&self, tenant: TenantId) -> StoreResult<Vec<TenantRule>> {
        let rows = sqlx::query(
            "SELECT tenant_id, rule_id, title, sigma_yaml, enabled, created_at, updated_at FROM tenant_rules \
             WHERE tenant_id = ?1 ORDER BY rule_id",
        )
        .bind(tenant.0.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "rules", "failed to list rules"))?;
        rows.iter()
            .map(rule_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::classify(e, "rules", "failed to decode rules"))
    }

    async fn delete_tenant_rule(&self, tenant: TenantId, rule_id: &str) -> StoreResult<()> {
        let what = format!("rule {rule_id}");
        let done = sqlx::query("DELETE FROM tenant_rules WHERE tenant_id = ?1 AND rule_id = ?2")
            .bind(tenant.0.to_string())
            .bind(rule_id)
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, &what, "failed to delete a rule"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(what));
        }
        Ok(())
    }
}

#[async_trait]
impl ModelStore for SqliteStore {
    async fn save_model(&self, m: &StoredModel) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO anomaly_models (tenant_id, algorithm, trained_at, windows, threshold, model) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (tenant_id, algorithm) DO UPDATE SET \
             trained_at = excluded.trained_at, windows = excluded.windows, threshold = excluded.threshold, model = excluded.model",
        )
        .bind(m.tenant_id.0.to_string())
        .bind(&m.algorithm)
        .bind(m.trained_at)
        .bind(i64::from(m.windows))
        .bind(m.threshold)
        .bind(&m.bytes)
        .execute(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "model", "failed to store a model"))?;
        Ok(())
    }

    async fn load_model(
        &self,
        tenant: TenantId,
        algorithm: &str,
    ) -> StoreResult<Option<StoredModel>> {
        let row: Option<(DateTime<Utc>, i64, f64, Vec<u8>)> = sqlx::query_as(
            "SELECT trained_at, windows, threshold, model FROM anomaly_models WHERE tenant_id = ?1 AND algorithm = ?2",
        )
        .bind(tenant.0.to_string())
        .bind(algorithm)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::classify(e, "model", "failed to load a model"))?;
        Ok(
            row.map(|(trained_at, windows, threshold, bytes)| StoredModel {
                tenant_id: tenant,
                algorithm: algorithm.to_owned(),
                trained_at,
                windows: windows.max(0) as u32,
                threshold,
                bytes,
            }),
        )
    }
}

fn source_from_row(row: &SqliteRow) -> Result<WebhookSource, sqlx::Error> {
    Ok(WebhookSource {
        tenant_id: TenantId(parse_uuid(row.try_get("tenant_id")?)?),
        id: parse_uuid(row.try_get("id")?)?,
        name: row.try_get("name")?,
        sealed_secret: row.try_get("secret")?,
        allow_body_only_signature: row.try_get("allow_body_only_signature")?,
        created_at: row.try_get("created_at")?,
        secret_rotated_at: row.try_get("secret_rotated_at")?,
    })
}

macro_rules! source_columns {
    () => {
        "tenant_id, id, name, secret, allow_body_only_signature, created_at, secret_rotated_at"
    };
}

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn create_webhook_source(&self, w: &WebhookSource) -> StoreResult<()> {
        let what = format!("webhook source `{}`", w.name);
        sqlx::query(concat!(
            "INSERT INTO webhook_sources (",
            source_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ))
        .bind(w.tenant_id.0.to_string())
        .bind(w.id.to_string())
        .bind(&w.name)
        .bind(&w.sealed_secret)
        .bind(w.allow_body_only_signature)
        .bind(w.created_at)
        .bind(w.secret_rotated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                StoreError::NotFound(format!("tenant {}", w.tenant_id))
            }
            _ => StoreError::classify(e, &what, "failed to insert a webhook source"),
        })?;
        Ok(())
    }

    async fn list_webhook_sources(&self, tenant: TenantId) -> StoreResult<Vec<WebhookSource>> {
        let classify =
            |e| StoreError::classify(e, "webhook sources", "failed to list webhook sources");
        let rows = sqlx::query(concat!(
            "SELECT ",
            source_columns!(),
            " FROM webhook_sources WHERE tenant_id = ?1 ORDER BY name"
        ))
        .bind(tenant.0.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        rows.iter()
            .map(source_from_row)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn find_webhook_source(&self, name: &str) -> StoreResult<Option<WebhookSource>> {
        let classify =
            |e| StoreError::classify(e, "webhook source", "failed to look up a webhook source");
        let row = sqlx::query(concat!(
            "SELECT ",
            source_columns!(),
            " FROM webhook_sources WHERE name = ?1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(classify)?;
        row.as_ref()
            .map(source_from_row)
            .transpose()
            .map_err(classify)
    }

    async fn webhook_source_tenant(&self, id: uuid::Uuid) -> StoreResult<Option<TenantId>> {
        let classify =
            |e| StoreError::classify(e, "webhook source", "failed to look up a webhook source");
        let tenant: Option<String> =
            sqlx::query_scalar("SELECT tenant_id FROM webhook_sources WHERE id = ?1")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(classify)?;
        tenant
            .map(|t| parse_uuid(&t).map(TenantId))
            .transpose()
            .map_err(classify)
    }

    async fn rotate_webhook_secret(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        sealed_secret: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<WebhookSource> {
        let what = format!("webhook source {id}");
        let classify = |e| StoreError::classify(e, &what, "failed to rotate a webhook secret");
        let row = sqlx::query(concat!(
            "UPDATE webhook_sources SET secret = ?3, secret_rotated_at = ?4 WHERE tenant_id = ?1 AND id = ?2 RETURNING ",
            source_columns!()
        ))
        .bind(tenant.0.to_string())
        .bind(id.to_string())
        .bind(sealed_secret)
        .bind(at)
        .fetch_one(&self.pool)
        .await
        .map_err(classify)?;
        source_from_row(&row).map_err(classify)
    }

    async fn delete_webhook_source(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<()> {
        let what = format!("webhook source {id}");
        let done = sqlx::query("DELETE FROM webhook_sources WHERE tenant_id = ?1 AND id = ?2")
            .bind(tenant.0.to_string())
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, &what, "failed to delete a webhook source"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(what));
        }
        Ok(())
    }

    async fn raise_webhook_alert(
        &self,
        tenant: TenantId,
        source: uuid::Uuid,
        delivery_id: Option<&str>,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<DeliveryOutcome> {
        let classify =
            |e| StoreError::classify(e, "webhook delivery", "failed to record a webhook delivery");
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        if let Some(delivery) = delivery_id {
            let done = sqlx::query(
                "INSERT INTO webhook_deliveries (tenant_id, source_id, delivery_id, received_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (source_id, delivery_id) DO NOTHING",
            )
            .bind(tenant.0.to_string())
            .bind(source.to_string())
            .bind(delivery)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                    StoreError::NotFound(format!("webhook source {source}"))
                }
                _ => classify(e),
            })?;
            if done.rows_affected() == 0 {
                tx.rollback().await.map_err(classify)?;
                return Ok(DeliveryOutcome::Duplicate);
            }
        }
        let (alert, created) = raise_in(&mut tx, tenant, new, suppression, now)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(DeliveryOutcome::Raised(Box::new(alert), created))
    }
}

/// Points an alert at an incident (or none) inside `tx`, logging the alert change.
async fn link_alert(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    tenant: TenantId,
    alert_id: uuid::Uuid,
    incident: Option<uuid::Uuid>,
) -> Result<(), sqlx::Error> {
    let doc: String = sqlx::query_scalar("SELECT doc FROM alerts WHERE tenant_id = ?1 AND id = ?2")
        .bind(tenant.0.to_string())
        .bind(alert_id.to_string())
        .fetch_one(&mut **tx)
        .await?;
    let mut alert = alert_from_doc(&doc)?;
    alert.incident_id = incident;
    let now = Utc::now();
    alert.updated_at = now;
    save_alert(tx, &alert, "updated", false, now).await
}

async fn log_incident(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    i: &Incident,
    entry: &TimelineEntry,
    kind: &str,
) -> Result<(), sqlx::Error> {
    let payload = crate::storage::incident_change_payload(i, entry, kind).to_string();
    sqlx::query(
        "INSERT INTO change_log (tenant_id, stream, subject_id, kind, payload, created_at) VALUES (?1, 'incidents', ?2, ?3, ?4, ?5)",
    )
    .bind(i.tenant_id.0.to_string())
    .bind(i.id.to_string())
    .bind(kind)
    .bind(payload)
    .bind(micros(Utc::now()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn incident_from_doc(doc: &str) -> StoreResult<Incident> {
    serde_json::from_str(doc)
        .map_err(|e| StoreError::Unexpected(anyhow::Error::new(e).context("bad incident doc")))
}

#[async_trait]
impl IncidentStore for SqliteStore {
    async fn insert_incident(
        &self,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[uuid::Uuid],
    ) -> StoreResult<Incident> {
        let classify = |e| StoreError::classify(e, "incident", "failed to create an incident");
        let mut i = incident.clone();
        i.version = 1;
        let doc = serde_json::to_string(&i).map_err(|e| StoreError::Unexpected(e.into()))?;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        sqlx::query(
            "INSERT INTO incidents (tenant_id, id, version, status, severity, assignee, created_at, updated_at, doc) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(i.tenant_id.0.to_string())
        .bind(i.id.to_string())
        .bind(i.version)
        .bind(i.status.as_i16())
        .bind(i.severity.as_i16())
        .bind(&i.assignee)
        .bind(micros(i.created_at))
        .bind(micros(i.updated_at))
        .bind(doc)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        log_incident(&mut tx, &i, entry, "created")
            .await
            .map_err(classify)?;
        for a in link {
            link_alert(&mut tx, i.tenant_id, *a, Some(i.id))
                .await
                .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(i)
    }

    async fn update_incident(
        &self,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[uuid::Uuid],
    ) -> StoreResult<Incident> {
        let what = format!("incident {}", incident.id);
        let classify = |e| StoreError::classify(e, &what, "failed to update an incident");
        let mut i = incident.clone();
        i.version = incident.version + 1;
        let doc = serde_json::to_string(&i).map_err(|e| StoreError::Unexpected(e.into()))?;
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        let done = sqlx::query(
            "UPDATE incidents SET version = ?3, status = ?4, severity = ?5, assignee = ?6, updated_at = ?7, doc = ?8 \
             WHERE tenant_id = ?1 AND id = ?2 AND version = ?9",
        )
        .bind(i.tenant_id.0.to_string())
        .bind(i.id.to_string())
        .bind(i.version)
        .bind(i.status.as_i16())
        .bind(i.severity.as_i16())
        .bind(&i.assignee)
        .bind(micros(i.updated_at))
        .bind(doc)
        .bind(incident.version)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "{what} (changed concurrently)"
            )));
        }
        log_incident(&mut tx, &i, entry, "updated")
            .await
            .map_err(classify)?;
        for a in link {
            link_alert(&mut tx, i.tenant_id, *a, Some(i.id))
                .await
                .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(i)
    }

    async fn get_incident(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Incident> {
        let what = format!("incident {id}");
        let doc: String =
            sqlx::query_scalar("SELECT doc FROM incidents WHERE tenant_id = ?1 AND id = ?2")
                .bind(tenant.0.to_string())
                .bind(id.to_string())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| StoreError::classify(e, &what, "failed to read an incident"))?;
        incident_from_doc(&doc)
    }

    async fn list_incidents(
        &self,
        tenant: TenantId,
        q: &IncidentQuery,
    ) -> StoreResult<Vec<Incident>> {
        let classify = |e| StoreError::classify(e, "incidents", "failed to list incidents");
        let mut b =
            sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT doc FROM incidents WHERE tenant_id = ");
        b.push_bind(tenant.0.to_string());
        if !q.statuses.is_empty() {
            b.push(" AND status IN (");
            let mut sep = b.separated(", ");
            for s in &q.statuses {
                sep.push_bind(s.as_i16());
            }
            b.push(")");
        }
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if let Some(a) = &q.assignee {
            b.push(" AND assignee = ").push_bind(a.clone());
        }
        if let Some(e) = &q.entity {
            let kind =
                serde_json::to_value(e.kind).map_err(|e| StoreError::Unexpected(e.into()))?;
            b.push(" AND EXISTS (SELECT 1 FROM json_each(doc, '$.entities') j WHERE json_extract(j.value, '$.kind') = ")
                .push_bind(kind.as_str().unwrap_or_default().to_owned())
                .push(" AND json_extract(j.value, '$.value') = ")
                .push_bind(e.value.clone())
                .push(")");
        }
        push_range(&mut b, "updated_at", q.start, q.end);
        push_newest_first(&mut b, "updated_at", q.before, q.limit);
        let docs: Vec<String> = b
            .build_query_scalar()
            .fetch_all(&self.pool)
            .await
            .map_err(classify)?;
        docs.iter().map(|d| incident_from_doc(d)).collect()
    }

    async fn set_alert_incident(
        &self,
        tenant: TenantId,
        alert_id: uuid::Uuid,
        incident: Option<uuid::Uuid>,
    ) -> StoreResult<()> {
        let what = format!("alert {alert_id}");
        let classify = |e| StoreError::classify(e, &what, "failed to link an alert");
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(classify)?;
        link_alert(&mut tx, tenant, alert_id, incident)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }
}

/// Appends `AND col >= start AND col < end` (microseconds) for the bounds that are set.
fn push_range(
    b: &mut sqlx::QueryBuilder<sqlx::Sqlite>,
    col: &'static str,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
) {
    if let Some(t) = start {
        b.push(format_args!(" AND {col} >= ")).push_bind(micros(t));
    }
    if let Some(t) = end {
        b.push(format_args!(" AND {col} < ")).push_bind(micros(t));
    }
}

/// Appends the keyset condition `(col, id) < before`, newest-first order and the limit.
fn push_newest_first(
    b: &mut sqlx::QueryBuilder<sqlx::Sqlite>,
    col: &'static str,
    before: Option<(DateTime<Utc>, uuid::Uuid)>,
    limit: u32,
) {
    if let Some((t, id)) = before {
        b.push(format_args!(" AND ({col}, id) < ("))
            .push_bind(micros(t))
            .push(", ")
            .push_bind(id.to_string())
            .push(")");
    }
    b.push(format_args!(" ORDER BY {col} DESC, id DESC LIMIT "))
        .push_bind(i64::from(limit));
}
