//! `picket.v1.PlaybookService`: playbooks, runs under approval, undo, the
//! live runs watch (the approvals inbox) and notification settings. The
//! logic is `crate::response`; this file maps messages and errors.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};
use tracing::instrument;
use uuid::Uuid;

use crate::domain::event::FeedPosition;
use crate::domain::playbook::{
    APPROVAL_TIMEOUT_RANGE, ActionKind, DEFAULT_APPROVAL_TIMEOUT, MAX_TEXT_BYTES,
    NotificationSettings, Origin, Playbook, PlaybookDef, PlaybookRun, RunQuery, RunStatus, Step,
    StepResult, StepState, Trigger,
};
use crate::domain::{Scope, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::convert::{
    KeysetPosition, KeysetQuery, actor_to_pb, keyset_list, page_size, timestamp,
};
use crate::grpc::events::{decode_cursor, encode_cursor, severity_from_pb, severity_to_pb};
use crate::grpc::pb::playbook_service_server::PlaybookService;
use crate::grpc::status::to_status;
use crate::grpc::{ApiContext, BoxStream, pb, watch};
use crate::response::StartRun;
use crate::storage::{RUNS_STREAM, Store};

/// Cursor kind of the runs watch.
const RUNS_CURSOR: &str = "pr";
/// Most runs a watch snapshot holds.
const SNAPSHOT_LIMIT: u32 = 1000;

/// PlaybookService implementation.
pub struct PlaybookApi {
    /// Shared per-server context.
    ctx: Arc<ApiContext>,
}

impl PlaybookApi {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<ApiContext>) -> Self {
        Self { ctx }
    }
}

fn action_to_pb(a: ActionKind) -> pb::ActionKind {
    match a {
        ActionKind::BlockIp => pb::ActionKind::BlockIp,
        ActionKind::DisableActor => pb::ActionKind::DisableActor,
        ActionKind::RevokeSessions => pb::ActionKind::RevokeSessions,
        ActionKind::NotifyWebhook => pb::ActionKind::NotifyWebhook,
        ActionKind::AddIncidentNote => pb::ActionKind::AddIncidentNote,
        ActionKind::SetIncidentStatus => pb::ActionKind::SetIncidentStatus,
        ActionKind::Throttle => pb::ActionKind::Throttle,
    }
}

fn action_from_pb(v: i32, field: &str) -> AppResult<ActionKind> {
    Ok(match pb::ActionKind::try_from(v) {
        Ok(pb::ActionKind::BlockIp) => ActionKind::BlockIp,
        Ok(pb::ActionKind::DisableActor) => ActionKind::DisableActor,
        Ok(pb::ActionKind::RevokeSessions) => ActionKind::RevokeSessions,
        Ok(pb::ActionKind::NotifyWebhook) => ActionKind::NotifyWebhook,
        Ok(pb::ActionKind::AddIncidentNote) => ActionKind::AddIncidentNote,
        Ok(pb::ActionKind::SetIncidentStatus) => ActionKind::SetIncidentStatus,
        Ok(pb::ActionKind::Throttle) => ActionKind::Throttle,
        _ => return Err(AppError::invalid(field, "unknown or unset action")),
    })
}

/// A run status as protobuf.
pub fn run_status_to_pb(s: RunStatus) -> pb::RunStatus {
    match s {
        RunStatus::PendingApproval => pb::RunStatus::PendingApproval,
        RunStatus::Approved => pb::RunStatus::Approved,
        RunStatus::Rejected => pb::RunStatus::Rejected,
        RunStatus::Running => pb::RunStatus::Running,
        RunStatus::Succeeded => pb::RunStatus::Succeeded,
        RunStatus::Failed => pb::RunStatus::Failed,
        RunStatus::Cancelled => pb::RunStatus::Cancelled,
        RunStatus::Expired => pb::RunStatus::Expired,
    }
}

fn run_status_from_pb(v: i32, field: &str) -> AppResult<RunStatus> {
    Ok(match pb::RunStatus::try_from(v) {
        Ok(pb::RunStatus::PendingApproval) => RunStatus::PendingApproval,
        Ok(pb::RunStatus::Approved) => RunStatus::Approved,
        Ok(pb::RunStatus::Rejected) => RunStatus::Rejected,
        Ok(pb::RunStatus::Running) => RunStatus::Running,
        Ok(pb::RunStatus::Succeeded) => RunStatus::Succeeded,
        Ok(pb::RunStatus::Failed) => RunStatus::Failed,
        Ok(pb::RunStatus::Cancelled) => RunStatus::Cancelled,
        Ok(pb::RunStatus::Expired) => RunStatus::Expired,
        _ => return Err(AppError::invalid(field, "unknown run status")),
    })
}

fn step_state_to_pb(s: StepState) -> pb::StepState {
    match s {
        StepState::Pending => pb::StepState::Pending,
        StepState::Running => pb::StepState::Running,
        StepState::Succeeded => pb::StepState::Succeeded,
        StepState::Failed => pb::StepState::Failed,
        StepState::Skipped => pb::StepState::Skipped,
    }
}

/// A playbook definition from protobuf; errors name `playbook.…` fields.
fn def_from_pb(p: &pb::Playbook) -> AppResult<PlaybookDef> {
    let mut steps = Vec::with_capacity(p.steps.len());
    for (i, s) in p.steps.iter().enumerate() {
        steps.push(Step {
            name: s.name.clone(),
            action: action_from_pb(s.action, &format!("playbook.steps[{i}].action"))?,
            params: s
                .params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            requires_approval: s.requires_approval,
            timeout_seconds: s.timeout_seconds,
            max_attempts: s.max_attempts,
        });
    }
    let trigger = match &p.trigger {
        Some(t) => Trigger {
            min_severity: if t.min_severity == 0 {
                None
            } else {
                Some(severity_from_pb(
                    t.min_severity,
                    "playbook.trigger.min_severity",
                )?)
            },
            categories: t.categories.clone(),
            rules: t.rules.clone(),
        },
        None => Trigger::default(),
    };
    Ok(PlaybookDef {
        name: p.name.clone(),
        description: p.description.clone(),
        steps,
        trigger,
        enabled: p.enabled,
        required_approvals: p.required_approvals,
    })
}

/// A definition as a protobuf playbook (no id, version or times).
pub fn def_to_pb(def: &PlaybookDef) -> pb::Playbook {
    let mut p = playbook_to_pb(&Playbook {
        tenant_id: None,
        id: Uuid::nil(),
        origin: Origin::Tenant,
        version: 0,
        created_at: chrono::DateTime::UNIX_EPOCH,
        updated_at: chrono::DateTime::UNIX_EPOCH,
        def: def.clone(),
    });
    p.id.clear();
    p.origin = 0;
    p.created_at = None;
    p.updated_at = None;
    p
}

/// A playbook as protobuf.
pub fn playbook_to_pb(p: &Playbook) -> pb::Playbook {
    pb::Playbook {
        id: p.id.to_string(),
        name: p.def.name.clone(),
        description: p.def.description.clone(),
        steps: p
            .def
            .steps
            .iter()
            .map(|s| pb::PlaybookStep {
                name: s.name.clone(),
                action: action_to_pb(s.action) as i32,
                params: s
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                requires_approval: s.requires_approval,
                timeout_seconds: s.timeout_seconds,
                max_attempts: s.max_attempts,
            })
            .collect(),
        trigger: Some(pb::PlaybookTrigger {
            min_severity: p
                .def
                .trigger
                .min_severity
                .map_or(0, |s| severity_to_pb(s) as i32),
            categories: p.def.trigger.categories.clone(),
            rules: p.def.trigger.rules.clone(),
        }),
        enabled: p.def.enabled,
        version: p.version.clamp(0, i64::from(u32::MAX)) as u32,
        required_approvals: p.def.approvals_needed(),
        created_at: Some(timestamp(p.created_at)),
        updated_at: Some(timestamp(p.updated_at)),
        origin: match p.origin {
            Origin::Tenant => pb::PlaybookOrigin::Tenant,
            Origin::Builtin => pb::PlaybookOrigin::Builtin,
            Origin::Directory => pb::PlaybookOrigin::Directory,
        } as i32,
    }
}

fn result_to_pb(r: &StepResult) -> pb::StepResult {
    pb::StepResult {
        step: r.step.clone(),
        succeeded: r.state == StepState::Succeeded,
        message: r.message.clone(),
        started_at: r.started_at.map(timestamp),
        finished_at: r.finished_at.map(timestamp),
        state: step_state_to_pb(r.state) as i32,
        attempts: r.attempts,
        inverse: r
            .inverse
            .as_ref()
            .map(|i| i.description.clone())
            .unwrap_or_default(),
        undo: r.undo.as_ref().map(|u| pb::StepUndo {
            undone_by: actor_to_pb(&u.by),
            undone_at: Some(timestamp(u.at)),
            reason: u.reason.clone(),
            description: u.description.clone(),
        }),
    }
}

/// A run as protobuf.
pub fn run_to_pb(r: &PlaybookRun) -> pb::PlaybookRun {
    pb::PlaybookRun {
        id: r.id.to_string(),
        playbook_id: r.playbook_id.to_string(),
        playbook_version: r.playbook_version.clamp(0, i64::from(u32::MAX)) as u32,
        incident_id: r.incident_id.map(|i| i.to_string()).unwrap_or_default(),
        alert_id: r.alert_id.map(|a| a.to_string()).unwrap_or_default(),
        status: run_status_to_pb(r.status) as i32,
        requested_by: actor_to_pb(&r.requested_by),
        approvals: r
            .approvals
            .iter()
            .map(|a| pb::Approval {
                decided_by: actor_to_pb(&a.decided_by),
                decided_at: Some(timestamp(a.decided_at)),
                approved: a.approved,
                comment: a.comment.clone(),
                params_digest: a.params_digest.clone(),
            })
            .collect(),
        step_results: r.results.iter().map(result_to_pb).collect(),
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        approval_deadline: Some(timestamp(r.approval_deadline)),
        playbook_name: r.playbook_name.clone(),
        steps: r
            .steps
            .iter()
            .map(|s| pb::ResolvedStep {
                name: s.name.clone(),
                action: action_to_pb(s.action) as i32,
                params: s
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                requires_approval: s.requires_approval,
                timeout_seconds: s.timeout_seconds,
                max_attempts: s.max_attempts,
            })
            .collect(),
        params_digest: r.params_digest.clone(),
        required_approvals: r.required_approvals,
        status_reason: r.status_reason.clone(),
        automatic: r.automatic,
        finished_at: r.finished_at.map(timestamp),
    }
}

fn settings_to_pb(s: &NotificationSettings) -> pb::NotificationSettings {
    pb::NotificationSettings {
        url: s.url.clone(),
        secret_rotated_at: s.secret_rotated_at.map(timestamp),
    }
}

fn parse_id(s: &str, field: &str) -> AppResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| AppError::invalid(field, "not an id (UUID)"))
}

fn opt_id(s: &str, field: &str) -> AppResult<Option<Uuid>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_id(s, field).map(Some)
    }
}

fn check_text(s: &str, field: &str, required: bool) -> AppResult<()> {
    if required && s.trim().is_empty() {
        return Err(AppError::invalid(field, "required"));
    }
    if s.len() > MAX_TEXT_BYTES {
        return Err(AppError::invalid(
            field,
            format!("at most {MAX_TEXT_BYTES} bytes"),
        ));
    }
    Ok(())
}

pub(crate) fn name_token(name: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name)
}

pub(crate) fn parse_name_token(token: &str) -> AppResult<String> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| AppError::invalid("page_token", "malformed page token"))
}

impl KeysetQuery for RunQuery {
    type Row = PlaybookRun;
    fn set_page(&mut self, before: Option<KeysetPosition>, fetch: u32) {
        (self.before, self.limit) = (before, fetch);
    }
    fn position(r: &Self::Row) -> KeysetPosition {
        (r.created_at, r.id)
    }
}

fn statuses_from_pb(v: &[i32], field: &str) -> AppResult<Vec<RunStatus>> {
    v.iter()
        .enumerate()
        .map(|(i, s)| run_status_from_pb(*s, &format!("{field}[{i}]")))
        .collect()
}

#[tonic::async_trait]
impl PlaybookService for PlaybookApi {
    #[instrument(skip_all, fields(rpc = "PlaybookService.CreatePlaybook", tenant))]
    async fn create_playbook(
        &self,
        request: Request<pb::CreatePlaybookRequest>,
    ) -> Result<Response<pb::CreatePlaybookResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let run = async {
            let p = req
                .playbook
                .as_ref()
                .ok_or_else(|| AppError::invalid("playbook", "required"))?;
            let def = def_from_pb(p)?;
            self.ctx.response.create_playbook(tenant, def).await
        };
        let p = run.await.map_err(to_status)?;
        Ok(Response::new(pb::CreatePlaybookResponse {
            playbook: Some(playbook_to_pb(&p)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.GetPlaybook", tenant))]
    async fn get_playbook(
        &self,
        request: Request<pb::GetPlaybookRequest>,
    ) -> Result<Response<pb::GetPlaybookResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let run = async {
            let id = parse_id(&request.get_ref().playbook_id, "playbook_id")?;
            self.ctx.response.playbook(tenant, id).await
        };
        let p = run.await.map_err(to_status)?;
        Ok(Response::new(pb::GetPlaybookResponse {
            playbook: Some(playbook_to_pb(&p)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.ListPlaybooks", tenant))]
    async fn list_playbooks(
        &self,
        request: Request<pb::ListPlaybooksRequest>,
    ) -> Result<Response<pb::ListPlaybooksResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let run = async {
            let limit = page_size(req.page_size, 100, 1000)?;
            let after = match req.page_token.as_str() {
                "" => None,
                t => Some(parse_name_token(t)?),
            };
            let mut list = self
                .ctx
                .response
                .list_playbooks(tenant, after.as_deref(), limit + 1)
                .await?;
            let next = if list.len() > limit as usize {
                list.truncate(limit as usize);
                list.last()
                    .map(|p| name_token(&p.def.name))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            Ok::<_, AppError>((list, next))
        };
        let (list, next_page_token) = run.await.map_err(to_status)?;
        Ok(Response::new(pb::ListPlaybooksResponse {
            playbooks: list.iter().map(playbook_to_pb).collect(),
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.UpdatePlaybook", tenant))]
    async fn update_playbook(
        &self,
        request: Request<pb::UpdatePlaybookRequest>,
    ) -> Result<Response<pb::UpdatePlaybookResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Admin).await?;
        let req = request.into_inner();
        let run = async {
            let p = req
                .playbook
                .as_ref()
                .ok_or_else(|| AppError::invalid("playbook", "required"))?;
            let id = parse_id(&p.id, "playbook.id")?;
            let def = def_from_pb(p)?;
            self.ctx
                .response
                .update_playbook(tenant, id, i64::from(p.version), def)
                .await
        };
        let p = run.await.map_err(to_status)?;
        Ok(Response::new(pb::UpdatePlaybookResponse {
            playbook: Some(playbook_to_pb(&p)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.DeletePlaybook", tenant))]
    async fn delete_playbook(
        &self,
        request: Request<pb::DeletePlaybookRequest>,
    ) -> Result<Response<pb::DeletePlaybookResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Admin).await?;
        let run = async {
            let id = parse_id(&request.get_ref().playbook_id, "playbook_id")?;
            self.ctx
                .response
                .delete_playbook(tenant, id, &caller.actor())
                .await
        };
        let cancelled_runs = run.await.map_err(to_status)?;
        Ok(Response::new(pb::DeletePlaybookResponse { cancelled_runs }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.StartPlaybookRun", tenant))]
    async fn start_playbook_run(
        &self,
        request: Request<pb::StartPlaybookRunRequest>,
    ) -> Result<Response<pb::StartPlaybookRunResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let run = async {
            let playbook_id = parse_id(&req.playbook_id, "playbook_id")?;
            let incident_id = opt_id(&req.incident_id, "incident_id")?;
            let alert_id = opt_id(&req.alert_id, "alert_id")?;
            if incident_id.is_some() == alert_id.is_some() {
                return Err(AppError::invalid(
                    "incident_id",
                    "exactly one of incident_id or alert_id is required",
                ));
            }
            let timeout = match req.approval_timeout_seconds {
                0 => DEFAULT_APPROVAL_TIMEOUT,
                n if (APPROVAL_TIMEOUT_RANGE.0..=APPROVAL_TIMEOUT_RANGE.1).contains(&n) => n,
                _ => {
                    return Err(AppError::invalid(
                        "approval_timeout_seconds",
                        format!(
                            "{}..{} (or 0 for {DEFAULT_APPROVAL_TIMEOUT})",
                            APPROVAL_TIMEOUT_RANGE.0, APPROVAL_TIMEOUT_RANGE.1
                        ),
                    ));
                }
            };
            self.ctx
                .response
                .start_run(
                    tenant,
                    StartRun {
                        playbook_id,
                        incident_id,
                        alert_id,
                        approval_timeout: chrono::Duration::seconds(i64::from(timeout)),
                        requested_by: caller.actor(),
                    },
                )
                .await
        };
        let r = run.await.map_err(to_status)?;
        Ok(Response::new(pb::StartPlaybookRunResponse {
            run: Some(run_to_pb(&r)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.GetPlaybookRun", tenant))]
    async fn get_playbook_run(
        &self,
        request: Request<pb::GetPlaybookRunRequest>,
    ) -> Result<Response<pb::GetPlaybookRunResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let run = async {
            let id = parse_id(&request.get_ref().run_id, "run_id")?;
            Ok::<_, AppError>(self.ctx.store.get_run(tenant, id).await?)
        };
        let r = run.await.map_err(to_status)?;
        Ok(Response::new(pb::GetPlaybookRunResponse {
            run: Some(run_to_pb(&r)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.ListPlaybookRuns", tenant))]
    async fn list_playbook_runs(
        &self,
        request: Request<pb::ListPlaybookRunsRequest>,
    ) -> Result<Response<pb::ListPlaybookRunsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let run = async {
            let query = RunQuery {
                playbook_id: opt_id(&req.playbook_id, "playbook_id")?,
                incident_id: opt_id(&req.incident_id, "incident_id")?,
                statuses: statuses_from_pb(&req.statuses, "statuses")?,
                ..Default::default()
            };
            let fetch = |q| async move { Ok(self.ctx.store.list_runs(tenant, &q).await?) };
            keyset_list(query, req.page_size, &req.page_token, fetch).await
        };
        let (list, next_page_token) = run.await.map_err(to_status)?;
        Ok(Response::new(pb::ListPlaybookRunsResponse {
            runs: list.iter().map(run_to_pb).collect(),
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.ApprovePlaybookRun", tenant))]
    async fn approve_playbook_run(
        &self,
        request: Request<pb::ApprovePlaybookRunRequest>,
    ) -> Result<Response<pb::ApprovePlaybookRunResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_id(&req.run_id, "run_id")?;
            check_text(&req.comment, "comment", false)?;
            if req.params_digest.len() > 128 {
                return Err(AppError::invalid("params_digest", "at most 128 bytes"));
            }
            self.ctx
                .response
                .approve(
                    tenant,
                    id,
                    &caller.actor(),
                    &req.comment,
                    &req.params_digest,
                )
                .await
        };
        let r = run.await.map_err(to_status)?;
        Ok(Response::new(pb::ApprovePlaybookRunResponse {
            run: Some(run_to_pb(&r)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.RejectPlaybookRun", tenant))]
    async fn reject_playbook_run(
        &self,
        request: Request<pb::RejectPlaybookRunRequest>,
    ) -> Result<Response<pb::RejectPlaybookRunResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_id(&req.run_id, "run_id")?;
            check_text(&req.comment, "comment", true)?;
            self.ctx
                .response
                .reject(tenant, id, &caller.actor(), &req.comment)
                .await
        };
        let r = run.await.map_err(to_status)?;
        Ok(Response::new(pb::RejectPlaybookRunResponse {
            run: Some(run_to_pb(&r)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.CancelPlaybookRun", tenant))]
    async fn cancel_playbook_run(
        &self,
        request: Request<pb::CancelPlaybookRunRequest>,
    ) -> Result<Response<pb::CancelPlaybookRunResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_id(&req.run_id, "run_id")?;
            check_text(&req.reason, "reason", false)?;
            self.ctx
                .response
                .cancel(tenant, id, &caller.actor(), &req.reason)
                .await
        };
        let r = run.await.map_err(to_status)?;
        Ok(Response::new(pb::CancelPlaybookRunResponse {
            run: Some(run_to_pb(&r)),
        }))
    }

    #[instrument(skip_all, fields(rpc = "PlaybookService.UndoPlaybookStep", tenant))]
    async fn undo_playbook_step(
        &self,
        request: Request<pb::UndoPlaybookStepRequest>,
    ) -> Result<Response<pb::UndoPlaybookStepResponse>, Status> {
        let (caller, tenant) = self.ctx.tenant_caller(&request, Scope::Respond).await?;
        let req = request.into_inner();
        let run = async {
            let id = parse_id(&req.run_id, "run_id")?;
            check_text(&req.step, "step", true)?;
            check_text(&req.reason, "reason", false)?;
            self.ctx
                .response
                .undo(tenant, id, &req.step, &caller.actor(), &req.reason)
                .await
        };
        let r = run.await.map_err(to_status)?;
        Ok(Response::new(pb::UndoPlaybookStepResponse {
            run: Some(run_to_pb(&r)),
        }))
    }

    type WatchPlaybookRunsStream = BoxStream<pb::WatchPlaybookRunsResponse>;

    #[instrument(skip_all, fields(rpc = "PlaybookService.WatchPlaybookRuns", tenant))]
    async fn watch_playbook_runs(
        &self,
        request: Request<pb::WatchPlaybookRunsRequest>,
    ) -> Result<Response<Self::WatchPlaybookRunsStream>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Read).await?;
        let req = request.into_inner();
        let stream = self.watch(tenant, req).await.map_err(to_status)?;
        Ok(Response::new(stream))
    }

    #[instrument(
        skip_all,
        fields(rpc = "PlaybookService.GetNotificationSettings", tenant)
    )]
    async fn get_notification_settings(
        &self,
        request: Request<pb::GetNotificationSettingsRequest>,
    ) -> Result<Response<pb::GetNotificationSettingsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Admin).await?;
        let (settings, secret) = self
            .ctx
            .response
            .notification_settings(tenant)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetNotificationSettingsResponse {
            settings: Some(settings_to_pb(&settings)),
            secret: secret
                .map(|s| s.expose_secret().to_owned())
                .unwrap_or_default(),
        }))
    }

    #[instrument(
        skip_all,
        fields(rpc = "PlaybookService.UpdateNotificationSettings", tenant)
    )]
    async fn update_notification_settings(
        &self,
        request: Request<pb::UpdateNotificationSettingsRequest>,
    ) -> Result<Response<pb::UpdateNotificationSettingsResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Admin).await?;
        let settings = self
            .ctx
            .response
            .set_notification_url(tenant, &request.get_ref().url)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UpdateNotificationSettingsResponse {
            settings: Some(settings_to_pb(&settings)),
        }))
    }

    #[instrument(
        skip_all,
        fields(rpc = "PlaybookService.RotateNotificationSecret", tenant)
    )]
    async fn rotate_notification_secret(
        &self,
        request: Request<pb::RotateNotificationSecretRequest>,
    ) -> Result<Response<pb::RotateNotificationSecretResponse>, Status> {
        let (_, tenant) = self.ctx.tenant_caller(&request, Scope::Admin).await?;
        let (settings, secret) = self
            .ctx
            .response
            .rotate_notification_secret(tenant)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::RotateNotificationSecretResponse {
            settings: Some(settings_to_pb(&settings)),
            secret: secret.expose_secret().to_owned(),
        }))
    }
}

/// Which runs a watch delivers.
#[derive(Clone)]
struct RunFilter {
    statuses: Vec<RunStatus>,
    playbook_id: Option<Uuid>,
}

impl RunFilter {
    fn matches(&self, r: &PlaybookRun) -> bool {
        self.matched(r, r.status)
    }

    /// Whether `r` matched when its status was `status`.
    fn matched(&self, r: &PlaybookRun, status: RunStatus) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&status))
            && self.playbook_id.is_none_or(|p| p == r.playbook_id)
    }
}

/// One item of the runs watch, before it becomes a response.
enum WatchItem {
    Change(Box<pb::PlaybookRunChange>),
    SnapshotComplete(u32),
    Heartbeat(pb::Heartbeat),
}

impl PlaybookApi {
    /// Snapshot (unless resuming) then live changes; like the incident
    /// watches: the head is read before the snapshot, and changes up to the
    /// versions the snapshot showed are skipped, so none is lost or repeated.
    async fn watch(
        &self,
        tenant: TenantId,
        req: pb::WatchPlaybookRunsRequest,
    ) -> AppResult<BoxStream<pb::WatchPlaybookRunsResponse>> {
        let options = req.options.unwrap_or_default();
        let heartbeat = self
            .ctx
            .limits
            .heartbeat_interval(options.heartbeat_interval_seconds)?;
        let filter = RunFilter {
            statuses: statuses_from_pb(&req.statuses, "statuses")?,
            playbook_id: opt_id(&req.playbook_id, "playbook_id")?,
        };
        let mut reflected = HashMap::new();
        let (start, prelude) = if options.after_cursor.is_empty() {
            let head = self
                .ctx
                .store
                .changes_head(tenant, RUNS_STREAM)
                .await?
                .unwrap_or_default();
            let runs = self
                .ctx
                .store
                .list_runs(
                    tenant,
                    &RunQuery {
                        playbook_id: filter.playbook_id,
                        statuses: filter.statuses.clone(),
                        limit: SNAPSHOT_LIMIT,
                        ..Default::default()
                    },
                )
                .await?;
            reflected = runs.iter().map(|r| (r.id, r.version)).collect();
            let cursor = encode_cursor(RUNS_CURSOR, tenant, head);
            let n = runs.len() as u32;
            let mut prelude: Vec<Result<(String, WatchItem), Status>> = runs
                .iter()
                .map(|r| {
                    Ok((
                        cursor.clone(),
                        WatchItem::Change(Box::new(pb::PlaybookRunChange {
                            kind: pb::RunChangeKind::Snapshot as i32,
                            run: Some(run_to_pb(r)),
                        })),
                    ))
                })
                .collect();
            prelude.push(Ok((String::new(), WatchItem::SnapshotComplete(n))));
            (head, prelude)
        } else {
            (
                decode_cursor(
                    RUNS_CURSOR,
                    tenant,
                    &options.after_cursor,
                    "options.after_cursor",
                )?,
                Vec::new(),
            )
        };
        let feed = RunFeed {
            store: self.ctx.store.clone(),
            tenant,
            filter,
            reflected,
        };
        let live = self
            .ctx
            .follow(feed, start, heartbeat, self.ctx.changes.subscribe(tenant));
        let stream = futures::stream::iter(prelude).chain(live).map(|r| {
            r.map(|(cursor, item)| pb::WatchPlaybookRunsResponse {
                cursor,
                item: Some(match item {
                    WatchItem::Change(c) => pb::watch_playbook_runs_response::Item::Change(*c),
                    WatchItem::SnapshotComplete(n) => {
                        pb::watch_playbook_runs_response::Item::SnapshotComplete(
                            pb::SnapshotComplete { item_count: n },
                        )
                    }
                    WatchItem::Heartbeat(h) => pb::watch_playbook_runs_response::Item::Heartbeat(h),
                }),
            })
        });
        Ok(Box::pin(stream))
    }
}

/// The run change stream as the watch follows it.
struct RunFeed {
    store: Arc<dyn Store>,
    tenant: TenantId,
    filter: RunFilter,
    /// Run versions the snapshot showed: changes up to them are known.
    reflected: HashMap<Uuid, i64>,
}

#[tonic::async_trait]
impl watch::Feed for RunFeed {
    const STREAM: &'static str = "playbook_runs";
    type Entry = (pb::RunChangeKind, PlaybookRun, Option<RunStatus>);
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
            .changes_after(self.tenant, RUNS_STREAM, after, limit)
            .await?;
        changes
            .into_iter()
            .map(|c| {
                let bad = |e: serde_json::Error| {
                    AppError::Internal(
                        anyhow::Error::new(e).context("failed to decode a logged run change"),
                    )
                };
                let run: PlaybookRun =
                    serde_json::from_value(c.payload["run"].clone()).map_err(bad)?;
                let previous: Option<RunStatus> =
                    serde_json::from_value(c.payload["previous_status"].clone()).map_err(bad)?;
                let kind = if c.kind == "created" {
                    pb::RunChangeKind::Created
                } else {
                    pb::RunChangeKind::Updated
                };
                Ok((c.position, (kind, run, previous)))
            })
            .collect()
    }

    fn message(&self, (kind, run, previous): &Self::Entry) -> Option<Self::Msg> {
        if self
            .reflected
            .get(&run.id)
            .is_some_and(|v| run.version <= *v)
        {
            return None;
        }
        let left = previous.is_some_and(|p| self.filter.matched(run, p));
        (self.filter.matches(run) || left).then(|| {
            (
                String::new(),
                WatchItem::Change(Box::new(pb::PlaybookRunChange {
                    kind: *kind as i32,
                    run: Some(run_to_pb(run)),
                })),
            )
        })
    }

    async fn head(&self) -> AppResult<Option<FeedPosition>> {
        Ok(self.store.changes_head(self.tenant, RUNS_STREAM).await?)
    }

    fn cursor(&self, at: FeedPosition) -> String {
        encode_cursor(RUNS_CURSOR, self.tenant, at)
    }

    fn heartbeat(&self, hb: pb::Heartbeat) -> Self::Msg {
        (String::new(), WatchItem::Heartbeat(hb))
    }

    fn with_cursor(&self, msg: Self::Msg, cursor: String) -> Self::Msg {
        (cursor, msg.1)
    }
}
