//! A local copy of the tenant's effective decisions, kept in sync through
//! `EnforcementService.WatchDecisions`, answering "may this request
//! proceed?" in-process with no network call.
//!
//! The watcher task applies the snapshot, then deltas, keeping the revision
//! after each applied message; on reconnect (jittered backoff, 0.2 s to 5 s)
//! it resumes after that revision, and replaces the whole copy when the
//! server answers with a new snapshot (compacted or ahead). Entries carry
//! their expiry and are ignored once it has passed, with or without a
//! connection.
//!
//! Semantics follow `CheckAccess`: on each dimension (the IP with every range
//! containing it; the actor) an allow wins over a ban, and a ban on either
//! dimension denies. Throttles are not enforced here.
//!
//! When the copy is not in sync (no snapshot yet, or nothing heard for three
//! heartbeat intervals) the [`FailureMode`] decides.
//!
//! Ranges live in `prefix_trie::PrefixMap`s (one per address family):
//! `cover` yields every stored range containing an address in one walk down
//! the trie, which is exactly what "an allow on any containing range wins"
//! needs (a longest-prefix match alone would miss a /16 allow above a /24
//! ban). Exact addresses and actors are hash maps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::pb;
use crate::pb::enforcement_service_client::EnforcementServiceClient;
use crate::pb::watch_decisions_response::Item;
use crate::transport::ApiKey;

/// What to answer while the copy is not in sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Allow every request.
    FailOpen,
    /// Deny every request (reason `unavailable`).
    FailClosed,
    /// Answer from the last copy, expiring entries on time.
    #[default]
    LastKnown,
}

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// A ban on the address.
    Ip,
    /// A ban on a range containing the address.
    Cidr,
    /// A ban on the actor.
    Actor,
    /// Out of sync with `FailureMode::FailClosed`.
    Unavailable,
}

impl DenyReason {
    /// The name recorded as the event's `enforced` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::Cidr => "cidr",
            Self::Actor => "actor",
            Self::Unavailable => "unavailable",
        }
    }
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether it may proceed.
    pub allowed: bool,
    /// Why not, when denied.
    pub reason: Option<DenyReason>,
    /// The deciding ban's decision id, when one decided.
    pub decision_id: Option<Arc<str>>,
}

impl Verdict {
    const ALLOW: Self = Self {
        allowed: true,
        reason: None,
        decision_id: None,
    };

    fn deny(reason: DenyReason, decision_id: Option<Arc<str>>) -> Self {
        Self {
            allowed: false,
            reason: Some(reason),
            decision_id,
        }
    }
}

/// One target's effective state, as much of it as enforcement needs.
#[derive(Debug, Clone)]
struct Entry {
    /// `pb::DecisionType` as its number.
    kind: i32,
    /// Unix milliseconds at which it ends.
    expires_at_ms: i64,
    /// The deciding decision (shared, so a verdict clones a pointer).
    decision_id: Arc<str>,
}

impl Entry {
    fn live(&self, now_ms: i64) -> bool {
        self.expires_at_ms > now_ms
    }
}

const BAN: i32 = pb::DecisionType::Ban as i32;
const ALLOW: i32 = pb::DecisionType::Allow as i32;

/// The effective decisions by target, with the CheckAccess lookups.
#[derive(Default)]
pub struct DecisionTable {
    ips: HashMap<IpAddr, Entry>,
    actors: HashMap<Box<str>, Entry>,
    v4: PrefixMap<Ipv4Net, Entry>,
    v6: PrefixMap<Ipv6Net, Entry>,
}

impl std::fmt::Debug for DecisionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionTable")
            .field("ips", &self.ips.len())
            .field("ranges", &self.ranges())
            .field("actors", &self.actors.len())
            .finish()
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

impl DecisionTable {
    /// Sets a target's effective state (ADDED, UPDATED, snapshot entries).
    pub fn put(&mut self, d: &pb::EffectiveDecision) {
        let expires_at_ms = d
            .expires_at
            .map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos) / 1_000_000)
            .unwrap_or(i64::MAX);
        let entry = Entry {
            kind: d.r#type,
            expires_at_ms,
            decision_id: Arc::from(d.decision_id.as_str()),
        };
        self.apply(d.scope, &d.value, Some(entry));
    }

    /// Drops a target's state (REMOVED, EXPIRED).
    pub fn remove(&mut self, d: &pb::EffectiveDecision) {
        self.apply(d.scope, &d.value, None);
    }

    fn apply(&mut self, scope: i32, value: &str, entry: Option<Entry>) {
        match pb::DecisionScope::try_from(scope) {
            Ok(pb::DecisionScope::Ip) => {
                if let Ok(ip) = value.parse::<IpAddr>() {
                    let ip = ip.to_canonical();
                    match entry {
                        Some(e) => self.ips.insert(ip, e),
                        None => self.ips.remove(&ip),
                    };
                }
            }
            Ok(pb::DecisionScope::Actor) => {
                match entry {
                    Some(e) => self.actors.insert(value.into(), e),
                    None => self.actors.remove(value),
                };
            }
            Ok(pb::DecisionScope::Cidr) => {
                let Ok(net) = value.parse::<IpNet>() else {
                    return;
                };
                match (net.trunc(), entry) {
                    (IpNet::V4(n), Some(e)) => self.v4.insert(n, e),
                    (IpNet::V6(n), Some(e)) => self.v6.insert(n, e),
                    (IpNet::V4(n), None) => self.v4.remove(&n),
                    (IpNet::V6(n), None) => self.v6.remove(&n),
                };
            }
            _ => {}
        }
    }

    /// The ban that denies `ip`, if any: on the address or on a range
    /// containing it, unless an allow on the address or on a containing
    /// range cancels IP bans.
    pub fn check_ip(&self, ip: IpAddr) -> Option<(DenyReason, Arc<str>)> {
        self.check_ip_at(ip, now_ms())
    }

    fn check_ip_at(&self, ip: IpAddr, now: i64) -> Option<(DenyReason, Arc<str>)> {
        let ip = ip.to_canonical();
        let mut ban: Option<(DenyReason, &Entry)> = None;
        if let Some(e) = self.ips.get(&ip).filter(|e| e.live(now)) {
            match e.kind {
                ALLOW => return None,
                BAN => ban = Some((DenyReason::Ip, e)),
                _ => {}
            }
        }
        if self.ranges() > 0 {
            // Every stored range containing the address, shortest prefix
            // first, in one descent of the trie.
            let allowed = match ip {
                IpAddr::V4(v4) => scan_ranges(
                    self.v4.cover(&Ipv4Net::from(v4)).map(|(_, e)| e),
                    now,
                    &mut ban,
                ),
                IpAddr::V6(v6) => scan_ranges(
                    self.v6.cover(&Ipv6Net::from(v6)).map(|(_, e)| e),
                    now,
                    &mut ban,
                ),
            };
            if allowed {
                return None;
            }
        }
        ban.map(|(why, e)| (why, e.decision_id.clone()))
    }

    /// The ban that denies `actor`, if any (an allow on the actor cancels it).
    pub fn check_actor(&self, actor: &str) -> Option<Arc<str>> {
        self.check_actor_at(actor, now_ms())
    }

    fn check_actor_at(&self, actor: &str, now: i64) -> Option<Arc<str>> {
        self.actors
            .get(actor)
            .filter(|e| e.live(now) && e.kind == BAN)
            .map(|e| e.decision_id.clone())
    }

    /// Drops entries whose expiry has passed (lookups already ignore them;
    /// this returns their memory).
    pub fn purge_expired(&mut self) {
        let now = now_ms();
        self.ips.retain(|_, e| e.live(now));
        self.actors.retain(|_, e| e.live(now));
        self.v4.retain(|_, e| e.live(now));
        self.v6.retain(|_, e| e.live(now));
    }

    /// Ranges held.
    pub fn ranges(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Targets held (addresses, ranges, actors).
    pub fn len(&self) -> usize {
        self.ips.len() + self.ranges() + self.actors.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Looks at the live `ranges` containing an address: true when one is an
/// allow (it cancels IP bans); else the first ban, if `ban` holds none yet.
fn scan_ranges<'a>(
    ranges: impl Iterator<Item = &'a Entry>,
    now: i64,
    ban: &mut Option<(DenyReason, &'a Entry)>,
) -> bool {
    for e in ranges.filter(|e| e.live(now)) {
        match e.kind {
            ALLOW => return true,
            BAN if ban.is_none() => *ban = Some((DenyReason::Cidr, e)),
            _ => {}
        }
    }
    false
}

/// The copy and what the watcher knows about it.
struct Shared {
    table: RwLock<DecisionTable>,
    /// The revision after the last applied message (resume point).
    revision: AtomicU64,
    /// A snapshot was applied at least once.
    synced: AtomicBool,
    /// Unix ms of the last message from the server.
    last_heard_ms: AtomicI64,
    /// How long silence may last before the copy counts as out of sync
    /// (three heartbeat intervals); `None` for a detached copy.
    stale_after: Option<Duration>,
    /// Tells waiters the first snapshot arrived.
    synced_tx: watch::Sender<bool>,
    /// Stops the watcher.
    stop: watch::Sender<bool>,
}

/// The tenant's effective decisions, followed live. Cheap to clone: clones
/// share one copy and one watcher.
#[derive(Clone)]
pub struct DecisionCache {
    shared: Arc<Shared>,
    failure_mode: FailureMode,
}

impl std::fmt::Debug for DecisionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionCache")
            .field("failure_mode", &self.failure_mode)
            .field("revision", &self.revision())
            .field("in_sync", &self.in_sync())
            .finish()
    }
}

/// Heartbeat interval asked of the server.
const HEARTBEAT: Duration = Duration::from_secs(5);

impl DecisionCache {
    fn with_shared(stale_after: Option<Duration>) -> Arc<Shared> {
        Arc::new(Shared {
            table: RwLock::new(DecisionTable::default()),
            revision: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            last_heard_ms: AtomicI64::new(0),
            stale_after,
            synced_tx: watch::Sender::new(false),
            stop: watch::Sender::new(false),
        })
    }

    /// A cache that follows `WatchDecisions` over `channel` with `key`
    /// (which needs the `read` scope); its watcher runs on the current Tokio
    /// runtime until [`Self::close`]. Panics outside a runtime (the
    /// [`crate::TelemetryClient`] that calls it checked for one).
    pub fn watch(channel: Channel, key: ApiKey) -> Self {
        let shared = Self::with_shared(Some(3 * HEARTBEAT));
        tokio::spawn(run_watcher(shared.clone(), channel, key));
        Self {
            shared,
            failure_mode: FailureMode::default(),
        }
    }

    /// A cache fed by hand ([`Self::apply_snapshot`]), with no watcher: for
    /// tests and benchmarks. It is in sync once a snapshot was applied.
    pub fn detached() -> Self {
        Self {
            shared: Self::with_shared(None),
            failure_mode: FailureMode::default(),
        }
    }

    /// The same copy, answering with `mode` while out of sync.
    pub fn with_failure_mode(&self, mode: FailureMode) -> Self {
        Self {
            shared: self.shared.clone(),
            failure_mode: mode,
        }
    }

    /// Replaces the copy with `decisions` at `revision`.
    pub fn apply_snapshot(
        &self,
        decisions: impl IntoIterator<Item = pb::EffectiveDecision>,
        revision: u64,
    ) {
        let mut table = DecisionTable::default();
        for d in decisions {
            table.put(&d);
        }
        *write(&self.shared.table) = table;
        self.shared.revision.store(revision, Ordering::Release);
        mark_heard(&self.shared, true);
    }

    /// Whether the copy is current: a snapshot was applied and the server
    /// was heard from within three heartbeat intervals.
    pub fn in_sync(&self) -> bool {
        let s = &self.shared;
        if !s.synced.load(Ordering::Acquire) {
            return false;
        }
        match s.stale_after {
            None => true,
            Some(stale) => {
                now_ms() - s.last_heard_ms.load(Ordering::Acquire) < stale.as_millis() as i64
            }
        }
    }

    /// Waits until the first snapshot is applied; whether it was within `timeout`.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.synced_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The revision of the copy (the resume point).
    pub fn revision(&self) -> u64 {
        self.shared.revision.load(Ordering::Acquire)
    }

    /// Targets held.
    pub fn len(&self) -> usize {
        read(&self.shared.table).len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a request from `ip` by `actor` may proceed.
    pub fn check_request(&self, ip: Option<IpAddr>, actor: Option<&str>) -> Verdict {
        if self.failure_mode != FailureMode::LastKnown && !self.in_sync() {
            return match self.failure_mode {
                FailureMode::FailClosed => Verdict::deny(DenyReason::Unavailable, None),
                _ => Verdict::ALLOW,
            };
        }
        let now = now_ms();
        let table = read(&self.shared.table);
        if let Some((why, id)) = ip.and_then(|ip| table.check_ip_at(ip, now)) {
            return Verdict::deny(why, Some(id));
        }
        if let Some(id) = actor
            .filter(|a| !a.is_empty())
            .and_then(|a| table.check_actor_at(a, now))
        {
            return Verdict::deny(DenyReason::Actor, Some(id));
        }
        Verdict::ALLOW
    }

    /// Whether requests from `ip` may proceed.
    pub fn check(&self, ip: IpAddr) -> Verdict {
        self.check_request(Some(ip), None)
    }

    /// Whether requests by `actor` may proceed.
    pub fn check_actor(&self, actor: &str) -> Verdict {
        self.check_request(None, Some(actor))
    }

    /// Stops the watcher (the copy stays readable, expiring on time).
    pub fn close(&self) {
        self.shared.stop.send_replace(true);
    }
}

fn read(lock: &RwLock<DecisionTable>) -> RwLockReadGuard<'_, DecisionTable> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write(lock: &RwLock<DecisionTable>) -> RwLockWriteGuard<'_, DecisionTable> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn mark_heard(s: &Shared, synced: bool) {
    s.last_heard_ms.store(now_ms(), Ordering::Release);
    if synced && !s.synced.swap(true, Ordering::AcqRel) {
        s.synced_tx.send_replace(true);
    }
}

/// Follows the stream, reconnecting with jittered backoff until stopped.
async fn run_watcher(shared: Arc<Shared>, channel: Channel, key: ApiKey) {
    let mut stop = shared.stop.subscribe();
    let mut client = EnforcementServiceClient::new(channel);
    let mut backoff = Duration::from_millis(200);
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let outcome = tokio::select! {
            r = follow(&shared, &mut client, &key) => r,
            _ = stop.changed() => return,
        };
        let wait = match outcome {
            // A clean end (the server shut down): reconnect soon.
            Ok(()) => {
                backoff = Duration::from_millis(200);
                Duration::from_millis(100)
            }
            Err(status) => {
                tracing::info!(
                    code = ?status.code(),
                    message = status.message(),
                    "picket: decision stream ended; reconnecting"
                );
                let wait = backoff.mul_f64(rand::random_range(0.5..=1.0));
                backoff = (backoff * 2).min(Duration::from_secs(5));
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One stream: from the stored revision until it ends or fails.
async fn follow(
    shared: &Shared,
    client: &mut EnforcementServiceClient<Channel>,
    key: &ApiKey,
) -> Result<(), tonic::Status> {
    let request = pb::WatchDecisionsRequest {
        after_revision: shared.revision.load(Ordering::Acquire),
        scopes: Vec::new(),
        heartbeat_interval_seconds: HEARTBEAT.as_secs() as u32,
    };
    let mut stream = client
        .watch_decisions(key.request(request))
        .await?
        .into_inner();
    let mut snapshot: Option<DecisionTable> = None;
    let mut last_purge = std::time::Instant::now();
    loop {
        let message = tokio::time::timeout(3 * HEARTBEAT, stream.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no heartbeat from the server"))??;
        let Some(message) = message else {
            return Ok(());
        };
        match message.item {
            Some(Item::Snapshot(chunk)) => {
                let table = snapshot.get_or_insert_with(DecisionTable::default);
                for d in &chunk.decisions {
                    table.put(d);
                }
                mark_heard(shared, false);
            }
            Some(Item::SnapshotComplete(done)) => {
                let table = snapshot.take().unwrap_or_default();
                // One swap: readers see the old copy or the new one.
                *write(&shared.table) = table;
                shared.revision.store(done.revision, Ordering::Release);
                mark_heard(shared, true);
            }
            Some(Item::Deltas(chunk)) => {
                {
                    let mut table = write(&shared.table);
                    for delta in &chunk.deltas {
                        let Some(d) = &delta.decision else { continue };
                        match pb::DeltaKind::try_from(delta.kind) {
                            Ok(pb::DeltaKind::Added | pb::DeltaKind::Updated) => table.put(d),
                            Ok(pb::DeltaKind::Removed | pb::DeltaKind::Expired) => table.remove(d),
                            _ => {}
                        }
                    }
                }
                shared.revision.store(chunk.revision, Ordering::Release);
                mark_heard(shared, true);
            }
            Some(Item::Heartbeat(beat)) => {
                if snapshot.is_none() {
                    shared.revision.fetch_max(beat.revision, Ordering::AcqRel);
                    mark_heard(shared, true);
                } else {
                    mark_heard(shared, false);
                }
                if last_purge.elapsed() > Duration::from_secs(60) {
                    write(&shared.table).purge_expired();
                    last_purge = std::time::Instant::now();
                }
            }
            None => mark_heard(shared, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(
        scope: pb::DecisionScope,
        value: &str,
        ty: pb::DecisionType,
        expires_ms: i64,
    ) -> pb::EffectiveDecision {
        pb::EffectiveDecision {
            scope: scope as i32,
            value: value.into(),
            r#type: ty as i32,
            expires_at: Some(prost_types::Timestamp {
                seconds: expires_ms.div_euclid(1000),
                nanos: (expires_ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
            decision_id: format!("d-{value}"),
            ..Default::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_beats_ban_per_dimension_and_ranges_match() {
        use pb::DecisionScope::{Actor, Cidr, Ip};
        use pb::DecisionType::{Allow, Ban};
        let later = now_ms() + 60_000;
        let cache = DecisionCache::detached();
        cache.apply_snapshot(
            [
                decision(Ip, "203.0.113.7", Ban, later),
                decision(Cidr, "198.51.100.0/24", Ban, later),
                decision(Cidr, "198.51.0.0/16", Allow, later),
                decision(Cidr, "192.0.2.0/24", Ban, later),
                decision(Ip, "192.0.2.9", Allow, later),
                decision(Cidr, "2001:db8::/48", Ban, later),
                decision(Actor, "mallory", Ban, later),
            ],
            7,
        );
        let v = cache.check(ip("203.0.113.7"));
        assert_eq!((v.allowed, v.reason), (false, Some(DenyReason::Ip)));
        assert_eq!(v.decision_id.as_deref(), Some("d-203.0.113.7"));
        // A /16 allow above the /24 ban wins.
        assert!(cache.check(ip("198.51.100.4")).allowed);
        let v = cache.check(ip("192.0.2.10"));
        assert_eq!(v.reason, Some(DenyReason::Cidr));
        assert!(cache.check(ip("192.0.2.9")).allowed);
        assert_eq!(
            cache.check(ip("2001:db8::5")).reason,
            Some(DenyReason::Cidr)
        );
        // IPv4-mapped IPv6 is the IPv4 address.
        assert_eq!(
            cache.check(ip("::ffff:203.0.113.7")).reason,
            Some(DenyReason::Ip)
        );
        assert!(cache.check(ip("10.0.0.1")).allowed);
        assert_eq!(cache.check_actor("mallory").reason, Some(DenyReason::Actor));
        assert!(cache.check_actor("alice").allowed);
        assert_eq!(cache.revision(), 7);
        assert_eq!(cache.len(), 7);
    }

    #[test]
    fn entries_expire_locally_and_deltas_remove() {
        use pb::DecisionScope::{Cidr, Ip};
        use pb::DecisionType::Ban;
        let mut table = DecisionTable::default();
        table.put(&decision(Ip, "203.0.113.7", Ban, now_ms() - 1));
        table.put(&decision(Cidr, "198.51.100.0/24", Ban, now_ms() + 60_000));
        assert!(table.check_ip(ip("203.0.113.7")).is_none(), "expired");
        assert!(table.check_ip(ip("198.51.100.1")).is_some());
        table.remove(&decision(Cidr, "198.51.100.0/24", Ban, 0));
        assert!(table.check_ip(ip("198.51.100.1")).is_none());
        assert_eq!(table.len(), 1);
        table.purge_expired();
        assert!(table.is_empty());
    }

    #[test]
    fn failure_modes_apply_out_of_sync() {
        let cache = DecisionCache::detached();
        let any = ip("203.0.113.7");
        assert!(
            cache
                .with_failure_mode(FailureMode::FailOpen)
                .check(any)
                .allowed
        );
        assert_eq!(
            cache
                .with_failure_mode(FailureMode::FailClosed)
                .check(any)
                .reason,
            Some(DenyReason::Unavailable)
        );
        assert!(
            cache
                .with_failure_mode(FailureMode::LastKnown)
                .check(any)
                .allowed
        );
        cache.apply_snapshot([], 1);
        assert!(
            cache
                .with_failure_mode(FailureMode::FailClosed)
                .check(any)
                .allowed
        );
    }
}
