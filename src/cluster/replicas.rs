//! Several replicas on one store: Redis pub/sub as a wake-up signal between
//! `picket serve` processes (`--redis-url`).
//!
//! The store's change log and event feed stay the source of truth; a signal
//! carries no data, only "tenant T has new events", "the change log moved",
//! "tenant T's rules changed". A replica that receives one wakes its own
//! watch streams, tails and detection, which then read the store from their
//! own positions. So a lost, late or duplicated signal can delay an update but
//! never lose or repeat one:
//!
//! - Local writes are coalesced (one message per burst) and published by a
//!   task of their own; writers never wait on Redis.
//! - If Redis goes away, every replica keeps serving: its own writes wake its
//!   own streams at once, and peers' writes arrive by the streams' periodic
//!   re-read of the store. When Redis returns the bridge resubscribes and
//!   wakes everything once, so nothing waits for the next poll.
//! - Webhook delivery ids are remembered in Redis (`SET NX` with a TTL) after
//!   the store committed them, so a replayed delivery is answered from Redis;
//!   the store's unique index stays the authority (a delivery is never
//!   claimed in Redis before it is durably stored, which would lose it if the
//!   commit then failed).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::domain::TenantId;
use crate::ingest::signal::Signal;
use crate::ingest::{CommitNotices, CommittedEvents};

/// The pub/sub channel every replica publishes to and subscribes on.
pub const CHANNEL: &str = "picket:v1:signals";
/// How long a committed webhook delivery id is remembered in Redis.
const DELIVERY_TTL_SECONDS: u64 = 24 * 3600;
/// Redis command and connect timeout: a stalled Redis must not stall anything.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnect back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One signal message (JSON on [`CHANNEL`]).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
struct Message {
    /// The publishing replica; a replica ignores its own messages.
    from: Uuid,
    /// Tenants whose change log (alerts, incidents) moved.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    changes: BTreeSet<TenantId>,
    /// Tenants with newly committed events.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    events: BTreeSet<TenantId>,
    /// Tenants whose detection rules changed.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    rules: BTreeSet<TenantId>,
}

impl Message {
    fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.events.is_empty() && self.rules.is_empty()
    }
}

/// This replica's handle to its peers, held by the API and HTTP handlers.
/// Without Redis it only forwards rule changes to the local pipeline.
#[derive(Clone)]
pub struct Peers {
    /// Tells this process's detection pipeline that a tenant's rules changed.
    local_rules: mpsc::UnboundedSender<TenantId>,
    /// Set when `--redis-url` is configured.
    redis: Option<RedisPeers>,
}

#[derive(Clone)]
struct RedisPeers {
    /// Commands (publish, delivery ids); reconnects by itself.
    conn: ConnectionManager,
    /// Rule changes to publish.
    rules_out: mpsc::UnboundedSender<TenantId>,
    /// Whether the subscription is live (for `/healthz` and the gauge).
    connected: Arc<AtomicBool>,
}

impl Peers {
    /// Without Redis: everything stays in this process.
    pub fn local(local_rules: mpsc::UnboundedSender<TenantId>) -> Self {
        Self {
            local_rules,
            redis: None,
        }
    }

    /// A tenant's rules changed through this replica: reload them here and,
    /// with Redis, on every peer.
    pub fn rules_changed(&self, tenant: TenantId) {
        let _ = self.local_rules.send(tenant);
        if let Some(r) = &self.redis {
            let _ = r.rules_out.send(tenant);
        }
    }

    /// `"off"` without Redis, else whether the signal channel is up.
    pub fn redis_status(&self) -> &'static str {
        match &self.redis {
            None => "off",
            Some(r) if r.connected.load(Ordering::Relaxed) => "up",
            Some(_) => "down",
        }
    }

    /// Redis, if configured and up: while it is down, webhooks skip it
    /// rather than wait for its timeouts.
    fn redis_up(&self) -> Option<&RedisPeers> {
        self.redis
            .as_ref()
            .filter(|r| r.connected.load(Ordering::Relaxed))
    }

    /// Whether Redis remembers delivery `id` of webhook source `source` as
    /// committed; `false` without Redis or when it is down or fails (the
    /// store then decides).
    pub async fn delivery_committed(&self, source: Uuid, id: &str) -> bool {
        let Some(r) = self.redis_up() else {
            return false;
        };
        let mut conn = r.conn.clone();
        match conn.exists::<_, bool>(delivery_key(source, id)).await {
            Ok(seen) => seen,
            Err(e) => {
                metrics::counter!("picket_redis_errors_total", "op" => "delivery_check")
                    .increment(1);
                tracing::debug!(error = %e, "redis delivery check failed; the store decides");
                false
            }
        }
    }

    /// Remembers a delivery id the store has committed (best effort).
    pub async fn remember_delivery(&self, source: Uuid, id: &str) {
        let Some(r) = self.redis_up() else { return };
        let mut conn = r.conn.clone();
        let options = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(DELIVERY_TTL_SECONDS));
        let set: redis::RedisResult<Option<String>> =
            conn.set_options(delivery_key(source, id), 1, options).await;
        if let Err(e) = set {
            metrics::counter!("picket_redis_errors_total", "op" => "delivery_remember")
                .increment(1);
            tracing::debug!(error = %e, "redis delivery remember failed");
        }
    }
}

fn delivery_key(source: Uuid, id: &str) -> String {
    format!("picket:v1:delivery:{source}:{id}")
}

/// What the bridge wakes in this process.
pub struct Wiring {
    /// The change-log signal (watch streams wait on it; local writes bump it).
    pub changes: Arc<Signal>,
    /// Event tails and the detection hand-off.
    pub events: CommitNotices,
}

/// The running bridge's parts, before [`Bridge::run`] is spawned.
pub struct Bridge {
    id: Uuid,
    client: redis::Client,
    conn: ConnectionManager,
    connected: Arc<AtomicBool>,
    rules_in: mpsc::UnboundedReceiver<TenantId>,
    local_rules: mpsc::UnboundedSender<TenantId>,
    wiring: Wiring,
    local_events: broadcast::Receiver<Arc<CommittedEvents>>,
}

impl Bridge {
    /// Prepares the bridge for `url` without connecting (a replica starts and
    /// serves even while Redis is down); returns it with the [`Peers`] handle.
    pub fn new(
        url: &str,
        local_rules: mpsc::UnboundedSender<TenantId>,
        wiring: Wiring,
    ) -> anyhow::Result<(Self, Peers)> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid --redis-url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| anyhow::anyhow!("redis connection manager: {e}"))?;
        let connected = Arc::new(AtomicBool::new(false));
        let (rules_out, rules_in) = mpsc::unbounded_channel();
        let local_events = wiring.events.subscribe();
        let peers = Peers {
            local_rules: local_rules.clone(),
            redis: Some(RedisPeers {
                conn: conn.clone(),
                rules_out,
                connected: connected.clone(),
            }),
        };
        metrics::gauge!("picket_redis_connected").set(0.0);
        Ok((
            Self {
                id: Uuid::new_v4(),
                client,
                conn,
                connected,
                rules_in,
                local_rules,
                wiring,
                local_events,
            },
            peers,
        ))
    }

    /// Publishes local changes and relays peers' until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self {
            id,
            client,
            conn,
            connected,
            rules_in,
            local_rules,
            wiring,
            local_events,
        } = self;
        tracing::info!(replica = %id, channel = CHANNEL, "replica signals over redis");
        let publisher = publish_loop(
            id,
            conn,
            wiring.changes.clone(),
            local_events,
            rules_in,
            shutdown.clone(),
        );
        let subscriber = subscribe_loop(id, client, &wiring, local_rules, connected, shutdown);
        tokio::join!(publisher, subscriber);
    }
}

/// Waits for local writes, coalesces what is pending into one message, publishes.
async fn publish_loop(
    id: Uuid,
    mut conn: ConnectionManager,
    changes: Arc<Signal>,
    mut events: broadcast::Receiver<Arc<CommittedEvents>>,
    mut rules: mpsc::UnboundedReceiver<TenantId>,
    shutdown: CancellationToken,
) {
    let mut healthy = true;
    loop {
        let mut msg = Message {
            from: id,
            ..Message::default()
        };
        tokio::select! {
            written = changes.written_here() => msg.changes = written,
            got = events.recv() => match got {
                Ok(c) if !c.from_peer => { msg.events.insert(c.tenant); }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Some(t) = rules.recv() => { msg.rules.insert(t); }
            () = shutdown.cancelled() => return,
        }
        // Whatever else is already pending goes into the same message.
        loop {
            match events.try_recv() {
                Ok(c) if !c.from_peer => {
                    msg.events.insert(c.tenant);
                }
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        while let Ok(t) = rules.try_recv() {
            msg.rules.insert(t);
        }
        msg.changes.extend(changes.take_written());
        if msg.is_empty() {
            continue;
        }
        let payload = serde_json::to_string(&msg).expect("a signal serializes");
        // The first command after Redis came back fails on the dead
        // connection and makes the manager reconnect: try once more.
        let mut published = conn.publish::<_, _, i64>(CHANNEL, &payload).await;
        if published.is_err() {
            published = conn.publish::<_, _, i64>(CHANNEL, &payload).await;
        }
        match published {
            Ok(_) => {
                metrics::counter!("picket_replica_signals_published_total").increment(1);
                if !healthy {
                    tracing::info!("redis publishing works again");
                    healthy = true;
                }
            }
            Err(e) => {
                metrics::counter!("picket_redis_errors_total", "op" => "publish").increment(1);
                if healthy {
                    tracing::warn!(error = %e, "redis publish failed; peers will see this replica's changes on their next store poll");
                    healthy = false;
                }
            }
        }
    }
}

/// Keeps a subscription to [`CHANNEL`] and wakes this process on peers'
/// messages, reconnecting with back-off while Redis is away.
async fn subscribe_loop(
    id: Uuid,
    client: redis::Client,
    wiring: &Wiring,
    local_rules: mpsc::UnboundedSender<TenantId>,
    connected: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut reported_down = false;
    loop {
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(REDIS_TIMEOUT * 2, attempt) => r,
            () = shutdown.cancelled() => return,
        };
        match outcome {
            Ok(Ok(pubsub)) => {
                connected.store(true, Ordering::Relaxed);
                metrics::gauge!("picket_redis_connected").set(1.0);
                tracing::info!(channel = CHANNEL, "redis signal subscription up");
                backoff = BACKOFF_MIN;
                reported_down = false;
                // Whatever peers wrote while we were away: look once now.
                wiring.changes.wake_all();
                wiring.events.wake(None);
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(m) => relay(id, m.get_payload_bytes(), wiring, &local_rules),
                            None => break,
                        },
                        () = shutdown.cancelled() => return,
                    }
                }
                connected.store(false, Ordering::Relaxed);
                metrics::gauge!("picket_redis_connected").set(0.0);
                metrics::counter!("picket_redis_errors_total", "op" => "subscription_lost")
                    .increment(1);
                tracing::warn!(
                    "redis signal subscription lost; serving local subscribers, peers' changes arrive by store polling until it returns"
                );
            }
            Ok(Err(e)) => {
                if !reported_down {
                    tracing::warn!(error = %e, "redis unreachable; retrying in the background");
                    reported_down = true;
                }
            }
            Err(_) => {
                if !reported_down {
                    tracing::warn!("redis connect timed out; retrying in the background");
                    reported_down = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Acts on one peer message.
fn relay(id: Uuid, payload: &[u8], wiring: &Wiring, local_rules: &mpsc::UnboundedSender<TenantId>) {
    let msg: Message = match serde_json::from_slice(payload) {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!("picket_replica_signals_received_total", "outcome" => "invalid")
                .increment(1);
            tracing::warn!(error = %e, "ignoring an unreadable replica signal");
            return;
        }
    };
    if msg.from == id {
        return;
    }
    metrics::counter!("picket_replica_signals_received_total", "outcome" => "relayed").increment(1);
    for t in &msg.changes {
        wiring.changes.wake(*t);
    }
    if !msg.events.is_empty() {
        let tenants: Vec<TenantId> = msg.events.into_iter().collect();
        wiring.events.wake(Some(&tenants));
    }
    for t in msg.rules {
        let _ = local_rules.send(t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_stay_small() {
        let t = TenantId(Uuid::nil());
        let msg = Message {
            from: Uuid::nil(),
            changes: [t].into(),
            events: [t].into(),
            rules: BTreeSet::new(),
        };
        let json = serde_json::to_string(&msg).unwrap();
        assert!(!json.contains("rules"), "{json}");
        assert_eq!(serde_json::from_str::<Message>(&json).unwrap(), msg);
        // A newer peer's unknown fields do not break an older one.
        let newer = r#"{"from":"00000000-0000-0000-0000-000000000000","rules":["00000000-0000-0000-0000-000000000000"],"x":1}"#;
        assert_eq!(
            serde_json::from_str::<Message>(newer).unwrap().rules,
            [t].into()
        );
    }
}
