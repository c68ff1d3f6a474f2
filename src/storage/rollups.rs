//! Report rollups on [`SqlStore`] (migrations `0014_event_rollups`): event
//! figures per tenant and UTC hour, VPN connects and disconnects per (actor,
//! hour), and runs of VPN connects per (actor, network), maintained from the
//! committed-event feed by [`ReportStore::roll_up`] (driven by
//! `reports::rollup`), off the ingest path.
//!
//! Exactness: `rollup_positions` holds the feed position up to which every
//! event is folded in, moved in the same transaction as the rollups by a
//! compare-and-set on the old position (two replicas rolling up one tenant
//! never count an event twice; the loser's work is discarded). A report
//! reads, in one snapshot ([`Dialect::begin_snapshot`]), the rollups, that
//! position and the raw events after it; the hours a rollup cannot answer
//! (a range edge that is not on the hour, the current hour) come from the
//! raw events. So a report is exact at any moment, whether the rollups have
//! caught up or not; catching up only makes it cheaper.
//!
//! [`ReportStore::roll_up`]: crate::storage::ReportStore::roll_up

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::domain::TenantId;
use crate::domain::event::FeedPosition;
use crate::domain::report::{
    EventCounts, ReportRange, VPN_HISTORY, VpnRun, merge_vpn_runs, network_of,
};
use crate::storage::dialect::{Col, Dialect, Stmt, Tx};
use crate::storage::reports::{VPN_CONNECT, VPN_DISCONNECT, VPN_TYPES, counts, counts_of};
use crate::storage::sql::fail;
use crate::storage::{SqlStore, StoreResult};

/// One hour in µs: the rollups' granularity.
pub(crate) const HOUR_US: i64 = 3_600_000_000;
/// Rows per multi-row `INSERT` of the rollups (16 values a row at most).
const CHUNK: usize = 200;

/// SQL for the start (µs) of the UTC hour of time column `col`.
fn hour_of<DB: Dialect>(col: &str) -> String {
    format!("((({}) / {HOUR_US}) * {HOUR_US})", DB::micros(col))
}

/// Which part of a bucketed range the rollups answer: the whole hours
/// `[h0, h1)` (µs), when every bucket boundary is on the hour (the range
/// starts on the hour and the width is whole hours) or the range is one
/// bucket. The rest of the range, `[start, h0)` and `[h1, end)`, is read raw.
pub(crate) fn rolled_hours(range: ReportRange, width_micros: i64) -> Option<(i64, i64)> {
    let start = range.start.timestamp_micros();
    let end = range.end.timestamp_micros();
    if width_micros <= 0 || start < 0 {
        return None;
    }
    let one_bucket = width_micros >= end - start;
    let aligned = start % HOUR_US == 0 && width_micros % HOUR_US == 0;
    if !one_bucket && !aligned {
        return None;
    }
    let h0 = start.div_euclid(HOUR_US) * HOUR_US + if start % HOUR_US == 0 { 0 } else { HOUR_US };
    let h1 = end.div_euclid(HOUR_US) * HOUR_US;
    (h0 < h1).then_some((h0, h1))
}

fn at(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// The raw parts of a range whose hours `[h0, h1)` the rollups answer up to
/// `pos`: the edges whole, the rolled hours only after `pos`.
pub(crate) fn raw_parts(
    range: ReportRange,
    rolled: Option<((i64, i64), FeedPosition)>,
) -> Vec<(DateTime<Utc>, DateTime<Utc>, Option<FeedPosition>)> {
    match rolled {
        None => vec![(range.start, range.end, None)],
        Some(((h0, h1), pos)) => {
            let mut parts = Vec::with_capacity(3);
            if range.start < at(h0) {
                parts.push((range.start, at(h0), None));
            }
            parts.push((at(h0), at(h1), Some(pos)));
            if at(h1) < range.end {
                parts.push((at(h1), range.end, None));
            }
            parts
        }
    }
}

/// Appends ` FROM` the tenant's events after `after` in the feed (and up to
/// `upto`), as a subquery named `events` that reads them from `after`
/// through the feed index, fenced ([`Dialect::FENCE`]) so that the caller's
/// conditions stay outside it. Beside a selective condition such as a VPN
/// event type the planner would otherwise read every matching event of the
/// range through that condition's index and filter them by position
/// (seconds at 10 M events, for a tail that is empty once the rollups have
/// caught up).
fn push_feed_source<DB: Dialect>(
    s: &mut Stmt<DB>,
    tenant: TenantId,
    after: FeedPosition,
    upto: Option<FeedPosition>,
) {
    s.push(" FROM (SELECT * FROM events WHERE tenant_id = ");
    s.push_uuid(tenant.0);
    DB::push_after(s, after);
    if let Some(upto) = upto {
        DB::push_upto(s, upto);
    }
    s.push(DB::FENCE).push(") AS events");
}

/// Appends ` FROM` the tenant's events ` WHERE` they occurred in `[from,
/// to)` (and come after `pos` in the feed, if given, read from there:
/// [`push_feed_source`]); the caller may append more ` AND` conditions.
pub(crate) fn push_events_part<DB: Dialect>(
    s: &mut Stmt<DB>,
    tenant: TenantId,
    (from, to, pos): (DateTime<Utc>, DateTime<Utc>, Option<FeedPosition>),
) {
    match pos {
        None => {
            s.push(" FROM events");
        }
        Some(pos) => push_feed_source(s, tenant, pos, None),
    }
    s.push(" WHERE tenant_id = ");
    s.push_uuid(tenant.0);
    s.push(" AND occurred_at >= ").push_time(from);
    s.push(" AND occurred_at < ").push_time(to);
}

/// One VPN event read for the rollups.
struct VpnEvent {
    actor: String,
    source_ip: Option<String>,
    at: DateTime<Utc>,
    connect: bool,
    disconnect: bool,
}

#[allow(private_bounds)]
impl<DB: Dialect> SqlStore<DB> {
    /// The tenant's rollup position within `tx` (`None`: nothing rolled up).
    pub(crate) async fn rollup_position_in(
        tx: &mut Tx<DB>,
        tenant: TenantId,
    ) -> Result<Option<FeedPosition>, sqlx::Error> {
        let row = Stmt::<DB>::new("SELECT xid, seq FROM rollup_positions WHERE tenant_id = $1")
            .uuid(tenant.0)
            .fetch_optional(&mut **tx)
            .await?;
        row.map(|r| {
            Ok(FeedPosition {
                xid: r.col::<i64>("xid")?.max(0) as u64,
                seq: r.col::<i64>("seq")?,
            })
        })
        .transpose()
    }

    /// The position `max_events` readable events after `from` in the
    /// tenant's feed, or the last readable one; `None` when none is after.
    async fn rollup_target(
        &self,
        tenant: TenantId,
        from: FeedPosition,
        max_events: u32,
    ) -> Result<Option<FeedPosition>, sqlx::Error> {
        let mut q = Self::feed("events", "seq", tenant, None);
        DB::push_after(&mut q, from);
        q.push(&format!(" ORDER BY {} LIMIT 1 OFFSET ", DB::FEED_ORDER))
            .push_bind(i64::from(max_events.max(1) - 1));
        if let Some(row) = self.read_first(tenant, q).await? {
            return DB::position(&row).map(Some);
        }
        let mut q = Self::feed("events", "seq", tenant, None);
        DB::push_after(&mut q, from);
        q.push(&format!(" ORDER BY {} LIMIT 1", DB::FEED_ORDER_DESC));
        self.read_first(tenant, q)
            .await?
            .as_ref()
            .map(DB::position)
            .transpose()
    }

    /// Folds the events in `(from, upto]` into the rollups; `false` when the
    /// position was no longer `from` (another replica moved it first).
    async fn fold(
        &self,
        tenant: TenantId,
        from: Option<FeedPosition>,
        upto: FeedPosition,
    ) -> Result<bool, sqlx::Error> {
        let after = from.unwrap_or_default();
        // Read first, outside the writing transaction: on Postgres a writing
        // transaction holds back the feed of every reader until it ends, so
        // it must stay short.
        let mut s = Stmt::<DB>::text(format!(
            "SELECT {} AS h, {} FROM events WHERE tenant_id = ",
            hour_of::<DB>("occurred_at"),
            counts()
        ));
        s.push_uuid(tenant.0);
        DB::push_after(&mut s, after);
        DB::push_upto(&mut s, upto);
        s.push(" GROUP BY 1");
        let hours: Vec<(i64, EventCounts)> = self
            .read_all(tenant, s)
            .await?
            .iter()
            .map(|r| Ok((r.col::<i64>("h")?, counts_of::<DB>(r)?)))
            .collect::<Result<_, sqlx::Error>>()?;
        // The VPN events among them, from the part read through the feed
        // index (see `push_feed_source`: with the type filter beside the
        // position the planner read every VPN event of the tenant's history
        // through the type index instead, 5 s for 400 of them at 10 M events).
        let mut s = Stmt::<DB>::text(format!(
            "SELECT actor, source_ip, occurred_at, \
             CAST(CASE WHEN {VPN_CONNECT} THEN 1 ELSE 0 END AS BIGINT) AS c, \
             CAST(CASE WHEN {VPN_DISCONNECT} THEN 1 ELSE 0 END AS BIGINT) AS d"
        ));
        push_feed_source(&mut s, tenant, after, Some(upto));
        s.push(&format!(" WHERE event_type IN {VPN_TYPES}"));
        let vpn: Vec<VpnEvent> = self
            .read_all(tenant, s)
            .await?
            .iter()
            .map(|r| {
                Ok(VpnEvent {
                    actor: r.col("actor")?,
                    source_ip: r.col("source_ip")?,
                    at: DB::time(r, "occurred_at")?,
                    connect: r.col::<i64>("c")? == 1,
                    disconnect: r.col::<i64>("d")? == 1,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;

        let mut tx = self.write(tenant).await?;
        let moved = match from {
            None => {
                Stmt::<DB>::new(
                    "INSERT INTO rollup_positions (tenant_id, xid, seq, updated_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id) DO NOTHING",
                )
                .uuid(tenant.0)
                .arg(upto.xid as i64)
                .arg(upto.seq)
                .time(Utc::now())
                .execute(&mut *tx)
                .await?
            }
            Some(from) => {
                Stmt::<DB>::new(
                    "UPDATE rollup_positions SET xid = $2, seq = $3, updated_at = $4 \
                     WHERE tenant_id = $1 AND xid = $5 AND seq = $6",
                )
                .uuid(tenant.0)
                .arg(upto.xid as i64)
                .arg(upto.seq)
                .time(Utc::now())
                .arg(from.xid as i64)
                .arg(from.seq)
                .execute(&mut *tx)
                .await?
            }
        };
        if moved == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        Self::add_hours(&mut tx, tenant, &hours).await?;
        Self::add_vpn_hours(&mut tx, tenant, &vpn).await?;
        Self::add_vpn_runs(&mut tx, tenant, &vpn).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn add_hours(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        hours: &[(i64, EventCounts)],
    ) -> Result<(), sqlx::Error> {
        for chunk in hours.chunks(CHUNK) {
            let mut s = Stmt::<DB>::new(
                "INSERT INTO event_rollups (tenant_id, hour_us, n, s1, s2, s3, s4, s5, auth, \
                 auth_ok, auth_failed, api, firewall, quota, vpn_in, vpn_out) VALUES ",
            );
            for (i, (h, c)) in chunk.iter().enumerate() {
                s.push(if i == 0 { "(" } else { ", (" });
                s.push_uuid(tenant.0);
                let sev = c.by_severity;
                for v in [
                    *h,
                    c.events as i64,
                    sev.info as i64,
                    sev.low as i64,
                    sev.medium as i64,
                    sev.high as i64,
                    sev.critical as i64,
                    c.auth_attempts as i64,
                    c.auth_successes as i64,
                    c.failed_logins as i64,
                    c.api_calls as i64,
                    c.firewall_rule_changes as i64,
                    c.quota_violations as i64,
                    c.vpn_connects as i64,
                    c.vpn_disconnects as i64,
                ] {
                    s.push(", ").push_bind(v);
                }
                s.push(")");
            }
            let sum = |c: &str| format!("{c} = event_rollups.{c} + excluded.{c}");
            let sets: Vec<String> = [
                "n",
                "s1",
                "s2",
                "s3",
                "s4",
                "s5",
                "auth",
                "auth_ok",
                "auth_failed",
                "api",
                "firewall",
                "quota",
                "vpn_in",
                "vpn_out",
            ]
            .iter()
            .map(|c| sum(c))
            .collect();
            s.push(&format!(
                " ON CONFLICT (tenant_id, hour_us) DO UPDATE SET {}",
                sets.join(", ")
            ));
            s.execute(&mut **tx).await?;
        }
        Ok(())
    }

    async fn add_vpn_hours(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        vpn: &[VpnEvent],
    ) -> Result<(), sqlx::Error> {
        let mut per: HashMap<(&str, i64), (i64, i64)> = HashMap::new();
        for e in vpn.iter().filter(|e| e.connect || e.disconnect) {
            let h = e.at.timestamp_micros().div_euclid(HOUR_US) * HOUR_US;
            let slot = per.entry((e.actor.as_str(), h)).or_default();
            slot.0 += i64::from(e.connect);
            slot.1 += i64::from(e.disconnect);
        }
        let rows: Vec<_> = per.into_iter().collect();
        for chunk in rows.chunks(CHUNK) {
            let mut s = Stmt::<DB>::new(
                "INSERT INTO vpn_rollups (tenant_id, actor, hour_us, connects, disconnects) VALUES ",
            );
            for (i, ((actor, h), (c, d))) in chunk.iter().enumerate() {
                s.push(if i == 0 { "(" } else { ", (" });
                s.push_uuid(tenant.0);
                s.push(", ").push_bind(actor.to_string());
                s.push(", ").push_bind(*h);
                s.push(", ").push_bind(*c);
                s.push(", ").push_bind(*d);
                s.push(")");
            }
            s.push(
                " ON CONFLICT (tenant_id, actor, hour_us) DO UPDATE SET \
                 connects = vpn_rollups.connects + excluded.connects, \
                 disconnects = vpn_rollups.disconnects + excluded.disconnects",
            );
            s.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Merges the connects into the stored runs of their (actor, network).
    async fn add_vpn_runs(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        vpn: &[VpnEvent],
    ) -> Result<(), sqlx::Error> {
        let mut per: HashMap<(String, String), Vec<VpnRun>> = HashMap::new();
        for e in vpn.iter().filter(|e| e.connect) {
            let Some(ip) = e.source_ip.as_deref().and_then(|ip| ip.parse().ok()) else {
                continue;
            };
            per.entry((e.actor.clone(), network_of(ip)))
                .or_default()
                .push(VpnRun {
                    start: e.at,
                    end: e.at,
                });
        }
        if per.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(String, String)> = per.keys().cloned().collect();
        for chunk in pairs.chunks(CHUNK) {
            let mut s = Stmt::<DB>::new(
                "SELECT actor, network, run_start, run_end FROM vpn_runs WHERE tenant_id = ",
            );
            s.push_uuid(tenant.0);
            push_pairs(&mut s, chunk);
            for r in s.fetch_all(&mut **tx).await? {
                let key: (String, String) = (r.col("actor")?, r.col("network")?);
                if let Some(runs) = per.get_mut(&key) {
                    runs.push(VpnRun {
                        start: DB::time(&r, "run_start")?,
                        end: DB::time(&r, "run_end")?,
                    });
                }
            }
            let mut s = Stmt::<DB>::new("DELETE FROM vpn_runs WHERE tenant_id = ");
            s.push_uuid(tenant.0);
            push_pairs(&mut s, chunk);
            s.execute(&mut **tx).await?;
        }
        let merged: Vec<(&(String, String), VpnRun)> = per
            .iter()
            .flat_map(|(k, runs)| {
                merge_vpn_runs(runs.clone())
                    .into_iter()
                    .map(move |r| (k, r))
            })
            .collect();
        for chunk in merged.chunks(CHUNK) {
            let mut s = Stmt::<DB>::new(
                "INSERT INTO vpn_runs (tenant_id, actor, network, run_start, run_end) VALUES ",
            );
            for (i, ((actor, network), run)) in chunk.iter().enumerate() {
                s.push(if i == 0 { "(" } else { ", (" });
                s.push_uuid(tenant.0);
                s.push(", ").push_bind(actor.clone());
                s.push(", ").push_bind(network.clone());
                s.push(", ").push_time(run.start);
                s.push(", ").push_time(run.end);
                s.push(")");
            }
            s.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Rolls up at most `max_events` events after the tenant's position;
    /// see [`crate::storage::ReportStore::roll_up`].
    pub(crate) async fn roll_up_events(
        &self,
        tenant: TenantId,
        max_events: u32,
    ) -> StoreResult<u64> {
        let fail = fail("rollups", "failed to roll up events");
        let mut tx = self.read(tenant).await.map_err(&fail)?;
        let from = Self::rollup_position_in(&mut tx, tenant)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        let Some(upto) = self
            .rollup_target(tenant, from.unwrap_or_default(), max_events)
            .await
            .map_err(&fail)?
        else {
            return Ok(0);
        };
        if !self.fold(tenant, from, upto).await.map_err(&fail)? {
            return Ok(0);
        }
        // How many were folded: the feed positions are not dense (ingest
        // retries and other tenants take sequence numbers), so count them.
        let mut q = Stmt::<DB>::new("SELECT COUNT(*) AS n FROM events WHERE tenant_id = ");
        q.push_uuid(tenant.0);
        DB::push_after(&mut q, from.unwrap_or_default());
        DB::push_upto(&mut q, upto);
        let n: i64 = self
            .read_one(tenant, q)
            .await
            .and_then(|r| r.col("n"))
            .map_err(&fail)?;
        Ok(n.max(0) as u64)
    }

    /// The tenant's rollup position (`None`: nothing rolled up yet).
    pub(crate) async fn rollup_position(
        &self,
        tenant: TenantId,
    ) -> StoreResult<Option<FeedPosition>> {
        let fail = fail("rollups", "failed to read the rollup position");
        let mut tx = self.read(tenant).await.map_err(&fail)?;
        let pos = Self::rollup_position_in(&mut tx, tenant)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(pos)
    }

    /// Inside a transaction deleting the tenant's events before `before`:
    /// takes those events out of the rollups. Whole hours go; the hour
    /// holding `before` is counted again from the events it keeps (those
    /// folded in, at or before the position). Runs of VPN connects stay
    /// while they can still make a later connect known (a network stays
    /// known for 30 days after its last connect, even once retention has
    /// deleted that connect).
    pub(crate) async fn forget_rollups_before(
        tx: &mut Tx<DB>,
        tenant: TenantId,
        before: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let Some(pos) = Self::rollup_position_in(tx, tenant).await? else {
            return Ok(());
        };
        let b = before.timestamp_micros();
        let hour = b.div_euclid(HOUR_US) * HOUR_US;
        for table in ["event_rollups", "vpn_rollups"] {
            Stmt::<DB>::text(format!(
                "DELETE FROM {table} WHERE tenant_id = $1 AND hour_us < $2"
            ))
            .uuid(tenant.0)
            .arg(if hour == b { hour } else { hour + HOUR_US })
            .execute(&mut **tx)
            .await?;
        }
        if hour != b {
            let mut s = Stmt::<DB>::text(format!(
                "INSERT INTO event_rollups (tenant_id, hour_us, n, s1, s2, s3, s4, s5, auth, \
                 auth_ok, auth_failed, api, firewall, quota, vpn_in, vpn_out) \
                 SELECT tenant_id, {hour}, {} FROM events WHERE tenant_id = ",
                counts()
            ));
            s.push_uuid(tenant.0);
            s.push(" AND occurred_at >= ").push_time(at(hour));
            s.push(" AND occurred_at < ").push_time(at(hour + HOUR_US));
            DB::push_upto(&mut s, pos);
            s.push(" GROUP BY tenant_id");
            s.execute(&mut **tx).await?;
            let mut s = Stmt::<DB>::text(format!(
                "INSERT INTO vpn_rollups (tenant_id, actor, hour_us, connects, disconnects) \
                 SELECT tenant_id, actor, {hour}, \
                 COUNT(CASE WHEN {VPN_CONNECT} THEN 1 END), \
                 COUNT(CASE WHEN {VPN_DISCONNECT} THEN 1 END) \
                 FROM events WHERE event_type IN {VPN_TYPES} AND tenant_id = "
            ));
            s.push_uuid(tenant.0);
            s.push(" AND occurred_at >= ").push_time(at(hour));
            s.push(" AND occurred_at < ").push_time(at(hour + HOUR_US));
            DB::push_upto(&mut s, pos);
            s.push(" GROUP BY tenant_id, actor");
            s.execute(&mut **tx).await?;
        }
        Stmt::<DB>::new("DELETE FROM vpn_runs WHERE tenant_id = $1 AND run_end < $2")
            .uuid(tenant.0)
            .time(before - VPN_HISTORY)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// New VPN networks in `range` from the runs and the connects after
    /// their position (see [`crate::storage::ReportStore::new_vpn_networks`]).
    pub(crate) async fn count_new_vpn_networks(
        &self,
        tenant: TenantId,
        range: ReportRange,
        limit: u32,
    ) -> StoreResult<Option<u64>> {
        let fail = fail("rollups", "failed to count new VPN networks");
        let mut tx = DB::begin_snapshot(self, tenant).await.map_err(&fail)?;
        let pos = Self::rollup_position_in(&mut tx, tenant)
            .await
            .map_err(&fail)?;
        // Connects not in the runs: after the position (all of them when
        // nothing is rolled up), from the 30 days before the range on.
        let window = (range.start - VPN_HISTORY, range.end);
        let mut s = Stmt::<DB>::new("SELECT actor, source_ip, occurred_at");
        push_events_part(&mut s, tenant, (window.0, window.1, pos));
        s.push(&format!(
            " AND {VPN_CONNECT} AND source_ip IS NOT NULL LIMIT "
        ))
        .push_bind(i64::from(limit) + 1);
        let rows = s.fetch_all(&mut *tx).await.map_err(&fail)?;
        if rows.len() > limit as usize {
            return Ok(None);
        }
        let mut per: HashMap<(String, String), Vec<VpnRun>> = HashMap::new();
        for r in &rows {
            let ip: String = r.col("source_ip").map_err(&fail)?;
            let Ok(ip) = ip.parse() else { continue };
            let t = DB::time(r, "occurred_at").map_err(&fail)?;
            per.entry((r.col("actor").map_err(&fail)?, network_of(ip)))
                .or_default()
                .push(VpnRun { start: t, end: t });
        }
        let in_range = |t: DateTime<Utc>| t >= range.start && t < range.end;
        let mut total: i64 = 0;
        if pos.is_some() {
            let n: i64 = Stmt::<DB>::new(
                "SELECT COUNT(*) AS n FROM vpn_runs WHERE tenant_id = $1 \
                 AND run_start >= $2 AND run_start < $3",
            )
            .uuid(tenant.0)
            .time(range.start)
            .time(range.end)
            .fetch_optional(&mut *tx)
            .await
            .and_then(|r| r.map_or(Ok(0), |r| r.col("n")))
            .map_err(&fail)?;
            total = n;
            let pairs: Vec<(String, String)> = per.keys().cloned().collect();
            for chunk in pairs.chunks(CHUNK) {
                let mut s = Stmt::<DB>::new(
                    "SELECT actor, network, run_start, run_end FROM vpn_runs WHERE tenant_id = ",
                );
                s.push_uuid(tenant.0);
                push_pairs(&mut s, chunk);
                for r in s.fetch_all(&mut *tx).await.map_err(&fail)? {
                    let key: (String, String) = (
                        r.col("actor").map_err(&fail)?,
                        r.col("network").map_err(&fail)?,
                    );
                    let run = VpnRun {
                        start: DB::time(&r, "run_start").map_err(&fail)?,
                        end: DB::time(&r, "run_end").map_err(&fail)?,
                    };
                    if in_range(run.start) {
                        total -= 1;
                    }
                    if let Some(runs) = per.get_mut(&key) {
                        runs.push(run);
                    }
                }
            }
        }
        tx.commit().await.map_err(&fail)?;
        for runs in per.into_values() {
            total += merge_vpn_runs(runs)
                .iter()
                .filter(|r| in_range(r.start))
                .count() as i64;
        }
        Ok(Some(total.max(0) as u64))
    }
}

/// Appends ` AND (actor, network) IN (…)` for `pairs` (not empty).
fn push_pairs<DB: Dialect>(s: &mut Stmt<DB>, pairs: &[(String, String)]) {
    s.push(" AND (actor, network) IN (VALUES ");
    for (i, (actor, network)) in pairs.iter().enumerate() {
        s.push(if i == 0 { "(" } else { ", (" });
        s.push_bind(actor.clone())
            .push(", ")
            .push_bind(network.clone())
            .push(")");
    }
    s.push(")");
}
