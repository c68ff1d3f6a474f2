//! Per-tenant wake-up signals: bumped after a tenant's feed moved (events
//! committed, a change-log write for alerts or incidents), waited on by that
//! tenant's watch streams. A signal carries no data: a woken stream reads the
//! store from its own position. Being per tenant, one tenant's writes never
//! wake another tenant's streams.
//!
//! A signal tells local writes (this process wrote: [`Signal::notify`]) from
//! wake-ups relayed from other replicas ([`Signal::wake`], see
//! [`crate::cluster::replicas`]), so that only local writes are published to the peers
//! and a peer's signal is never echoed back.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::{Notify, broadcast, watch};

use crate::domain::TenantId;

/// Coalescing wake-up counters, one per tenant with listeners.
#[derive(Debug)]
pub struct Signal {
    /// Each tenant's counter.
    tenants: Mutex<HashMap<TenantId, watch::Sender<u64>>>,
    /// Tenants written by this process since the bridge last looked.
    written: Mutex<BTreeSet<TenantId>>,
    /// Woken on local writes; keeps at most one permit, so bursts coalesce.
    local: Notify,
    /// Every tenant woken (locally or by a peer), for listeners that follow
    /// all tenants (playbook triggers); a listener that falls behind is told
    /// it lagged and looks at every tenant.
    touched: broadcast::Sender<TenantId>,
}

impl Default for Signal {
    fn default() -> Self {
        Self {
            tenants: Mutex::default(),
            written: Mutex::default(),
            local: Notify::new(),
            touched: broadcast::channel(TOUCHED_BUFFER).0,
        }
    }
}

/// Tenant wake-ups a [`Signal::touched`] listener may be behind by.
const TOUCHED_BUFFER: usize = 1024;

impl Signal {
    /// A signal nobody has bumped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every tenant woken from now on, in order (`Lagged` if the listener
    /// fell more than 1,024 behind).
    pub fn touched(&self) -> broadcast::Receiver<TenantId> {
        self.touched.subscribe()
    }

    /// This process committed a change for `tenant`: wake its streams here
    /// and mark it for the peers.
    pub fn notify(&self, tenant: TenantId) {
        self.wake(tenant);
        self.written.lock().expect("signal lock").insert(tenant);
        self.local.notify_one();
    }

    /// `tenant`'s feed may have moved (a peer wrote): wake its streams here only.
    pub fn wake(&self, tenant: TenantId) {
        let _ = self.touched.send(tenant);
        let mut tenants = self.tenants.lock().expect("signal lock");
        if let Some(tx) = tenants.get(&tenant) {
            if tx.receiver_count() == 0 {
                tenants.remove(&tenant);
            } else {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Anything may have moved (after a reconnect): wake every stream here.
    pub fn wake_all(&self) {
        let mut tenants = self.tenants.lock().expect("signal lock");
        tenants.retain(|_, tx| tx.receiver_count() > 0);
        for tx in tenants.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver that changes after every bump for `tenant`.
    pub fn subscribe(&self, tenant: TenantId) -> watch::Receiver<u64> {
        self.tenants
            .lock()
            .expect("signal lock")
            .entry(tenant)
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe()
    }

    /// Waits for local writes, then returns the tenants written since the
    /// last call (at least one).
    pub async fn written_here(&self) -> BTreeSet<TenantId> {
        loop {
            let taken = self.take_written();
            if !taken.is_empty() {
                return taken;
            }
            self.local.notified().await;
        }
    }

    /// The tenants written since the last look, without waiting.
    pub fn take_written(&self) -> BTreeSet<TenantId> {
        std::mem::take(&mut *self.written.lock().expect("signal lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_only_the_tenant_and_publishes_only_local_writes() {
        let s = Signal::new();
        let (a, b) = (
            TenantId(uuid::Uuid::from_u128(1)),
            TenantId(uuid::Uuid::from_u128(2)),
        );
        let mut rx_a = s.subscribe(a);
        let rx_b = s.subscribe(b);
        s.wake(a);
        assert!(rx_a.has_changed().unwrap());
        assert!(!rx_b.has_changed().unwrap(), "another tenant is not woken");
        rx_a.mark_unchanged();
        // A peer wake leaves nothing for the bridge to publish.
        assert!(s.take_written().is_empty());
        s.notify(b);
        s.notify(b);
        assert!(rx_b.has_changed().unwrap());
        assert_eq!(s.written_here().await, [b].into());
        assert!(s.take_written().is_empty(), "two writes, one publication");
        s.wake_all();
        assert!(rx_a.has_changed().unwrap());
        // Tenants nobody listens to are forgotten.
        drop((rx_a, rx_b));
        s.wake_all();
        assert!(s.tenants.lock().unwrap().is_empty());
    }
}
