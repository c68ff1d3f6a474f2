//! Helpers shared by the detection unit tests.

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::domain::event::{DetailKinds, EventDetails, NewEvent, Outcome, classify, ocsf};
use crate::domain::{Severity, TenantId};

/// A fixed tenant.
pub fn tenant() -> TenantId {
    TenantId(Uuid::from_u128(1))
}

/// 2026-01-05 00:00:00 UTC plus `secs`.
pub fn at(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 0, 0, 0).unwrap() + chrono::Duration::seconds(secs)
}

/// A bare event of a type, classified as ingest would, at [`at(0)`].
pub fn event(event_type: &str) -> NewEvent {
    let class = classify(event_type, DetailKinds::default());
    NewEvent {
        id: Uuid::now_v7(),
        idempotency_digest: [0; 16],
        occurred_at: at(0),
        received_at: at(0),
        event_type: event_type.to_string(),
        ocsf_class_uid: class,
        ocsf_category_uid: ocsf::category_of(class),
        actor: String::new(),
        action: String::new(),
        resource: String::new(),
        outcome: Outcome::Unknown,
        severity: Severity::Info,
        source_ip: None,
        destination_ip: None,
        source_system: String::new(),
        service: String::new(),
        environment: String::new(),
        details: EventDetails::default(),
    }
}
