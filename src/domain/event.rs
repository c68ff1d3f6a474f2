//! Security events: the normalized form every source is mapped to, with the
//! limits validation enforces and the OCSF classification normalization assigns.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{FieldViolation, Severity, TenantId};

mod parse;

pub use parse::{Decoded, EventInput, NUL_REASON};

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Longest ordinary string field, in bytes.
pub const MAX_STRING: usize = 1024;
/// Longest event type, in bytes.
pub const MAX_EVENT_TYPE: usize = 128;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Longest HTTP path, in bytes.
pub const MAX_PATH: usize = 2048;
/// Longest HTTP method, in bytes.
pub const MAX_METHOD: usize = 16;
/// Longest old/new value of a change, in bytes.
pub const MAX_CHANGE_VALUE: usize = 4096;
/// Most attributes on one event.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY: usize = 128;
/// Longest attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE: usize = 4096;
/// Most attribute bytes (keys plus values) on one event.
pub const MAX_ATTRIBUTES_TOTAL: usize = 16 * 1024;
/// Largest encoded event, in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// How far in the future `occurred_at` may be.
pub const MAX_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

/// Whether an action succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Outcome {
    /// It succeeded.
    Success = 1,
    /// It failed or was denied.
    Failure = 2,
    /// Not known.
    #[default]
    Unknown = 3,
}

impl Outcome {
    /// Stored numeric value.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// From the stored value.
    pub fn from_i16(v: i16) -> Self {
        match v {
            1 => Self::Success,
            2 => Self::Failure,
            _ => Self::Unknown,
        }
    }
}

/// HTTP request details.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpDetails {
    /// Upper-case method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Response status (0 unknown).
    pub status_code: u32,
    /// Latency in milliseconds.
    pub latency_ms: f64,
    /// Request bytes.
    pub bytes_in: u64,
    /// Response bytes.
    pub bytes_out: u64,
    /// User agent.
    pub user_agent: String,
    /// Route template.
    pub route: String,
}

/// Authentication details.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthDetails {
    /// Method (`password`, `sso`, …).
    pub method: String,
    /// Whether a second factor was used.
    pub mfa_used: bool,
    /// Second-factor kind.
    pub mfa_method: String,
    /// Failure reason.
    pub failure_reason: String,
    /// Session id.
    pub session_id: String,
}

/// Network details.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkDetails {
    /// Source port.
    pub source_port: u32,
    /// Destination port.
    pub destination_port: u32,
    /// Protocol.
    pub protocol: String,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// VPN gateway or firewall.
    pub device: String,
    /// Firewall rule.
    pub rule_id: String,
}

/// Database details.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DatabaseDetails {
    /// Database system.
    pub system: String,
    /// Database name.
    pub database: String,
    /// Database user.
    pub db_user: String,
    /// Statement kind.
    pub operation: String,
    /// Rows returned or affected.
    pub rows: u64,
}

/// Change details.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ChangeDetails {
    /// Kind of object.
    pub object_type: String,
    /// Object id.
    pub object_id: String,
    /// Previous value.
    pub old_value: String,
    /// New value.
    pub new_value: String,
    /// Privilege granted or revoked.
    pub privilege: String,
    /// Grantee.
    pub target_actor: String,
}

/// Quota details.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct QuotaDetails {
    /// Limit name.
    pub limit_name: String,
    /// Configured limit.
    pub limit: f64,
    /// Observed value.
    pub observed: f64,
    /// Whether the request was throttled.
    pub throttled: bool,
}

/// The parts of an event that are stored as one JSON document rather than columns.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EventDetails {
    /// The client's idempotency key as sent (empty if the server chose one).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub idempotency_key: String,
    /// HTTP details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpDetails>,
    /// Authentication details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthDetails>,
    /// Network details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkDetails>,
    /// Database details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseDetails>,
    /// Change details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<ChangeDetails>,
    /// Quota details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaDetails>,
    /// Free-form attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// A validated, normalized event ready to store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Id assigned at validation (UUIDv7).
    pub id: Uuid,
    /// 16-byte digest of the idempotency key: unique per tenant.
    pub idempotency_digest: [u8; 16],
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// When the server accepted it for writing.
    pub received_at: DateTime<Utc>,
    /// Dotted type.
    #[serde(default)]
    pub event_type: String,
    /// OCSF class uid.
    #[serde(default)]
    pub ocsf_class_uid: u32,
    /// OCSF category uid.
    #[serde(default)]
    pub ocsf_category_uid: u32,
    /// Who acted.
    #[serde(default)]
    pub actor: String,
    /// What was done.
    #[serde(default)]
    pub action: String,
    /// To what.
    #[serde(default)]
    pub resource: String,
    /// Result.
    pub outcome: Outcome,
    /// Severity.
    pub severity: Severity,
    /// Canonical source IP.
    #[serde(default)]
    pub source_ip: Option<IpAddr>,
    /// Canonical destination IP.
    #[serde(default)]
    pub destination_ip: Option<IpAddr>,
    /// Producing system.
    #[serde(default)]
    pub source_system: String,
    /// Service.
    #[serde(default)]
    pub service: String,
    /// Environment.
    #[serde(default)]
    pub environment: String,
    /// Everything else.
    #[serde(default)]
    pub details: EventDetails,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Position in the tenant's commit-ordered feed (see `FeedPosition`).
    pub position: FeedPosition,
    /// The event.
    pub event: NewEvent,
}

/// A position in a tenant's commit-ordered feed of events. On Postgres `xid`
/// is the inserting transaction's id and the feed is read only below the oldest
/// running transaction, so no row can later appear before a delivered position;
/// on SQLite writers are serialized and `xid` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct FeedPosition {
    /// Inserting transaction (0 on SQLite).
    pub xid: u64,
    /// Insert sequence.
    pub seq: i64,
}

/// What ingesting one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored; its id.
    Accepted(Uuid),
    /// Its key was stored before; the original id.
    Duplicate(Uuid),
}

/// The digest an idempotency key is stored as: SHA-256 truncated to 16 bytes.
pub fn idempotency_digest(key: &str) -> [u8; 16] {
    let d = Sha256::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Parses an IP in any standard text form into its canonical form (IPv4-mapped
/// IPv6 addresses become IPv4). Empty is `None`.
pub fn parse_ip(s: &str, field: &str) -> Result<Option<IpAddr>, FieldViolation> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    unbracketed
        .parse::<IpAddr>()
        .map(|ip| Some(ip.to_canonical()))
        .map_err(|_| FieldViolation::new(field, "not an IPv4 or IPv6 address"))
}

/// Checks an event type: 1..=128 bytes of `[a-z0-9_.-]`.
pub fn check_event_type(s: &str, field: &str) -> Result<(), FieldViolation> {
    if s.is_empty() {
        return Err(FieldViolation::new(field, "required"));
    }
    if s.len() > MAX_EVENT_TYPE
        || !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
    {
        return Err(FieldViolation::new(
            field,
            format!("must be 1 to {MAX_EVENT_TYPE} characters of a-z, 0-9, '_', '.', '-'"),
        ));
    }
    Ok(())
}

/// Checks a string's length in bytes.
pub fn check_len(s: &str, max: usize, field: &str) -> Result<(), FieldViolation> {
    if s.len() > max {
        return Err(FieldViolation::new(
            field,
            format!("at most {max} bytes (got {})", s.len()),
        ));
    }
    Ok(())
}

/// Checks attributes against the per-key, per-value, count and total limits;
/// the first violation (see [`NewEvent::parse`] for all of them).
pub fn check_attributes<'a>(
    attrs: impl IntoIterator<Item = (&'a String, &'a String)>,
    field: &str,
) -> Result<(), FieldViolation> {
    match parse::attribute_violations(attrs, field).into_iter().next() {
        Some(v) => Err(v),
        None => Ok(()),
    }
}

/// Checks `occurred_at` against the server clock and the tenant's retention
/// (`retention_days` 0 means forever).
pub fn check_occurred_at(
    t: DateTime<Utc>,
    now: DateTime<Utc>,
    retention_days: u32,
    field: &str,
) -> Result<(), FieldViolation> {
    if t > now + MAX_CLOCK_SKEW {
        return Err(FieldViolation::new(
            field,
            "more than 5 minutes in the future",
        ));
    }
    if retention_days > 0 && t < now - chrono::Duration::days(i64::from(retention_days)) {
        return Err(FieldViolation::new(
            field,
            format!("older than the tenant's retention of {retention_days} days"),
        ));
    }
    Ok(())
}

/// OCSF classes Picket assigns.
pub mod ocsf {
    /// Base Event (nothing more specific applies).
    pub const BASE_EVENT: u32 = 0;
    /// Account Change.
    pub const ACCOUNT_CHANGE: u32 = 3001;
    /// Authentication.
    pub const AUTHENTICATION: u32 = 3002;
    /// Entity Management (tenants, configuration, firewall rules).
    pub const ENTITY_MANAGEMENT: u32 = 3004;
    /// User Access Management (roles, permissions).
    pub const USER_ACCESS_MANAGEMENT: u32 = 3005;
    /// Network Activity (VPN, connections).
    pub const NETWORK_ACTIVITY: u32 = 4001;
    /// HTTP Activity.
    pub const HTTP_ACTIVITY: u32 = 4002;
    /// API Activity (API calls, quota and rate-limit events).
    pub const API_ACTIVITY: u32 = 6003;
    /// Datastore Activity (database connections and queries).
    pub const DATASTORE_ACTIVITY: u32 = 6005;

    /// The OCSF category of a class (the thousands digit).
    pub fn category_of(class_uid: u32) -> u32 {
        class_uid / 1000
    }
}

/// Which detail blocks an event carries, for classification.
#[derive(Debug, Clone, Copy, Default)]
pub struct DetailKinds {
    /// Has HTTP details.
    pub http: bool,
    /// Has authentication details.
    pub auth: bool,
    /// Has network details.
    pub network: bool,
    /// Has database details.
    pub database: bool,
    /// Has change details.
    pub change: bool,
    /// Has quota details.
    pub quota: bool,
}

/// Assigns the OCSF class from the event type's first segment, falling back to
/// which details the event carries. Documented in `proto/picket/v1/ingest.proto`.
pub fn classify(event_type: &str, kinds: DetailKinds) -> u32 {
    use ocsf::*;
    let head = event_type.split(['.', '_']).next().unwrap_or("");
    let by_type = match head {
        "auth" | "login" | "logout" | "mfa" | "session" | "sso" => Some(AUTHENTICATION),
        "user" | "account" | "password" => Some(
            if event_type.contains("login")
                || event_type.contains("logout")
                || event_type.contains("auth")
            {
                AUTHENTICATION
            } else {
                ACCOUNT_CHANGE
            },
        ),
        "role" | "permission" | "privilege" | "group" | "access" => Some(USER_ACCESS_MANAGEMENT),
        "tenant" | "config" | "configuration" | "firewall" | "setting" | "settings" => {
            Some(ENTITY_MANAGEMENT)
        }
        "http" => Some(HTTP_ACTIVITY),
        "vpn" | "network" | "connection" | "netflow" => Some(NETWORK_ACTIVITY),
        "api" | "quota" | "rate" | "ratelimit" => Some(API_ACTIVITY),
        "db" | "database" | "sql" => Some(DATASTORE_ACTIVITY),
        _ => None,
    };
    by_type.unwrap_or(if kinds.auth {
        AUTHENTICATION
    } else if kinds.http {
        HTTP_ACTIVITY
    } else if kinds.database {
        DATASTORE_ACTIVITY
    } else if kinds.network {
        NETWORK_ACTIVITY
    } else if kinds.quota {
        API_ACTIVITY
    } else if kinds.change {
        ENTITY_MANAGEMENT
    } else {
        BASE_EVENT
    })
}

/// A fresh random idempotency key for events sent without one.
pub fn random_idempotency_digest() -> [u8; 16] {
    *Uuid::new_v4().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_canonicalized() {
        let p = |s| parse_ip(s, "source_ip").unwrap().unwrap().to_string();
        assert_eq!(p("203.0.113.7"), "203.0.113.7");
        assert_eq!(p("2001:0DB8:0000:0000:0000:0000:0000:0001"), "2001:db8::1");
        assert_eq!(p("::ffff:198.51.100.4"), "198.51.100.4");
        assert_eq!(p("[::1]"), "::1");
        assert_eq!(parse_ip("", "x").unwrap(), None);
        for bad in ["1.2.3.256", "bogus", "1.2.3", "::g"] {
            assert!(parse_ip(bad, "source_ip").is_err(), "{bad}");
        }
    }

    #[test]
    fn events_are_classified() {
        let none = DetailKinds::default();
        assert_eq!(classify("user.login", none), ocsf::AUTHENTICATION);
        assert_eq!(classify("user.create", none), ocsf::ACCOUNT_CHANGE);
        assert_eq!(classify("http_request", none), ocsf::HTTP_ACTIVITY);
        assert_eq!(classify("vpn.connect", none), ocsf::NETWORK_ACTIVITY);
        assert_eq!(
            classify("firewall.rule_change", none),
            ocsf::ENTITY_MANAGEMENT
        );
        assert_eq!(classify("tenant.delete", none), ocsf::ENTITY_MANAGEMENT);
        assert_eq!(classify("role.grant", none), ocsf::USER_ACCESS_MANAGEMENT);
        assert_eq!(classify("db.connect", none), ocsf::DATASTORE_ACTIVITY);
        assert_eq!(classify("api.call", none), ocsf::API_ACTIVITY);
        assert_eq!(classify("quota.exceeded", none), ocsf::API_ACTIVITY);
        assert_eq!(
            classify("custom", DetailKinds { http: true, ..none }),
            ocsf::HTTP_ACTIVITY
        );
        assert_eq!(classify("custom", none), ocsf::BASE_EVENT);
        assert_eq!(ocsf::category_of(ocsf::HTTP_ACTIVITY), 4);
    }

    #[test]
    fn limits_name_the_field() {
        assert!(check_event_type("user.login", "event_type").is_ok());
        assert_eq!(check_event_type("User Login", "e").unwrap_err().field, "e");
        let mut attrs = BTreeMap::new();
        attrs.insert("k".to_string(), "v".repeat(MAX_ATTRIBUTE_VALUE + 1));
        assert_eq!(
            check_attributes(&attrs, "attributes").unwrap_err().field,
            "attributes[\"k\"]"
        );
        let now = Utc::now();
        assert!(check_occurred_at(now + chrono::Duration::minutes(6), now, 0, "t").is_err());
        assert!(check_occurred_at(now - chrono::Duration::days(40), now, 30, "t").is_err());
        assert!(check_occurred_at(now - chrono::Duration::days(40), now, 0, "t").is_ok());
    }

    #[test]
    fn a_whole_first_segment_selects_exactly_the_prefix_matches() {
        assert_eq!(resource_segment("svc12/api/v1"), Some("svc12/"));
        assert_eq!(resource_segment("svc12/"), Some("svc12/"));
        assert_eq!(resource_segment("/etc/passwd"), Some("/"));
        assert_eq!(resource_segment("orders-db"), None);
        assert_eq!(whole_segment("svc12/"), Some("svc12/"));
        assert_eq!(whole_segment("/"), Some("/"));
        for other in ["svc12", "svc12/api", "svc12/api/", ""] {
            assert_eq!(whole_segment(other), None, "{other}");
        }
        // Equal segments are exactly the resources starting with the prefix.
        let resources = ["svc1/a", "svc12/a", "svc1", "svc1/", "svc1//x", "xsvc1/a"];
        for r in resources {
            assert_eq!(
                resource_segment(r) == Some("svc1/"),
                r.starts_with("svc1/"),
                "{r}"
            );
        }
    }

    #[test]
    fn idempotency_digest_is_stable() {
        assert_eq!(idempotency_digest("abc"), idempotency_digest("abc"));
        assert_ne!(idempotency_digest("abc"), idempotency_digest("abd"));
    }
}

/// A resource's first path segment with its `/` (`svc12/` of
/// `svc12/api/v1/orders`), or `None` for a resource without a `/`. Stored
/// beside the resource (`events.resource_segment`) so that a filter on a
/// whole first segment reads an index ordered by time within the segment.
pub fn resource_segment(resource: &str) -> Option<&str> {
    resource.find('/').map(|i| &resource[..=i])
}

/// The segment a resource prefix names exactly, when it is one whole first
/// segment (`svc12/`: one `/`, at its end): the resources starting with it
/// are exactly those whose [`resource_segment`] equals it. `None` for any
/// other prefix (`svc1`, `svc12/api`), which is matched as a range.
pub fn whole_segment(prefix: &str) -> Option<&str> {
    (resource_segment(prefix) == Some(prefix)).then_some(prefix)
}

/// An audit-log query: filters, time range and a keyset position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventQuery {
    /// occurred_at ≥ start.
    pub start: Option<DateTime<Utc>>,
    /// occurred_at < end.
    pub end: Option<DateTime<Utc>>,
    /// Event types (any of).
    pub event_types: Vec<String>,
    /// OCSF classes (any of).
    pub ocsf_class_uids: Vec<u32>,
    /// Exact actor.
    pub actor: Option<String>,
    /// Canonical source IP.
    pub source_ip: Option<IpAddr>,
    /// Resource prefix.
    pub resource_prefix: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// Minimum severity.
    pub min_severity: Option<Severity>,
    /// Only events received at or before this time (pins a paged query to the
    /// moment its first page was read).
    pub received_before: Option<DateTime<Utc>>,
    /// Keyset: only events strictly older than (occurred_at, id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    /// Oldest first (by occurred_at, then id) instead of newest first; pages
    /// with `after` instead of `before` (audit exports).
    pub oldest_first: bool,
    /// Keyset of an oldest-first query: only events strictly newer than
    /// (occurred_at, id).
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// Most rows to return.
    pub limit: u32,
}

impl EventQuery {
    /// Whether a stored event matches the filters (not the time range or keyset):
    /// the live tail applies the same filter in memory.
    pub fn matches(&self, e: &NewEvent) -> bool {
        (self.event_types.is_empty() || self.event_types.contains(&e.event_type))
            && (self.ocsf_class_uids.is_empty() || self.ocsf_class_uids.contains(&e.ocsf_class_uid))
            && self.actor.as_ref().is_none_or(|a| *a == e.actor)
            && self.source_ip.is_none_or(|ip| Some(ip) == e.source_ip)
            && self
                .resource_prefix
                .as_ref()
                .is_none_or(|p| e.resource.starts_with(p.as_str()))
            && self.outcome.is_none_or(|o| o == e.outcome)
            && self.min_severity.is_none_or(|s| e.severity >= s)
    }
}
