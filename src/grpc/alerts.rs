//! `picket.v1.AlertService`: listing, context, triage and the live watch.

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::domain::alert::{Alert, AlertQuery, AlertStatus, Entity, EntityKind, SourceKind};
use crate::domain::event::{EventQuery, FeedPosition};
use crate::domain::{Scope, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::convert::{from_timestamp, keyset_list, page_size, timestamp};
use crate::grpc::events::{
    decode_cursor, encode_cursor, event_to_pb, severity_from_pb, severity_to_pb,
};
use crate::grpc::pb::alert_service_server::AlertService;
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, BoxStream, pb, watch};
use crate::storage::Store;

/// Cursor kind of the alert change stream.
const ALERTS_CURSOR: &str = "al";
/// Change-log stream name of alerts.
pub const ALERTS_STREAM: &str = "alerts";
/// Longest note, in bytes.
const MAX_NOTE: usize = 4096;

/// AlertService implementation.
pub struct AlertApi {
    /// Shared per-server context.
    ctx: Arc<ApiContext>,
}

impl AlertApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

fn status_to_pb(s: AlertStatus) -> pb::AlertStatus {
    match s {
        AlertStatus::New => pb::AlertStatus::New,
        AlertStatus::Acknowledged => pb::AlertStatus::Acknowledged,
        AlertStatus::Resolved => pb::AlertStatus::Resolved,
        AlertStatus::FalsePositive => pb::AlertStatus::FalsePositive,
    }
}

fn status_from_pb(v: i32, field: &str) -> AppResult<AlertStatus> {
    match pb::AlertStatus::try_from(v) {
        Ok(pb::AlertStatus::New) => Ok(AlertStatus::New),
        Ok(pb::AlertStatus::Acknowledged) => Ok(AlertStatus::Acknowledged),
        Ok(pb::AlertStatus::Resolved) => Ok(AlertStatus::Resolved),
        Ok(pb::AlertStatus::FalsePositive) => Ok(AlertStatus::FalsePositive),
        _ => Err(AppError::invalid(
            field,
            "must be NEW, ACKNOWLEDGED, RESOLVED or FALSE_POSITIVE",
        )),
    }
}

/// Domain entity kind to protobuf.
pub fn entity_kind_to_pb(k: EntityKind) -> pb::EntityKind {
    match k {
        EntityKind::Actor => pb::EntityKind::Actor,
        EntityKind::Ip => pb::EntityKind::Ip,
        EntityKind::Service => pb::EntityKind::Service,
        EntityKind::Host => pb::EntityKind::Host,
        EntityKind::Resource => pb::EntityKind::Resource,
    }
}

/// Protobuf entity to domain; errors name `field`.
pub fn entity_from_pb(e: &pb::Entity, field: &str) -> AppResult<Entity> {
    let kind = match pb::EntityKind::try_from(e.kind) {
        Ok(pb::EntityKind::Actor) => EntityKind::Actor,
        Ok(pb::EntityKind::Ip) => EntityKind::Ip,
        Ok(pb::EntityKind::Service) => EntityKind::Service,
        Ok(pb::EntityKind::Host) => EntityKind::Host,
        Ok(pb::EntityKind::Resource) => EntityKind::Resource,
        _ => return Err(AppError::invalid(format!("{field}.kind"), "required")),
    };
    if e.value.is_empty() || e.value.len() > 256 {
        return Err(AppError::invalid(
            format!("{field}.value"),
            "must be 1..256 bytes",
        ));
    }
    let value = if kind == EntityKind::Ip {
        crate::domain::event::parse_ip(&e.value, &format!("{field}.value"))?
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    } else {
        e.value.clone()
    };
    Ok(Entity { kind, value })
}

/// A stored alert as protobuf.
pub fn alert_to_pb(a: &Alert) -> pb::Alert {
    pb::Alert {
        id: a.id.to_string(),
        title: a.title.clone(),
        summary: a.summary.clone(),
        severity: severity_to_pb(a.severity) as i32,
        status: status_to_pb(a.status) as i32,
        category: a.category.clone(),
        source_kind: match a.source_kind {
            SourceKind::Rule => pb::AlertSourceKind::Rule,
            SourceKind::Model => pb::AlertSourceKind::Model,
            SourceKind::Webhook => pb::AlertSourceKind::Webhook,
            SourceKind::Manual => pb::AlertSourceKind::Manual,
        } as i32,
        source_name: a.source_name.clone(),
        anomaly_score: a.anomaly_score,
        anomaly_threshold: a.anomaly_threshold,
        entities: a
            .body
            .entities
            .iter()
            .map(|e| pb::Entity {
                kind: entity_kind_to_pb(e.kind) as i32,
                value: e.value.clone(),
            })
            .collect(),
        evidence: a
            .body
            .evidence
            .iter()
            .map(|e| pb::EvidenceEvent {
                event_id: e.event_id.to_string(),
                snapshot: e.snapshot.as_ref().map(event_to_pb),
            })
            .collect(),
        features: a
            .body
            .features
            .iter()
            .map(|f| pb::FeatureValue {
                name: f.name.clone(),
                value: f.value,
                contribution: f.contribution,
            })
            .collect(),
        attack_techniques: a.body.attack_techniques.clone(),
        first_seen: Some(timestamp(a.first_seen)),
        last_seen: Some(timestamp(a.last_seen)),
        occurrence_count: a.occurrence_count,
        fingerprint: a.fingerprint.clone(),
        created_at: Some(timestamp(a.created_at)),
        updated_at: Some(timestamp(a.updated_at)),
        incident_id: a.incident_id.map(|i| i.to_string()).unwrap_or_default(),
        history: a
            .body
            .history
            .iter()
            .map(|h| pb::AlertStatusChange {
                from_status: status_to_pb(h.from) as i32,
                to_status: status_to_pb(h.to) as i32,
                changed_by: crate::grpc::convert::actor_to_pb(&h.by),
                changed_at: Some(timestamp(h.at)),
                note: h.note.clone(),
            })
            .collect(),
    }
}

fn query_from_pb(f: Option<&pb::AlertFilter>) -> AppResult<AlertQuery> {
    let mut q = AlertQuery::default();
    let Some(f) = f else { return Ok(q) };
    if f.min_severity != 0 {
        q.min_severity = Some(severity_from_pb(f.min_severity, "filter.min_severity")?);
    }
    for (i, s) in f.statuses.iter().enumerate() {
        q.statuses
            .push(status_from_pb(*s, &format!("filter.statuses[{i}]"))?);
    }
    if !f.category.is_empty() {
        q.category = Some(f.category.clone());
    }
    if let Some(e) = &f.entity {
        q.entity = Some(entity_from_pb(e, "filter.entity")?);
    }
    if let Some(r) = &f.time_range {
        q.start = r
            .start
            .as_ref()
            .map(|t| from_timestamp(t, "filter.time_range.start"))
            .transpose()?;
        q.end = r
            .end
            .as_ref()
            .map(|t| from_timestamp(t, "filter.time_range.end"))
            .transpose()?;
    }
    Ok(q)
}

fn parse_id(s: &str, field: &str) -> AppResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| AppError::invalid(field, "not an id (UUID)"))
}

#[tonic::async_trait]
impl AlertService for AlertApi {
    #[instrument(skip_all, fields(rpc = "AlertService.ListAlerts", tenant))]
    async fn list_alerts(
        &self,
        request: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let query = query_from_pb(req.filter.as_ref()).map_err(to_status)?;
        let fetch = |q| async move { Ok(self.ctx.store.list_alerts(tenant, &q).await?) };
        let (alerts, next_page_token) = keyset_list(query, req.page_size, &req.page_token, fetch)
            .await
            .map_err(to_status)?;
        let alerts = alerts.iter().map(alert_to_pb).collect();
        Ok(Response::new(pb::ListAlertsResponse {
            alerts,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "AlertService.GetAlert", tenant))]
    async fn get_alert(
        &self,
        request: Request<pb::GetAlertRequest>,
    ) -> Result<Response<pb::GetAlertResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let id = parse_id(&request.get_ref().alert_id, "alert_id").map_err(to_status)?;
        let alert = self
            .ctx
            .store
            .get_alert(tenant, id)
            .await
            .map_err(|e| to_status(e.into()))?;
        Ok(Response::new(pb::GetAlertResponse {
            alert: Some(alert_to_pb(&alert)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "AlertService.GetAlertContext", tenant))]
    async fn get_alert_context(
        &self,
        request: Request<pb::GetAlertContextRequest>,
    ) -> Result<Response<pb::GetAlertContextResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let id = parse_id(&req.alert_id, "alert_id").map_err(to_status)?;
        let window = match req.window_seconds {
            0 => 3600,
            w if w > 86_400 => {
                return Err(to_status(AppError::invalid(
                    "window_seconds",
                    "at most 86400",
                )));
            }
            w => w,
        };
        let limit = page_size(req.limit, 200, 1000)
            .map_err(|_| to_status(AppError::invalid("limit", "at most 1000")))?;
        let alert = self
            .ctx
            .store
            .get_alert(tenant, id)
            .await
            .map_err(|e| to_status(e.into()))?;
        let (evidence, surrounding) =
            alert_context(self.ctx.store.as_ref(), tenant, &alert, window, limit)
                .await
                .map_err(to_status)?;
        Ok(Response::new(pb::GetAlertContextResponse {
            alert: Some(alert_to_pb(&alert)),
            evidence_events: evidence,
            surrounding_events: surrounding,
        }))
    }

    #[instrument(skip_all, fields(rpc = "AlertService.UpdateAlert", tenant))]
    async fn update_alert(
        &self,
        request: Request<pb::UpdateAlertRequest>,
    ) -> Result<Response<pb::UpdateAlertResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let id = parse_id(&req.alert_id, "alert_id").map_err(to_status)?;
        let status = status_from_pb(req.status, "status").map_err(to_status)?;
        if req.note.len() > MAX_NOTE {
            return Err(to_status(AppError::invalid(
                "note",
                format!("at most {MAX_NOTE} bytes"),
            )));
        }
        let alert = self
            .ctx
            .store
            .update_alert_status(tenant, id, status, &caller.actor(), &req.note, Utc::now())
            .await
            .map_err(|e| to_status(e.into()))?;
        self.ctx.changes.notify(tenant);
        Ok(Response::new(pb::UpdateAlertResponse {
            alert: Some(alert_to_pb(&alert)),
        }))
    }

    type WatchAlertsStream = BoxStream<pb::WatchAlertsResponse>;

    #[instrument(skip_all, fields(rpc = "AlertService.WatchAlerts", tenant))]
    async fn watch_alerts(
        &self,
        request: Request<pb::WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let filter = query_from_pb(req.filter.as_ref()).map_err(to_status)?;
        let options = req.options.unwrap_or_default();
        let heartbeat = self
            .ctx
            .limits
            .heartbeat_interval(options.heartbeat_interval_seconds)
            .map_err(to_status)?;
        let start = if options.after_cursor.is_empty() {
            self.ctx
                .store
                .changes_head(tenant, ALERTS_STREAM)
                .await
                .map_err(|e| to_status(e.into()))?
                .unwrap_or_default()
        } else {
            decode_cursor(
                ALERTS_CURSOR,
                tenant,
                &options.after_cursor,
                "options.after_cursor",
            )
            .map_err(to_status)?
        };
        let feed = AlertFeed {
            store: self.ctx.store.clone(),
            tenant,
            filter,
        };
        Ok(Response::new(self.ctx.follow(
            feed,
            start,
            heartbeat,
            self.ctx.changes.subscribe(tenant),
        )))
    }

    #[instrument(skip_all, fields(rpc = "AlertService.RunDetection", tenant))]
    async fn run_detection(
        &self,
        request: Request<pb::RunDetectionRequest>,
    ) -> Result<Response<pb::RunDetectionResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let range = req
            .time_range
            .as_ref()
            .ok_or_else(|| to_status(AppError::invalid("time_range", "required")))?;
        let start = range
            .start
            .as_ref()
            .ok_or_else(|| to_status(AppError::invalid("time_range.start", "required")))
            .and_then(|t| from_timestamp(t, "time_range.start").map_err(to_status))?;
        let end = match &range.end {
            Some(t) => from_timestamp(t, "time_range.end").map_err(to_status)?,
            None => Utc::now(),
        };
        if end <= start || end - start > chrono::Duration::days(30) {
            return Err(to_status(AppError::invalid(
                "time_range",
                "end must be after start, at most 30 days later",
            )));
        }
        let algorithm = match pb::AnomalyAlgorithm::try_from(req.algorithm) {
            Ok(pb::AnomalyAlgorithm::Unspecified) | Ok(pb::AnomalyAlgorithm::Ecod) => {
                crate::pipeline::scoring::Algorithm::Ecod
            }
            Ok(pb::AnomalyAlgorithm::IsolationForest) => {
                crate::pipeline::scoring::Algorithm::Iforest
            }
            Err(_) => {
                return Err(to_status(AppError::invalid(
                    "algorithm",
                    "unknown algorithm",
                )));
            }
        };
        if !req.threshold.is_finite() || req.threshold < 0.0 {
            return Err(to_status(AppError::invalid(
                "threshold",
                "must be a finite, non-negative number",
            )));
        }
        let threshold = (req.threshold > 0.0).then_some(req.threshold);
        let store = self.ctx.store.as_ref();
        let analysis = crate::pipeline::scoring::analyse(store, tenant, algorithm, self.ctx.scoring, start, end, threshold)
            .await
            .map_err(|e| to_status(e.into()))?
            .ok_or_else(|| {
                to_status(AppError::FailedPrecondition(format!(
                    "not enough history to train a model: need at least {} entity windows in the week before the range",
                    self.ctx.scoring.min_windows
                )))
            })?;
        let mut alert_ids = Vec::new();
        for a in &analysis.anomalies {
            let new = crate::pipeline::scoring::anomaly_alert(store, a)
                .await
                .map_err(|e| to_status(e.into()))?;
            let (alert, _) = store
                .raise_alert(tenant, new, self.ctx.alert_suppression, Utc::now())
                .await
                .map_err(|e| to_status(e.into()))?;
            if !alert_ids.contains(&alert.id.to_string()) {
                alert_ids.push(alert.id.to_string());
            }
        }
        if !alert_ids.is_empty() {
            self.ctx.changes.notify(tenant);
        }
        Ok(Response::new(pb::RunDetectionResponse {
            windows_analysed: analysis.windows as u32,
            anomalies_found: analysis.anomalies.len() as u32,
            alert_ids,
            threshold: analysis.threshold,
        }))
    }
}

/// The evidence events as stored now, and the entities' surrounding activity.
async fn alert_context(
    store: &dyn Store,
    tenant: TenantId,
    alert: &Alert,
    window_seconds: u32,
    limit: u32,
) -> AppResult<(Vec<pb::Event>, Vec<pb::Event>)> {
    let ids: Vec<Uuid> = alert.body.evidence.iter().map(|e| e.event_id).collect();
    let evidence = store.get_events(tenant, &ids).await?;
    let window = chrono::Duration::seconds(i64::from(window_seconds));
    let evidence_ids: std::collections::HashSet<Uuid> = ids.into_iter().collect();
    let mut surrounding = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entity in &alert.body.entities {
        let mut q = EventQuery {
            start: Some(alert.first_seen - window),
            end: Some(alert.last_seen + window),
            limit,
            ..Default::default()
        };
        match entity.kind {
            EntityKind::Actor => q.actor = Some(entity.value.clone()),
            EntityKind::Ip => q.source_ip = entity.value.parse().ok(),
            _ => continue,
        }
        for e in store.query_events(tenant, &q).await? {
            if !evidence_ids.contains(&e.event.id) && seen.insert(e.event.id) {
                surrounding.push(e);
            }
        }
    }
    surrounding.sort_by_key(|e| std::cmp::Reverse((e.event.occurred_at, e.event.id)));
    surrounding.truncate(limit as usize);
    Ok((
        evidence.iter().map(|e| event_to_pb(&e.event)).collect(),
        surrounding.iter().map(|e| event_to_pb(&e.event)).collect(),
    ))
}

/// The alert change stream as WatchAlerts follows it.
struct AlertFeed {
    /// Where the change log is read.
    store: Arc<dyn Store>,
    /// The caller's tenant.
    tenant: TenantId,
    /// Which alerts to deliver (on their state after each change).
    filter: AlertQuery,
}

#[tonic::async_trait]
impl watch::Feed for AlertFeed {
    const STREAM: &'static str = "alerts";
    type Entry = Alert;
    type Msg = pb::WatchAlertsResponse;

    fn tenant(&self) -> TenantId {
        self.tenant
    }

    async fn read_after(
        &self,
        after: FeedPosition,
        limit: u32,
    ) -> AppResult<Vec<(FeedPosition, Self::Entry)>> {
        let changes = self
            .store
            .changes_after(self.tenant, ALERTS_STREAM, after, limit)
            .await?;
        let mut positions = Vec::with_capacity(changes.len());
        let mut alerts = Vec::with_capacity(changes.len());
        for c in changes {
            let alert: Alert = serde_json::from_value(c.payload).map_err(|e| {
                AppError::Internal(anyhow::Error::new(e).context("failed to decode a logged alert"))
            })?;
            positions.push(c.position);
            alerts.push(alert);
        }
        // Logged states carry evidence ids; the snapshots are stored once
        // per event (one read for the page).
        self.store.fill_evidence(self.tenant, &mut alerts).await?;
        Ok(positions.into_iter().zip(alerts).collect())
    }

    fn message(&self, alert: &Self::Entry) -> Option<Self::Msg> {
        self.filter.matches(alert).then(|| pb::WatchAlertsResponse {
            cursor: String::new(),
            item: Some(pb::watch_alerts_response::Item::Alert(alert_to_pb(alert))),
        })
    }

    async fn head(&self) -> AppResult<Option<FeedPosition>> {
        Ok(self.store.changes_head(self.tenant, ALERTS_STREAM).await?)
    }

    fn cursor(&self, at: FeedPosition) -> String {
        encode_cursor(ALERTS_CURSOR, self.tenant, at)
    }

    fn heartbeat(&self, hb: pb::Heartbeat) -> Self::Msg {
        pb::WatchAlertsResponse {
            cursor: String::new(),
            item: Some(pb::watch_alerts_response::Item::Heartbeat(hb)),
        }
    }

    fn with_cursor(&self, mut msg: Self::Msg, cursor: String) -> Self::Msg {
        msg.cursor = cursor;
        msg
    }
}
