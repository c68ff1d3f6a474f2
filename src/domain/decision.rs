//! Enforcement decisions: bans, allows and throttles on IP addresses, CIDR
//! ranges and actors, and how the decisions on one target resolve into its
//! one effective state.
//!
//! Resolution (the same everywhere: the write path, the expiry task, the
//! in-memory index behind CheckAccess): among the decisions of a target that
//! are in force at a moment, `allow` beats `ban` and `ban` beats `throttle`;
//! among decisions of the winning type, the one ending last decides (ties:
//! the larger id), except that for throttles the lowest rate decides first.
//! So removing or expiring one of several bans never unblocks while another
//! is in force, and a short ban arriving after a long one never shortens it.

use std::net::IpAddr;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{FieldViolation, TenantId};

/// Longest actor value, in bytes (as events' actor).
pub const MAX_ACTOR: usize = 1024;
/// Longest reason (creation or revocation), in bytes.
pub const MAX_REASON: usize = 1024;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Longest origin id (API key, run or alert id), in bytes.
pub const MAX_ORIGIN_ID: usize = 128;
/// Longest decision, in seconds (ten years).
pub const MAX_DURATION_SECONDS: u64 = 315_360_000;
/// Duration of a decision created without one, in seconds (four hours).
pub const DEFAULT_DURATION_SECONDS: u64 = 14_400;
/// Highest throttle rate, in requests per minute.
pub const MAX_THROTTLE_PER_MINUTE: u32 = 1_000_000;
/// Most decisions in force on one target at once.
pub const MAX_DECISIONS_PER_TARGET: usize = 100;
/// Narrowest IPv4 prefix length a CIDR decision may have (wider ranges would
/// lock out a large part of the Internet by mistake).
pub const MIN_IPV4_PREFIX: u8 = 8;
/// Narrowest IPv6 prefix length a CIDR decision may have.
pub const MIN_IPV6_PREFIX: u8 = 16;

/// What a decision applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionScope {
    /// One IP address (canonical text).
    Ip,
    /// A CIDR range (canonical `network/prefix`).
    Cidr,
    /// An actor, compared exactly.
    Actor,
}

impl DecisionScope {
    /// All scopes.
    pub const ALL: [Self; 3] = [Self::Ip, Self::Cidr, Self::Actor];

    /// The stored (and command-line) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Cidr => "cidr",
            Self::Actor => "actor",
        }
    }

    /// Parses a stored or command-line name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// What a decision does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionKind {
    /// Deny.
    Ban,
    /// Never deny or throttle on this dimension.
    Allow,
    /// Limit the request rate.
    Throttle,
}

impl DecisionKind {
    /// All kinds.
    pub const ALL: [Self; 3] = [Self::Ban, Self::Allow, Self::Throttle];

    /// The stored (and command-line) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ban => "ban",
            Self::Allow => "allow",
            Self::Throttle => "throttle",
        }
    }

    /// Parses a stored or command-line name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Precedence: a higher one wins on a target.
    pub fn precedence(self) -> u8 {
        match self {
            Self::Allow => 3,
            Self::Ban => 2,
            Self::Throttle => 1,
        }
    }
}

/// A CIDR range: a network address with its host bits zero, and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address.
    pub network: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `network/prefix`; the error names `field`. Host bits must be
    /// zero, the prefix within the limits, and IPv4-mapped IPv6 ranges are
    /// refused (they are written as IPv4).
    pub fn parse(s: &str, field: &str) -> Result<Self, FieldViolation> {
        let bad = |why: String| FieldViolation::new(field, why);
        let (addr, prefix) = s.split_once('/').ok_or_else(|| {
            bad("not a CIDR range (expected network/prefix, e.g. 198.51.100.0/24)".into())
        })?;
        let network: IpAddr = addr
            .parse()
            .map_err(|_| bad(format!("`{addr}` is not an IPv4 or IPv6 address")))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p: &u8| !prefix.starts_with('+') && *p <= max_prefix(network))
            .ok_or_else(|| {
                bad(format!(
                    "`{prefix}` is not a prefix length for this address family"
                ))
            })?;
        if let IpAddr::V6(v6) = network
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(bad(
                "IPv4-mapped IPv6 ranges are not accepted; write the range as IPv4".into(),
            ));
        }
        let min = match network {
            IpAddr::V4(_) => MIN_IPV4_PREFIX,
            IpAddr::V6(_) => MIN_IPV6_PREFIX,
        };
        if prefix < min {
            return Err(bad(format!(
                "prefix /{prefix} is too wide: at least /{min} for this address family"
            )));
        }
        let masked = mask(network, prefix);
        if masked != network {
            return Err(bad(format!(
                "host bits are set; the range is {masked}/{prefix}"
            )));
        }
        Ok(Self { network, prefix })
    }

    /// Whether `ip` lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        matches!(
            (self.network, ip),
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
        ) && mask(ip, self.prefix) == self.network
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// The longest prefix of `ip`'s family.
fn max_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `ip` with every bit after the first `prefix` cleared.
pub fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(mask_v4(u32::from(v4), prefix).into()),
        IpAddr::V6(v6) => IpAddr::V6(mask_v6(u128::from(v6), prefix).into()),
    }
}

/// The first `prefix` bits of an IPv4 address as an integer.
pub fn mask_v4(bits: u32, prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p if p >= 32 => bits,
        p => bits & (u32::MAX << (32 - p)),
    }
}

/// The first `prefix` bits of an IPv6 address as an integer.
pub fn mask_v6(bits: u128, prefix: u8) -> u128 {
    match prefix {
        0 => 0,
        p if p >= 128 => bits,
        p => bits & (u128::MAX << (128 - p)),
    }
}

/// What a decision applies to: a scope and a canonical value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Target {
    /// The scope.
    pub scope: DecisionScope,
    /// The canonical IP, range or actor.
    #[serde(default)]
    pub value: String,
}

impl Target {
    /// Validates `value` for `scope` and puts it in canonical form; the error
    /// names `field`.
    pub fn parse(scope: DecisionScope, value: &str, field: &str) -> Result<Self, FieldViolation> {
        let value = match scope {
            DecisionScope::Ip => {
                if value.len() > 64 {
                    return Err(FieldViolation::new(field, "not an IPv4 or IPv6 address"));
                }
                crate::domain::event::parse_ip(value, field)?
                    .ok_or_else(|| FieldViolation::new(field, "required"))?
                    .to_string()
            }
            DecisionScope::Cidr => {
                if value.len() > 64 {
                    return Err(FieldViolation::new(field, "not a CIDR range"));
                }
                Cidr::parse(value.trim(), field)?.to_string()
            }
            DecisionScope::Actor => {
                check_text(value, MAX_ACTOR, field)?;
                value.to_owned()
            }
        };
        Ok(Self { scope, value })
    }

    /// The key the store and the index know the target by: `scope:value`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.scope.as_str(), self.value)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.scope.as_str(), self.value)
    }
}

/// Checks a required text: 1..=`max` bytes, no control characters; the
/// error names `field`.
fn check_text(s: &str, max: usize, field: &str) -> Result<(), FieldViolation> {
    if s.is_empty() {
        return Err(FieldViolation::new(field, "required"));
    }
    check_optional_text(s, max, field)
}

/// Checks an optional text: at most `max` bytes, no control characters.
fn check_optional_text(s: &str, max: usize, field: &str) -> Result<(), FieldViolation> {
    if s.len() > max {
        return Err(FieldViolation::new(field, format!("at most {max} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "control characters are not allowed",
        ));
    }
    Ok(())
}

/// What made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OriginKind {
    /// A person with an API key; the id is the key id.
    Manual,
    /// A playbook run; the id is the run id.
    PlaybookRun,
    /// A person responding to an alert; the id is the alert id.
    Alert,
}

/// Where a decision came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// What kind of origin.
    pub kind: OriginKind,
    /// Its id (key, run or alert id).
    #[serde(default)]
    pub id: String,
}

impl Origin {
    /// A playbook run's origin.
    pub fn run(run_id: Uuid) -> Self {
        Self {
            kind: OriginKind::PlaybookRun,
            id: run_id.to_string(),
        }
    }

    /// A manual decision by the API key (or `operator`) `actor`.
    pub fn manual(actor: &str) -> Self {
        Self {
            kind: OriginKind::Manual,
            id: actor.to_owned(),
        }
    }

    /// A decision responding to alert `alert_id`.
    pub fn alert(alert_id: Uuid) -> Self {
        Self {
            kind: OriginKind::Alert,
            id: alert_id.to_string(),
        }
    }
}

/// A decision as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// What it applies to.
    pub target: Target,
    /// What it does.
    pub kind: DecisionKind,
    /// Requests per minute for a throttle; 0 otherwise.
    #[serde(default)]
    pub throttle_per_minute: u32,
    /// Where it came from.
    pub origin: Origin,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Who created it (as recorded in audit trails).
    #[serde(default)]
    pub created_by: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it ends.
    pub expires_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    #[serde(default)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// Who revoked it; empty if not revoked.
    #[serde(default)]
    pub revoked_by: String,
    /// Why it was revoked; empty if not revoked.
    #[serde(default)]
    pub revoke_reason: String,
    /// The idempotency key it was created with.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A decision's lifecycle state at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionState {
    /// In force.
    Active,
    /// Ended by time.
    Expired,
    /// Ended by revocation.
    Revoked,
}

impl Decision {
    /// Its state at `now`.
    pub fn state(&self, now: DateTime<Utc>) -> DecisionState {
        if self.revoked_at.is_some() {
            DecisionState::Revoked
        } else if self.expires_at <= now {
            DecisionState::Expired
        } else {
            DecisionState::Active
        }
    }

    /// Whether it is in force at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.state(now) == DecisionState::Active
    }
}

/// A decision to create, as received: every field unchecked.
#[derive(Debug, Clone, Default)]
pub struct DecisionInput {
    /// The scope (`None` when the client sent none).
    pub scope: Option<DecisionScope>,
    /// The IP, range or actor as sent.
    pub value: String,
    /// The kind (`None` when the client sent none).
    pub kind: Option<DecisionKind>,
    /// Duration in seconds; 0 means [`DEFAULT_DURATION_SECONDS`].
    pub duration_seconds: u64,
    /// Why.
    pub reason: String,
    /// Requests per minute for throttles; 0 otherwise.
    pub throttle_per_minute: u32,
    /// Empty means none.
    pub idempotency_key: String,
}

/// A valid decision to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDecision {
    /// What it applies to.
    pub target: Target,
    /// What it does.
    pub kind: DecisionKind,
    /// Requests per minute for a throttle; 0 otherwise.
    pub throttle_per_minute: u32,
    /// Where it came from.
    pub origin: Origin,
    /// Why.
    pub reason: String,
    /// How long it lasts.
    pub duration: Duration,
    /// Makes creating it safe to repeat.
    pub idempotency_key: Option<String>,
}

impl NewDecision {
    /// Validates `input` made by `origin`; every violation names its field
    /// under `prefix` (e.g. `decisions[2].` or `decision.`).
    pub fn parse(
        input: &DecisionInput,
        origin: Origin,
        prefix: &str,
    ) -> Result<Self, Vec<FieldViolation>> {
        let field = |name: &str| format!("{prefix}{name}");
        let mut violations = Vec::new();
        let kind = input.kind;
        if kind.is_none() {
            violations.push(FieldViolation::new(field("type"), "required"));
        }
        let target = match input.scope {
            None => {
                violations.push(FieldViolation::new(field("scope"), "required"));
                None
            }
            Some(scope) => Target::parse(scope, &input.value, &field("value"))
                .map_err(|v| violations.push(v))
                .ok(),
        };
        let seconds = match input.duration_seconds {
            0 => DEFAULT_DURATION_SECONDS,
            s if s > MAX_DURATION_SECONDS => {
                violations.push(FieldViolation::new(
                    field("duration_seconds"),
                    format!("at most {MAX_DURATION_SECONDS} (ten years)"),
                ));
                DEFAULT_DURATION_SECONDS
            }
            s => s,
        };
        if let Err(v) = check_text(&input.reason, MAX_REASON, &field("reason")) {
            violations.push(v);
        }
        match (kind, input.throttle_per_minute) {
            (Some(DecisionKind::Throttle), 0) => violations.push(FieldViolation::new(
                field("throttle_per_minute"),
                "required for a throttle",
            )),
            (Some(DecisionKind::Throttle), r) if r > MAX_THROTTLE_PER_MINUTE => {
                violations.push(FieldViolation::new(
                    field("throttle_per_minute"),
                    format!("at most {MAX_THROTTLE_PER_MINUTE}"),
                ))
            }
            (Some(DecisionKind::Ban | DecisionKind::Allow), r) if r != 0 => violations.push(
                FieldViolation::new(field("throttle_per_minute"), "only throttles have a rate"),
            ),
            _ => {}
        }
        if let Err(v) = check_optional_text(
            &input.idempotency_key,
            MAX_IDEMPOTENCY_KEY,
            &field("idempotency_key"),
        ) {
            violations.push(v);
        }
        if origin.id.is_empty() || origin.id.len() > MAX_ORIGIN_ID {
            violations.push(FieldViolation::new(
                field("origin"),
                format!("the origin id must be 1..{MAX_ORIGIN_ID} bytes"),
            ));
        }
        match (target, kind) {
            (Some(target), Some(kind)) if violations.is_empty() => Ok(Self {
                target,
                kind,
                throttle_per_minute: input.throttle_per_minute,
                origin,
                reason: input.reason.clone(),
                duration: Duration::seconds(seconds as i64),
                idempotency_key: (!input.idempotency_key.is_empty())
                    .then(|| input.idempotency_key.clone()),
            }),
            _ => Err(violations),
        }
    }

    /// The decision this creates for `tenant`, made by `by` at `now`.
    pub fn into_decision(self, tenant: TenantId, by: &str, now: DateTime<Utc>) -> Decision {
        Decision {
            id: Uuid::now_v7(),
            tenant_id: tenant,
            target: self.target,
            kind: self.kind,
            throttle_per_minute: self.throttle_per_minute,
            origin: self.origin,
            reason: self.reason,
            created_by: by.to_owned(),
            created_at: now,
            expires_at: now + self.duration,
            revoked_at: None,
            revoked_by: String::new(),
            revoke_reason: String::new(),
            idempotency_key: self.idempotency_key,
        }
    }
}

/// Checks a revocation reason (optional, at most [`MAX_REASON`] bytes).
pub fn check_revoke_reason(reason: &str, field: &str) -> Result<(), FieldViolation> {
    check_optional_text(reason, MAX_REASON, field)
}

/// A target's effective state: what its decisions resolve to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effective {
    /// The target.
    pub target: Target,
    /// The winning kind.
    pub kind: DecisionKind,
    /// When this state ends (the deciding decision's expiry).
    pub expires_at: DateTime<Utc>,
    /// The rate of a throttle; 0 otherwise.
    #[serde(default)]
    pub throttle_per_minute: u32,
    /// The deciding decision.
    pub decision_id: Uuid,
    /// Its origin.
    pub origin: Origin,
    /// Its reason.
    #[serde(default)]
    pub reason: String,
}

impl Effective {
    /// The effective state `decision` decides.
    pub fn of(decision: &Decision) -> Self {
        Self {
            target: decision.target.clone(),
            kind: decision.kind,
            expires_at: decision.expires_at,
            throttle_per_minute: decision.throttle_per_minute,
            decision_id: decision.id,
            origin: decision.origin.clone(),
            reason: decision.reason.clone(),
        }
    }
}

/// The deciding decision among `decisions` at `now` (see the module header),
/// or `None` if none is in force. Revoked decisions never count.
pub fn deciding(decisions: &[Decision], now: DateTime<Utc>) -> Option<&Decision> {
    decisions
        .iter()
        .filter(|d| d.is_active(now))
        .max_by(|a, b| {
            a.kind
                .precedence()
                .cmp(&b.kind.precedence())
                // Lower rates win among throttles (0 for the other kinds).
                .then(b.throttle_per_minute.cmp(&a.throttle_per_minute))
                .then(a.expires_at.cmp(&b.expires_at))
                .then(a.id.cmp(&b.id))
        })
}

/// How a target's effective state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaKind {
    /// None before, one now.
    Added,
    /// A different one now.
    Updated,
    /// None left after a revocation.
    Removed,
    /// None left after an expiry.
    Expired,
    /// The decisions changed, the effective state did not (not streamed;
    /// logged so every index holds a target's current decisions).
    Unchanged,
}

/// Why a target's state is being recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A decision was created or revoked.
    Write,
    /// Time passed a decision's expiry.
    Expiry,
}

/// The decisions in force on one target and its effective state as last
/// recorded in the revision log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetState {
    /// The target.
    pub target: Target,
    /// Its unrevoked decisions that had not ended when it was last
    /// recomputed (one may have ended since; [`deciding`] skips it).
    #[serde(default)]
    pub decisions: Vec<Decision>,
    /// The effective state as last logged.
    #[serde(default)]
    pub effective: Option<Effective>,
}

impl TargetState {
    /// A target with no decisions.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            decisions: Vec::new(),
            effective: None,
        }
    }

    /// Drops decisions that have ended by `now`; returns how many.
    pub fn prune(&mut self, now: DateTime<Utc>) -> usize {
        let before = self.decisions.len();
        self.decisions.retain(|d| d.is_active(now));
        before - self.decisions.len()
    }

    /// When the decisions next change by time alone (the earliest expiry).
    pub fn next_change(&self) -> Option<DateTime<Utc>> {
        self.decisions.iter().map(|d| d.expires_at).min()
    }

    /// Recomputes the effective state at `now` (after the decisions changed
    /// for `cause`), records it, and says how it changed. The returned
    /// state is the new one, or for REMOVED and EXPIRED the one that ended.
    pub fn settle(&mut self, now: DateTime<Utc>, cause: Cause) -> (DeltaKind, Option<Effective>) {
        let new = deciding(&self.decisions, now).map(Effective::of);
        let old = std::mem::replace(&mut self.effective, new.clone());
        match (old, new) {
            (None, None) => (DeltaKind::Unchanged, None),
            (None, Some(n)) => (DeltaKind::Added, Some(n)),
            (Some(o), Some(n)) if o == n => (DeltaKind::Unchanged, Some(n)),
            (Some(_), Some(n)) => (DeltaKind::Updated, Some(n)),
            (Some(o), None) => match cause {
                Cause::Write => (DeltaKind::Removed, Some(o)),
                Cause::Expiry => (DeltaKind::Expired, Some(o)),
            },
        }
    }
}

/// One entry of a tenant's decision revision log: one target's change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionLogEntry {
    /// Its revision: per tenant, increasing by one per entry, in commit order.
    #[serde(default)]
    pub revision: u64,
    /// How the target's effective state changed.
    pub kind: DeltaKind,
    /// The target.
    pub target: Target,
    /// The new effective state (ADDED, UPDATED, UNCHANGED) or the one that
    /// ended (REMOVED, EXPIRED).
    #[serde(default)]
    pub effective: Option<Effective>,
    /// The target's decisions in force after the change.
    #[serde(default)]
    pub decisions: Vec<Decision>,
}

/// A tenant's revision log head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecisionHead {
    /// The newest revision (0: none yet).
    pub revision: u64,
    /// Every entry after this revision is still kept; older ones were
    /// compacted away.
    pub floor: u64,
    /// Decisions in force (unrevoked, not pruned after expiry).
    pub active: u64,
}

/// What decision listings select.
#[derive(Debug, Clone, Default)]
pub struct DecisionQuery {
    /// Only this scope.
    pub scope: Option<DecisionScope>,
    /// Only this value (with the scope).
    pub value: Option<String>,
    /// Only these kinds; empty for all.
    pub kinds: Vec<DecisionKind>,
    /// Only this origin id.
    pub origin_id: Option<String>,
    /// Also revoked and expired ones (as of `now`).
    pub include_inactive: bool,
    /// What "active" is measured against.
    pub now: Option<DateTime<Utc>>,
    /// Keyset: strictly older than this (created_at, id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    /// Most rows.
    pub limit: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn decision(kind: DecisionKind, created: i64, seconds: i64, rate: u32) -> Decision {
        NewDecision {
            target: Target::parse(DecisionScope::Ip, "203.0.113.7", "value").unwrap(),
            kind,
            throttle_per_minute: rate,
            origin: Origin::manual("k"),
            reason: "test".into(),
            duration: Duration::seconds(seconds),
            idempotency_key: None,
        }
        .into_decision(TenantId(Uuid::nil()), "k", at(created))
    }

    #[test]
    fn a_short_ban_after_a_long_one_never_shortens_it() {
        let long = decision(DecisionKind::Ban, 0, 3600, 0);
        let short = decision(DecisionKind::Ban, 1, 60, 0);
        let mut t = TargetState::new(long.target.clone());
        t.decisions.push(long.clone());
        assert_eq!(t.settle(at(0), Cause::Write).0, DeltaKind::Added);
        t.decisions.push(short);
        let (kind, eff) = t.settle(at(1), Cause::Write);
        assert_eq!(kind, DeltaKind::Unchanged);
        assert_eq!(eff.unwrap().expires_at, long.expires_at);
        // The short one ends: still banned until the long one ends.
        assert_eq!(t.prune(at(61)), 1);
        assert_eq!(t.settle(at(61), Cause::Expiry).0, DeltaKind::Unchanged);
        assert_eq!(t.prune(at(3600)), 1);
        assert_eq!(t.settle(at(3600), Cause::Expiry).0, DeltaKind::Expired);
    }

    #[test]
    fn a_longer_ban_extends_and_revoking_one_of_two_keeps_the_ban() {
        let first = decision(DecisionKind::Ban, 0, 60, 0);
        let second = decision(DecisionKind::Ban, 1, 3600, 0);
        let mut t = TargetState::new(first.target.clone());
        t.decisions.push(first.clone());
        t.settle(at(0), Cause::Write);
        t.decisions.push(second.clone());
        let (kind, eff) = t.settle(at(1), Cause::Write);
        assert_eq!(kind, DeltaKind::Updated);
        assert_eq!(eff.unwrap().decision_id, second.id);
        t.decisions.retain(|d| d.id != second.id);
        let (kind, eff) = t.settle(at(2), Cause::Write);
        assert_eq!(kind, DeltaKind::Updated, "the other ban decides now");
        assert_eq!(eff.unwrap().decision_id, first.id);
        t.decisions.clear();
        assert_eq!(t.settle(at(3), Cause::Write).0, DeltaKind::Removed);
    }

    #[test]
    fn allow_beats_ban_beats_throttle_and_the_lowest_rate_wins() {
        let ban = decision(DecisionKind::Ban, 0, 60, 0);
        let allow = decision(DecisionKind::Allow, 0, 30, 0);
        let slow = decision(DecisionKind::Throttle, 0, 10, 5);
        let fast = decision(DecisionKind::Throttle, 0, 100, 50);
        let all = [ban.clone(), allow.clone(), slow.clone(), fast.clone()];
        assert_eq!(deciding(&all, at(1)).unwrap().id, allow.id);
        assert_eq!(
            deciding(&all, at(30)).unwrap().id,
            ban.id,
            "the allow ended"
        );
        assert_eq!(deciding(&all, at(60)).unwrap().id, fast.id);
        let throttles = [slow.clone(), fast.clone()];
        assert_eq!(deciding(&throttles, at(1)).unwrap().id, slow.id);
        let mut revoked = ban.clone();
        revoked.revoked_at = Some(at(0));
        assert!(deciding(&[revoked], at(1)).is_none());
    }

    #[test]
    fn targets_are_canonical_and_bounded() {
        let ip = |v: &str| Target::parse(DecisionScope::Ip, v, "value");
        assert_eq!(ip("::ffff:192.0.2.1").unwrap().value, "192.0.2.1");
        assert_eq!(ip("2001:DB8::1").unwrap().value, "2001:db8::1");
        assert!(ip("").is_err() && ip("300.1.1.1").is_err());
        let cidr = |v: &str| Target::parse(DecisionScope::Cidr, v, "value");
        assert_eq!(cidr("198.51.100.0/24").unwrap().value, "198.51.100.0/24");
        assert_eq!(cidr("2001:DB8::/48").unwrap().value, "2001:db8::/48");
        let e = cidr("198.51.100.7/24").unwrap_err();
        assert!(e.description.contains("198.51.100.0/24"), "{e:?}");
        assert!(cidr("10.0.0.0/7").is_err(), "too wide");
        assert!(cidr("2001::/15").is_err(), "too wide");
        assert!(cidr("10.0.0.0/33").is_err());
        assert!(cidr("10.0.0.0").is_err());
        assert!(cidr("::ffff:10.0.0.0/104").is_err());
        assert!(cidr("10.0.0.0/+8").is_err());
        let actor = |v: &str| Target::parse(DecisionScope::Actor, v, "value");
        assert!(actor("alice@example.com").is_ok());
        assert!(actor("").is_err() && actor("a\nb").is_err());
        assert!(actor(&"a".repeat(MAX_ACTOR + 1)).is_err());
        let range = Cidr::parse("198.51.100.0/24", "v").unwrap();
        assert!(range.contains("198.51.100.200".parse().unwrap()));
        assert!(!range.contains("198.51.101.1".parse().unwrap()));
        assert!(!range.contains("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn inputs_report_every_violation_by_field() {
        let input = DecisionInput {
            scope: Some(DecisionScope::Ip),
            value: "nope".into(),
            kind: Some(DecisionKind::Ban),
            duration_seconds: MAX_DURATION_SECONDS + 1,
            reason: String::new(),
            throttle_per_minute: 5,
            idempotency_key: "x".repeat(MAX_IDEMPOTENCY_KEY + 1),
        };
        let v = NewDecision::parse(&input, Origin::manual("k"), "decisions[3].").unwrap_err();
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "decisions[3].value",
                "decisions[3].duration_seconds",
                "decisions[3].reason",
                "decisions[3].throttle_per_minute",
                "decisions[3].idempotency_key"
            ]
        );
        let ok = DecisionInput {
            scope: Some(DecisionScope::Actor),
            value: "mallory".into(),
            kind: Some(DecisionKind::Throttle),
            reason: "noisy".into(),
            throttle_per_minute: 10,
            ..Default::default()
        };
        let d = NewDecision::parse(&ok, Origin::manual("k"), "").unwrap();
        assert_eq!(
            d.duration,
            Duration::seconds(DEFAULT_DURATION_SECONDS as i64)
        );
        assert_eq!(d.idempotency_key, None);
    }
}
