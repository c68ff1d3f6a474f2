//! The store on a SQL database, written once for every backend: [`SqlStore`]
//! runs the same statements (with `$1..$n` placeholders) on Postgres and
//! SQLite; each backend's [`Dialect`] supplies only what really differs
//! (uuid, JSON and event-time encodings, tenant transactions, feed positions,
//! row locks, the event insert path and the detection shard locks).

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::Database;
use uuid::Uuid;

use crate::domain::alert::{Alert, AlertQuery, AlertStatus, Change, NewAlert};
use crate::domain::event::{
    self, EventQuery, FeedPosition, InsertOutcome, NewEvent, Outcome, StoredEvent,
};
use crate::domain::incident::{Incident, IncidentQuery, TimelineEntry};
use crate::domain::playbook::{NotificationSettings, Playbook, PlaybookRun, RunQuery, RunStatus};
use crate::domain::rule::{StoredModel, TenantRule};
use crate::domain::webhook::{DeliveryOutcome, WebhookSource};
use crate::domain::{ApiKey, ApiKeyId, ScopeSet, Severity, Tenant, TenantId};
use crate::storage::dialect::{Col, Dialect, Stmt, Tx};
pub use crate::storage::store::SqlStore;
use crate::storage::{
    AlertStore, Backend, DroppedDay, EventStore, IncidentStore, Joined, ModelStore, PlaybookStore,
    RUNS_STREAM, RuleStore, Store, StoreError, StoreResult, WebhookStore,
};

/// Most rows (or list items) in one multi-row statement of a batch: well
/// under both backends' bound-parameter limits at 10 parameters a row.
pub(crate) const BATCH_ROWS: usize = 500;

/// Most evidence ids in one snapshot read (one array parameter on Postgres,
/// an `IN` list on SQLite).
const EVIDENCE_READ_IDS: usize = 2_000;

/// An alert as its document and change-log entries store it: evidence ids
/// without snapshots (those live in `evidence_snapshots`, written by
/// [`SqlStore::stash_snapshots`]). Borrowed when it carries none.
pub(crate) fn stored_alert(a: &Alert) -> std::borrow::Cow<'_, Alert> {
    if a.body.evidence.iter().all(|e| e.snapshot.is_none()) {
        return std::borrow::Cow::Borrowed(a);
    }
    let mut a = a.clone();
    for e in &mut a.body.evidence {
        e.snapshot = None;
    }
    std::borrow::Cow::Owned(a)
}

/// The evidence snapshots a write of alert states stores: `snaps` and any
/// the alert rows `rows` still carry, once per event id (the first kept).
pub(crate) fn snapshots_to_store<'a>(
    snaps: &[(Uuid, &'a crate::domain::event::NewEvent)],
    rows: &[&'a Alert],
) -> Vec<(Uuid, &'a crate::domain::event::NewEvent)> {
    let mut seen = std::collections::HashSet::new();
    snaps
        .iter()
        .copied()
        .chain(
            rows.iter()
                .flat_map(|a| a.body.evidence.iter())
                .filter_map(|e| e.snapshot.as_ref().map(|s| (e.event_id, s))),
        )
        .filter(|(id, _)| seen.insert(*id))
        .collect()
}

/// Records the time since `*since` as stage `name` of an alert raise
/// transaction (`picket_alert_transaction_stage_seconds`) and restarts it.
fn raise_stage(name: &'static str, since: &mut std::time::Instant) {
    let now = std::time::Instant::now();
    metrics::histogram!("picket_alert_transaction_stage_seconds", "stage" => name)
        .record(now.duration_since(*since).as_secs_f64());
    *since = now;
}

/// Classifies a failed operation on `what` (see [`StoreError::classify`]).
pub(crate) fn fail<'a>(
    what: &'a str,
    context: &'static str,
) -> impl Fn(sqlx::Error) -> StoreError + 'a {
    move |e| StoreError::classify(e, what, context)
}

/// Like [`fail`], but a foreign-key violation means `parent` does not exist.
fn fail_orphan<'a>(
    parent: String,
    what: &'a str,
    context: &'static str,
) -> impl Fn(sqlx::Error) -> StoreError + 'a {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            StoreError::NotFound(parent.clone())
        }
        _ => StoreError::classify(e, what, context),
    }
}

const TENANT_COLUMNS: &str = "id, name, display_name, retention_days, created_at";
const KEY_COLUMNS: &str =
    "id, tenant_id, name, scopes, secret_hash, created_at, expires_at, revoked_at";
const SOURCE_COLUMNS: &str =
    "tenant_id, id, name, secret, allow_body_only_signature, created_at, secret_rotated_at";
const RULE_COLUMNS: &str = "tenant_id, rule_id, title, sigma_yaml, enabled, created_at, updated_at";
const EVENT_COLUMNS: &str = "tenant_id, id, seq, idem, occurred_at, received_at, event_type, \
     ocsf_class_uid, ocsf_category_uid, actor, action, resource, outcome, severity, source_ip, \
     destination_ip, source_system, service, environment, details";

pub(crate) fn uuid<DB: Dialect>(row: &DB::Row, col: &str) -> Result<Uuid, sqlx::Error> {
    DB::opt_uuid(row, col)?.ok_or_else(|| sqlx::Error::Decode(format!("{col} is null").into()))
}

fn tenant_from_row<DB: Dialect>(row: &DB::Row) -> Result<Tenant, sqlx::Error> {
    Ok(Tenant {
        id: TenantId(uuid::<DB>(row, "id")?),
        name: row.col("name")?,
        display_name: row.col("display_name")?,
        retention_days: row.col::<i32>("retention_days")?.max(0) as u32,
        created_at: row.col("created_at")?,
    })
}

fn key_from_row<DB: Dialect>(row: &DB::Row) -> Result<ApiKey, sqlx::Error> {
    let id: String = row.col("id")?;
    Ok(ApiKey {
        id: ApiKeyId::parse(&id)
            .ok_or_else(|| sqlx::Error::Decode("malformed api key id".into()))?,
        tenant_id: TenantId(uuid::<DB>(row, "tenant_id")?),
        name: row.col("name")?,
        scopes: ScopeSet::from_bits(row.col("scopes")?),
        secret_hash: row.col("secret_hash")?,
        created_at: row.col("created_at")?,
        expires_at: row.col("expires_at")?,
        revoked_at: row.col("revoked_at")?,
    })
}

fn event_from_row<DB: Dialect>(row: &DB::Row) -> Result<StoredEvent, sqlx::Error> {
    let decode = |e: String| sqlx::Error::Decode(e.into());
    let ip = |col: &str| -> Result<Option<std::net::IpAddr>, sqlx::Error> {
        row.col::<Option<String>>(col)?
            .map(|s| s.parse().map_err(|_| decode(format!("bad ip in {col}"))))
            .transpose()
    };
    let idem: Vec<u8> = row.col("idem")?;
    Ok(StoredEvent {
        tenant_id: TenantId(uuid::<DB>(row, "tenant_id")?),
        position: DB::position(row)?,
        event: NewEvent {
            id: uuid::<DB>(row, "id")?,
            idempotency_digest: idem
                .try_into()
                .map_err(|_| decode("bad idempotency digest".into()))?,
            occurred_at: DB::time(row, "occurred_at")?,
            received_at: DB::time(row, "received_at")?,
            event_type: row.col("event_type")?,
            ocsf_class_uid: row.col::<i32>("ocsf_class_uid")? as u32,
            ocsf_category_uid: row.col::<i32>("ocsf_category_uid")? as u32,
            actor: row.col("actor")?,
            action: row.col("action")?,
            resource: row.col("resource")?,
            outcome: Outcome::from_i16(row.col("outcome")?),
            severity: Severity::from_i16(row.col("severity")?).unwrap_or_default(),
            source_ip: ip("source_ip")?,
            destination_ip: ip("destination_ip")?,
            source_system: row.col("source_system")?,
            service: row.col("service")?,
            environment: row.col("environment")?,
            details: DB::doc(row, "details")?,
        },
    })
}

fn change_from_row<DB: Dialect>(row: &DB::Row) -> Result<Change, sqlx::Error> {
    Ok(Change {
        position: DB::position(row)?,
        stream: row.col("stream")?,
        subject_id: uuid::<DB>(row, "subject_id")?,
        kind: row.col("kind")?,
        payload: DB::doc(row, "payload")?,
    })
}

fn rule_from_row<DB: Dialect>(row: &DB::Row) -> Result<TenantRule, sqlx::Error> {
    Ok(TenantRule {
        tenant_id: TenantId(uuid::<DB>(row, "tenant_id")?),
        rule_id: row.col("rule_id")?,
        title: row.col("title")?,
        sigma_yaml: row.col("sigma_yaml")?,
        enabled: row.col("enabled")?,
        created_at: row.col("created_at")?,
        updated_at: row.col("updated_at")?,
    })
}

fn source_from_row<DB: Dialect>(row: &DB::Row) -> Result<WebhookSource, sqlx::Error> {
    Ok(WebhookSource {
        tenant_id: TenantId(uuid::<DB>(row, "tenant_id")?),
        id: uuid::<DB>(row, "id")?,
        name: row.col("name")?,
        sealed_secret: row.col("secret")?,
        allow_body_only_signature: row.col("allow_body_only_signature")?,
        created_at: row.col("created_at")?,
        secret_rotated_at: row.col("secret_rotated_at")?,
    })
}

/// Appends `AND col IN (ids…)` for a uuid column (`ids` not empty).
fn push_uuid_in<DB: Dialect>(q: &mut Stmt<DB>, col: &str, ids: &[Uuid]) {
    let mut sep = format!(" AND {col} IN (");
    for id in ids {
        q.push(&sep).push_uuid(*id);
        sep = ", ".into();
    }
    q.push(")");
}

/// Decodes every row with `decode`.
pub(crate) fn decode_all<DB: Database, T>(
    rows: &[DB::Row],
    decode: fn(&DB::Row) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, sqlx::Error> {
    rows.iter().map(decode).collect()
}

/// The smallest string greater, in byte order, than every string that
/// starts with `prefix` (its last character that can be incremented,
/// incremented; `None` when there is none: every such string is the
/// greatest). UTF-8 byte order is code point order, so this is exact.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = match u32::from(last) {
            0xD7FF => Some('\u{E000}'),
            n => char::from_u32(n + 1),
        };
        if let Some(c) = next {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Appends `AND col >= start AND col < end` for the bounds that are set.
fn push_range<DB: Dialect>(
    q: &mut Stmt<DB>,
    col: &str,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
) {
    if let Some(t) = start {
        q.push(&format!(" AND {col} >= ")).push_time(t);
    }
    if let Some(t) = end {
        q.push(&format!(" AND {col} < ")).push_time(t);
    }
}

/// Appends the keyset condition `(col, id) < before`, newest-first order and the limit.
pub(crate) fn push_newest_first<DB: Dialect>(
    q: &mut Stmt<DB>,
    col: &str,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: u32,
) {
    if let Some((t, id)) = before {
        q.push(&format!(" AND ({col}, id) < (")).push_time(t);
        q.push(", ").push_uuid(id).push(")");
    }
    q.push(&format!(" ORDER BY {col} DESC, id DESC LIMIT "))
        .push_bind(i64::from(limit));
}

/// Appends the keyset condition `(col, id) > after`, oldest-first order and the limit.
fn push_oldest_first<DB: Dialect>(
    q: &mut Stmt<DB>,
    col: &str,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: u32,
) {
    if let Some((t, id)) = after {
        q.push(&format!(" AND ({col}, id) > (")).push_time(t);
        q.push(", ").push_uuid(id).push(")");
    }
    q.push(&format!(" ORDER BY {col} ASC, id ASC LIMIT "))
        .push_bind(i64::from(limit));
}

// Only private helpers: the crate-internal `Dialect` bound never reaches callers.
#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// A transaction reading `tenant`'s data.
    pub(crate) async fn read(&self, tenant: TenantId) -> Result<Tx<DB>, sqlx::Error> {
        DB::begin(self, tenant, false).await
    }

    /// A transaction writing `tenant`'s data.
    pub(crate) async fn write(&self, tenant: TenantId) -> Result<Tx<DB>, sqlx::Error> {
        DB::begin(self, tenant, true).await
    }

    /// Runs `q` on a pooled connection outside any tenant (tenants, settings,
    /// lookups across tenants); returns its first row.
    async fn first(&self, q: Stmt<DB>) -> Result<Option<DB::Row>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        q.fetch_optional(&mut *conn).await
    }

    /// Runs `q` on a pooled connection outside any tenant; returns all rows.
    pub(crate) async fn all(&self, q: Stmt<DB>) -> Result<Vec<DB::Row>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        q.fetch_all(&mut *conn).await
    }

    /// Executes `q` on a pooled connection outside any tenant.
    async fn execute(&self, q: Stmt<DB>) -> Result<u64, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        q.execute(&mut *conn).await
    }

    /// Runs `q` in a read transaction of `tenant`; returns all rows.
    pub(crate) async fn read_all(
        &self,
        tenant: TenantId,
        q: Stmt<DB>,
    ) -> Result<Vec<DB::Row>, sqlx::Error> {
        let mut tx = self.read(tenant).await?;
        let rows = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Runs `q` in a read transaction of `tenant` and decodes every row;
    /// failures are classified as `what` with `context`.
    async fn read_list<T>(
        &self,
        tenant: TenantId,
        q: Stmt<DB>,
        decode: fn(&DB::Row) -> Result<T, sqlx::Error>,
        what: &str,
        context: &'static str,
    ) -> StoreResult<Vec<T>> {
        let fail = fail(what, context);
        let rows = self.read_all(tenant, q).await.map_err(&fail)?;
        decode_all::<DB, _>(&rows, decode).map_err(fail)
    }

    /// Executes `q` in a write transaction of `tenant`; `NotFound(what)` if it
    /// touched no row.
    async fn write_existing(
        &self,
        tenant: TenantId,
        q: Stmt<DB>,
        what: String,
        context: &'static str,
    ) -> StoreResult<()> {
        let done = self
            .write_one(tenant, q)
            .await
            .map_err(fail(&what, context))?;
        if done == 0 {
            return Err(StoreError::NotFound(what));
        }
        Ok(())
    }

    /// Runs `q` in a read transaction of `tenant`; returns its first row.
    pub(crate) async fn read_first(
        &self,
        tenant: TenantId,
        q: Stmt<DB>,
    ) -> Result<Option<DB::Row>, sqlx::Error> {
        let mut tx = self.read(tenant).await?;
        let row = q.fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// [`SqlStore::read_first`], with no row as `RowNotFound`.
    pub(crate) async fn read_one(
        &self,
        tenant: TenantId,
        q: Stmt<DB>,
    ) -> Result<DB::Row, sqlx::Error> {
        self.read_first(tenant, q)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    /// Executes `q` in a write transaction of `tenant`; returns how many rows
    /// it touched.
    async fn write_one(&self, tenant: TenantId, q: Stmt<DB>) -> Result<u64, sqlx::Error> {
        let mut tx = self.write(tenant).await?;
        let done = q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Runs `q` in a write transaction of `tenant`; returns its only row
    /// (`RowNotFound` if none).
    async fn write_returning(&self, tenant: TenantId, q: Stmt<DB>) -> Result<DB::Row, sqlx::Error> {
        let mut tx = self.write(tenant).await?;
        let row = q.fetch_one(&mut *tx).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// `columns` of `tenant`'s feed rows in `table` (of `stream`, if given)
    /// strictly after `after`, in commit order, at most `limit`.
    fn feed_after(
        table: &str,
        columns: &str,
        tenant: TenantId,
        stream: Option<&str>,
        after: FeedPosition,
        limit: u32,
    ) -> Stmt<DB> {
        let mut q = Self::feed(table, columns, tenant, stream);
        DB::push_after(&mut q, after);
        q.push(&format!(" ORDER BY {} LIMIT ", DB::FEED_ORDER))
            .push_bind(i64::from(limit));
        q
    }

    /// The newest readable position of `tenant`'s feed in `table` (of `stream`, if given).
    fn feed_head(table: &str, tenant: TenantId, stream: Option<&str>) -> Stmt<DB> {
        let mut q = Self::feed(table, "seq", tenant, stream);
        q.push(&format!(" ORDER BY {} LIMIT 1", DB::FEED_ORDER_DESC));
        q
    }

    /// `columns` of `tenant`'s readable feed rows in `table` (of `stream`, if given).
    pub(crate) fn feed(
        table: &str,
        columns: &str,
        tenant: TenantId,
        stream: Option<&str>,
    ) -> Stmt<DB> {
        let mut q = Stmt::<DB>::text(format!(
            "SELECT {}, {columns} FROM {table} WHERE tenant_id = ",
            DB::FEED_XID
        ));
        q.push_uuid(tenant.0);
        if let Some(stream) = stream {
            q.push(" AND stream = ").push_bind(stream);
        }
        q.push(DB::READABLE);
        q
    }

    /// Stores the evidence snapshots `alerts` carry in `evidence_snapshots`
    /// (once per event; a snapshot already there is kept), inside `tx`.
    /// Alert documents and change-log entries are then written without them
    /// ([`stored_alert`]): see migrations/postgres/0018_evidence_snapshots.sql.
    async fn stash_snapshots(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        alerts: &[&Alert],
    ) -> Result<(), sqlx::Error> {
        let mut seen = std::collections::HashSet::new();
        let snaps: Vec<(Uuid, &crate::domain::event::NewEvent)> = alerts
            .iter()
            .flat_map(|a| a.body.evidence.iter())
            .filter_map(|e| e.snapshot.as_ref().map(|s| (e.event_id, s)))
            .filter(|(id, _)| seen.insert(*id))
            .collect();
        Self::insert_snapshots(tx, tenant, &snaps).await
    }

    /// Inserts `(event id, snapshot)` pairs (distinct ids) into
    /// `evidence_snapshots`, keeping any already stored, inside `tx`.
    async fn insert_snapshots(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        snaps: &[(Uuid, &crate::domain::event::NewEvent)],
    ) -> Result<(), sqlx::Error> {
        for chunk in snaps.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO evidence_snapshots (tenant_id, event_id, snapshot) VALUES ",
            );
            for (n, (id, snap)) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(tenant.0).push(", ");
                q.push_uuid(*id).push(", ");
                q.push_doc(*snap).push(")");
            }
            q.push(" ON CONFLICT (tenant_id, event_id) DO NOTHING");
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Fills in the evidence snapshots `alerts` do not carry from
    /// `evidence_snapshots` (one read per chunk of ids), on `conn`.
    async fn fill_snapshots_on(
        conn: &mut DB::Connection,
        tenant: TenantId,
        alerts: &mut [Alert],
    ) -> Result<(), sqlx::Error> {
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<Uuid> = alerts
            .iter()
            .flat_map(|a| a.body.evidence.iter())
            .filter(|e| e.snapshot.is_none())
            .map(|e| e.event_id)
            .filter(|id| seen.insert(*id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut found: std::collections::HashMap<Uuid, crate::domain::event::NewEvent> =
            std::collections::HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(EVIDENCE_READ_IDS) {
            let mut q = Stmt::<DB>::new(
                "SELECT event_id, snapshot FROM evidence_snapshots WHERE tenant_id = ",
            );
            q.push_uuid(tenant.0);
            DB::push_uuid_in(&mut q, "event_id", chunk);
            for row in q.fetch_all(conn).await? {
                found.insert(uuid::<DB>(&row, "event_id")?, DB::doc(&row, "snapshot")?);
            }
        }
        for e in alerts
            .iter_mut()
            .flat_map(|a| a.body.evidence.iter_mut())
            .filter(|e| e.snapshot.is_none())
        {
            e.snapshot = found.get(&e.event_id).cloned();
        }
        Ok(())
    }

    /// [`SqlStore::fill_snapshots_on`] in a read transaction of `tenant`.
    async fn fill_snapshots(
        &self,
        tenant: TenantId,
        alerts: &mut [Alert],
    ) -> Result<(), sqlx::Error> {
        if alerts
            .iter()
            .all(|a| a.body.evidence.iter().all(|e| e.snapshot.is_some()))
        {
            return Ok(());
        }
        let mut tx = self.read(tenant).await?;
        Self::fill_snapshots_on(&mut tx, tenant, alerts).await?;
        tx.commit().await
    }

    /// Raises or folds `new` inside `tx` (see [`AlertStore::raise_alert`]).
    async fn raise_in(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<(Alert, bool), sqlx::Error> {
        // Serialize raises of one fingerprint so concurrent detections fold into one alert.
        DB::lock_fingerprint(tx, format!("{}/{}", tenant.0, new.fingerprint)).await?;
        let existing = Stmt::<DB>::text(format!(
            "SELECT doc FROM alerts WHERE tenant_id = $1 AND fingerprint = $2 AND status IN (1, 2) \
             AND last_seen >= $3 ORDER BY last_seen DESC LIMIT 1{}",
            DB::FOR_UPDATE
        ))
        .uuid(tenant.0)
        .arg(new.fingerprint.as_str())
        .time(new.first_seen - suppression)
        .fetch_optional(&mut **tx)
        .await?;
        let (mut alert, created) = match existing {
            Some(row) => {
                let mut alert: Alert = DB::doc(&row, "doc")?;
                alert.fold(new, now);
                Self::save_alert(tx, &alert, "updated", false, now).await?;
                (alert, false)
            }
            None => {
                let alert = Alert::from_new(tenant, new, now);
                Self::save_alert(tx, &alert, "created", true, now).await?;
                (alert, true)
            }
        };
        // Earlier evidence of a folded alert: its snapshots are stored aside.
        Self::fill_snapshots_on(tx, tenant, std::slice::from_mut(&mut alert)).await?;
        Ok((alert, created))
    }

    /// Raises or folds every alert of `alerts` in order inside `tx` (see
    /// [`AlertStore::raise_alerts`]): the fingerprints are locked and their
    /// open alerts read in one statement each, the folding happens in memory
    /// in input order, then every touched alert's final row is upserted and
    /// every intermediate state appended to the change log, in order.
    async fn raise_all_in(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        alerts: Vec<NewAlert>,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Alert, bool)>, sqlx::Error> {
        let mut step = std::time::Instant::now();
        let mut fingerprints: Vec<String> = alerts.iter().map(|a| a.fingerprint.clone()).collect();
        fingerprints.sort();
        fingerprints.dedup();
        DB::lock_fingerprints(
            tx,
            fingerprints
                .iter()
                .map(|f| format!("{}/{f}", tenant.0))
                .collect(),
        )
        .await?;
        raise_stage("lock", &mut step);
        let since = alerts.iter().map(|a| a.first_seen).min().unwrap_or(now) - suppression;
        // The batch's evidence snapshots, set aside: the alerts are folded and
        // logged with evidence ids, and the snapshots they keep are stored
        // once each.
        let mut alerts = alerts;
        let mut snaps: std::collections::HashMap<Uuid, crate::domain::event::NewEvent> =
            std::collections::HashMap::new();
        for e in alerts.iter_mut().flat_map(|a| a.evidence.iter_mut()) {
            if let Some(snap) = e.snapshot.take() {
                snaps.entry(e.event_id).or_insert(snap);
            }
        }
        // Open alerts of these fingerprints that any of the batch may fold into.
        let mut open: Vec<Alert> = Vec::new();
        for chunk in fingerprints.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "SELECT doc FROM alerts WHERE tenant_id = $1 AND status IN (1, 2) AND last_seen >= $2",
            )
            .uuid(tenant.0)
            .time(since);
            let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
            DB::push_text_in(&mut q, "fingerprint", &chunk);
            q.push(DB::FOR_UPDATE);
            for row in q.fetch_all(&mut **tx).await? {
                open.push(DB::doc(&row, "doc")?);
            }
        }
        raise_stage("read", &mut step);
        let stored = open.len();
        // Which alerts changed (index into `open`), and each change to log.
        let mut touched = vec![false; stored];
        let mut changes: Vec<(bool, Alert)> = Vec::with_capacity(alerts.len());
        // Open alerts (indices into `open`) by fingerprint.
        let mut by_fp: std::collections::HashMap<String, Vec<usize>> =
            std::collections::HashMap::new();
        for (n, a) in open.iter().enumerate() {
            by_fp.entry(a.fingerprint.clone()).or_default().push(n);
        }
        for new in alerts {
            let cutoff = new.first_seen - suppression;
            let into = by_fp
                .get(&new.fingerprint)
                .into_iter()
                .flatten()
                .copied()
                .filter(|n| {
                    let a = &open[*n];
                    matches!(a.status, AlertStatus::New | AlertStatus::Acknowledged)
                        && a.last_seen >= cutoff
                })
                .max_by_key(|n| open[*n].last_seen);
            let (n, created) = match into {
                Some(n) => {
                    // Each state of an alert is newer than the one before,
                    // also within one batch (watchers order and resume by it).
                    let at = now.max(open[n].updated_at + chrono::Duration::microseconds(1));
                    open[n].fold(new, at);
                    (n, false)
                }
                None => {
                    by_fp
                        .entry(new.fingerprint.clone())
                        .or_default()
                        .push(open.len());
                    open.push(Alert::from_new(tenant, new, now));
                    touched.push(true);
                    (open.len() - 1, true)
                }
            };
            touched[n] = true;
            changes.push((created, open[n].clone()));
        }
        // Final rows.
        let rows: Vec<&Alert> = open
            .iter()
            .zip(&touched)
            .filter_map(|(a, t)| t.then_some(a))
            .collect();
        // The snapshots of the evidence the alerts kept (an alert's evidence
        // only grows, so its final state holds every earlier one's).
        let mut kept = std::collections::HashSet::new();
        let keep: Vec<(Uuid, &crate::domain::event::NewEvent)> = rows
            .iter()
            .flat_map(|a| a.body.evidence.iter())
            .filter(|e| kept.insert(e.event_id))
            .filter_map(|e| snaps.get(&e.event_id).map(|s| (e.event_id, s)))
            .collect();
        // Every state in order: watchers see each raise once.
        let logged: Vec<(&str, &Alert)> = changes
            .iter()
            .map(|(created, a)| (if *created { "created" } else { "updated" }, a))
            .collect();
        raise_stage("fold", &mut step);
        DB::write_alerts(tx, tenant, &keep, &rows, &logged, now).await?;
        raise_stage("write", &mut step);
        Ok(changes.into_iter().map(|(c, a)| (a, c)).collect())
    }

    /// [`Dialect::write_alerts`] as chunks of multi-row statements (any
    /// backend; SQLite's).
    pub(crate) async fn write_alerts_in_chunks(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        snaps: &[(Uuid, &crate::domain::event::NewEvent)],
        rows: &[&Alert],
        changes: &[(&str, &Alert)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        Self::insert_snapshots(tx, tenant, &snapshots_to_store(snaps, rows)).await?;
        Self::upsert_alerts(tx, rows).await?;
        let changes: Vec<(Uuid, &str, std::borrow::Cow<'_, Alert>)> = changes
            .iter()
            .map(|(kind, a)| (a.id, *kind, stored_alert(a)))
            .collect();
        Self::log_changes(tx, tenant, "alerts", &changes, now).await
    }

    /// Writes the final rows of `rows` (inserted or updated), one statement
    /// per chunk, inside `tx`.
    async fn upsert_alerts(tx: &mut Tx<DB>, rows: &[&Alert]) -> Result<(), sqlx::Error> {
        for chunk in rows.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO alerts (tenant_id, id, fingerprint, severity, status, category, last_seen, created_at, incident_id, doc) VALUES ",
            );
            for (n, a) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(a.tenant_id.0).push(", ");
                q.push_uuid(a.id).push(", ");
                q.push_bind(a.fingerprint.as_str()).push(", ");
                q.push_bind(a.severity.as_i16()).push(", ");
                q.push_bind(a.status.as_i16()).push(", ");
                q.push_bind(a.category.as_str()).push(", ");
                q.push_time(a.last_seen).push(", ");
                q.push_time(a.created_at).push(", ");
                q.push_opt_uuid(a.incident_id).push(", ");
                q.push_doc(&*stored_alert(a)).push(")");
            }
            q.push(
                " ON CONFLICT (tenant_id, id) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 severity = excluded.severity, status = excluded.status, category = excluded.category, \
                 last_seen = excluded.last_seen, created_at = excluded.created_at, \
                 incident_id = excluded.incident_id, doc = excluded.doc",
            );
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Appends one `stream` change per `(subject, kind, payload)` to the
    /// change log, in order, one statement per chunk, inside `tx`.
    async fn log_changes<T: serde::Serialize + Sync>(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        stream: &str,
        changes: &[(Uuid, &str, T)],
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        for chunk in changes.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO change_log (tenant_id, stream, subject_id, kind, payload, created_at) VALUES ",
            );
            for (n, (subject, kind, payload)) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(tenant.0).push(", ");
                q.push_bind(stream).push(", ");
                q.push_uuid(*subject).push(", ");
                q.push_bind(*kind).push(", ");
                q.push_doc(payload).push(", ");
                q.push_time(now).push(")");
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Writes an alert row (insert or update) and its change-log entry inside `tx`.
    async fn save_alert(
        tx: &mut Tx<DB>,
        alert: &Alert,
        kind: &str,
        insert: bool,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        Self::stash_snapshots(tx, alert.tenant_id, &[alert]).await?;
        let stored = stored_alert(alert);
        let sql = if insert {
            "INSERT INTO alerts (tenant_id, id, fingerprint, severity, status, category, last_seen, created_at, incident_id, doc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        } else {
            "UPDATE alerts SET fingerprint = $3, severity = $4, status = $5, category = $6, last_seen = $7, \
             created_at = $8, incident_id = $9, doc = $10 WHERE tenant_id = $1 AND id = $2"
        };
        Stmt::<DB>::new(sql)
            .uuid(alert.tenant_id.0)
            .uuid(alert.id)
            .arg(alert.fingerprint.as_str())
            .arg(alert.severity.as_i16())
            .arg(alert.status.as_i16())
            .arg(alert.category.as_str())
            .time(alert.last_seen)
            .time(alert.created_at)
            .opt_uuid(alert.incident_id)
            .doc(&*stored)
            .execute(&mut **tx)
            .await?;
        Self::log_change(tx, alert.tenant_id, "alerts", alert.id, kind, &*stored, now).await
    }

    /// Appends an entry to the change log inside `tx`.
    async fn log_change<T: serde::Serialize + Sync>(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        stream: &str,
        subject: Uuid,
        kind: &str,
        payload: &T,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        Stmt::<DB>::new(
            "INSERT INTO change_log (tenant_id, stream, subject_id, kind, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .uuid(tenant.0)
        .arg(stream)
        .uuid(subject)
        .arg(kind)
        .doc(payload)
        .time(now)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Points an alert at an incident (or none) inside `tx`, logging the alert change.
    async fn link_alert(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        alert_id: Uuid,
        incident: Option<Uuid>,
    ) -> Result<(), sqlx::Error> {
        let row = Stmt::<DB>::text(format!(
            "SELECT doc FROM alerts WHERE tenant_id = $1 AND id = $2{}",
            DB::FOR_UPDATE
        ))
        .uuid(tenant.0)
        .uuid(alert_id)
        .fetch_one(&mut **tx)
        .await?;
        let mut alert: Alert = DB::doc(&row, "doc")?;
        alert.incident_id = incident;
        let now = Utc::now();
        alert.updated_at = now;
        Self::save_alert(tx, &alert, "updated", false, now).await
    }

    /// Saves a changed incident within `tx` if it is still at
    /// `incident.version` (see [`IncidentStore::update_incident`]).
    async fn update_incident_in(
        tx: &mut Tx<DB>,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[Uuid],
    ) -> StoreResult<Incident> {
        let what = format!("incident {}", incident.id);
        let fail = fail(&what, "failed to update an incident");
        let conflict = || StoreError::Conflict(format!("{what} (changed concurrently)"));
        let mut i = incident.clone();
        i.version = incident.version + 1;
        // The stored length at the version read: the entries beyond it are new.
        let row = Stmt::<DB>::text(format!(
            "SELECT timeline_len FROM incidents WHERE tenant_id = $1 AND id = $2 AND version = $3{}",
            DB::FOR_UPDATE
        ))
        .uuid(i.tenant_id.0)
        .uuid(i.id)
        .arg(incident.version)
        .fetch_optional(&mut **tx)
        .await
        .map_err(&fail)?;
        let Some(row) = row else {
            return Err(conflict());
        };
        let stored = row.col::<i64>("timeline_len").map_err(&fail)?.max(0) as u64;
        let held = i.timeline.len() as u64;
        let Some(new_from) = stored
            .checked_sub(i.timeline_skipped)
            .filter(|n| *n <= held)
        else {
            return Err(conflict());
        };
        let done = Stmt::<DB>::new(
            "UPDATE incidents SET version = $3, status = $4, severity = $5, assignee = $6, updated_at = $7, doc = $8, \
             timeline_len = $9 WHERE tenant_id = $1 AND id = $2 AND version = $10",
        )
        .uuid(i.tenant_id.0)
        .uuid(i.id)
        .arg(i.version)
        .arg(i.status.as_i16())
        .arg(i.severity.as_i16())
        .arg(i.assignee.as_str())
        .time(i.updated_at)
        .doc(&incident_doc(&i))
        .arg((i.timeline_skipped + held) as i64)
        .arg(incident.version)
        .execute(&mut **tx)
        .await
        .map_err(&fail)?;
        if done == 0 {
            return Err(conflict());
        }
        Self::append_timeline(tx, &timeline_rows(&i, stored + 1, new_from as usize))
            .await
            .map_err(&fail)?;
        Self::log_incident(tx, &i, entry, "updated", link)
            .await
            .map_err(&fail)?;
        Ok(i)
    }

    /// Logs an incident change and links `link`'s alerts to it, inside `tx`.
    async fn log_incident(
        tx: &mut Tx<DB>,
        i: &Incident,
        entry: &TimelineEntry,
        kind: &str,
        link: &[Uuid],
    ) -> Result<(), sqlx::Error> {
        let payload = crate::storage::incident_change_payload(i, entry, kind);
        Self::log_change(
            tx,
            i.tenant_id,
            "incidents",
            i.id,
            kind,
            &payload,
            Utc::now(),
        )
        .await?;
        Self::link_alerts(tx, i.tenant_id, link, Some(i.id)).await
    }

    /// [`SqlStore::link_alert`] for many alerts: one locking read and one
    /// upsert per chunk, then one change per alert in `ids` order. Fails
    /// with `RowNotFound` if any of them does not exist.
    async fn link_alerts(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        ids: &[Uuid],
        incident: Option<Uuid>,
    ) -> Result<(), sqlx::Error> {
        let links: Vec<(Uuid, Option<Uuid>)> = ids.iter().map(|id| (*id, incident)).collect();
        Self::link_alerts_to(tx, tenant, &links).await
    }

    /// Points each alert of `links` at its incident (or none), inside `tx`:
    /// one locking read and one [`Dialect::write_alerts`] per chunk of
    /// alerts, one change per alert in order of first appearance (a repeat
    /// sets the incident again). Fails with `RowNotFound` if any of them
    /// does not exist.
    async fn link_alerts_to(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        links: &[(Uuid, Option<Uuid>)],
    ) -> Result<(), sqlx::Error> {
        if links.is_empty() {
            return Ok(());
        }
        let mut seen = std::collections::HashSet::with_capacity(links.len());
        let ids: Vec<Uuid> = links
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| seen.insert(*id))
            .collect();
        let mut found: std::collections::HashMap<Uuid, Alert> =
            std::collections::HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH_ROWS) {
            let mut q =
                Stmt::<DB>::new("SELECT doc FROM alerts WHERE tenant_id = $1").uuid(tenant.0);
            push_uuid_in(&mut q, "id", chunk);
            q.push(DB::FOR_UPDATE);
            for row in q.fetch_all(&mut **tx).await? {
                let a: Alert = DB::doc(&row, "doc")?;
                found.insert(a.id, a);
            }
        }
        let now = Utc::now();
        let mut bumped = std::collections::HashSet::with_capacity(ids.len());
        for (id, incident) in links {
            let a = found.get_mut(id).ok_or(sqlx::Error::RowNotFound)?;
            a.incident_id = *incident;
            if bumped.insert(*id) {
                // Each state of an alert is newer than the one before.
                a.updated_at = now.max(a.updated_at + chrono::Duration::microseconds(1));
            }
        }
        for chunk in ids.chunks(BATCH_ROWS) {
            let rows: Vec<&Alert> = chunk.iter().map(|id| &found[id]).collect();
            let logged: Vec<(&str, &Alert)> = rows.iter().map(|a| ("updated", *a)).collect();
            DB::write_alerts(tx, tenant, &[], &rows, &logged, now).await?;
        }
        Ok(())
    }

    /// Inserts a tenant rule; `on_conflict` says what a rule with the same id does.
    async fn put_rule(&self, r: &TenantRule, on_conflict: &str) -> StoreResult<()> {
        let what = format!("rule {}", r.rule_id);
        let q = Stmt::<DB>::text(format!(
            "INSERT INTO tenant_rules ({RULE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7){on_conflict}"
        ))
        .uuid(r.tenant_id.0)
        .arg(r.rule_id.as_str())
        .arg(r.title.as_str())
        .arg(r.sigma_yaml.clone())
        .arg(r.enabled)
        .arg(r.created_at)
        .arg(r.updated_at);
        self.write_one(r.tenant_id, q)
            .await
            .map_err(fail(&what, "failed to store a rule"))?;
        Ok(())
    }
}

#[async_trait]
impl<DB: Dialect> Store for SqlStore<DB> {
    fn backend(&self) -> Backend {
        DB::BACKEND
    }

    async fn ping(&self) -> StoreResult<()> {
        self.execute(Stmt::<DB>::new("SELECT 1"))
            .await
            .map_err(fail("ping", "failed to ping the database"))?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn join_detection(&self, shards: u32) -> StoreResult<Joined> {
        DB::join_detection(self, shards).await
    }

    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>> {
        let fail = fail("setting", "failed to read a setting");
        let row = self
            .first(Stmt::<DB>::new("SELECT value FROM settings WHERE key = $1").arg(key))
            .await
            .map_err(&fail)?;
        row.map(|r| r.col::<String>("value"))
            .transpose()
            .map_err(fail)
    }

    async fn put_setting_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        self.execute(
            Stmt::<DB>::new(
                "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            )
            .arg(key)
            .arg(value),
        )
        .await
        .map_err(fail("setting", "failed to write a setting"))?;
        self.get_setting(key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("setting {key}")))
    }

    async fn create_tenant(&self, t: &Tenant) -> StoreResult<()> {
        let what = format!("tenant `{}`", t.name);
        self.execute(
            Stmt::<DB>::new(
                "INSERT INTO tenants (id, name, display_name, retention_days, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .uuid(t.id.0)
            .arg(t.name.as_str())
            .arg(t.display_name.as_str())
            .arg(t.retention_days as i32)
            .arg(t.created_at),
        )
        .await
        .map_err(fail(&what, "failed to insert a tenant"))?;
        Ok(())
    }

    async fn get_tenant(&self, id: TenantId) -> StoreResult<Tenant> {
        let what = format!("tenant {id}");
        let q = Stmt::<DB>::text(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1"
        ))
        .uuid(id.0);
        let row = self
            .first(q)
            .await
            .and_then(|r| r.ok_or(sqlx::Error::RowNotFound))
            .map_err(fail(&what, "failed to read a tenant"))?;
        tenant_from_row::<DB>(&row).map_err(fail("tenant", "failed to decode a tenant"))
    }

    async fn find_tenant_by_name(&self, name: &str) -> StoreResult<Option<Tenant>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE name = $1"
        ))
        .arg(name);
        let row = self
            .first(q)
            .await
            .map_err(fail("tenant", "failed to read a tenant"))?;
        row.as_ref()
            .map(tenant_from_row::<DB>)
            .transpose()
            .map_err(fail("tenant", "failed to decode a tenant"))
    }

    async fn list_tenants(&self, after_name: Option<&str>, limit: u32) -> StoreResult<Vec<Tenant>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants WHERE name > $1 ORDER BY name LIMIT $2"
        ))
        .arg(after_name.unwrap_or(""))
        .arg(i64::from(limit));
        let rows = self
            .all(q)
            .await
            .map_err(fail("tenants", "failed to list tenants"))?;
        decode_all::<DB, _>(&rows, tenant_from_row::<DB>)
            .map_err(fail("tenant", "failed to decode a tenant"))
    }

    async fn update_tenant(&self, t: &Tenant) -> StoreResult<()> {
        let done = self
            .execute(
                Stmt::<DB>::new(
                    "UPDATE tenants SET display_name = $2, retention_days = $3 WHERE id = $1",
                )
                .uuid(t.id.0)
                .arg(t.display_name.as_str())
                .arg(t.retention_days as i32),
            )
            .await
            .map_err(fail("tenant", "failed to update a tenant"))?;
        if done == 0 {
            return Err(StoreError::NotFound(format!("tenant {}", t.id)));
        }
        Ok(())
    }

    async fn create_api_key(&self, k: &ApiKey) -> StoreResult<()> {
        let q = Stmt::<DB>::text(format!(
            "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .arg(k.id.as_str())
        .uuid(k.tenant_id.0)
        .arg(k.name.as_str())
        .arg(k.scopes.bits())
        .arg(k.secret_hash.as_slice())
        .arg(k.created_at)
        .arg(k.expires_at)
        .arg(k.revoked_at);
        let parent = format!("tenant {}", k.tenant_id);
        self.write_one(k.tenant_id, q).await.map_err(fail_orphan(
            parent,
            "api key",
            "failed to insert an API key",
        ))?;
        Ok(())
    }

    async fn find_api_key(&self, id: &ApiKeyId) -> StoreResult<Option<ApiKey>> {
        let q = Stmt::<DB>::text(format!("SELECT {KEY_COLUMNS} FROM {}", DB::API_KEY_BY_ID))
            .arg(id.as_str());
        let row = self
            .first(q)
            .await
            .map_err(fail("api key", "failed to look up an API key"))?;
        row.as_ref()
            .map(key_from_row::<DB>)
            .transpose()
            .map_err(fail("api key", "failed to decode an API key"))
    }

    async fn list_api_keys(&self, tenant: TenantId) -> StoreResult<Vec<ApiKey>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at DESC, id"
        ))
        .uuid(tenant.0);
        self.read_list(
            tenant,
            q,
            key_from_row::<DB>,
            "api keys",
            "failed to list API keys",
        )
        .await
    }

    async fn revoke_api_key(
        &self,
        tenant: TenantId,
        id: &ApiKeyId,
        at: DateTime<Utc>,
    ) -> StoreResult<ApiKey> {
        let what = format!("api key {id}");
        let q = Stmt::<DB>::text(format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) \
             WHERE tenant_id = $1 AND id = $2 RETURNING {KEY_COLUMNS}"
        ))
        .uuid(tenant.0)
        .arg(id.as_str())
        .arg(at);
        let row = self
            .write_returning(tenant, q)
            .await
            .map_err(fail(&what, "failed to revoke an API key"))?;
        key_from_row::<DB>(&row).map_err(fail(&what, "failed to decode an API key"))
    }
}

#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// The statement of [`EventStore::query_events`], after `prefix`
    /// (empty, or the dialect's `EXPLAIN`).
    fn events_query(prefix: &str, tenant: TenantId, q: &EventQuery) -> Stmt<DB> {
        let mut b = Stmt::<DB>::text(format!(
            "{prefix}SELECT {}, {EVENT_COLUMNS} FROM events WHERE tenant_id = ",
            DB::FEED_XID
        ));
        b.push_uuid(tenant.0);
        push_range(&mut b, "occurred_at", q.start, q.end);
        if !q.event_types.is_empty() {
            b.push_in("event_type", q.event_types.iter().map(String::as_str));
        }
        if !q.ocsf_class_uids.is_empty() {
            b.push_in(
                "ocsf_class_uid",
                q.ocsf_class_uids.iter().map(|c| *c as i32),
            );
        }
        if let Some(a) = &q.actor {
            // In the index's byte order (equality is the same in any order).
            b.push(&format!(" AND (actor{}) = ", DB::BYTE_ORDER))
                .push_bind(a.as_str());
        }
        if let Some(ip) = q.source_ip {
            b.push(" AND source_ip = ").push_bind(ip.to_string());
        }
        if let Some(seg) = q.resource_prefix.as_deref().and_then(event::whole_segment) {
            // A whole first segment (`svc12/`): the resources starting with
            // it are those of that segment, whose index is in page order
            // within the segment (no sort of every match before the first page).
            b.push(" AND resource_segment = ").push_bind(seg);
        } else if let Some(p) = &q.resource_prefix {
            // In byte order the resources starting with `p` are exactly
            // [p, prefix_end(p)): one range of the resource index.
            let col = format!("(resource{})", DB::BYTE_ORDER);
            b.push(&format!(" AND {col} >= ")).push_bind(p.as_str());
            if let Some(end) = prefix_end(p) {
                b.push(&format!(" AND {col} < ")).push_bind(end);
            }
        }
        if let Some(o) = q.outcome {
            b.push(" AND outcome = ").push_bind(o.as_i16());
        }
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if let Some(t) = q.received_before {
            b.push(" AND received_at <= ").push_time(t);
        }
        if q.oldest_first {
            push_oldest_first(&mut b, "occurred_at", q.after, q.limit);
        } else {
            push_newest_first(&mut b, "occurred_at", q.before, q.limit);
        }
        b
    }
}

#[async_trait]
impl<DB: Dialect> EventStore for SqlStore<DB> {
    async fn insert_events(
        &self,
        groups: &[(TenantId, &[NewEvent])],
    ) -> StoreResult<Vec<Vec<InsertOutcome>>> {
        DB::insert_events(self, groups).await
    }

    async fn query_events(
        &self,
        tenant: TenantId,
        q: &EventQuery,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.read_list(
            tenant,
            Self::events_query("", tenant, q),
            event_from_row::<DB>,
            "events",
            "failed to query events",
        )
        .await
    }

    async fn explain_query_events(
        &self,
        tenant: TenantId,
        q: &EventQuery,
    ) -> StoreResult<Vec<String>> {
        let fail = fail("events", "failed to explain an event query");
        let rows = self
            .read_all(tenant, Self::events_query(DB::EXPLAIN, tenant, q))
            .await
            .map_err(&fail)?;
        rows.iter()
            .map(|r| r.col::<String>(DB::EXPLAIN_COLUMN))
            .collect::<Result<_, _>>()
            .map_err(fail)
    }

    async fn refresh_statistics(&self) -> StoreResult<()> {
        DB::refresh_statistics(self).await
    }

    async fn events_after(
        &self,
        tenant: TenantId,
        after: FeedPosition,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>> {
        let q = Self::feed_after("events", EVENT_COLUMNS, tenant, None, after, limit);
        self.read_list(
            tenant,
            q,
            event_from_row::<DB>,
            "events",
            "failed to read the event feed",
        )
        .await
    }

    async fn events_head(&self, tenant: TenantId) -> StoreResult<Option<FeedPosition>> {
        let fail = fail("events", "failed to read the event feed head");
        let q = Self::feed_head("events", tenant, None);
        let row = self.read_first(tenant, q).await.map_err(&fail)?;
        row.as_ref().map(DB::position).transpose().map_err(fail)
    }

    async fn purge_events(&self, tenant: TenantId, before: DateTime<Utc>) -> StoreResult<u64> {
        let fail = fail("events", "failed to purge events");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let deleted =
            Stmt::<DB>::new("DELETE FROM events WHERE tenant_id = $1 AND occurred_at < $2")
                .uuid(tenant.0)
                .time(before)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        if let Some(keys) = DB::PURGE_KEYS {
            Stmt::<DB>::new(keys)
                .uuid(tenant.0)
                .time(before)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        Self::forget_rollups_before(&mut tx, tenant, before)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(deleted)
    }

    async fn prepare_event_days(&self, first: NaiveDate, last: NaiveDate) -> StoreResult<u32> {
        if last < first {
            return Ok(0);
        }
        DB::prepare_event_days(self, first, last).await
    }

    async fn drop_event_days(
        &self,
        keep: &[(TenantId, Option<DateTime<Utc>>)],
    ) -> StoreResult<Vec<DroppedDay>> {
        // The day's rollups go with it, in the same call (SQLite has no
        // partitions; its retention deletes rows through `purge_events`).
        DB::drop_event_days(self, keep).await
    }

    async fn get_events(&self, tenant: TenantId, ids: &[Uuid]) -> StoreResult<Vec<StoredEvent>> {
        self.events_by_id(tenant, ids).await
    }
}

#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// The tenant's events with these ids.
    async fn events_by_id(&self, tenant: TenantId, ids: &[Uuid]) -> StoreResult<Vec<StoredEvent>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut b = Stmt::<DB>::text(format!(
            "SELECT {}, {EVENT_COLUMNS} FROM events WHERE tenant_id = ",
            DB::FEED_XID
        ));
        b.push_uuid(tenant.0);
        DB::push_uuid_in(&mut b, "id", ids);
        b.push(" ORDER BY occurred_at, id");
        self.read_list(
            tenant,
            b,
            event_from_row::<DB>,
            "events",
            "failed to read events",
        )
        .await
    }
}

#[async_trait]
impl<DB: Dialect> AlertStore for SqlStore<DB> {
    async fn raise_alert(
        &self,
        tenant: TenantId,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<(Alert, bool)> {
        let fail = fail("alert", "failed to raise an alert");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let raised = Self::raise_in(&mut tx, tenant, new, suppression, now)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(raised)
    }

    async fn raise_alerts(
        &self,
        tenant: TenantId,
        alerts: Vec<NewAlert>,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<(Alert, bool)>> {
        if alerts.is_empty() {
            return Ok(Vec::new());
        }
        let fail = fail("alerts", "failed to raise alerts");
        // Where a raise spends its time (a storm's writer waits on each):
        // `picket_alert_transaction_stage_seconds{stage=begin|lock|read|fold|encode|write|commit}`
        // (`encode`: Postgres's column arrays, inside `write`).
        let mut step = std::time::Instant::now();
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        raise_stage("begin", &mut step);
        let raised = Self::raise_all_in(&mut tx, tenant, alerts, suppression, now)
            .await
            .map_err(&fail)?;
        step = std::time::Instant::now();
        tx.commit().await.map_err(fail)?;
        raise_stage("commit", &mut step);
        Ok(raised)
    }

    async fn get_alert(&self, tenant: TenantId, id: Uuid) -> StoreResult<Alert> {
        let mut alert = self.get_alert_head(tenant, id).await?;
        self.fill_evidence(tenant, std::slice::from_mut(&mut alert))
            .await?;
        Ok(alert)
    }

    async fn get_alert_head(&self, tenant: TenantId, id: Uuid) -> StoreResult<Alert> {
        let what = format!("alert {id}");
        let fail = fail(&what, "failed to read an alert");
        let q = Stmt::<DB>::new("SELECT doc FROM alerts WHERE tenant_id = $1 AND id = $2")
            .uuid(tenant.0)
            .uuid(id);
        let row = self.read_one(tenant, q).await.map_err(&fail)?;
        DB::doc(&row, "doc").map_err(fail)
    }

    async fn fill_evidence(&self, tenant: TenantId, alerts: &mut [Alert]) -> StoreResult<()> {
        self.fill_snapshots(tenant, alerts)
            .await
            .map_err(fail("alerts", "failed to read evidence snapshots"))
    }

    async fn list_alerts(&self, tenant: TenantId, q: &AlertQuery) -> StoreResult<Vec<Alert>> {
        let mut b = Stmt::<DB>::new("SELECT doc FROM alerts WHERE tenant_id = ");
        b.push_uuid(tenant.0);
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if !q.statuses.is_empty() {
            b.push_in("status", q.statuses.iter().map(|s| s.as_i16()));
        }
        if let Some(c) = &q.category {
            b.push(" AND category = ").push_bind(c.as_str());
        }
        if q.uncorrelated {
            b.push(" AND incident_id IS NULL");
        }
        if let Some(fp) = &q.fingerprint {
            b.push(" AND fingerprint = ").push_bind(fp.as_str());
        }
        if let Some(e) = &q.entity {
            DB::push_has_entity(&mut b, &["body", "entities"], e);
        }
        push_range(&mut b, "last_seen", q.start, q.end);
        push_newest_first(&mut b, "last_seen", q.before, q.limit);
        let mut alerts = self
            .read_list(
                tenant,
                b,
                |r| DB::doc(r, "doc"),
                "alerts",
                "failed to list alerts",
            )
            .await?;
        self.fill_evidence(tenant, &mut alerts).await?;
        Ok(alerts)
    }

    async fn update_alert_status(
        &self,
        tenant: TenantId,
        id: Uuid,
        status: AlertStatus,
        by: &str,
        note: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Alert> {
        let what = format!("alert {id}");
        let fail = fail(&what, "failed to update an alert");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let row = Stmt::<DB>::text(format!(
            "SELECT doc FROM alerts WHERE tenant_id = $1 AND id = $2{}",
            DB::FOR_UPDATE
        ))
        .uuid(tenant.0)
        .uuid(id)
        .fetch_one(&mut *tx)
        .await
        .map_err(&fail)?;
        let mut alert: Alert = DB::doc(&row, "doc").map_err(&fail)?;
        alert.body.history.push(crate::domain::alert::StatusChange {
            from: alert.status,
            to: status,
            by: by.to_owned(),
            at: now,
            note: note.to_owned(),
        });
        alert.status = status;
        alert.updated_at = now;
        Self::save_alert(&mut tx, &alert, "updated", false, now)
            .await
            .map_err(&fail)?;
        Self::fill_snapshots_on(&mut tx, tenant, std::slice::from_mut(&mut alert))
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(alert)
    }

    async fn changes_after(
        &self,
        tenant: TenantId,
        stream: &str,
        after: FeedPosition,
        limit: u32,
    ) -> StoreResult<Vec<Change>> {
        let columns = "seq, stream, subject_id, kind, payload";
        let q = Self::feed_after("change_log", columns, tenant, Some(stream), after, limit);
        self.read_list(
            tenant,
            q,
            change_from_row::<DB>,
            "changes",
            "failed to read the change log",
        )
        .await
    }

    async fn changes_head(
        &self,
        tenant: TenantId,
        stream: &str,
    ) -> StoreResult<Option<FeedPosition>> {
        let fail = fail("changes", "failed to read the change log head");
        let q = Self::feed_head("change_log", tenant, Some(stream));
        let row = self.read_first(tenant, q).await.map_err(&fail)?;
        row.as_ref().map(DB::position).transpose().map_err(fail)
    }
}

#[async_trait]
impl<DB: Dialect> RuleStore for SqlStore<DB> {
    async fn insert_tenant_rule(&self, r: &TenantRule) -> StoreResult<()> {
        self.put_rule(r, "").await
    }

    async fn save_tenant_rule(&self, r: &TenantRule) -> StoreResult<()> {
        self.put_rule(
            r,
            " ON CONFLICT (tenant_id, rule_id) DO UPDATE SET title = EXCLUDED.title, \
             sigma_yaml = EXCLUDED.sigma_yaml, enabled = EXCLUDED.enabled, \
             updated_at = EXCLUDED.updated_at",
        )
        .await
    }

    async fn list_tenant_rules(&self, tenant: TenantId) -> StoreResult<Vec<TenantRule>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT {RULE_COLUMNS} FROM tenant_rules WHERE tenant_id = $1 ORDER BY rule_id"
        ))
        .uuid(tenant.0);
        self.read_list(
            tenant,
            q,
            rule_from_row::<DB>,
            "rules",
            "failed to list rules",
        )
        .await
    }

    async fn delete_tenant_rule(&self, tenant: TenantId, rule_id: &str) -> StoreResult<()> {
        let what = format!("rule {rule_id}");
        let q = Stmt::<DB>::new("DELETE FROM tenant_rules WHERE tenant_id = $1 AND rule_id = $2")
            .uuid(tenant.0)
            .arg(rule_id);
        self.write_existing(tenant, q, what, "failed to delete a rule")
            .await
    }
}

#[async_trait]
impl<DB: Dialect> ModelStore for SqlStore<DB> {
    async fn save_model(&self, m: &StoredModel) -> StoreResult<()> {
        let q = Stmt::<DB>::new(
            "INSERT INTO anomaly_models (tenant_id, algorithm, trained_at, windows, threshold, model) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, algorithm) DO UPDATE SET \
             trained_at = EXCLUDED.trained_at, windows = EXCLUDED.windows, \
             threshold = EXCLUDED.threshold, model = EXCLUDED.model",
        )
        .uuid(m.tenant_id.0)
        .arg(m.algorithm.as_str())
        .arg(m.trained_at)
        .arg(m.windows as i32)
        .arg(m.threshold)
        .arg(m.bytes.as_slice());
        self.write_one(m.tenant_id, q)
            .await
            .map_err(fail("model", "failed to store a model"))?;
        Ok(())
    }

    async fn load_model(
        &self,
        tenant: TenantId,
        algorithm: &str,
    ) -> StoreResult<Option<StoredModel>> {
        let q = Stmt::<DB>::new(
            "SELECT trained_at, windows, threshold, model FROM anomaly_models \
             WHERE tenant_id = $1 AND algorithm = $2",
        )
        .uuid(tenant.0)
        .arg(algorithm);
        let fail = fail("model", "failed to load a model");
        let row = self.read_first(tenant, q).await.map_err(&fail)?;
        row.map(|row| {
            Ok(StoredModel {
                tenant_id: tenant,
                algorithm: algorithm.to_owned(),
                trained_at: row.col("trained_at")?,
                windows: row.col::<i32>("windows")?.max(0) as u32,
                threshold: row.col("threshold")?,
                bytes: row.col("model")?,
            })
        })
        .transpose()
        .map_err(fail)
    }
}

/// The timeline rows `(incident, seq, entry)` of `i`'s loaded entries from
/// index `from` on, numbered from `first`.
fn timeline_rows(i: &Incident, first: u64, from: usize) -> Vec<(&Incident, i64, &TimelineEntry)> {
    i.timeline[from..]
        .iter()
        .enumerate()
        .map(|(n, e)| (i, (first + n as u64) as i64, e))
        .collect()
}

/// An incident as stored in its row: without its timeline (kept in
/// `incident_timeline`).
fn incident_doc(i: &Incident) -> Incident {
    Incident {
        timeline: Vec::new(),
        timeline_skipped: 0,
        ..i.clone()
    }
}

/// An incident row's document with its stored timeline counted as skipped.
fn incident_head<DB: Dialect>(row: &DB::Row) -> Result<Incident, sqlx::Error> {
    let mut i: Incident = DB::doc(row, "doc")?;
    i.timeline.clear();
    i.timeline_skipped = row.col::<i64>("timeline_len")?.max(0) as u64;
    Ok(i)
}

#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// Appends timeline entries `(incident, seq, entry)` inside `tx`, one
    /// statement per chunk.
    async fn append_timeline(
        tx: &mut Tx<DB>,
        entries: &[(&Incident, i64, &TimelineEntry)],
    ) -> Result<(), sqlx::Error> {
        for chunk in entries.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO incident_timeline (tenant_id, incident_id, seq, entry) VALUES ",
            );
            for (n, (i, seq, e)) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(i.tenant_id.0).push(", ");
                q.push_uuid(i.id).push(", ");
                q.push_bind(*seq).push(", ");
                q.push_doc(*e).push(")");
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Fills in the stored timelines of `heads` (read in `tx`): each up to
    /// the length its row named, so an entry appended since is not mixed in.
    async fn fill_timelines(tx: &mut Tx<DB>, heads: &mut [Incident]) -> Result<(), sqlx::Error> {
        let wanted: Vec<Uuid> = heads
            .iter()
            .filter(|i| i.timeline_skipped > 0)
            .map(|i| i.id)
            .collect();
        let mut entries: std::collections::HashMap<Uuid, Vec<(i64, TimelineEntry)>> =
            std::collections::HashMap::new();
        let tenant = match heads.first() {
            Some(i) => i.tenant_id,
            None => return Ok(()),
        };
        for chunk in wanted.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new(
                "SELECT incident_id, seq, entry FROM incident_timeline WHERE tenant_id = $1",
            )
            .uuid(tenant.0);
            push_uuid_in(&mut q, "incident_id", chunk);
            for row in q.fetch_all(&mut **tx).await? {
                let id = uuid::<DB>(&row, "incident_id")?;
                let seq: i64 = row.col("seq")?;
                entries
                    .entry(id)
                    .or_default()
                    .push((seq, DB::doc(&row, "entry")?));
            }
        }
        for i in heads {
            let mut own = entries.remove(&i.id).unwrap_or_default();
            own.sort_by_key(|(seq, _)| *seq);
            i.timeline = own
                .into_iter()
                .filter(|(seq, _)| *seq as u64 <= i.timeline_skipped)
                .map(|(_, e)| e)
                .collect();
            i.timeline_skipped = 0;
        }
        Ok(())
    }

    /// The incident rows matching `q` (most recently updated first), as heads.
    async fn incident_heads_in(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        q: &IncidentQuery,
    ) -> Result<Vec<Incident>, sqlx::Error> {
        let mut b = Stmt::<DB>::new("SELECT doc, timeline_len FROM incidents WHERE tenant_id = ");
        b.push_uuid(tenant.0);
        if !q.statuses.is_empty() {
            b.push_in("status", q.statuses.iter().map(|s| s.as_i16()));
        }
        if let Some(s) = q.min_severity {
            b.push(" AND severity >= ").push_bind(s.as_i16());
        }
        if let Some(a) = &q.assignee {
            b.push(" AND assignee = ").push_bind(a.as_str());
        }
        if let Some(e) = &q.entity {
            DB::push_has_entity(&mut b, &["entities"], e);
        }
        push_range(&mut b, "updated_at", q.start, q.end);
        push_newest_first(&mut b, "updated_at", q.before, q.limit);
        let rows = b.fetch_all(&mut **tx).await?;
        decode_all::<DB, _>(&rows, incident_head::<DB>)
    }
}

#[async_trait]
impl<DB: Dialect> IncidentStore for SqlStore<DB> {
    async fn insert_incident(
        &self,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[Uuid],
    ) -> StoreResult<Incident> {
        let mut saved = self
            .insert_incidents(&[(incident.clone(), entry.clone(), link.to_vec())])
            .await?;
        Ok(saved.remove(0))
    }

    async fn insert_incidents(
        &self,
        new: &[(Incident, TimelineEntry, Vec<Uuid>)],
    ) -> StoreResult<Vec<Incident>> {
        let Some((first, _, _)) = new.first() else {
            return Ok(Vec::new());
        };
        let tenant = first.tenant_id;
        let fail = fail("incident", "failed to create incidents");
        if new.iter().any(|(i, _, _)| i.tenant_id != tenant) {
            return Err(StoreError::Unexpected(anyhow::anyhow!(
                "incidents created together must be of one tenant"
            )));
        }
        let out: Vec<Incident> = new
            .iter()
            .map(|(i, _, _)| Incident {
                version: 1,
                ..i.clone()
            })
            .collect();
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        // 10 parameters a row.
        for chunk in out.chunks(BATCH_ROWS / 2) {
            let mut q = Stmt::<DB>::new(
                "INSERT INTO incidents (tenant_id, id, version, status, severity, assignee, created_at, updated_at, doc, timeline_len) VALUES ",
            );
            for (n, i) in chunk.iter().enumerate() {
                q.push(if n == 0 { "(" } else { ", (" });
                q.push_uuid(i.tenant_id.0).push(", ");
                q.push_uuid(i.id).push(", ");
                q.push_bind(i.version).push(", ");
                q.push_bind(i.status.as_i16()).push(", ");
                q.push_bind(i.severity.as_i16()).push(", ");
                q.push_bind(i.assignee.as_str()).push(", ");
                q.push_time(i.created_at).push(", ");
                q.push_time(i.updated_at).push(", ");
                q.push_doc(&incident_doc(i)).push(", ");
                q.push_bind((i.timeline_skipped + i.timeline.len() as u64) as i64)
                    .push(")");
            }
            q.execute(&mut *tx).await.map_err(&fail)?;
        }
        // Every timeline entry, numbered from where the incident's skipped ones end.
        let entries: Vec<(&Incident, i64, &TimelineEntry)> = out
            .iter()
            .flat_map(|i| timeline_rows(i, i.timeline_skipped + 1, 0))
            .collect();
        Self::append_timeline(&mut tx, &entries)
            .await
            .map_err(&fail)?;
        // One "created" change per incident, in order.
        let created: Vec<(Uuid, &str, serde_json::Value)> = out
            .iter()
            .zip(new)
            .map(|(i, (_, entry, _))| {
                let payload = crate::storage::incident_change_payload(i, entry, "created");
                (i.id, "created", payload)
            })
            .collect();
        Self::log_changes(&mut tx, tenant, "incidents", &created, Utc::now())
            .await
            .map_err(&fail)?;
        let links: Vec<(Uuid, Option<Uuid>)> = out
            .iter()
            .zip(new)
            .flat_map(|(i, (_, _, link))| link.iter().map(|a| (*a, Some(i.id))))
            .collect();
        Self::link_alerts_to(&mut tx, tenant, &links)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(out)
    }

    async fn update_incident(
        &self,
        incident: &Incident,
        entry: &TimelineEntry,
        link: &[Uuid],
    ) -> StoreResult<Incident> {
        let mut saved = self
            .update_incidents(&[(incident.clone(), entry.clone(), link.to_vec())])
            .await?;
        Ok(saved.remove(0))
    }

    async fn update_incidents(
        &self,
        saves: &[(Incident, TimelineEntry, Vec<Uuid>)],
    ) -> StoreResult<Vec<Incident>> {
        let Some((first, _, _)) = saves.first() else {
            return Ok(Vec::new());
        };
        let fail = fail("incidents", "failed to update incidents");
        let mut tx = self.write(first.tenant_id).await.map_err(&fail)?;
        let mut out = Vec::with_capacity(saves.len());
        for (incident, entry, link) in saves {
            out.push(Self::update_incident_in(&mut tx, incident, entry, link).await?);
        }
        tx.commit().await.map_err(fail)?;
        Ok(out)
    }

    async fn get_incident(&self, tenant: TenantId, id: Uuid) -> StoreResult<Incident> {
        let what = format!("incident {id}");
        let fail = fail(&what, "failed to read an incident");
        let mut tx = self.read(tenant).await.map_err(&fail)?;
        let row = Stmt::<DB>::new(
            "SELECT doc, timeline_len FROM incidents WHERE tenant_id = $1 AND id = $2",
        )
        .uuid(tenant.0)
        .uuid(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(&fail)?
        .ok_or(sqlx::Error::RowNotFound)
        .map_err(&fail)?;
        let mut one = vec![incident_head::<DB>(&row).map_err(bad_incident)?];
        Self::fill_timelines(&mut tx, &mut one)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(one.pop().expect("one incident"))
    }

    async fn list_incidents(
        &self,
        tenant: TenantId,
        q: &IncidentQuery,
    ) -> StoreResult<Vec<Incident>> {
        let fail = fail("incidents", "failed to list incidents");
        let mut tx = self.read(tenant).await.map_err(&fail)?;
        let mut list = Self::incident_heads_in(&mut tx, tenant, q)
            .await
            .map_err(&fail)?;
        Self::fill_timelines(&mut tx, &mut list)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(list)
    }

    async fn list_incident_heads(
        &self,
        tenant: TenantId,
        q: &IncidentQuery,
    ) -> StoreResult<Vec<Incident>> {
        let fail = fail("incidents", "failed to list incidents");
        let mut tx = self.read(tenant).await.map_err(&fail)?;
        let list = Self::incident_heads_in(&mut tx, tenant, q)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(list)
    }

    async fn set_alert_incident(
        &self,
        tenant: TenantId,
        alert_id: Uuid,
        incident: Option<Uuid>,
    ) -> StoreResult<()> {
        let what = format!("alert {alert_id}");
        let fail = fail(&what, "failed to link an alert");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        Self::link_alert(&mut tx, tenant, alert_id, incident)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)
    }
}

fn bad_incident(e: sqlx::Error) -> StoreError {
    StoreError::Unexpected(anyhow::Error::new(e).context("bad incident doc"))
}

#[async_trait]
impl<DB: Dialect> WebhookStore for SqlStore<DB> {
    async fn create_webhook_source(&self, w: &WebhookSource) -> StoreResult<()> {
        let what = format!("webhook source `{}`", w.name);
        let q = Stmt::<DB>::text(format!(
            "INSERT INTO webhook_sources ({SOURCE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .uuid(w.tenant_id.0)
        .uuid(w.id)
        .arg(w.name.as_str())
        .arg(w.sealed_secret.as_slice())
        .arg(w.allow_body_only_signature)
        .arg(w.created_at)
        .arg(w.secret_rotated_at);
        let parent = format!("tenant {}", w.tenant_id);
        self.write_one(w.tenant_id, q).await.map_err(fail_orphan(
            parent,
            &what,
            "failed to insert a webhook source",
        ))?;
        Ok(())
    }

    async fn list_webhook_sources(&self, tenant: TenantId) -> StoreResult<Vec<WebhookSource>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT {SOURCE_COLUMNS} FROM webhook_sources WHERE tenant_id = $1 ORDER BY name"
        ))
        .uuid(tenant.0);
        self.read_list(
            tenant,
            q,
            source_from_row::<DB>,
            "webhook sources",
            "failed to list webhook sources",
        )
        .await
    }

    async fn find_webhook_source(&self, name: &str) -> StoreResult<Option<WebhookSource>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT {SOURCE_COLUMNS} FROM {}",
            DB::SOURCE_BY_NAME
        ))
        .arg(name);
        let fail = fail("webhook source", "failed to look up a webhook source");
        let row = self.first(q).await.map_err(&fail)?;
        row.as_ref()
            .map(source_from_row::<DB>)
            .transpose()
            .map_err(fail)
    }

    async fn webhook_source_tenant(&self, id: Uuid) -> StoreResult<Option<TenantId>> {
        let fail = fail("webhook source", "failed to look up a webhook source");
        let row = self
            .first(Stmt::<DB>::new(DB::SOURCE_TENANT).uuid(id))
            .await
            .map_err(&fail)?;
        let tenant = match row {
            Some(row) => DB::opt_uuid(&row, "tenant_id").map_err(fail)?,
            None => None,
        };
        Ok(tenant.map(TenantId))
    }

    async fn rotate_webhook_secret(
        &self,
        tenant: TenantId,
        id: Uuid,
        sealed_secret: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<WebhookSource> {
        let what = format!("webhook source {id}");
        let q = Stmt::<DB>::text(format!(
            "UPDATE webhook_sources SET secret = $3, secret_rotated_at = $4 \
             WHERE tenant_id = $1 AND id = $2 RETURNING {SOURCE_COLUMNS}"
        ))
        .uuid(tenant.0)
        .uuid(id)
        .arg(sealed_secret)
        .arg(at);
        let fail = fail(&what, "failed to rotate a webhook secret");
        let row = self.write_returning(tenant, q).await.map_err(&fail)?;
        source_from_row::<DB>(&row).map_err(fail)
    }

    async fn delete_webhook_source(&self, tenant: TenantId, id: Uuid) -> StoreResult<()> {
        let what = format!("webhook source {id}");
        let q = Stmt::<DB>::new("DELETE FROM webhook_sources WHERE tenant_id = $1 AND id = $2")
            .uuid(tenant.0)
            .uuid(id);
        self.write_existing(tenant, q, what, "failed to delete a webhook source")
            .await
    }

    async fn raise_webhook_alert(
        &self,
        tenant: TenantId,
        source: Uuid,
        delivery_id: Option<&str>,
        new: NewAlert,
        suppression: chrono::Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<DeliveryOutcome> {
        let what = "webhook delivery";
        let fail = fail(what, "failed to record a webhook delivery");
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        if let Some(delivery) = delivery_id {
            // A concurrent insert of the same id waits here for the first
            // transaction, then conflicts: exactly one of them raises.
            let done = Stmt::<DB>::new(
                "INSERT INTO webhook_deliveries (tenant_id, source_id, delivery_id, received_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (source_id, delivery_id) DO NOTHING",
            )
            .uuid(tenant.0)
            .uuid(source)
            .arg(delivery)
            .arg(now)
            .execute(&mut *tx)
            .await
            .map_err(fail_orphan(
                format!("webhook source {source}"),
                what,
                "failed to record a webhook delivery",
            ))?;
            if done == 0 {
                tx.rollback().await.map_err(&fail)?;
                return Ok(DeliveryOutcome::Duplicate);
            }
        }
        let (alert, created) = Self::raise_in(&mut tx, tenant, new, suppression, now)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(DeliveryOutcome::Raised(Box::new(alert), created))
    }
}

fn bad_doc(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| StoreError::Unexpected(anyhow::Error::new(e).context(what))
}

/// A playbook row's document, at the row's version.
fn playbook_from_row<DB: Dialect>(row: &DB::Row) -> Result<Playbook, sqlx::Error> {
    let mut p: Playbook = DB::doc(row, "doc")?;
    p.version = row.col("version")?;
    Ok(p)
}

/// A run row's document, at the row's version.
fn run_from_row<DB: Dialect>(row: &DB::Row) -> Result<PlaybookRun, sqlx::Error> {
    let mut r: PlaybookRun = DB::doc(row, "doc")?;
    r.version = row.col("version")?;
    Ok(r)
}

fn settings_from_row<DB: Dialect>(row: &DB::Row) -> Result<NotificationSettings, sqlx::Error> {
    Ok(NotificationSettings {
        tenant_id: TenantId(uuid::<DB>(row, "tenant_id")?),
        url: row.col("url")?,
        sealed_secret: row.col("secret")?,
        secret_rotated_at: DB::opt_time(row, "secret_rotated_at")?,
        updated_at: DB::time(row, "updated_at")?,
    })
}

/// Rows of `(tenant_id, id)` pairs.
fn pairs<DB: Dialect>(rows: &[DB::Row]) -> Result<Vec<(TenantId, Uuid)>, sqlx::Error> {
    rows.iter()
        .map(|r| Ok((TenantId(uuid::<DB>(r, "tenant_id")?), uuid::<DB>(r, "id")?)))
        .collect()
}

const SETTINGS_COLUMNS: &str = "tenant_id, url, secret, secret_rotated_at, updated_at";

#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// Logs a run's state (and its status before) as `kind` inside `tx`.
    async fn log_run(
        tx: &mut Tx<DB>,
        run: &PlaybookRun,
        previous: Option<RunStatus>,
        kind: &str,
    ) -> Result<(), sqlx::Error> {
        let payload = crate::storage::run_change_payload(run, previous);
        Self::log_change(
            tx,
            run.tenant_id,
            RUNS_STREAM,
            run.id,
            kind,
            &payload,
            Utc::now(),
        )
        .await
    }
}

#[async_trait]
impl<DB: Dialect> PlaybookStore for SqlStore<DB> {
    async fn create_playbook(&self, playbook: &Playbook) -> StoreResult<Playbook> {
        let mut p = playbook.clone();
        p.version = 1;
        let tenant = p.tenant_id.ok_or_else(|| {
            StoreError::Unexpected(anyhow::anyhow!("a shared playbook cannot be stored"))
        })?;
        let what = format!("playbook `{}`", p.def.name);
        let q = Stmt::<DB>::new(
            "INSERT INTO playbooks (tenant_id, id, name, version, enabled, created_at, updated_at, doc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .uuid(tenant.0)
        .uuid(p.id)
        .arg(p.def.name.as_str())
        .arg(p.version)
        .arg(p.def.enabled)
        .time(p.created_at)
        .time(p.updated_at)
        .doc(&p);
        self.write_one(tenant, q).await.map_err(fail_orphan(
            format!("tenant {tenant}"),
            &what,
            "failed to insert a playbook",
        ))?;
        Ok(p)
    }

    async fn get_playbook(&self, tenant: TenantId, id: Uuid) -> StoreResult<Playbook> {
        let what = format!("playbook {id}");
        let q =
            Stmt::<DB>::new("SELECT version, doc FROM playbooks WHERE tenant_id = $1 AND id = $2")
                .uuid(tenant.0)
                .uuid(id);
        let row = self
            .read_one(tenant, q)
            .await
            .map_err(fail(&what, "failed to read a playbook"))?;
        playbook_from_row::<DB>(&row).map_err(bad_doc("bad playbook doc"))
    }

    async fn find_playbook(&self, tenant: TenantId, name: &str) -> StoreResult<Option<Playbook>> {
        let q = Stmt::<DB>::new(
            "SELECT version, doc FROM playbooks WHERE tenant_id = $1 AND name = $2",
        )
        .uuid(tenant.0)
        .arg(name);
        let row = self
            .read_first(tenant, q)
            .await
            .map_err(fail("playbook", "failed to read a playbook"))?;
        row.as_ref()
            .map(playbook_from_row::<DB>)
            .transpose()
            .map_err(bad_doc("bad playbook doc"))
    }

    async fn list_playbooks(
        &self,
        tenant: TenantId,
        after_name: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<Playbook>> {
        let q = Stmt::<DB>::new(
            "SELECT version, doc FROM playbooks WHERE tenant_id = $1 AND name > $2 ORDER BY name LIMIT $3",
        )
        .uuid(tenant.0)
        .arg(after_name.unwrap_or(""))
        .arg(i64::from(limit));
        let rows = self
            .read_all(tenant, q)
            .await
            .map_err(fail("playbooks", "failed to list playbooks"))?;
        decode_all::<DB, _>(&rows, playbook_from_row::<DB>).map_err(bad_doc("bad playbook doc"))
    }

    async fn update_playbook(&self, playbook: &Playbook) -> StoreResult<Playbook> {
        let tenant = playbook
            .tenant_id
            .ok_or_else(|| StoreError::NotFound(format!("playbook {}", playbook.id)))?;
        let what = format!("playbook {}", playbook.id);
        let fail = fail(&what, "failed to update a playbook");
        let mut p = playbook.clone();
        p.version = playbook.version + 1;
        let mut tx = self.write(tenant).await.map_err(&fail)?;
        let done = Stmt::<DB>::new(
            "UPDATE playbooks SET name = $3, version = $4, enabled = $5, updated_at = $6, doc = $7 \
             WHERE tenant_id = $1 AND id = $2 AND version = $8",
        )
        .uuid(tenant.0)
        .uuid(p.id)
        .arg(p.def.name.as_str())
        .arg(p.version)
        .arg(p.def.enabled)
        .time(p.updated_at)
        .doc(&p)
        .arg(playbook.version)
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        if done == 0 {
            let exists =
                Stmt::<DB>::new("SELECT version FROM playbooks WHERE tenant_id = $1 AND id = $2")
                    .uuid(tenant.0)
                    .uuid(p.id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(&fail)?;
            return Err(match exists {
                None => StoreError::NotFound(what.clone()),
                Some(_) => StoreError::Conflict(format!("{what} (changed concurrently)")),
            });
        }
        tx.commit().await.map_err(fail)?;
        Ok(p)
    }

    async fn delete_playbook(&self, tenant: TenantId, id: Uuid) -> StoreResult<()> {
        let q = Stmt::<DB>::new("DELETE FROM playbooks WHERE tenant_id = $1 AND id = $2")
            .uuid(tenant.0)
            .uuid(id);
        self.write_existing(
            tenant,
            q,
            format!("playbook {id}"),
            "failed to delete a playbook",
        )
        .await
    }

    async fn insert_run(&self, run: &PlaybookRun) -> StoreResult<PlaybookRun> {
        let mut r = run.clone();
        r.version = 1;
        let what = match &r.trigger_key {
            Some(_) => format!(
                "automatic run of playbook {} for this incident",
                r.playbook_id
            ),
            None => format!("run {}", r.id),
        };
        let fail = fail(&what, "failed to insert a run");
        let mut tx = self.write(r.tenant_id).await.map_err(&fail)?;
        Stmt::<DB>::new(
            "INSERT INTO playbook_runs (tenant_id, id, playbook_id, version, status, incident_id, created_at, \
             updated_at, approval_deadline, trigger_key, doc) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .uuid(r.tenant_id.0)
        .uuid(r.id)
        .uuid(r.playbook_id)
        .arg(r.version)
        .arg(r.status.as_i16())
        .opt_uuid(r.incident_id)
        .time(r.created_at)
        .time(r.updated_at)
        .time(r.approval_deadline)
        .arg(r.trigger_key.clone())
        .doc(&r)
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        Self::log_run(&mut tx, &r, None, "created")
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(r)
    }

    async fn get_run(&self, tenant: TenantId, id: Uuid) -> StoreResult<PlaybookRun> {
        let what = format!("run {id}");
        let q = Stmt::<DB>::new(
            "SELECT version, doc FROM playbook_runs WHERE tenant_id = $1 AND id = $2",
        )
        .uuid(tenant.0)
        .uuid(id);
        let row = self
            .read_one(tenant, q)
            .await
            .map_err(fail(&what, "failed to read a run"))?;
        run_from_row::<DB>(&row).map_err(bad_doc("bad run doc"))
    }

    async fn list_runs(&self, tenant: TenantId, q: &RunQuery) -> StoreResult<Vec<PlaybookRun>> {
        let mut b = Stmt::<DB>::new("SELECT version, doc FROM playbook_runs WHERE tenant_id = ");
        b.push_uuid(tenant.0);
        if let Some(p) = q.playbook_id {
            b.push(" AND playbook_id = ").push_uuid(p);
        }
        if let Some(i) = q.incident_id {
            b.push(" AND incident_id = ").push_uuid(i);
        }
        if !q.statuses.is_empty() {
            b.push_in("status", q.statuses.iter().map(|s| s.as_i16()));
        }
        push_newest_first(&mut b, "created_at", q.before, q.limit);
        let rows = self
            .read_all(tenant, b)
            .await
            .map_err(fail("runs", "failed to list runs"))?;
        decode_all::<DB, _>(&rows, run_from_row::<DB>).map_err(bad_doc("bad run doc"))
    }

    async fn save_run(
        &self,
        run: &PlaybookRun,
        previous: RunStatus,
        lease_owner: Option<&str>,
    ) -> StoreResult<PlaybookRun> {
        let what = format!("run {}", run.id);
        let fail = fail(&what, "failed to save a run");
        let mut r = run.clone();
        r.version = run.version + 1;
        let mut tx = self.write(r.tenant_id).await.map_err(&fail)?;
        let mut q = Stmt::<DB>::new("UPDATE playbook_runs SET version = ");
        q.push_bind(r.version)
            .push(", status = ")
            .push_bind(r.status.as_i16())
            .push(", updated_at = ")
            .push_time(r.updated_at)
            .push(", doc = ")
            .push_doc(&r);
        if r.status.is_terminal() {
            q.push(", lease_owner = NULL, lease_until = NULL");
        }
        q.push(" WHERE tenant_id = ")
            .push_uuid(r.tenant_id.0)
            .push(" AND id = ")
            .push_uuid(r.id)
            .push(" AND version = ")
            .push_bind(run.version);
        if let Some(owner) = lease_owner {
            q.push(" AND lease_owner = ").push_bind(owner);
        }
        let done = q.execute(&mut *tx).await.map_err(&fail)?;
        if done == 0 {
            return Err(StoreError::Conflict(format!(
                "{what} (changed concurrently)"
            )));
        }
        Self::log_run(&mut tx, &r, Some(previous), "updated")
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(r)
    }

    async fn claim_runs(
        &self,
        owner: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<(TenantId, Uuid)>> {
        let fail = fail("runs", "failed to claim runs");
        let q = Stmt::<DB>::new(DB::CLAIM_RUNS)
            .arg(owner)
            .time(until)
            .time(now)
            .arg(limit.min(i32::MAX as u32) as i32);
        let rows = self.all(q).await.map_err(&fail)?;
        pairs::<DB>(&rows).map_err(fail)
    }

    async fn renew_run_lease(
        &self,
        tenant: TenantId,
        id: Uuid,
        owner: &str,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let q = Stmt::<DB>::new(
            "UPDATE playbook_runs SET lease_until = $4 WHERE tenant_id = $1 AND id = $2 AND lease_owner = $3",
        )
        .uuid(tenant.0)
        .uuid(id)
        .arg(owner)
        .time(until);
        let done = self
            .write_one(tenant, q)
            .await
            .map_err(fail("run lease", "failed to renew a run lease"))?;
        Ok(done > 0)
    }

    async fn release_run_lease(&self, tenant: TenantId, id: Uuid, owner: &str) -> StoreResult<()> {
        let q = Stmt::<DB>::new(
            "UPDATE playbook_runs SET lease_owner = NULL, lease_until = NULL \
             WHERE tenant_id = $1 AND id = $2 AND lease_owner = $3",
        )
        .uuid(tenant.0)
        .uuid(id)
        .arg(owner);
        self.write_one(tenant, q)
            .await
            .map_err(fail("run lease", "failed to release a run lease"))?;
        Ok(())
    }

    async fn due_runs(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<(TenantId, Uuid)>> {
        let fail = fail("runs", "failed to list due runs");
        let q = Stmt::<DB>::new(DB::DUE_RUNS)
            .time(now)
            .arg(limit.min(i32::MAX as u32) as i32);
        let rows = self.all(q).await.map_err(&fail)?;
        pairs::<DB>(&rows).map_err(fail)
    }

    async fn used_trigger_keys(
        &self,
        tenant: TenantId,
        keys: &[String],
    ) -> StoreResult<Vec<String>> {
        let mut used = Vec::new();
        for chunk in keys.chunks(BATCH_ROWS) {
            let mut q = Stmt::<DB>::new("SELECT trigger_key FROM playbook_runs WHERE tenant_id = ");
            q.push_uuid(tenant.0);
            q.push_in("trigger_key", chunk.iter().map(String::as_str));
            let fail = fail("runs", "failed to look up trigger keys");
            let rows = self.read_all(tenant, q).await.map_err(&fail)?;
            for row in rows {
                used.push(row.col::<String>("trigger_key").map_err(&fail)?);
            }
        }
        Ok(used)
    }

    async fn get_notification_settings(
        &self,
        tenant: TenantId,
    ) -> StoreResult<Option<NotificationSettings>> {
        let q = Stmt::<DB>::text(format!(
            "SELECT {SETTINGS_COLUMNS} FROM notification_settings WHERE tenant_id = $1"
        ))
        .uuid(tenant.0);
        let fail = fail(
            "notification settings",
            "failed to read notification settings",
        );
        let row = self.read_first(tenant, q).await.map_err(&fail)?;
        row.as_ref()
            .map(settings_from_row::<DB>)
            .transpose()
            .map_err(fail)
    }

    async fn put_notification_settings(&self, s: &NotificationSettings) -> StoreResult<()> {
        let q = Stmt::<DB>::text(format!(
            "INSERT INTO notification_settings ({SETTINGS_COLUMNS}) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id) DO UPDATE SET url = EXCLUDED.url, secret = EXCLUDED.secret, \
             secret_rotated_at = EXCLUDED.secret_rotated_at, updated_at = EXCLUDED.updated_at"
        ))
        .uuid(s.tenant_id.0)
        .arg(s.url.as_str())
        .arg(s.sealed_secret.clone())
        .opt_time(s.secret_rotated_at)
        .time(s.updated_at);
        self.write_one(s.tenant_id, q).await.map_err(fail_orphan(
            format!("tenant {}", s.tenant_id),
            "notification settings",
            "failed to store notification settings",
        ))?;
        Ok(())
    }

    async fn ensure_notification_secret(
        &self,
        tenant: TenantId,
        sealed_secret: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<NotificationSettings> {
        let q = Stmt::<DB>::text(format!(
            "INSERT INTO notification_settings ({SETTINGS_COLUMNS}) VALUES ($1, '', $2, $3, $3) \
             ON CONFLICT (tenant_id) DO UPDATE SET \
             secret_rotated_at = CASE WHEN notification_settings.secret IS NULL THEN EXCLUDED.secret_rotated_at \
                                 ELSE notification_settings.secret_rotated_at END, \
             secret = COALESCE(notification_settings.secret, EXCLUDED.secret) \
             RETURNING {SETTINGS_COLUMNS}"
        ))
        .uuid(tenant.0)
        .arg(sealed_secret)
        .time(at);
        let fail = fail_orphan(
            format!("tenant {tenant}"),
            "notification settings",
            "failed to store a notification secret",
        );
        let row = self.write_returning(tenant, q).await.map_err(&fail)?;
        settings_from_row::<DB>(&row).map_err(fail)
    }
}
