//! What each action does. Every effect is idempotent per (run, step), so a
//! step retried after a crash between doing the effect and recording it does
//! not repeat it:
//!
//! - decisions (BLOCK_IP, DISABLE_ACTOR, REVOKE_SESSIONS, THROTTLE) carry the
//!   idempotency key `run:<id>:step:<index>`: the enforcement list returns
//!   the decision created under that key instead of a second one;
//! - incident notes and status changes are conditional writes on the
//!   incident: the timeline entry they add has an id derived from the key,
//!   and the save is at the version read, so an entry already there means
//!   the effect happened (and two writers cannot both add it);
//! - notifications carry `Idempotency-Key: run:<id>:step:<index>`, the same
//!   on every attempt, and the attempt is recorded before it is sent: a
//!   receiver that got it (and saw the sender die before recording the
//!   answer) recognises the repeat. Delivery is at least once, effect once.

use chrono::Utc;
use secrecy::ExposeSecret;
use uuid::Uuid;

use crate::domain::incident::{IncidentStatus, TimelineKind};
use crate::domain::playbook::{
    ActionKind, DEFAULT_PER_MINUTE, Inverse, PlaybookRun, derived_id, parse_incident_status,
};
use crate::error::AppError;
use crate::response::Responder;
use crate::response::decision_writer::{DecisionKind, DecisionScope, NewDecision};
use crate::response::notify::Post;
use crate::storage::StoreError;

/// Attempts of an incident write against concurrent changes.
const INCIDENT_ATTEMPTS: usize = 8;

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// For people.
    pub message: String,
    /// What undoes it, if anything.
    pub inverse: Option<Inverse>,
    /// Whether there was nothing to do (a notification with no URL anywhere).
    pub skipped: bool,
}

/// Why a step attempt failed (the message never carries internal details).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionError {
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// What happened.
    pub message: String,
}

impl ActionError {
    fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }
}

/// A capability error as a step failure: internal causes are logged and
/// summarised; the rest keep their message.
fn from_app(e: AppError, run: &PlaybookRun, index: usize) -> ActionError {
    match e {
        AppError::Internal(cause) => {
            tracing::error!(tenant_id = %run.tenant_id, run_id = %run.id, step = index, error = ?cause, "playbook step failed internally");
            ActionError {
                retryable: true,
                message: "internal error (see the server log)".into(),
            }
        }
        AppError::Unavailable { message, .. } => ActionError {
            retryable: true,
            message,
        },
        AppError::NotFound(m) => ActionError::permanent(format!("not found: {m}")),
        AppError::FailedPrecondition(m)
        | AppError::PermissionDenied(m)
        | AppError::AlreadyExists(m)
        | AppError::Aborted(m) => ActionError::permanent(m),
        other => ActionError::permanent(other.to_string()),
    }
}

fn store_error(e: StoreError, run: &PlaybookRun, index: usize) -> ActionError {
    from_app(e.into(), run, index)
}

/// Who incident changes are recorded as: the run.
pub fn run_actor(run: &PlaybookRun) -> String {
    format!("playbook-run:{}", run.id)
}

impl Responder {
    /// Performs step `index` of `run` once.
    pub async fn execute_step(
        &self,
        run: &PlaybookRun,
        index: usize,
    ) -> Result<Effect, ActionError> {
        let step = &run.steps[index];
        match step.action {
            ActionKind::BlockIp
            | ActionKind::DisableActor
            | ActionKind::RevokeSessions
            | ActionKind::Throttle => self.decide(run, index).await,
            ActionKind::AddIncidentNote | ActionKind::SetIncidentStatus => {
                self.change_incident(run, index).await
            }
            ActionKind::NotifyWebhook => self.notify(run, index).await,
        }
    }

    async fn decide(&self, run: &PlaybookRun, index: usize) -> Result<Effect, ActionError> {
        let step = &run.steps[index];
        let param = |k: &str| step.params.get(k).cloned();
        let (scope, value, kind) = match step.action {
            ActionKind::BlockIp => (DecisionScope::Ip, param("ip"), DecisionKind::Ban),
            ActionKind::DisableActor => (DecisionScope::Actor, param("actor"), DecisionKind::Ban),
            ActionKind::RevokeSessions => (
                DecisionScope::Actor,
                param("actor"),
                DecisionKind::RevokeSessions,
            ),
            _ => match param("ip") {
                Some(ip) => (DecisionScope::Ip, Some(ip), DecisionKind::Throttle),
                None => (DecisionScope::Actor, param("actor"), DecisionKind::Throttle),
            },
        };
        let value = value.ok_or_else(|| ActionError::permanent("the step names no target"))?;
        let reason = param("reason").unwrap_or_else(|| {
            format!(
                "playbook `{}` run {} step `{}`",
                run.playbook_name, run.id, step.name
            )
        });
        let duration = step.duration();
        let decision = self
            .decisions
            .create(NewDecision {
                tenant: run.tenant_id,
                scope,
                value: value.clone(),
                kind,
                origin_run: run.id,
                reason,
                duration,
                per_minute: param("per_minute")
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(DEFAULT_PER_MINUTE),
                idempotency_key: run.effect_key(index),
                at: Utc::now(),
            })
            .await
            .map_err(|e| from_app(e, run, index))?;
        let what = match (kind, scope) {
            (DecisionKind::Ban, DecisionScope::Ip) => format!("banned {value}"),
            (DecisionKind::Ban, DecisionScope::Actor) => format!("disabled {value}"),
            (DecisionKind::RevokeSessions, _) => format!("revoked the sessions of {value}"),
            (DecisionKind::Throttle, _) => format!("throttled {value}"),
        };
        Ok(Effect {
            message: format!(
                "{what} until {} (decision {})",
                decision
                    .expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                decision.id
            ),
            inverse: Some(Inverse {
                decision_id: decision.id.clone(),
                description: format!("{what} (decision {})", decision.id),
            }),
            skipped: false,
        })
    }

    async fn change_incident(
        &self,
        run: &PlaybookRun,
        index: usize,
    ) -> Result<Effect, ActionError> {
        let step = &run.steps[index];
        let incident_id = run
            .incident_id
            .ok_or_else(|| ActionError::permanent("the run has no incident"))?;
        let entry_id = derived_id(&run.effect_key(index));
        let actor = run_actor(run);
        for _ in 0..INCIDENT_ATTEMPTS {
            let mut inc = self
                .store
                .get_incident(run.tenant_id, incident_id)
                .await
                .map_err(|e| store_error(e, run, index))?;
            if inc.timeline.iter().any(|e| e.id == entry_id) {
                return Ok(Effect {
                    message: "already recorded on the incident (by an earlier attempt)".into(),
                    inverse: None,
                    skipped: false,
                });
            }
            let now = Utc::now();
            let (mut entry, message) = if step.action == ActionKind::AddIncidentNote {
                let text = step.params.get("text").cloned().unwrap_or_default();
                let entry = inc.record(
                    &actor,
                    TimelineKind::NoteAdded,
                    format!("note added by playbook `{}`", run.playbook_name),
                    text,
                    now,
                );
                (entry, "note added to the incident".to_owned())
            } else {
                let name = step.params.get("status").map(String::as_str).unwrap_or("");
                let to = parse_incident_status(name)
                    .ok_or_else(|| ActionError::permanent(format!("unknown status `{name}`")))?;
                if inc.status == to {
                    return Ok(Effect {
                        message: format!("the incident is {name} already"),
                        inverse: None,
                        skipped: false,
                    });
                }
                if !inc.status.can_move_to(to) {
                    return Err(ActionError::permanent(format!(
                        "cannot move the incident from {:?} to {to:?}",
                        inc.status
                    )));
                }
                let from = inc.status;
                inc.status = to;
                if to == IncidentStatus::Resolved {
                    inc.resolved_at = Some(now);
                }
                let entry = inc.record(
                    &actor,
                    TimelineKind::StatusChanged,
                    format!(
                        "status {from:?} → {to:?} (playbook `{}`)",
                        run.playbook_name
                    ),
                    format!("{to:?}"),
                    now,
                );
                (entry, format!("incident status set to {name}"))
            };
            entry.id = entry_id;
            if let Some(last) = inc.timeline.last_mut() {
                last.id = entry_id;
            }
            match self.store.update_incident(&inc, &entry, &[]).await {
                Ok(_) => {
                    self.changes.notify(run.tenant_id);
                    return Ok(Effect {
                        message,
                        inverse: None,
                        skipped: false,
                    });
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(store_error(e, run, index)),
            }
        }
        Err(ActionError {
            retryable: true,
            message: "the incident kept changing concurrently".into(),
        })
    }

    async fn notify(&self, run: &PlaybookRun, index: usize) -> Result<Effect, ActionError> {
        let step = &run.steps[index];
        let (settings, _) = self
            .notification_settings(run.tenant_id)
            .await
            .map_err(|e| from_app(e, run, index))?;
        let url = match step.params.get("url").filter(|u| !u.is_empty()) {
            Some(u) => u.clone(),
            None if !settings.url.is_empty() => settings.url.clone(),
            None => {
                return Ok(Effect {
                    message: "not sent: the step names no URL and the tenant has no \
                              notification URL (PlaybookService.UpdateNotificationSettings)"
                        .into(),
                    inverse: None,
                    skipped: true,
                });
            }
        };
        let (_, secret) = self
            .signing_secret(run.tenant_id)
            .await
            .map_err(|e| from_app(e, run, index))?;
        let incident = match run.incident_id {
            Some(id) => self.store.get_incident(run.tenant_id, id).await.ok(),
            None => None,
        };
        let key = run.effect_key(index);
        let body = serde_json::json!({
            "type": "picket.playbook.notification",
            "idempotency_key": key,
            "tenant_id": run.tenant_id.to_string(),
            "run_id": run.id.to_string(),
            "playbook": { "id": run.playbook_id.to_string(), "name": run.playbook_name },
            "step": step.name,
            "message": step.params.get("message").cloned().unwrap_or_default(),
            "incident": incident.map(|i| serde_json::json!({
                "id": i.id.to_string(),
                "title": i.title,
                "status": format!("{:?}", i.status).to_lowercase(),
                "severity": format!("{:?}", i.severity).to_lowercase(),
            })),
            "alert_id": run.alert_id.map(|a| a.to_string()),
            "requested_by": run.requested_by,
            "approved_by": run.approvals.iter().filter(|a| a.approved).map(|a| a.decided_by.clone()).collect::<Vec<_>>(),
            "results": run.results[..index].iter().map(|r| serde_json::json!({
                "step": r.step, "message": r.message,
            })).collect::<Vec<_>>(),
            "sent_at": Utc::now().to_rfc3339(),
        });
        let body = serde_json::to_vec(&body).expect("JSON serializes");
        let signature = crate::webhooks::signature_header(
            secret.expose_secret().as_bytes(),
            Utc::now().timestamp(),
            &body,
        );
        let outcome = self
            .notifier
            .post(Post {
                url: &url,
                headers: vec![
                    ("x-picket-signature", signature),
                    ("idempotency-key", key.clone()),
                    ("x-picket-delivery", key),
                ],
                body,
            })
            .await;
        let label = match &outcome {
            Ok(_) => "delivered",
            Err(e) if e.retryable => "failed",
            Err(_) => "refused",
        };
        metrics::counter!("picket_playbook_notify_attempts_total", "outcome" => label).increment(1);
        match outcome {
            Ok(status) => Ok(Effect {
                message: format!("notification delivered ({status})"),
                inverse: None,
                skipped: false,
            }),
            Err(e) => Err(ActionError {
                retryable: e.retryable,
                message: e.message,
            }),
        }
    }
}

/// The idempotency key as an id, for tests that look for a step's entry.
pub fn entry_id(run: Uuid, index: usize) -> Uuid {
    derived_id(&format!("run:{run}:step:{index}"))
}
