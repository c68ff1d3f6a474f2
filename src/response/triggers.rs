//! Automatic runs: a playbook whose trigger matches a new or escalated
//! incident gets a run created for it, at most once per playbook and
//! incident (the run's trigger key is unique in the store, so replicas and
//! repeated evaluations cannot create a second one). The run waits for
//! approval unless no step requires it, in which case it executes at once.
//!
//! **When.** After every incident change the tenant's signal fires (the
//! pipeline, webhooks and the API all notify it); the trigger task then
//! looks at the tenant's incidents updated since it last looked (minus a
//! margin for clocks). At start it looks back `trigger_lookback` (1 h) for
//! every tenant, so an incident changed just before a crash still gets its
//! run, and every minute it looks at every tenant's changes since the
//! previous sweep, in case a wake-up was lost.
//!
//! **Match.** The incident is active (not resolved, closed or merged), its
//! severity is at least the trigger's minimum, one of its (latest 50)
//! alerts has one of the trigger's categories and rules (where it names
//! any), and it was created or
//! escalated — an alert linked, its severity raised, or reopened — after
//! the playbook (a tenant playbook's last update; shared playbooks always)
//! and after the previous look. A run whose templates cannot be filled in
//! (the incident names no IP, say) is recorded as FAILED with the reason,
//! so the analyst sees why nothing happened.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::domain::TenantId;
use crate::domain::incident::{Incident, IncidentQuery, TimelineKind};
use crate::domain::playbook::{DEFAULT_APPROVAL_TIMEOUT, Playbook, PlaybookRun, RunStatus, SYSTEM};
use crate::error::AppResult;
use crate::response::{Responder, StartRun, now_micros};
use crate::storage::StoreError;

/// How far before the previous sweep a sweep starts (clock differences
/// between replicas, commits that became visible late).
const MARGIN: chrono::Duration = chrono::Duration::seconds(30);
/// How far before a tenant's previous look a look on a wake-up starts. Short,
/// because every look lists (and decodes) the tenant's incidents changed
/// since then, and a wake-up follows its change within milliseconds; the
/// sweep every minute, with [`MARGIN`], catches a change stamped long before
/// it committed.
const WAKE_MARGIN: chrono::Duration = chrono::Duration::seconds(5);
/// Most incidents one look considers.
const INCIDENTS: u32 = 500;
/// Most alerts of an incident whose categories are checked.
const ALERTS: usize = 50;
/// How often every tenant is looked at even without a wake-up (a safety
/// net: every incident change wakes its tenant).
const SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Follows every tenant's changes and creates automatic runs until `shutdown`.
pub async fn run(responder: Arc<Responder>, shutdown: CancellationToken) {
    let mut touched = responder.changes.touched();
    let mut last: HashMap<TenantId, DateTime<Utc>> = HashMap::new();
    let started = now_micros();
    let lookback = started - responder.config.trigger_lookback;
    if let Err(e) = sweep(&responder, lookback, &mut last).await {
        tracing::warn!(error = %e, "playbook trigger sweep failed");
    }
    let mut last_sweep = started;
    let mut sweeps = tokio::time::interval(SWEEP);
    sweeps.tick().await;
    loop {
        let mut pending = BTreeSet::new();
        let mut everyone = false;
        tokio::select! {
            got = touched.recv() => match got {
                Ok(t) => { pending.insert(t); }
                Err(RecvError::Lagged(_)) => everyone = true,
                Err(RecvError::Closed) => break,
            },
            _ = sweeps.tick() => everyone = true,
            () = shutdown.cancelled() => break,
        }
        loop {
            match touched.try_recv() {
                Ok(t) => {
                    pending.insert(t);
                }
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => everyone = true,
                Err(_) => break,
            }
        }
        if everyone {
            let now = now_micros();
            match sweep(&responder, last_sweep - MARGIN, &mut last).await {
                Ok(()) => last_sweep = now,
                Err(e) => tracing::warn!(error = %e, "playbook trigger sweep failed"),
            }
            continue;
        }
        for tenant in pending {
            let since = last.get(&tenant).map_or(lookback, |t| *t - WAKE_MARGIN);
            let now = now_micros();
            match evaluate(&responder, tenant, since).await {
                Ok(_) => {
                    last.insert(tenant, now);
                }
                Err(e) => {
                    tracing::warn!(tenant_id = %tenant, error = %e, "playbook triggers failed; retried on the next change")
                }
            }
        }
    }
}

/// Evaluates every tenant's incidents changed since `since`.
async fn sweep(
    responder: &Responder,
    since: DateTime<Utc>,
    last: &mut HashMap<TenantId, DateTime<Utc>>,
) -> AppResult<()> {
    let mut after: Option<String> = None;
    loop {
        let tenants = responder.store.list_tenants(after.as_deref(), 500).await?;
        for t in &tenants {
            let now = now_micros();
            evaluate(responder, t.id, since).await?;
            last.insert(t.id, now);
        }
        match tenants.last() {
            Some(t) if tenants.len() == 500 => after = Some(t.name.clone()),
            _ => return Ok(()),
        }
    }
}

/// Whether a timeline entry creates or escalates an incident.
fn escalates(kind: TimelineKind) -> bool {
    matches!(
        kind,
        TimelineKind::Created
            | TimelineKind::AlertLinked
            | TimelineKind::SeverityChanged
            | TimelineKind::Reopened
    )
}

/// Whether `incident` was created or escalated at or after `after`.
fn escalated_since(incident: &Incident, after: DateTime<Utc>) -> bool {
    incident
        .timeline
        .iter()
        .any(|e| escalates(e.kind) && e.at >= after)
}

/// Creates the automatic runs a tenant's incidents changed since `since`
/// call for; returns how many.
pub async fn evaluate(
    responder: &Responder,
    tenant: TenantId,
    since: DateTime<Utc>,
) -> AppResult<usize> {
    let playbooks: Vec<Playbook> = responder
        .in_force(tenant)
        .await?
        .into_iter()
        .filter(|p| p.def.enabled && p.def.trigger.min_severity.is_some())
        .collect();
    if playbooks.is_empty() {
        return Ok(0);
    }
    let incidents = responder
        .store
        .list_incidents(
            tenant,
            &IncidentQuery {
                start: Some(since),
                limit: INCIDENTS,
                ..Default::default()
            },
        )
        .await?;
    let mut candidates: Vec<(&Playbook, &Incident, String)> = Vec::new();
    for inc in &incidents {
        if inc.merged_into.is_some() || !inc.status.is_active() {
            continue;
        }
        for p in &playbooks {
            let min = p.def.trigger.min_severity.expect("filtered");
            let after = match p.tenant_id {
                Some(_) => p.updated_at.max(since),
                None => since,
            };
            if inc.severity >= min && escalated_since(inc, after) {
                candidates.push((p, inc, PlaybookRun::trigger_key(p.id, inc.id)));
            }
        }
    }
    if candidates.is_empty() {
        return Ok(0);
    }
    let keys: Vec<String> = candidates.iter().map(|c| c.2.clone()).collect();
    let used: BTreeSet<String> = responder
        .store
        .used_trigger_keys(tenant, &keys)
        .await?
        .into_iter()
        .collect();
    // (category, source) of each candidate incident's latest alerts.
    let mut alerts: HashMap<uuid::Uuid, Vec<(String, String)>> = HashMap::new();
    let mut created = 0;
    for (p, inc, key) in candidates {
        if used.contains(&key) {
            continue;
        }
        let t = &p.def.trigger;
        if !t.categories.is_empty() || !t.rules.is_empty() {
            if let std::collections::hash_map::Entry::Vacant(slot) = alerts.entry(inc.id) {
                let mut found = Vec::new();
                for a in inc.alert_ids.iter().rev().take(ALERTS) {
                    if let Ok(alert) = responder.store.get_alert_head(tenant, *a).await {
                        found.push((alert.category, alert.source_name));
                    }
                }
                slot.insert(found);
            }
            if !alerts[&inc.id].iter().any(|(c, s)| t.matches_alert(c, s)) {
                continue;
            }
        }
        let start = StartRun {
            playbook_id: p.id,
            incident_id: Some(inc.id),
            alert_id: None,
            approval_timeout: chrono::Duration::seconds(i64::from(DEFAULT_APPROVAL_TIMEOUT)),
            requested_by: SYSTEM.into(),
        };
        let (mut run, resolved) = responder.prepare_run(tenant, p, &start).await?;
        run.automatic = true;
        run.trigger_key = Some(key);
        let outcome = match resolved {
            Ok(()) => "created",
            Err(v) => {
                run.finish(
                    RunStatus::Failed,
                    format!("not started: {}: {}", v.field, v.description),
                    run.created_at,
                );
                "unresolved"
            }
        };
        match responder.store.insert_run(&run).await {
            Ok(run) => {
                responder.after_change(&run, None);
                metrics::counter!("picket_playbook_auto_runs_total", "outcome" => outcome)
                    .increment(1);
                tracing::info!(tenant_id = %tenant, run_id = %run.id, playbook = %run.playbook_name, incident_id = %inc.id, status = run.status.as_str(), "automatic run created");
                created += 1;
            }
            // Another replica (or an overlapping look) created it.
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(created)
}
