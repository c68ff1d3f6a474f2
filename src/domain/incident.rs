//! Incidents: groups of related alerts under investigation, with an
//! append-only timeline and a forward-only status machine.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::alert::Entity;
use crate::domain::{Severity, TenantId};

/// Lifecycle of an incident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum IncidentStatus {
    /// Nobody is working on it yet.
    Open = 1,
    /// Being investigated.
    Investigating = 2,
    /// Contained; clean-up continues.
    Contained = 3,
    /// Resolved; a new alert within the reopen window reopens it.
    Resolved = 4,
    /// Closed for good.
    Closed = 5,
}

impl IncidentStatus {
    /// Stored value.
    pub fn as_i16(self) -> i16 {
        self as i16
    }

    /// Whether moving from `self` to `to` is allowed: forward along
    /// open → investigating → contained → resolved → closed, or resolved → open.
    pub fn can_move_to(self, to: IncidentStatus) -> bool {
        to > self || (self == IncidentStatus::Resolved && to == IncidentStatus::Open)
    }

    /// Whether alerts still correlate into it.
    pub fn is_active(self) -> bool {
        self < IncidentStatus::Resolved
    }
}

/// Kind of timeline entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimelineKind {
    /// Created.
    Created,
    /// Alert linked.
    AlertLinked,
    /// Alert unlinked.
    AlertUnlinked,
    /// Status changed.
    StatusChanged,
    /// Severity changed.
    SeverityChanged,
    /// Assignee changed.
    Assigned,
    /// Tags changed.
    TagsChanged,
    /// Note added.
    NoteAdded,
    /// Merged.
    Merged,
    /// Reopened by a new alert.
    Reopened,
}

/// One timeline entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Id.
    pub id: Uuid,
    /// When.
    pub at: DateTime<Utc>,
    /// Who: `key:<id>`, `operator`, `system`.
    #[serde(default)]
    pub actor: String,
    /// What.
    pub kind: TimelineKind,
    /// Human-readable description.
    #[serde(default)]
    pub description: String,
    /// Alert id, incident id or note text.
    #[serde(default)]
    pub subject: String,
}

/// An incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    /// Owner.
    pub tenant_id: TenantId,
    /// Id (UUIDv7).
    pub id: Uuid,
    /// Optimistic-concurrency version; bumped on every save.
    #[serde(default)]
    pub version: i64,
    /// Title.
    #[serde(default)]
    pub title: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Status.
    pub status: IncidentStatus,
    /// Severity (highest of its alerts unless set by hand).
    pub severity: Severity,
    /// Assignee.
    #[serde(default)]
    pub assignee: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Correlation keys.
    #[serde(default)]
    pub entities: Vec<Entity>,
    /// Linked alerts.
    #[serde(default)]
    pub alert_ids: Vec<Uuid>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
    /// Last resolved.
    #[serde(default)]
    pub resolved_at: Option<DateTime<Utc>>,
    /// Merged into.
    #[serde(default)]
    pub merged_into: Option<Uuid>,
    /// Timeline, oldest first. Stored apart from the rest of the incident
    /// (it grows with every change); a full read holds all of it, a
    /// correlation read (`list_incident_heads`) only the entries recorded
    /// since the read, with the stored ones counted in `timeline_skipped`.
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
    /// Stored timeline entries that precede `timeline` but were not read:
    /// 0 for full reads and new incidents. A save appends only the entries
    /// beyond what is stored. Not part of the stored or logged document.
    #[serde(skip)]
    #[serde(default)]
    pub timeline_skipped: u64,
}

impl Incident {
    /// A new open incident.
    pub fn new(
        tenant_id: TenantId,
        title: String,
        description: String,
        severity: Severity,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            tenant_id,
            id: Uuid::now_v7(),
            version: 0,
            title,
            description,
            status: IncidentStatus::Open,
            severity,
            assignee: String::new(),
            tags: Vec::new(),
            entities: Vec::new(),
            alert_ids: Vec::new(),
            created_at: now,
            updated_at: now,
            resolved_at: None,
            merged_into: None,
            timeline: Vec::new(),
            timeline_skipped: 0,
        }
    }

    /// Appends a timeline entry and returns it.
    pub fn record(
        &mut self,
        actor: &str,
        kind: TimelineKind,
        description: String,
        subject: String,
        now: DateTime<Utc>,
    ) -> TimelineEntry {
        let entry = TimelineEntry {
            id: Uuid::now_v7(),
            at: now,
            actor: actor.to_owned(),
            kind,
            description,
            subject,
        };
        self.timeline.push(entry.clone());
        self.updated_at = now;
        entry
    }

    /// Whether it names any of `entities`.
    pub fn shares_entity(&self, entities: &[Entity]) -> bool {
        entities.iter().any(|e| self.entities.contains(e))
    }
}

/// Which incidents to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IncidentQuery {
    /// Statuses (any of).
    pub statuses: Vec<IncidentStatus>,
    /// Minimum severity.
    pub min_severity: Option<Severity>,
    /// Exact assignee.
    pub assignee: Option<String>,
    /// Naming this entity.
    pub entity: Option<Entity>,
    /// updated_at ≥ start.
    pub start: Option<DateTime<Utc>>,
    /// updated_at < end.
    pub end: Option<DateTime<Utc>>,
    /// Keyset: strictly older than (updated_at, id).
    pub before: Option<(DateTime<Utc>, Uuid)>,
    /// Most rows.
    pub limit: u32,
}

impl IncidentQuery {
    /// Whether an incident matches (not the keyset).
    pub fn matches(&self, i: &Incident) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&i.status))
            && self.min_severity.is_none_or(|s| i.severity >= s)
            && self.assignee.as_ref().is_none_or(|a| *a == i.assignee)
            && self.entity.as_ref().is_none_or(|e| i.entities.contains(e))
            && self.start.is_none_or(|t| i.updated_at >= t)
            && self.end.is_none_or(|t| i.updated_at < t)
    }
}
