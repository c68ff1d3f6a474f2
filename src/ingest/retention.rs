//! Tenant retention: events older than a tenant's retention period are deleted,
//! and the event partitions (Postgres, one per UTC day) are kept ahead of time.
//! [`run_once`] does one pass (tests drive it directly); [`run`] repeats it.
//!
//! A pass first drops every day partition that no tenant keeps any more (a
//! whole day at once: no row-by-row delete, no bloat), then deletes the rows
//! of tenants with a shorter retention than their neighbours' from the days
//! that are still kept, as before partitions. Tenants keeping events forever
//! (retention 0) keep every day in which they have an event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use tokio_util::sync::CancellationToken;

use crate::domain::TenantId;
use crate::storage::{Store, StoreResult};

/// Days before today whose partitions the server creates at start and on
/// every pass: a late event of the last week lands in its own day; an older
/// one lands in the default partition (accepted and readable like any other).
pub const PARTITION_DAYS_BEHIND: u64 = 7;
/// Days after today whose partitions exist ahead of time, so that a pass
/// missed (or a server down for a day) never sends current events to the
/// default partition.
pub const PARTITION_DAYS_AHEAD: u64 = 3;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPass {
    /// Events deleted by row (tenants with a shorter retention, the default partition).
    pub deleted: u64,
    /// Day partitions dropped.
    pub dropped_days: Vec<NaiveDate>,
    /// Events those partitions held.
    pub dropped_events: u64,
}

impl RetentionPass {
    /// Events removed in all.
    pub fn removed(&self) -> u64 {
        self.deleted + self.dropped_events
    }
}

/// Creates the event partitions of the days around `now` (see
/// [`PARTITION_DAYS_BEHIND`] and [`PARTITION_DAYS_AHEAD`]); returns how many
/// were created.
pub async fn prepare_partitions(store: &dyn Store, now: DateTime<Utc>) -> StoreResult<u32> {
    let today = now.date_naive();
    let first = today - chrono::Days::new(PARTITION_DAYS_BEHIND);
    let last = today + chrono::Days::new(PARTITION_DAYS_AHEAD);
    let created = store.prepare_event_days(first, last).await?;
    if created > 0 {
        tracing::info!(created, %first, %last, "event partitions created");
        metrics::counter!("picket_event_partitions_created_total").increment(u64::from(created));
    }
    Ok(created)
}

/// One retention pass at `now` over every tenant.
pub async fn run_once(store: &dyn Store, now: DateTime<Utc>) -> StoreResult<RetentionPass> {
    let mut keep: Vec<(TenantId, Option<DateTime<Utc>>)> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_tenants(after.as_deref(), 500).await?;
        keep.extend(page.iter().map(|t| {
            let cutoff = (t.retention_days > 0)
                .then(|| now - chrono::Duration::days(i64::from(t.retention_days)));
            (t.id, cutoff)
        }));
        match page.last() {
            Some(t) if page.len() == 500 => after = Some(t.name.clone()),
            _ => break,
        }
    }
    let mut pass = RetentionPass::default();
    let started = Instant::now();
    for d in store.drop_event_days(&keep).await? {
        tracing::info!(day = %d.day, events = d.events, "retention dropped an event partition");
        pass.dropped_days.push(d.day);
        pass.dropped_events += d.events;
    }
    if !pass.dropped_days.is_empty() {
        metrics::histogram!("picket_retention_drop_seconds")
            .record(started.elapsed().as_secs_f64());
    }
    // Keys of the dropped days, and the rows of tenants with a shorter
    // retention in days still kept.
    for (tenant, cutoff) in &keep {
        let Some(cutoff) = cutoff else { continue };
        let n = store.purge_events(*tenant, *cutoff).await?;
        if n > 0 {
            tracing::info!(tenant_id = %tenant, deleted = n, "retention purge");
        }
        pass.deleted += n;
    }
    metrics::counter!("picket_retention_deleted_events_total").increment(pass.removed());
    metrics::counter!("picket_retention_dropped_partitions_total")
        .increment(pass.dropped_days.len() as u64);
    Ok(pass)
}

/// Applies retention and prepares partitions every `every` until `shutdown`.
pub async fn run(store: Arc<dyn Store>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let now = Utc::now();
        if let Err(e) = prepare_partitions(store.as_ref(), now).await {
            tracing::error!(error = ?anyhow::Error::from(e), "preparing event partitions failed");
        }
        if let Err(e) = run_once(store.as_ref(), now).await {
            tracing::error!(error = ?anyhow::Error::from(e), "retention pass failed");
        }
    }
}
