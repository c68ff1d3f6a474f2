//! The task keeping the report rollups (`storage/rollups.rs`) caught up with
//! the committed-event feed, off the ingest path: every interval it folds
//! each tenant's new events in steps of [`STEP_EVENTS`]. [`run_once`] does
//! one pass (tests and the benchmark drive it directly); [`run`] repeats it.
//!
//! Several replicas may run it at once: a step moves the tenant's rollup
//! position by compare-and-set, so an event is folded exactly once and a
//! replica that loses the race only wasted its read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::storage::{Store, StoreResult};

/// Events one step folds at most: a step's writing transaction holds back
/// every Postgres feed reader while it runs, so it stays short.
pub const STEP_EVENTS: u32 = 20_000;

/// One pass over every tenant until each is caught up (or `shutdown`);
/// returns how many events were folded.
pub async fn run_once(store: &dyn Store, shutdown: &CancellationToken) -> StoreResult<u64> {
    let mut folded = 0;
    let mut after: Option<String> = None;
    loop {
        let page = store.list_tenants(after.as_deref(), 500).await?;
        for tenant in &page {
            loop {
                if shutdown.is_cancelled() {
                    return Ok(folded);
                }
                let started = Instant::now();
                let n = store.roll_up(tenant.id, STEP_EVENTS).await?;
                if n == 0 {
                    break;
                }
                metrics::histogram!("picket_rollup_step_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("picket_rollup_events_total").increment(n);
                folded += n;
            }
        }
        match page.last() {
            Some(t) if page.len() == 500 => after = Some(t.name.clone()),
            _ => break,
        }
    }
    Ok(folded)
}

/// Runs a pass every `every` until `shutdown`.
pub async fn run(store: Arc<dyn Store>, every: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let started = Instant::now();
        match run_once(store.as_ref(), &shutdown).await {
            Ok(n) if n > 0 => {
                metrics::histogram!("picket_rollup_pass_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(folded = n, "report rollups caught up");
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!("picket_rollup_failures_total").increment(1);
                tracing::warn!(error = ?anyhow::Error::from(e), "rolling up report figures failed");
            }
        }
    }
}
