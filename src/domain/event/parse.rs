//! The rules of a valid event, in one place: [`NewEvent::parse`] turns an
//! [`EventInput`] (plain Rust values, as any transport can produce them: gRPC,
//! webhooks, the CLI, SDKs) into a [`NewEvent`], or reports every violated rule
//! with the path of its field relative to the event (`source_ip`,
//! `http.status_code`, `attributes["k"]`).
//!
//! Violations are reported in a fixed order (size, `occurred_at`, `event_type`,
//! `idempotency_key`, the top-level strings, `attributes`, the detail blocks,
//! `outcome`, `severity`, the IPs); a receipt that shows one violation shows the
//! first.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::event::{
    AuthDetails, ChangeDetails, DatabaseDetails, DetailKinds, EventDetails, HttpDetails,
    MAX_ATTRIBUTE_KEY, MAX_ATTRIBUTE_VALUE, MAX_ATTRIBUTES, MAX_ATTRIBUTES_TOTAL, MAX_CHANGE_VALUE,
    MAX_EVENT_BYTES, MAX_IDEMPOTENCY_KEY, MAX_METHOD, MAX_PATH, MAX_STRING, NetworkDetails,
    NewEvent, Outcome, QuotaDetails, check_event_type, check_occurred_at, classify,
    idempotency_digest, ocsf, parse_ip, random_idempotency_digest,
};
use crate::domain::{FieldViolation, Severity};

/// What a transport could decode of a field: the value, or why it could not
/// (for instance an enum number this server does not know, or a timestamp out
/// of range). The reason is reported on the field's path, in the rules' order.
pub type Decoded<T> = Result<T, String>;

/// The NUL character's rule: both stores must keep exactly what was accepted,
/// and PostgreSQL cannot store U+0000 in text.
pub const NUL_REASON: &str = "must not contain the NUL character (U+0000)";

/// An incoming event as plain values, before validation.
#[derive(Debug, Clone)]
pub struct EventInput {
    /// Size of the event as received, in bytes (the encoded protobuf message
    /// on gRPC); at most [`MAX_EVENT_BYTES`].
    pub size_bytes: usize,
    /// When it happened; required.
    pub occurred_at: Option<Decoded<DateTime<Utc>>>,
    /// Dotted type, 1..=128 bytes of `[a-z0-9_.-]`.
    pub event_type: String,
    /// Client idempotency key (empty: none).
    pub idempotency_key: String,
    /// Who acted.
    pub actor: String,
    /// What was done.
    pub action: String,
    /// To what.
    pub resource: String,
    /// Result (unset: [`Outcome::Unknown`]).
    pub outcome: Decoded<Outcome>,
    /// Severity (unset: [`Severity::Info`]).
    pub severity: Decoded<Severity>,
    /// Source IP in any standard text form (empty: none).
    pub source_ip: String,
    /// Destination IP in any standard text form (empty: none).
    pub destination_ip: String,
    /// Producing system.
    pub source_system: String,
    /// Service.
    pub service: String,
    /// Environment.
    pub environment: String,
    /// HTTP details as sent (method and the rest are normalized by `parse`).
    pub http: Option<HttpDetails>,
    /// Authentication details.
    pub auth: Option<AuthDetails>,
    /// Network details (protocol is normalized to lower case).
    pub network: Option<NetworkDetails>,
    /// Database details (operation is normalized to upper case).
    pub database: Option<DatabaseDetails>,
    /// Change details.
    pub change: Option<ChangeDetails>,
    /// Quota details.
    pub quota: Option<QuotaDetails>,
    /// Free-form attributes.
    pub attributes: BTreeMap<String, String>,
}

impl Default for EventInput {
    fn default() -> Self {
        Self {
            size_bytes: 0,
            occurred_at: None,
            event_type: String::new(),
            idempotency_key: String::new(),
            actor: String::new(),
            action: String::new(),
            resource: String::new(),
            outcome: Ok(Outcome::Unknown),
            severity: Ok(Severity::Info),
            source_ip: String::new(),
            destination_ip: String::new(),
            source_system: String::new(),
            service: String::new(),
            environment: String::new(),
            http: None,
            auth: None,
            network: None,
            database: None,
            change: None,
            quota: None,
            attributes: BTreeMap::new(),
        }
    }
}

/// Collects every violated rule, in the order they are checked.
#[derive(Default)]
struct Violations(Vec<FieldViolation>);

impl Violations {
    fn push(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// Keeps `Ok` values; records an `Err`.
    fn take<T>(&mut self, r: Result<T, FieldViolation>) -> Option<T> {
        r.map_err(|v| self.0.push(v)).ok()
    }

    /// A decoded value, or its transport's reason on `field`.
    fn decoded<T>(&mut self, r: Decoded<T>, field: &str) -> Option<T> {
        r.map_err(|why| self.push(field, why)).ok()
    }

    /// A text field: at most `max` bytes, no NUL character.
    fn text(&mut self, value: &str, max: usize, field: &str) {
        if value.len() > max {
            self.push(field, format!("at most {max} bytes (got {})", value.len()));
        }
        if value.contains('\0') {
            self.push(field, NUL_REASON);
        }
    }

    /// Several text fields of the same limit.
    fn texts(&mut self, fields: &[(&str, &str)], max: usize) {
        for (value, field) in fields {
            self.text(value, max, field);
        }
    }

    /// A port number.
    fn port(&mut self, v: u32, field: &str) {
        if v > 65_535 {
            self.push(field, "must be 0..65535");
        }
    }

    /// A measurement: finite and not negative.
    fn finite(&mut self, v: f64, field: &str) {
        if !v.is_finite() || v < 0.0 {
            self.push(field, "must be a finite, non-negative number");
        }
    }
}

impl NewEvent {
    /// Validates and normalizes one incoming event: assigns its id, digests
    /// its idempotency key, classifies it (OCSF) and stamps `received_at` with
    /// `now`. `retention_days` is the tenant's (0: forever). On failure, every
    /// violated rule is reported with its field path, in the order above.
    pub fn parse(
        input: EventInput,
        now: DateTime<Utc>,
        retention_days: u32,
    ) -> Result<NewEvent, Vec<FieldViolation>> {
        let mut v = Violations::default();
        if input.size_bytes > MAX_EVENT_BYTES {
            v.push(
                "",
                format!(
                    "event is {} bytes encoded; at most {MAX_EVENT_BYTES} allowed",
                    input.size_bytes
                ),
            );
        }
        let occurred_at = match input.occurred_at.clone() {
            None => {
                v.push("occurred_at", "required");
                None
            }
            Some(t) => v.decoded(t, "occurred_at").and_then(|t| {
                v.take(check_occurred_at(t, now, retention_days, "occurred_at"))
                    .map(|()| t)
            }),
        };
        v.take(check_event_type(&input.event_type, "event_type"));
        v.text(
            &input.idempotency_key,
            MAX_IDEMPOTENCY_KEY,
            "idempotency_key",
        );
        v.texts(
            &[
                (&input.actor, "actor"),
                (&input.action, "action"),
                (&input.resource, "resource"),
                (&input.source_system, "source_system"),
                (&input.service, "service"),
                (&input.environment, "environment"),
            ],
            MAX_STRING,
        );
        attributes(&mut v, &input.attributes, "attributes");
        details(&mut v, &input);
        let outcome = v.decoded(input.outcome.clone(), "outcome");
        let severity = v.decoded(input.severity.clone(), "severity");
        let source_ip = v.take(parse_ip(&input.source_ip, "source_ip"));
        let destination_ip = v.take(parse_ip(&input.destination_ip, "destination_ip"));
        match (occurred_at, outcome, severity, source_ip, destination_ip) {
            (Some(occurred_at), Some(outcome), Some(severity), Some(src), Some(dst))
                if v.0.is_empty() =>
            {
                Ok(build(input, now, occurred_at, outcome, severity, src, dst))
            }
            _ => Err(v.0),
        }
    }
}

/// Every violated attribute rule of `attrs`, reported on `field` or its keys.
pub(crate) fn attribute_violations<'a>(
    attrs: impl IntoIterator<Item = (&'a String, &'a String)>,
    field: &str,
) -> Vec<FieldViolation> {
    let mut v = Violations::default();
    attributes(&mut v, attrs, field);
    v.0
}

/// Attributes: count, per-key and per-value limits, total size, no NUL.
fn attributes<'a>(
    v: &mut Violations,
    attrs: impl IntoIterator<Item = (&'a String, &'a String)>,
    field: &str,
) {
    let mut total = 0;
    for (count, (k, value)) in attrs.into_iter().enumerate() {
        if count == MAX_ATTRIBUTES {
            v.push(field, format!("at most {MAX_ATTRIBUTES} attributes"));
        }
        let path = attribute_path(field, k);
        if k.is_empty() {
            v.push(&path, "attribute keys must not be empty");
        }
        v.text(k, MAX_ATTRIBUTE_KEY, &path);
        v.text(value, MAX_ATTRIBUTE_VALUE, &path);
        total += k.len() + value.len();
    }
    if total > MAX_ATTRIBUTES_TOTAL {
        v.push(
            field,
            format!("at most {MAX_ATTRIBUTES_TOTAL} bytes of keys and values in all (got {total})"),
        );
    }
}

/// `attributes["key"]`, the key cut to 32 bytes and a NUL shown as `\0`.
pub(crate) fn attribute_path(field: &str, key: &str) -> String {
    let mut end = key.len().min(32);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{field}[\"{}\"]", key[..end].replace('\0', "\\0"))
}

/// The detail blocks' rules.
fn details(v: &mut Violations, e: &EventInput) {
    if let Some(h) = &e.http {
        v.text(&h.method, MAX_METHOD, "http.method");
        v.text(&h.path, MAX_PATH, "http.path");
        v.texts(
            &[(&h.user_agent, "http.user_agent"), (&h.route, "http.route")],
            MAX_STRING,
        );
        if h.status_code != 0 && !(100..=599).contains(&h.status_code) {
            v.push("http.status_code", "must be 100..599 (or 0 for unknown)");
        }
        v.finite(h.latency_ms, "http.latency_ms");
    }
    if let Some(a) = &e.auth {
        v.texts(
            &[
                (&a.method, "auth.method"),
                (&a.mfa_method, "auth.mfa_method"),
                (&a.failure_reason, "auth.failure_reason"),
                (&a.session_id, "auth.session_id"),
            ],
            MAX_STRING,
        );
    }
    if let Some(n) = &e.network {
        v.texts(
            &[
                (&n.protocol, "network.protocol"),
                (&n.device, "network.device"),
                (&n.rule_id, "network.rule_id"),
            ],
            MAX_STRING,
        );
        v.port(n.source_port, "network.source_port");
        v.port(n.destination_port, "network.destination_port");
    }
    if let Some(d) = &e.database {
        v.texts(
            &[
                (&d.system, "database.system"),
                (&d.database, "database.database"),
                (&d.db_user, "database.db_user"),
                (&d.operation, "database.operation"),
            ],
            MAX_STRING,
        );
    }
    if let Some(c) = &e.change {
        v.texts(
            &[
                (&c.object_type, "change.object_type"),
                (&c.object_id, "change.object_id"),
            ],
            MAX_STRING,
        );
        v.texts(
            &[
                (&c.old_value, "change.old_value"),
                (&c.new_value, "change.new_value"),
            ],
            MAX_CHANGE_VALUE,
        );
        v.texts(
            &[
                (&c.privilege, "change.privilege"),
                (&c.target_actor, "change.target_actor"),
            ],
            MAX_STRING,
        );
    }
    if let Some(q) = &e.quota {
        v.text(&q.limit_name, MAX_STRING, "quota.limit_name");
        v.finite(q.limit, "quota.limit");
        v.finite(q.observed, "quota.observed");
    }
}

/// The normalized event, once every rule holds.
fn build(
    e: EventInput,
    now: DateTime<Utc>,
    occurred_at: DateTime<Utc>,
    outcome: Outcome,
    severity: Severity,
    source_ip: Option<std::net::IpAddr>,
    destination_ip: Option<std::net::IpAddr>,
) -> NewEvent {
    let kinds = DetailKinds {
        http: e.http.is_some(),
        auth: e.auth.is_some(),
        network: e.network.is_some(),
        database: e.database.is_some(),
        change: e.change.is_some(),
        quota: e.quota.is_some(),
    };
    let class = classify(&e.event_type, kinds);
    NewEvent {
        id: Uuid::now_v7(),
        idempotency_digest: if e.idempotency_key.is_empty() {
            random_idempotency_digest()
        } else {
            idempotency_digest(&e.idempotency_key)
        },
        occurred_at: truncate_micros(occurred_at),
        received_at: truncate_micros(now),
        event_type: e.event_type,
        ocsf_class_uid: class,
        ocsf_category_uid: ocsf::category_of(class),
        actor: e.actor,
        action: e.action,
        resource: e.resource,
        outcome,
        severity,
        source_ip,
        destination_ip,
        source_system: e.source_system,
        service: e.service,
        environment: e.environment,
        details: EventDetails {
            idempotency_key: e.idempotency_key,
            http: e.http.map(|h| HttpDetails {
                method: h.method.to_ascii_uppercase(),
                ..h
            }),
            auth: e.auth,
            network: e.network.map(|n| NetworkDetails {
                protocol: n.protocol.to_ascii_lowercase(),
                ..n
            }),
            database: e.database.map(|d| DatabaseDetails {
                operation: d.operation.to_ascii_uppercase(),
                ..d
            }),
            change: e.change,
            quota: e.quota,
            attributes: e.attributes,
        },
    }
}

/// Both stores keep microseconds; normalize so what is returned equals what was stored.
fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(now: DateTime<Utc>) -> EventInput {
        EventInput {
            occurred_at: Some(Ok(now)),
            event_type: "user.login".into(),
            ..Default::default()
        }
    }

    fn fields(r: Result<NewEvent, Vec<FieldViolation>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_valid_event_is_normalized_and_classified() {
        let now = Utc::now();
        let mut e = minimal(now);
        e.source_ip = " ::ffff:10.0.0.2 ".into();
        e.http = Some(HttpDetails {
            method: "get".into(),
            status_code: 404,
            ..Default::default()
        });
        e.network = Some(NetworkDetails {
            protocol: "TCP".into(),
            ..Default::default()
        });
        e.attributes.insert("k".into(), "v".into());
        let ev = NewEvent::parse(e, now, 0).unwrap();
        assert_eq!(ev.source_ip.unwrap().to_string(), "10.0.0.2");
        assert_eq!(ev.details.http.unwrap().method, "GET");
        assert_eq!(ev.details.network.unwrap().protocol, "tcp");
        assert_eq!(ev.ocsf_class_uid, ocsf::AUTHENTICATION);
        assert_eq!(ev.ocsf_category_uid, 3);
        assert_eq!(ev.outcome, Outcome::Unknown);
        assert_eq!(ev.severity, Severity::Info);
        assert_eq!(ev.received_at.timestamp_micros(), now.timestamp_micros());
        assert_eq!(ev.details.attributes["k"], "v");
    }

    #[test]
    fn every_violation_is_reported_in_order() {
        let now = Utc::now();
        let e = EventInput {
            size_bytes: MAX_EVENT_BYTES + 1,
            occurred_at: None,
            event_type: "Bad Type".into(),
            actor: "a".repeat(MAX_STRING + 1),
            outcome: Err("unknown outcome value 9".into()),
            severity: Err("unknown severity value 42".into()),
            source_ip: "999.1.1.1".into(),
            destination_ip: "nope".into(),
            http: Some(HttpDetails {
                status_code: 700,
                latency_ms: f64::NAN,
                ..Default::default()
            }),
            network: Some(NetworkDetails {
                destination_port: 70_000,
                ..Default::default()
            }),
            quota: Some(QuotaDetails {
                limit: -1.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            fields(NewEvent::parse(e, now, 0)),
            [
                "",
                "occurred_at",
                "event_type",
                "actor",
                "http.status_code",
                "http.latency_ms",
                "network.destination_port",
                "quota.limit",
                "outcome",
                "severity",
                "source_ip",
                "destination_ip",
            ]
        );
    }

    #[test]
    fn time_rules_use_the_clock_and_retention() {
        let now = Utc::now();
        let at = |t, retention| {
            let mut e = minimal(now);
            e.occurred_at = Some(t);
            NewEvent::parse(e, now, retention)
        };
        assert!(at(Ok(now + chrono::Duration::minutes(4)), 0).is_ok());
        assert_eq!(
            fields(at(Ok(now + chrono::Duration::minutes(6)), 0)),
            ["occurred_at"]
        );
        assert!(at(Ok(now - chrono::Duration::days(40)), 0).is_ok());
        let old = at(Ok(now - chrono::Duration::days(40)), 30).unwrap_err();
        assert!(old[0].description.contains("retention of 30 days"));
        let undecodable = at(Err("timestamp out of range".into()), 0).unwrap_err();
        assert_eq!(
            undecodable,
            [FieldViolation::new("occurred_at", "timestamp out of range")]
        );
    }

    #[test]
    fn nul_characters_are_refused_in_every_string_field() {
        let now = Utc::now();
        let nul = "a\0b".to_string();
        type Set<'a> = Box<dyn Fn(&mut EventInput) + 'a>;
        let cases: Vec<(&str, Set)> = vec![
            ("actor", Box::new(|e| e.actor = nul.clone())),
            ("resource", Box::new(|e| e.resource = nul.clone())),
            (
                "idempotency_key",
                Box::new(|e| e.idempotency_key = nul.clone()),
            ),
            ("environment", Box::new(|e| e.environment = nul.clone())),
            (
                "http.user_agent",
                Box::new(|e| {
                    e.http = Some(HttpDetails {
                        user_agent: nul.clone(),
                        ..Default::default()
                    })
                }),
            ),
            (
                "change.new_value",
                Box::new(|e| {
                    e.change = Some(ChangeDetails {
                        new_value: nul.clone(),
                        ..Default::default()
                    })
                }),
            ),
            (
                "attributes[\"k\"]",
                Box::new(|e| {
                    e.attributes.insert("k".into(), nul.clone());
                }),
            ),
            (
                "attributes[\"a\\0b\"]",
                Box::new(|e| {
                    e.attributes.insert(nul.clone(), "v".into());
                }),
            ),
        ];
        for (field, set) in cases {
            let mut e = minimal(now);
            set(&mut e);
            let v = NewEvent::parse(e, now, 0).unwrap_err();
            assert_eq!(v, [FieldViolation::new(field, NUL_REASON)], "{field}");
        }
    }

    #[test]
    fn attribute_limits_name_the_key() {
        let now = Utc::now();
        let mut e = minimal(now);
        for i in 0..=MAX_ATTRIBUTES {
            e.attributes.insert(format!("k{i:03}"), "v".into());
        }
        e.attributes.insert(String::new(), "v".into());
        e.attributes
            .insert("long".into(), "x".repeat(MAX_ATTRIBUTE_VALUE + 1));
        let v = NewEvent::parse(e, now, 0).unwrap_err();
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["attributes[\"\"]", "attributes", "attributes[\"long\"]"]
        );
    }
}
