//! Detection shared across replicas by tenant.
//!
//! Tenants fall into `--detect-shards` shards (64 by default) by a stable
//! hash of their id ([`shard_of`]); each shard has at most one leader, the
//! replica holding its lock ([`ShardLocks`]: a Postgres session advisory lock
//! per shard), and a replica's pipeline evaluates only the tenants of the
//! shards it leads. Every replica must use the same count: a replica whose
//! count differs from the replicas already running detection is refused and
//! stands by (see [`crate::storage::Store::join_detection`]).
//!
//! [`lead`] runs on every replica with detection on. It joins (announcing its
//! presence), then every [`BALANCE`] counts the replicas present and aims for
//! its fair share, `ceil(shards / replicas)`:
//!
//! - below it, it locks free shards (in an order of its own, so replicas
//!   rarely reach for the same ones) and hands them to its pipeline, which
//!   rebuilds their tenants' state by replay, exactly as a process does at
//!   start (see the pipeline's module docs): history up to each tenant's feed
//!   head is replayed and raises only what no stored alert covers, and later
//!   events are evaluated live. So a hand-over resumes where the previous
//!   leader stopped: its committed alerts are not raised again, and what it
//!   had not evaluated (or not committed) is.
//! - above it (a replica joined), it takes surplus shards back from its
//!   pipeline, which stops evaluating their tenants, drops their state and
//!   waits until every alert it queued is committed; only then is the lock
//!   released, so the next leader's replay sees those alerts.
//!
//! A replica that dies loses its connection and with it every lock at once;
//! the others see fewer replicas and free shards at their next balance and
//! take them over. A replica whose lock connection fails while it runs
//! stops its pipeline and fences its alert writer (queued alerts are dropped
//! and raised by the new leaders' replay; one already being written can at
//! worst fold into the same alert by fingerprint, never make a second one),
//! then joins again. A single process (SQLite, or one replica) leads every
//! shard, in one hand-over at start: the same rebuild as before shards.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::domain::TenantId;
use crate::ingest::CommittedEvents;
use crate::pipeline::{DetectionPipeline, RuleUpdates};
use crate::storage::{Joined, ShardLocks, Store, StoreResult};

/// Shards when `--detect-shards` is not given.
pub const DEFAULT_SHARDS: u32 = 64;
/// Most shards `--detect-shards` accepts.
pub const MAX_SHARDS: u32 = 1024;
/// How often a replica recounts the replicas and takes or hands back shards.
pub const BALANCE: Duration = Duration::from_secs(1);
/// How often a replica that could not join (or lost its locks) tries again.
pub const LEAD_RETRY: Duration = Duration::from_secs(3);
/// The pipeline looks for tenants it has not heard of every this many polls.
pub const DISCOVER_EVERY: u64 = 5;

/// The shard of `tenant` among `count`: the first 8 bytes of SHA-256 over
/// the tenant id's 16 bytes, big-endian, modulo `count`. Stable across
/// versions, platforms and processes (every replica must compute the same).
pub fn shard_of(tenant: TenantId, count: u32) -> u32 {
    let digest = Sha256::digest(tenant.0.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(head) % u64::from(count.max(1))) as u32
}

/// A replica's fair share of `count` shards among `replicas`.
pub fn fair_share(count: u32, replicas: u32) -> u32 {
    count.div_ceil(replicas.max(1))
}

/// The shards (out of `count`) whose tenants a pipeline evaluates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSet {
    /// Shards in all.
    count: u32,
    /// Those led.
    led: BTreeSet<u32>,
}

impl ShardSet {
    /// Every one of `count` shards (a pipeline alone, or driven directly).
    pub fn all(count: u32) -> Self {
        let count = count.max(1);
        Self {
            count,
            led: (0..count).collect(),
        }
    }

    /// None of `count` shards yet.
    pub fn none(count: u32) -> Self {
        Self {
            count: count.max(1),
            led: BTreeSet::new(),
        }
    }

    /// These of `count` shards.
    pub fn of(count: u32, shards: impl IntoIterator<Item = u32>) -> Self {
        let count = count.max(1);
        Self {
            count,
            led: shards.into_iter().filter(|s| *s < count).collect(),
        }
    }

    /// Whether `tenant`'s shard is led.
    pub fn leads(&self, tenant: TenantId) -> bool {
        self.led.len() as u32 == self.count || self.led.contains(&shard_of(tenant, self.count))
    }

    /// Shards led.
    pub fn len(&self) -> u32 {
        self.led.len() as u32
    }

    /// Whether none is led.
    pub fn is_empty(&self) -> bool {
        self.led.is_empty()
    }
}

/// What the leader asks of its pipeline.
pub(crate) enum Command {
    /// Evaluate these shards' tenants from now on, after rebuilding their
    /// state by replay; answers whether the rebuild succeeded (if not, the
    /// pipeline holds nothing of them and the locks must be released).
    Acquire(Vec<u32>, oneshot::Sender<bool>),
    /// Stop evaluating these shards' tenants and drop their state; answered
    /// once every alert queued so far is committed.
    Release(Vec<u32>, oneshot::Sender<()>),
}

impl DetectionPipeline {
    /// Carries out a leader's command.
    pub(crate) async fn command(&mut self, command: Command) {
        match command {
            Command::Acquire(shards, done) => {
                let ok = self.acquire(&shards).await;
                let _ = done.send(ok);
            }
            Command::Release(shards, done) => {
                self.release(&shards).await;
                let _ = done.send(());
            }
        }
    }

    /// Takes `shards` on: rebuilds their tenants' state by replay (raising
    /// only what no stored alert covers) and evaluates them from then on.
    async fn acquire(&mut self, shards: &[u32]) -> bool {
        let new = ShardSet::of(self.shards.count, shards.iter().copied());
        // Nothing of them should be held; make sure a replay starts clean.
        self.forget_where(|t| new.leads(t));
        let started = Instant::now();
        match self.rebuild_of(&new, Utc::now()).await {
            Ok(raised) if !self.shutdown.is_cancelled() => {
                self.shards.led.extend(new.led);
                self.progress.set_shards(self.shards.len());
                metrics::histogram!("picket_detection_shard_rebuild_seconds")
                    .record(started.elapsed().as_secs_f64());
                if raised > 0 {
                    tracing::info!(raised, "alerts raised by the replay of acquired shards");
                }
                return true;
            }
            // Stopped half-way by shutdown.
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = ?anyhow::Error::from(e), "rebuilding acquired detection shards failed; handing them back");
            }
        }
        // Half-rebuilt tenants must not be evaluated, and what the replay
        // queued is committed before the locks go.
        self.forget_where(|t| new.leads(t));
        self.raiser.flush().await;
        false
    }

    /// Hands `shards` back: their tenants are evaluated up to their feed
    /// heads one last time (so the next leader's replay has as little as
    /// possible left to raise), then no longer evaluated here; their state is
    /// dropped (open anomaly windows unscored, as at a restart), and this
    /// returns once every alert queued so far is committed.
    async fn release(&mut self, shards: &[u32]) {
        let going = ShardSet::of(self.shards.count, shards.iter().copied());
        let tenants: Vec<TenantId> = self
            .positions
            .keys()
            .copied()
            .filter(|t| going.leads(*t))
            .collect();
        for t in tenants {
            if let Err(e) = self.process_tenant(t).await {
                tracing::warn!(tenant_id = %t, error = ?anyhow::Error::from(e), "last pass before a hand-over failed; the next leader's replay covers it");
            }
        }
        for s in shards {
            self.shards.led.remove(s);
        }
        let kept = self.shards.clone();
        self.forget_where(|t| !kept.leads(t));
        self.raiser.flush().await;
        self.progress.set_shards(self.shards.len());
    }

    /// Drops everything held for the tenants `drop` picks.
    fn forget_where(&mut self, drop: impl Fn(TenantId) -> bool) {
        let gone: Vec<TenantId> = self
            .positions
            .keys()
            .copied()
            .filter(|t| drop(*t))
            .collect();
        for t in gone {
            self.positions.remove(&t);
            self.evaluator.remove_tenant(t);
            self.scorer.forget(t);
            self.progress.forget(t);
        }
    }

    /// Starts evaluating tenants of led shards it has not heard of (created
    /// after their shard was taken on, with events ingested through another
    /// replica and no Redis signal): from the start of their feed, as no
    /// other replica can have evaluated them. Returns alerts raised.
    pub(crate) async fn discover(&mut self) -> StoreResult<usize> {
        let mut raised = 0;
        let mut after: Option<String> = None;
        loop {
            let tenants = self.store.list_tenants(after.as_deref(), 500).await?;
            for t in &tenants {
                if !self.positions.contains_key(&t.id) && self.shards.leads(t.id) {
                    tracing::info!(tenant_id = %t.id, "detection found a new tenant");
                    raised += self.process_tenant(t.id).await?;
                }
            }
            match tenants.last() {
                Some(t) if tenants.len() == 500 => after = Some(t.name.clone()),
                _ => break,
            }
        }
        Ok(raised)
    }

    /// Cancelled when the shards are lost (the alert writer drops its queue).
    pub(crate) fn fence(&self) -> CancellationToken {
        self.fence.clone()
    }
}

/// Runs detection for this replica's share of the shards until shutdown (see
/// the module docs): joins, runs a pipeline built by `build` and balances
/// shards onto it; joins again after a lost lock connection.
pub async fn lead(
    store: Arc<dyn Store>,
    shards: u32,
    build: impl Fn(CancellationToken) -> DetectionPipeline,
    subscribe: impl Fn() -> broadcast::Receiver<Arc<CommittedEvents>>,
    rule_updates: RuleUpdates,
    shutdown: CancellationToken,
) {
    let shards = shards.clamp(1, MAX_SHARDS);
    let mut refused_logged: Option<String> = None;
    while !shutdown.is_cancelled() {
        // Subscribe before joining, so no commit notice falls between.
        let handoff = subscribe();
        match store.join_detection(shards).await {
            Ok(Joined::Member(locks)) => {
                refused_logged = None;
                tracing::info!(shards, "joined detection");
                let term = shutdown.child_token();
                let pipeline = build(term.clone());
                run_term(locks, shards, pipeline, handoff, &term).await;
                set_led(0);
            }
            Ok(Joined::Refused(why)) => {
                if refused_logged.as_deref() != Some(why.as_str()) {
                    tracing::error!(reason = %why, "this replica may not run detection yet; standing by");
                    refused_logged = Some(why);
                }
            }
            Err(e) => {
                tracing::warn!(error = ?anyhow::Error::from(e), "could not join detection; retrying");
            }
        }
        if !shutdown.is_cancelled() {
            // Rule changes are for the shards' leaders; a pipeline that
            // joins later loads every tenant's rules afresh.
            if let Ok(mut rx) = rule_updates.try_lock() {
                while rx.try_recv().is_ok() {}
            }
        }
        tokio::select! {
            () = tokio::time::sleep(LEAD_RETRY) => {}
            () = shutdown.cancelled() => {}
        }
    }
}

/// One membership: the pipeline runs while shards are balanced onto it,
/// until shutdown (the pipeline commits what it detected, then the locks go)
/// or until the locks are lost (the pipeline is fenced and dropped).
async fn run_term(
    locks: ShardLocks,
    shards: u32,
    pipeline: DetectionPipeline,
    handoff: broadcast::Receiver<Arc<CommittedEvents>>,
    term: &CancellationToken,
) {
    let fence = pipeline.fence();
    let lost = locks.lost();
    let (tx, rx) = mpsc::channel(4);
    tokio::select! {
        () = pipeline.run(handoff, shards, rx) => return,
        // The writer stops before anything else happens.
        () = balance(&locks, shards, tx) => fence.cancel(),
        () = lost.cancelled() => fence.cancel(),
    }
    term.cancel();
    metrics::counter!("picket_detection_shards_lost_total").increment(1);
    tracing::warn!("detection shard locks lost (their database connection failed); joining again");
}

/// Sets the gauges of shards led.
fn set_led(led: usize) {
    metrics::gauge!("picket_detection_shards_led").set(led as f64);
    metrics::gauge!("picket_detection_leader").set(if led > 0 { 1.0 } else { 0.0 });
}

/// Takes or hands back shards every [`BALANCE`] so this replica holds its
/// fair share. Returns when the lock connection fails.
async fn balance(locks: &ShardLocks, count: u32, pipeline: mpsc::Sender<Command>) {
    // This replica's order of preference: from a random shard on.
    let offset = (uuid::Uuid::new_v4().as_u128() % u128::from(count)) as u32;
    let order: Vec<u32> = (0..count).map(|i| (offset + i) % count).collect();
    let mut held: BTreeSet<u32> = BTreeSet::new();
    let mut ticker = tokio::time::interval(BALANCE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let replicas = match locks.replicas().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = ?anyhow::Error::from(e), "counting detection replicas failed");
                return;
            }
        };
        metrics::gauge!("picket_detection_replicas").set(f64::from(replicas));
        let target = fair_share(count, replicas) as usize;
        if held.len() > target {
            // The least preferred first.
            let surplus: Vec<u32> = order
                .iter()
                .rev()
                .copied()
                .filter(|s| held.contains(s))
                .take(held.len() - target)
                .collect();
            let (done, answered) = oneshot::channel();
            if pipeline
                .send(Command::Release(surplus.clone(), done))
                .await
                .is_err()
                || answered.await.is_err()
            {
                return std::future::pending().await;
            }
            for s in &surplus {
                if let Err(e) = locks.unlock(*s).await {
                    tracing::warn!(error = ?anyhow::Error::from(e), "unlocking a detection shard failed");
                    return;
                }
                held.remove(s);
            }
            metrics::counter!("picket_detection_shard_handovers_total", "direction" => "released")
                .increment(surplus.len() as u64);
            tracing::info!(shards = ?surplus, led = held.len(), replicas, "detection shards handed over");
        } else if held.len() < target {
            let free: Vec<u32> = order
                .iter()
                .copied()
                .filter(|s| !held.contains(s))
                .collect();
            let new = match locks.try_lock(&free, target - held.len()).await {
                Ok(new) => new,
                Err(e) => {
                    tracing::warn!(error = ?anyhow::Error::from(e), "locking detection shards failed");
                    return;
                }
            };
            if !new.is_empty() {
                let (done, answered) = oneshot::channel();
                if pipeline
                    .send(Command::Acquire(new.clone(), done))
                    .await
                    .is_err()
                {
                    return std::future::pending().await;
                }
                let ok = match answered.await {
                    Ok(ok) => ok,
                    Err(_) => return std::future::pending().await,
                };
                if ok {
                    held.extend(new.iter().copied());
                    metrics::counter!("picket_detection_shard_handovers_total", "direction" => "acquired")
                        .increment(new.len() as u64);
                    tracing::info!(shards = ?new, led = held.len(), replicas, "detection shards taken on");
                } else {
                    for s in &new {
                        if locks.unlock(*s).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        set_led(held.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_shard_is_stable_and_documented() {
        // Every replica, version and platform must agree: a fixed tenant id
        // always lands in the same shard.
        let t = TenantId(uuid::Uuid::parse_str("0190f5c2-7d1e-7a3b-9c4d-5e6f70819203").unwrap());
        // Computed apart: first 8 bytes of SHA-256 of the 16 id bytes, big-endian.
        assert_eq!(shard_of(t, 64), 35);
        assert_eq!(shard_of(t, 1024), 227);
        assert_eq!(shard_of(t, 7), 1);
        assert_eq!(shard_of(t, 1), 0);
    }

    #[test]
    fn tenants_spread_over_the_shards() {
        let mut per = [0u32; 64];
        for _ in 0..6400 {
            per[shard_of(TenantId(uuid::Uuid::now_v7()), 64) as usize] += 1;
        }
        // About 100 each; a hash that ignored the random bits of a v7 id
        // (time-ordered) would pile them up.
        assert!(per.iter().all(|n| (50..=160).contains(n)), "{per:?}");
    }

    #[test]
    fn fair_shares_cover_every_shard() {
        assert_eq!(fair_share(64, 1), 64);
        assert_eq!(fair_share(64, 2), 32);
        assert_eq!(fair_share(64, 3), 22);
        assert_eq!(fair_share(64, 0), 64);
        assert_eq!(fair_share(1, 2), 1);
        for replicas in 1..100 {
            assert!(fair_share(64, replicas) * replicas >= 64);
        }
    }

    #[test]
    fn a_set_leads_the_tenants_of_its_shards() {
        let t = TenantId(uuid::Uuid::now_v7());
        let s = shard_of(t, 8);
        assert!(ShardSet::all(8).leads(t));
        assert!(!ShardSet::none(8).leads(t));
        assert!(ShardSet::of(8, [s]).leads(t));
        assert!(!ShardSet::of(8, [(s + 1) % 8]).leads(t));
        assert_eq!(ShardSet::of(8, [1, 9]).len(), 1, "out of range is ignored");
    }
}
