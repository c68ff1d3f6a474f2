//! The enforcement list as the playbook engine sees it: BLOCK_IP,
//! DISABLE_ACTOR, REVOKE_SESSIONS and THROTTLE write a decision through a
//! [`DecisionWriter`] (idempotently, keyed by run and step), and undoing such
//! a step revokes the decision it recorded.
//!
//! TODO(merge `enforce`): the decision list (`EnforcementService`, the
//! decisions table, WatchDecisions, RevokeDecision) is built on the `enforce`
//! branch. Until that branch is merged, the server wires [`NoDecisionList`],
//! so these four actions fail with a plain message and everything else runs.
//! The merge implements [`DecisionWriter`] on the enforcement capability and
//! passes it to `Responder::new` in `server/startup.rs`.

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

/// No decision list in this build (see the module header): the decision
/// actions fail with a message saying so.
pub struct NoDecisionList;

const MISSING: &str = "the enforcement list is not available on this server";

#[async_trait]
impl DecisionWriter for NoDecisionList {
    async fn create(&self, _decision: NewDecision) -> AppResult<DecisionRef> {
        Err(AppError::FailedPrecondition(MISSING.into()))
    }

    async fn revoke(&self, _tenant: TenantId, _id: &str, _by: &str, _reason: &str) -> AppResult<()> {
        Err(AppError::FailedPrecondition(MISSING.into()))
    }
}
