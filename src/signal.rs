//! The change-log wake-up signal: bumped after every change-log write
//! (alerts, incidents), waited on by the watch streams. It carries no data:
//! a woken stream reads the store from its own position.
//!
//! It tells local bumps (this process wrote) from peer bumps (another replica
//! wrote, as relayed by [`crate::replicas`]), so that only local writes are
//! published to the peers and a peer's signal is never echoed back.

use tokio::sync::{Notify, watch};

/// A coalescing wake-up counter with a separate "written here" flag.
#[derive(Debug)]
pub struct Signal {
    /// The counter streams wait on.
    tx: watch::Sender<u64>,
    /// Set by local writes; the replica bridge waits on it. `Notify` keeps at
    /// most one pending permit, so bursts of writes coalesce into one message.
    local: Notify,
}

impl Default for Signal {
    fn default() -> Self {
        Self::new()
    }
}

impl Signal {
    /// A signal nobody has bumped yet.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(0),
            local: Notify::new(),
        }
    }

    /// A change was committed by this process: wake local streams and tell peers.
    pub fn notify(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
        self.local.notify_one();
    }

    /// Another replica (or a reconnect) says there may be something new:
    /// wake local streams only.
    pub fn wake(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes after every bump.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Resolves after the next local write (or at once if one is pending).
    pub async fn written_here(&self) {
        self.local.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_writes_wake_streams_and_peers_but_peer_wakes_stay_local() {
        let s = Signal::new();
        let mut rx = s.subscribe();
        s.wake();
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        // A peer wake leaves nothing for the bridge to publish.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), s.written_here());
        assert!(pending.await.is_err());
        s.notify();
        s.notify();
        assert!(rx.has_changed().unwrap());
        // Two writes, one pending publication.
        s.written_here().await;
        let again = tokio::time::timeout(std::time::Duration::from_millis(20), s.written_here());
        assert!(again.await.is_err());
    }
}
