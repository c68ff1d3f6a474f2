//! Reports over a tenant's stored events, alerts and incidents: the access
//! report, the security summary and dashboard metrics. The store aggregates
//! (`storage::ReportStore`, one `GROUP BY` per figure); this capability asks
//! for the aggregates (which read the report rollups where they can, see
//! `storage/rollups.rs`, and `rollup` here for the task keeping them), enforces
//! the read caps, and finishes what needs an order the database does not give
//! cheaply: open VPN connections carried from bucket to bucket, incident
//! response times replayed from status timelines, and critical alerts still
//! unresolved at each bucket end. Definitions are in
//! `proto/picket/v1/report.proto`.

pub mod rollup;

use chrono::{DateTime, Utc};

use crate::domain::TenantId;
use crate::domain::alert::AlertStatus;
use crate::domain::incident::IncidentStatus;
use crate::domain::report::{
    AccessKey, AccessQuery, AccessRow, Buckets, EntityCount, EventCounts, IncidentHistory,
    MAX_CRITICAL_ALERTS, MAX_STATUS_ENTRIES, MAX_VPN_CONNECTS, ReportRange, RuleCount,
    SeverityCounts, StatusStep, TOP_ENTITIES, TOP_RULES,
};
use crate::error::{AppError, AppResult};
use crate::storage::Store;

/// A mean duration over some incidents.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResponseTime {
    /// Mean in seconds (0 with no incident).
    pub mean_seconds: f64,
    /// Incidents measured.
    pub incidents: u64,
}

impl ResponseTime {
    fn of(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        Self {
            mean_seconds: samples.iter().sum::<f64>() / samples.len() as f64,
            incidents: samples.len() as u64,
        }
    }
}

/// The security summary of a range.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SecuritySummary {
    /// Event figures over the whole range.
    pub events: EventCounts,
    /// VPN connects from a network new for the actor.
    pub new_vpn_connections: u64,
    /// Alerts created in the range, by severity.
    pub alerts: SeverityCounts,
    /// Alerts by source, most first.
    pub alerts_by_rule: Vec<RuleCount>,
    /// Incidents created in the range.
    pub incidents_opened: u64,
    /// Incidents resolved in the range.
    pub incidents_resolved: u64,
    /// Incidents active at the range end.
    pub incidents_open: u64,
    /// Created → acknowledged.
    pub time_to_acknowledge: ResponseTime,
    /// Acknowledged → resolved.
    pub time_to_investigate: ResponseTime,
    /// Created → resolved.
    pub time_to_resolve: ResponseTime,
    /// Entities named by the most alerts.
    pub top_entities: Vec<EntityCount>,
}

/// One dashboard bucket.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DashboardBucket {
    /// Start (inclusive).
    pub start: DateTime<Utc>,
    /// End (exclusive).
    pub end: DateTime<Utc>,
    /// Event figures.
    pub events: EventCounts,
    /// Open VPN connections at the end.
    pub active_vpn_connections: u64,
    /// Alerts created, by severity.
    pub alerts: SeverityCounts,
    /// Incidents created, by severity.
    pub incidents: SeverityCounts,
    /// Critical alerts unresolved at the end.
    pub unresolved_critical_alerts: u64,
}

/// One page of the access report and the key to continue after, if more.
pub async fn access_report(
    store: &dyn Store,
    tenant: TenantId,
    q: &AccessQuery,
) -> AppResult<(Vec<AccessRow>, Option<AccessKey>)> {
    let mut ask = q.clone();
    ask.limit = q.limit + 1;
    let mut rows = store.access_report(tenant, &ask).await?;
    let next = if rows.len() > q.limit as usize {
        rows.truncate(q.limit as usize);
        rows.last().map(|r| r.key.clone())
    } else {
        None
    };
    Ok((rows, next))
}

fn too_much(what: &str) -> AppError {
    AppError::invalid(
        "time_range",
        format!("the range holds too many {what} for one report; ask for a shorter range"),
    )
}

/// The security summary of `range`: always produced, zeros when nothing happened.
pub async fn security_summary(
    store: &dyn Store,
    tenant: TenantId,
    range: ReportRange,
) -> AppResult<SecuritySummary> {
    let (range, width) = Buckets::whole(range);
    let mut out = SecuritySummary::default();
    for (_, c) in store.event_counts(tenant, range, width).await? {
        out.events = c;
    }
    out.new_vpn_connections = store
        .new_vpn_networks(tenant, range, MAX_VPN_CONNECTS)
        .await?
        .ok_or_else(|| too_much("VPN connections"))?;
    for (_, severity, n) in store.alert_counts(tenant, range, width).await? {
        out.alerts.add(severity, n);
    }
    out.alerts_by_rule = store.alerts_by_rule(tenant, range, TOP_RULES).await?;
    out.top_entities = store
        .top_alert_entities(tenant, range, TOP_ENTITIES)
        .await?;
    for (_, _, n) in store.incident_counts(tenant, range, width).await? {
        out.incidents_opened += n;
    }
    let (quiet_open, histories) = store
        .incident_histories(tenant, range, MAX_STATUS_ENTRIES + 1)
        .await?;
    let entries: usize = histories.iter().map(|h| h.steps.len().max(1)).sum();
    if entries > MAX_STATUS_ENTRIES as usize {
        return Err(too_much("incident status changes"));
    }
    let times = replay(&histories, range);
    out.incidents_open = quiet_open + times.open_at_end;
    out.incidents_resolved = times.resolved;
    out.time_to_acknowledge = ResponseTime::of(&times.acknowledge);
    out.time_to_investigate = ResponseTime::of(&times.investigate);
    out.time_to_resolve = ResponseTime::of(&times.resolve);
    Ok(out)
}

/// What replaying incident timelines over a range gives.
#[derive(Debug, Default)]
struct Replayed {
    /// Incidents (of those replayed) active at the range end.
    open_at_end: u64,
    /// Incidents with a resolution in the range.
    resolved: u64,
    /// Seconds created → acknowledged, of acknowledgements in the range.
    acknowledge: Vec<f64>,
    /// Seconds acknowledged → first resolution, of first resolutions in the range.
    investigate: Vec<f64>,
    /// Seconds created → first resolution, of first resolutions in the range.
    resolve: Vec<f64>,
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0) as f64 / 1e6
}

fn replay(histories: &[IncidentHistory], range: ReportRange) -> Replayed {
    let mut out = Replayed::default();
    let in_range = |t: DateTime<Utc>| t >= range.start && t < range.end;
    for h in histories {
        let mut status = IncidentStatus::Open;
        let mut acknowledged: Option<DateTime<Utc>> = None;
        let mut first_resolution: Option<DateTime<Utc>> = None;
        let mut resolved_in_range = false;
        for (at, step) in &h.steps {
            if *at >= range.end {
                break;
            }
            let next = match step {
                StatusStep::To(s) => *s,
                StatusStep::Reopened => IncidentStatus::Open,
                StatusStep::MergedAway => IncidentStatus::Closed,
            };
            if acknowledged.is_none()
                && status == IncidentStatus::Open
                && matches!(
                    next,
                    IncidentStatus::Investigating | IncidentStatus::Contained
                )
            {
                acknowledged = Some(*at);
                if in_range(*at) {
                    out.acknowledge.push(seconds(h.created_at, *at));
                }
            }
            let resolution = matches!(step, StatusStep::To(_))
                && (next == IncidentStatus::Resolved
                    || (next == IncidentStatus::Closed && status.is_active()));
            if resolution {
                resolved_in_range |= in_range(*at);
                if first_resolution.is_none() {
                    first_resolution = Some(*at);
                    if in_range(*at) {
                        out.resolve.push(seconds(h.created_at, *at));
                        if let Some(ack) = acknowledged {
                            out.investigate.push(seconds(ack, *at));
                        }
                    }
                }
            }
            status = next;
        }
        if status.is_active() {
            out.open_at_end += 1;
        }
        if resolved_in_range {
            out.resolved += 1;
        }
    }
    out
}

/// Dashboard metrics over `buckets`: every bucket, empty ones as zeros.
pub async fn dashboard(
    store: &dyn Store,
    tenant: TenantId,
    buckets: Buckets,
) -> AppResult<Vec<DashboardBucket>> {
    let range = buckets.range;
    let width = buckets.width_micros();
    let n = buckets.count();
    let mut out: Vec<DashboardBucket> = (0..n)
        .map(|i| {
            let (start, end) = buckets.bounds(i);
            DashboardBucket {
                start,
                end,
                ..Default::default()
            }
        })
        .collect();
    let slot = |i: usize| i.min(n - 1);
    for (i, c) in store.event_counts(tenant, range, width).await? {
        out[slot(i)].events = c;
    }
    for (i, severity, count) in store.alert_counts(tenant, range, width).await? {
        out[slot(i)].alerts.add(severity, count);
    }
    for (i, severity, count) in store.incident_counts(tenant, range, width).await? {
        out[slot(i)].incidents.add(severity, count);
    }
    // Open VPN connections at each bucket end: the running sum of the net
    // connects − disconnects per bucket plus what flooring each actor's
    // count at zero adds (the store computes that part).
    let mut open: i64 = 0;
    let mut floor = store
        .vpn_floor_changes(tenant, range, width)
        .await?
        .into_iter()
        .peekable();
    for (i, b) in out.iter_mut().enumerate() {
        open += b.events.vpn_connects as i64 - b.events.vpn_disconnects as i64;
        while let Some((_, d)) = floor.next_if(|(k, _)| slot(*k) == i) {
            open += d;
        }
        b.active_vpn_connections = open.max(0) as u64;
    }
    // Critical alerts unresolved at each bucket end.
    let critical = store
        .critical_alerts(tenant, range.end, MAX_CRITICAL_ALERTS + 1)
        .await?;
    if critical.len() > MAX_CRITICAL_ALERTS as usize {
        return Err(too_much("critical alerts"));
    }
    for b in &mut out {
        b.unresolved_critical_alerts = critical
            .iter()
            .filter(|a| a.created_at < b.end)
            .filter(|a| {
                let status = a
                    .history
                    .iter()
                    .rfind(|c| c.at < b.end)
                    .map_or(AlertStatus::New, |c| c.to);
                status.is_open()
            })
            .count() as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn response_times_come_from_status_steps() {
        let range = ReportRange {
            start: t("2026-03-10T00:00:00Z"),
            end: t("2026-03-11T00:00:00Z"),
        };
        let h = IncidentHistory {
            created_at: t("2026-03-10T01:00:00Z"),
            steps: vec![
                (
                    t("2026-03-10T01:10:00Z"),
                    StatusStep::To(IncidentStatus::Investigating),
                ),
                (
                    t("2026-03-10T02:00:00Z"),
                    StatusStep::To(IncidentStatus::Resolved),
                ),
                (t("2026-03-10T03:00:00Z"), StatusStep::Reopened),
            ],
        };
        let r = replay(&[h], range);
        assert_eq!(r.acknowledge, vec![600.0]);
        assert_eq!(r.investigate, vec![3000.0]);
        assert_eq!(r.resolve, vec![3600.0]);
        assert_eq!((r.resolved, r.open_at_end), (1, 1));
    }
}
