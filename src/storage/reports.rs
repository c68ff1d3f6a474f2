//! [`ReportStore`] on [`SqlStore`], written once for both backends like
//! `sql.rs`: every report figure is a `GROUP BY` in the database, never a scan
//! of events in memory. Times are compared as the backends store them; a
//! bucket is `(event time in µs − range start in µs) / width in µs`, integer
//! division on both (`Dialect::micros`). Every count is `COUNT(…)` (a 64-bit
//! integer on both backends, never NULL), so the rows decode as `i64`
//! everywhere. The event classes (authentication attempt, VPN connect, …) are
//! the SQL conditions below, documented in `proto/picket/v1/report.proto`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, DurationRound, Utc};
use uuid::Uuid;

use crate::domain::alert::{Entity, StatusChange};
use crate::domain::event::FeedPosition;
use crate::domain::incident::IncidentStatus;
use crate::domain::report::{
    AccessGrouping, AccessKey, AccessQuery, AccessRow, CriticalAlert, EntityCount, EventCounts,
    IncidentHistory, ReportRange, RuleCount, StatusStep,
};
use crate::domain::{Severity, TenantId};
use crate::storage::dialect::{Col, Dialect, Stmt};
use crate::storage::rollups::{push_events_part, raw_parts, rolled_hours};
use crate::storage::sql::{fail, prefix_end, uuid};
use crate::storage::{ReportStore, SqlStore, StoreError, StoreResult};

/// An authentication attempt (OCSF 3002, success or failure, not a logout).
const AUTH: &str = "ocsf_class_uid = 3002 AND outcome IN (1, 2) AND event_type NOT LIKE '%logout%'";
/// A VPN connect (not failed).
pub(crate) const VPN_CONNECT: &str =
    "event_type IN ('vpn.connect', 'vpn.connected') AND outcome <> 2";
/// A VPN disconnect.
pub(crate) const VPN_DISCONNECT: &str = "event_type IN ('vpn.disconnect', 'vpn.disconnected')";
/// Every VPN event type the reports count.
pub(crate) const VPN_TYPES: &str =
    "('vpn.connect', 'vpn.connected', 'vpn.disconnect', 'vpn.disconnected')";
/// A firewall rule change.
const FIREWALL: &str =
    "event_type LIKE 'firewall.%' AND (event_type LIKE '%rule%' OR event_type LIKE '%policy%')";
/// A quota violation.
const QUOTA: &str = "ocsf_class_uid = 6003 AND (event_type LIKE '%exceeded' \
     OR event_type LIKE '%breached' OR event_type LIKE '%throttled')";
/// An API call.
const API: &str = "ocsf_class_uid IN (6003, 4002)";

/// The event figures of a `GROUP BY` over events (decoded by [`counts_of`]).
pub(crate) fn counts() -> String {
    format!(
        "COUNT(*) AS n, \
         COUNT(CASE WHEN severity = 1 THEN 1 END) AS s1, \
         COUNT(CASE WHEN severity = 2 THEN 1 END) AS s2, \
         COUNT(CASE WHEN severity = 3 THEN 1 END) AS s3, \
         COUNT(CASE WHEN severity = 4 THEN 1 END) AS s4, \
         COUNT(CASE WHEN severity = 5 THEN 1 END) AS s5, \
         COUNT(CASE WHEN {AUTH} THEN 1 END) AS auth, \
         COUNT(CASE WHEN {AUTH} AND outcome = 1 THEN 1 END) AS auth_ok, \
         COUNT(CASE WHEN {AUTH} AND outcome = 2 THEN 1 END) AS auth_failed, \
         COUNT(CASE WHEN {API} THEN 1 END) AS api, \
         COUNT(CASE WHEN {FIREWALL} THEN 1 END) AS firewall, \
         COUNT(CASE WHEN {QUOTA} THEN 1 END) AS quota, \
         COUNT(CASE WHEN {VPN_CONNECT} THEN 1 END) AS vpn_in, \
         COUNT(CASE WHEN {VPN_DISCONNECT} THEN 1 END) AS vpn_out"
    )
}

/// The same figures summed over `event_rollups` rows.
const ROLLED_COUNTS: &str = "CAST(SUM(n) AS BIGINT) AS n, CAST(SUM(s1) AS BIGINT) AS s1, \
     CAST(SUM(s2) AS BIGINT) AS s2, CAST(SUM(s3) AS BIGINT) AS s3, CAST(SUM(s4) AS BIGINT) AS s4, \
     CAST(SUM(s5) AS BIGINT) AS s5, CAST(SUM(auth) AS BIGINT) AS auth, \
     CAST(SUM(auth_ok) AS BIGINT) AS auth_ok, CAST(SUM(auth_failed) AS BIGINT) AS auth_failed, \
     CAST(SUM(api) AS BIGINT) AS api, CAST(SUM(firewall) AS BIGINT) AS firewall, \
     CAST(SUM(quota) AS BIGINT) AS quota, CAST(SUM(vpn_in) AS BIGINT) AS vpn_in, \
     CAST(SUM(vpn_out) AS BIGINT) AS vpn_out";

/// Decodes the figures of [`COUNTS`] (or [`ROLLED_COUNTS`]).
pub(crate) fn counts_of<DB: Dialect>(r: &DB::Row) -> Result<EventCounts, sqlx::Error> {
    let mut c = EventCounts {
        events: count(r.col("n")?),
        auth_attempts: count(r.col("auth")?),
        auth_successes: count(r.col("auth_ok")?),
        failed_logins: count(r.col("auth_failed")?),
        api_calls: count(r.col("api")?),
        firewall_rule_changes: count(r.col("firewall")?),
        quota_violations: count(r.col("quota")?),
        vpn_connects: count(r.col("vpn_in")?),
        vpn_disconnects: count(r.col("vpn_out")?),
        ..Default::default()
    };
    for (col, s) in [
        ("s1", Severity::Info),
        ("s2", Severity::Low),
        ("s3", Severity::Medium),
        ("s4", Severity::High),
        ("s5", Severity::Critical),
    ] {
        c.by_severity.add(s, count(r.col(col)?));
    }
    Ok(c)
}

/// SQL for the bucket of time column `col` with the range start and width
/// bound in place (`s` gets the two values).
fn push_bucket<DB: Dialect>(s: &mut Stmt<DB>, col: &str, range: ReportRange, width: i64) {
    s.push(&format!("(({}) - ", DB::micros(col)))
        .push_bind(range.start.timestamp_micros())
        .push(") / ")
        .push_bind(width);
}

fn count(row_value: i64) -> u64 {
    row_value.max(0) as u64
}

/// The bucket expression of time column `col`: `$2` is the range start in
/// µs, `$3` the width in µs.
fn bucket<DB: Dialect>(col: &str) -> String {
    format!("(({}) - $2) / $3", DB::micros(col))
}

fn bad(what: &'static str) -> impl Fn(String) -> StoreError {
    move |e| StoreError::Unexpected(anyhow::anyhow!("undecodable {what}: {e}"))
}

#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// A statement over `table` of `tenant` in `range` on `col`, with `$1`
    /// tenant, `$2` range start in µs, `$3` bucket width in µs, `$4`/`$5`
    /// the range: `sql` holds `{bucket}` and `{where}` to fill in.
    fn bucketed(
        sql: &str,
        col: &str,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> Stmt<DB> {
        let text = sql.replace("{bucket}", &bucket::<DB>(col)).replace(
            "{where}",
            &format!("tenant_id = $1 AND {col} >= $4 AND {col} < $5"),
        );
        Stmt::<DB>::text(text)
            .uuid(tenant.0)
            .arg(range.start.timestamp_micros())
            .arg(width_micros)
            .time(range.start)
            .time(range.end)
    }

    /// Counts per (bucket, severity) of `table` by `created_at`.
    async fn severity_buckets(
        &self,
        table: &'static str,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, Severity, u64)>> {
        let fail = fail(table, "failed to count by severity");
        let q = Self::bucketed(
            &format!(
                "SELECT {{bucket}} AS b, severity, COUNT(*) AS n FROM {table} \
                 WHERE {{where}} GROUP BY 1, 2"
            ),
            "created_at",
            tenant,
            range,
            width_micros,
        );
        let rows = self.read_all(tenant, q).await.map_err(&fail)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.col::<i64>("b")?.max(0) as usize,
                    Severity::from_i16(r.col::<i16>("severity")?).unwrap_or_default(),
                    count(r.col::<i64>("n")?),
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(fail)
    }
}

#[async_trait]
impl<DB: Dialect> ReportStore for SqlStore<DB> {
    async fn access_report(
        &self,
        tenant: TenantId,
        q: &AccessQuery,
    ) -> StoreResult<Vec<AccessRow>> {
        let fail = fail("events", "failed to build an access report");
        let mut tx = self.read(tenant).await.map_err(&fail)?;
        let limit = usize::try_from(q.limit).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        if q.actor.is_some() {
            // One actor: its index range is already all that is read.
            let rows = access_stmt::<DB>(tenant, q, None, q.limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(&fail)?;
            out = access_rows::<DB>(&rows).map_err(&fail)?;
        } else {
            // Pages are in actor order, so a page needs only the range's
            // first actors after the page key: find them through the actor
            // index (one probe each), aggregate only their events, and take
            // more actors (4 × as many each round) until the page is full or
            // the range has no more. A page of 100 rows of a 333,000-events
            // day reads a few actors' events instead of grouping the day.
            let mut from = q.after.as_ref().map(|k| (k.actor.clone(), true));
            let mut chunk: i64 = 8;
            loop {
                let actors: Vec<String> = actors_stmt::<DB>(tenant, q, from.as_ref(), chunk)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(&fail)?
                    .iter()
                    .map(|r| r.col::<String>("actor"))
                    .collect::<Result<_, _>>()
                    .map_err(&fail)?;
                let (Some(lo), Some(hi)) = (actors.first(), actors.last()) else {
                    break;
                };
                let want = q.limit - u32::try_from(out.len()).unwrap_or(u32::MAX);
                let rows = access_stmt::<DB>(tenant, q, Some((lo, hi)), want)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(&fail)?;
                out.extend(access_rows::<DB>(&rows).map_err(&fail)?);
                if out.len() >= limit || (actors.len() as i64) < chunk {
                    break;
                }
                from = Some((hi.clone(), false));
                chunk = (chunk * 4).min(4096);
            }
        }
        tx.commit().await.map_err(&fail)?;
        Ok(out)
    }

    async fn event_counts(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, EventCounts)>> {
        let fail = fail("events", "failed to count events");
        let mut tx = DB::begin_snapshot(self, tenant).await.map_err(&fail)?;
        let hours = rolled_hours(range, width_micros);
        let pos = match hours {
            Some(_) => Self::rollup_position_in(&mut tx, tenant)
                .await
                .map_err(&fail)?,
            None => None,
        };
        let rolled = hours.zip(pos);
        let mut per: BTreeMap<i64, EventCounts> = BTreeMap::new();
        let mut add = |rows: Vec<DB::Row>| -> Result<(), sqlx::Error> {
            for r in &rows {
                per.entry(r.col::<i64>("b")?.max(0))
                    .or_default()
                    .merge(&counts_of::<DB>(r)?);
            }
            Ok(())
        };
        if let Some(((h0, h1), _)) = rolled {
            let s = Stmt::<DB>::text(format!(
                "SELECT (hour_us - $1) / $2 AS b, {ROLLED_COUNTS} FROM event_rollups \
                 WHERE tenant_id = $3 AND hour_us >= $4 AND hour_us < $5 GROUP BY 1"
            ))
            .arg(range.start.timestamp_micros())
            .arg(width_micros)
            .uuid(tenant.0)
            .arg(h0)
            .arg(h1);
            add(s.fetch_all(&mut *tx).await.map_err(&fail)?).map_err(&fail)?;
        }
        for part in raw_parts(range, rolled) {
            let mut s = Stmt::<DB>::new("SELECT ");
            push_bucket(&mut s, "occurred_at", range, width_micros);
            s.push(&format!(" AS b, {}", counts()));
            push_events_part(&mut s, tenant, part);
            s.push(" GROUP BY 1");
            add(s.fetch_all(&mut *tx).await.map_err(&fail)?).map_err(&fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(per.into_iter().map(|(b, c)| (b as usize, c)).collect())
    }

    async fn vpn_floor_changes(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, i64)>> {
        let fail = fail("events", "failed to count VPN connections");
        let mut tx = DB::begin_snapshot(self, tenant).await.map_err(&fail)?;
        let hours = rolled_hours(range, width_micros);
        let pos = match hours {
            Some(_) => Self::rollup_position_in(&mut tx, tenant)
                .await
                .map_err(&fail)?,
            None => None,
        };
        let rolled = hours.zip(pos);
        // Per actor and bucket, the net change d and the disconnects x. The
        // open connections of an actor are the running sum of d floored at
        // zero: the plain running sum S minus the lowest S so far when that
        // is negative. Only an actor with a disconnect in the range can go
        // below zero, so only those actors' rows are walked here, and the
        // rows returned are what flooring adds to the plain net change per
        // bucket (usually nothing); the caller has the net change from the
        // event figures.
        // The actors with a disconnect in the range (a partial index finds
        // them in the rollups), then their rows only.
        let mut s = Stmt::<DB>::new("WITH neg AS (");
        let mut first = true;
        if let Some(((h0, h1), _)) = rolled {
            first = false;
            s.push("SELECT actor FROM vpn_rollups WHERE disconnects > 0 AND tenant_id = ");
            s.push_uuid(tenant.0);
            s.push(" AND hour_us >= ").push_bind(h0);
            s.push(" AND hour_us < ").push_bind(h1);
        }
        for part in raw_parts(range, rolled) {
            if !first {
                s.push(" UNION ");
            }
            first = false;
            s.push("SELECT actor");
            push_events_part(&mut s, tenant, part);
            s.push(&format!(" AND {VPN_DISCONNECT}"));
        }
        s.push("), u AS (");
        let mut first = true;
        if let Some(((h0, h1), _)) = rolled {
            first = false;
            s.push("SELECT actor, (hour_us - ")
                .push_bind(range.start.timestamp_micros())
                .push(") / ")
                .push_bind(width_micros)
                .push(
                    " AS b, connects - disconnects AS d FROM vpn_rollups \
                     WHERE actor IN (SELECT actor FROM neg) AND tenant_id = ",
                );
            s.push_uuid(tenant.0);
            s.push(" AND hour_us >= ").push_bind(h0);
            s.push(" AND hour_us < ").push_bind(h1);
        }
        for part in raw_parts(range, rolled) {
            if !first {
                s.push(" UNION ALL ");
            }
            first = false;
            s.push("SELECT actor, ");
            push_bucket(&mut s, "occurred_at", range, width_micros);
            s.push(&format!(
                " AS b, CASE WHEN {VPN_CONNECT} THEN 1 WHEN {VPN_DISCONNECT} THEN -1 ELSE 0 END AS d"
            ));
            push_events_part(&mut s, tenant, part);
            s.push(&format!(
                " AND event_type IN {VPN_TYPES} AND actor IN (SELECT actor FROM neg)"
            ));
        }
        s.push(
            "), \
             a AS (SELECT actor, b, SUM(d) AS d FROM u GROUP BY actor, b), \
             r AS (SELECT actor, b, d, SUM(d) OVER (PARTITION BY actor ORDER BY b \
             ROWS UNBOUNDED PRECEDING) AS s FROM a), \
             m AS (SELECT actor, b, d, s, MIN(s) OVER (PARTITION BY actor ORDER BY b \
             ROWS UNBOUNDED PRECEDING) AS low FROM r), \
             l AS (SELECT actor, b, d, s - CASE WHEN low < 0 THEN low ELSE 0 END AS level FROM m), \
             c AS (SELECT b, level - COALESCE(LAG(level) OVER (PARTITION BY actor ORDER BY b), 0) \
             - d AS dl FROM l) \
             SELECT b, CAST(SUM(dl) AS BIGINT) AS dl FROM c GROUP BY b HAVING SUM(dl) <> 0 ORDER BY b",
        );
        let rows = s.fetch_all(&mut *tx).await.map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        rows.iter()
            .map(|r| Ok((r.col::<i64>("b")?.max(0) as usize, r.col::<i64>("dl")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(fail)
    }

    async fn new_vpn_networks(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<Option<u64>> {
        self.count_new_vpn_networks(tenant, range, limit).await
    }

    async fn roll_up(&self, tenant: TenantId, max_events: u32) -> StoreResult<u64> {
        self.roll_up_events(tenant, max_events).await
    }

    async fn rollup_position(&self, tenant: TenantId) -> StoreResult<Option<FeedPosition>> {
        SqlStore::rollup_position(self, tenant).await
    }

    async fn alert_counts(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, Severity, u64)>> {
        self.severity_buckets("alerts", tenant, range, width_micros)
            .await
    }

    async fn incident_counts(
        &self,
        tenant: TenantId,
        range: ReportRange,
        width_micros: i64,
    ) -> StoreResult<Vec<(usize, Severity, u64)>> {
        self.severity_buckets("incidents", tenant, range, width_micros)
            .await
    }

    async fn alerts_by_rule(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<Vec<RuleCount>> {
        let fail = fail("alerts", "failed to count alerts by rule");
        let bo = DB::BYTE_ORDER;
        let source = DB::json_text("doc", &["source_name"]);
        let a_source = DB::json_text("a.doc", &["source_name"]);
        let a_title = DB::json_text("a.doc", &["title"]);
        let q = Stmt::<DB>::text(format!(
            "SELECT g.source, g.n, (SELECT {a_title} FROM alerts a WHERE a.tenant_id = $1 \
             AND a.created_at >= $2 AND a.created_at < $3 AND {a_source} = g.source \
             ORDER BY a.created_at DESC, a.id DESC LIMIT 1) AS title \
             FROM (SELECT {source} AS source, COUNT(*) AS n FROM alerts WHERE tenant_id = $1 \
             AND created_at >= $2 AND created_at < $3 GROUP BY 1 \
             ORDER BY n DESC, {source}{bo} LIMIT $4) g ORDER BY g.n DESC, g.source{bo}"
        ))
        .uuid(tenant.0)
        .time(range.start)
        .time(range.end)
        .arg(i64::from(limit));
        let rows = self.read_all(tenant, q).await.map_err(&fail)?;
        rows.iter()
            .map(|r| {
                Ok(RuleCount {
                    source_name: r.col::<Option<String>>("source")?.unwrap_or_default(),
                    title: r.col::<Option<String>>("title")?.unwrap_or_default(),
                    count: count(r.col("n")?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(fail)
    }

    async fn top_alert_entities(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<Vec<EntityCount>> {
        let fail = fail("alerts", "failed to count alert entities");
        let bo = DB::BYTE_ORDER;
        let kind = DB::json_text(DB::ENTITY, &["kind"]);
        let value = DB::json_text(DB::ENTITY, &["value"]);
        let q = Stmt::<DB>::text(format!(
            "SELECT {kind} AS kind, {value} AS value, COUNT(DISTINCT a.id) AS n \
             FROM {} WHERE a.tenant_id = $1 AND a.created_at >= $2 AND a.created_at < $3 \
             GROUP BY 1, 2 ORDER BY n DESC, {kind}{bo}, {value}{bo} LIMIT $4",
            DB::ALERT_ENTITIES
        ))
        .uuid(tenant.0)
        .time(range.start)
        .time(range.end)
        .arg(i64::from(limit));
        let rows = self.read_all(tenant, q).await.map_err(&fail)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let kind: Option<String> = r.col("kind").map_err(&fail)?;
            let value: Option<String> = r.col("value").map_err(&fail)?;
            let kind = serde_json::from_value(serde_json::Value::String(kind.unwrap_or_default()))
                .map_err(|e| bad("entity kind")(e.to_string()))?;
            out.push((
                Entity::new(kind, value.unwrap_or_default()),
                count(r.col("n").map_err(&fail)?),
            ));
        }
        Ok(out)
    }

    async fn incident_histories(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<(u64, Vec<IncidentHistory>)> {
        let fail = fail("incidents", "failed to read incident histories");
        let mut tx = self.read(tenant).await.map_err(&fail)?;
        // Incidents unchanged since before the range: their status now is
        // their status at the range end.
        let quiet = Stmt::<DB>::new(
            "SELECT COUNT(*) AS n FROM incidents WHERE tenant_id = $1 AND created_at < $3 \
             AND updated_at < $2 AND status IN (1, 2, 3)",
        )
        .uuid(tenant.0)
        .time(range.start)
        .time(range.end)
        .fetch_one(&mut *tx)
        .await
        .map_err(&fail)?;
        let quiet_open = count(quiet.col("n").map_err(&fail)?);
        let kind = DB::json_text("t.entry", &["kind"]);
        let q = Stmt::<DB>::text(format!(
            "SELECT i.id, i.created_at, {} AS merged_into, t.seq, {kind} AS kind, \
             {} AS at, {} AS subject FROM incidents i LEFT JOIN incident_timeline t \
             ON t.tenant_id = i.tenant_id AND t.incident_id = i.id \
             AND {kind} IN ('StatusChanged', 'Reopened', 'Merged') \
             WHERE i.tenant_id = $1 AND i.created_at < $3 AND i.updated_at >= $2 \
             ORDER BY i.id, t.seq LIMIT $4",
            DB::json_text("i.doc", &["merged_into"]),
            DB::json_text("t.entry", &["at"]),
            DB::json_text("t.entry", &["subject"]),
        ))
        .uuid(tenant.0)
        .time(range.start)
        .time(range.end)
        .arg(i64::from(limit));
        let rows = q.fetch_all(&mut *tx).await.map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        let mut out: Vec<IncidentHistory> = Vec::new();
        let mut last: Option<Uuid> = None;
        for r in &rows {
            let id = uuid::<DB>(r, "id").map_err(&fail)?;
            if last != Some(id) {
                last = Some(id);
                out.push(IncidentHistory {
                    created_at: DB::time(r, "created_at").map_err(&fail)?,
                    steps: Vec::new(),
                });
            }
            let Some(kind) = r.col::<Option<String>>("kind").map_err(&fail)? else {
                continue;
            };
            let at: Option<String> = r.col("at").map_err(&fail)?;
            // Microseconds, the precision of every stored time.
            let at: DateTime<Utc> = at
                .unwrap_or_default()
                .parse::<DateTime<Utc>>()
                .map_err(|e| bad("timeline time")(e.to_string()))?
                .duration_trunc(chrono::Duration::microseconds(1))
                .map_err(|e| bad("timeline time")(e.to_string()))?;
            let subject = r
                .col::<Option<String>>("subject")
                .map_err(&fail)?
                .unwrap_or_default();
            let step = match kind.as_str() {
                "Reopened" => StatusStep::Reopened,
                "Merged" => {
                    let merged_into: Option<String> = r.col("merged_into").map_err(&fail)?;
                    if merged_into.as_deref() != Some(subject.as_str()) {
                        continue; // another incident merged into this one
                    }
                    StatusStep::MergedAway
                }
                _ => StatusStep::To(match subject.as_str() {
                    "Open" => IncidentStatus::Open,
                    "Investigating" => IncidentStatus::Investigating,
                    "Contained" => IncidentStatus::Contained,
                    "Resolved" => IncidentStatus::Resolved,
                    "Closed" => IncidentStatus::Closed,
                    other => return Err(bad("incident status")(other.to_owned())),
                }),
            };
            let h = out.last_mut().expect("pushed above");
            h.steps.push((at, step));
        }
        Ok((quiet_open, out))
    }

    async fn critical_alerts(
        &self,
        tenant: TenantId,
        before: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<CriticalAlert>> {
        let fail = fail("alerts", "failed to read critical alerts");
        let q = Stmt::<DB>::text(format!(
            "SELECT created_at, {} AS history FROM alerts WHERE tenant_id = $1 \
             AND severity = 5 AND created_at < $2 ORDER BY created_at LIMIT $3",
            DB::json_text("doc", &["body", "history"])
        ))
        .uuid(tenant.0)
        .time(before)
        .arg(i64::from(limit));
        let rows = self.read_all(tenant, q).await.map_err(&fail)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let history: Option<String> = r.col("history").map_err(&fail)?;
            let history: Vec<StatusChange> = match history {
                Some(h) => {
                    serde_json::from_str(&h).map_err(|e| bad("alert history")(e.to_string()))?
                }
                None => Vec::new(),
            };
            out.push(CriticalAlert {
                created_at: DB::time(r, "created_at").map_err(&fail)?,
                history,
            });
        }
        Ok(out)
    }
}

/// The first `k` distinct actors of `q`'s range in byte order, from
/// `from` (inclusive or not) on: a skip scan of the actor index, one probe
/// per actor (a recursive query, the same on both backends).
fn actors_stmt<DB: Dialect>(
    tenant: TenantId,
    q: &AccessQuery,
    from: Option<&(String, bool)>,
    k: i64,
) -> Stmt<DB> {
    let bo = DB::BYTE_ORDER;
    let mut s = Stmt::<DB>::new(
        "WITH RECURSIVE a(actor, n) AS (SELECT actor, CAST(1 AS BIGINT) FROM (\
         SELECT actor FROM events WHERE tenant_id = ",
    );
    s.push_uuid(tenant.0);
    s.push(" AND occurred_at >= ").push_time(q.range.start);
    s.push(" AND occurred_at < ").push_time(q.range.end);
    if let Some((actor, inclusive)) = from {
        let op = if *inclusive { ">=" } else { ">" };
        s.push(&format!(" AND (actor{bo}) {op} "))
            .push_bind(actor.as_str());
    }
    s.push(&format!(
        " ORDER BY (actor{bo}) LIMIT 1) AS f UNION ALL SELECT (SELECT e.actor FROM events e \
         WHERE e.tenant_id = "
    ));
    s.push_uuid(tenant.0);
    s.push(" AND e.occurred_at >= ").push_time(q.range.start);
    s.push(" AND e.occurred_at < ").push_time(q.range.end);
    s.push(&format!(
        " AND (e.actor{bo}) > (a.actor{bo}) ORDER BY (e.actor{bo}) LIMIT 1), a.n + 1 \
         FROM a WHERE a.actor IS NOT NULL AND a.n < "
    ));
    s.push_bind(k);
    s.push(") SELECT actor FROM a WHERE actor IS NOT NULL");
    s
}

/// The access report's rows of `q` (limit `limit`), only of the actors in
/// `actors` (inclusive byte-order bounds) when given.
fn access_stmt<DB: Dialect>(
    tenant: TenantId,
    q: &AccessQuery,
    actors: Option<(&String, &String)>,
    limit: u32,
) -> Stmt<DB> {
    let bo = DB::BYTE_ORDER;
    // The group key: (actor, source IP or "") or (actor, resource, action).
    let (keys, select): (&[&str], &str) = match q.grouping {
        AccessGrouping::ActorSourceIp => (
            &["actor", "COALESCE(source_ip, '')"],
            "actor, COALESCE(source_ip, '') AS ka, '' AS kb",
        ),
        AccessGrouping::ActorResourceAction => (
            &["actor", "resource", "action"],
            "actor, resource AS ka, action AS kb",
        ),
    };
    let ordered: Vec<String> = keys.iter().map(|k| format!("{k}{bo}")).collect();
    // Two levels instead of COUNT(DISTINCT …), which only aggregates by
    // sorting: the inner level groups by the key and the column whose
    // distinct values are counted (source IP per (actor, resource,
    // action), resource per (actor, source IP)), both by hashing; the
    // outer level counts those groups. The key's own column has one
    // distinct value per group (none for a missing source IP).
    let (other, resources, ips) = match q.grouping {
        AccessGrouping::ActorSourceIp => (
            "resource",
            "COUNT(d)",
            "CASE WHEN ka = '' THEN 0 ELSE 1 END",
        ),
        AccessGrouping::ActorResourceAction => ("source_ip", "1", "COUNT(d)"),
    };
    let mut s = Stmt::<DB>::text(format!(
        "SELECT actor, ka, kb, CAST(SUM(n) AS BIGINT) AS n, \
         CAST(SUM(failures) AS BIGINT) AS failures, \
         MIN(first_seen) AS first_seen, MAX(last_seen) AS last_seen, \
         CAST({resources} AS BIGINT) AS resources, CAST({ips} AS BIGINT) AS ips FROM (\
         SELECT {select}, {other} AS d, COUNT(*) AS n, \
         COUNT(CASE WHEN outcome = 2 THEN 1 END) AS failures, \
         MIN(occurred_at) AS first_seen, MAX(occurred_at) AS last_seen \
         FROM events WHERE tenant_id = "
    ));
    s.push_uuid(tenant.0);
    s.push(" AND occurred_at >= ").push_time(q.range.start);
    s.push(" AND occurred_at < ").push_time(q.range.end);
    s.push(" AND received_at <= ").push_time(q.received_before);
    if let Some(actor) = &q.actor {
        s.push(&format!(" AND (actor{bo}) = "))
            .push_bind(actor.as_str());
    }
    if let Some((lo, hi)) = actors {
        s.push(&format!(" AND (actor{bo}) >= "))
            .push_bind(lo.as_str());
        s.push(&format!(" AND (actor{bo}) <= "))
            .push_bind(hi.as_str());
    }
    if !q.event_types.is_empty() {
        s.push_in("event_type", q.event_types.iter().map(String::as_str));
    }
    if let Some(p) = &q.resource_prefix {
        let col = format!("(resource{bo})");
        s.push(&format!(" AND {col} >= ")).push_bind(p.as_str());
        if let Some(end) = prefix_end(p) {
            s.push(&format!(" AND {col} < ")).push_bind(end);
        }
    }
    if let Some(k) = &q.after {
        s.push(&format!(" AND ({}) > (", ordered.join(", ")));
        s.push_bind(k.actor.as_str())
            .push(", ")
            .push_bind(k.a.as_str());
        if keys.len() == 3 {
            s.push(", ").push_bind(k.b.as_str());
        }
        s.push(")");
    }
    let outer: Vec<String> = ["actor", "ka", "kb"][..keys.len()]
        .iter()
        .map(|k| format!("{k}{bo}"))
        .collect();
    s.push(&format!(
        " GROUP BY {}, {other}) AS g GROUP BY actor, ka, kb ORDER BY {} LIMIT ",
        keys.join(", "),
        outer.join(", ")
    ))
    .push_bind(i64::from(limit));
    s
}

/// Decodes access report rows.
fn access_rows<DB: Dialect>(rows: &[DB::Row]) -> Result<Vec<AccessRow>, sqlx::Error> {
    rows.iter()
        .map(|r| {
            Ok(AccessRow {
                key: AccessKey {
                    actor: r.col("actor")?,
                    a: r.col("ka")?,
                    b: r.col("kb")?,
                },
                count: count(r.col("n")?),
                failures: count(r.col("failures")?),
                first_seen: DB::time(r, "first_seen")?,
                last_seen: DB::time(r, "last_seen")?,
                distinct_resources: count(r.col("resources")?),
                distinct_source_ips: count(r.col("ips")?),
            })
        })
        .collect()
}
