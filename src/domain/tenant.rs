//! Tenants, API keys and their scopes.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::FieldViolation;

/// Identifier of a tenant. Every tenant-owned row carries one.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct TenantId(pub Uuid);

impl TenantId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Parses the text form; the error names `field`.
    pub fn parse(s: &str, field: &str) -> Result<Self, FieldViolation> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| FieldViolation::new(field, "not a tenant id (UUID)"))
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A tenant name: 1..=64 bytes of `[a-z0-9-]`, starting with a letter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantName(String);

impl TenantName {
    /// Validates a tenant name; the error names `field`.
    pub fn parse(s: &str, field: &str) -> Result<Self, FieldViolation> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let starts_alpha = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
        if s.is_empty() || s.len() > 64 || !ok_chars || !starts_alpha {
            return Err(FieldViolation::new(
                field,
                "must be 1 to 64 characters of a-z, 0-9 and '-', starting with a letter",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tenant: an isolated customer or organisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Its id.
    pub id: TenantId,
    /// Unique name.
    pub name: String,
    /// Human-facing name.
    pub display_name: String,
    /// Event retention in days; 0 keeps events forever.
    pub retention_days: u32,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Send events.
    Ingest,
    /// Read events, alerts, incidents, reports.
    Read,
    /// Triage alerts and incidents, run playbooks.
    Respond,
    /// Administer the tenant.
    Admin,
}

impl Scope {
    /// All scopes, in order.
    pub const ALL: [Scope; 4] = [Scope::Ingest, Scope::Read, Scope::Respond, Scope::Admin];

    /// The scope's name as used on the command line and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Respond => "respond",
            Scope::Admin => "admin",
        }
    }

    /// Parses a scope name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|sc| sc.as_str() == s.trim())
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A non-empty set of scopes, stored as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ScopeSet(u8);

impl ScopeSet {
    /// Every scope (the operator's).
    pub fn all() -> Self {
        Self::from_iter(Scope::ALL)
    }

    /// Whether `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The scopes in the set, in order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// The bit mask stored in the database.
    pub fn bits(self) -> i64 {
        i64::from(self.0)
    }

    /// Rebuilds a set from stored bits, ignoring unknown bits.
    pub fn from_bits(bits: i64) -> Self {
        Self((bits & 0b1111) as u8)
    }

    /// Parses a comma-separated list such as `ingest,read`.
    pub fn parse_list(s: &str) -> Result<Self, String> {
        let mut set = Self::default();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let scope = Scope::parse(part).ok_or_else(|| {
                format!(
                    "unknown scope `{}` (expected ingest, read, respond, admin)",
                    part.trim()
                )
            })?;
            set.0 |= scope.bit();
        }
        if set.is_empty() {
            return Err("at least one scope is required".into());
        }
        Ok(set)
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Self(iter.into_iter().fold(0, |acc, s| acc | s.bit()))
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.iter().map(Scope::as_str).collect();
        f.write_str(&names.join(","))
    }
}

/// Public identifier of an API key: 16 lowercase hex characters. It is the
/// first part of the secret (`pk_<id>_<secret>`), so lookups need no scan.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiKeyId(String);

impl ApiKeyId {
    /// Validates a key id.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An API key as stored: metadata plus the keyed hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Public id.
    pub id: ApiKeyId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Human label.
    pub name: String,
    /// What it may do.
    pub scopes: ScopeSet,
    /// HMAC-SHA256 of the full secret under the server's key-hashing secret.
    pub secret_hash: Vec<u8>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Expiry; `None` never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// Revocation time; `None` if active.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether the key may be used at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// What is needed to create an API key (the id and hash come from `auth`).
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Human label.
    pub name: String,
    /// Scopes; never empty.
    pub scopes: ScopeSet,
    /// Expiry, if any.
    pub expires_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_validated() {
        assert!(TenantName::parse("acme-1", "name").is_ok());
        for bad in ["", "1acme", "Acme", "a b", &"a".repeat(65)] {
            assert!(TenantName::parse(bad, "name").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn scope_lists_round_trip() {
        let s = ScopeSet::parse_list("read, ingest").unwrap();
        assert!(s.contains(Scope::Read) && s.contains(Scope::Ingest));
        assert!(!s.contains(Scope::Admin));
        assert_eq!(s.to_string(), "ingest,read");
        assert_eq!(ScopeSet::from_bits(s.bits()), s);
        assert!(ScopeSet::parse_list("").is_err());
        assert!(
            ScopeSet::parse_list("read,root")
                .unwrap_err()
                .contains("root")
        );
    }
}
