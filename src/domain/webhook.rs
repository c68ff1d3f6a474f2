//! Webhook sources: third-party systems that post signed alerts to
//! `POST /v1/webhooks/{name}`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::alert::Alert;
use crate::domain::{FieldViolation, TenantId};

/// A source name: 1..=64 bytes of `[a-z0-9-]` (it appears in the URL path).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WebhookSourceName(String);

impl WebhookSourceName {
    /// Validates a source name; the error names `field`.
    pub fn parse(s: &str, field: &str) -> Result<Self, FieldViolation> {
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if s.is_empty() || s.len() > 64 || !ok_chars {
            return Err(FieldViolation::new(
                field,
                "must be 1 to 64 characters of a-z, 0-9 and '-'",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored webhook source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSource {
    /// Owner: every alert it delivers belongs to this tenant.
    pub tenant_id: TenantId,
    /// Server-assigned id.
    pub id: Uuid,
    /// Unique across the server (it is the URL path segment).
    pub name: String,
    /// The signing secret sealed by `webhook::SecretBox` (never the secret in
    /// clear); opened only to verify a delivery's signature.
    pub sealed_secret: Vec<u8>,
    /// Whether the replayable body-only `X-Signature` form is accepted.
    pub allow_body_only_signature: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When the secret was last replaced (creation time until the first rotation).
    pub secret_rotated_at: DateTime<Utc>,
}

/// What a delivery did to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// The delivery id was seen before: nothing was written.
    Duplicate,
    /// The alert it raised (or folded into), and whether it was created.
    Raised(Box<Alert>, bool),
}
