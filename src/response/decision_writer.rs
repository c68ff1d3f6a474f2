//! The enforcement list as the playbook engine sees it: BLOCK_IP,
//! DISABLE_ACTOR, REVOKE_SESSIONS and THROTTLE write a decision through a
//! [`DecisionWriter`] (idempotently, keyed by run and step, with the run as
//! origin), and undoing such a step revokes the decision it recorded.
//! [`crate::response::decisions::Decisions`] implements it over the
//! decision list that EnforcementService serves (WatchDecisions,
//! CheckAccess), so a playbook's ban reaches gateways like any other.
//!
//! The decision list knows bans, allows and throttles. REVOKE_SESSIONS
//! writes a ban on the actor for its duration (1 h by default): gateways
//! then refuse the actor's requests, which ends every session it holds;
//! DISABLE_ACTOR is the same ban for longer (24 h by default).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::error::{AppError, AppResult};

/// What a decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionScope {
    /// A source IP address.
    Ip,
    /// An actor (account).
    Actor,
}

/// What gateways do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    /// Refuse every request (an IP) or sign-in (an actor).
    Ban,
    /// Rate-limit.
    Throttle,
    /// End the actor's sessions issued before the decision.
    RevokeSessions,
}

impl DecisionKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ban => "ban",
            Self::Throttle => "throttle",
            Self::RevokeSessions => "revoke_sessions",
        }
    }
}

/// A decision a playbook step asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDecision {
    /// Owner.
    pub tenant: TenantId,
    /// What it is about.
    pub scope: DecisionScope,
    /// The IP address or actor.
    pub value: String,
    /// What gateways do.
    pub kind: DecisionKind,
    /// The run that asked for it (its origin).
    pub origin_run: Uuid,
    /// Why, for people.
    pub reason: String,
    /// How long it lasts.
    pub duration: chrono::Duration,
    /// Requests per minute a throttle allows; 0 for other kinds.
    pub per_minute: u32,
    /// `run:<id>:step:<index>`: a second create with the same key returns the
    /// first decision and writes nothing.
    pub idempotency_key: String,
    /// When it was asked for.
    pub at: DateTime<Utc>,
}

/// A decision written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRef {
    /// Its id (what revoking names).
    pub id: String,
    /// When it lapses.
    pub expires_at: DateTime<Utc>,
}

/// Writes and revokes enforcement decisions.
#[async_trait]
pub trait DecisionWriter: Send + Sync + 'static {
    /// Creates the decision, or returns the one created before with the same
    /// idempotency key.
    async fn create(&self, decision: NewDecision) -> AppResult<DecisionRef>;

    /// Revokes a decision (gateways stop enforcing it); `by` is recorded.
    async fn revoke(&self, tenant: TenantId, id: &str, by: &str, reason: &str) -> AppResult<()>;
}

#[async_trait]
impl DecisionWriter for crate::response::decisions::Decisions {
    async fn create(&self, d: NewDecision) -> AppResult<DecisionRef> {
        use crate::domain::decision as list;
        let (kind, reason) = match d.kind {
            DecisionKind::Ban => (list::DecisionKind::Ban, d.reason),
            DecisionKind::Throttle => (list::DecisionKind::Throttle, d.reason),
            DecisionKind::RevokeSessions => (
                list::DecisionKind::Ban,
                format!("sessions revoked: {}", d.reason),
            ),
        };
        let input = list::DecisionInput {
            scope: Some(match d.scope {
                DecisionScope::Ip => list::DecisionScope::Ip,
                DecisionScope::Actor => list::DecisionScope::Actor,
            }),
            value: d.value,
            kind: Some(kind),
            duration_seconds: d.duration.num_seconds().max(1) as u64,
            reason: reason.chars().take(list::MAX_REASON).collect(),
            throttle_per_minute: if kind == list::DecisionKind::Throttle {
                d.per_minute.max(1)
            } else {
                0
            },
            idempotency_key: d.idempotency_key,
        };
        let new = list::NewDecision::parse(&input, list::Origin::run(d.origin_run), "params.")
            .map_err(AppError::InvalidArgument)?;
        let by = "playbook";
        let created =
            crate::response::decisions::Decisions::create(self, d.tenant, by, new).await?;
        Ok(DecisionRef {
            id: created.decision.id.to_string(),
            expires_at: created.decision.expires_at,
        })
    }

    async fn revoke(&self, tenant: TenantId, id: &str, by: &str, reason: &str) -> AppResult<()> {
        let id = Uuid::parse_str(id).map_err(|_| {
            AppError::Internal(anyhow::anyhow!("a recorded decision id is not a UUID"))
        })?;
        crate::response::decisions::Decisions::revoke(self, tenant, id, by, reason).await?;
        Ok(())
    }
}
