//! Conversions between domain types and `pb` messages, one function per direction.

use chrono::{DateTime, Utc};

use crate::domain::{ApiKey, Scope, ScopeSet, Tenant};
use crate::error::{AppError, AppResult};
use crate::grpc::pb;

/// A domain time as a protobuf timestamp.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A protobuf timestamp as a domain time; the error names `field`.
pub fn from_timestamp(ts: &prost_types::Timestamp, field: &str) -> AppResult<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(AppError::invalid(field, "nanos must be in 0..999999999"));
    }
    DateTime::from_timestamp(ts.seconds, ts.nanos as u32)
        .ok_or_else(|| AppError::invalid(field, "timestamp out of range"))
}

/// A recorded actor as clients see it: a bare API key id, `operator`,
/// `system` or `webhook:<source>`. Entries written before key ids were
/// recorded bare carry a `key:` prefix, dropped here.
pub fn actor_to_pb(actor: &str) -> String {
    actor.strip_prefix("key:").unwrap_or(actor).to_owned()
}

/// Domain scope to protobuf enum.
pub fn scope_to_pb(s: Scope) -> pb::Scope {
    match s {
        Scope::Ingest => pb::Scope::Ingest,
        Scope::Read => pb::Scope::Read,
        Scope::Respond => pb::Scope::Respond,
        Scope::Admin => pb::Scope::Admin,
    }
}

/// Protobuf scope values to a non-empty domain set; errors name `scopes[i]`.
pub fn scopes_from_pb(values: &[i32]) -> AppResult<ScopeSet> {
    let mut scopes = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let s = match pb::Scope::try_from(*v) {
            Ok(pb::Scope::Ingest) => Scope::Ingest,
            Ok(pb::Scope::Read) => Scope::Read,
            Ok(pb::Scope::Respond) => Scope::Respond,
            Ok(pb::Scope::Admin) => Scope::Admin,
            Ok(pb::Scope::Unspecified) | Err(_) => {
                return Err(AppError::invalid(format!("scopes[{i}]"), "unknown scope"));
            }
        };
        scopes.push(s);
    }
    if scopes.is_empty() {
        return Err(AppError::invalid(
            "scopes",
            "at least one scope is required",
        ));
    }
    Ok(scopes.into_iter().collect())
}

/// Domain tenant to protobuf.
pub fn tenant_to_pb(t: &Tenant) -> pb::Tenant {
    pb::Tenant {
        id: t.id.to_string(),
        name: t.name.clone(),
        display_name: t.display_name.clone(),
        retention_days: t.retention_days,
        created_at: Some(timestamp(t.created_at)),
    }
}

/// Domain API key (never its hash) to protobuf.
pub fn key_to_pb(k: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.to_string(),
        tenant_id: k.tenant_id.to_string(),
        name: k.name.clone(),
        scopes: k.scopes.iter().map(|s| scope_to_pb(s) as i32).collect(),
        created_at: Some(timestamp(k.created_at)),
        expires_at: k.expires_at.map(timestamp),
        revoked_at: k.revoked_at.map(timestamp),
    }
}

/// Domain webhook source (never its secret) to protobuf.
pub fn webhook_source_to_pb(w: &crate::domain::webhook::WebhookSource) -> pb::WebhookSource {
    pb::WebhookSource {
        id: w.id.to_string(),
        tenant_id: w.tenant_id.to_string(),
        name: w.name.clone(),
        allow_body_only_signature: w.allow_body_only_signature,
        created_at: Some(timestamp(w.created_at)),
        secret_rotated_at: Some(timestamp(w.secret_rotated_at)),
    }
}

/// Page size from a request: 0 means `default`, above `max` is an error.
pub fn page_size(requested: u32, default: u32, max: u32) -> AppResult<u32> {
    match requested {
        0 => Ok(default),
        n if n > max => Err(AppError::invalid("page_size", format!("at most {max}"))),
        n => Ok(n),
    }
}

/// An opaque keyset page token for "strictly older than (time, id)".
pub fn keyset_token(t: DateTime<Utc>, id: uuid::Uuid) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}.{id}", t.timestamp_micros()))
}

/// Parses a token made by [`keyset_token`].
pub fn parse_keyset_token(token: &str) -> AppResult<(DateTime<Utc>, uuid::Uuid)> {
    use base64::Engine;
    let bad = || AppError::invalid("page_token", "malformed page token");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (t, id) = raw.split_once('.').ok_or_else(bad)?;
    let t = t
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok((t, uuid::Uuid::parse_str(id).map_err(|_| bad())?))
}

/// Where a keyset page starts: strictly older than this (time, id).
pub type KeysetPosition = (DateTime<Utc>, uuid::Uuid);

/// A list query paged by keyset: rows strictly older than a position, newest
/// first.
pub trait KeysetQuery {
    /// What the query lists.
    type Row;
    /// Sets where the page starts and how many rows to fetch.
    fn set_page(&mut self, before: Option<KeysetPosition>, fetch: u32);
    /// A row's position in the order.
    fn position(row: &Self::Row) -> KeysetPosition;
}

impl KeysetQuery for crate::domain::alert::AlertQuery {
    type Row = crate::domain::alert::Alert;
    fn set_page(&mut self, before: Option<KeysetPosition>, fetch: u32) {
        (self.before, self.limit) = (before, fetch);
    }
    fn position(a: &Self::Row) -> KeysetPosition {
        (a.last_seen, a.id)
    }
}

impl KeysetQuery for crate::domain::incident::IncidentQuery {
    type Row = crate::domain::incident::Incident;
    fn set_page(&mut self, before: Option<KeysetPosition>, fetch: u32) {
        (self.before, self.limit) = (before, fetch);
    }
    fn position(i: &Self::Row) -> KeysetPosition {
        (i.updated_at, i.id)
    }
}

/// One page of a keyset-paged list RPC: `page_size` (0 means 100, at most
/// 1,000) rows after `page_token`, fetched by `fetch` (one extra row tells
/// whether there is a next page), and the next page's token (empty on the
/// last page).
pub async fn keyset_list<Q, F, Fut>(
    mut query: Q,
    page_size_requested: u32,
    page_token: &str,
    fetch: F,
) -> AppResult<(Vec<Q::Row>, String)>
where
    Q: KeysetQuery,
    F: FnOnce(Q) -> Fut,
    Fut: std::future::Future<Output = AppResult<Vec<Q::Row>>>,
{
    let limit = page_size(page_size_requested, 100, 1000)?;
    let before = match page_token {
        "" => None,
        token => Some(parse_keyset_token(token)?),
    };
    query.set_page(before, limit + 1);
    let mut rows = fetch(query).await?;
    if rows.len() <= limit as usize {
        return Ok((rows, String::new()));
    }
    rows.truncate(limit as usize);
    let next = rows.last().map_or_else(String::new, |last| {
        let (t, id) = Q::position(last);
        keyset_token(t, id)
    });
    Ok((rows, next))
}
