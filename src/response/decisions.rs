//! Making, revoking and reading enforcement decisions: what EnforcementService
//! and the playbook engine call. A [`Decisions`] handle writes through the
//! store (one transaction per call, see `storage::DecisionStore`), then wakes
//! the tenant's streams and indexes here and on every peer (the change
//! signal), the local expiry task (a new decision may end sooner than
//! anything it waits for), and brings this process's index up to date, so a
//! CheckAccess through this replica sees the write as soon as the call
//! returns.
//!
//! For a playbook step, with `run` its run id and `n` the step number:
//!
//! ```ignore
//! let new = NewDecision::parse(
//!     &DecisionInput {
//!         scope: Some(DecisionScope::Ip),
//!         value: ip,
//!         kind: Some(DecisionKind::Ban),
//!         duration_seconds,
//!         reason: "brute force (playbook)".into(),
//!         idempotency_key: format!("run:{run}:step:{n}"),
//!         ..Default::default()
//!     },
//!     Origin::run(run),
//!     "params.",
//! )?;
//! let created = decisions.create(tenant, "system", new).await?; // safe to repeat
//! decisions.revoke(tenant, created.decision.id, "system", "run cancelled").await?;
//! ```

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::decision::{Decision, DecisionQuery, Effective, NewDecision, TargetState};
use crate::error::AppResult;
use crate::ingest::signal::Signal;
use crate::response::enforcer::Enforcer;
use crate::storage::Store;

/// Most decisions one call may create.
pub const MAX_BATCH: usize = 1000;
/// Default cap on a tenant's decisions in force (`--decisions-max-active`).
pub const DEFAULT_MAX_ACTIVE: u64 = 100_000;
/// How long ended (expired or revoked) decisions are kept, with their
/// idempotency keys.
pub const HISTORY: chrono::Duration = chrono::Duration::days(30);

/// What creating one decision did.
#[derive(Debug, Clone)]
pub struct Created {
    /// The decision (the earlier one when its idempotency key matched).
    pub decision: Decision,
    /// False when an idempotency key matched an existing decision.
    pub created: bool,
    /// The tenant's revision after the call.
    pub revision: u64,
    /// The target's effective state after the call.
    pub effective: Option<Effective>,
}

/// What creating several decisions did.
#[derive(Debug, Clone)]
pub struct CreatedAll {
    /// Each decision with whether it was created, in request order.
    pub decisions: Vec<(Decision, bool)>,
    /// The tenant's revision after the call.
    pub revision: u64,
}

/// What revoking a decision did.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// The decision after the call.
    pub decision: Decision,
    /// The tenant's revision after the call.
    pub revision: u64,
    /// The target's effective state after the call.
    pub effective: Option<Effective>,
}

/// Makes, revokes and reads decisions (cheap to clone).
#[derive(Clone)]
pub struct Decisions {
    /// The store.
    store: Arc<dyn Store>,
    /// Per-tenant change signals (streams and indexes wait on them; the
    /// replica bridge relays them).
    signal: Arc<Signal>,
    /// This process's indexes.
    enforcer: Arc<Enforcer>,
    /// Most decisions in force per tenant.
    max_active: u64,
    /// Wakes the local expiry task.
    expiry: Arc<Notify>,
}

impl Decisions {
    /// A handle over `store` whose writes wake `signal` and keep `enforcer` current.
    pub fn new(
        store: Arc<dyn Store>,
        signal: Arc<Signal>,
        enforcer: Arc<Enforcer>,
        max_active: u64,
    ) -> Self {
        Self {
            store,
            signal,
            enforcer,
            max_active,
            expiry: Arc::new(Notify::new()),
        }
    }

    /// The indexes behind CheckAccess and WatchDecisions.
    pub fn enforcer(&self) -> &Arc<Enforcer> {
        &self.enforcer
    }

    /// What wakes the expiry task (see [`crate::response::expiry::run`]).
    pub fn expiry_wake(&self) -> Arc<Notify> {
        self.expiry.clone()
    }

    /// Creates one decision made by `by` (an API key id, `operator` or
    /// `system`). With an idempotency key it is safe to repeat.
    pub async fn create(&self, tenant: TenantId, by: &str, new: NewDecision) -> AppResult<Created> {
        let now = Utc::now();
        let decision = new.into_decision(tenant, by, now);
        let write = self
            .store
            .create_decisions(tenant, vec![decision], self.max_active, now)
            .await?;
        let (decision, created) = write
            .result
            .into_iter()
            .next()
            .expect("one decision in, one out");
        if created {
            self.written(tenant, "create").await;
        }
        Ok(Created {
            effective: effective_of(&write.targets, &decision),
            decision,
            created,
            revision: write.head.revision,
        })
    }

    /// Creates up to [`MAX_BATCH`] decisions in one transaction, in order.
    pub async fn create_all(
        &self,
        tenant: TenantId,
        by: &str,
        new: Vec<NewDecision>,
    ) -> AppResult<CreatedAll> {
        debug_assert!(new.len() <= MAX_BATCH);
        let now = Utc::now();
        let decisions = new
            .into_iter()
            .map(|n| n.into_decision(tenant, by, now))
            .collect();
        let write = self
            .store
            .create_decisions(tenant, decisions, self.max_active, now)
            .await?;
        if write.result.iter().any(|(_, created)| *created) {
            self.written(tenant, "create").await;
        }
        Ok(CreatedAll {
            decisions: write.result,
            revision: write.head.revision,
        })
    }

    /// Revokes decision `id`, recording `by` and `reason`. Revoking a
    /// revoked or expired decision changes nothing.
    pub async fn revoke(
        &self,
        tenant: TenantId,
        id: Uuid,
        by: &str,
        reason: &str,
    ) -> AppResult<Revoked> {
        let now = Utc::now();
        let write = self
            .store
            .revoke_decision(tenant, id, by, reason, now)
            .await?;
        if write.result.revoked_at == Some(now) {
            self.written(tenant, "revoke").await;
        }
        Ok(Revoked {
            effective: effective_of(&write.targets, &write.result),
            decision: write.result,
            revision: write.head.revision,
        })
    }

    /// One decision.
    pub async fn get(&self, tenant: TenantId, id: Uuid) -> AppResult<Decision> {
        Ok(self.store.get_decision(tenant, id).await?)
    }

    /// Decisions matching `query`, newest first.
    pub async fn list(&self, tenant: TenantId, query: &DecisionQuery) -> AppResult<Vec<Decision>> {
        Ok(self.store.list_decisions(tenant, query).await?)
    }

    /// Drops the tenant's log entries written before `log_before` and the
    /// decisions that ended before `history_before` (the expiry task does
    /// this hourly; tests call it to force a re-snapshot).
    pub async fn compact(
        &self,
        tenant: TenantId,
        log_before: DateTime<Utc>,
        history_before: DateTime<Utc>,
    ) -> AppResult<u64> {
        let head = self
            .store
            .compact_decisions(tenant, log_before, history_before)
            .await?;
        Ok(head.floor)
    }

    /// After a committed write: wake streams and indexes (here and on the
    /// peers) and the expiry task, and update this process's index.
    async fn written(&self, tenant: TenantId, op: &'static str) {
        metrics::counter!("picket_decision_writes_total", "op" => op).increment(1);
        self.signal.notify(tenant);
        self.expiry.notify_one();
        if let Err(e) = self.enforcer.caught_up(tenant).await {
            // The follower retries on its next wake-up or poll.
            tracing::warn!(tenant = %tenant, error = %e, "decision index could not catch up after a write");
        }
    }
}

/// The effective state of `decision`'s target among `targets`.
fn effective_of(targets: &[TargetState], decision: &Decision) -> Option<Effective> {
    targets
        .iter()
        .find(|t| t.target == decision.target)
        .and_then(|t| t.effective.clone())
}
