//! `picket.v1.EnforcementService`: decisions that gateways consult live
//! (CheckAccess, WatchDecisions) and their manual management. The logic is
//! in `response/`; this file maps messages and checks scopes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::access::auth::Caller;
use crate::domain::decision::{
    Decision, DecisionInput, DecisionKind, DecisionQuery, DecisionScope, DecisionState, DeltaKind,
    Effective, MAX_ACTOR, MAX_ORIGIN_ID, NewDecision, Origin, OriginKind, Target,
    check_revoke_reason,
};
use crate::domain::{FieldViolation, Scope, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::convert::{KeysetPosition, KeysetQuery, keyset_list, timestamp};
use crate::grpc::pb::enforcement_service_server::EnforcementService;
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, BoxStream, pb};
use crate::response::decisions::MAX_BATCH;
use crate::response::enforcer::{SnapshotReason, Verdict, WatchItem, WatchRequest};

/// EnforcementService implementation.
pub struct EnforcementApi {
    /// Shared per-server context.
    ctx: Arc<ApiContext>,
}

impl EnforcementApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

/// Domain scope to protobuf.
pub fn scope_to_pb(s: DecisionScope) -> pb::DecisionScope {
    match s {
        DecisionScope::Ip => pb::DecisionScope::Ip,
        DecisionScope::Cidr => pb::DecisionScope::Cidr,
        DecisionScope::Actor => pb::DecisionScope::Actor,
    }
}

/// Protobuf scope to domain: `None` for UNSPECIFIED, an error naming
/// `field` for an unknown value.
fn scope_from_pb(v: i32, field: &str) -> AppResult<Option<DecisionScope>> {
    match pb::DecisionScope::try_from(v) {
        Ok(pb::DecisionScope::Unspecified) => Ok(None),
        Ok(pb::DecisionScope::Ip) => Ok(Some(DecisionScope::Ip)),
        Ok(pb::DecisionScope::Cidr) => Ok(Some(DecisionScope::Cidr)),
        Ok(pb::DecisionScope::Actor) => Ok(Some(DecisionScope::Actor)),
        Err(_) => Err(AppError::invalid(field, "unknown decision scope")),
    }
}

/// Domain kind to protobuf.
pub fn kind_to_pb(k: DecisionKind) -> pb::DecisionType {
    match k {
        DecisionKind::Ban => pb::DecisionType::Ban,
        DecisionKind::Allow => pb::DecisionType::Allow,
        DecisionKind::Throttle => pb::DecisionType::Throttle,
    }
}

/// Protobuf type to domain: `None` for UNSPECIFIED.
fn kind_from_pb(v: i32, field: &str) -> AppResult<Option<DecisionKind>> {
    match pb::DecisionType::try_from(v) {
        Ok(pb::DecisionType::Unspecified) => Ok(None),
        Ok(pb::DecisionType::Ban) => Ok(Some(DecisionKind::Ban)),
        Ok(pb::DecisionType::Allow) => Ok(Some(DecisionKind::Allow)),
        Ok(pb::DecisionType::Throttle) => Ok(Some(DecisionKind::Throttle)),
        Err(_) => Err(AppError::invalid(field, "unknown decision type")),
    }
}

fn origin_to_pb(o: &Origin) -> pb::DecisionOrigin {
    pb::DecisionOrigin {
        kind: match o.kind {
            OriginKind::Manual => pb::DecisionOriginKind::Manual,
            OriginKind::PlaybookRun => pb::DecisionOriginKind::PlaybookRun,
            OriginKind::Alert => pb::DecisionOriginKind::Alert,
        } as i32,
        id: crate::grpc::convert::actor_to_pb(&o.id),
    }
}

/// A decision as protobuf, with its state at `now`.
pub fn decision_to_pb(d: &Decision, now: chrono::DateTime<Utc>) -> pb::Decision {
    pb::Decision {
        id: d.id.to_string(),
        scope: scope_to_pb(d.target.scope) as i32,
        value: d.target.value.clone(),
        r#type: kind_to_pb(d.kind) as i32,
        throttle_per_minute: d.throttle_per_minute,
        origin: Some(origin_to_pb(&d.origin)),
        reason: d.reason.clone(),
        created_by: crate::grpc::convert::actor_to_pb(&d.created_by),
        created_at: Some(timestamp(d.created_at)),
        expires_at: Some(timestamp(d.expires_at)),
        revoked_at: d.revoked_at.map(timestamp),
        revoked_by: crate::grpc::convert::actor_to_pb(&d.revoked_by),
        revoke_reason: d.revoke_reason.clone(),
        idempotency_key: d.idempotency_key.clone().unwrap_or_default(),
        state: match d.state(now) {
            DecisionState::Active => pb::DecisionState::Active,
            DecisionState::Expired => pb::DecisionState::Expired,
            DecisionState::Revoked => pb::DecisionState::Revoked,
        } as i32,
    }
}

/// An effective state as protobuf.
pub fn effective_to_pb(e: &Effective) -> pb::EffectiveDecision {
    pb::EffectiveDecision {
        scope: scope_to_pb(e.target.scope) as i32,
        value: e.target.value.clone(),
        r#type: kind_to_pb(e.kind) as i32,
        expires_at: Some(timestamp(e.expires_at)),
        throttle_per_minute: e.throttle_per_minute,
        decision_id: e.decision_id.to_string(),
        origin: Some(origin_to_pb(&e.origin)),
        reason: e.reason.clone(),
    }
}

fn delta_kind_to_pb(k: DeltaKind) -> pb::DeltaKind {
    match k {
        DeltaKind::Added => pb::DeltaKind::Added,
        DeltaKind::Updated | DeltaKind::Unchanged => pb::DeltaKind::Updated,
        DeltaKind::Removed => pb::DeltaKind::Removed,
        DeltaKind::Expired => pb::DeltaKind::Expired,
    }
}

fn parse_id(s: &str, field: &str) -> AppResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| AppError::invalid(field, "not an id (UUID)"))
}

impl KeysetQuery for DecisionQuery {
    type Row = Decision;
    fn set_page(&mut self, before: Option<KeysetPosition>, fetch: u32) {
        (self.before, self.limit) = (before, fetch);
    }
    fn position(d: &Self::Row) -> KeysetPosition {
        (d.created_at, d.id)
    }
}

impl EnforcementApi {
    /// Validates one NewDecision (fields under `prefix`) made by `caller`;
    /// collects its violations into `violations`.
    async fn new_decision(
        &self,
        tenant: TenantId,
        caller: &Caller,
        d: Option<&pb::NewDecision>,
        prefix: &str,
        violations: &mut Vec<FieldViolation>,
    ) -> AppResult<Option<NewDecision>> {
        let Some(d) = d else {
            violations.push(FieldViolation::new(
                prefix.trim_end_matches('.'),
                "required",
            ));
            return Ok(None);
        };
        let field = |name: &str| format!("{prefix}{name}");
        let mut scope = None;
        let mut kind = None;
        match scope_from_pb(d.scope, &field("scope")) {
            Ok(s) => scope = s,
            Err(AppError::InvalidArgument(v)) => violations.extend(v),
            Err(e) => return Err(e),
        }
        match kind_from_pb(d.r#type, &field("type")) {
            Ok(k) => kind = k,
            Err(AppError::InvalidArgument(v)) => violations.extend(v),
            Err(e) => return Err(e),
        }
        let origin = if d.alert_id.is_empty() {
            Origin::manual(&caller.actor())
        } else {
            match Uuid::parse_str(&d.alert_id) {
                Ok(id) => {
                    // The alert must exist in the caller's tenant.
                    match self.ctx.store.get_alert_head(tenant, id).await {
                        Ok(_) => {}
                        Err(crate::storage::StoreError::NotFound(_)) => {
                            return Err(AppError::NotFound(format!("alert {id}")));
                        }
                        Err(e) => return Err(e.into()),
                    }
                    Origin::alert(id)
                }
                Err(_) => {
                    violations.push(FieldViolation::new(field("alert_id"), "not an id (UUID)"));
                    return Ok(None);
                }
            }
        };
        let input = DecisionInput {
            scope,
            value: d.value.clone(),
            kind,
            duration_seconds: u64::from(d.duration_seconds),
            reason: d.reason.clone(),
            throttle_per_minute: d.throttle_per_minute,
            idempotency_key: d.idempotency_key.clone(),
        };
        // An unknown enum value was reported above; do not report it again as missing.
        let known_enums = violations.is_empty();
        match NewDecision::parse(&input, origin, prefix) {
            Ok(n) => Ok(Some(n)),
            Err(v) => {
                violations.extend(v.into_iter().filter(|v| {
                    known_enums || !(v.field == field("scope") || v.field == field("type"))
                }));
                Ok(None)
            }
        }
    }
}

#[tonic::async_trait]
impl EnforcementService for EnforcementApi {
    #[instrument(skip_all, fields(rpc = "EnforcementService.CheckAccess", tenant))]
    async fn check_access(
        &self,
        request: Request<pb::CheckAccessRequest>,
    ) -> Result<Response<pb::CheckAccessResponse>, Status> {
        let started = Instant::now();
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let ip = crate::domain::event::parse_ip(&req.ip, "ip").map_err(|v| to_status(v.into()))?;
        let actor = (!req.actor.is_empty()).then_some(req.actor.as_str());
        if req.actor.len() > MAX_ACTOR {
            return Err(to_status(AppError::invalid(
                "actor",
                format!("at most {MAX_ACTOR} bytes"),
            )));
        }
        if ip.is_none() && actor.is_none() {
            return Err(to_status(AppError::invalid(
                "ip",
                "give an ip, an actor or both",
            )));
        }
        let view = self
            .ctx
            .decisions
            .enforcer()
            .view(tenant)
            .await
            .map_err(to_status)?;
        let access = view.check(ip, actor, Utc::now());
        let verdict = match access.verdict {
            Verdict::Allow => pb::Verdict::Allow,
            Verdict::Deny => pb::Verdict::Deny,
            Verdict::Throttle => pb::Verdict::Throttle,
        };
        let throttle = match (access.verdict, &access.decision) {
            (Verdict::Throttle, Some(d)) => d.throttle_per_minute,
            _ => 0,
        };
        let response = pb::CheckAccessResponse {
            verdict: verdict as i32,
            decision: access.decision.as_ref().map(effective_to_pb),
            throttle_per_minute: throttle,
            revision: access.revision,
        };
        metrics::counter!("picket_check_access_total", "verdict" => verdict.as_str_name())
            .increment(1);
        metrics::histogram!("picket_check_access_seconds").record(started.elapsed().as_secs_f64());
        Ok(Response::new(response))
    }

    type WatchDecisionsStream = BoxStream<pb::WatchDecisionsResponse>;

    #[instrument(skip_all, fields(rpc = "EnforcementService.WatchDecisions", tenant))]
    async fn watch_decisions(
        &self,
        request: Request<pb::WatchDecisionsRequest>,
    ) -> Result<Response<Self::WatchDecisionsStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let heartbeat = match req.heartbeat_interval_seconds {
            0 => self.ctx.limits.default_heartbeat,
            s @ 1..=300 => Duration::from_secs(u64::from(s)),
            _ => {
                return Err(to_status(AppError::invalid(
                    "heartbeat_interval_seconds",
                    "must be 1..300 (or 0 for the default)",
                )));
            }
        };
        if req.scopes.len() > 3 {
            return Err(to_status(AppError::invalid(
                "scopes",
                "at most 3 (each scope once)",
            )));
        }
        let mut scopes = HashSet::new();
        for (i, s) in req.scopes.iter().enumerate() {
            let field = format!("scopes[{i}]");
            match scope_from_pb(*s, &field).map_err(to_status)? {
                Some(s) => {
                    scopes.insert(s);
                }
                None => return Err(to_status(AppError::invalid(field, "must be a scope"))),
            }
        }
        let rx = self
            .ctx
            .decisions
            .enforcer()
            .watch(
                tenant,
                WatchRequest {
                    after: req.after_revision,
                    scopes: (!scopes.is_empty()).then_some(scopes),
                    heartbeat,
                },
            )
            .await
            .map_err(to_status)?;
        let stream = ReceiverStream::new(rx).map(|item| {
            item.map(|i| pb::WatchDecisionsResponse {
                item: Some(watch_item_to_pb(i)),
            })
            .map_err(to_status)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all, fields(rpc = "EnforcementService.CreateDecision", tenant))]
    async fn create_decision(
        &self,
        request: Request<pb::CreateDecisionRequest>,
    ) -> Result<Response<pb::CreateDecisionResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let mut violations = Vec::new();
        let new = self
            .new_decision(
                tenant,
                &caller,
                req.decision.as_ref(),
                "decision.",
                &mut violations,
            )
            .await
            .map_err(to_status)?;
        let Some(new) = new.filter(|_| violations.is_empty()) else {
            return Err(to_status(AppError::InvalidArgument(violations)));
        };
        let created = self
            .ctx
            .decisions
            .create(tenant, &caller.actor(), new)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateDecisionResponse {
            decision: Some(decision_to_pb(&created.decision, Utc::now())),
            created: created.created,
            revision: created.revision,
            effective: created.effective.as_ref().map(effective_to_pb),
        }))
    }

    #[instrument(skip_all, fields(rpc = "EnforcementService.CreateDecisions", tenant))]
    async fn create_decisions(
        &self,
        request: Request<pb::CreateDecisionsRequest>,
    ) -> Result<Response<pb::CreateDecisionsResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        if req.decisions.is_empty() || req.decisions.len() > MAX_BATCH {
            return Err(to_status(AppError::invalid(
                "decisions",
                format!("1..{MAX_BATCH} decisions"),
            )));
        }
        let mut violations = Vec::new();
        let mut new = Vec::with_capacity(req.decisions.len());
        for (i, d) in req.decisions.iter().enumerate() {
            if let Some(n) = self
                .new_decision(
                    tenant,
                    &caller,
                    Some(d),
                    &format!("decisions[{i}]."),
                    &mut violations,
                )
                .await
                .map_err(to_status)?
            {
                new.push(n);
            }
            if violations.len() >= 100 {
                break;
            }
        }
        if !violations.is_empty() {
            return Err(to_status(AppError::InvalidArgument(violations)));
        }
        let created = self
            .ctx
            .decisions
            .create_all(tenant, &caller.actor(), new)
            .await
            .map_err(to_status)?;
        let now = Utc::now();
        Ok(Response::new(pb::CreateDecisionsResponse {
            created: created.decisions.iter().map(|(_, c)| *c).collect(),
            decisions: created
                .decisions
                .iter()
                .map(|(d, _)| decision_to_pb(d, now))
                .collect(),
            revision: created.revision,
        }))
    }

    #[instrument(skip_all, fields(rpc = "EnforcementService.RevokeDecision", tenant))]
    async fn revoke_decision(
        &self,
        request: Request<pb::RevokeDecisionRequest>,
    ) -> Result<Response<pb::RevokeDecisionResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let id = parse_id(&req.decision_id, "decision_id").map_err(to_status)?;
        check_revoke_reason(&req.reason, "reason").map_err(|v| to_status(v.into()))?;
        let revoked = self
            .ctx
            .decisions
            .revoke(tenant, id, &caller.actor(), &req.reason)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RevokeDecisionResponse {
            decision: Some(decision_to_pb(&revoked.decision, Utc::now())),
            revision: revoked.revision,
            effective: revoked.effective.as_ref().map(effective_to_pb),
        }))
    }

    #[instrument(skip_all, fields(rpc = "EnforcementService.ListDecisions", tenant))]
    async fn list_decisions(
        &self,
        request: Request<pb::ListDecisionsRequest>,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let query = list_query(&req).map_err(to_status)?;
        let fetch = |q| async move { self.ctx.decisions.list(tenant, &q).await };
        let (decisions, next_page_token) =
            keyset_list(query, req.page_size, &req.page_token, fetch)
                .await
                .map_err(to_status)?;
        let now = Utc::now();
        Ok(Response::new(pb::ListDecisionsResponse {
            decisions: decisions.iter().map(|d| decision_to_pb(d, now)).collect(),
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "EnforcementService.GetDecision", tenant))]
    async fn get_decision(
        &self,
        request: Request<pb::GetDecisionRequest>,
    ) -> Result<Response<pb::GetDecisionResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let id = parse_id(&request.get_ref().decision_id, "decision_id").map_err(to_status)?;
        let decision = self
            .ctx
            .decisions
            .get(tenant, id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetDecisionResponse {
            decision: Some(decision_to_pb(&decision, Utc::now())),
        }))
    }
}

/// A ListDecisions request as a query.
fn list_query(req: &pb::ListDecisionsRequest) -> AppResult<DecisionQuery> {
    let scope = scope_from_pb(req.scope, "scope")?;
    let value = match (scope, req.value.as_str()) {
        (_, "") => None,
        (None, _) => return Err(AppError::invalid("value", "needs a scope")),
        (Some(scope), v) => Some(Target::parse(scope, v, "value")?.value),
    };
    let mut kinds = Vec::new();
    for (i, t) in req.types.iter().enumerate() {
        let field = format!("types[{i}]");
        match kind_from_pb(*t, &field)? {
            Some(k) => kinds.push(k),
            None => return Err(AppError::invalid(field, "must be a type")),
        }
    }
    if req.origin_id.len() > MAX_ORIGIN_ID {
        return Err(AppError::invalid(
            "origin_id",
            format!("at most {MAX_ORIGIN_ID} bytes"),
        ));
    }
    Ok(DecisionQuery {
        scope,
        value,
        kinds,
        origin_id: (!req.origin_id.is_empty()).then(|| req.origin_id.clone()),
        include_inactive: req.include_inactive,
        now: Some(Utc::now()),
        before: None,
        limit: 0,
    })
}

/// One subscription item as protobuf.
fn watch_item_to_pb(item: WatchItem) -> pb::watch_decisions_response::Item {
    use pb::watch_decisions_response::Item;
    match item {
        WatchItem::Snapshot(entries) => Item::Snapshot(pb::DecisionSnapshotChunk {
            decisions: entries.iter().map(effective_to_pb).collect(),
        }),
        WatchItem::SnapshotComplete {
            revision,
            count,
            reason,
            message,
        } => Item::SnapshotComplete(pb::DecisionSnapshotComplete {
            revision,
            decision_count: count,
            reason: match reason {
                SnapshotReason::Initial => pb::SnapshotReason::Initial,
                SnapshotReason::Compacted => pb::SnapshotReason::Compacted,
                SnapshotReason::Ahead => pb::SnapshotReason::Ahead,
            } as i32,
            message,
        }),
        WatchItem::Deltas { deltas, revision } => Item::Deltas(pb::DecisionDeltaChunk {
            deltas: deltas
                .iter()
                .map(|d| pb::DecisionDelta {
                    kind: delta_kind_to_pb(d.kind) as i32,
                    revision: d.revision,
                    decision: Some(effective_to_pb(&d.effective)),
                })
                .collect(),
            revision,
        }),
        WatchItem::Heartbeat { revision } => Item::Heartbeat(pb::DecisionHeartbeat {
            server_time: Some(timestamp(Utc::now())),
            revision,
        }),
    }
}
