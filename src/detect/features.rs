//! Per-entity behaviour windows for anomaly scoring (pure, no IO).
//!
//! Every event is counted into a tumbling window (default 5 minutes, in event
//! time) of its actor and of its source IP. A window closes once the newest
//! event time seen for the tenant is past its end plus an allowed lateness;
//! its counts become a fixed feature vector that the anomaly models score.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Duration, Timelike, Utc};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::alert::{Entity, EntityKind};
use crate::domain::event::{NewEvent, Outcome};

/// Names of the features, in vector order.
pub const FEATURE_NAMES: [&str; 10] = [
    "log_request_count",
    "failure_ratio",
    "log_distinct_resources",
    "log_distinct_source_ips",
    "http_4xx_ratio",
    "http_5xx_ratio",
    "log_bytes_out",
    "off_hours_fraction",
    "log_privileged_actions",
    "log_distinct_actors",
];

/// Most distinct values counted per set (bounds memory; counts saturate).
const MAX_DISTINCT: usize = 256;
/// Most evidence event ids kept per window.
const MAX_EVENTS: usize = 100;

/// Raw counts of one entity window.
#[derive(Debug, Clone, Default)]
struct Counts {
    events: u64,
    failures: u64,
    resources: HashSet<String>,
    source_ips: HashSet<String>,
    actors: HashSet<String>,
    http: u64,
    http_4xx: u64,
    http_5xx: u64,
    bytes_out: u64,
    off_hours: u64,
    privileged: u64,
    event_ids: Vec<Uuid>,
    /// At least one event was observed live (not replayed at a restart).
    live: bool,
}

fn insert_capped(set: &mut HashSet<String>, v: &str) {
    // Look before allocating: most events repeat a value the window holds.
    if !v.is_empty() && set.len() < MAX_DISTINCT && !set.contains(v) {
        set.insert(v.to_owned());
    }
}

/// Whether an event is a privileged action (role/permission/config/tenant
/// changes, or a change carrying a privilege).
pub fn is_privileged(e: &NewEvent) -> bool {
    let head = e.event_type.split(['.', '_']).next().unwrap_or("");
    matches!(
        head,
        "role" | "permission" | "privilege" | "config" | "configuration" | "tenant" | "firewall"
    ) || e
        .details
        .change
        .as_ref()
        .is_some_and(|c| !c.privilege.is_empty())
}

impl Counts {
    /// Counts `e`, whose source IP as text is `ip`.
    fn add(&mut self, e: &NewEvent, ip: Option<&str>, live: bool) {
        self.live |= live;
        self.events += 1;
        if e.outcome == Outcome::Failure {
            self.failures += 1;
        }
        insert_capped(&mut self.resources, &e.resource);
        if let Some(ip) = ip {
            insert_capped(&mut self.source_ips, ip);
        }
        insert_capped(&mut self.actors, &e.actor);
        if let Some(h) = &e.details.http {
            self.http += 1;
            match h.status_code {
                400..=499 => self.http_4xx += 1,
                500..=599 => self.http_5xx += 1,
                _ => {}
            }
            self.bytes_out += h.bytes_out;
        }
        if let Some(n) = &e.details.network {
            self.bytes_out += n.bytes_sent;
        }
        let hour = e.occurred_at.hour();
        if !(8..18).contains(&hour) {
            self.off_hours += 1;
        }
        if is_privileged(e) {
            self.privileged += 1;
        }
        if self.event_ids.len() < MAX_EVENTS {
            self.event_ids.push(e.id);
        }
    }

    fn features(&self) -> [f64; 10] {
        let n = self.events.max(1) as f64;
        let http = self.http.max(1) as f64;
        let ln = |v: f64| v.ln_1p();
        [
            ln(self.events as f64),
            self.failures as f64 / n,
            ln(self.resources.len() as f64),
            ln(self.source_ips.len() as f64),
            self.http_4xx as f64 / http,
            self.http_5xx as f64 / http,
            ln(self.bytes_out as f64),
            self.off_hours as f64 / n,
            ln(self.privileged as f64),
            ln(self.actors.len() as f64),
        ]
    }
}

/// A closed window, ready to score.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    /// Owner.
    pub tenant: TenantId,
    /// The actor or source IP it is about.
    pub entity: Entity,
    /// Window start (inclusive).
    pub start: DateTime<Utc>,
    /// Window end (exclusive).
    pub end: DateTime<Utc>,
    /// Feature vector, in [`FEATURE_NAMES`] order.
    pub features: [f64; 10],
    /// Events counted.
    pub events: u64,
    /// Ids of (up to 100 of) its events.
    pub event_ids: Vec<Uuid>,
    /// Every event in it was replayed at a restart (none arrived live since):
    /// it was scored before the restart, or its events were, so it rebuilds
    /// the baseline but must never raise again.
    pub replayed: bool,
}

/// One tenant's open windows, in two orders: by (start, entity) to close
/// them as event time passes, and by last update to evict the least recently
/// seen when the cap is reached.
///
/// Hand-written (a `BTreeMap` per order) rather than the `lru` crate: an LRU
/// cache gives only the recency order, and closing by event time needs the
/// start order too; both are O(log n) per event here.
#[derive(Debug, Default)]
struct TenantWindows {
    /// Open windows by (start, entity), with the stamp of their last update.
    by_start: BTreeMap<(DateTime<Utc>, Entity), (u64, Counts)>,
    /// The same windows by last-update stamp (oldest first).
    by_recency: BTreeMap<u64, (DateTime<Utc>, Entity)>,
    /// Next update stamp.
    next: u64,
}

impl TenantWindows {
    fn len(&self) -> usize {
        self.by_start.len()
    }

    /// The window of `key`, created if new, marked as the most recently seen.
    fn touch(&mut self, key: (DateTime<Utc>, Entity)) -> &mut Counts {
        let stamp = self.next;
        self.next += 1;
        let slot = match self.by_start.entry(key) {
            std::collections::btree_map::Entry::Occupied(o) => {
                let slot = o.into_mut();
                if let Some(k) = self.by_recency.remove(&slot.0) {
                    self.by_recency.insert(stamp, k);
                }
                slot
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                self.by_recency.insert(stamp, v.key().clone());
                v.insert((stamp, Counts::default()))
            }
        };
        slot.0 = stamp;
        &mut slot.1
    }

    /// Removes the window that starts first, if it starts at or before `cutoff`.
    fn pop_started_by(&mut self, cutoff: DateTime<Utc>) -> Option<(DateTime<Utc>, Entity, Counts)> {
        let ((s, _), _) = self.by_start.first_key_value()?;
        if *s > cutoff {
            return None;
        }
        let ((s, e), (stamp, c)) = self.by_start.pop_first()?;
        self.by_recency.remove(&stamp);
        Some((s, e, c))
    }

    /// Removes the least recently seen window.
    fn pop_least_recent(&mut self) -> Option<(DateTime<Utc>, Entity, Counts)> {
        let (_, key) = self.by_recency.pop_first()?;
        let (_, c) = self.by_start.remove(&key)?;
        Some((key.0, key.1, c))
    }
}

/// Aggregates events into per-entity tumbling windows.
///
/// Memory is bounded by `max_open` windows per tenant: when a new window
/// would exceed it, the least recently seen window (the one whose last event
/// is oldest in arrival order) closes early, is scored on the counts it has,
/// and is counted in `picket_detect_evicted_total{kind="window"}`. If its
/// entity comes back within the same window period it starts a fresh window.
#[derive(Debug)]
pub struct WindowAggregator {
    /// Window length.
    width: Duration,
    /// How long after a window's end late events are still counted.
    lateness: Duration,
    /// Most open windows per tenant (least recently seen closed early beyond it).
    max_open: usize,
    /// Open windows per tenant.
    open: HashMap<TenantId, TenantWindows>,
    /// Newest event time seen per tenant.
    watermark: HashMap<TenantId, DateTime<Utc>>,
    /// Newest server receive time seen per tenant (quietness, for clock closing).
    arrival: HashMap<TenantId, DateTime<Utc>>,
    /// Windows closed early because the cap was reached.
    evicted: u64,
}

impl WindowAggregator {
    /// Windows of `width`, accepting events up to `lateness` after a window ends.
    pub fn new(width: Duration, lateness: Duration, max_open: usize) -> Self {
        Self {
            width,
            lateness,
            max_open: max_open.max(1),
            open: HashMap::new(),
            watermark: HashMap::new(),
            arrival: HashMap::new(),
            evicted: 0,
        }
    }

    /// Windows closed early so far because a tenant reached the cap.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Drops a tenant's open windows unscored (another replica now
    /// evaluates the tenant and rebuilds them by replay).
    pub fn forget(&mut self, tenant: TenantId) {
        self.open.remove(&tenant);
        self.watermark.remove(&tenant);
        self.arrival.remove(&tenant);
    }

    /// Open windows of `tenant`.
    pub fn open_windows(&self, tenant: TenantId) -> usize {
        self.open.get(&tenant).map_or(0, TenantWindows::len)
    }

    /// The window start containing `t`.
    pub fn window_start(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let w = self.width.num_seconds().max(1);
        let s = t.timestamp().div_euclid(w) * w;
        DateTime::from_timestamp(s, 0).unwrap_or(t)
    }

    /// Counts an event; returns windows that closed because event time moved on.
    pub fn observe(&mut self, tenant: TenantId, e: &NewEvent) -> Vec<ClosedWindow> {
        self.observe_as(tenant, e, true)
    }

    /// Counts an event replayed at a restart (already seen live before it):
    /// windows holding only replayed events close with `replayed` set.
    pub fn replay(&mut self, tenant: TenantId, e: &NewEvent) -> Vec<ClosedWindow> {
        self.observe_as(tenant, e, false)
    }

    fn observe_as(&mut self, tenant: TenantId, e: &NewEvent, live: bool) -> Vec<ClosedWindow> {
        let start = self.window_start(e.occurred_at);
        let arrived = self.arrival.entry(tenant).or_insert(e.received_at);
        if e.received_at > *arrived {
            *arrived = e.received_at;
        }
        let wm = self.watermark.entry(tenant).or_insert(e.occurred_at);
        if e.occurred_at > *wm {
            *wm = e.occurred_at;
        }
        let watermark = *wm;
        // Too late for its window: it was already scored.
        if start + self.width + self.lateness <= watermark {
            return self.close_until(tenant, watermark);
        }
        let ip = e.source_ip.map(|ip| ip.to_string());
        let mut entities = Vec::with_capacity(2);
        if !e.actor.is_empty() {
            entities.push(Entity::new(EntityKind::Actor, e.actor.clone()));
        }
        if let Some(ip) = &ip {
            entities.push(Entity::new(EntityKind::Ip, ip.clone()));
        }
        let max_open = self.max_open;
        let open = self.open.entry(tenant).or_default();
        let mut evicted = Vec::new();
        for entity in entities {
            open.touch((start, entity)).add(e, ip.as_deref(), live);
            // Bound memory: the least recently seen window closes early (never
            // the one just touched, which is the most recent).
            while open.len() > max_open {
                let Some(w) = open.pop_least_recent() else {
                    break;
                };
                evicted.push(w);
            }
        }
        let mut closed = self.close_until(tenant, watermark);
        if !evicted.is_empty() {
            self.evicted += evicted.len() as u64;
            metrics::counter!("picket_detect_evicted_total", "kind" => "window")
                .increment(evicted.len() as u64);
        }
        for (s, entity, counts) in evicted {
            closed.push(self.closed(tenant, s, entity, &counts));
        }
        closed
    }

    /// Closes the tenant's windows that ended before `watermark - lateness`.
    pub fn close_until(&mut self, tenant: TenantId, watermark: DateTime<Utc>) -> Vec<ClosedWindow> {
        let cutoff = watermark - self.lateness - self.width;
        let Some(open) = self.open.get_mut(&tenant) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while let Some(w) = open.pop_started_by(cutoff) {
            out.push(w);
        }
        out.into_iter()
            .map(|(s, e, c)| self.closed(tenant, s, e, &c))
            .collect()
    }

    /// Closes every open window of every tenant (on demand analysis, shutdown).
    pub fn close_all(&mut self) -> Vec<ClosedWindow> {
        let all: Vec<_> = self.open.drain().collect();
        let mut out = Vec::new();
        for (tenant, windows) in all {
            for ((s, e), (_, c)) in windows.by_start {
                out.push(self.closed(tenant, s, e, &c));
            }
        }
        out
    }

    /// Closes the windows of tenants that have been quiet (nothing received
    /// for the lateness period) as of wall-clock `now`, so their last windows
    /// are scored too. Tenants still sending (including historical backfills)
    /// close windows by event time only.
    pub fn close_by_clock(&mut self, now: DateTime<Utc>) -> Vec<ClosedWindow> {
        let lateness = self.lateness;
        let tenants: Vec<TenantId> = self
            .open
            .keys()
            .copied()
            .filter(|t| self.arrival.get(t).is_none_or(|a| *a + lateness <= now))
            .collect();
        tenants
            .into_iter()
            .flat_map(|t| self.close_until(t, now))
            .collect()
    }

    fn closed(
        &self,
        tenant: TenantId,
        start: DateTime<Utc>,
        entity: Entity,
        c: &Counts,
    ) -> ClosedWindow {
        ClosedWindow {
            tenant,
            entity,
            start,
            end: start + self.width,
            features: c.features(),
            events: c.events,
            event_ids: c.event_ids.clone(),
            replayed: !c.live,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{EventDetails, HttpDetails};

    fn ev(at: i64, actor: &str, ok: bool, bytes: u64) -> NewEvent {
        NewEvent {
            id: Uuid::now_v7(),
            idempotency_digest: [0; 16],
            occurred_at: DateTime::from_timestamp(1_800_000_000 + at, 0).unwrap(),
            received_at: Utc::now(),
            event_type: "http_request".into(),
            ocsf_class_uid: 4002,
            ocsf_category_uid: 4,
            actor: actor.into(),
            action: "GET".into(),
            resource: format!("/r/{}", at % 7),
            outcome: if ok {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            severity: Default::default(),
            source_ip: Some("10.0.0.1".parse().unwrap()),
            destination_ip: None,
            source_system: String::new(),
            service: String::new(),
            environment: String::new(),
            details: EventDetails {
                http: Some(HttpDetails {
                    status_code: if ok { 200 } else { 403 },
                    bytes_out: bytes,
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }

    #[test]
    fn windows_close_after_lateness_and_count_features() {
        let t = TenantId::new();
        let mut agg = WindowAggregator::new(Duration::minutes(5), Duration::minutes(1), 10_000);
        // 1_800_000_000 is a multiple of 300: window [0, 300).
        assert!(agg.observe(t, &ev(10, "alice", true, 100)).is_empty());
        assert!(agg.observe(t, &ev(20, "alice", false, 300)).is_empty());
        // Still within lateness (300 + 60 > 340): nothing closes.
        assert!(agg.observe(t, &ev(340, "bob", true, 1)).is_empty());
        // Past end + lateness: alice's and the IP's windows close.
        let closed = agg.observe(t, &ev(361, "bob", true, 1));
        assert_eq!(closed.len(), 2);
        let alice = closed
            .iter()
            .find(|w| w.entity.kind == EntityKind::Actor)
            .unwrap();
        assert_eq!(alice.events, 2);
        assert!((alice.features[1] - 0.5).abs() < 1e-12, "failure ratio");
        assert!((alice.features[4] - 0.5).abs() < 1e-12, "4xx ratio");
        assert!(
            (alice.features[6] - 400f64.ln_1p()).abs() < 1e-12,
            "bytes out"
        );
        assert_eq!(alice.event_ids.len(), 2);
    }

    #[test]
    fn memory_is_bounded() {
        let t = TenantId::new();
        let mut agg = WindowAggregator::new(Duration::minutes(5), Duration::minutes(1), 10);
        let mut closed = 0;
        for i in 0..100 {
            closed += agg.observe(t, &ev(1, &format!("u{i}"), true, 1)).len();
        }
        assert!(agg.open_windows(t) <= 10);
        assert!(closed > 0);
    }

    /// An event of `actor` with no source IP (one window per event).
    fn only_actor(at: i64, actor: &str) -> NewEvent {
        NewEvent {
            source_ip: None,
            ..ev(at, actor, true, 1)
        }
    }

    #[test]
    fn the_least_recently_seen_window_is_evicted_and_counted() {
        let t = TenantId::new();
        let cap = 3;
        let mut agg = WindowAggregator::new(Duration::minutes(5), Duration::minutes(1), cap);
        for a in ["a", "b", "c"] {
            assert!(agg.observe(t, &only_actor(1, a)).is_empty());
        }
        // "a" is seen again: "b" is now the least recently seen.
        assert!(agg.observe(t, &only_actor(2, "a")).is_empty());
        let closed = agg.observe(t, &only_actor(3, "d"));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].entity, Entity::new(EntityKind::Actor, "b"));
        assert_eq!(agg.evicted(), 1);
        assert_eq!(agg.open_windows(t), cap);
        // A storm of new entities never exceeds the cap; every eviction counts.
        let mut evicted = 1;
        for i in 0..1000 {
            evicted += agg.observe(t, &ev(4, &format!("u{i}"), true, 1)).len() as u64;
            assert!(agg.open_windows(t) <= cap);
        }
        assert_eq!(agg.evicted(), evicted);
    }

    #[test]
    fn an_evicted_entity_that_comes_back_starts_fresh() {
        let t = TenantId::new();
        let mut agg = WindowAggregator::new(Duration::minutes(5), Duration::minutes(1), 2);
        for s in 0..5 {
            assert!(agg.observe(t, &only_actor(s, "alice")).is_empty());
        }
        agg.observe(t, &only_actor(10, "bob"));
        let closed = agg.observe(t, &only_actor(11, "carol"));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].entity.value, "alice");
        assert_eq!(closed[0].events, 5);
        // Alice returns in the same window period: a new window, counting
        // only what came after the eviction.
        agg.observe(t, &only_actor(12, "alice"));
        let rest = agg.close_all();
        let alice = rest.iter().find(|w| w.entity.value == "alice").unwrap();
        assert_eq!(alice.events, 1);
    }
}
