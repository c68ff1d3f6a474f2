//! PostgreSQL store. Connections run as `picket_app` (see
//! `migrations/postgres/0001_foundation.sql`), so row-level security applies to
//! every query; tenant-owned work happens in a transaction that first sets
//! `picket.tenant_id`.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, Executor, PgConnection, PgPool, Postgres, Row, Transaction};

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
#[derive(Clone)]
pub struct PgStore {
    /// Pool of connections that have all run `SET ROLE picket_app`.
    pool: PgPool,
    /// How to connect, for the dedicated leadership connection.
    options: PgConnectOptions,
}

/// How often a held leadership lock's connection is checked.
const LEADERSHIP_CHECK: Duration = Duration::from_secs(2);

impl PgStore {
    /// Migrates, then opens a pool of at most `max_connections`.
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Self> {
        migrate(url).await?;
        let options = PgConnectOptions::from_str(url).context("invalid Postgres URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("SET ROLE picket_app").await?;
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await
            .context("failed to open the Postgres pool")?;
        Ok(Self { pool, options })
    }

    /// The pool (for the conformance suite's RLS checks and for benchmarks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Begins a transaction bound to `tenant` for row-level security.
    pub(crate) async fn tenant_tx(
        &self,
        tenant: TenantId,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('picket.tenant_id', $1, true)")
            .bind(tenant.0.to_string())
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

fn tenant_from_row(row: &PgRow) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: TenantId(row.try_get("id")?),
        name: row.try_get("name")?,
        display_name: row.try_get("display_name")?,
        retention_days: row.try_get::<i32, _>("retention_days")?.max(0) as u32,
        created_at: row.try_get("created_at")?,
    })
}

fn key_from_row(row: &PgRow) -> Result<ApiKey, sqlx::Error> {
    let id: String = row.try_get("id")?;
    Ok(ApiKey {
        id: ApiKeyId::parse(&id)
            .ok_or_else(|| sqlx::Error::Decode("malformed api key id".into()))?,
        tenant_id: TenantId(row.try_get("tenant_id")?),
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
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, "ping", "failed to ping Postgres"))?;
        Ok(())
    }

    async fn try_lead(&self, role: &str) -> StoreResult<Option<super::Leadership>> {
        use sqlx::Connection;
        let fail = |e| StoreError::classify(e, "try_lead", "failed to take a leadership lock");
        let mut conn = sqlx::PgConnection::connect_with(&self.options)
            .await
            .map_err(fail)?;
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(format!("picket:{role}"))
            .fetch_one(&mut conn)
            .await
            .map_err(fail)?;
        if !held {
            let _ = conn.close().await;
            return Ok(None);
        }
        let lost = tokio_util::sync::CancellationToken::new();
        let flag = lost.clone();
        let holder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEADERSHIP_CHECK).await;
                if sqlx::query("SELECT 1").execute(&mut conn).await.is_err() {
                    flag.cancel();
                    return;
                }
            }
        });
        Ok(Some(super::Leadership::held(lost, holder)))
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::classify(e, "setting", "failed to read a setting"))
    }

    async fn put_setting_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
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
            "INSERT INTO tenants (id, name, display_name, retention_days, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(t.id.0)
        .bind(&t.name)
        .bind(&t.display_name)
        .bind(t.retention_days as i32)
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
            " FROM tenants WHERE id = $1"
        ))
        .bind(id.0)
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
            " FROM tenants WHERE name = $1"
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
            " FROM tenants WHERE name > $1 ORDER BY name LIMIT $2"
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
            sqlx::query("UPDATE tenants SET display_name = $2, retention_days = $3 WHERE id = $1")
                .bind(t.id.0)
                .bind(&t.display_name)
                .bind(t.retention_days as i32)
                .execute(&self.pool)
                .await
                .map_err(|e| StoreError::classify(e, "tenant", "failed to update a tenant"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("tenant {}", t.id)));
        }
        Ok(())
    }

    async fn create_api_key(&self, k: &ApiKey) -> StoreResult<()> {
        let ctx = "failed to insert an API key";
        let mut tx = self
            .tenant_tx(k.tenant_id)
            .await
            .map_err(|e| StoreError::classify(e, "api key", ctx))?;
        sqlx::query(concat!(
            "INSERT INTO api_keys (",
            key_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(k.id.as_str())
        .bind(k.tenant_id.0)
        .bind(&k.name)
        .bind(k.scopes.bits())
        .bind(&k.secret_hash)
        .bind(k.created_at)
        .bind(k.expires_at)
        .bind(k.revoked_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                StoreError::NotFound(format!("tenant {}", k.tenant_id))
            }
            _ => StoreError::classify(e, "api key", ctx),
        })?;
        tx.commit()
            .await
            .map_err(|e| StoreError::classify(e, "api key", ctx))?;
        Ok(())
    }

    async fn find_api_key(&self, id: &ApiKeyId) -> StoreResult<Option<ApiKey>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM picket_find_api_key($1)"
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
        let ctx = "failed to list API keys";
        let mut tx = self
            .tenant_tx(tenant)
            .await
            .map_err(|e| StoreError::classify(e, "api keys", ctx))?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, id"
        ))
        .bind(tenant.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| StoreError::classify(e, "api keys", ctx))?;
        tx.commit()
            .await
            .map_err(|e| StoreError::classify(e, "api keys", ctx))?;
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
        let ctx = "failed to revoke an API key";
        let what = format!("api key {id}");
        let mut tx = self
            .tenant_tx(tenant)
            .await
            .map_err(|e| StoreError::classify(e, &what, ctx))?;
        let row = sqlx::query(concat!("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) WHERE tenant_id = $1 AND id = $2 RETURNING ", key_columns!()))
        .bind(tenant.0)
        .bind(id.as_str())
        .bind(at)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| StoreError::classify(e, &what, ctx))?;
        tx.commit()
            .await
            .map_err(|e| StoreError::classify(e, &what, ctx))?;
        key_from_row(&row)
            .map_err(|e| StoreError::classify(e, &what, "failed to decode an API key"))
    }
}

/// Decodes an events row (with `xid_text` and `seq` columns).
fn event_from_row(row: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    let decode = |e: String| sqlx::Error::Decode(e.into());
    let details: serde_json::Value = row.try_get("details")?;
    let ip = |col: &str| -> Result<Option<std::net::IpAddr>, sqlx::Error> {
        row.try_get::<Option<String>, _>(col)?
            .map(|s| s.parse().map_err(|_| decode(format!("bad ip in {col}"))))
            .transpose()
    };
    let idem: Vec<u8> = row.try_get("idem")?;
    let xid: String = row.try_get("xid_text")?;
    Ok(StoredEvent {
        tenant_id: TenantId(row.try_get("tenant_id")?),
        position: FeedPosition {
            xid: xid.parse().map_err(|_| decode("bad xid".into()))?,
            seq: row.try_get("seq")?,
        },
        event: NewEvent {
            id: row.try_get("id")?,
            idempotency_digest: idem
                .try_into()
                .map_err(|_| decode("bad idempotency digest".into()))?,
            occurred_at: row.try_get("occurred_at")?,
            received_at: row.try_get("received_at")?,
            event_type: row.try_get("event_type")?,
            ocsf_class_uid: row.try_get::<i32, _>("ocsf_class_uid")? as u32,
            ocsf_category_uid: row.try_get::<i32, _>("ocsf_category_uid")? as u32,
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
            details: serde_json::from_value(details).map_err(|e| decode(e.to_string()))?,
        },
    })
}

macro_rules! event_columns {
    () => {
        "tenant_id, id, xid::text AS xid_text, seq, idem, occurred_at, received_at, event_type, \
         ocsf_class_uid, ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, \
         destination_ip, source_system, service, environment, details"
    };
}

impl PgStore {
    /// Inserts one tenant's events inside `tx` with one statement; fills `out`.
    async fn insert_group(
        tx: &mut Transaction<'static, Postgres>,
        tenant: TenantId,
        events: &[NewEvent],
    ) -> Result<Vec<InsertOutcome>, sqlx::Error> {
        sqlx::query("SELECT set_config('picket.tenant_id', $1, true)")
            .bind(tenant.0.to_string())
            .execute(&mut **tx)
            .await?;
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
            outcomes.push(e.outcome.as_i16());
            severities.push(e.severity.as_i16());
            src.push(e.source_ip.map(|ip| ip.to_string()));
            dst.push(e.destination_ip.map(|ip| ip.to_string()));
            systems.push(e.source_system.as_str());
            services.push(e.service.as_str());
            envs.push(e.environment.as_str());
            details.push(
                serde_json::to_string(&e.details).map_err(|e| sqlx::Error::Encode(e.into()))?,
            );
        }
        let inserted: Vec<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO events (tenant_id, id, idem, occurred_at, received_at, event_type, ocsf_class_uid, \
             ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, destination_ip, \
             source_system, service, environment, details) \
             SELECT $1, u.id, u.idem, u.occurred_at, u.received_at, u.event_type, u.class, u.category, u.actor, \
                    u.action, u.resource, u.outcome, u.severity, u.src, u.dst, u.system, u.service, u.env, u.details::jsonb \
             FROM unnest($2::uuid[], $3::bytea[], $4::timestamptz[], $5::timestamptz[], $6::text[], $7::int4[], \
                         $8::int4[], $9::text[], $10::text[], $11::text[], $12::int2[], $13::int2[], $14::text[], \
                         $15::text[], $16::text[], $17::text[], $18::text[], $19::text[]) \
                  AS u(id, idem, occurred_at, received_at, event_type, class, category, actor, action, resource, \
                       outcome, severity, src, dst, system, service, env, details) \
             ON CONFLICT (tenant_id, idem) DO NOTHING RETURNING id",
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
                "SELECT idem, id FROM events WHERE tenant_id = $1 AND idem = ANY($2::bytea[])",
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
}

#[async_trait]
impl EventStore for PgStore {
    async fn insert_events(
        &self,
        groups: &[(TenantId, &[NewEvent])],
    ) -> StoreResult<Vec<Vec<InsertOutcome>>> {
        let ctx = "failed to insert events";
        let classify = |e| StoreError::classify(e, "events", ctx);
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut out = Vec::with_capacity(groups.len());
        for (tenant, events) in groups {
            out.push(
                Self::insert_group(&mut tx, *tenant, events)
                    .await
                    .map_err(classify)?,
            );
        }
        tx.commit().await.map_err(classify)?;
        Ok(out)
    }

    async fn query_events(
        &self,
        tenant: TenantId,
        q: &EventQuery,
    ) -> StoreResult<Vec<StoredEvent>> {
        let ctx = "failed to query events";
        let classify = |e| StoreError::classify(e, "events", ctx);
        let mut b = sqlx::QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE tenant_id = "
        ));
        b.push_bind(tenant.0);
        push_range(&mut b, "occurred_at", q.start, q.end);
        if !q.event_types.is_empty() {
            b.push(" AND event_type = ANY(")
                .push_bind(q.event_types.clone())
                .push(")");
        }
        if !q.ocsf_class_uids.is_empty() {
            let c: Vec<i32> = q.ocsf_class_uids.iter().map(|c| *c as i32).collect();
            b.push(" AND ocsf_class_uid = ANY(").push_bind(c).push(")");
        }
        if let Some(a) = &q.actor {
            b.push(" AND actor = ").push_bind(a.clone());
        }
        if let Some(ip) = q.source_ip {
            b.push(" AND source_ip = ").push_bind(ip.to_string());
        }
        if let Some(p) = &q.resource_prefix {
            b.push(" AND starts_with(resource, ")
                .push_bind(p.clone())
                .push(")");
        }
        if let Some(o) = q.outcome {
            b.push(" AND outcome = ").push_bind(o.as_i16());
        }
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if let Some(t) = q.received_before {
            b.push(" AND received_at <= ").push_bind(t);
        }
        push_newest_first(&mut b, "occurred_at", q.before, q.limit);
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let rows = b.build().fetch_all(&mut *tx).await.map_err(classify)?;
        tx.commit().await.map_err(classify)?;
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
        let ctx = "failed to read the event feed";
        let classify = |e| StoreError::classify(e, "events", ctx);
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE tenant_id = $1 AND (xid, seq) > ($2::text::xid8, $3) \
              AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY xid, seq LIMIT $4"
        ))
        .bind(tenant.0)
        .bind(after.xid.to_string())
        .bind(after.seq)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn events_head(&self, tenant: TenantId) -> StoreResult<Option<FeedPosition>> {
        let ctx = "failed to read the event feed head";
        let classify = |e| StoreError::classify(e, "events", ctx);
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT xid::text, seq FROM events WHERE tenant_id = $1 \
             AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY xid DESC, seq DESC LIMIT 1",
        )
        .bind(tenant.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(row.map(|(xid, seq)| FeedPosition {
            xid: xid.parse().unwrap_or(0),
            seq,
        }))
    }

    async fn get_events(
        &self,
        tenant: TenantId,
        ids: &[uuid::Uuid],
    ) -> StoreResult<Vec<StoredEvent>> {
        let classify = |e| StoreError::classify(e, "events", "failed to read events");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE tenant_id = $1 AND id = ANY($2) ORDER BY occurred_at, id"
        ))
        .bind(tenant.0)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn purge_events(&self, tenant: TenantId, before: DateTime<Utc>) -> StoreResult<u64> {
        let ctx = "failed to purge events";
        let classify = |e| StoreError::classify(e, "events", ctx);
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let done = sqlx::query("DELETE FROM events WHERE tenant_id = $1 AND occurred_at < $2")
            .bind(tenant.0)
            .bind(before)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(done.rows_affected())
    }
}

fn alert_from_doc(doc: serde_json::Value) -> Result<Alert, sqlx::Error> {
    serde_json::from_value(doc).map_err(|e| sqlx::Error::Decode(e.into()))
}

fn doc_of(alert: &Alert) -> Result<serde_json::Value, sqlx::Error> {
    serde_json::to_value(alert).map_err(|e| sqlx::Error::Encode(e.into()))
}

impl PgStore {
    /// Raises or folds `new` inside `tx` (see [`AlertStore::raise_alert`]).
    async fn raise_in(
        tx: &mut Transaction<'static, Postgres>,
        tenant: TenantId,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<(Alert, bool), sqlx::Error> {
        // Serialize raises of one fingerprint so concurrent detections fold into one alert.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("{}/{}", tenant.0, new.fingerprint))
            .execute(&mut **tx)
            .await?;
        let existing: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT doc FROM alerts WHERE tenant_id = $1 AND fingerprint = $2 AND status IN (1, 2) \
             AND last_seen >= $3 ORDER BY last_seen DESC LIMIT 1 FOR UPDATE",
        )
        .bind(tenant.0)
        .bind(&new.fingerprint)
        .bind(new.first_seen - suppression)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(match existing {
            Some(doc) => {
                let mut alert = alert_from_doc(doc)?;
                alert.fold(new, now);
                Self::save_alert(tx, &alert, "updated", false).await?;
                (alert, false)
            }
            None => {
                let alert = Alert::from_new(tenant, new, now);
                Self::save_alert(tx, &alert, "created", true).await?;
                (alert, true)
            }
        })
    }

    /// Writes an alert row (insert or update) and its change-log entry inside `tx`.
    async fn save_alert(
        tx: &mut Transaction<'static, Postgres>,
        alert: &Alert,
        kind: &str,
        insert: bool,
    ) -> Result<(), sqlx::Error> {
        let doc = doc_of(alert)?;
        let sql = if insert {
            "INSERT INTO alerts (tenant_id, id, fingerprint, severity, status, category, last_seen, created_at, incident_id, doc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        } else {
            "UPDATE alerts SET fingerprint = $3, severity = $4, status = $5, category = $6, last_seen = $7, \
             created_at = $8, incident_id = $9, doc = $10 WHERE tenant_id = $1 AND id = $2"
        };
        sqlx::query(sql)
            .bind(alert.tenant_id.0)
            .bind(alert.id)
            .bind(&alert.fingerprint)
            .bind(alert.severity.as_i16())
            .bind(alert.status.as_i16())
            .bind(&alert.category)
            .bind(alert.last_seen)
            .bind(alert.created_at)
            .bind(alert.incident_id)
            .bind(&doc)
            .execute(&mut **tx)
            .await?;
        sqlx::query("INSERT INTO change_log (tenant_id, stream, subject_id, kind, payload) VALUES ($1, 'alerts', $2, $3, $4)")
            .bind(alert.tenant_id.0)
            .bind(alert.id)
            .bind(kind)
            .bind(&doc)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl AlertStore for PgStore {
    async fn raise_alert(
        &self,
        tenant: TenantId,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<(Alert, bool)> {
        let classify = |e| StoreError::classify(e, "alert", "failed to raise an alert");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let raised = Self::raise_in(&mut tx, tenant, new, suppression, now)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(raised)
    }

    async fn get_alert(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Alert> {
        let what = format!("alert {id}");
        let classify = |e| StoreError::classify(e, &what, "failed to read an alert");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let doc: serde_json::Value =
            sqlx::query_scalar("SELECT doc FROM alerts WHERE tenant_id = $1 AND id = $2")
                .bind(tenant.0)
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        alert_from_doc(doc).map_err(classify)
    }

    async fn list_alerts(&self, tenant: TenantId, q: &AlertQuery) -> StoreResult<Vec<Alert>> {
        let classify = |e| StoreError::classify(e, "alerts", "failed to list alerts");
        let mut b =
            sqlx::QueryBuilder::<Postgres>::new("SELECT doc FROM alerts WHERE tenant_id = ");
        b.push_bind(tenant.0);
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if !q.statuses.is_empty() {
            let v: Vec<i16> = q.statuses.iter().map(|s| s.as_i16()).collect();
            b.push(" AND status = ANY(").push_bind(v).push(")");
        }
        if let Some(c) = &q.category {
            b.push(" AND category = ").push_bind(c.clone());
        }
        if let Some(fp) = &q.fingerprint {
            b.push(" AND fingerprint = ").push_bind(fp.clone());
        }
        if let Some(e) = &q.entity {
            let needle = serde_json::json!({ "body": { "entities": [e] } });
            b.push(" AND doc @> ").push_bind(needle);
        }
        push_range(&mut b, "last_seen", q.start, q.end);
        push_newest_first(&mut b, "last_seen", q.before, q.limit);
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let docs: Vec<serde_json::Value> = b
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        docs.into_iter()
            .map(alert_from_doc)
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
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let doc: serde_json::Value = sqlx::query_scalar(
            "SELECT doc FROM alerts WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        )
        .bind(tenant.0)
        .bind(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        let mut alert = alert_from_doc(doc).map_err(classify)?;
        alert.body.history.push(crate::domain::alert::StatusChange {
            from: alert.status,
            to: status,
            by: by.to_owned(),
            at: now,
            note: note.to_owned(),
        });
        alert.status = status;
        alert.updated_at = now;
        Self::save_alert(&mut tx, &alert, "updated", false)
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
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let rows: Vec<(String, i64, String, uuid::Uuid, String, serde_json::Value)> =
            sqlx::query_as(
                "SELECT xid::text, seq, stream, subject_id, kind, payload FROM change_log \
             WHERE tenant_id = $1 AND stream = $2 AND (xid, seq) > ($3::text::xid8, $4) \
             AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY xid, seq LIMIT $5",
            )
            .bind(tenant.0)
            .bind(stream)
            .bind(after.xid.to_string())
            .bind(after.seq)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(rows
            .into_iter()
            .map(|(xid, seq, stream, subject_id, kind, payload)| Change {
                position: FeedPosition {
                    xid: xid.parse().unwrap_or(0),
                    seq,
                },
                stream,
                subject_id,
                kind,
                payload,
            })
            .collect())
    }

    async fn changes_head(
        &self,
        tenant: TenantId,
        stream: &str,
    ) -> StoreResult<Option<FeedPosition>> {
        let classify = |e| StoreError::classify(e, "changes", "failed to read the change log head");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT xid::text, seq FROM change_log WHERE tenant_id = $1 AND stream = $2 \
             AND xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY xid DESC, seq DESC LIMIT 1",
        )
        .bind(tenant.0)
        .bind(stream)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(row.map(|(xid, seq)| FeedPosition {
            xid: xid.parse().unwrap_or(0),
            seq,
        }))
    }
}

fn rule_from_row(row: &PgRow) -> Result<TenantRule, sqlx::Error> {
    Ok(TenantRule {
        tenant_id: TenantId(row.try_get("tenant_id")?),
        rule_id: row.try_get("rule_id")?,
        title: row.try_get("title")?,
        sigma_yaml: row.try_get("sigma_yaml")?,
        enabled: row.try_get("enabled")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

#[async_trait]
impl RuleStore for PgStore {
    async fn insert_tenant_rule(&self, r: &TenantRule) -> StoreResult<()> {
        let what = format!("rule {}", r.rule_id);
        let classify = |e| StoreError::classify(e, &what, "failed to store a rule");
        let mut tx = self.tenant_tx(r.tenant_id).await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO tenant_rules (tenant_id, rule_id, title, sigma_yaml, enabled, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(r.tenant_id.0)
        .bind(&r.rule_id)
        .bind(&r.title)
        .bind(&r.sigma_yaml)
        .bind(r.enabled)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn save_tenant_rule(&self, r: &TenantRule) -> StoreResult<()> {
        let what = format!("rule {}", r.rule_id);
        let classify = |e| StoreError::classify(e, &what, "failed to store a rule");
        let mut tx = self.tenant_tx(r.tenant_id).await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO tenant_rules (tenant_id, rule_id, title, sigma_yaml, enabled, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, rule_id) DO UPDATE SET \
             title = EXCLUDED.title, sigma_yaml = EXCLUDED.sigma_yaml, enabled = EXCLUDED.enabled, updated_at = EXCLUDED.updated_at",
        )
        .bind(r.tenant_id.0)
        .bind(&r.rule_id)
        .bind(&r.title)
        .bind(&r.sigma_yaml)
        .bind(r.enabled)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn list_tenant_rules(&self, tenant: TenantId) -> StoreResult<Vec<TenantRule>> {
        let classify = |e| StoreError::classify(e, "rules", "failed to list rules");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let rows = sqlx::query(
            "SELECT tenant_id, rule_id, title, sigma_yaml, enabled, created_at, updated_at FROM tenant_rules \
             WHERE tenant_id = $1 ORDER BY rule_id",
        )
        .bind(tenant.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        rows.iter()
            .map(rule_from_row)
            .collect::<Result<_, _>>()
            .map_err(classify)
    }

    async fn delete_tenant_rule(&self, tenant: TenantId, rule_id: &str) -> StoreResult<()> {
        let what = format!("rule {rule_id}");
        let classify = |e| StoreError::classify(e, &what, "failed to delete a rule");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let done = sqlx::query("DELETE FROM tenant_rules WHERE tenant_id = $1 AND rule_id = $2")
            .bind(tenant.0)
            .bind(rule_id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(what));
        }
        Ok(())
    }
}

#[async_trait]
impl ModelStore for PgStore {
    async fn save_model(&self, m: &StoredModel) -> StoreResult<()> {
        let classify = |e| StoreError::classify(e, "model", "failed to store a model");
        let mut tx = self.tenant_tx(m.tenant_id).await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO anomaly_models (tenant_id, algorithm, trained_at, windows, threshold, model) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, algorithm) DO UPDATE SET \
             trained_at = EXCLUDED.trained_at, windows = EXCLUDED.windows, threshold = EXCLUDED.threshold, model = EXCLUDED.model",
        )
        .bind(m.tenant_id.0)
        .bind(&m.algorithm)
        .bind(m.trained_at)
        .bind(m.windows as i32)
        .bind(m.threshold)
        .bind(&m.bytes)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }

    async fn load_model(
        &self,
        tenant: TenantId,
        algorithm: &str,
    ) -> StoreResult<Option<StoredModel>> {
        let classify = |e| StoreError::classify(e, "model", "failed to load a model");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let row: Option<(DateTime<Utc>, i32, f64, Vec<u8>)> = sqlx::query_as(
            "SELECT trained_at, windows, threshold, model FROM anomaly_models WHERE tenant_id = $1 AND algorithm = $2",
        )
        .bind(tenant.0)
        .bind(algorithm)
        .fetch_optional(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
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

fn source_from_row(row: &PgRow) -> Result<WebhookSource, sqlx::Error> {
    Ok(WebhookSource {
        tenant_id: TenantId(row.try_get("tenant_id")?),
        id: row.try_get("id")?,
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
impl WebhookStore for PgStore {
    async fn create_webhook_source(&self, w: &WebhookSource) -> StoreResult<()> {
        let ctx = "failed to insert a webhook source";
        let what = format!("webhook source `{}`", w.name);
        let mut tx = self
            .tenant_tx(w.tenant_id)
            .await
            .map_err(|e| StoreError::classify(e, &what, ctx))?;
        sqlx::query(concat!(
            "INSERT INTO webhook_sources (",
            source_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(w.tenant_id.0)
        .bind(w.id)
        .bind(&w.name)
        .bind(&w.sealed_secret)
        .bind(w.allow_body_only_signature)
        .bind(w.created_at)
        .bind(w.secret_rotated_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                StoreError::NotFound(format!("tenant {}", w.tenant_id))
            }
            _ => StoreError::classify(e, &what, ctx),
        })?;
        tx.commit()
            .await
            .map_err(|e| StoreError::classify(e, &what, ctx))?;
        Ok(())
    }

    async fn list_webhook_sources(&self, tenant: TenantId) -> StoreResult<Vec<WebhookSource>> {
        let classify =
            |e| StoreError::classify(e, "webhook sources", "failed to list webhook sources");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            source_columns!(),
            " FROM webhook_sources WHERE tenant_id = $1 ORDER BY name"
        ))
        .bind(tenant.0)
        .fetch_all(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
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
            " FROM picket_find_webhook_source($1)"
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
        let tenant: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT picket_webhook_source_tenant($1)")
                .bind(id)
                .fetch_one(&self.pool)
                .await
                .map_err(|e| {
                    StoreError::classify(e, "webhook source", "failed to look up a webhook source")
                })?;
        Ok(tenant.map(TenantId))
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
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let row = sqlx::query(concat!(
            "UPDATE webhook_sources SET secret = $3, secret_rotated_at = $4 WHERE tenant_id = $1 AND id = $2 RETURNING ",
            source_columns!()
        ))
        .bind(tenant.0)
        .bind(id)
        .bind(sealed_secret)
        .bind(at)
        .fetch_one(&mut *tx)
        .await
        .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        source_from_row(&row).map_err(classify)
    }

    async fn delete_webhook_source(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<()> {
        let what = format!("webhook source {id}");
        let classify = |e| StoreError::classify(e, &what, "failed to delete a webhook source");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let done = sqlx::query("DELETE FROM webhook_sources WHERE tenant_id = $1 AND id = $2")
            .bind(tenant.0)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(what));
        }
        tx.commit().await.map_err(classify)?;
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
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        if let Some(delivery) = delivery_id {
            // A concurrent insert of the same id waits here for the first
            // transaction, then conflicts: exactly one of them raises.
            let done = sqlx::query(
                "INSERT INTO webhook_deliveries (tenant_id, source_id, delivery_id, received_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (source_id, delivery_id) DO NOTHING",
            )
            .bind(tenant.0)
            .bind(source)
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
        let (alert, created) = Self::raise_in(&mut tx, tenant, new, suppression, now)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(DeliveryOutcome::Raised(Box::new(alert), created))
    }
}

impl PgStore {
    /// Points an alert at an incident (or none) inside `tx`, logging the alert change.
    async fn link_alert(
        tx: &mut Transaction<'static, Postgres>,
        tenant: TenantId,
        alert_id: uuid::Uuid,
        incident: Option<uuid::Uuid>,
    ) -> Result<(), sqlx::Error> {
        let doc: serde_json::Value = sqlx::query_scalar(
            "SELECT doc FROM alerts WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        )
        .bind(tenant.0)
        .bind(alert_id)
        .fetch_one(&mut **tx)
        .await?;
        let mut alert = alert_from_doc(doc)?;
        alert.incident_id = incident;
        alert.updated_at = Utc::now();
        Self::save_alert(tx, &alert, "updated", false).await
    }

    async fn log_incident(
        tx: &mut Transaction<'static, Postgres>,
        i: &Incident,
        entry: &TimelineEntry,
        kind: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO change_log (tenant_id, stream, subject_id, kind, payload) VALUES ($1, 'incidents', $2, $3, $4)")
            .bind(i.tenant_id.0)
            .bind(i.id)
            .bind(kind)
            .bind(crate::storage::incident_change_payload(i, entry, kind))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

fn incident_doc(i: &Incident) -> Result<serde_json::Value, sqlx::Error> {
    serde_json::to_value(i).map_err(|e| sqlx::Error::Encode(e.into()))
}

#[async_trait]
impl IncidentStore for PgStore {
    async fn insert_incident(
        &self,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[uuid::Uuid],
    ) -> StoreResult<Incident> {
        let classify = |e| StoreError::classify(e, "incident", "failed to create an incident");
        let mut i = incident.clone();
        i.version = 1;
        let mut tx = self.tenant_tx(i.tenant_id).await.map_err(classify)?;
        sqlx::query(
            "INSERT INTO incidents (tenant_id, id, version, status, severity, assignee, created_at, updated_at, doc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(i.tenant_id.0)
        .bind(i.id)
        .bind(i.version)
        .bind(i.status.as_i16())
        .bind(i.severity.as_i16())
        .bind(&i.assignee)
        .bind(i.created_at)
        .bind(i.updated_at)
        .bind(incident_doc(&i).map_err(classify)?)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        Self::log_incident(&mut tx, &i, entry, "created")
            .await
            .map_err(classify)?;
        for a in link {
            Self::link_alert(&mut tx, i.tenant_id, *a, Some(i.id))
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
        let mut tx = self.tenant_tx(i.tenant_id).await.map_err(classify)?;
        let done = sqlx::query(
            "UPDATE incidents SET version = $3, status = $4, severity = $5, assignee = $6, updated_at = $7, doc = $8 \
             WHERE tenant_id = $1 AND id = $2 AND version = $9",
        )
        .bind(i.tenant_id.0)
        .bind(i.id)
        .bind(i.version)
        .bind(i.status.as_i16())
        .bind(i.severity.as_i16())
        .bind(&i.assignee)
        .bind(i.updated_at)
        .bind(incident_doc(&i).map_err(classify)?)
        .bind(incident.version)
        .execute(&mut *tx)
        .await
        .map_err(classify)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "{what} (changed concurrently)"
            )));
        }
        Self::log_incident(&mut tx, &i, entry, "updated")
            .await
            .map_err(classify)?;
        for a in link {
            Self::link_alert(&mut tx, i.tenant_id, *a, Some(i.id))
                .await
                .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(i)
    }

    async fn get_incident(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Incident> {
        let what = format!("incident {id}");
        let classify = |e| StoreError::classify(e, &what, "failed to read an incident");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let doc: serde_json::Value =
            sqlx::query_scalar("SELECT doc FROM incidents WHERE tenant_id = $1 AND id = $2")
                .bind(tenant.0)
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        serde_json::from_value(doc)
            .map_err(|e| StoreError::Unexpected(anyhow::Error::new(e).context("bad incident doc")))
    }

    async fn list_incidents(
        &self,
        tenant: TenantId,
        q: &IncidentQuery,
    ) -> StoreResult<Vec<Incident>> {
        let classify = |e| StoreError::classify(e, "incidents", "failed to list incidents");
        let mut b =
            sqlx::QueryBuilder::<Postgres>::new("SELECT doc FROM incidents WHERE tenant_id = ");
        b.push_bind(tenant.0);
        if !q.statuses.is_empty() {
            let v: Vec<i16> = q.statuses.iter().map(|s| s.as_i16()).collect();
            b.push(" AND status = ANY(").push_bind(v).push(")");
        }
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if let Some(a) = &q.assignee {
            b.push(" AND assignee = ").push_bind(a.clone());
        }
        if let Some(e) = &q.entity {
            b.push(" AND doc @> ")
                .push_bind(serde_json::json!({ "entities": [e] }));
        }
        push_range(&mut b, "updated_at", q.start, q.end);
        push_newest_first(&mut b, "updated_at", q.before, q.limit);
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        let docs: Vec<serde_json::Value> = b
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        docs.into_iter()
            .map(|d| {
                serde_json::from_value(d).map_err(|e| {
                    StoreError::Unexpected(anyhow::Error::new(e).context("bad incident doc"))
                })
            })
            .collect()
    }

    async fn set_alert_incident(
        &self,
        tenant: TenantId,
        alert_id: uuid::Uuid,
        incident: Option<uuid::Uuid>,
    ) -> StoreResult<()> {
        let what = format!("alert {alert_id}");
        let classify = |e| StoreError::classify(e, &what, "failed to link an alert");
        let mut tx = self.tenant_tx(tenant).await.map_err(classify)?;
        Self::link_alert(&mut tx, tenant, alert_id, incident)
            .await
            .map_err(classify)?;
        tx.commit().await.map_err(classify)
    }
}

/// Appends `AND col >= start AND col < end` for the bounds that are set.
fn push_range(
    b: &mut sqlx::QueryBuilder<Postgres>,
    col: &'static str,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
) {
    if let Some(t) = start {
        b.push(format_args!(" AND {col} >= ")).push_bind(t);
    }
    if let Some(t) = end {
        b.push(format_args!(" AND {col} < ")).push_bind(t);
    }
}

/// Appends the keyset condition `(col, id) < before`, newest-first order and the limit.
fn push_newest_first(
    b: &mut sqlx::QueryBuilder<Postgres>,
    col: &'static str,
    before: Option<(DateTime<Utc>, uuid::Uuid)>,
    limit: u32,
) {
    if let Some((t, id)) = before {
        b.push(format_args!(" AND ({col}, id) < ("))
            .push_bind(t)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    b.push(format_args!(" ORDER BY {col} DESC, id DESC LIMIT "))
        .push_bind(i64::from(limit));
}
