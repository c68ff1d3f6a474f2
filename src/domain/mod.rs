//! Domain types: tenants, API keys, scopes, severities, ids, time ranges.
//!
//! **Architecture invariant:** nothing here does IO or knows tonic, prost or sqlx.
//! Constructors validate ("parse, don't validate"): a value of these types is
//! always well-formed.

pub mod alert;
pub mod decision;
pub mod event;
pub mod incident;
pub mod playbook;
pub mod report;
pub mod rule;
pub mod tenant;
pub mod webhook;

pub use tenant::{ApiKey, ApiKeyId, NewApiKey, Scope, ScopeSet, Tenant, TenantId, TenantName};

/// A violated rule on one input field, reported to clients as a
/// `google.rpc.BadRequest.FieldViolation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field relative to the request, e.g. `events[3].source_ip`.
    pub field: String,
    /// Why the value was refused, in plain words.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field` with `description`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Severity, ordered from least to most severe (matches `picket.v1.Severity`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Severity {
    /// Routine activity.
    #[default]
    Info = 1,
    /// Worth recording.
    Low = 2,
    /// Look within a working day.
    Medium = 3,
    /// Look within the hour.
    High = 4,
    /// Page someone.
    Critical = 5,
}

impl Severity {
    /// The numeric level stored in the database (1..=5).
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// Parses a stored level.
    pub fn from_i16(v: i16) -> Option<Self> {
        Some(match v {
            1 => Self::Info,
            2 => Self::Low,
            3 => Self::Medium,
            4 => Self::High,
            5 => Self::Critical,
            _ => return None,
        })
    }
}
