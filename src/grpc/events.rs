//! Conversions for the event aggregate: `pb::Event` ⇄ [`NewEvent`], filters,
//! feed cursors and page tokens. Failed conversions name the exact field path
//! relative to the event (`source_ip`, `http.status_code`, `attributes["k"]`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use prost::Message;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::event::{
    self, AuthDetails, ChangeDetails, DatabaseDetails, EventInput, EventQuery, FeedPosition,
    HttpDetails, NetworkDetails, NewEvent, Outcome, QuotaDetails, check_len,
};
use crate::domain::{FieldViolation, Severity, TenantId};
use crate::error::{AppError, AppResult};
use crate::grpc::convert::{from_timestamp, timestamp};
use crate::grpc::pb;

/// Severity from the protobuf enum; unset normalizes to INFO.
pub fn severity_from_pb(v: i32, field: &str) -> Result<Severity, FieldViolation> {
    match pb::Severity::try_from(v) {
        Ok(pb::Severity::Unspecified) | Ok(pb::Severity::Info) => Ok(Severity::Info),
        Ok(pb::Severity::Low) => Ok(Severity::Low),
        Ok(pb::Severity::Medium) => Ok(Severity::Medium),
        Ok(pb::Severity::High) => Ok(Severity::High),
        Ok(pb::Severity::Critical) => Ok(Severity::Critical),
        Err(_) => Err(FieldViolation::new(
            field,
            format!("unknown severity value {v}"),
        )),
    }
}

/// Domain severity to protobuf.
pub fn severity_to_pb(s: Severity) -> pb::Severity {
    match s {
        Severity::Info => pb::Severity::Info,
        Severity::Low => pb::Severity::Low,
        Severity::Medium => pb::Severity::Medium,
        Severity::High => pb::Severity::High,
        Severity::Critical => pb::Severity::Critical,
    }
}

/// Outcome from the protobuf enum; unset normalizes to UNKNOWN.
pub fn outcome_from_pb(v: i32, field: &str) -> Result<Outcome, FieldViolation> {
    match pb::Outcome::try_from(v) {
        Ok(pb::Outcome::Unspecified) | Ok(pb::Outcome::Unknown) => Ok(Outcome::Unknown),
        Ok(pb::Outcome::Success) => Ok(Outcome::Success),
        Ok(pb::Outcome::Failure) => Ok(Outcome::Failure),
        Err(_) => Err(FieldViolation::new(
            field,
            format!("unknown outcome value {v}"),
        )),
    }
}

fn outcome_to_pb(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Success => pb::Outcome::Success,
        Outcome::Failure => pb::Outcome::Failure,
        Outcome::Unknown => pb::Outcome::Unknown,
    }
}

/// Validates and normalizes one incoming event (see [`NewEvent::parse`]);
/// the error is the first violation, as a receipt shows it. `retention_days`
/// is the tenant's; `now` stamps received_at.
pub fn event_from_pb(
    e: &pb::Event,
    now: DateTime<Utc>,
    retention_days: u32,
) -> Result<NewEvent, FieldViolation> {
    NewEvent::parse(event_input_from_pb(e), now, retention_days)
        .map_err(|mut violations| violations.swap_remove(0))
}

/// Maps a protobuf event onto the domain's input, field by field; every rule
/// is the domain's.
pub fn event_input_from_pb(e: &pb::Event) -> EventInput {
    EventInput {
        size_bytes: e.encoded_len(),
        occurred_at: e.occurred_at.as_ref().map(|ts| {
            from_timestamp(ts, "occurred_at").map_err(|err| match err {
                AppError::InvalidArgument(mut v) if !v.is_empty() => v.swap_remove(0).description,
                _ => "invalid timestamp".into(),
            })
        }),
        event_type: e.event_type.clone(),
        idempotency_key: e.idempotency_key.clone(),
        actor: e.actor.clone(),
        action: e.action.clone(),
        resource: e.resource.clone(),
        outcome: outcome_from_pb(e.outcome, "outcome").map_err(|v| v.description),
        severity: severity_from_pb(e.severity, "severity").map_err(|v| v.description),
        source_ip: e.source_ip.clone(),
        destination_ip: e.destination_ip.clone(),
        source_system: e.source_system.clone(),
        service: e.service.clone(),
        environment: e.environment.clone(),
        http: e.http.as_ref().map(|h| HttpDetails {
            method: h.method.clone(),
            path: h.path.clone(),
            status_code: h.status_code,
            latency_ms: h.latency_ms,
            bytes_in: h.bytes_in,
            bytes_out: h.bytes_out,
            user_agent: h.user_agent.clone(),
            route: h.route.clone(),
        }),
        auth: e.auth.as_ref().map(|a| AuthDetails {
            method: a.method.clone(),
            mfa_used: a.mfa_used,
            mfa_method: a.mfa_method.clone(),
            failure_reason: a.failure_reason.clone(),
            session_id: a.session_id.clone(),
        }),
        network: e.network.as_ref().map(|n| NetworkDetails {
            source_port: n.source_port,
            destination_port: n.destination_port,
            protocol: n.protocol.clone(),
            bytes_sent: n.bytes_sent,
            bytes_received: n.bytes_received,
            device: n.device.clone(),
            rule_id: n.rule_id.clone(),
        }),
        database: e.database.as_ref().map(|d| DatabaseDetails {
            system: d.system.clone(),
            database: d.database.clone(),
            db_user: d.db_user.clone(),
            operation: d.operation.clone(),
            rows: d.rows,
        }),
        change: e.change.as_ref().map(|c| ChangeDetails {
            object_type: c.object_type.clone(),
            object_id: c.object_id.clone(),
            old_value: c.old_value.clone(),
            new_value: c.new_value.clone(),
            privilege: c.privilege.clone(),
            target_actor: c.target_actor.clone(),
        }),
        quota: e.quota.as_ref().map(|q| QuotaDetails {
            limit_name: q.limit_name.clone(),
            limit: q.limit,
            observed: q.observed,
            throttled: q.throttled,
        }),
        attributes: e
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// A stored event as protobuf.
pub fn event_to_pb(e: &NewEvent) -> pb::Event {
    event_into_pb(e.clone())
}

/// A stored event as protobuf, its strings moved rather than copied (the
/// export's path, which owns the events it sends).
pub fn event_into_pb(e: NewEvent) -> pb::Event {
    let d = e.details;
    pb::Event {
        id: e.id.to_string(),
        occurred_at: Some(timestamp(e.occurred_at)),
        received_at: Some(timestamp(e.received_at)),
        event_type: e.event_type,
        idempotency_key: d.idempotency_key,
        actor: e.actor,
        action: e.action,
        resource: e.resource,
        outcome: outcome_to_pb(e.outcome) as i32,
        severity: severity_to_pb(e.severity) as i32,
        source_ip: e.source_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        destination_ip: e
            .destination_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        source_system: e.source_system,
        service: e.service,
        environment: e.environment,
        http: d.http.map(|h| pb::HttpDetails {
            method: h.method,
            path: h.path,
            status_code: h.status_code,
            latency_ms: h.latency_ms,
            bytes_in: h.bytes_in,
            bytes_out: h.bytes_out,
            user_agent: h.user_agent,
            route: h.route,
        }),
        auth: d.auth.map(|a| pb::AuthDetails {
            method: a.method,
            mfa_used: a.mfa_used,
            mfa_method: a.mfa_method,
            failure_reason: a.failure_reason,
            session_id: a.session_id,
        }),
        network: d.network.map(|n| pb::NetworkDetails {
            source_port: n.source_port,
            destination_port: n.destination_port,
            protocol: n.protocol,
            bytes_sent: n.bytes_sent,
            bytes_received: n.bytes_received,
            device: n.device,
            rule_id: n.rule_id,
        }),
        database: d.database.map(|x| pb::DatabaseDetails {
            system: x.system,
            database: x.database,
            db_user: x.db_user,
            operation: x.operation,
            rows: x.rows,
        }),
        change: d.change.map(|c| pb::ChangeDetails {
            object_type: c.object_type,
            object_id: c.object_id,
            old_value: c.old_value,
            new_value: c.new_value,
            privilege: c.privilege,
            target_actor: c.target_actor,
        }),
        quota: d.quota.map(|q| pb::QuotaDetails {
            limit_name: q.limit_name,
            limit: q.limit,
            observed: q.observed,
            throttled: q.throttled,
        }),
        attributes: d.attributes.into_iter().collect(),
        ocsf_class_uid: e.ocsf_class_uid,
        ocsf_category_uid: e.ocsf_category_uid,
    }
}

/// A filter (and optional time range) as a domain query; errors name `prefix.field`.
pub fn query_from_pb(
    filter: Option<&pb::EventFilter>,
    range: Option<&pb::TimeRange>,
    prefix: &str,
) -> AppResult<EventQuery> {
    let mut q = EventQuery::default();
    if let Some(r) = range {
        q.start = r
            .start
            .as_ref()
            .map(|t| from_timestamp(t, "time_range.start"))
            .transpose()?;
        q.end = r
            .end
            .as_ref()
            .map(|t| from_timestamp(t, "time_range.end"))
            .transpose()?;
        if let (Some(s), Some(e)) = (q.start, q.end)
            && e <= s
        {
            return Err(AppError::invalid(
                "time_range.end",
                "must be after time_range.start",
            ));
        }
    }
    let Some(f) = filter else { return Ok(q) };
    let field = |name: &str| format!("{prefix}.{name}");
    if f.event_types.len() > 32 {
        return Err(AppError::invalid(field("event_types"), "at most 32"));
    }
    if f.ocsf_class_uids.len() > 32 {
        return Err(AppError::invalid(field("ocsf_class_uids"), "at most 32"));
    }
    for (i, t) in f.event_types.iter().enumerate() {
        event::check_event_type(t, &field(&format!("event_types[{i}]")))?;
    }
    q.event_types = f.event_types.clone();
    q.ocsf_class_uids = f.ocsf_class_uids.clone();
    for (v, name) in [(&f.actor, "actor"), (&f.resource_prefix, "resource_prefix")] {
        check_len(v, event::MAX_STRING, &field(name))?;
    }
    q.actor = (!f.actor.is_empty()).then(|| f.actor.clone());
    q.resource_prefix = (!f.resource_prefix.is_empty()).then(|| f.resource_prefix.clone());
    q.source_ip = event::parse_ip(&f.source_ip, &field("source_ip"))?;
    q.outcome = match f.outcome {
        0 => None,
        v => Some(outcome_from_pb(v, &field("outcome"))?),
    };
    q.min_severity = match f.min_severity {
        0 => None,
        v => Some(severity_from_pb(v, &field("min_severity"))?),
    };
    Ok(q)
}

/// First 8 hex characters of SHA-256 over `parts`: binds cursors and page
/// tokens to a tenant (and a query) without revealing either.
fn tag(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..4])
}

/// Encodes a feed position as an opaque cursor bound to `tenant`.
pub fn encode_cursor(kind: &str, tenant: TenantId, pos: FeedPosition) -> String {
    let t = tag(&[kind.as_bytes(), tenant.0.as_bytes()]);
    URL_SAFE_NO_PAD.encode(format!("{kind}.{t}.{}.{}", pos.xid, pos.seq))
}

/// Decodes a cursor made by [`encode_cursor`] for the same kind and tenant.
pub fn decode_cursor(
    kind: &str,
    tenant: TenantId,
    cursor: &str,
    field: &str,
) -> AppResult<FeedPosition> {
    let bad = || {
        AppError::invalid(
            field,
            "not a cursor issued by this server for this stream and tenant",
        )
    };
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = raw.split('.');
    let (Some(k), Some(t), Some(xid), Some(seq), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad());
    };
    if k != kind || t != tag(&[kind.as_bytes(), tenant.0.as_bytes()]) {
        return Err(bad());
    }
    Ok(FeedPosition {
        xid: xid.parse().map_err(|_| bad())?,
        seq: seq.parse().map_err(|_| bad())?,
    })
}

/// What a QueryEvents page token carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventPageToken {
    /// Keyset: the last row of the previous page.
    pub before: (DateTime<Utc>, Uuid),
    /// The query is pinned to events received up to the first page's read.
    pub received_before: DateTime<Utc>,
}

/// Binds a page token to the request's filter and time range.
fn query_tag(
    kind: &str,
    tenant: TenantId,
    filter: Option<&pb::EventFilter>,
    range: Option<&pb::TimeRange>,
) -> String {
    let f = filter.map(Message::encode_to_vec).unwrap_or_default();
    let r = range.map(Message::encode_to_vec).unwrap_or_default();
    tag(&[kind.as_bytes(), tenant.0.as_bytes(), &f, &r])
}

/// Encodes a page token.
pub fn encode_page_token(
    tenant: TenantId,
    filter: Option<&pb::EventFilter>,
    range: Option<&pb::TimeRange>,
    token: EventPageToken,
) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}.{}.{}.{}",
        query_tag("events", tenant, filter, range),
        token.before.0.timestamp_micros(),
        token.before.1,
        token.received_before.timestamp_micros()
    ))
}

/// Decodes a page token; it must come from the same tenant, filter and range.
pub fn decode_page_token(
    tenant: TenantId,
    filter: Option<&pb::EventFilter>,
    range: Option<&pb::TimeRange>,
    token: &str,
) -> AppResult<EventPageToken> {
    let bad = || {
        AppError::invalid(
            "page_token",
            "not a page token for this query (filter and time range must not change)",
        )
    };
    let raw =
        String::from_utf8(URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?).map_err(|_| bad())?;
    let parts: Vec<&str> = raw.split('.').collect();
    let [t, at, id, recv] = parts.as_slice() else {
        return Err(bad());
    };
    if *t != query_tag("events", tenant, filter, range) {
        return Err(bad());
    }
    let micros = |s: &str| {
        s.parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
    };
    Ok(EventPageToken {
        before: (
            micros(at).ok_or_else(bad)?,
            Uuid::parse_str(id).map_err(|_| bad())?,
        ),
        received_before: micros(recv).ok_or_else(bad)?,
    })
}

/// What an ExportEvents cursor carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportCursor {
    /// Keyset: the last event delivered.
    pub after: (DateTime<Utc>, Uuid),
    /// The export is pinned to events received up to the moment it first opened.
    pub received_before: DateTime<Utc>,
}

/// Encodes an export cursor, bound to the tenant, filter and time range.
pub fn encode_export_cursor(
    tenant: TenantId,
    filter: Option<&pb::EventFilter>,
    range: Option<&pb::TimeRange>,
    c: ExportCursor,
) -> String {
    ExportCursors::new(tenant, filter, range, c.received_before).encode(c.after)
}

/// The cursors of one export: the digest binding them to the tenant,
/// filter and range is computed once, not once per event.
#[derive(Debug, Clone)]
pub struct ExportCursors {
    /// `query_tag("export", …)` of the export.
    tag: String,
    /// The export's pinned `received_before`.
    received_before: DateTime<Utc>,
}

impl ExportCursors {
    /// The cursors of an export of `tenant` with this filter and range,
    /// pinned to `received_before`.
    pub fn new(
        tenant: TenantId,
        filter: Option<&pb::EventFilter>,
        range: Option<&pb::TimeRange>,
        received_before: DateTime<Utc>,
    ) -> Self {
        Self {
            tag: query_tag("export", tenant, filter, range),
            received_before,
        }
    }

    /// The cursor resuming after the event at `after` (occurred_at, id).
    pub fn encode(&self, after: (DateTime<Utc>, Uuid)) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{}.{}.{}.{}",
            self.tag,
            after.0.timestamp_micros(),
            after.1,
            self.received_before.timestamp_micros()
        ))
    }
}

/// Decodes an export cursor; it must come from the same tenant, filter and range.
pub fn decode_export_cursor(
    tenant: TenantId,
    filter: Option<&pb::EventFilter>,
    range: Option<&pb::TimeRange>,
    cursor: &str,
) -> AppResult<ExportCursor> {
    let bad = || {
        AppError::invalid(
            "after_cursor",
            "not an export cursor for this query (filter and time range must not change)",
        )
    };
    let raw =
        String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?).map_err(|_| bad())?;
    let parts: Vec<&str> = raw.split('.').collect();
    let [t, at, id, recv] = parts.as_slice() else {
        return Err(bad());
    };
    if *t != query_tag("export", tenant, filter, range) {
        return Err(bad());
    }
    let micros = |s: &str| {
        s.parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
    };
    Ok(ExportCursor {
        after: (
            micros(at).ok_or_else(bad)?,
            Uuid::parse_str(id).map_err(|_| bad())?,
        ),
        received_before: micros(recv).ok_or_else(bad)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> pb::Event {
        pb::Event {
            occurred_at: Some(timestamp(Utc::now())),
            event_type: "user.login".into(),
            ..Default::default()
        }
    }

    #[test]
    fn events_round_trip_through_the_domain() {
        let mut e = minimal();
        e.source_ip = "2001:DB8::0:1".into();
        e.http = Some(pb::HttpDetails {
            method: "get".into(),
            status_code: 404,
            ..Default::default()
        });
        e.attributes.insert("k".into(), "v".into());
        let d = event_from_pb(&e, Utc::now(), 0).unwrap();
        assert_eq!(d.source_ip.unwrap().to_string(), "2001:db8::1");
        assert_eq!(d.ocsf_class_uid, 3002);
        let back = event_to_pb(&d);
        assert_eq!(back.source_ip, "2001:db8::1");
        assert_eq!(back.http.unwrap().method, "GET");
        assert_eq!(back.attributes["k"], "v");
        assert_eq!(back.severity, pb::Severity::Info as i32);
    }

    #[test]
    fn rejections_name_the_field() {
        let now = Utc::now();
        let field = |f: &dyn Fn(&mut pb::Event)| {
            let mut e = minimal();
            f(&mut e);
            event_from_pb(&e, now, 0).unwrap_err().field
        };
        assert_eq!(field(&|e| e.occurred_at = None), "occurred_at");
        assert_eq!(field(&|e| e.event_type = "Bad Type".into()), "event_type");
        assert_eq!(field(&|e| e.source_ip = "999.1.1.1".into()), "source_ip");
        assert_eq!(field(&|e| e.severity = 42), "severity");
        assert_eq!(field(&|e| e.outcome = -1), "outcome");
        assert_eq!(
            field(&|e| e.http = Some(pb::HttpDetails {
                status_code: 700,
                ..Default::default()
            })),
            "http.status_code"
        );
        assert_eq!(
            field(&|e| e.network = Some(pb::NetworkDetails {
                destination_port: 70000,
                ..Default::default()
            })),
            "network.destination_port"
        );
    }

    #[test]
    fn cursors_are_bound_to_their_tenant() {
        let a = TenantId::new();
        let b = TenantId::new();
        let pos = FeedPosition { xid: 77, seq: 12 };
        let c = encode_cursor("ev", a, pos);
        assert_eq!(decode_cursor("ev", a, &c, "f").unwrap(), pos);
        assert!(decode_cursor("ev", b, &c, "f").is_err());
        assert!(decode_cursor("al", a, &c, "f").is_err());
        assert!(decode_cursor("ev", a, "garbage", "f").is_err());
    }
}
