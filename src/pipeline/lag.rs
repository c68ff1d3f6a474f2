//! How far detection is behind ingest, for `picket_detect_lag_seconds` and
//! `/healthz`.
//!
//! A gauge, not a histogram: a histogram records only events that were
//! evaluated, so a pipeline that is stuck (or slowed by a full alert queue)
//! would show nothing; the gauge grows while detection falls behind and is
//! what `/healthz` reports.
//!
//! The value: while some tenant has events read but not yet evaluated, the
//! time since the oldest of them was received (≈ committed); once every
//! tenant is caught up, how long the newest evaluated event waited between
//! being received and being evaluated.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::domain::TenantId;

/// Detection's progress, shared by the pipeline and `/healthz`.
#[derive(Debug, Default)]
pub struct DetectProgress {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Detection shards this process leads now (it runs detection if any).
    shards: u32,
    /// Per tenant behind: when its oldest unevaluated event read was received.
    behind: HashMap<TenantId, DateTime<Utc>>,
    /// Seconds the newest evaluated event waited.
    last: f64,
}

impl DetectProgress {
    /// The detection lag in seconds (see the module docs), or `None` when
    /// this process does not run detection.
    pub fn lag_seconds(&self, now: DateTime<Utc>) -> Option<f64> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (inner.shards > 0).then(|| match inner.behind.values().min() {
            Some(oldest) => secs(now - *oldest),
            None => inner.last,
        })
    }

    /// Detection shards this process leads (0: it runs no detection now).
    pub fn shards(&self) -> u32 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).shards
    }

    /// This process now leads `shards` detection shards.
    pub(crate) fn set_shards(&self, shards: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.shards = shards;
        if shards == 0 {
            inner.behind.clear();
            inner.last = 0.0;
        }
    }

    /// `tenant` is no longer evaluated here (its shard was handed over).
    pub(crate) fn forget(&self, tenant: TenantId) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.behind.remove(&tenant);
    }

    /// `tenant`'s events from one received at `oldest` on are read, not yet evaluated.
    pub(crate) fn reading(&self, tenant: TenantId, oldest: DateTime<Utc>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.behind.entry(tenant).or_insert(oldest);
    }

    /// `tenant`'s events up to one received at `newest` are evaluated;
    /// `caught_up`: none is left in its feed. Updates the gauge.
    pub(crate) fn evaluated(
        &self,
        tenant: TenantId,
        newest: DateTime<Utc>,
        caught_up: bool,
        now: DateTime<Utc>,
    ) {
        {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.last = secs(now - newest);
            if caught_up {
                inner.behind.remove(&tenant);
            } else {
                inner.behind.insert(tenant, newest);
            }
        }
        if let Some(lag) = self.lag_seconds(now) {
            metrics::gauge!("picket_detect_lag_seconds").set(lag);
        }
    }
}

fn secs(d: chrono::Duration) -> f64 {
    d.to_std().unwrap_or_default().as_secs_f64()
}
