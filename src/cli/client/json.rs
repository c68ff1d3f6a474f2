//! The JSON-lines event format read by `picket ingest`: one JSON object per
//! line with the field names of `picket.v1.Event` (snake_case), times in RFC
//! 3339, and enums as short lower-case names (`"failure"`, `"high"`) or their
//! protobuf names (`"OUTCOME_FAILURE"`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::grpc::pb;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEvent {
    occurred_at: Option<DateTime<Utc>>,
    #[serde(default)]
    event_type: String,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    resource: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    severity: String,
    #[serde(default)]
    source_ip: String,
    #[serde(default)]
    destination_ip: String,
    #[serde(default)]
    source_system: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    environment: String,
    http: Option<JsonHttp>,
    auth: Option<JsonAuth>,
    network: Option<JsonNetwork>,
    database: Option<JsonDatabase>,
    change: Option<JsonChange>,
    quota: Option<JsonQuota>,
    #[serde(default)]
    attributes: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JsonHttp {
    method: String,
    path: String,
    status_code: u32,
    latency_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    user_agent: String,
    route: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JsonAuth {
    method: String,
    mfa_used: bool,
    mfa_method: String,
    failure_reason: String,
    session_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JsonNetwork {
    source_port: u32,
    destination_port: u32,
    protocol: String,
    bytes_sent: u64,
    bytes_received: u64,
    device: String,
    rule_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JsonDatabase {
    system: String,
    database: String,
    db_user: String,
    operation: String,
    rows: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JsonChange {
    object_type: String,
    object_id: String,
    old_value: String,
    new_value: String,
    privilege: String,
    target_actor: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct JsonQuota {
    limit_name: String,
    limit: f64,
    observed: f64,
    throttled: bool,
}

fn enum_value(s: &str, prefix: &str, names: &[&str], field: &str) -> Result<i32, String> {
    if s.is_empty() {
        return Ok(0);
    }
    let short = s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase();
    names
        .iter()
        .position(|n| *n == short)
        .map(|i| i as i32 + 1)
        .ok_or_else(|| {
            format!(
                "{field}: unknown value `{s}` (expected one of {})",
                names.join(", ")
            )
        })
}

/// The idempotency key used for a line that has none: derived from the line's
/// number and bytes, so re-sending the same file stores nothing twice.
pub fn derived_key(line_number: u64, line: &str) -> String {
    let mut h = Sha256::new();
    h.update(line_number.to_be_bytes());
    h.update(line.as_bytes());
    format!("line-{}", hex::encode(&h.finalize()[..16]))
}

/// Parses one JSON line into an event (server-side validation still applies).
pub fn parse_line(line_number: u64, line: &str) -> Result<pb::Event, String> {
    let j: JsonEvent = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let attributes = j
        .attributes
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect();
    Ok(pb::Event {
        occurred_at: j.occurred_at.map(crate::grpc::convert::timestamp),
        idempotency_key: if j.idempotency_key.is_empty() {
            derived_key(line_number, line)
        } else {
            j.idempotency_key
        },
        outcome: enum_value(
            &j.outcome,
            "OUTCOME_",
            &["success", "failure", "unknown"],
            "outcome",
        )?,
        severity: enum_value(
            &j.severity,
            "SEVERITY_",
            &["info", "low", "medium", "high", "critical"],
            "severity",
        )?,
        event_type: j.event_type,
        actor: j.actor,
        action: j.action,
        resource: j.resource,
        source_ip: j.source_ip,
        destination_ip: j.destination_ip,
        source_system: j.source_system,
        service: j.service,
        environment: j.environment,
        http: j.http.map(|h| pb::HttpDetails {
            method: h.method,
            path: h.path,
            status_code: h.status_code,
            latency_ms: h.latency_ms,
            bytes_in: h.bytes_in,
            bytes_out: h.bytes_out,
            user_agent: h.user_agent,
            route: h.route,
        }),
        auth: j.auth.map(|a| pb::AuthDetails {
            method: a.method,
            mfa_used: a.mfa_used,
            mfa_method: a.mfa_method,
            failure_reason: a.failure_reason,
            session_id: a.session_id,
        }),
        network: j.network.map(|n| pb::NetworkDetails {
            source_port: n.source_port,
            destination_port: n.destination_port,
            protocol: n.protocol,
            bytes_sent: n.bytes_sent,
            bytes_received: n.bytes_received,
            device: n.device,
            rule_id: n.rule_id,
        }),
        database: j.database.map(|d| pb::DatabaseDetails {
            system: d.system,
            database: d.database,
            db_user: d.db_user,
            operation: d.operation,
            rows: d.rows,
        }),
        change: j.change.map(|c| pb::ChangeDetails {
            object_type: c.object_type,
            object_id: c.object_id,
            old_value: c.old_value,
            new_value: c.new_value,
            privilege: c.privilege,
            target_actor: c.target_actor,
        }),
        quota: j.quota.map(|q| pb::QuotaDetails {
            limit_name: q.limit_name,
            limit: q.limit,
            observed: q.observed,
            throttled: q.throttled,
        }),
        attributes,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_short_or_proto_enum_names() {
        let e = parse_line(
            1,
            r#"{"occurred_at":"2026-11-01T10:00:00Z","event_type":"user.login","outcome":"failure","severity":"SEVERITY_HIGH","source_ip":"10.0.0.1","auth":{"method":"password"},"attributes":{"n":3}}"#,
        )
        .unwrap();
        assert_eq!(e.outcome, pb::Outcome::Failure as i32);
        assert_eq!(e.severity, pb::Severity::High as i32);
        assert_eq!(e.attributes["n"], "3");
        assert!(e.idempotency_key.starts_with("line-"));
        assert!(
            parse_line(1, r#"{"outcome":"maybe"}"#)
                .unwrap_err()
                .contains("outcome")
        );
        assert!(
            parse_line(1, r#"{"bogus":1}"#)
                .unwrap_err()
                .contains("invalid JSON")
        );
        assert!(parse_line(1, "not json").is_err());
    }

    #[test]
    fn derived_keys_are_deterministic_and_positional() {
        assert_eq!(derived_key(1, "a"), derived_key(1, "a"));
        assert_ne!(derived_key(1, "a"), derived_key(2, "a"));
    }
}
