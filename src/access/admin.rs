//! Tenant and API key administration, shared by `AdminService` and the
//! `picket admin` command line so both behave the same.

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use crate::access::auth::{self, KeyHasher};
use crate::domain::{ApiKey, ApiKeyId, NewApiKey, Tenant, TenantId, TenantName};
use crate::error::{AppError, AppResult};
use crate::storage::Store;

/// Longest display name, in bytes.
const MAX_DISPLAY_NAME: usize = 256;
/// Longest key label, in bytes.
const MAX_KEY_NAME: usize = 128;
/// Longest retention, in days.
const MAX_RETENTION_DAYS: u32 = 3650;

/// Checks a display name; the error names `field`.
pub fn check_display_name(s: &str, field: &str) -> AppResult<()> {
    if s.len() > MAX_DISPLAY_NAME {
        return Err(AppError::invalid(
            field,
            format!("at most {MAX_DISPLAY_NAME} bytes"),
        ));
    }
    Ok(())
}

/// Checks a retention period; the error names `field`.
pub fn check_retention(days: u32, field: &str) -> AppResult<()> {
    if days > MAX_RETENTION_DAYS {
        return Err(AppError::invalid(
            field,
            format!("at most {MAX_RETENTION_DAYS} days (0 keeps events forever)"),
        ));
    }
    Ok(())
}

/// Creates a tenant.
pub async fn create_tenant(
    store: &dyn Store,
    name: &str,
    display_name: &str,
    retention_days: u32,
) -> AppResult<Tenant> {
    let name = TenantName::parse(name, "name")?;
    check_display_name(display_name, "display_name")?;
    check_retention(retention_days, "retention_days")?;
    let tenant = Tenant {
        id: TenantId::new(),
        name: name.as_str().to_owned(),
        display_name: if display_name.is_empty() {
            name.as_str()
        } else {
            display_name
        }
        .to_owned(),
        retention_days,
        created_at: Utc::now(),
    };
    store.create_tenant(&tenant).await?;
    tracing::info!(tenant_id = %tenant.id, tenant = %tenant.name, "tenant created");
    Ok(tenant)
}

/// Finds a tenant by id or, failing that, by name (command-line convenience).
pub async fn resolve_tenant(store: &dyn Store, reference: &str) -> AppResult<Tenant> {
    if let Ok(id) = TenantId::parse(reference, "tenant") {
        return Ok(store.get_tenant(id).await?);
    }
    store
        .find_tenant_by_name(reference)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("tenant `{reference}`")))
}

/// Creates an API key; returns its record and the secret to show once.
pub async fn create_key(
    store: &dyn Store,
    hasher: &KeyHasher,
    new: NewApiKey,
) -> AppResult<(ApiKey, SecretString)> {
    if new.name.len() > MAX_KEY_NAME {
        return Err(AppError::invalid(
            "name",
            format!("at most {MAX_KEY_NAME} bytes"),
        ));
    }
    if new.scopes.is_empty() {
        return Err(AppError::invalid(
            "scopes",
            "at least one scope is required",
        ));
    }
    let now = Utc::now();
    if new.expires_at.is_some_and(|e| e <= now) {
        return Err(AppError::invalid("expires_at", "must be in the future"));
    }
    let generated = auth::generate_key();
    let key = ApiKey {
        id: generated.id,
        tenant_id: new.tenant_id,
        name: new.name,
        scopes: new.scopes,
        secret_hash: hasher.hash(secrecy::ExposeSecret::expose_secret(&generated.secret)),
        created_at: now,
        expires_at: new.expires_at,
        revoked_at: None,
    };
    store.create_api_key(&key).await?;
    tracing::info!(tenant_id = %key.tenant_id, key_id = %key.id, scopes = %key.scopes, "api key created");
    Ok((key, generated.secret))
}

/// Revokes a key. `tenant` restricts it to one tenant (tenant admins); `None`
/// (the operator) may revoke any key.
pub async fn revoke_key(
    store: &dyn Store,
    tenant: Option<TenantId>,
    key_id: &str,
) -> AppResult<ApiKey> {
    let id = ApiKeyId::parse(key_id)
        .ok_or_else(|| AppError::invalid("key_id", "not an API key id (16 hex characters)"))?;
    let owner = match tenant {
        Some(t) => t,
        None => {
            store
                .find_api_key(&id)
                .await?
                .ok_or_else(|| AppError::NotFound(format!("api key {id}")))?
                .tenant_id
        }
    };
    let key = store.revoke_api_key(owner, &id, Utc::now()).await?;
    tracing::info!(tenant_id = %key.tenant_id, key_id = %key.id, "api key revoked");
    Ok(key)
}

/// Parses an expiry given on the command line: RFC 3339 or a duration such as `30d`, `12h`.
pub fn parse_expiry(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| format!("`{s}` is neither RFC 3339 nor a duration like 30d"))?;
    let d = match unit {
        "d" => chrono::Duration::days(n),
        "h" => chrono::Duration::hours(n),
        "m" => chrono::Duration::minutes(n),
        _ => return Err(format!("unknown unit in `{s}` (use d, h or m)")),
    };
    Ok(now + d)
}
