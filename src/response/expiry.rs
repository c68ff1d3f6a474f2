//! The expiry task: applies the passage of time to decisions, so that a
//! decision's end reaches every subscriber as an EXPIRED (or UPDATED) delta
//! at its expiry time even when nothing else happens, and compacts the
//! decision log.
//!
//! Every replica runs it. It reads the schedule (when each tenant's
//! decisions next change by time), sleeps until the earliest change or for
//! at most [`ExpiryConfig::rescan`] (a decision made on another replica, or
//! on this one without a wake-up, is noticed within that), and expires what
//! is due. Expiring is a conditional write under the tenant's decision lock
//! (`DecisionStore::expire_decisions`): when two replicas race, the second
//! finds nothing due and logs nothing, so a delta is never written twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::ingest::signal::Signal;
use crate::storage::{Store, StoreResult};

/// How the task runs.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryConfig {
    /// Longest sleep between two reads of the schedule.
    pub rescan: Duration,
    /// How long log entries are kept (a subscriber resuming from an older
    /// revision gets a fresh snapshot).
    pub log_retention: chrono::Duration,
    /// How long ended decisions are kept.
    pub history: chrono::Duration,
    /// How often the log is compacted.
    pub compact_every: Duration,
}

impl Default for ExpiryConfig {
    fn default() -> Self {
        Self {
            rescan: Duration::from_millis(500),
            log_retention: chrono::Duration::hours(24),
            history: crate::response::decisions::HISTORY,
            compact_every: Duration::from_secs(3600),
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pass {
    /// Log entries written (EXPIRED or UPDATED deltas).
    pub logged: u64,
    /// When the next decision ends, if any does.
    pub next: Option<DateTime<Utc>>,
    /// Decisions in force across tenants.
    pub active: u64,
}

/// Expires everything due at `now` for every tenant and wakes the tenants
/// whose effective decisions changed.
pub async fn run_once(store: &dyn Store, signal: &Signal, now: DateTime<Utc>) -> StoreResult<Pass> {
    let mut pass = Pass::default();
    for s in store.decision_schedule().await? {
        pass.active += s.head.active;
        match s.next_change_at {
            Some(at) if at <= now => {
                let logged = store.expire_decisions(s.tenant, now).await?;
                if logged > 0 {
                    metrics::counter!("picket_decisions_expired_total").increment(logged);
                    signal.notify(s.tenant);
                }
                pass.logged += logged;
            }
            Some(at) => pass.next = Some(pass.next.map_or(at, |n| n.min(at))),
            None => {}
        }
    }
    Ok(pass)
}

/// Compacts every tenant's log (entries older than `log_retention`) and
/// history (decisions ended more than `history` ago).
pub async fn compact_all(
    store: &dyn Store,
    now: DateTime<Utc>,
    config: &ExpiryConfig,
) -> StoreResult<()> {
    for s in store.decision_schedule().await? {
        store
            .compact_decisions(s.tenant, now - config.log_retention, now - config.history)
            .await?;
    }
    Ok(())
}

/// Runs until `shutdown`: expiries at their time, compaction every
/// `compact_every`. `wake` (notified after local decision writes) makes it
/// read the schedule again at once.
pub async fn run(
    store: Arc<dyn Store>,
    signal: Arc<Signal>,
    wake: Arc<Notify>,
    config: ExpiryConfig,
    shutdown: CancellationToken,
) {
    let mut next_compaction = tokio::time::Instant::now() + config.compact_every;
    loop {
        let now = Utc::now();
        let mut sleep = config.rescan;
        match run_once(store.as_ref(), &signal, now).await {
            Ok(pass) => {
                metrics::gauge!("picket_decisions_active").set(pass.active as f64);
                if let Some(next) = pass.next {
                    let until = (next - Utc::now()).to_std().unwrap_or_default();
                    sleep = sleep.min(until);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "decision expiry pass failed; retrying");
            }
        }
        if tokio::time::Instant::now() >= next_compaction {
            next_compaction = tokio::time::Instant::now() + config.compact_every;
            if let Err(e) = compact_all(store.as_ref(), Utc::now(), &config).await {
                tracing::warn!(error = %e, "decision log compaction failed; retrying in an hour");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = wake.notified() => {}
            () = shutdown.cancelled() => return,
        }
    }
}
