//! Storage: one trait that speaks domain types, one implementation for every
//! SQL backend.
//!
//! The backend is chosen by the URL scheme (`postgres://`, `postgresql://` or
//! `sqlite:`). Each query is written once in `sql.rs` ([`SqlStore`]); a
//! backend's real differences are its `Dialect` (`dialect.rs`), implemented in
//! `postgres.rs` and `sqlite.rs`. Both run the same conformance suite
//! (`tests/storage`).
//!
//! **Architecture invariant:** only this module knows sqlx. Tenant-owned data is
//! always read and written through a method that takes the caller's
//! [`TenantId`]; on Postgres, row-level security enforces it a second time.

pub mod ceiling;
mod decisions;
mod dialect;
pub mod lock;
mod postgres;
mod reports;
mod rollups;
pub mod scratch;
mod sql;
mod sqlite;
mod store;

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};

use crate::domain::alert::{Alert, AlertQuery, AlertStatus, Change, NewAlert};
use crate::domain::decision::{
    Decision, DecisionHead, DecisionLogEntry, DecisionQuery, TargetState,
};
use crate::domain::event::{EventQuery, FeedPosition, InsertOutcome, NewEvent, StoredEvent};
use crate::domain::incident::{Incident, IncidentQuery, TimelineEntry};
use crate::domain::playbook::{NotificationSettings, Playbook, PlaybookRun, RunQuery, RunStatus};
use crate::domain::report::{
    AccessQuery, AccessRow, CriticalAlert, EntityCount, EventCounts, IncidentHistory, ReportRange,
    RuleCount,
};
use crate::domain::rule::{StoredModel, TenantRule};
use crate::domain::webhook::{DeliveryOutcome, WebhookSource};
use crate::domain::{ApiKey, ApiKeyId, Severity, Tenant, TenantId};

pub use postgres::PgStore;
pub use sql::SqlStore;
pub use sqlite::SqliteStore;

/// Result of a storage operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// Why a storage operation failed, classified the same way on every backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist (or belongs to another tenant).
    #[error("{0} not found")]
    NotFound(String),
    /// A unique constraint refused the write.
    #[error("{0} already exists")]
    Conflict(String),
    /// The write would exceed a limit (decisions in force per tenant or per
    /// target); nothing was written.
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// The store could not be reached or is restarting (connection lost or
    /// refused, pool exhausted or closed, the server shutting down): the
    /// failed transaction did not commit, and trying again later can
    /// succeed. Carries the cause chain for the logs, never for clients.
    #[error("store unavailable: {0:#}")]
    Unavailable(anyhow::Error),
    /// The database is out of disk space (SQLite `SQLITE_FULL`, Postgres
    /// `53100`): the failed transaction did not commit; writes can succeed
    /// again once space is freed, reads go on.
    #[error("store out of disk space: {0:#}")]
    Full(anyhow::Error),
    /// Anything else; carries the cause chain for the logs, never for clients.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl StoreError {
    /// Classifies a sqlx error portably: unique violations become `Conflict(what)`.
    pub(crate) fn classify(err: sqlx::Error, what: &str, context: &'static str) -> Self {
        match &err {
            sqlx::Error::RowNotFound => Self::NotFound(what.to_owned()),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                Self::Conflict(what.to_owned())
            }
            _ if Self::is_disk_full(&err) => Self::Full(anyhow::Error::new(err).context(context)),
            _ if Self::is_outage(&err) => {
                Self::Unavailable(anyhow::Error::new(err).context(context))
            }
            _ => Self::Unexpected(anyhow::Error::new(err).context(context)),
        }
    }

    /// Whether `err` says the database has no disk space left.
    fn is_disk_full(err: &sqlx::Error) -> bool {
        let sqlx::Error::Database(db) = err else {
            return false;
        };
        let code = db.code().unwrap_or_default();
        if db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some()
        {
            code == "53100"
        } else {
            code.parse::<i32>().is_ok_and(|c| c & 0xff == 13)
        }
    }

    /// Whether `err` says the database is out of reach rather than that the
    /// statement failed: the connection broke or was refused, the pool timed
    /// out or closed, or Postgres ended the session (SQLSTATE class 08,
    /// `57P01`–`57P03` shutdown and recovery, `53300` too many connections);
    /// on SQLite, a lock held past the busy timeout (`SQLITE_BUSY`).
    fn is_outage(err: &sqlx::Error) -> bool {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                {
                    code.starts_with("08") || code.starts_with("57P") || code == "53300"
                } else {
                    code.parse::<i32>().is_ok_and(|c| c & 0xff == 5)
                }
            }
            _ => false,
        }
    }

    /// Whether the database refused the data itself (a constraint, a value it
    /// cannot store), as opposed to failing for a reason outside it (connection,
    /// overload, shutdown): resending the same data would fail the same way.
    /// Portable: constraint kinds on both backends, SQLSTATE class 22 (data
    /// exception) on Postgres, SQLITE_TOOBIG and SQLITE_MISMATCH on SQLite.
    pub fn is_refused_data(&self) -> bool {
        let Self::Unexpected(e) = self else {
            return matches!(self, Self::Conflict(_));
        };
        e.chain().any(|cause| {
            let Some(sqlx::Error::Database(db)) = cause.downcast_ref::<sqlx::Error>() else {
                return false;
            };
            if db.kind() != sqlx::error::ErrorKind::Other {
                return true;
            }
            let code = db.code().unwrap_or_default();
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                code.starts_with("22")
            } else {
                code.parse::<i32>()
                    .is_ok_and(|c| matches!(c & 0xff, 18 | 20))
            }
        })
    }
}

/// Which backend a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL (production; row-level security).
    Postgres,
    /// Embedded SQLite file (default; zero setup).
    Sqlite,
}

impl Backend {
    /// The backend a database URL selects, or `None` for an unknown scheme.
    pub fn from_url(url: &str) -> Option<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else {
            None
        }
    }

    /// Lower-case name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        }
    }
}

/// This replica's seat in detection over the store: its presence among the
/// replicas that run detection (counted by [`ShardLocks::replicas`]) and the
/// locks of the detection shards it leads (see `pipeline/shards.rs`).
///
/// On Postgres everything is a session advisory lock on ONE dedicated
/// connection: presence is a shared lock keyed by the shard count (so
/// replicas can see which count the others use), each shard an exclusive
/// lock. When the connection ends, by [`Drop`] or because the process died,
/// the server releases them all at once, and the other replicas see the
/// shards free and the replica gone. A background check pings the connection
/// and cancels [`ShardLocks::lost`] when it fails. SQLite has one process,
/// which is alone and may lock every shard.
pub struct ShardLocks {
    /// The backend's locks.
    session: Box<dyn LockSession>,
    /// Cancelled when the locks are lost (the holding connection failed).
    lost: tokio_util::sync::CancellationToken,
    /// Checks the lock connection; aborted on drop.
    checker: Option<tokio::task::JoinHandle<()>>,
}

/// What a backend's [`ShardLocks`] do.
#[async_trait]
pub(crate) trait LockSession: Send + Sync {
    /// Locks the first `want` of `shards` (in that order) that no other
    /// replica holds; returns the ones now held by this session. A shard this
    /// session already holds must not be passed (the locks are re-entrant).
    async fn try_lock(&self, shards: &[u32], want: usize) -> StoreResult<Vec<u32>>;
    /// Unlocks one held shard.
    async fn unlock(&self, shard: u32) -> StoreResult<()>;
    /// Replicas present, this one included.
    async fn replicas(&self) -> StoreResult<u32>;
}

/// The single process of a SQLite store: every shard is free, it is alone.
struct SoleSession;

#[async_trait]
impl LockSession for SoleSession {
    async fn try_lock(&self, shards: &[u32], want: usize) -> StoreResult<Vec<u32>> {
        Ok(shards.iter().copied().take(want).collect())
    }
    async fn unlock(&self, _shard: u32) -> StoreResult<()> {
        Ok(())
    }
    async fn replicas(&self) -> StoreResult<u32> {
        Ok(1)
    }
}

impl ShardLocks {
    /// The locks of a single-process store (nobody else can hold a shard).
    pub(crate) fn sole() -> Self {
        Self {
            session: Box::new(SoleSession),
            lost: tokio_util::sync::CancellationToken::new(),
            checker: None,
        }
    }

    /// Locks held by `session`; `checker` cancels `lost` when they are lost.
    pub(crate) fn held(
        session: Box<dyn LockSession>,
        lost: tokio_util::sync::CancellationToken,
        checker: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            session,
            lost,
            checker: Some(checker),
        }
    }

    /// Locks up to `want` of `shards` (tried in that order) that no other
    /// replica holds; returns those now held. Never pass a shard already held.
    pub async fn try_lock(&self, shards: &[u32], want: usize) -> StoreResult<Vec<u32>> {
        if want == 0 || shards.is_empty() {
            return Ok(Vec::new());
        }
        self.session.try_lock(shards, want).await
    }

    /// Releases a held shard.
    pub async fn unlock(&self, shard: u32) -> StoreResult<()> {
        self.session.unlock(shard).await
    }

    /// How many replicas run detection now, this one included.
    pub async fn replicas(&self) -> StoreResult<u32> {
        self.session.replicas().await
    }

    /// Cancelled when the locks are lost.
    pub fn lost(&self) -> tokio_util::sync::CancellationToken {
        self.lost.clone()
    }
}

impl Drop for ShardLocks {
    fn drop(&mut self) {
        if let Some(h) = self.checker.take() {
            h.abort();
        }
    }
}

/// The answer to [`Store::join_detection`].
pub enum Joined {
    /// This replica takes part; it leads no shard yet.
    Member(ShardLocks),
    /// It may not take part yet, and why (for the log): the replicas already
    /// running detection use another shard count, or a version that elects
    /// one leader for everything does.
    Refused(String),
}

/// Everything Picket persists. Implementations must behave identically; the
/// conformance suite in `tests/storage` is the definition of "identically".
#[async_trait]
pub trait Store:
    EventStore
    + AlertStore
    + RuleStore
    + ModelStore
    + IncidentStore
    + WebhookStore
    + PlaybookStore
    + DecisionStore
    + ReportStore
    + Send
    + Sync
    + 'static
{
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// A cheap round trip, for health checks.
    async fn ping(&self) -> StoreResult<()>;

    /// Closes the connection pool, waiting for checked-out connections.
    async fn close(&self);

    /// Joins the replicas that run detection over this store, with `shards`
    /// detection shards (see [`ShardLocks`]). Refused while replicas with
    /// another shard count (or of a version without shards) run detection:
    /// two counts would put a tenant in two shards with two leaders. Joining
    /// is serialized, so two replicas with different counts cannot both join.
    async fn join_detection(&self, shards: u32) -> StoreResult<Joined>;

    /// A server-wide setting.
    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>>;

    /// Stores `value` under `key` unless the key is already set; returns the
    /// value that is stored afterwards (first writer wins across replicas).
    async fn put_setting_if_absent(&self, key: &str, value: &str) -> StoreResult<String>;

    /// Creates a tenant; `Conflict` if the name is taken.
    async fn create_tenant(&self, tenant: &Tenant) -> StoreResult<()>;

    /// A tenant by id.
    async fn get_tenant(&self, id: TenantId) -> StoreResult<Tenant>;

    /// A tenant by name.
    async fn find_tenant_by_name(&self, name: &str) -> StoreResult<Option<Tenant>>;

    /// Tenants ordered by name, strictly after `after_name`, at most `limit`.
    async fn list_tenants(&self, after_name: Option<&str>, limit: u32) -> StoreResult<Vec<Tenant>>;

    /// Replaces a tenant's display name and retention.
    async fn update_tenant(&self, tenant: &Tenant) -> StoreResult<()>;

    /// Stores a new API key (its tenant must exist).
    async fn create_api_key(&self, key: &ApiKey) -> StoreResult<()>;

    /// Looks a key up by id across tenants: authentication does this before it
    /// knows the tenant. Returns revoked and expired keys too.
    async fn find_api_key(&self, id: &ApiKeyId) -> StoreResult<Option<ApiKey>>;

    /// A tenant's keys, newest first.
    async fn list_api_keys(&self, tenant: TenantId) -> StoreResult<Vec<ApiKey>>;

    /// Marks a tenant's key revoked at `at` (idempotent: keeps the first time).
    async fn revoke_api_key(
        &self,
        tenant: TenantId,
        id: &ApiKeyId,
        at: DateTime<Utc>,
    ) -> StoreResult<ApiKey>;
}

/// Event storage: the ingest write path, the audit query, the commit-ordered
/// feed behind live tails, and retention.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Inserts events of one or more tenants in ONE transaction and returns,
    /// per group and in order, whether each event was stored or was a duplicate
    /// of an earlier event with the same idempotency digest (and that event's
    /// id). Returns only after the transaction has committed.
    async fn insert_events(
        &self,
        groups: &[(TenantId, &[NewEvent])],
    ) -> StoreResult<Vec<Vec<InsertOutcome>>>;

    /// Events matching `query`, newest first by (occurred_at, id).
    async fn query_events(
        &self,
        tenant: TenantId,
        query: &EventQuery,
    ) -> StoreResult<Vec<StoredEvent>>;

    /// The backend's plan for [`EventStore::query_events`] with `query`, one
    /// line per entry (diagnostics: the benchmark and the tests check that
    /// every filter reads an index).
    async fn explain_query_events(
        &self,
        tenant: TenantId,
        query: &EventQuery,
    ) -> StoreResult<Vec<String>>;

    /// Lets the backend refresh its query planner's statistics now, as it
    /// does by itself over time. SQLite: `PRAGMA optimize` (its maintenance
    /// task runs it every minute), and pooled connections that planned with
    /// older statistics are replaced when next acquired. Postgres: ANALYZE
    /// of the event partitions, keys, alerts and change log never analyzed
    /// (over 1,000 rows) or changed by over 20 % since their last one (the
    /// server runs it every 30 s: a burst of ingest outruns autovacuum;
    /// migration 0017).
    async fn refresh_statistics(&self) -> StoreResult<()>;

    /// Events strictly after `after` in the tenant's commit-ordered feed, at most
    /// `limit`. Never returns a row that could be followed later by a row with a
    /// smaller position (see [`FeedPosition`]).
    async fn events_after(
        &self,
        tenant: TenantId,
        after: FeedPosition,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>>;

    /// The newest readable position of the tenant's feed, if it has events.
    async fn events_head(&self, tenant: TenantId) -> StoreResult<Option<FeedPosition>>;

    /// Deletes the tenant's events that occurred before `before`; returns how many.
    async fn purge_events(&self, tenant: TenantId, before: DateTime<Utc>) -> StoreResult<u64>;

    /// The tenant's events with these ids (missing ids are skipped).
    async fn get_events(
        &self,
        tenant: TenantId,
        ids: &[uuid::Uuid],
    ) -> StoreResult<Vec<StoredEvent>>;

    /// Creates the event partitions of the UTC days `first..=last` that do
    /// not exist yet (at most 400 days per call) and returns how many it
    /// created. Events of those days already stored in the default partition
    /// move into the new one with their feed positions. SQLite has no
    /// partitions: 0.
    async fn prepare_event_days(&self, first: NaiveDate, last: NaiveDate) -> StoreResult<u32>;

    /// Drops every event partition (a whole UTC day) that no tenant keeps:
    /// one whose day ends at or before the retention cutoff of every tenant
    /// with an event in it. `keep` lists every tenant with the time its
    /// events are kept from (`None`: forever). The keys of dropped events go
    /// with the events. SQLite has no partitions: nothing.
    async fn drop_event_days(
        &self,
        keep: &[(TenantId, Option<DateTime<Utc>>)],
    ) -> StoreResult<Vec<DroppedDay>>;
}

/// Whether a plan (Postgres `EXPLAIN` or SQLite `EXPLAIN QUERY PLAN`
/// text) answers the condition on `column` from an index and scans
/// nothing whole: an index condition names the column, and no line is a
/// sequential scan (Postgres) or a SCAN (SQLite).
pub fn plan_reads_index(plan: &str, column: &str) -> bool {
    let indexed = plan.lines().any(|l| {
        (l.contains("Index Cond:")
            || l.contains("USING INDEX")
            || l.contains("USING COVERING INDEX"))
            && l.contains(column)
    });
    // SQLite: SEARCH reads an index range, SCAN reads a whole table or index.
    let scans = plan
        .lines()
        .any(|l| l.contains("Seq Scan") || l.trim_start().starts_with("SCAN"));
    indexed && !scans
}

/// An event partition dropped by retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedDay {
    /// The UTC day it held.
    pub day: NaiveDate,
    /// Events it held: counted, or for a day of over 100,000 events read
    /// from the partition's statistics (ANALYZE, autovacuum), since counting
    /// would read the whole day.
    pub events: u64,
}

/// Alert storage and the ordered change log behind every watch stream.
#[async_trait]
pub trait AlertStore: Send + Sync {
    /// Raises an alert, or folds it into the open alert (new or acknowledged)
    /// with the same fingerprint whose last_seen is within `suppression` of the
    /// detection's first_seen. Appends the resulting state to the change log in
    /// the same transaction. Returns the alert and whether it was created.
    async fn raise_alert(
        &self,
        tenant: TenantId,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<(Alert, bool)>;

    /// Raises or folds each of `alerts` in order, with exactly the outcome
    /// [`AlertStore::raise_alert`] would give them one after another (a later
    /// one folds into an alert an earlier one created), in ONE transaction:
    /// one change-log entry per alert raised or folded, in order. Returns one
    /// (alert after this raise, created) per input, in order, with evidence
    /// ids but no snapshots (the alert writer's batches do not need them;
    /// [`AlertStore::fill_evidence`] reads them).
    async fn raise_alerts(
        &self,
        tenant: TenantId,
        alerts: Vec<NewAlert>,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<(Alert, bool)>>;

    /// One alert.
    async fn get_alert(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Alert>;

    /// One alert with evidence ids but no snapshots: one read, for callers
    /// that look at the alert's fields (a playbook trigger's categories, a
    /// decision's origin, an incident link), not at its evidence.
    async fn get_alert_head(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Alert>;

    /// Fills in the evidence snapshots of `alerts` (read from the change
    /// log, or returned by [`AlertStore::raise_alerts`]): alert documents and
    /// change-log entries carry evidence ids, and each event's snapshot is
    /// stored once beside them. Every other read of alerts returns them filled.
    async fn fill_evidence(&self, tenant: TenantId, alerts: &mut [Alert]) -> StoreResult<()>;

    /// Alerts matching `query`, newest last_seen first.
    async fn list_alerts(&self, tenant: TenantId, query: &AlertQuery) -> StoreResult<Vec<Alert>>;

    /// Changes an alert's status, recording who, when and why, and logs the change.
    async fn update_alert_status(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        status: AlertStatus,
        by: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Alert>;

    /// Change-log entries of `stream` strictly after `after`, in commit order.
    async fn changes_after(
        &self,
        tenant: TenantId,
        stream: &str,
        after: FeedPosition,
        limit: u32,
    ) -> StoreResult<Vec<Change>>;

    /// The newest readable change-log position of `stream`.
    async fn changes_head(
        &self,
        tenant: TenantId,
        stream: &str,
    ) -> StoreResult<Option<FeedPosition>>;
}

/// Per-tenant detection rules and overrides.
#[async_trait]
pub trait RuleStore: Send + Sync {
    /// Stores a new tenant rule or override; `Conflict` if the id exists for the tenant.
    async fn insert_tenant_rule(&self, rule: &TenantRule) -> StoreResult<()>;

    /// Inserts or replaces a tenant rule or override.
    async fn save_tenant_rule(&self, rule: &TenantRule) -> StoreResult<()>;

    /// The tenant's rules and overrides, by rule id.
    async fn list_tenant_rules(&self, tenant: TenantId) -> StoreResult<Vec<TenantRule>>;

    /// Deletes one; `NotFound` if absent.
    async fn delete_tenant_rule(&self, tenant: TenantId, rule_id: &str) -> StoreResult<()>;
}

/// Fitted anomaly models, one per tenant and algorithm.
#[async_trait]
pub trait ModelStore: Send + Sync {
    /// Stores (or replaces) a model.
    async fn save_model(&self, model: &StoredModel) -> StoreResult<()>;

    /// The tenant's model for `algorithm`, if trained.
    async fn load_model(
        &self,
        tenant: TenantId,
        algorithm: &str,
    ) -> StoreResult<Option<StoredModel>>;
}

/// Incidents. Saves are optimistic: an update names the version it read and
/// fails with `Conflict` if the incident changed since.
#[async_trait]
pub trait IncidentStore: Send + Sync {
    /// Stores a new incident (version 1) and logs `entry`.
    async fn insert_incident(
        &self,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[uuid::Uuid],
    ) -> StoreResult<Incident>;

    /// [`IncidentStore::insert_incident`] for several new incidents of one
    /// tenant in ONE transaction (a few statements for all of them: a
    /// storm's correlation opens hundreds at once). Returns them at version
    /// 1, in order.
    async fn insert_incidents(
        &self,
        new: &[(Incident, TimelineEntry, Vec<uuid::Uuid>)],
    ) -> StoreResult<Vec<Incident>>;

    /// Saves a changed incident if it is still at `incident.version`; logs
    /// `entry`; returns it at its new version.
    async fn update_incident(
        &self,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[uuid::Uuid],
    ) -> StoreResult<Incident>;

    /// [`IncidentStore::update_incident`] for several incidents of one
    /// tenant in ONE transaction: all are saved or none (a conflict on any
    /// fails the whole). Returns them at their new versions, in order.
    async fn update_incidents(
        &self,
        saves: &[(Incident, TimelineEntry, Vec<uuid::Uuid>)],
    ) -> StoreResult<Vec<Incident>>;

    /// One incident.
    async fn get_incident(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Incident>;

    /// Incidents matching `query`, most recently updated first.
    async fn list_incidents(
        &self,
        tenant: TenantId,
        query: &IncidentQuery,
    ) -> StoreResult<Vec<Incident>>;

    /// [`IncidentStore::list_incidents`] without the timelines: each
    /// incident's stored entries are counted in `timeline_skipped`, and a
    /// save of it appends only the entries recorded after the read. For
    /// correlation, which reads many incidents and changes few.
    async fn list_incident_heads(
        &self,
        tenant: TenantId,
        query: &IncidentQuery,
    ) -> StoreResult<Vec<Incident>>;

    /// Records which incident an alert belongs to (logged as an alert change).
    async fn set_alert_incident(
        &self,
        tenant: TenantId,
        alert_id: uuid::Uuid,
        incident: Option<uuid::Uuid>,
    ) -> StoreResult<()>;
}

/// The change-log payload of an incident change: its state (without the
/// timeline, which grows) and the entry that describes the change.
pub fn incident_change_payload(
    incident: &Incident,
    entry: &TimelineEntry,
    kind: &str,
) -> serde_json::Value {
    let mut slim = incident.clone();
    slim.timeline.clear();
    serde_json::json!({ "kind": kind, "incident": slim, "entry": entry })
}

/// Webhook sources and the delivery ids already processed.
#[async_trait]
pub trait WebhookStore: Send + Sync {
    /// Stores a new source (its tenant must exist); `Conflict` if the name is
    /// taken by any tenant.
    async fn create_webhook_source(&self, source: &WebhookSource) -> StoreResult<()>;

    /// A tenant's sources, by name.
    async fn list_webhook_sources(&self, tenant: TenantId) -> StoreResult<Vec<WebhookSource>>;

    /// Looks a source up by name across tenants: a delivery names its source
    /// before the tenant is known (Postgres: through a definer-rights function).
    async fn find_webhook_source(&self, name: &str) -> StoreResult<Option<WebhookSource>>;

    /// The tenant owning source `id`, if it exists (operator commands that name
    /// only the source).
    async fn webhook_source_tenant(&self, id: uuid::Uuid) -> StoreResult<Option<TenantId>>;

    /// Replaces a tenant's source's sealed secret; `NotFound` if the tenant has
    /// no such source.
    async fn rotate_webhook_secret(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        sealed_secret: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<WebhookSource>;

    /// Deletes a tenant's source and its delivery records; `NotFound` if absent.
    async fn delete_webhook_source(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<()>;

    /// Records delivery `delivery_id` of `source` (if given) and raises `new`
    /// exactly as [`AlertStore::raise_alert`] does, in ONE transaction: a
    /// delivery id already recorded for the source writes nothing and returns
    /// `Duplicate`. Returns only after the transaction has committed.
    async fn raise_webhook_alert(
        &self,
        tenant: TenantId,
        source: uuid::Uuid,
        delivery_id: Option<&str>,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<DeliveryOutcome>;
}

/// Change-log stream of playbook runs.
pub const RUNS_STREAM: &str = "playbook_runs";

/// The change-log payload of a run change: its state after the change and
/// its status before (none for a new run), so a watch filtered by status
/// also sees the change that takes a run out of the filter.
pub fn run_change_payload(run: &PlaybookRun, previous: Option<RunStatus>) -> serde_json::Value {
    serde_json::json!({ "run": run, "previous_status": previous })
}

/// Tenant playbooks, their runs (a state machine whose every save is
/// conditional on the version read and logged in the same transaction), the
/// leases workers hold on runnable runs, and notification settings.
#[async_trait]
pub trait PlaybookStore: Send + Sync {
    /// Stores a new tenant playbook (version 1); `Conflict` if the tenant has
    /// one of that name.
    async fn create_playbook(&self, playbook: &Playbook) -> StoreResult<Playbook>;

    /// One tenant playbook.
    async fn get_playbook(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Playbook>;

    /// The tenant playbook named `name`, if any.
    async fn find_playbook(&self, tenant: TenantId, name: &str) -> StoreResult<Option<Playbook>>;

    /// The tenant's playbooks by name, strictly after `after_name`, at most `limit`.
    async fn list_playbooks(
        &self,
        tenant: TenantId,
        after_name: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<Playbook>>;

    /// Replaces a tenant playbook if it is still at `playbook.version`;
    /// returns it at its new version. `Conflict` if it changed since (or the
    /// new name is taken), `NotFound` if it does not exist.
    async fn update_playbook(&self, playbook: &Playbook) -> StoreResult<Playbook>;

    /// Deletes a tenant playbook; `NotFound` if absent.
    async fn delete_playbook(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<()>;

    /// Stores a new run (version 1) and logs it as created. `Conflict` if it
    /// carries a trigger key already used (an automatic run exists).
    async fn insert_run(&self, run: &PlaybookRun) -> StoreResult<PlaybookRun>;

    /// One run.
    async fn get_run(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<PlaybookRun>;

    /// Runs matching `query`, newest first.
    async fn list_runs(&self, tenant: TenantId, query: &RunQuery) -> StoreResult<Vec<PlaybookRun>>;

    /// Saves a changed run if it is still at `run.version` (and, with
    /// `lease_owner`, still leased to that worker), logging its new state
    /// and `previous` status in the same transaction (see
    /// [`run_change_payload`]); returns it at its new version. A run that
    /// reached a terminal state gives up its lease. `Conflict` otherwise.
    async fn save_run(
        &self,
        run: &PlaybookRun,
        previous: RunStatus,
        lease_owner: Option<&str>,
    ) -> StoreResult<PlaybookRun>;

    /// Leases at most `limit` runnable runs (APPROVED or RUNNING) whose lease
    /// is free or expired at `now` to `owner` until `until`; returns them.
    /// On Postgres, concurrent claims skip each other's rows.
    async fn claim_runs(
        &self,
        owner: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, uuid::Uuid)>>;

    /// Extends `owner`'s lease on a run to `until`; `false` if it holds it no more.
    async fn renew_run_lease(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        owner: &str,
        until: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Gives up `owner`'s lease on a run (it is runnable again at once).
    async fn release_run_lease(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        owner: &str,
    ) -> StoreResult<()>;

    /// Runs of every tenant still waiting for approval at `now` past their
    /// deadline, at most `limit`.
    async fn due_runs(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, uuid::Uuid)>>;

    /// Which of `keys` are trigger keys of the tenant's runs.
    async fn used_trigger_keys(
        &self,
        tenant: TenantId,
        keys: &[String],
    ) -> StoreResult<Vec<String>>;

    /// The tenant's notification settings, if set.
    async fn get_notification_settings(
        &self,
        tenant: TenantId,
    ) -> StoreResult<Option<NotificationSettings>>;

    /// Stores the tenant's notification settings (insert or replace).
    async fn put_notification_settings(&self, settings: &NotificationSettings) -> StoreResult<()>;

    /// Stores `sealed_secret` as the tenant's signing secret unless it has
    /// one; returns the settings after (first writer wins across replicas).
    async fn ensure_notification_secret(
        &self,
        tenant: TenantId,
        sealed_secret: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<NotificationSettings>;
}

/// What a decision write did, besides its result.
#[derive(Debug, Clone)]
pub struct DecisionWrite<T> {
    /// The operation's result.
    pub result: T,
    /// The tenant's log head after the write (the newest revision).
    pub head: DecisionHead,
    /// The state of every target the write touched, after it.
    pub targets: Vec<TargetState>,
}

/// A tenant's place in the decision schedule (the expiry task and log
/// compaction read it across tenants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionSchedule {
    /// The tenant.
    pub tenant: TenantId,
    /// When its decisions next change by time alone; `None`: never.
    pub next_change_at: Option<DateTime<Utc>>,
    /// Its log head.
    pub head: DecisionHead,
}

/// Enforcement decisions and each tenant's revision log (see ARCHITECTURE.md,
/// "Enforcement"). Every write locks the tenant's log head first, so a
/// tenant's writes are serialized and revisions are assigned in commit
/// order, one per logged change, with no gaps: a reader that sees revision
/// n+1 also sees n. Each write recomputes the touched targets' effective
/// states (`domain::decision`) and logs one entry per target whose decisions
/// changed, in the same transaction.
#[async_trait]
pub trait DecisionStore: Send + Sync {
    /// Creates `decisions` in order, in ONE transaction. A decision whose
    /// idempotency key the tenant already used (or an earlier one of the
    /// batch used) is not created: the existing one is returned with
    /// `false`, unless it names another target or kind (`Conflict`).
    /// `LimitReached` if the tenant would have more than `max_active`
    /// decisions in force, or a target more than
    /// [`crate::domain::decision::MAX_DECISIONS_PER_TARGET`]; nothing is
    /// written then.
    async fn create_decisions(
        &self,
        tenant: TenantId,
        decisions: Vec<Decision>,
        max_active: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<DecisionWrite<Vec<(Decision, bool)>>>;

    /// Revokes decision `id` (recording who, why and when) and logs its
    /// target's change. A revoked or expired decision is returned unchanged
    /// and nothing is written. `NotFound` if the tenant has no such decision.
    async fn revoke_decision(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<DecisionWrite<Decision>>;

    /// Applies the passage of time up to `now`: every target whose decisions
    /// have ended by then is recomputed, and each whose effective state
    /// changed is logged (EXPIRED or UPDATED). Conditional on the stored
    /// schedule, so running it twice (two replicas) logs nothing twice.
    /// Returns the number of log entries written.
    async fn expire_decisions(&self, tenant: TenantId, now: DateTime<Utc>) -> StoreResult<u64>;

    /// One decision, active or not.
    async fn get_decision(&self, tenant: TenantId, id: uuid::Uuid) -> StoreResult<Decision>;

    /// Decisions matching `query`, newest first by (created_at, id).
    async fn list_decisions(
        &self,
        tenant: TenantId,
        query: &DecisionQuery,
    ) -> StoreResult<Vec<Decision>>;

    /// Log entries after revision `after`, oldest first, at most `limit`.
    /// If entries after `after` were compacted away, the first entry returned
    /// is not `after + 1`.
    async fn decision_log_after(
        &self,
        tenant: TenantId,
        after: u64,
        limit: u32,
    ) -> StoreResult<Vec<DecisionLogEntry>>;

    /// The tenant's log head and every target with decisions, read at one
    /// moment (one statement): the state after the head's revision.
    async fn decision_snapshot(
        &self,
        tenant: TenantId,
    ) -> StoreResult<(DecisionHead, Vec<TargetState>)>;

    /// Every tenant with decisions and its schedule (across tenants: on
    /// Postgres through a definer-rights function that returns only this).
    async fn decision_schedule(&self) -> StoreResult<Vec<DecisionSchedule>>;

    /// Deletes the tenant's log entries written before `log_before` (raising
    /// the floor: a resume from an older revision must re-snapshot) and its
    /// decisions that ended (expired or revoked) before `history_before`.
    /// Returns the head after.
    async fn compact_decisions(
        &self,
        tenant: TenantId,
        log_before: DateTime<Utc>,
        history_before: DateTime<Utc>,
    ) -> StoreResult<DecisionHead>;
}

/// The default embedded database: `./picket-data/picket.db`.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://picket-data/picket.db";

/// Connects to the store `url` names, running migrations first. On failure
/// the database's own text is logged; the error says which database could not
/// be opened and why in one sentence, without the password.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Arc<dyn Store>> {
    open_store(url, max_connections)
        .await
        .map_err(|e| opening_failed(url, e))
}

async fn open_store(url: &str, max_connections: u32) -> anyhow::Result<Arc<dyn Store>> {
    match Backend::from_url(url) {
        Some(Backend::Postgres) => Ok(Arc::new(
            PgStore::connect(url, max_connections)
                .await
                .context("failed to open the Postgres store")?,
        )),
        Some(Backend::Sqlite) => Ok(Arc::new(
            SqliteStore::connect(url, max_connections)
                .await
                .context("failed to open the SQLite store")?,
        )),
        None => anyhow::bail!(
            "unsupported database URL scheme (expected postgres://, postgresql:// or sqlite:)"
        ),
    }
}

/// Connects to the store `url` names for a process that serves it (runs
/// detection): a SQLite store is locked for this process first, and a store
/// another process serves is refused (see [`lock`]). Postgres is shared.
pub async fn connect_serving(url: &str, max_connections: u32) -> anyhow::Result<Arc<dyn Store>> {
    connect_serving_waiting(url, max_connections, std::time::Duration::ZERO).await
}

/// First pause between attempts to reach an unreachable Postgres server.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// Longest pause between such attempts.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// [`connect_serving`], retrying for up to `wait` while a Postgres server
/// cannot be reached (not started yet, restarting, its address not yet
/// routable): 0.5 s between attempts, doubling to 5 s, each attempt logged
/// with the host and port. Any other failure (the user or password refused,
/// TLS, a missing database, migrations) ends at once: waiting cannot fix it.
pub async fn connect_serving_waiting(
    url: &str,
    max_connections: u32,
    wait: std::time::Duration,
) -> anyhow::Result<Arc<dyn Store>> {
    let started = std::time::Instant::now();
    let mut delay = RETRY_FIRST;
    let mut attempts = 1u32;
    loop {
        let err = match open_serving(url, max_connections).await {
            Ok(store) => {
                if attempts > 1 {
                    tracing::info!(attempts, "the database server is reachable");
                }
                return Ok(store);
            }
            Err(e) => e,
        };
        if !(unreachable(url, &err) && started.elapsed() + delay <= wait) {
            let e = opening_failed(url, err);
            return Err(if attempts > 1 {
                anyhow::anyhow!(
                    "{e} (tried {attempts} times over {:.0} s)",
                    started.elapsed().as_secs_f64()
                )
            } else {
                e
            });
        }
        let (host, port) = match url.parse::<sqlx::postgres::PgConnectOptions>() {
            Ok(o) => (o.get_host().to_owned(), o.get_port()),
            Err(_) => (String::new(), 0),
        };
        tracing::warn!(
            host,
            port,
            attempt = attempts,
            retry_in_ms = delay.as_millis() as u64,
            "the database server cannot be reached yet; retrying"
        );
        metrics::counter!("picket_store_connect_retries_total").increment(1);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
        attempts += 1;
    }
}

/// Whether opening `url` failed because its Postgres server could not be
/// reached at all (a socket error that is not a TLS refusal).
fn unreachable(url: &str, e: &anyhow::Error) -> bool {
    Backend::from_url(url) == Some(Backend::Postgres)
        && e.chain().any(|c| {
            matches!(c.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::Io(io))
                if !io.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()))
        })
}

/// [`connect_serving`] with the raw error.
async fn open_serving(url: &str, max_connections: u32) -> anyhow::Result<Arc<dyn Store>> {
    match (Backend::from_url(url), lock::sqlite_path(url)) {
        (Some(Backend::Sqlite), Some(path)) => {
            let held = lock::acquire(&path)?;
            tracing::debug!(lock = %held.path().display(), "SQLite store locked for this process");
            Ok(Arc::new(
                SqliteStore::connect_locked(url, max_connections, Some(held))
                    .await
                    .context("failed to open the SQLite store")?,
            ))
        }
        _ => open_store(url, max_connections).await,
    }
}

/// Runs migrations only (the `picket migrate` command); errors as [`connect`].
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let result = match Backend::from_url(url) {
        Some(Backend::Postgres) => postgres::migrate(url).await,
        Some(Backend::Sqlite) => sqlite::migrate(url).await,
        None => anyhow::bail!(
            "unsupported database URL scheme (expected postgres://, postgresql:// or sqlite:)"
        ),
    };
    result.map_err(|e| opening_failed(url, e))
}

/// What a failed TLS handshake with the database is told as.
const TLS_FAILED: &str = "the TLS handshake failed (with sslmode=verify-ca or verify-full the server's certificate must chain to sslrootcert or a system root, and verify-full needs it issued for this host)";

/// Logs the whole cause chain (driver and server text stay in the log) and
/// returns one sentence for the user: which database (host, port, name, user;
/// never the password) and the kind of failure.
fn opening_failed(url: &str, e: anyhow::Error) -> anyhow::Error {
    let Some(backend) = Backend::from_url(url) else {
        return e; // the unsupported scheme, said plainly already
    };
    tracing::error!(error = %format_args!("{e:#}"), "failed to open the database");
    if let Some(in_use) = e
        .chain()
        .find_map(|c| c.downcast_ref::<crate::storage::lock::StoreInUse>())
    {
        return anyhow::anyhow!("cannot open {in_use}");
    }
    let reason = e
        .chain()
        .find_map(|c| c.downcast_ref::<sqlx::Error>())
        .map(|sqlx_error| match sqlx_error {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("3D000") => "the database does not exist (create it first)",
                Some("28P01" | "28000") => "the server refused the user or password",
                Some("42501") => "the user lacks a needed privilege",
                _ => "the database server refused the request",
            },
            sqlx::Error::Tls(_) => TLS_FAILED,
            // rustls reports a refused certificate through the socket.
            sqlx::Error::Io(io)
                if io
                    .get_ref()
                    .is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>()) =>
            {
                TLS_FAILED
            }
            sqlx::Error::Io(_) => "the server could not be reached",
            sqlx::Error::PoolTimedOut => "connecting timed out",
            sqlx::Error::Migrate(_) => "running the migrations failed",
            _ => "the connection failed",
        })
        .or_else(|| {
            e.chain()
                .any(|c| c.is::<sqlx::migrate::MigrateError>())
                .then_some("running the migrations failed")
        })
        .unwrap_or("it could not be opened");
    let what = match backend {
        Backend::Postgres => match url.parse::<sqlx::postgres::PgConnectOptions>() {
            Ok(o) => format!(
                "the Postgres database \"{}\" on {}:{} (user {})",
                o.get_database().unwrap_or_default(),
                o.get_host(),
                o.get_port(),
                o.get_username()
            ),
            Err(_) => "the Postgres database (the URL does not parse)".to_owned(),
        },
        Backend::Sqlite => {
            let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
            format!(
                "the SQLite database at {}",
                path.split('?').next().unwrap_or(path)
            )
        }
    };
    anyhow::anyhow!("cannot open {what}: {reason}; the log has the database's own message")
}

/// Report aggregates (see `proto/picket/v1/report.proto` for what each figure
/// means). Every method aggregates in the database; `width_micros` buckets
/// times from `range.start` (bucket `i` is `[start + i·width, start +
/// (i+1)·width)`), and a width of the whole range gives one bucket, 0.
/// Methods with a `limit` return at most that many rows; callers ask for one
/// more than they accept to detect an oversized range.
#[async_trait]
pub trait ReportStore: Send + Sync {
    /// One page of the access report: groups in key order after `q.after`.
    async fn access_report(&self, tenant: TenantId, q: &AccessQuery)
    -> StoreResult<Vec<AccessRow>>;

    /// Event figures per bucket of `occurred_at` (buckets without events absent).
    async fn event_counts(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, EventCounts)>>;

    /// The VPN connections open at a bucket's end are, per actor, connects
    /// minus disconnects summed from the range start and floored at zero.
    /// Without the floor their change per bucket is the bucket's net
    /// connects − disconnects (in [`ReportStore::event_counts`]); this is
    /// what the floor adds to it, per bucket where it adds anything, ordered
    /// (the open count at the end of bucket `i` is the sum of both up to
    /// `i`).
    async fn vpn_floor_changes(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, i64)>>;

    /// VPN connects in `range` from a network (IPv4 /24, IPv6 /48) the actor
    /// had no connect from in the [`crate::domain::report::VPN_HISTORY`]
    /// before. `None` when more than `limit` connects are not rolled up yet
    /// (the summary is refused rather than read unbounded).
    async fn new_vpn_networks(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<Option<u64>>;

    /// Folds at most `max_events` committed events after the tenant's
    /// rollup position into the report rollups and moves the position past
    /// them, in one transaction; returns how many were folded (0: caught
    /// up, or another replica moved the position first). Reports are exact
    /// whether or not this has run; it makes them cheaper.
    async fn roll_up(&self, tenant: TenantId, max_events: u32) -> StoreResult<u64>;

    /// The feed position the tenant's rollups hold every event up to
    /// (`None`: nothing rolled up yet).
    async fn rollup_position(&self, tenant: TenantId) -> StoreResult<Option<FeedPosition>>;

    /// Alerts per (bucket of `created_at`, current severity).
    async fn alert_counts(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, Severity, u64)>>;

    /// Incidents per (bucket of `created_at`, current severity).
    async fn incident_counts(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, Severity, u64)>>;

    /// Alerts created in the range per source, most first, at most `limit`.
    async fn alerts_by_rule(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<Vec<RuleCount>>;

    /// Entities named by alerts created in the range, most alerts first, at
    /// most `limit`.
    async fn top_alert_entities(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<Vec<EntityCount>>;

    /// The incidents created before the range end: how many of those
    /// unchanged since before the range are active, and the status steps of
    /// the others (changed in or after the range), at most `limit` rows.
    async fn incident_histories(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<(u64, Vec<IncidentHistory>)>;

    /// Critical alerts created before `before`, with their status histories,
    /// at most `limit`.
    async fn critical_alerts(
        &self,
        tenant: TenantId,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<CriticalAlert>>;
}
