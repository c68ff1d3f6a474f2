//! Response: what Picket does about threats. Enforcement decisions (bans,
//! allows and throttles on IPs, ranges and actors) that gateways consult
//! live ([`decisions`] to make and revoke them, [`enforcer`] for the
//! in-memory index behind CheckAccess and WatchDecisions, [`expiry`] for the
//! task that applies expiries and compacts the log).
//!
//! Response playbooks: definitions (the tenant's own, the built-in pack and
//! `--playbooks-dir`), runs and their approval state machine, the engine
//! that executes them, automatic runs for new or escalated incidents, and
//! the tenant's notification settings ([`Responder`], shared by
//! `PlaybookService` and the process's background tasks):
//!
//! - `pack.rs`: the shared playbooks (built-in pack + directory).
//! - `engine.rs`: workers that lease runnable runs and execute their steps;
//!   the expiry of approval deadlines.
//! - `actions.rs`: what each action does, idempotently per (run, step).
//! - `notify.rs`: signed outbound notifications to checked addresses.
//! - `decision_writer.rs`: the enforcement list as the engine sees it
//!   (implemented by [`decisions::Decisions`]).
//! - `triggers.rs`: automatic runs.
//!
//! **Every change to a run is a save at the version read**, committed with
//! its change-log entry (`PlaybookStore::save_run`); a concurrent change
//! makes the save fail and the operation is redone on fresh state. So 50
//! concurrent approvals of one run move it to APPROVED exactly once, and
//! the worker that then claims it is the only one that executes it.

pub mod actions;
pub mod decision_writer;
pub mod decisions;
pub mod enforcer;
pub mod engine;
pub mod expiry;
pub mod notify;
pub mod pack;
pub mod triggers;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::domain::playbook::{
    NotificationSettings, Origin, Playbook, PlaybookDef, PlaybookRun, RunQuery, RunRefusal,
    RunStatus, TemplateContext,
};
use crate::domain::{FieldViolation, TenantId};
use crate::error::{AppError, AppResult};
use crate::ingest::signal::Signal;
use crate::response::decision_writer::DecisionWriter;
use crate::response::notify::Notifier;
use crate::storage::{Store, StoreError};
use crate::webhooks::SecretBox;

/// Attempts of a run change before giving up on concurrent changes.
const ATTEMPTS: usize = 16;
/// Most playbooks a tenant may define (triggers read them all on every
/// incident change).
pub const MAX_PLAYBOOKS: u32 = 500;
/// Label the notification-secret sealing key is derived under.
pub const NOTIFY_SEALING_LABEL: &str = "picket/notification-secret-sealing/v1";

/// How the engine and triggers run.
#[derive(Debug, Clone)]
pub struct ResponseConfig {
    /// Runs one process executes at once.
    pub workers: usize,
    /// How long a worker's lease on a run lasts (renewed at a third of it).
    pub lease: Duration,
    /// How often workers look for runnable runs and deadlines are checked
    /// without a wake-up.
    pub poll: Duration,
    /// How far back the start-up sweep looks for incidents a trigger missed.
    pub trigger_lookback: chrono::Duration,
}

impl Default for ResponseConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            trigger_lookback: chrono::Duration::hours(1),
        }
    }
}

/// Everything playbooks need: the store, the shared playbooks, the outbound
/// side (decisions, notifications) and the wake-ups.
pub struct Responder {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Built-in and directory playbooks, shared by every tenant.
    pub shared: Vec<Playbook>,
    /// The enforcement list.
    pub decisions: Arc<dyn DecisionWriter>,
    /// Sends notifications.
    pub notifier: Notifier,
    /// Seals tenants' notification secrets.
    pub secrets: SecretBox,
    /// Per-tenant change signal (watch streams, replicas, triggers).
    pub changes: Arc<Signal>,
    /// Wakes the local workers (a run became runnable).
    pub runnable: tokio::sync::Notify,
    /// Engine settings.
    pub config: ResponseConfig,
}

/// Maps a refused run change to the client's error.
pub fn refusal(r: RunRefusal) -> AppError {
    match r {
        RunRefusal::PermissionDenied(m) => AppError::PermissionDenied(m),
        RunRefusal::FailedPrecondition(m) => AppError::FailedPrecondition(m),
        RunRefusal::Expired => {
            AppError::FailedPrecondition("the run expired: its approval deadline passed".into())
        }
    }
}

fn concurrent() -> AppError {
    AppError::Unavailable {
        message: "the run kept changing concurrently; retry".into(),
        retry_after: Duration::from_millis(100),
    }
}

/// Counts a run reaching `status`.
pub(crate) fn count(status: RunStatus) {
    metrics::counter!("picket_playbook_runs_total", "status" => status.as_str()).increment(1);
}

/// Now, in whole microseconds (what both backends keep).
pub(crate) fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// How a run is started.
#[derive(Debug, Clone)]
pub struct StartRun {
    /// The playbook.
    pub playbook_id: Uuid,
    /// The incident it responds to.
    pub incident_id: Option<Uuid>,
    /// The alert it responds to.
    pub alert_id: Option<Uuid>,
    /// Approval deadline from now.
    pub approval_timeout: chrono::Duration,
    /// Who asks (`system` for triggers).
    pub requested_by: String,
}

impl Responder {
    /// A responder over `store`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        shared: Vec<Playbook>,
        decisions: Arc<dyn DecisionWriter>,
        notifier: Notifier,
        secrets: SecretBox,
        changes: Arc<Signal>,
        config: ResponseConfig,
    ) -> Self {
        Self {
            store,
            shared,
            decisions,
            notifier,
            secrets,
            changes,
            runnable: tokio::sync::Notify::new(),
            config,
        }
    }

    fn shared_by_id(&self, id: Uuid) -> Option<&Playbook> {
        self.shared.iter().find(|p| p.id == id)
    }

    /// A playbook by id: the tenant's or a shared one.
    pub async fn playbook(&self, tenant: TenantId, id: Uuid) -> AppResult<Playbook> {
        if let Some(p) = self.shared_by_id(id) {
            return Ok(p.clone());
        }
        Ok(self.store.get_playbook(tenant, id).await?)
    }

    /// Every tenant playbook (all pages).
    async fn tenant_playbooks(&self, tenant: TenantId) -> AppResult<Vec<Playbook>> {
        let mut all: Vec<Playbook> = Vec::new();
        loop {
            let after = all.last().map(|p| p.def.name.clone());
            let page = self
                .store
                .list_playbooks(tenant, after.as_deref(), 500)
                .await?;
            let done = page.len() < 500;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// The playbooks in force for a tenant, by name: its own, and the shared
    /// ones none of its own replaces.
    pub async fn in_force(&self, tenant: TenantId) -> AppResult<Vec<Playbook>> {
        let mut all = self.tenant_playbooks(tenant).await?;
        for s in &self.shared {
            if !all.iter().any(|p| p.def.name == s.def.name) {
                all.push(s.clone());
            }
        }
        all.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        Ok(all)
    }

    /// A page of [`Responder::in_force`]: names strictly after `after`.
    pub async fn list_playbooks(
        &self,
        tenant: TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> AppResult<Vec<Playbook>> {
        let mut own = self.store.list_playbooks(tenant, after, limit).await?;
        let last_own = (own.len() as u32 == limit).then(|| own.last().map(|p| p.def.name.clone()));
        for s in &self.shared {
            let name = s.def.name.as_str();
            if after.is_some_and(|a| name <= a) {
                continue;
            }
            // Beyond a full page of the tenant's own, the next page decides.
            if let Some(Some(last)) = &last_own
                && name > last.as_str()
            {
                continue;
            }
            if own.iter().any(|p| p.def.name == name) {
                continue;
            }
            // A tenant playbook of that name on a later page still replaces it.
            if self.store.find_playbook(tenant, name).await?.is_none() {
                own.push(s.clone());
            }
        }
        own.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        own.truncate(limit as usize);
        Ok(own)
    }

    /// Creates a tenant playbook.
    pub async fn create_playbook(&self, tenant: TenantId, def: PlaybookDef) -> AppResult<Playbook> {
        check_def(&def)?;
        if self
            .store
            .list_playbooks(tenant, None, MAX_PLAYBOOKS)
            .await?
            .len() as u32
            >= MAX_PLAYBOOKS
        {
            return Err(AppError::FailedPrecondition(format!(
                "the tenant has {MAX_PLAYBOOKS} playbooks, the most allowed; delete one first"
            )));
        }
        let now = now_micros();
        let p = Playbook {
            tenant_id: Some(tenant),
            id: Uuid::now_v7(),
            origin: Origin::Tenant,
            version: 1,
            created_at: now,
            updated_at: now,
            def,
        };
        let p = self.store.create_playbook(&p).await.map_err(|e| match e {
            StoreError::Conflict(_) => {
                AppError::AlreadyExists(format!("the tenant has a playbook named `{}`", p.def.name))
            }
            e => e.into(),
        })?;
        tracing::info!(tenant_id = %tenant, playbook_id = %p.id, playbook = %p.def.name, "playbook created");
        Ok(p)
    }

    /// Replaces a tenant playbook's definition if it is at `version`.
    pub async fn update_playbook(
        &self,
        tenant: TenantId,
        id: Uuid,
        version: i64,
        def: PlaybookDef,
    ) -> AppResult<Playbook> {
        if let Some(s) = self.shared_by_id(id) {
            return Err(shared_read_only(s));
        }
        check_def(&def)?;
        let mut p = self.store.get_playbook(tenant, id).await?;
        if p.version != version {
            return Err(AppError::Aborted(format!(
                "playbook {id} is at version {}, not {version}; read it again",
                p.version
            )));
        }
        p.def = def;
        p.updated_at = now_micros();
        let p = self.store.update_playbook(&p).await.map_err(|e| match e {
            StoreError::Conflict(m) if m.contains("changed concurrently") => {
                AppError::Aborted(format!("playbook {id} changed concurrently; read it again"))
            }
            StoreError::Conflict(_) => {
                AppError::AlreadyExists(format!("the tenant has a playbook named `{}`", p.def.name))
            }
            e => e.into(),
        })?;
        tracing::info!(tenant_id = %tenant, playbook_id = %id, version = p.version, "playbook updated");
        Ok(p)
    }

    /// Deletes a tenant playbook and cancels its unfinished runs; returns how many.
    pub async fn delete_playbook(&self, tenant: TenantId, id: Uuid, by: &str) -> AppResult<u32> {
        if let Some(s) = self.shared_by_id(id) {
            return Err(shared_read_only(s));
        }
        self.store.delete_playbook(tenant, id).await?;
        let mut cancelled = 0;
        loop {
            let runs = self
                .store
                .list_runs(
                    tenant,
                    &RunQuery {
                        playbook_id: Some(id),
                        statuses: vec![
                            RunStatus::PendingApproval,
                            RunStatus::Approved,
                            RunStatus::Running,
                        ],
                        limit: 100,
                        ..Default::default()
                    },
                )
                .await?;
            if runs.is_empty() {
                break;
            }
            for r in runs {
                match self
                    .modify_run(tenant, r.id, |run, now| {
                        run.cancel(by, "its playbook was deleted", now)
                    })
                    .await
                {
                    Ok(_) => cancelled += 1,
                    Err(AppError::FailedPrecondition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        tracing::info!(tenant_id = %tenant, playbook_id = %id, cancelled, "playbook deleted");
        Ok(cancelled)
    }

    /// Starts a run: templates resolved now, PENDING_APPROVAL or APPROVED.
    pub async fn start_run(&self, tenant: TenantId, start: StartRun) -> AppResult<PlaybookRun> {
        let playbook = self.playbook(tenant, start.playbook_id).await?;
        if playbook.tenant_id.is_none() {
            let replaced = self
                .store
                .find_playbook(tenant, &playbook.def.name)
                .await?
                .is_some();
            if replaced {
                return Err(AppError::FailedPrecondition(format!(
                    "the shared playbook `{}` is replaced by the tenant's playbook of that name",
                    playbook.def.name
                )));
            }
        }
        if !playbook.def.enabled {
            return Err(AppError::FailedPrecondition(format!(
                "playbook `{}` is disabled",
                playbook.def.name
            )));
        }
        let (run, resolved) = self.prepare_run(tenant, &playbook, &start).await?;
        if let Err(v) = resolved {
            return Err(AppError::FailedPrecondition(format!(
                "{}: {}",
                v.field, v.description
            )));
        }
        let run = self.store.insert_run(&run).await?;
        self.after_change(&run, None);
        tracing::info!(tenant_id = %tenant, run_id = %run.id, playbook = %run.playbook_name, status = run.status.as_str(), "run requested");
        Ok(run)
    }

    /// Builds a run of `playbook` (not stored). The second value is why its
    /// templates could not be resolved, if they could not (the run then has
    /// no steps).
    pub async fn prepare_run(
        &self,
        tenant: TenantId,
        playbook: &Playbook,
        start: &StartRun,
    ) -> AppResult<(PlaybookRun, Result<(), FieldViolation>)> {
        let alert = match start.alert_id {
            Some(id) => Some(self.store.get_alert(tenant, id).await?),
            None => None,
        };
        let incident_id = start
            .incident_id
            .or_else(|| alert.as_ref().and_then(|a| a.incident_id));
        let incident = match incident_id {
            Some(id) => match self.store.get_incident(tenant, id).await {
                Ok(i) => Some(i),
                Err(StoreError::NotFound(_)) if start.incident_id.is_none() => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let ctx = TemplateContext {
            incident: incident.as_ref(),
            alert: alert.as_ref(),
        };
        let now = now_micros();
        let (steps, resolved) = match crate::domain::playbook::resolve_steps(&playbook.def, &ctx) {
            Ok(steps) => (steps, Ok(())),
            Err(v) => (Vec::new(), Err(v)),
        };
        let run = PlaybookRun::new(
            tenant,
            playbook,
            steps,
            incident.as_ref().map(|i| i.id),
            start.alert_id,
            &start.requested_by,
            start.approval_timeout,
            now,
        );
        Ok((run, resolved))
    }

    /// Wakes what follows a run change: watch streams, replicas, workers.
    pub(crate) fn after_change(&self, run: &PlaybookRun, before: Option<RunStatus>) {
        if before != Some(run.status) {
            count(run.status);
        }
        self.changes.notify(run.tenant_id);
        if run.status == RunStatus::Approved {
            self.runnable.notify_one();
        }
    }

    /// Applies `change` to the run's fresh state and saves it, redoing it on
    /// concurrent changes. A change refused because the deadline passed
    /// expires the run (and is refused).
    pub async fn modify_run(
        &self,
        tenant: TenantId,
        id: Uuid,
        mut change: impl FnMut(&mut PlaybookRun, DateTime<Utc>) -> Result<(), RunRefusal>,
    ) -> AppResult<PlaybookRun> {
        for _ in 0..ATTEMPTS {
            let mut run = self.store.get_run(tenant, id).await?;
            let before = run.status;
            let now = now_micros();
            let refused = match change(&mut run, now) {
                Ok(()) => None,
                Err(RunRefusal::Expired) => {
                    run = self.store.get_run(tenant, id).await?;
                    if !run.expire(now) {
                        continue;
                    }
                    Some(RunRefusal::Expired)
                }
                Err(r) => return Err(refusal(r)),
            };
            match self.store.save_run(&run, before, None).await {
                Ok(saved) => {
                    self.after_change(&saved, Some(before));
                    return match refused {
                        Some(r) => Err(refusal(r)),
                        None => Ok(saved),
                    };
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(concurrent())
    }

    /// Approves a run as `by`.
    pub async fn approve(
        &self,
        tenant: TenantId,
        id: Uuid,
        by: &str,
        comment: &str,
        digest: &str,
    ) -> AppResult<PlaybookRun> {
        let run = self
            .modify_run(tenant, id, |run, now| {
                run.approve(by, comment, Some(digest), now)
            })
            .await?;
        tracing::info!(tenant_id = %tenant, run_id = %id, by, status = run.status.as_str(), "run approved");
        Ok(run)
    }

    /// Rejects a run as `by`.
    pub async fn reject(
        &self,
        tenant: TenantId,
        id: Uuid,
        by: &str,
        comment: &str,
    ) -> AppResult<PlaybookRun> {
        let run = self
            .modify_run(tenant, id, |run, now| run.reject(by, comment, now))
            .await?;
        tracing::info!(tenant_id = %tenant, run_id = %id, by, "run rejected");
        Ok(run)
    }

    /// Cancels a run as `by`.
    pub async fn cancel(
        &self,
        tenant: TenantId,
        id: Uuid,
        by: &str,
        reason: &str,
    ) -> AppResult<PlaybookRun> {
        let run = self
            .modify_run(tenant, id, |run, now| run.cancel(by, reason, now))
            .await?;
        tracing::info!(tenant_id = %tenant, run_id = %id, by, "run cancelled");
        Ok(run)
    }

    /// Undoes step `step` of a run: revokes the decision it recorded, then
    /// records who undid it.
    pub async fn undo(
        &self,
        tenant: TenantId,
        id: Uuid,
        step: &str,
        by: &str,
        reason: &str,
    ) -> AppResult<PlaybookRun> {
        let run = self.store.get_run(tenant, id).await?;
        let index = run
            .results
            .iter()
            .position(|r| r.step == step)
            .ok_or_else(|| AppError::invalid("step", format!("the run has no step `{step}`")))?;
        // Check first (nothing is revoked for a step that cannot be undone).
        let inverse = run
            .clone()
            .undo(index, by, reason, now_micros())
            .map_err(refusal)?;
        let why = if reason.is_empty() {
            format!("undo of step `{step}` of run {id}")
        } else {
            reason.to_owned()
        };
        self.decisions
            .revoke(tenant, &inverse.decision_id, by, &why)
            .await?;
        let run = self
            .modify_run(tenant, id, |run, now| {
                run.undo(index, by, reason, now).map(|_| ())
            })
            .await?;
        metrics::counter!("picket_playbook_undos_total").increment(1);
        tracing::info!(tenant_id = %tenant, run_id = %id, step, by, decision = %inverse.decision_id, "step undone");
        Ok(run)
    }

    /// Expires every run past its approval deadline; returns how many.
    pub async fn expire_due(&self) -> AppResult<usize> {
        let now = now_micros();
        let due = self.store.due_runs(now, 100).await?;
        let mut expired = 0;
        for (tenant, id) in due {
            for _ in 0..ATTEMPTS {
                let mut run = self.store.get_run(tenant, id).await?;
                if !run.expire(now_micros()) {
                    break;
                }
                match self
                    .store
                    .save_run(&run, RunStatus::PendingApproval, None)
                    .await
                {
                    Ok(saved) => {
                        self.after_change(&saved, Some(RunStatus::PendingApproval));
                        tracing::info!(tenant_id = %tenant, run_id = %id, "run expired");
                        expired += 1;
                        break;
                    }
                    Err(StoreError::Conflict(_)) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(expired)
    }

    /// The tenant's notification settings and secret (opened), if any.
    pub async fn notification_settings(
        &self,
        tenant: TenantId,
    ) -> AppResult<(NotificationSettings, Option<SecretString>)> {
        let settings = self
            .store
            .get_notification_settings(tenant)
            .await?
            .unwrap_or_else(|| NotificationSettings {
                tenant_id: tenant,
                url: String::new(),
                sealed_secret: None,
                secret_rotated_at: None,
                updated_at: now_micros(),
            });
        let secret = match &settings.sealed_secret {
            Some(sealed) => Some(self.open_secret(tenant, sealed)?),
            None => None,
        };
        Ok((settings, secret))
    }

    fn open_secret(&self, tenant: TenantId, sealed: &[u8]) -> AppResult<SecretString> {
        self.secrets.open(tenant.0, sealed).ok_or_else(|| {
            AppError::Internal(anyhow::anyhow!(
                "the tenant's notification secret does not open (was the key pepper changed?)"
            ))
        })
    }

    /// Sets the default notification URL ("" clears it).
    pub async fn set_notification_url(
        &self,
        tenant: TenantId,
        url: &str,
    ) -> AppResult<NotificationSettings> {
        if !url.is_empty() {
            crate::domain::playbook::check_url(url).map_err(|e| AppError::invalid("url", e))?;
        }
        let (mut settings, _) = self.notification_settings(tenant).await?;
        settings.url = url.to_owned();
        settings.updated_at = now_micros();
        self.store.put_notification_settings(&settings).await?;
        tracing::info!(tenant_id = %tenant, "notification URL set");
        Ok(settings)
    }

    /// Replaces the signing secret; returns the settings and the new secret.
    pub async fn rotate_notification_secret(
        &self,
        tenant: TenantId,
    ) -> AppResult<(NotificationSettings, SecretString)> {
        let (mut settings, _) = self.notification_settings(tenant).await?;
        let secret = crate::webhooks::generate_secret();
        let now = now_micros();
        settings.sealed_secret = Some(self.secrets.seal(tenant.0, secret.expose_secret()));
        settings.secret_rotated_at = Some(now);
        settings.updated_at = now;
        self.store.put_notification_settings(&settings).await?;
        tracing::info!(tenant_id = %tenant, "notification secret rotated");
        Ok((settings, secret))
    }

    /// The tenant's signing secret, generated on first use.
    pub async fn signing_secret(
        &self,
        tenant: TenantId,
    ) -> AppResult<(NotificationSettings, SecretString)> {
        let (settings, secret) = self.notification_settings(tenant).await?;
        if let Some(secret) = secret {
            return Ok((settings, secret));
        }
        let fresh = crate::webhooks::generate_secret();
        let sealed = self.secrets.seal(tenant.0, fresh.expose_secret());
        let settings = self
            .store
            .ensure_notification_secret(tenant, &sealed, now_micros())
            .await?;
        let sealed = settings
            .sealed_secret
            .clone()
            .ok_or_else(|| AppError::Internal(anyhow::anyhow!("no notification secret stored")))?;
        let secret = self.open_secret(tenant, &sealed)?;
        Ok((settings, secret))
    }
}

fn shared_read_only(p: &Playbook) -> AppError {
    AppError::FailedPrecondition(format!(
        "`{}` is a shared playbook ({}), read-only; create a tenant playbook named `{}` to replace it",
        p.def.name,
        match p.origin {
            Origin::Builtin => "built-in pack",
            _ => "the server's playbooks directory",
        },
        p.def.name
    ))
}

/// Validates a definition for the API (field paths under `playbook.`).
fn check_def(def: &PlaybookDef) -> AppResult<()> {
    let v = def.validate("playbook.");
    if v.is_empty() {
        Ok(())
    } else {
        Err(AppError::InvalidArgument(v))
    }
}
