//! A tenant's detection rule settings.

use chrono::{DateTime, Utc};

use crate::domain::TenantId;

/// A tenant's own Sigma rule, or its enable/disable override of a built-in or
/// directory rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRule {
    /// Owner.
    pub tenant_id: TenantId,
    /// The Sigma `id`.
    pub rule_id: String,
    /// The Sigma `title`.
    pub title: String,
    /// The rule text for the tenant's own rules; `None` for an override.
    pub sigma_yaml: Option<String>,
    /// Whether it is evaluated for the tenant.
    pub enabled: bool,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// A fitted anomaly model as stored per tenant and algorithm.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredModel {
    /// Owner.
    pub tenant_id: TenantId,
    /// `ecod` or `iforest`.
    pub algorithm: String,
    /// When it was trained.
    pub trained_at: DateTime<Utc>,
    /// How many windows it was trained on.
    pub windows: u32,
    /// Its contamination-based threshold.
    pub threshold: f64,
    /// The model in the anomaly module's versioned byte format.
    pub bytes: Vec<u8>,
}
