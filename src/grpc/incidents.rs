//! `picket.v1.IncidentService`: manual incidents, triage, timeline, linking,
//! merging, and the live watches (a snapshot, then every change with a cursor).

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::domain::event::FeedPosition;
use crate::domain::incident::{
    Incident, IncidentQuery, IncidentStatus, TimelineEntry, TimelineKind,
};
use crate::domain::{Scope, Severity, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::alerts::{alert_to_pb, entity_from_pb, entity_kind_to_pb};
use crate::grpc::convert::{from_timestamp, keyset_list, timestamp};
use crate::grpc::events::{decode_cursor, encode_cursor, severity_from_pb, severity_to_pb};
use crate::grpc::pb::incident_service_server::IncidentService;
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, BoxStream, pb, watch};
use crate::incidents;
use crate::storage::Store;

/// Cursor kind of the incident change stream.
const INCIDENTS_CURSOR: &str = "in";
/// Change-log stream name of incidents.
pub const INCIDENTS_STREAM: &str = "incidents";

/// IncidentService implementation.
pub struct IncidentApi {
    /// Shared per-server context.
    ctx: Arc<ApiContext>,
}

impl IncidentApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

fn status_to_pb(s: IncidentStatus) -> pb::IncidentStatus {
    match s {
        IncidentStatus::Open => pb::IncidentStatus::Open,
        IncidentStatus::Investigating => pb::IncidentStatus::Investigating,
        IncidentStatus::Contained => pb::IncidentStatus::Contained,
        IncidentStatus::Resolved => pb::IncidentStatus::Resolved,
        IncidentStatus::Closed => pb::IncidentStatus::Closed,
    }
}

fn status_from_pb(v: i32, field: &str) -> AppResult<IncidentStatus> {
    Ok(match pb::IncidentStatus::try_from(v) {
        Ok(pb::IncidentStatus::Open) => IncidentStatus::Open,
        Ok(pb::IncidentStatus::Investigating) => IncidentStatus::Investigating,
        Ok(pb::IncidentStatus::Contained) => IncidentStatus::Contained,
        Ok(pb::IncidentStatus::Resolved) => IncidentStatus::Resolved,
        Ok(pb::IncidentStatus::Closed) => IncidentStatus::Closed,
        _ => return Err(AppError::invalid(field, "unknown incident status")),
    })
}

fn kind_to_pb(k: TimelineKind) -> pb::TimelineEntryKind {
    match k {
        TimelineKind::Created => pb::TimelineEntryKind::Created,
        TimelineKind::AlertLinked => pb::TimelineEntryKind::AlertLinked,
        TimelineKind::AlertUnlinked => pb::TimelineEntryKind::AlertUnlinked,
        TimelineKind::StatusChanged => pb::TimelineEntryKind::StatusChanged,
        TimelineKind::SeverityChanged => pb::TimelineEntryKind::SeverityChanged,
        TimelineKind::Assigned => pb::TimelineEntryKind::Assigned,
        TimelineKind::TagsChanged => pb::TimelineEntryKind::TagsChanged,
        TimelineKind::NoteAdded => pb::TimelineEntryKind::NoteAdded,
        TimelineKind::Merged => pb::TimelineEntryKind::Merged,
        TimelineKind::Reopened => pb::TimelineEntryKind::Reopened,
    }
}

/// A timeline entry as protobuf.
pub fn entry_to_pb(e: &TimelineEntry) -> pb::TimelineEntry {
    pb::TimelineEntry {
        id: e.id.to_string(),
        at: Some(timestamp(e.at)),
        actor: crate::grpc::convert::actor_to_pb(&e.actor),
        kind: kind_to_pb(e.kind) as i32,
        description: e.description.clone(),
        subject: e.subject.clone(),
    }
}

/// An incident as protobuf.
pub fn incident_to_pb(i: &Incident) -> pb::Incident {
    pb::Incident {
        id: i.id.to_string(),
        title: i.title.clone(),
        description: i.description.clone(),
        status: status_to_pb(i.status) as i32,
        severity: severity_to_pb(i.severity) as i32,
        assignee: i.assignee.clone(),
        tags: i.tags.clone(),
        entities: i
            .entities
            .iter()
            .map(|e| pb::Entity {
                kind: entity_kind_to_pb(e.kind) as i32,
                value: e.value.clone(),
            })
            .collect(),
        alert_count: i.alert_ids.len() as u32,
        created_at: Some(timestamp(i.created_at)),
        updated_at: Some(timestamp(i.updated_at)),
        resolved_at: i.resolved_at.map(timestamp),
        merged_into_id: i.merged_into.map(|m| m.to_string()).unwrap_or_default(),
    }
}

fn parse_id(s: &str, field: &str) -> AppResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| AppError::invalid(field, "not an id (UUID)"))
}

fn parse_ids(v: &[String], field: &str) -> AppResult<Vec<Uuid>> {
    if v.is_empty() || v.len() > 1000 {
        return Err(AppError::invalid(field, "1..1000 ids"));
    }
    v.iter()
        .enumerate()
        .map(|(i, s)| parse_id(s, &format!("{field}[{i}]")))
        .collect()
}

fn query_from_pb(f: Option<&pb::IncidentFilter>) -> AppResult<IncidentQuery> {
    let mut q = IncidentQuery::default();
    let Some(f) = f else { return Ok(q) };
    for (i, s) in f.statuses.iter().enumerate() {
        q.statuses
            .push(status_from_pb(*s, &format!("filter.statuses[{i}]"))?);
    }
    if f.min_severity != 0 {
        q.min_severity = Some(severity_from_pb(f.min_severity, "filter.min_severity")?);
    }
    if !f.assignee.is_empty() {
        q.assignee = Some(f.assignee.clone());
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

fn check_text(s: &str, max: usize, field: &str, required: bool) -> AppResult<()> {
    if required && s.trim().is_empty() {
        return Err(AppError::invalid(field, "required"));
    }
    if s.len() > max {
        return Err(AppError::invalid(field, format!("at most {max} bytes")));
    }
    Ok(())
}

#[tonic::async_trait]
impl IncidentService for IncidentApi {
    #[instrument(skip_all, fields(rpc = "IncidentService.CreateIncident", tenant))]
    async fn create_incident(
        &self,
        request: Request<pb::CreateIncidentRequest>,
    ) -> Result<Response<pb::CreateIncidentResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let run = async {
            check_text(&req.title, 256, "title", true)?;
            check_text(&req.description, 16 * 1024, "description", false)?;
            let severity = if req.severity == 0 {
                Severity::Medium
            } else {
                severity_from_pb(req.severity, "severity")?
            };
            let entities = req
                .entities
                .iter()
                .enumerate()
                .map(|(i, e)| entity_from_pb(e, &format!("entities[{i}]")))
                .collect::<AppResult<Vec<_>>>()?;
            let alert_ids = if req.alert_ids.is_empty() {
                Vec::new()
            } else {
                parse_ids(&req.alert_ids, "alert_ids")?
            };
            incidents::create(
                self.ctx.store.as_ref(),
                tenant,
                incidents::ManualIncident {
                    title: req.title.clone(),
                    description: req.description.clone(),
                    severity,
                    entities,
                },
                &alert_ids,
                &caller.actor(),
            )
            .await
        };
        let inc = run.await.map_err(to_status)?;
        self.ctx.changes.notify(tenant);
        Ok(Response::new(pb::CreateIncidentResponse {
            incident: Some(incident_to_pb(&inc)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "IncidentService.GetIncident", tenant))]
    async fn get_incident(
        &self,
        request: Request<pb::GetIncidentRequest>,
    ) -> Result<Response<pb::GetIncidentResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let id = parse_id(&request.get_ref().incident_id, "incident_id").map_err(to_status)?;
        let inc = self
            .ctx
            .store
            .get_incident(tenant, id)
            .await
            .map_err(|e| to_status(e.into()))?;
        let mut alerts = Vec::new();
        for a in inc.alert_ids.iter().rev().take(1000) {
            if let Ok(alert) = self.ctx.store.get_alert(tenant, *a).await {
                alerts.push(alert_to_pb(&alert));
            }
        }
        Ok(Response::new(pb::GetIncidentResponse {
            incident: Some(incident_to_pb(&inc)),
            alerts,
            timeline: inc.timeline.iter().map(entry_to_pb).collect(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "IncidentService.ListIncidents", tenant))]
    async fn list_incidents(
        &self,
        request: Request<pb::ListIncidentsRequest>,
    ) -> Result<Response<pb::ListIncidentsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let query = query_from_pb(req.filter.as_ref()).map_err(to_status)?;
        // The listing carries no timelines (GetIncident does): heads are enough.
        let fetch = |q| async move { Ok(self.ctx.store.list_incident_heads(tenant, &q).await?) };
        let (list, next_page_token) = keyset_list(query, req.page_size, &req.page_token, fetch)
            .await
            .map_err(to_status)?;
        let incidents = list.iter().map(incident_to_pb).collect();
        Ok(Response::new(pb::ListIncidentsResponse {
            incidents,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "IncidentService.UpdateIncident", tenant))]
    async fn update_incident(
        &self,
        request: Request<pb::UpdateIncidentRequest>,
    ) -> Result<Response<pb::UpdateIncidentResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let actor = caller.actor();
        let run = async {
            let id = parse_id(&req.incident_id, "incident_id")?;
            if req.update_mask.is_empty() {
                return Err(AppError::invalid(
                    "update_mask",
                    "name at least one field to change",
                ));
            }
            let status = req
                .update_mask
                .iter()
                .any(|f| f == "status")
                .then(|| status_from_pb(req.status, "status"))
                .transpose()?;
            let severity = req
                .update_mask
                .iter()
                .any(|f| f == "severity")
                .then(|| severity_from_pb(req.severity, "severity"))
                .transpose()?;
            for (i, f) in req.update_mask.iter().enumerate() {
                if !["status", "severity", "assignee", "tags"].contains(&f.as_str()) {
                    return Err(AppError::invalid(
                        format!("update_mask[{i}]"),
                        format!("`{f}` cannot be updated (status, severity, assignee, tags)"),
                    ));
                }
            }
            check_text(&req.assignee, 256, "assignee", false)?;
            if req.tags.len() > 32 || req.tags.iter().any(|t| t.is_empty() || t.len() > 64) {
                return Err(AppError::invalid("tags", "at most 32 tags of 1..64 bytes"));
            }
            let now = Utc::now();
            incidents::modify(self.ctx.store.as_ref(), tenant, id, |inc| {
                let mut last = None;
                if let Some(to) = status
                    && to != inc.status
                {
                    if !inc.status.can_move_to(to) {
                        return Err(AppError::FailedPrecondition(format!(
                            "cannot move an incident from {:?} to {to:?}",
                            inc.status
                        )));
                    }
                    let from = inc.status;
                    inc.status = to;
                    if to == IncidentStatus::Resolved {
                        inc.resolved_at = Some(now);
                    }
                    last = Some(inc.record(
                        &actor,
                        TimelineKind::StatusChanged,
                        format!("status {from:?} → {to:?}"),
                        format!("{to:?}"),
                        now,
                    ));
                }
                if let Some(s) = severity.filter(|s| *s != inc.severity) {
                    let from = inc.severity;
                    inc.severity = s;
                    last = Some(inc.record(
                        &actor,
                        TimelineKind::SeverityChanged,
                        format!("severity {from:?} → {s:?}"),
                        format!("{s:?}"),
                        now,
                    ));
                }
                if req.update_mask.iter().any(|f| f == "assignee") && req.assignee != inc.assignee {
                    inc.assignee = req.assignee.clone();
                    last = Some(inc.record(
                        &actor,
                        TimelineKind::Assigned,
                        format!(
                            "assigned to {}",
                            if req.assignee.is_empty() {
                                "nobody"
                            } else {
                                &req.assignee
                            }
                        ),
                        req.assignee.clone(),
                        now,
                    ));
                }
                if req.update_mask.iter().any(|f| f == "tags") && req.tags != inc.tags {
                    inc.tags = req.tags.clone();
                    last = Some(inc.record(
                        &actor,
                        TimelineKind::TagsChanged,
                        format!("tags set to [{}]", req.tags.join(", ")),
                        String::new(),
                        now,
                    ));
                }
                last.ok_or_else(|| AppError::FailedPrecondition("nothing to change".into()))
            })
            .await
        };
        let inc = run.await.map_err(to_status)?;
        self.ctx.changes.notify(tenant);
        Ok(Response::new(pb::UpdateIncidentResponse {
            incident: Some(incident_to_pb(&inc)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "IncidentService.AddNote", tenant))]
    async fn add_note(
        &self,
        request: Request<pb::AddNoteRequest>,
    ) -> Result<Response<pb::AddNoteResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let actor = caller.actor();
        let run = async {
            let id = parse_id(&req.incident_id, "incident_id")?;
            check_text(&req.text, 16 * 1024, "text", true)?;
            incidents::modify(self.ctx.store.as_ref(), tenant, id, |inc| {
                Ok(inc.record(
                    &actor,
                    TimelineKind::NoteAdded,
                    "note added".into(),
                    req.text.clone(),
                    Utc::now(),
                ))
            })
            .await
        };
        let inc = run.await.map_err(to_status)?;
        self.ctx.changes.notify(tenant);
        let entry = inc.timeline.last().map(entry_to_pb);
        Ok(Response::new(pb::AddNoteResponse { entry }))
    }

    #[instrument(skip_all, fields(rpc = "IncidentService.LinkAlerts", tenant))]
    async fn link_alerts(
        &self,
        request: Request<pb::LinkAlertsRequest>,
    ) -> Result<Response<pb::LinkAlertsResponse>, Status> {
        let incident = self.change_links(request, Links::Add).await?;
        Ok(Response::new(pb::LinkAlertsResponse { incident }))
    }

    #[instrument(skip_all, fields(rpc = "IncidentService.UnlinkAlerts", tenant))]
    async fn unlink_alerts(
        &self,
        request: Request<pb::UnlinkAlertsRequest>,
    ) -> Result<Response<pb::UnlinkAlertsResponse>, Status> {
        let incident = self.change_links(request, Links::Remove).await?;
        Ok(Response::new(pb::UnlinkAlertsResponse { incident }))
    }

    #[instrument(skip_all, fields(rpc = "IncidentService.MergeIncidents", tenant))]
    async fn merge_incidents(
        &self,
        request: Request<pb::MergeIncidentsRequest>,
    ) -> Result<Response<pb::MergeIncidentsResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let run = async {
            let target = parse_id(&req.target_incident_id, "target_incident_id")?;
            if req.source_incident_ids.len() > 100 {
                return Err(AppError::invalid("source_incident_ids", "at most 100"));
            }
            let sources = parse_ids(&req.source_incident_ids, "source_incident_ids")?;
            incidents::merge(
                self.ctx.store.as_ref(),
                tenant,
                target,
                &sources,
                &caller.actor(),
            )
            .await
        };
        let inc = run.await.map_err(to_status)?;
        self.ctx.changes.notify(tenant);
        Ok(Response::new(pb::MergeIncidentsResponse {
            incident: Some(incident_to_pb(&inc)),
        }))
    }

    type WatchIncidentStream = BoxStream<pb::WatchIncidentResponse>;

    #[instrument(skip_all, fields(rpc = "IncidentService.WatchIncident", tenant))]
    async fn watch_incident(
        &self,
        request: Request<pb::WatchIncidentRequest>,
    ) -> Result<Response<Self::WatchIncidentStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let id = parse_id(&req.incident_id, "incident_id").map_err(to_status)?;
        // Unknown ids fail now, resumed or not.
        self.ctx
            .store
            .get_incident(tenant, id)
            .await
            .map_err(|e| to_status(e.into()))?;
        let store = self.ctx.store.clone();
        let stream = self
            .watch(
                tenant,
                req.options.unwrap_or_default(),
                IncidentFilter::One(id),
                || async move { Ok(vec![store.get_incident(tenant, id).await?]) },
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(Box::pin(stream.map(|r| {
            r.map(|(cursor, item)| pb::WatchIncidentResponse {
                cursor,
                item: Some(match item {
                    WatchItem::Change(c) => pb::watch_incident_response::Item::Change(*c),
                    WatchItem::SnapshotComplete(n) => {
                        pb::watch_incident_response::Item::SnapshotComplete(pb::SnapshotComplete {
                            item_count: n,
                        })
                    }
                    WatchItem::Heartbeat(h) => pb::watch_incident_response::Item::Heartbeat(h),
                }),
            })
        }))))
    }

    type WatchIncidentsStream = BoxStream<pb::WatchIncidentsResponse>;

    #[instrument(skip_all, fields(rpc = "IncidentService.WatchIncidents", tenant))]
    async fn watch_incidents(
        &self,
        request: Request<pb::WatchIncidentsRequest>,
    ) -> Result<Response<Self::WatchIncidentsStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let filter = query_from_pb(req.filter.as_ref()).map_err(to_status)?;
        let mut q = filter.clone();
        q.limit = SNAPSHOT_LIMIT;
        let store = self.ctx.store.clone();
        let stream = self
            .watch(
                tenant,
                req.options.unwrap_or_default(),
                IncidentFilter::Query(filter),
                || async move { Ok(store.list_incident_heads(tenant, &q).await?) },
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(Box::pin(stream.map(|r| {
            r.map(|(cursor, item)| pb::WatchIncidentsResponse {
                cursor,
                item: Some(match item {
                    WatchItem::Change(c) => pb::watch_incidents_response::Item::Change(*c),
                    WatchItem::SnapshotComplete(n) => {
                        pb::watch_incidents_response::Item::SnapshotComplete(pb::SnapshotComplete {
                            item_count: n,
                        })
                    }
                    WatchItem::Heartbeat(h) => pb::watch_incidents_response::Item::Heartbeat(h),
                }),
            })
        }))))
    }
}

/// Which incidents a watch delivers.
#[derive(Clone)]
enum IncidentFilter {
    /// One incident.
    One(Uuid),
    /// Those matching a query.
    Query(IncidentQuery),
}

impl IncidentFilter {
    fn matches(&self, i: &Incident) -> bool {
        match self {
            Self::One(id) => i.id == *id,
            Self::Query(q) => q.matches(i),
        }
    }
}

/// One item of either incident watch, before it is wrapped in its response type.
enum WatchItem {
    Change(Box<pb::IncidentChange>),
    SnapshotComplete(u32),
    Heartbeat(pb::Heartbeat),
}

/// Which way [`IncidentApi::change_links`] moves alerts.
#[derive(Clone, Copy)]
enum Links {
    /// LinkAlerts.
    Add,
    /// UnlinkAlerts.
    Remove,
}

/// LinkAlerts and UnlinkAlerts requests carry the same two fields.
trait LinkRequest {
    /// The incident id and the alert ids, as sent.
    fn parts(&self) -> (&str, &[String]);
}

impl LinkRequest for pb::LinkAlertsRequest {
    fn parts(&self) -> (&str, &[String]) {
        (&self.incident_id, &self.alert_ids)
    }
}

impl LinkRequest for pb::UnlinkAlertsRequest {
    fn parts(&self) -> (&str, &[String]) {
        (&self.incident_id, &self.alert_ids)
    }
}

impl IncidentApi {
    /// Links or unlinks alerts (LinkAlerts, UnlinkAlerts): the incident after.
    async fn change_links<R: LinkRequest>(
        &self,
        request: Request<R>,
        links: Links,
    ) -> Result<Option<pb::Incident>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let (incident_id, alert_ids) = request.get_ref().parts();
        let run = async {
            let id = parse_id(incident_id, "incident_id")?;
            let ids = parse_ids(alert_ids, "alert_ids")?;
            let store = self.ctx.store.as_ref();
            match links {
                Links::Add => incidents::link(store, tenant, id, &ids, &caller.actor()).await,
                Links::Remove => incidents::unlink(store, tenant, id, &ids, &caller.actor()).await,
            }
        };
        let inc = run.await.map_err(to_status)?;
        self.ctx.changes.notify(tenant);
        Ok(Some(incident_to_pb(&inc)))
    }

    /// Snapshot (unless resuming) then live changes, as (cursor, item).
    ///
    /// The feed head is read before the snapshot, so every change after the
    /// head is either in the snapshot or sent afterwards. A change between
    /// the two is both: the incident versions of the snapshot tell it apart,
    /// so it is not sent again. No change is lost or repeated either way.
    async fn watch<S, Fut>(
        &self,
        tenant: TenantId,
        options: pb::WatchOptions,
        filter: IncidentFilter,
        snapshot: S,
    ) -> AppResult<BoxStream<(String, WatchItem)>>
    where
        S: FnOnce() -> Fut,
        Fut: std::future::Future<Output = AppResult<Vec<Incident>>>,
    {
        let heartbeat = self
            .ctx
            .limits
            .heartbeat_interval(options.heartbeat_interval_seconds)?;
        let mut reflected = HashMap::new();
        let (start, prelude) = if options.after_cursor.is_empty() {
            let head = self
                .ctx
                .store
                .changes_head(tenant, INCIDENTS_STREAM)
                .await?
                .unwrap_or_default();
            let items = snapshot().await?;
            reflected = items.iter().map(|i| (i.id, i.version)).collect();
            let items: Vec<Incident> = items.into_iter().filter(|i| filter.matches(i)).collect();
            let n = items.len() as u32;
            let cursor = encode_cursor(INCIDENTS_CURSOR, tenant, head);
            let mut prelude: Vec<Result<(String, WatchItem), Status>> = items
                .into_iter()
                .map(|i| {
                    Ok((
                        cursor.clone(),
                        WatchItem::Change(Box::new(pb::IncidentChange {
                            kind: pb::IncidentChangeKind::Snapshot as i32,
                            incident: Some(incident_to_pb(&i)),
                            entry: None,
                        })),
                    ))
                })
                .collect();
            prelude.push(Ok((String::new(), WatchItem::SnapshotComplete(n))));
            (head, prelude)
        } else {
            (
                decode_cursor(
                    INCIDENTS_CURSOR,
                    tenant,
                    &options.after_cursor,
                    "options.after_cursor",
                )?,
                Vec::new(),
            )
        };
        let feed = IncidentFeed {
            store: self.ctx.store.clone(),
            tenant,
            filter,
            reflected,
        };
        let live = self
            .ctx
            .follow(feed, start, heartbeat, self.ctx.changes.subscribe(tenant));
        Ok(Box::pin(futures::stream::iter(prelude).chain(live)))
    }
}

/// Most incidents a WatchIncidents snapshot holds.
const SNAPSHOT_LIMIT: u32 = 1000;

/// The incident change stream as the watches follow it.
struct IncidentFeed {
    store: Arc<dyn Store>,
    tenant: TenantId,
    filter: IncidentFilter,
    /// Incident versions the snapshot showed (at most [`SNAPSHOT_LIMIT`]):
    /// changes up to them are already known to the subscriber.
    reflected: HashMap<Uuid, i64>,
}

#[tonic::async_trait]
impl watch::Feed for IncidentFeed {
    const STREAM: &'static str = "incidents";
    type Entry = (pb::IncidentChangeKind, Incident, pb::TimelineEntry);
    type Msg = (String, WatchItem);

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
            .changes_after(self.tenant, INCIDENTS_STREAM, after, limit)
            .await?;
        changes
            .into_iter()
            .map(|c| {
                let bad = |e: serde_json::Error| {
                    AppError::Internal(
                        anyhow::Error::new(e).context("failed to decode a logged incident change"),
                    )
                };
                let incident: Incident =
                    serde_json::from_value(c.payload["incident"].clone()).map_err(bad)?;
                let entry: TimelineEntry =
                    serde_json::from_value(c.payload["entry"].clone()).map_err(bad)?;
                let kind = if c.kind == "created" {
                    pb::IncidentChangeKind::Created
                } else {
                    pb::IncidentChangeKind::Updated
                };
                Ok((c.position, (kind, incident, entry_to_pb(&entry))))
            })
            .collect()
    }

    fn message(&self, (kind, incident, entry): &Self::Entry) -> Option<Self::Msg> {
        if self
            .reflected
            .get(&incident.id)
            .is_some_and(|v| incident.version <= *v)
        {
            return None;
        }
        self.filter.matches(incident).then(|| {
            (
                String::new(),
                WatchItem::Change(Box::new(pb::IncidentChange {
                    kind: *kind as i32,
                    incident: Some(incident_to_pb(incident)),
                    entry: Some(entry.clone()),
                })),
            )
        })
    }

    async fn head(&self) -> AppResult<Option<FeedPosition>> {
        Ok(self
            .store
            .changes_head(self.tenant, INCIDENTS_STREAM)
            .await?)
    }

    fn cursor(&self, at: FeedPosition) -> String {
        encode_cursor(INCIDENTS_CURSOR, self.tenant, at)
    }

    fn heartbeat(&self, hb: pb::Heartbeat) -> Self::Msg {
        (String::new(), WatchItem::Heartbeat(hb))
    }

    fn with_cursor(&self, msg: Self::Msg, cursor: String) -> Self::Msg {
        (cursor, msg.1)
    }
}
