//! Alerts: what detection rules, anomaly models and webhooks raise, with their
//! evidence, and the triage state machine.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::event::NewEvent;
use crate::domain::{Severity, TenantId};

/// Most evidence events kept on one alert.
pub const MAX_EVIDENCE: usize = 100;

/// Triage status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AlertStatus {
    /// Nobody has looked yet.
    New = 1,
    /// Someone is looking.
    Acknowledged = 2,
    /// Dealt with.
    Resolved = 3,
    /// Not a real threat.
    FalsePositive = 4,
}

impl AlertStatus {
    /// Stored value.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// From the stored value.
    pub fn from_i16(v: i16) -> Option<Self> {
        Some(match v {
            1 => Self::New,
            2 => Self::Acknowledged,
            3 => Self::Resolved,
            4 => Self::FalsePositive,
            _ => return None,
        })
    }

    /// Whether a new detection with the same fingerprint folds into this alert.
    pub fn is_open(self) -> bool {
        matches!(self, Self::New | Self::Acknowledged)
    }
}

/// What raised an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SourceKind {
    /// A Sigma rule.
    Rule = 1,
    /// An anomaly model.
    Model = 2,
    /// A signed webhook.
    Webhook = 3,
    /// A person.
    Manual = 4,
}

impl SourceKind {
    /// Stored value.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// From the stored value.
    pub fn from_i16(v: i16) -> Option<Self> {
        Some(match v {
            1 => Self::Rule,
            2 => Self::Model,
            3 => Self::Webhook,
            4 => Self::Manual,
            _ => return None,
        })
    }
}

/// Kind of entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EntityKind {
    /// User or service identity.
    Actor,
    /// IP address.
    Ip,
    /// Service.
    Service,
    /// Host.
    Host,
    /// Resource.
    Resource,
}

/// A thing an alert is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Entity {
    /// What kind.
    pub kind: EntityKind,
    /// Its identifier.
    #[serde(default)]
    pub value: String,
}

impl Entity {
    /// An entity; the value is cut to 256 bytes on a character boundary.
    pub fn new(kind: EntityKind, value: impl Into<String>) -> Self {
        let mut value = value.into();
        if value.len() > 256 {
            let mut end = 256;
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            value.truncate(end);
        }
        Self { kind, value }
    }
}

/// One evidence event: id plus the event as it was when the alert was raised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// The stored event's id.
    pub event_id: Uuid,
    /// Snapshot, so evidence survives retention. Stored documents carry
    /// none: the store keeps each event's snapshot once, beside the alerts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<NewEvent>,
}

/// A feature value of an anomalous window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureValue {
    /// Feature name.
    #[serde(default)]
    pub name: String,
    /// Value.
    #[serde(default)]
    pub value: f64,
    /// Contribution to the score.
    #[serde(default)]
    pub contribution: f64,
}

/// One status change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// Before.
    pub from: AlertStatus,
    /// After.
    pub to: AlertStatus,
    /// Who.
    #[serde(default)]
    pub by: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Why.
    #[serde(default)]
    pub note: String,
}

/// What a detection hands to the store to raise (or fold into) an alert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlert {
    /// Title.
    pub title: String,
    /// Summary.
    pub summary: String,
    /// Severity.
    pub severity: Severity,
    /// Category, e.g. `authentication`.
    pub category: String,
    /// What raised it.
    pub source_kind: SourceKind,
    /// Rule id, model name or webhook source.
    pub source_name: String,
    /// Anomaly score (models), else 0.
    pub anomaly_score: f64,
    /// Threshold (models), else 0.
    pub anomaly_threshold: f64,
    /// Entities.
    pub entities: Vec<Entity>,
    /// Evidence (at most [`MAX_EVIDENCE`] kept).
    pub evidence: Vec<Evidence>,
    /// Feature values (models).
    pub features: Vec<FeatureValue>,
    /// ATT&CK techniques.
    pub attack_techniques: Vec<String>,
    /// Earliest evidence time.
    pub first_seen: DateTime<Utc>,
    /// Latest evidence time.
    pub last_seen: DateTime<Utc>,
    /// Suppression key: same fingerprint within the window folds into one alert.
    pub fingerprint: String,
    /// The sender's own JSON (webhooks), kept with the alert as delivered.
    pub raw: Option<serde_json::Value>,
}

/// The parts of an alert stored as one JSON document.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AlertBody {
    /// Entities.
    pub entities: Vec<Entity>,
    /// Evidence.
    pub evidence: Vec<Evidence>,
    /// Features.
    pub features: Vec<FeatureValue>,
    /// Techniques.
    pub attack_techniques: Vec<String>,
    /// Status history.
    pub history: Vec<StatusChange>,
    /// The sender's JSON of the latest webhook delivery folded in (webhook
    /// alerts only; kept in the stored document, not yet in the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<serde_json::Value>,
}

/// A stored alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Owner.
    pub tenant_id: TenantId,
    /// Id (UUIDv7).
    pub id: Uuid,
    /// Title.
    #[serde(default)]
    pub title: String,
    /// Summary.
    #[serde(default)]
    pub summary: String,
    /// Severity.
    pub severity: Severity,
    /// Status.
    pub status: AlertStatus,
    /// Category.
    #[serde(default)]
    pub category: String,
    /// What raised it.
    pub source_kind: SourceKind,
    /// Rule id, model or webhook source.
    #[serde(default)]
    pub source_name: String,
    /// Anomaly score.
    #[serde(default)]
    pub anomaly_score: f64,
    /// Anomaly threshold.
    #[serde(default)]
    pub anomaly_threshold: f64,
    /// Earliest evidence.
    pub first_seen: DateTime<Utc>,
    /// Latest evidence.
    pub last_seen: DateTime<Utc>,
    /// Occurrences folded in.
    #[serde(default)]
    pub occurrence_count: u32,
    /// Suppression key.
    #[serde(default)]
    pub fingerprint: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// Incident, if grouped.
    #[serde(default)]
    pub incident_id: Option<Uuid>,
    /// Entities, evidence, features, techniques, history.
    pub body: AlertBody,
}

impl Alert {
    /// A new alert from a detection.
    pub fn from_new(tenant_id: TenantId, new: NewAlert, now: DateTime<Utc>) -> Self {
        let mut evidence = new.evidence;
        evidence.truncate(MAX_EVIDENCE);
        Self {
            tenant_id,
            id: Uuid::now_v7(),
            title: new.title,
            summary: new.summary,
            severity: new.severity,
            status: AlertStatus::New,
            category: new.category,
            source_kind: new.source_kind,
            source_name: new.source_name,
            anomaly_score: new.anomaly_score,
            anomaly_threshold: new.anomaly_threshold,
            first_seen: new.first_seen,
            last_seen: new.last_seen,
            occurrence_count: 1,
            fingerprint: new.fingerprint,
            created_at: now,
            updated_at: now,
            incident_id: None,
            body: AlertBody {
                entities: new.entities,
                evidence,
                features: new.features,
                attack_techniques: new.attack_techniques,
                history: Vec::new(),
                raw: new.raw,
            },
        }
    }

    /// Folds a repeated detection into this alert: count, last seen, evidence
    /// (deduplicated, capped), highest severity and score.
    pub fn fold(&mut self, new: NewAlert, now: DateTime<Utc>) {
        self.occurrence_count = self.occurrence_count.saturating_add(1);
        self.first_seen = self.first_seen.min(new.first_seen);
        self.last_seen = self.last_seen.max(new.last_seen);
        self.severity = self.severity.max(new.severity);
        self.anomaly_score = self.anomaly_score.max(new.anomaly_score);
        self.summary = new.summary;
        for e in new.evidence {
            if self.body.evidence.len() >= MAX_EVIDENCE {
                break;
            }
            if !self.body.evidence.iter().any(|x| x.event_id == e.event_id) {
                self.body.evidence.push(e);
            }
        }
        for ent in new.entities {
            if !self.body.entities.contains(&ent) {
                self.body.entities.push(ent);
            }
        }
        if !new.features.is_empty() {
            self.body.features = new.features;
        }
        if new.raw.is_some() {
            self.body.raw = new.raw;
        }
        self.updated_at = now;
    }
}

/// Which alerts to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertQuery {
    /// Minimum severity.
    pub min_severity: Option<Severity>,
    /// Statuses (any of).
    pub statuses: Vec<AlertStatus>,
    /// Exact category.
    pub category: Option<String>,
    /// Naming this entity.
    pub entity: Option<Entity>,
    /// Exact fingerprint.
    pub fingerprint: Option<String>,
    /// In no incident.
    pub uncorrelated: bool,
    /// last_seen ≥ start.
    pub start: Option<DateTime<Utc>>,
    /// last_seen < end.
    pub end: Option<DateTime<Utc>>,
    /// Keyset: strictly older than (last_seen, id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    /// Most rows.
    pub limit: u32,
}

impl AlertQuery {
    /// Whether an alert matches the filters (not the keyset) — used by watch streams.
    pub fn matches(&self, a: &Alert) -> bool {
        self.min_severity.is_none_or(|s| a.severity >= s)
            && (self.statuses.is_empty() || self.statuses.contains(&a.status))
            && self.category.as_ref().is_none_or(|c| *c == a.category)
            && (!self.uncorrelated || a.incident_id.is_none())
            && self
                .entity
                .as_ref()
                .is_none_or(|e| a.body.entities.contains(e))
            && self.start.is_none_or(|t| a.last_seen >= t)
            && self.end.is_none_or(|t| a.last_seen < t)
    }
}

/// One entry of a tenant's ordered change log.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Position in the log.
    pub position: crate::domain::event::FeedPosition,
    /// Which stream: `alerts`, `incidents`.
    pub stream: String,
    /// The changed thing's id.
    pub subject_id: Uuid,
    /// What happened (`created`, `updated`, …).
    pub kind: String,
    /// The thing's state after the change, as JSON.
    pub payload: serde_json::Value,
}
