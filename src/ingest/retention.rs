//! Tenant retention: events older than a tenant's retention period are deleted.
//! [`run_once`] does one pass (tests drive it directly); [`run`] repeats it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::storage::{Store, StoreResult};

/// One retention pass at `now` over every tenant; returns events deleted.
pub async fn run_once(store: &dyn Store, now: DateTime<Utc>) -> StoreResult<u64> {
    let mut deleted = 0;
    let mut after: Option<String> = None;
    loop {
        let page = store.list_tenants(after.as_deref(), 500).await?;
        for t in page.iter().filter(|t| t.retention_days > 0) {
            let cutoff = now - chrono::Duration::days(i64::from(t.retention_days));
            let n = store.purge_events(t.id, cutoff).await?;
            if n > 0 {
                tracing::info!(tenant_id = %t.id, deleted = n, retention_days = t.retention_days, "retention purge");
            }
            deleted += n;
        }
        match page.last() {
            Some(t) if page.len() == 500 => after = Some(t.name.clone()),
            _ => break,
        }
    }
    metrics::counter!("picket_retention_deleted_events_total").increment(deleted);
    Ok(deleted)
}

/// Applies retention every `every` until `shutdown`.
pub async fn run(store: Arc<dyn Store>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = run_once(store.as_ref(), Utc::now()).await {
            tracing::error!(error = ?anyhow::Error::from(e), "retention pass failed");
        }
    }
}
