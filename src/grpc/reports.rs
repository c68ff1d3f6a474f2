//! `picket.v1.ReportService`: the access report, the security summary and
//! dashboard metrics (request checks, the period resolved, page tokens, domain
//! ⇄ pb; the figures come from the `reports` capability), and audit exports
//! (ExportEvents).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::domain::event::{self, EventQuery, StoredEvent, check_len};
use crate::domain::report::{
    AccessGrouping, AccessKey, AccessQuery, AccessRow, Buckets, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE,
    Period, ReportRange, SeverityCounts,
};
use crate::domain::{Scope, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::alerts::entity_kind_to_pb;
use crate::grpc::convert::{from_timestamp, timestamp};
use crate::grpc::events::{ExportCursors, decode_export_cursor, event_into_pb, query_from_pb};
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, BoxStream, pb};

/// Events read from the store per page of an export (two pages at most in
/// memory: the one being sent and the next, read meanwhile).
pub const EXPORT_PAGE: u32 = 2000;
/// Messages of one event an export may hold unsent (the reader's pace
/// bounds the rest).
const EXPORT_BUFFER: usize = 64;
/// Batch messages an export may hold unsent.
const EXPORT_BATCH_BUFFER: usize = 4;
/// Most events a batch message may carry (`max_events_per_message`).
pub const MAX_EVENTS_PER_MESSAGE: u32 = 1000;
/// A batch stops before its encoded events pass this (1 MiB).
const EXPORT_BATCH_BYTES: usize = 1 << 20;

/// The ReportService implementation.
pub struct ReportApi {
    /// Shared per-server context (store, authentication, shutdown).
    ctx: Arc<ApiContext>,
}

impl ReportApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

/// The export's query: filter and half-open range, both bounds required.
fn export_query(req: &pb::ExportEventsRequest) -> Result<EventQuery, AppError> {
    let range = req.time_range.as_ref();
    if range.and_then(|r| r.start.as_ref()).is_none() {
        return Err(AppError::invalid("time_range.start", "required"));
    }
    if range.and_then(|r| r.end.as_ref()).is_none() {
        return Err(AppError::invalid("time_range.end", "required"));
    }
    let mut q = query_from_pb(req.filter.as_ref(), range, "filter")?;
    q.oldest_first = true;
    q.limit = EXPORT_PAGE;
    Ok(q)
}

/// Longest page token accepted, in bytes.
const MAX_PAGE_TOKEN: usize = 8 * 1024;

/// The range a report request asks for: `time_range`, or `period` (with
/// `period_containing`, else the last complete period before now).
fn report_range(
    time_range: Option<&pb::TimeRange>,
    period: i32,
    containing: Option<&prost_types::Timestamp>,
) -> AppResult<ReportRange> {
    let period = match pb::ReportPeriod::try_from(period) {
        Ok(pb::ReportPeriod::Unspecified) => None,
        Ok(pb::ReportPeriod::Daily) => Some(Period::Daily),
        Ok(pb::ReportPeriod::Weekly) => Some(Period::Weekly),
        Ok(pb::ReportPeriod::Monthly) => Some(Period::Monthly),
        Err(_) => {
            return Err(AppError::invalid(
                "period",
                format!("unknown period value {period}"),
            ));
        }
    };
    match period {
        Some(p) => {
            if time_range.is_some() {
                return Err(AppError::invalid(
                    "time_range",
                    "set either time_range or period, not both",
                ));
            }
            let at = containing
                .map(|t| from_timestamp(t, "period_containing"))
                .transpose()?;
            Ok(ReportRange::period(p, at, Utc::now()))
        }
        None => {
            if containing.is_some() {
                return Err(AppError::invalid("period_containing", "only with a period"));
            }
            let start = time_range
                .and_then(|r| r.start.as_ref())
                .ok_or_else(|| AppError::invalid("time_range.start", "required (or set period)"))?;
            let end = time_range
                .and_then(|r| r.end.as_ref())
                .ok_or_else(|| AppError::invalid("time_range.end", "required (or set period)"))?;
            let start = from_timestamp(start, "time_range.start")?;
            let end = from_timestamp(end, "time_range.end")?;
            Ok(ReportRange::new(start, end, "time_range")?)
        }
    }
}

fn range_to_pb(r: ReportRange) -> pb::TimeRange {
    pb::TimeRange {
        start: Some(timestamp(r.start)),
        end: Some(timestamp(r.end)),
    }
}

fn severities_to_pb(c: &SeverityCounts) -> pb::SeverityCounts {
    pb::SeverityCounts {
        info: c.info,
        low: c.low,
        medium: c.medium,
        high: c.high,
        critical: c.critical,
    }
}

/// A digest binding an access report page token to its tenant and request.
fn access_tag(tenant: TenantId, q: &AccessQuery) -> String {
    let mut h = Sha256::new();
    let grouping = match q.grouping {
        AccessGrouping::ActorResourceAction => "resource",
        AccessGrouping::ActorSourceIp => "ip",
    };
    let parts: Vec<String> = [
        "access".to_owned(),
        tenant.to_string(),
        q.range.start.timestamp_micros().to_string(),
        q.range.end.timestamp_micros().to_string(),
        grouping.to_owned(),
        q.actor.clone().unwrap_or_default(),
        q.resource_prefix.clone().unwrap_or_default(),
    ]
    .into_iter()
    .chain(q.event_types.iter().cloned())
    .collect();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

fn encode_access_token(tenant: TenantId, q: &AccessQuery, after: &AccessKey) -> String {
    let doc = serde_json::json!([
        access_tag(tenant, q),
        after.actor,
        after.a,
        after.b,
        q.received_before.timestamp_micros(),
    ]);
    URL_SAFE_NO_PAD.encode(doc.to_string())
}

/// The position and pinned time of a page token of this tenant and request.
fn decode_access_token(
    tenant: TenantId,
    q: &AccessQuery,
    token: &str,
) -> AppResult<(AccessKey, DateTime<Utc>)> {
    let bad = || {
        AppError::invalid(
            "page_token",
            "not a page token of this access report (tenant, range, grouping and filters must not change)",
        )
    };
    if token.len() > MAX_PAGE_TOKEN {
        return Err(bad());
    }
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let (tag, actor, a, b, received): (String, String, String, String, i64) =
        serde_json::from_slice(&raw).map_err(|_| bad())?;
    if tag != access_tag(tenant, q) {
        return Err(bad());
    }
    let received = DateTime::from_timestamp_micros(received).ok_or_else(bad)?;
    Ok((AccessKey { actor, a, b }, received))
}

/// The access report query of a request (first page: no position yet).
fn access_query(req: &pb::GetAccessReportRequest) -> AppResult<AccessQuery> {
    let range = report_range(
        req.time_range.as_ref(),
        req.period,
        req.period_containing.as_ref(),
    )?;
    let grouping = match pb::AccessGrouping::try_from(req.group_by) {
        Ok(pb::AccessGrouping::Unspecified | pb::AccessGrouping::ActorResourceAction) => {
            AccessGrouping::ActorResourceAction
        }
        Ok(pb::AccessGrouping::ActorSourceIp) => AccessGrouping::ActorSourceIp,
        Err(_) => {
            return Err(AppError::invalid(
                "group_by",
                format!("unknown grouping value {}", req.group_by),
            ));
        }
    };
    check_len(&req.actor, event::MAX_STRING, "actor")?;
    check_len(&req.resource_prefix, event::MAX_STRING, "resource_prefix")?;
    if req.event_types.len() > 32 {
        return Err(AppError::invalid("event_types", "at most 32"));
    }
    for (i, t) in req.event_types.iter().enumerate() {
        event::check_event_type(t, &format!("event_types[{i}]"))?;
    }
    let limit = match req.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return Err(AppError::invalid(
                "page_size",
                format!("at most {MAX_PAGE_SIZE}"),
            ));
        }
        n => n,
    };
    Ok(AccessQuery {
        range,
        grouping,
        actor: (!req.actor.is_empty()).then(|| req.actor.clone()),
        event_types: req.event_types.clone(),
        resource_prefix: (!req.resource_prefix.is_empty()).then(|| req.resource_prefix.clone()),
        received_before: Utc::now(),
        after: None,
        limit,
    })
}

fn access_row_to_pb(r: AccessRow, grouping: AccessGrouping) -> pb::AccessReportRow {
    let (source_ip, resource, action) = match grouping {
        AccessGrouping::ActorSourceIp => (r.key.a, String::new(), String::new()),
        AccessGrouping::ActorResourceAction => (String::new(), r.key.a, r.key.b),
    };
    pb::AccessReportRow {
        actor: r.key.actor,
        source_ip,
        resource,
        action,
        count: r.count,
        failures: r.failures,
        first_seen: Some(timestamp(r.first_seen)),
        last_seen: Some(timestamp(r.last_seen)),
        distinct_resources: r.distinct_resources,
        distinct_source_ips: r.distinct_source_ips,
    }
}

fn record_duration(report: &'static str, started: Instant) {
    metrics::histogram!("picket_report_duration_seconds", "report" => report)
        .record(started.elapsed().as_secs_f64());
}

#[tonic::async_trait]
impl pb::report_service_server::ReportService for ReportApi {
    #[instrument(skip_all, fields(rpc = "ReportService.GetAccessReport", tenant))]
    async fn get_access_report(
        &self,
        request: Request<pb::GetAccessReportRequest>,
    ) -> Result<Response<pb::GetAccessReportResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let started = Instant::now();
        let req = request.into_inner();
        let mut q = access_query(&req).map_err(to_status)?;
        if !req.page_token.is_empty() {
            let (after, received) =
                decode_access_token(tenant, &q, &req.page_token).map_err(to_status)?;
            q.after = Some(after);
            q.received_before = received;
        }
        let (rows, next) = crate::reports::access_report(self.ctx.store.as_ref(), tenant, &q)
            .await
            .map_err(to_status)?;
        record_duration("access", started);
        Ok(Response::new(pb::GetAccessReportResponse {
            time_range: Some(range_to_pb(q.range)),
            rows: rows
                .into_iter()
                .map(|r| access_row_to_pb(r, q.grouping))
                .collect(),
            next_page_token: next
                .map(|k| encode_access_token(tenant, &q, &k))
                .unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ReportService.GetSecuritySummary", tenant))]
    async fn get_security_summary(
        &self,
        request: Request<pb::GetSecuritySummaryRequest>,
    ) -> Result<Response<pb::GetSecuritySummaryResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let started = Instant::now();
        let req = request.into_inner();
        let range = report_range(
            req.time_range.as_ref(),
            req.period,
            req.period_containing.as_ref(),
        )
        .map_err(to_status)?;
        let s = crate::reports::security_summary(self.ctx.store.as_ref(), tenant, range)
            .await
            .map_err(to_status)?;
        record_duration("summary", started);
        let time = |t: crate::reports::ResponseTime| pb::ResponseTime {
            mean_seconds: t.mean_seconds,
            incidents: t.incidents,
        };
        Ok(Response::new(pb::GetSecuritySummaryResponse {
            time_range: Some(range_to_pb(range)),
            events_total: s.events.events,
            auth_attempts: s.events.auth_attempts,
            failed_logins: s.events.failed_logins,
            vpn_connections: s.events.vpn_connects,
            new_vpn_connections: s.new_vpn_connections,
            firewall_rule_changes: s.events.firewall_rule_changes,
            quota_violations: s.events.quota_violations,
            alerts_total: s.alerts.total(),
            alerts_by_severity: Some(severities_to_pb(&s.alerts)),
            alerts_by_rule: s
                .alerts_by_rule
                .into_iter()
                .map(|r| pb::RuleCount {
                    source_name: r.source_name,
                    title: r.title,
                    count: r.count,
                })
                .collect(),
            incidents_opened: s.incidents_opened,
            incidents_resolved: s.incidents_resolved,
            incidents_open: s.incidents_open,
            time_to_acknowledge: Some(time(s.time_to_acknowledge)),
            time_to_investigate: Some(time(s.time_to_investigate)),
            time_to_resolve: Some(time(s.time_to_resolve)),
            top_entities: s
                .top_entities
                .into_iter()
                .map(|(e, n)| pb::EntityCount {
                    entity: Some(pb::Entity {
                        kind: entity_kind_to_pb(e.kind) as i32,
                        value: e.value,
                    }),
                    alert_count: n,
                })
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "ReportService.GetDashboardMetrics", tenant))]
    async fn get_dashboard_metrics(
        &self,
        request: Request<pb::GetDashboardMetricsRequest>,
    ) -> Result<Response<pb::GetDashboardMetricsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let started = Instant::now();
        let req = request.into_inner();
        let range = report_range(
            req.time_range.as_ref(),
            req.period,
            req.period_containing.as_ref(),
        )
        .map_err(to_status)?;
        let buckets = Buckets::new(range, req.bucket_seconds, "bucket_seconds")
            .map_err(|v| to_status(v.into()))?;
        let series = crate::reports::dashboard(self.ctx.store.as_ref(), tenant, buckets)
            .await
            .map_err(to_status)?;
        record_duration("dashboard", started);
        Ok(Response::new(pb::GetDashboardMetricsResponse {
            time_range: Some(range_to_pb(range)),
            bucket_seconds: buckets.seconds,
            buckets: series
                .into_iter()
                .map(|b| {
                    let e = &b.events;
                    pb::MetricsBucket {
                        start: Some(timestamp(b.start)),
                        end: Some(timestamp(b.end)),
                        events: e.events,
                        events_by_severity: Some(severities_to_pb(&e.by_severity)),
                        auth_attempts: e.auth_attempts,
                        auth_successes: e.auth_successes,
                        auth_success_rate: if e.auth_attempts == 0 {
                            0.0
                        } else {
                            e.auth_successes as f64 / e.auth_attempts as f64
                        },
                        failed_logins: e.failed_logins,
                        api_calls: e.api_calls,
                        firewall_rule_changes: e.firewall_rule_changes,
                        vpn_connects: e.vpn_connects,
                        vpn_disconnects: e.vpn_disconnects,
                        active_vpn_connections: b.active_vpn_connections,
                        alerts: b.alerts.total(),
                        alerts_by_severity: Some(severities_to_pb(&b.alerts)),
                        incidents: b.incidents.total(),
                        incidents_by_severity: Some(severities_to_pb(&b.incidents)),
                        unresolved_critical_alerts: b.unresolved_critical_alerts,
                    }
                })
                .collect(),
        }))
    }

    type ExportEventsStream = BoxStream<pb::ExportEventsResponse>;

    #[instrument(skip_all, fields(rpc = "ReportService.ExportEvents", tenant))]
    async fn export_events(
        &self,
        request: Request<pb::ExportEventsRequest>,
    ) -> Result<Response<Self::ExportEventsStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let mut q = export_query(&req).map_err(to_status)?;
        let batch = export_batch(req.max_events_per_message).map_err(to_status)?;
        let received_before = if req.after_cursor.is_empty() {
            Utc::now()
        } else {
            let c = decode_export_cursor(
                tenant,
                req.filter.as_ref(),
                req.time_range.as_ref(),
                &req.after_cursor,
            )
            .map_err(to_status)?;
            q.after = Some(c.after);
            c.received_before
        };
        q.received_before = Some(received_before);
        let cursors = ExportCursors::new(
            tenant,
            req.filter.as_ref(),
            req.time_range.as_ref(),
            received_before,
        );
        let (tx, rx) = mpsc::channel(if batch.is_some() {
            EXPORT_BATCH_BUFFER
        } else {
            EXPORT_BUFFER
        });
        let store = self.ctx.store.clone();
        let shutdown = self.ctx.shutdown.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent: u64 = 0;
            // Page n + 1 is read (and decoded) by its own task while page n
            // is converted and sent: at most two pages in memory.
            let read = |q: EventQuery| {
                let store = store.clone();
                AbortOnDropHandle::new(tokio::spawn(
                    async move { store.query_events(tenant, &q).await },
                ))
            };
            let mut next = Some(read(q.clone()));
            let outcome = loop {
                let Some(pending) = next.take() else {
                    break "complete";
                };
                let page = tokio::select! {
                    page = pending => page,
                    () = shutdown.cancelled() => break "shutdown",
                };
                let page = match page {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(to_status(e.into()))).await;
                        break "error";
                    }
                    Err(e) => {
                        let err = AppError::Internal(
                            anyhow::Error::new(e).context("an export page read failed"),
                        );
                        let _ = tx.send(Err(to_status(err))).await;
                        break "error";
                    }
                };
                if page.len() == EXPORT_PAGE as usize
                    && let Some(last) = page.last()
                {
                    q.after = Some((last.event.occurred_at, last.event.id));
                    next = Some(read(q.clone()));
                }
                let delivered = match batch {
                    None => send_events(&tx, &shutdown, &cursors, page).await,
                    Some(max) => send_batches(&tx, &shutdown, &cursors, page, max).await,
                };
                sent += delivered.sent;
                if shutdown.is_cancelled() {
                    break "shutdown";
                }
                if !delivered.all || tx.is_closed() {
                    break "cancelled";
                }
            };
            drop(next);
            if outcome == "shutdown" {
                let _ = tx
                    .send(Err(to_status(AppError::Unavailable {
                        message: "the server is shutting down; resume the export from the last cursor received".into(),
                        retry_after: Duration::from_secs(1),
                    })))
                    .await;
            }
            metrics::histogram!("picket_report_duration_seconds", "report" => "export_events")
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("picket_export_events_total").increment(sent);
            tracing::info!(%tenant, sent, outcome, "export finished");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The batch size a request asks for (`None`: one event per message).
fn export_batch(max_events_per_message: u32) -> AppResult<Option<usize>> {
    match max_events_per_message {
        0 => Ok(None),
        n if n > MAX_EVENTS_PER_MESSAGE => Err(AppError::invalid(
            "max_events_per_message",
            format!("at most {MAX_EVENTS_PER_MESSAGE}"),
        )),
        n => Ok(Some(n as usize)),
    }
}

/// What sending one page achieved.
struct Delivered {
    /// Events the client's stream accepted.
    sent: u64,
    /// Every event of the page went (false: the client left, or shutdown).
    all: bool,
}

type ExportSender = mpsc::Sender<Result<pb::ExportEventsResponse, Status>>;

/// Sends one message, unless the server shuts down first; false when the
/// message did not go.
async fn send_export(
    tx: &ExportSender,
    shutdown: &CancellationToken,
    msg: pb::ExportEventsResponse,
) -> bool {
    tokio::select! {
        r = tx.send(Ok(msg)) => r.is_ok(),
        () = shutdown.cancelled() => false,
    }
}

/// Sends a page one event per message, each with its cursor.
async fn send_events(
    tx: &ExportSender,
    shutdown: &CancellationToken,
    cursors: &ExportCursors,
    page: Vec<StoredEvent>,
) -> Delivered {
    let mut sent = 0;
    for row in page {
        let e = row.event;
        let msg = pb::ExportEventsResponse {
            cursor: cursors.encode((e.occurred_at, e.id)),
            event: Some(event_into_pb(e)),
            events: Vec::new(),
        };
        if !send_export(tx, shutdown, msg).await {
            return Delivered { sent, all: false };
        }
        sent += 1;
    }
    Delivered { sent, all: true }
}

/// Sends a page in batches of at most `max` events, each stopping before
/// its encoded events pass [`EXPORT_BATCH_BYTES`] (at least one event),
/// each with the cursor of its last event.
async fn send_batches(
    tx: &ExportSender,
    shutdown: &CancellationToken,
    cursors: &ExportCursors,
    page: Vec<StoredEvent>,
    max: usize,
) -> Delivered {
    let mut sent = 0;
    let mut events: Vec<pb::Event> = Vec::with_capacity(max.min(page.len()));
    let mut bytes = 0;
    let mut last = None;
    for row in page {
        let at = (row.event.occurred_at, row.event.id);
        let e = event_into_pb(row.event);
        let len = e.encoded_len();
        if let Some(after) = last
            && !events.is_empty()
            && (events.len() >= max || bytes + len > EXPORT_BATCH_BYTES)
        {
            let n = events.len() as u64;
            let msg = batch(cursors, after, std::mem::take(&mut events));
            if !send_export(tx, shutdown, msg).await {
                return Delivered { sent, all: false };
            }
            sent += n;
            bytes = 0;
        }
        events.push(e);
        bytes += len;
        last = Some(at);
    }
    if let Some(after) = last
        && !events.is_empty()
    {
        let n = events.len() as u64;
        if !send_export(tx, shutdown, batch(cursors, after, events)).await {
            return Delivered { sent, all: false };
        }
        sent += n;
    }
    Delivered { sent, all: true }
}

/// A batch message ending with the event at `after`.
fn batch(
    cursors: &ExportCursors,
    after: (DateTime<Utc>, uuid::Uuid),
    events: Vec<pb::Event>,
) -> pb::ExportEventsResponse {
    pb::ExportEventsResponse {
        event: None,
        cursor: cursors.encode(after),
        events,
    }
}
