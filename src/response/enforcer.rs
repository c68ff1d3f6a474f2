//! The enforcement index: per tenant, an in-memory copy of the decisions in
//! force, kept current from the tenant's decision revision log, that answers
//! CheckAccess without touching the database and feeds every WatchDecisions
//! subscriber of this process.
//!
//! **One reader per tenant.** A tenant's [`View`] is loaded on first use
//! (one snapshot read), then a follower task reads the log after the view's
//! revision whenever the tenant's change signal fires (a local decision
//! write, or a peer's relayed over Redis) or every poll interval, applies
//! the entries, and keeps the last [`RING`] of them in memory. Subscribers
//! take their deltas from that ring; one that fell behind it (or resumes
//! from an older revision) reads the log from the store at its own pace, so
//! a slow subscriber holds up nobody.
//!
//! **Exact in time.** The index keeps each target's decisions in force, not
//! only its effective state, and CheckAccess resolves them at the moment of
//! the call: a decision that has just expired stops counting at once, before
//! the expiry task has logged it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{OnceCell, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::domain::TenantId;
use crate::domain::decision::{
    Cidr, Decision, DecisionKind, DecisionLogEntry, DecisionScope, DeltaKind, Effective,
    TargetState, deciding, mask_v4, mask_v6,
};
use crate::error::{AppError, AppResult};
use crate::ingest::signal::Signal;
use crate::storage::Store;

/// Log entries kept in memory per tenant for subscribers.
pub const RING: usize = 4096;
/// Log entries read from the store per round trip (and most per message).
pub const CHUNK: usize = 1000;
/// Messages buffered per subscriber between its task and the transport.
const BUFFER: usize = 16;

/// One target's decisions and its effective state as last logged.
#[derive(Debug, Clone)]
struct Slot {
    /// Decisions in force when last logged (resolved at check time).
    decisions: Vec<Decision>,
    /// The effective state as of the view's revision (snapshots send it).
    effective: Option<Effective>,
}

/// A tenant's decisions, indexed for lookups by IP, range and actor.
#[derive(Debug, Default)]
struct Index {
    /// The newest log revision applied.
    revision: u64,
    /// Exact IP targets.
    ips: HashMap<IpAddr, Slot>,
    /// IPv4 ranges by (prefix length, network bits).
    v4: HashMap<(u8, u32), Slot>,
    /// IPv6 ranges by (prefix length, network bits).
    v6: HashMap<(u8, u128), Slot>,
    /// How many IPv4 ranges have each prefix length (longest first when looking up).
    v4_prefixes: BTreeMap<u8, usize>,
    /// The same for IPv6.
    v6_prefixes: BTreeMap<u8, usize>,
    /// Actor targets.
    actors: HashMap<String, Slot>,
    /// The most recent log entries, consecutive revisions ending at `revision`.
    ring: VecDeque<Arc<DecisionLogEntry>>,
}

/// Where a target lives in the index.
enum Key {
    Ip(IpAddr),
    V4(u8, u32),
    V6(u8, u128),
    Actor(String),
}

fn key_of(scope: DecisionScope, value: &str) -> Option<Key> {
    Some(match scope {
        DecisionScope::Ip => Key::Ip(value.parse().ok()?),
        DecisionScope::Cidr => {
            let c = Cidr::parse(value, "value").ok()?;
            match c.network {
                IpAddr::V4(v4) => Key::V4(c.prefix, u32::from(v4)),
                IpAddr::V6(v6) => Key::V6(c.prefix, u128::from(v6)),
            }
        }
        DecisionScope::Actor => Key::Actor(value.to_owned()),
    })
}

impl Index {
    /// The index of `targets` at `revision` (a snapshot read).
    fn load(revision: u64, targets: Vec<TargetState>) -> Self {
        let mut ix = Self {
            revision,
            ..Self::default()
        };
        for t in targets {
            ix.put(&t.target.scope, &t.target.value, t.decisions, t.effective);
        }
        ix
    }

    /// Sets a target's slot (or removes it when it has nothing left).
    fn put(
        &mut self,
        scope: &DecisionScope,
        value: &str,
        decisions: Vec<Decision>,
        effective: Option<Effective>,
    ) {
        let Some(key) = key_of(*scope, value) else {
            tracing::warn!(
                scope = scope.as_str(),
                "skipping a stored decision target that does not parse"
            );
            return;
        };
        let slot = (!decisions.is_empty() || effective.is_some()).then_some(Slot {
            decisions,
            effective,
        });
        fn set<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Slot>,
            k: K,
            slot: Option<Slot>,
        ) -> i64 {
            match slot {
                Some(s) => {
                    if map.insert(k, s).is_none() {
                        1
                    } else {
                        0
                    }
                }
                None => -i64::from(map.remove(&k).is_some()),
            }
        }
        fn count(prefixes: &mut BTreeMap<u8, usize>, prefix: u8, change: i64) {
            let n = prefixes.entry(prefix).or_default();
            *n = (*n as i64 + change).max(0) as usize;
            if *n == 0 {
                prefixes.remove(&prefix);
            }
        }
        match key {
            Key::Ip(ip) => {
                set(&mut self.ips, ip, slot);
            }
            Key::V4(p, n) => {
                let change = set(&mut self.v4, (p, n), slot);
                count(&mut self.v4_prefixes, p, change);
            }
            Key::V6(p, n) => {
                let change = set(&mut self.v6, (p, n), slot);
                count(&mut self.v6_prefixes, p, change);
            }
            Key::Actor(a) => {
                set(&mut self.actors, a, slot);
            }
        }
    }

    /// Applies the next log entry.
    fn apply(&mut self, entry: DecisionLogEntry) {
        debug_assert_eq!(entry.revision, self.revision + 1);
        let effective = match entry.kind {
            DeltaKind::Removed | DeltaKind::Expired => None,
            _ => entry.effective.clone(),
        };
        self.put(
            &entry.target.scope,
            &entry.target.value,
            entry.decisions.clone(),
            effective,
        );
        self.revision = entry.revision;
        self.ring.push_back(Arc::new(entry));
        while self.ring.len() > RING {
            self.ring.pop_front();
        }
    }

    /// Entries after `after` (at most `limit`) if the ring still holds them
    /// all; `None` if `after` is older than the ring.
    fn after(&self, after: u64, limit: usize) -> Option<Vec<Arc<DecisionLogEntry>>> {
        if after >= self.revision {
            return Some(Vec::new());
        }
        let first = self.ring.front()?.revision;
        if after + 1 < first {
            return None;
        }
        let skip = (after + 1 - first) as usize;
        Some(self.ring.iter().skip(skip).take(limit).cloned().collect())
    }

    /// Every slot.
    fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.ips
            .values()
            .chain(self.v4.values())
            .chain(self.v6.values())
            .chain(self.actors.values())
    }

    /// The deciding decision on the IP dimension of `ip` at `now`.
    fn ip_dimension(&self, ip: IpAddr, now: DateTime<Utc>) -> Option<&Decision> {
        let exact = self.ips.get(&ip);
        let ranges: Box<dyn Iterator<Item = &Slot>> = match ip {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                Box::new(
                    self.v4_prefixes
                        .keys()
                        .rev()
                        .filter_map(move |p| self.v4.get(&(*p, mask_v4(bits, *p)))),
                )
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                Box::new(
                    self.v6_prefixes
                        .keys()
                        .rev()
                        .filter_map(move |p| self.v6.get(&(*p, mask_v6(bits, *p)))),
                )
            }
        };
        dimension(exact.into_iter().chain(ranges), now)
    }
}

/// The deciding decision among the targets of one dimension (an IP and the
/// ranges holding it, or an actor): an allow on any of them wins, then a ban
/// (the most specific target first), then the lowest throttle.
fn dimension<'a>(
    slots: impl Iterator<Item = &'a Slot>,
    now: DateTime<Utc>,
) -> Option<&'a Decision> {
    let mut ban: Option<&Decision> = None;
    let mut throttle: Option<&Decision> = None;
    for slot in slots {
        let Some(d) = deciding(&slot.decisions, now) else {
            continue;
        };
        match d.kind {
            DecisionKind::Allow => return Some(d),
            DecisionKind::Ban => {
                ban.get_or_insert(d);
            }
            DecisionKind::Throttle => {
                if throttle.is_none_or(|t| d.throttle_per_minute < t.throttle_per_minute) {
                    throttle = Some(d);
                }
            }
        }
    }
    ban.or(throttle)
}

/// What CheckAccess answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
    /// Let it through within a rate.
    Throttle,
}

/// A CheckAccess answer.
#[derive(Debug, Clone)]
pub struct Access {
    /// The verdict.
    pub verdict: Verdict,
    /// The effective decision that decided, if any.
    pub decision: Option<Effective>,
    /// The revision the answer reflects.
    pub revision: u64,
}

/// One tenant's index and its followers' shared state.
pub struct View {
    /// The tenant.
    tenant: TenantId,
    /// Where the log is read.
    store: Arc<dyn Store>,
    /// The index (read by checks and subscribers, written by syncs).
    index: RwLock<Index>,
    /// The newest revision applied; subscribers wait on it.
    revision: watch::Sender<u64>,
    /// One store read at a time.
    syncing: tokio::sync::Mutex<()>,
}

impl View {
    /// Loads `tenant`'s index from a snapshot.
    async fn load(store: Arc<dyn Store>, tenant: TenantId) -> AppResult<Self> {
        let (head, targets) = store.decision_snapshot(tenant).await?;
        Ok(Self {
            tenant,
            store,
            index: RwLock::new(Index::load(head.revision, targets)),
            revision: watch::Sender::new(head.revision),
            syncing: tokio::sync::Mutex::new(()),
        })
    }

    /// The newest revision applied.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Reads and applies what the log holds after this view's revision.
    pub async fn sync(&self) -> AppResult<()> {
        let _one = self.syncing.lock().await;
        loop {
            let from = self.index.read().expect("index lock").revision;
            let entries = self
                .store
                .decision_log_after(self.tenant, from, CHUNK as u32)
                .await?;
            let Some(first) = entries.first() else {
                return Ok(());
            };
            if first.revision != from + 1 {
                // Compacted past this view (it was idle a long time): reload.
                let (head, targets) = self.store.decision_snapshot(self.tenant).await?;
                *self.index.write().expect("index lock") = Index::load(head.revision, targets);
                self.revision.send_replace(head.revision);
                continue;
            }
            let full = entries.len() == CHUNK;
            let last = {
                let mut ix = self.index.write().expect("index lock");
                for e in entries {
                    ix.apply(e);
                }
                ix.revision
            };
            self.revision.send_replace(last);
            if !full {
                return Ok(());
            }
        }
    }

    /// Whether a request from `ip` by `actor` may proceed at `now` (see
    /// `EnforcementService.CheckAccess` for the rules).
    pub fn check(&self, ip: Option<IpAddr>, actor: Option<&str>, now: DateTime<Utc>) -> Access {
        let ix = self.index.read().expect("index lock");
        let by_ip = ip.and_then(|ip| ix.ip_dimension(ip, now));
        let by_actor = actor.and_then(|a| dimension(ix.actors.get(a).into_iter(), now));
        let both = [by_ip, by_actor];
        let of = |kind: DecisionKind| both.iter().flatten().find(|d| d.kind == kind).copied();
        let (verdict, decision) = if let Some(d) = of(DecisionKind::Ban) {
            (Verdict::Deny, Some(d))
        } else if let Some(d) = both
            .iter()
            .flatten()
            .filter(|d| d.kind == DecisionKind::Throttle)
            .min_by_key(|d| d.throttle_per_minute)
        {
            (Verdict::Throttle, Some(*d))
        } else {
            (Verdict::Allow, of(DecisionKind::Allow))
        };
        Access {
            verdict,
            decision: decision.map(Effective::of),
            revision: ix.revision,
        }
    }

    /// The effective decisions (of `scopes`, if given) at the view's revision.
    fn snapshot(&self, scopes: Option<&HashSet<DecisionScope>>) -> (u64, Vec<Effective>) {
        let ix = self.index.read().expect("index lock");
        let entries = ix
            .slots()
            .filter_map(|s| s.effective.clone())
            .filter(|e| scopes.is_none_or(|s| s.contains(&e.target.scope)))
            .collect();
        (ix.revision, entries)
    }

    /// How many decisions in force the view holds.
    pub fn decisions(&self) -> usize {
        let ix = self.index.read().expect("index lock");
        ix.slots().map(|s| s.decisions.len()).sum()
    }
}

/// Every loaded tenant's [`View`], and what they need to follow the store.
pub struct Enforcer {
    /// The store.
    store: Arc<dyn Store>,
    /// Per-tenant change signals (decision writes bump them, here or on a peer).
    signal: Arc<Signal>,
    /// Re-read interval without a signal.
    poll: Duration,
    /// Ends followers and subscribers.
    shutdown: CancellationToken,
    /// Loaded (or loading) views.
    views: Mutex<HashMap<TenantId, Arc<OnceCell<Arc<View>>>>>,
}

impl Enforcer {
    /// An enforcer with no tenant loaded yet.
    pub fn new(
        store: Arc<dyn Store>,
        signal: Arc<Signal>,
        poll: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            signal,
            poll,
            shutdown,
            views: Mutex::default(),
        }
    }

    /// `tenant`'s view, loading it (and starting its follower) on first use.
    pub async fn view(&self, tenant: TenantId) -> AppResult<Arc<View>> {
        let cell = self
            .views
            .lock()
            .expect("views lock")
            .entry(tenant)
            .or_default()
            .clone();
        let view = cell
            .get_or_try_init(|| async {
                let view = Arc::new(View::load(self.store.clone(), tenant).await?);
                metrics::gauge!("picket_enforcement_tenants_loaded").increment(1.0);
                tokio::spawn(follow(
                    view.clone(),
                    self.signal.subscribe(tenant),
                    self.poll,
                    self.shutdown.clone(),
                ));
                Ok::<_, AppError>(view)
            })
            .await?;
        Ok(view.clone())
    }

    /// Brings `tenant`'s view (if loaded) up to date with the store now: after
    /// a write through this process, its own CheckAccess calls see it at once.
    pub async fn caught_up(&self, tenant: TenantId) -> AppResult<()> {
        let cell = self.views.lock().expect("views lock").get(&tenant).cloned();
        if let Some(view) = cell.as_ref().and_then(|c| c.get()) {
            view.sync().await?;
        }
        Ok(())
    }

    /// Decisions in force across the loaded views (for the gauge).
    pub fn loaded_decisions(&self) -> usize {
        let views = self.views.lock().expect("views lock");
        views
            .values()
            .filter_map(|c| c.get())
            .map(|v| v.decisions())
            .sum()
    }

    /// Starts a WatchDecisions subscription (see the RPC's documentation):
    /// the items arrive on the returned channel; the subscription ends when
    /// the receiver is dropped or the server shuts down.
    pub async fn watch(
        &self,
        tenant: TenantId,
        request: WatchRequest,
    ) -> AppResult<mpsc::Receiver<AppResult<WatchItem>>> {
        let view = self.view(tenant).await?;
        // Reflect every write committed before the call, wherever it was made.
        view.sync().await?;
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(subscribe(view, request, tx, self.shutdown.clone()));
        Ok(rx)
    }
}

/// Keeps `view` current: on every signal, and every `poll` without one.
async fn follow(
    view: Arc<View>,
    mut wake: watch::Receiver<u64>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = wake.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(poll) => {}
            () = shutdown.cancelled() => break,
        }
        let started = std::time::Instant::now();
        if let Err(e) = view.sync().await {
            metrics::counter!("picket_watch_hub_read_errors_total", "stream" => "decisions")
                .increment(1);
            tracing::warn!(tenant = %view.tenant, error = %e, "decision index could not read the log; retrying");
        }
        metrics::histogram!("picket_watch_hub_read_duration_seconds", "stream" => "decisions")
            .record(started.elapsed().as_secs_f64());
    }
}

/// A WatchDecisions request, validated.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// The last revision the client applied; 0 for none.
    pub after: u64,
    /// Only these scopes; `None` for all.
    pub scopes: Option<HashSet<DecisionScope>>,
    /// Heartbeat interval.
    pub heartbeat: Duration,
}

/// Why a subscription began with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotReason {
    /// No revision was given.
    Initial,
    /// The revision is older than the kept log.
    Compacted,
    /// The revision is newer than the server's.
    Ahead,
}

/// One effective-state change as a subscriber receives it.
#[derive(Debug, Clone)]
pub struct Delta {
    /// What happened.
    pub kind: DeltaKind,
    /// Its revision.
    pub revision: u64,
    /// The new state (ADDED, UPDATED) or the one that ended (REMOVED, EXPIRED).
    pub effective: Effective,
}

/// One message of a subscription.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// Up to [`CHUNK`] effective decisions of the snapshot.
    Snapshot(Vec<Effective>),
    /// The end of the snapshot.
    SnapshotComplete {
        /// The revision the snapshot is at.
        revision: u64,
        /// Entries sent.
        count: u32,
        /// Why there was one.
        reason: SnapshotReason,
        /// The reason in words.
        message: String,
    },
    /// Up to [`CHUNK`] deltas, and the stream's revision after them.
    Deltas {
        /// The deltas, oldest first.
        deltas: Vec<Delta>,
        /// The stream's revision after them.
        revision: u64,
    },
    /// Nothing happened for a heartbeat interval.
    Heartbeat {
        /// The stream's revision.
        revision: u64,
    },
}

/// Sends `item`; `false` if the stream must end.
async fn send(
    tx: &mpsc::Sender<AppResult<WatchItem>>,
    shutdown: &CancellationToken,
    item: WatchItem,
) -> bool {
    let deltas = match &item {
        WatchItem::Snapshot(e) => e.len(),
        WatchItem::Deltas { deltas, .. } => deltas.len(),
        _ => 0,
    };
    let sent = tokio::select! {
        r = tx.send(Ok(item)) => r.is_ok(),
        () = shutdown.cancelled() => false,
    };
    if sent && deltas > 0 {
        metrics::counter!("picket_watch_items_sent_total", "stream" => "decisions")
            .increment(deltas as u64);
    }
    sent
}

/// Sends a snapshot of `view` for `reason`; returns its revision, or `None`
/// if the stream must end.
async fn send_snapshot(
    view: &View,
    scopes: Option<&HashSet<DecisionScope>>,
    reason: SnapshotReason,
    message: String,
    tx: &mpsc::Sender<AppResult<WatchItem>>,
    shutdown: &CancellationToken,
) -> Option<u64> {
    let (revision, entries) = view.snapshot(scopes);
    let count = entries.len() as u32;
    for chunk in entries.chunks(CHUNK) {
        if !send(tx, shutdown, WatchItem::Snapshot(chunk.to_vec())).await {
            return None;
        }
    }
    let complete = WatchItem::SnapshotComplete {
        revision,
        count,
        reason,
        message,
    };
    send(tx, shutdown, complete).await.then_some(revision)
}

/// One subscriber: an optional snapshot, then deltas from its position.
async fn subscribe(
    view: Arc<View>,
    request: WatchRequest,
    tx: mpsc::Sender<AppResult<WatchItem>>,
    shutdown: CancellationToken,
) {
    metrics::gauge!("picket_watch_streams_open", "stream" => "decisions").increment(1.0);
    let scopes = request.scopes.as_ref();
    let mut revisions = view.revision.subscribe();
    let newest = view.revision();
    let start = if request.after == 0 {
        let message = "no after_revision: the current effective decisions".to_owned();
        send_snapshot(
            &view,
            scopes,
            SnapshotReason::Initial,
            message,
            &tx,
            &shutdown,
        )
        .await
    } else if request.after > newest {
        let message = format!(
            "after_revision {} is ahead of this server's newest revision {newest} (a restored \
             store, or a revision from another server): replace your state with this snapshot",
            request.after
        );
        send_snapshot(
            &view,
            scopes,
            SnapshotReason::Ahead,
            message,
            &tx,
            &shutdown,
        )
        .await
    } else {
        Some(request.after)
    };
    let Some(mut position) = start else {
        metrics::gauge!("picket_watch_streams_open", "stream" => "decisions").decrement(1.0);
        return;
    };
    let mut last_sent = tokio::time::Instant::now();
    'stream: loop {
        // Anything applied from here on wakes the wait below.
        revisions.borrow_and_update();
        // What follows `position`: from the ring, else from the store.
        let cached = view
            .index
            .read()
            .expect("index lock")
            .after(position, CHUNK);
        let entries: Vec<Arc<DecisionLogEntry>> = match cached {
            Some(entries) => entries,
            None => match view
                .store
                .decision_log_after(view.tenant, position, CHUNK as u32)
                .await
            {
                Ok(entries) => {
                    let gap = match entries.first() {
                        Some(e) => (e.revision != position + 1).then(|| e.revision - 1),
                        None => (position < view.revision()).then(|| view.revision()),
                    };
                    if let Some(floor) = gap {
                        let message = format!(
                            "after_revision {position} is older than the decision log this \
                             server keeps (deltas after revision {floor}): replace your state \
                             with this snapshot"
                        );
                        match send_snapshot(
                            &view,
                            scopes,
                            SnapshotReason::Compacted,
                            message,
                            &tx,
                            &shutdown,
                        )
                        .await
                        {
                            Some(r) => {
                                position = r;
                                last_sent = tokio::time::Instant::now();
                                continue 'stream;
                            }
                            None => break 'stream,
                        }
                    }
                    entries.into_iter().map(Arc::new).collect()
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    break 'stream;
                }
            },
        };
        if let Some(last) = entries.last() {
            let next = last.revision;
            let deltas: Vec<Delta> = entries
                .iter()
                .filter(|e| e.kind != DeltaKind::Unchanged)
                .filter(|e| scopes.is_none_or(|s| s.contains(&e.target.scope)))
                .filter_map(|e| {
                    Some(Delta {
                        kind: e.kind,
                        revision: e.revision,
                        effective: e.effective.clone()?,
                    })
                })
                .collect();
            position = next;
            if !deltas.is_empty() {
                let item = WatchItem::Deltas {
                    deltas,
                    revision: position,
                };
                if !send(&tx, &shutdown, item).await {
                    break 'stream;
                }
                last_sent = tokio::time::Instant::now();
            }
            continue;
        }
        // Caught up: wait for the next revision, a heartbeat or the end.
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { break 'stream },
            () = tokio::time::sleep_until(last_sent + request.heartbeat) => {
                if !send(&tx, &shutdown, WatchItem::Heartbeat { revision: position }).await {
                    break 'stream;
                }
                last_sent = tokio::time::Instant::now();
            }
            () = shutdown.cancelled() => break 'stream,
            () = tx.closed() => break 'stream,
        }
    }
    metrics::gauge!("picket_watch_streams_open", "stream" => "decisions").decrement(1.0);
}
