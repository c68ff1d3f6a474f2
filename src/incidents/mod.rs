//! Incident logic shared by the detection pipeline (correlation) and
//! IncidentService (manual changes). Every change is read → modify → save at
//! the version read; a concurrent change makes the save fail with `Conflict`
//! and the operation is retried on fresh state.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::Severity;
use crate::domain::TenantId;
use crate::domain::alert::{Alert, Entity, EntityKind};
use crate::domain::incident::{
    Incident, IncidentQuery, IncidentStatus, TimelineEntry, TimelineKind,
};
use crate::error::{AppError, AppResult};
use crate::storage::{Store, StoreError};

/// Attempts per operation before giving up on concurrent changes.
const ATTEMPTS: usize = 5;

/// How alerts are grouped.
#[derive(Debug, Clone, Copy)]
pub struct CorrelationConfig {
    /// An alert joins an active incident sharing an entity updated this recently.
    pub window: chrono::Duration,
    /// An alert reopens a resolved incident sharing an entity resolved this
    /// recently; zero disables reopening.
    pub reopen: chrono::Duration,
}

impl Default for CorrelationConfig {
    fn default() -> Self {
        Self {
            window: chrono::Duration::hours(1),
            reopen: chrono::Duration::hours(24),
        }
    }
}

/// The entities incidents are correlated on: actors and IPs.
fn keys(alert: &Alert) -> Vec<Entity> {
    alert
        .body
        .entities
        .iter()
        .filter(|e| matches!(e.kind, EntityKind::Actor | EntityKind::Ip))
        .cloned()
        .collect()
}

fn retrying<T>(r: Result<T, StoreError>) -> Option<AppResult<T>> {
    match r {
        Ok(v) => Some(Ok(v)),
        Err(StoreError::Conflict(_)) => None,
        Err(e) => Some(Err(e.into())),
    }
}

fn gave_up() -> AppError {
    AppError::Unavailable {
        message: "the incident kept changing concurrently; retry".into(),
        retry_after: std::time::Duration::from_millis(100),
    }
}

/// Groups a new alert into an incident: joins an active incident sharing an
/// actor or IP, reopens a recently resolved one, or opens a new one.
/// Returns the incident (its `timeline` holds only the entries this call
/// recorded; see [`crate::storage::IncidentStore::list_incident_heads`]), or
/// `None` for alerts without actor or IP.
pub async fn correlate(
    store: &dyn Store,
    alert: &Alert,
    cfg: CorrelationConfig,
    now: DateTime<Utc>,
) -> AppResult<Option<Incident>> {
    if alert.incident_id.is_some() {
        return Ok(None);
    }
    let keys = keys(alert);
    if keys.is_empty() {
        return Ok(None);
    }
    for _ in 0..ATTEMPTS {
        let since = now - cfg.window.max(cfg.reopen);
        let candidates = store
            .list_incident_heads(
                alert.tenant_id,
                &IncidentQuery {
                    start: Some(since),
                    limit: 500,
                    ..Default::default()
                },
            )
            .await?;
        let chosen = candidates.into_iter().find(|i| {
            i.merged_into.is_none()
                && i.shares_entity(&keys)
                && ((i.status.is_active() && i.updated_at >= now - cfg.window)
                    || (i.status == IncidentStatus::Resolved
                        && cfg.reopen > chrono::Duration::zero()
                        && i.resolved_at.is_some_and(|r| r >= now - cfg.reopen)))
        });
        let saved = match chosen {
            Some(mut inc) => {
                if inc.status == IncidentStatus::Resolved {
                    inc.status = IncidentStatus::Open;
                    inc.record(
                        "system",
                        TimelineKind::Reopened,
                        format!("reopened by alert \"{}\"", alert.title),
                        alert.id.to_string(),
                        now,
                    );
                }
                link_into(&mut inc, alert, now);
                let entry = inc.timeline.last().cloned().expect("just recorded");
                store.update_incident(&inc, &entry, &[alert.id]).await
            }
            None => {
                let subject = keys.first().map(|e| e.value.clone()).unwrap_or_default();
                let mut inc = Incident::new(
                    alert.tenant_id,
                    format!("{} — {subject}", alert.title),
                    alert.summary.clone(),
                    alert.severity,
                    now,
                );
                let created = inc.record(
                    "system",
                    TimelineKind::Created,
                    "opened by correlation".into(),
                    String::new(),
                    now,
                );
                link_into(&mut inc, alert, now);
                store.insert_incident(&inc, &created, &[alert.id]).await
            }
        };
        if let Some(r) = retrying(saved) {
            // The save linked the alert in its own transaction (and logged
            // that change); linking it again would send watchers a change that
            // differs only in `updated_at`.
            let inc = r?;
            metrics::counter!("picket_incident_correlations_total").increment(1);
            return Ok(Some(inc));
        }
    }
    Err(gave_up())
}

/// An incident a batch correlation touched: its state, whether it is new,
/// the timeline entry to log (a new incident logs its creation), and the
/// alerts to link in its save.
struct Touched {
    inc: Incident,
    /// `inc.entities` as a set: matching a batch against many incidents
    /// with many entities each stays linear in the batch.
    names: HashSet<Entity>,
    created: Option<TimelineEntry>,
    links: Vec<Uuid>,
}

impl Touched {
    fn new(inc: Incident, created: Option<TimelineEntry>) -> Self {
        Self {
            names: inc.entities.iter().cloned().collect(),
            inc,
            created,
            links: Vec::new(),
        }
    }

    /// Whether the incident names any of `keys`.
    fn shares_entity(&self, keys: &[Entity]) -> bool {
        keys.iter().any(|k| self.names.contains(k))
    }
}

/// Groups a batch of new alerts of one tenant into incidents exactly as
/// [`correlate`] would one after another, with one candidate listing and one
/// save per touched incident (linking all its alerts of the batch in that
/// save, whose change-log entry is the last timeline entry). An incident
/// whose save meets a concurrent change is redone alert by alert with
/// [`correlate`]. Returns how many alerts were grouped.
pub async fn correlate_batch(
    store: &dyn Store,
    tenant: TenantId,
    alerts: &[Alert],
    cfg: CorrelationConfig,
    now: DateTime<Utc>,
) -> AppResult<usize> {
    let alerts: Vec<(&Alert, Vec<Entity>)> = alerts
        .iter()
        .filter(|a| a.tenant_id == tenant && a.incident_id.is_none())
        .map(|a| (a, keys(a)))
        .filter(|(_, k)| !k.is_empty())
        .collect();
    if alerts.is_empty() {
        return Ok(0);
    }
    let since = now - cfg.window.max(cfg.reopen);
    let mut candidates: Vec<Touched> = store
        .list_incident_heads(
            tenant,
            &IncidentQuery {
                start: Some(since),
                limit: 500,
                ..Default::default()
            },
        )
        .await?
        .into_iter()
        .map(|i| Touched::new(i, None))
        .collect();
    // Touched incidents, most recently touched last (they were updated "now",
    // so they come before every other candidate).
    let mut touched: Vec<Touched> = Vec::new();
    for (alert, keys) in &alerts {
        let fits = |t: &Touched| {
            let i = &t.inc;
            i.merged_into.is_none()
                && t.shares_entity(keys)
                && ((i.status.is_active() && i.updated_at >= now - cfg.window)
                    || (i.status == IncidentStatus::Resolved
                        && cfg.reopen > chrono::Duration::zero()
                        && i.resolved_at.is_some_and(|r| r >= now - cfg.reopen)))
        };
        let mut t = if let Some(n) = touched.iter().rposition(fits) {
            touched.remove(n)
        } else if let Some(n) = candidates.iter().position(fits) {
            candidates.remove(n)
        } else {
            let subject = keys.first().map(|e| e.value.clone()).unwrap_or_default();
            let mut inc = Incident::new(
                tenant,
                format!("{} — {subject}", alert.title),
                alert.summary.clone(),
                alert.severity,
                now,
            );
            let created = inc.record(
                "system",
                TimelineKind::Created,
                "opened by correlation".into(),
                String::new(),
                now,
            );
            Touched::new(inc, Some(created))
        };
        if t.inc.status == IncidentStatus::Resolved {
            t.inc.status = IncidentStatus::Open;
            t.inc.record(
                "system",
                TimelineKind::Reopened,
                format!("reopened by alert \"{}\"", alert.title),
                alert.id.to_string(),
                now,
            );
        }
        link_into(&mut t.inc, alert, now);
        t.names.extend(alert.body.entities.iter().cloned());
        t.links.push(alert.id);
        touched.push(t);
    }
    let mut grouped = 0;
    // New incidents in one transaction (a fresh-source storm opens hundreds
    // per batch; one transaction each kept the change log's fence up).
    let (created, updated): (Vec<Touched>, Vec<Touched>) =
        touched.into_iter().partition(|t| t.created.is_some());
    if !created.is_empty() {
        let links: usize = created.iter().map(|t| t.links.len()).sum();
        let new: Vec<_> = created
            .into_iter()
            .map(|t| (t.inc, t.created.expect("partitioned on it"), t.links))
            .collect();
        store.insert_incidents(&new).await?;
        metrics::counter!("picket_incident_correlations_total").increment(links as u64);
        grouped += links;
    }
    // Updates one at a time: a save at a stale version (an API change in
    // between) is retried alone on fresh state without failing the others.
    for t in updated {
        let entry = t.inc.timeline.last().cloned().expect("just recorded");
        match store.update_incident(&t.inc, &entry, &t.links).await {
            Ok(_) => {
                metrics::counter!("picket_incident_correlations_total")
                    .increment(t.links.len() as u64);
                grouped += t.links.len();
            }
            Err(StoreError::Conflict(_)) => {
                // Changed concurrently (through the API): one at a time on fresh state.
                for id in &t.links {
                    if let Some((a, _)) = alerts.iter().find(|(a, _)| a.id == *id) {
                        correlate(store, a, cfg, now).await?;
                        grouped += 1;
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(grouped)
}

/// Adds an alert to an incident (ids, entities, severity) with a timeline entry.
fn link_into(inc: &mut Incident, alert: &Alert, now: DateTime<Utc>) {
    if !inc.alert_ids.contains(&alert.id) {
        inc.alert_ids.push(alert.id);
    }
    for e in &alert.body.entities {
        if !inc.entities.contains(e) {
            inc.entities.push(e.clone());
        }
    }
    inc.severity = inc.severity.max(alert.severity);
    inc.record(
        "system",
        TimelineKind::AlertLinked,
        format!("alert \"{}\" linked", alert.title),
        alert.id.to_string(),
        now,
    );
}

/// What a person reports when opening an incident by hand.
#[derive(Debug, Clone)]
pub struct ManualIncident {
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Severity.
    pub severity: Severity,
    /// Entities it is about.
    pub entities: Vec<Entity>,
}

/// Opens an incident by hand.
pub async fn create(
    store: &dyn Store,
    tenant: TenantId,
    new: ManualIncident,
    alert_ids: &[Uuid],
    actor: &str,
) -> AppResult<Incident> {
    let now = Utc::now();
    let mut inc = Incident::new(tenant, new.title, new.description, new.severity, now);
    inc.entities = new.entities;
    let created = inc.record(
        actor,
        TimelineKind::Created,
        "opened by hand".into(),
        String::new(),
        now,
    );
    let mut inc = store.insert_incident(&inc, &created, &[]).await?;
    if !alert_ids.is_empty() {
        inc = link(store, tenant, inc.id, alert_ids, actor).await?;
    }
    Ok(inc)
}

/// Applies `change` to the incident's fresh state and saves it, retrying on
/// concurrent changes. `change` returns the timeline entries it recorded
/// (the last one is logged) or an error to stop.
pub async fn modify(
    store: &dyn Store,
    tenant: TenantId,
    id: Uuid,
    mut change: impl FnMut(&mut Incident) -> AppResult<TimelineEntry>,
) -> AppResult<Incident> {
    for _ in 0..ATTEMPTS {
        let mut inc = store.get_incident(tenant, id).await?;
        let entry = change(&mut inc)?;
        if let Some(r) = retrying(store.update_incident(&inc, &entry, &[]).await) {
            return r;
        }
    }
    Err(gave_up())
}

/// Links alerts (moving them from any other incident).
pub async fn link(
    store: &dyn Store,
    tenant: TenantId,
    id: Uuid,
    alert_ids: &[Uuid],
    actor: &str,
) -> AppResult<Incident> {
    let mut alerts = Vec::with_capacity(alert_ids.len());
    for a in alert_ids {
        alerts.push(store.get_alert_head(tenant, *a).await?);
    }
    let now = Utc::now();
    let inc = modify(store, tenant, id, |inc| {
        if inc.status == IncidentStatus::Closed {
            return Err(AppError::FailedPrecondition(
                "the incident is closed".into(),
            ));
        }
        let mut last = None;
        for a in &alerts {
            link_into(inc, a, now);
            if let Some(e) = inc.timeline.last_mut() {
                e.actor = actor.to_owned();
                last = Some(e.clone());
            }
        }
        last.ok_or_else(|| AppError::invalid("alert_ids", "at least one alert is required"))
    })
    .await?;
    for a in &alerts {
        if let Some(old) = a.incident_id.filter(|o| *o != id) {
            let _ = modify(store, tenant, old, |o| {
                o.alert_ids.retain(|x| *x != a.id);
                Ok(o.record(
                    actor,
                    TimelineKind::AlertUnlinked,
                    format!("alert \"{}\" moved to incident {id}", a.title),
                    a.id.to_string(),
                    now,
                ))
            })
            .await;
        }
        // An alert already in this incident does not change: no log entry.
        if a.incident_id != Some(id) {
            store.set_alert_incident(tenant, a.id, Some(id)).await?;
        }
    }
    Ok(inc)
}

/// Unlinks alerts.
pub async fn unlink(
    store: &dyn Store,
    tenant: TenantId,
    id: Uuid,
    alert_ids: &[Uuid],
    actor: &str,
) -> AppResult<Incident> {
    let now = Utc::now();
    let inc = modify(store, tenant, id, |inc| {
        let mut last = None;
        for a in alert_ids {
            if !inc.alert_ids.contains(a) {
                return Err(AppError::invalid(
                    "alert_ids",
                    format!("alert {a} is not linked to this incident"),
                ));
            }
            inc.alert_ids.retain(|x| x != a);
            last = Some(inc.record(
                actor,
                TimelineKind::AlertUnlinked,
                format!("alert {a} unlinked"),
                a.to_string(),
                now,
            ));
        }
        last.ok_or_else(|| AppError::invalid("alert_ids", "at least one alert is required"))
    })
    .await?;
    for a in alert_ids {
        store.set_alert_incident(tenant, *a, None).await?;
    }
    Ok(inc)
}

/// Merges `sources` into `target`: their alerts move, they close with `merged_into` set.
pub async fn merge(
    store: &dyn Store,
    tenant: TenantId,
    target: Uuid,
    sources: &[Uuid],
    actor: &str,
) -> AppResult<Incident> {
    let distinct: std::collections::HashSet<&Uuid> = sources.iter().collect();
    if sources.is_empty() || sources.contains(&target) || distinct.len() != sources.len() {
        return Err(AppError::invalid(
            "source_incident_ids",
            "1..100 distinct incidents, not including the target",
        ));
    }
    // One transaction for the whole merge: every source closed, the target
    // holding their alerts and entities, every alert pointing at the target.
    // A crash at any point leaves either all of it or none of it.
    let now = Utc::now();
    for _ in 0..ATTEMPTS {
        let mut into = store.get_incident(tenant, target).await?;
        let mut saves = Vec::with_capacity(sources.len() + 1);
        let mut moved: Vec<Uuid> = Vec::new();
        let mut last = None;
        for s in sources {
            let mut src = store.get_incident(tenant, *s).await?;
            if src.merged_into.is_some() {
                return Err(AppError::FailedPrecondition(format!(
                    "incident {s} was already merged"
                )));
            }
            src.status = IncidentStatus::Closed;
            src.merged_into = Some(target);
            let closed = src.record(
                actor,
                TimelineKind::Merged,
                format!("merged into incident {target}"),
                target.to_string(),
                now,
            );
            for a in &src.alert_ids {
                if !into.alert_ids.contains(a) {
                    into.alert_ids.push(*a);
                }
                moved.push(*a);
            }
            for e in &src.entities {
                if !into.entities.contains(e) {
                    into.entities.push(e.clone());
                }
            }
            into.severity = into.severity.max(src.severity);
            last = Some(into.record(
                actor,
                TimelineKind::Merged,
                format!("incident {s} merged in"),
                s.to_string(),
                now,
            ));
            saves.push((src, closed, Vec::new()));
        }
        let Some(entry) = last else {
            return Err(AppError::invalid(
                "source_incident_ids",
                "1..100 incidents, not including the target",
            ));
        };
        saves.push((into, entry, moved));
        if let Some(r) = retrying(store.update_incidents(&saves).await) {
            r?;
            return Ok(store.get_incident(tenant, target).await?);
        }
    }
    Err(gave_up())
}
