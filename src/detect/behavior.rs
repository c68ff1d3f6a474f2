//! Behavioural detectors for what Sigma cannot express: per-actor baselines.
//! Pure and in event time (`occurred_at`); every map is bounded (actors per
//! detector, networks per actor, buckets per actor) and evicts the least
//! recently seen entries. State is rebuilt after a restart by replaying the
//! last [`BehaviorConfig::lookback`] of events.
//!
//! - **New VPN network**: a successful VPN connection from a network (/24 for
//!   IPv4, /48 for IPv6) the actor has not connected from in 30 days. It only
//!   fires once the actor has at least `vpn_min_prior_connections` earlier
//!   connections and at least one network still in its 30-day history, so a
//!   brand-new actor (or one returning after 30 days) builds a baseline
//!   silently instead of alerting on its first connection.
//! - **Data exfiltration volume**: bytes out (`Http.BytesOut` +
//!   `Network.BytesSent`) by one actor in a sliding 1-hour window (minute
//!   buckets) above `max(10 × median hourly volume, 50 MB)`. The median is over
//!   the actor's active hours (non-zero hourly totals) older than the window,
//!   at most `exfil_baseline_hours` of them within 30 days; with fewer than
//!   `exfil_min_baseline_hours` the cold-start threshold (500 MB) applies.
//!   Fires at most once per actor per window.
//! - **Unusual hour**: after `unusual_hour_min_events` accesses by an actor
//!   (non-failed authentication, VPN, HTTP, API and database events), an
//!   access in a UTC hour-of-day holding under 1 % of the actor's accesses.
//!   Counts are halved when an actor's total passes 10,000 so old habits fade.
//!   Fires at most once per actor per hour.

use std::collections::{HashMap, HashSet, VecDeque};

use chrono::{DateTime, TimeZone, Timelike, Utc};
use uuid::Uuid;

use crate::detect::{Detection, DetectionKind, Entity, EntityKind, fingerprint};
use crate::domain::Severity;
use crate::domain::event::{NewEvent, Outcome};
pub use crate::domain::report::network_of;

/// Id of the new-VPN-network detector.
pub const VPN_NEW_NETWORK_ID: &str = "32f01260-afd0-41f6-aedc-71d10f6bcc1a";
/// Id of the data-exfiltration-volume detector.
pub const EXFILTRATION_ID: &str = "027f9081-6ea6-4cd2-a737-70bd3771fd76";
/// Seconds in a day.
const DAY_SECS: i64 = 86_400;
/// An actor active in at least this many distinct hours of the day works
/// round the clock: no hour is unusual for it.
const ROUND_THE_CLOCK_HOURS: usize = 20;

/// Id of the unusual-hour detector.
pub const UNUSUAL_HOUR_ID: &str = "290ebb4f-8c96-4b9e-9805-1e2630dc87b3";

/// Description of a behavioural detector, for listing next to Sigma rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BehaviorInfo {
    /// Fixed id (a UUID), usable in a tenant's disabled ids.
    pub id: &'static str,
    /// Title.
    pub title: &'static str,
    /// Severity of its detections.
    pub severity: Severity,
    /// Threat category.
    pub category: &'static str,
    /// ATT&CK technique ids.
    pub attack_techniques: &'static [&'static str],
}

/// The behavioural detectors.
pub const DETECTORS: &[BehaviorInfo] = &[
    BehaviorInfo {
        id: VPN_NEW_NETWORK_ID,
        title: "VPN connection from a new network",
        severity: Severity::Medium,
        category: "initial_access",
        attack_techniques: &["T1133", "T1078"],
    },
    BehaviorInfo {
        id: EXFILTRATION_ID,
        title: "Data exfiltration volume",
        severity: Severity::High,
        category: "exfiltration",
        attack_techniques: &["T1048", "T1567"],
    },
    BehaviorInfo {
        id: UNUSUAL_HOUR_ID,
        title: "Access at an unusual hour",
        severity: Severity::Low,
        category: "initial_access",
        attack_techniques: &["T1078"],
    },
];

const MB: u64 = 1_000_000;
/// Most evidence ids kept per actor by the exfiltration detector.
const EXFIL_EVIDENCE: usize = 20;
/// An actor's hour counts are halved when its total passes this.
const HOUR_DECAY_TOTAL: u64 = 10_000;

/// Thresholds and bounds of the behavioural detectors.
#[derive(Debug, Clone, PartialEq)]
pub struct BehaviorConfig {
    /// Most actors each detector tracks per tenant; the least recently seen
    /// tenth is evicted when full.
    pub max_actors: usize,
    /// How long a network stays known for an actor.
    pub vpn_history: chrono::Duration,
    /// Earlier connections an actor needs before a new network alerts.
    pub vpn_min_prior_connections: u32,
    /// Most networks remembered per actor (least recently seen evicted).
    pub vpn_max_networks_per_actor: usize,
    /// Length of the exfiltration window (minute resolution).
    pub exfil_window: chrono::Duration,
    /// Multiple of the median hourly volume that alerts.
    pub exfil_multiplier: f64,
    /// Least volume that alerts, in bytes.
    pub exfil_floor_bytes: u64,
    /// Volume that alerts while the baseline is too short, in bytes.
    pub exfil_cold_start_bytes: u64,
    /// Active hours needed before the baseline is used.
    pub exfil_min_baseline_hours: usize,
    /// Most active hours kept for the baseline.
    pub exfil_baseline_hours: usize,
    /// Accesses an actor needs before unusual hours alert.
    pub unusual_hour_min_events: u64,
    /// An hour-of-day under this fraction of the actor's accesses is unusual.
    pub unusual_hour_rare_fraction: f64,
    /// Days of history an actor needs (first to latest access) before
    /// unusual hours alert: 50 events can come from a single day.
    pub unusual_hour_min_history_days: i64,
}

impl Default for BehaviorConfig {
    fn default() -> Self {
        Self {
            max_actors: 10_000,
            vpn_history: chrono::Duration::days(30),
            vpn_min_prior_connections: 5,
            vpn_max_networks_per_actor: 64,
            exfil_window: chrono::Duration::hours(1),
            exfil_multiplier: 10.0,
            exfil_floor_bytes: 50 * MB,
            exfil_cold_start_bytes: 500 * MB,
            exfil_min_baseline_hours: 24,
            exfil_baseline_hours: 168,
            unusual_hour_min_events: 50,
            unusual_hour_rare_fraction: 0.01,
            unusual_hour_min_history_days: 7,
        }
    }
}

impl BehaviorConfig {
    /// How much history the detectors use: replaying this much rebuilds them.
    pub fn lookback(&self) -> chrono::Duration {
        self.vpn_history.max(chrono::Duration::days(30))
    }
}

/// A map of per-actor state with a size cap; when full, the least recently
/// seen tenth (by event time) is evicted and counted in
/// `picket_detect_evicted_total{kind="baseline"}`. An evicted actor that
/// comes back starts a fresh baseline.
///
/// Hand-written rather than an LRU crate: evicting a tenth at once by event
/// time (one `select_nth_unstable` per `cap / 10` new actors) is amortised
/// O(1) per event, and recency here is the event's time, not call order
/// (a replay or a late event must not make an old actor look fresh).
#[derive(Debug)]
struct Bounded<V> {
    map: HashMap<String, (i64, V)>,
    cap: usize,
    evicted: u64,
}

impl<V> Bounded<V> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap: cap.max(1),
            evicted: 0,
        }
    }

    fn entry(&mut self, key: &str, t: i64, init: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(key) && self.map.len() >= self.cap {
            let mut by_age: Vec<(i64, String)> =
                self.map.iter().map(|(k, (s, _))| (*s, k.clone())).collect();
            let n = (self.cap / 10).max(1);
            by_age.select_nth_unstable(n - 1);
            for (_, k) in by_age.into_iter().take(n) {
                self.map.remove(&k);
                self.evicted += 1;
            }
            metrics::counter!("picket_detect_evicted_total", "kind" => "baseline")
                .increment(n as u64);
        }
        let slot = self
            .map
            .entry(key.to_string())
            .or_insert_with(|| (t, init()));
        slot.0 = slot.0.max(t);
        &mut slot.1
    }

    fn retain(&mut self, mut f: impl FnMut(i64, &mut V) -> bool) {
        self.map.retain(|_, (s, v)| f(*s, v));
    }
}

#[derive(Debug, Default)]
struct VpnActor {
    /// Network → last connection (seconds).
    networks: HashMap<String, i64>,
    /// Connections seen (saturating).
    connections: u32,
}

#[derive(Debug, Default)]
struct ExfilActor {
    /// (minute, bytes) within the window, oldest first.
    minutes: VecDeque<(i64, u64)>,
    /// (hour, bytes) totals, oldest first, for the baseline.
    hours: VecDeque<(i64, u64)>,
    /// Recent contributing events (seconds, id), oldest first.
    evidence: VecDeque<(i64, Uuid)>,
    /// When it last fired (seconds).
    last_fired: Option<i64>,
}

#[derive(Debug)]
struct HourActor {
    counts: [u32; 24],
    total: u64,
    last_fired: Option<i64>,
    /// Event time of the first access seen (history must span days, not just events).
    first_seen: i64,
}

/// One tenant's behavioural state.
#[derive(Debug)]
pub struct BehaviorState {
    vpn: Bounded<VpnActor>,
    exfil: Bounded<ExfilActor>,
    hours: Bounded<HourActor>,
}

/// Sizes of the behavioural state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BehaviorStats {
    /// Actors tracked, summed over detectors.
    pub actors: usize,
    /// Actors evicted because a detector was full.
    pub evicted: u64,
}

impl BehaviorState {
    /// Empty state bounded by `config`.
    pub fn new(config: &BehaviorConfig) -> Self {
        Self {
            vpn: Bounded::new(config.max_actors),
            exfil: Bounded::new(config.max_actors),
            hours: Bounded::new(config.max_actors),
        }
    }

    /// Sizes.
    pub fn stats(&self) -> BehaviorStats {
        BehaviorStats {
            actors: self.vpn.map.len() + self.exfil.map.len() + self.hours.map.len(),
            evicted: self.vpn.evicted + self.exfil.evicted + self.hours.evicted,
        }
    }

    /// Feeds one event (of logsource `category`) to every detector not in
    /// `disabled`.
    pub fn observe(
        &mut self,
        config: &BehaviorConfig,
        disabled: &HashSet<String>,
        e: &NewEvent,
        category: &str,
    ) -> Vec<Detection> {
        if e.actor.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        if !disabled.contains(VPN_NEW_NETWORK_ID) {
            out.extend(self.vpn(config, e, category));
        }
        if !disabled.contains(EXFILTRATION_ID) {
            out.extend(self.exfil(config, e));
        }
        if !disabled.contains(UNUSUAL_HOUR_ID) {
            out.extend(self.unusual_hour(config, e, category));
        }
        out
    }

    /// Forgets what is older than the detectors' history as of `now`.
    pub fn advance(&mut self, config: &BehaviorConfig, now: DateTime<Utc>) {
        let now = now.timestamp();
        let horizon = now - config.lookback().num_seconds();
        let vpn_horizon = now - config.vpn_history.num_seconds();
        self.vpn.retain(|_, a| {
            a.networks.retain(|_, t| *t >= vpn_horizon);
            !a.networks.is_empty()
        });
        let window = config.exfil_window.num_seconds();
        self.exfil.retain(|seen, a| {
            a.minutes.retain(|(m, _)| m * 60 > now - window);
            a.hours.retain(|(h, _)| h * 3600 >= horizon);
            seen >= horizon
        });
        self.hours.retain(|seen, _| seen >= horizon);
    }

    fn vpn(&mut self, config: &BehaviorConfig, e: &NewEvent, category: &str) -> Option<Detection> {
        if category != "vpn" || e.outcome == Outcome::Failure {
            return None;
        }
        let ip = e.source_ip?;
        let network = network_of(ip);
        let t = e.occurred_at.timestamp();
        let horizon = t - config.vpn_history.num_seconds();
        let actor = self.vpn.entry(&e.actor, t, VpnActor::default);
        actor.networks.retain(|_, seen| *seen >= horizon);
        let known = actor.networks.contains_key(&network);
        let fire = !known
            && !actor.networks.is_empty()
            && actor.connections >= config.vpn_min_prior_connections;
        actor.connections = actor.connections.saturating_add(1);
        if !known
            && actor.networks.len() >= config.vpn_max_networks_per_actor.max(1)
            && let Some(oldest) = actor
                .networks
                .iter()
                .min_by_key(|(_, s)| **s)
                .map(|(k, _)| k.clone())
        {
            actor.networks.remove(&oldest);
        }
        let seen = actor.networks.entry(network.clone()).or_insert(t);
        *seen = (*seen).max(t);
        if !fire {
            return None;
        }
        let known_count = actor.networks.len() - 1;
        Some(detection(
            &DETECTORS[0],
            e,
            vec![
                Entity::new(EntityKind::Actor, &e.actor),
                Entity::new(EntityKind::Ip, ip.to_string()),
            ],
            vec![e.id],
            e.occurred_at,
            &[
                ("Actor".into(), e.actor.clone()),
                ("Network".into(), network.clone()),
            ],
            format!(
                "{} connected to the VPN from {ip} (network {network}), not seen for this actor in the last {} days; {known_count} other network(s) known.",
                e.actor,
                config.vpn_history.num_days()
            ),
        ))
    }

    fn exfil(&mut self, config: &BehaviorConfig, e: &NewEvent) -> Option<Detection> {
        let bytes = e.details.http.as_ref().map_or(0, |h| h.bytes_out)
            + e.details.network.as_ref().map_or(0, |n| n.bytes_sent);
        if bytes == 0 {
            return None;
        }
        let t = e.occurred_at.timestamp();
        let window = config.exfil_window.num_seconds().max(60);
        let horizon = t - config.lookback().num_seconds();
        let a = self.exfil.entry(&e.actor, t, ExfilActor::default);
        let minute = t.div_euclid(60);
        match a.minutes.iter_mut().rev().find(|(m, _)| *m == minute) {
            Some((_, b)) => *b += bytes,
            None => {
                a.minutes.push_back((minute, bytes));
                a.minutes
                    .make_contiguous()
                    .sort_unstable_by_key(|(m, _)| *m);
            }
        }
        let first_minute = minute - window / 60 + 1;
        while a.minutes.front().is_some_and(|(m, _)| *m < first_minute) {
            a.minutes.pop_front();
        }
        let in_window: u64 = a
            .minutes
            .iter()
            .filter(|(m, _)| *m >= first_minute && *m <= minute)
            .map(|(_, b)| b)
            .sum();
        let hour = t.div_euclid(3600);
        match a.hours.iter_mut().rev().find(|(h, _)| *h == hour) {
            Some((_, b)) => *b += bytes,
            None => {
                a.hours.push_back((hour, bytes));
                a.hours.make_contiguous().sort_unstable_by_key(|(h, _)| *h);
            }
        }
        while a.hours.len() > config.exfil_baseline_hours + 2
            || a.hours.front().is_some_and(|(h, _)| h * 3600 < horizon)
        {
            a.hours.pop_front();
        }
        a.evidence.push_back((t, e.id));
        while a.evidence.len() > EXFIL_EVIDENCE
            || a.evidence.front().is_some_and(|(s, _)| *s <= t - window)
        {
            a.evidence.pop_front();
        }
        // The baseline excludes the hours the window overlaps.
        let window_first_hour = (first_minute * 60).div_euclid(3600);
        let mut baseline: Vec<u64> = a
            .hours
            .iter()
            .filter(|(h, b)| *h < window_first_hour && *b > 0)
            .map(|(_, b)| *b)
            .collect();
        let (threshold, median) = if baseline.len() >= config.exfil_min_baseline_hours {
            baseline.sort_unstable();
            let median = median_of(&baseline);
            (
                (median * config.exfil_multiplier).max(config.exfil_floor_bytes as f64),
                Some(median),
            )
        } else {
            (config.exfil_cold_start_bytes as f64, None)
        };
        if (in_window as f64) <= threshold || a.last_fired.is_some_and(|f| t - f < window) {
            return None;
        }
        a.last_fired = Some(t);
        let evidence: Vec<Uuid> = a.evidence.iter().map(|(_, id)| *id).collect();
        let first_seen = a
            .evidence
            .front()
            .and_then(|(s, _)| Utc.timestamp_opt(*s, 0).single())
            .unwrap_or(e.occurred_at)
            .min(e.occurred_at);
        let baseline_text = match median {
            Some(m) => format!(
                "the actor's median active hour is {:.1} MB over {} hours",
                m / MB as f64,
                baseline.len()
            ),
            None => format!(
                "the actor has only {} hours of baseline, so the cold-start threshold applies",
                baseline.len()
            ),
        };
        let mut entities = vec![Entity::new(EntityKind::Actor, &e.actor)];
        if let Some(ip) = e.source_ip {
            entities.push(Entity::new(EntityKind::Ip, ip.to_string()));
        }
        let mut d = detection(
            &DETECTORS[1],
            e,
            entities,
            evidence,
            first_seen,
            &[("Actor".into(), e.actor.clone())],
            format!(
                "{} sent {:.1} MB out within {} minutes, above the threshold of {:.1} MB; {baseline_text}.",
                e.actor,
                in_window as f64 / MB as f64,
                window / 60,
                threshold / MB as f64
            ),
        );
        d.first_seen = first_seen;
        Some(d)
    }

    fn unusual_hour(
        &mut self,
        config: &BehaviorConfig,
        e: &NewEvent,
        category: &str,
    ) -> Option<Detection> {
        // Every activity (failed ones too) teaches the actor's usual hours;
        // only successful access can alert.
        let activity = matches!(
            category,
            "authentication" | "vpn" | "http" | "api" | "database"
        );
        if !activity {
            return None;
        }
        let succeeded = e.outcome != Outcome::Failure;
        let t = e.occurred_at.timestamp();
        let h = e.occurred_at.hour() as usize;
        let a = self.hours.entry(&e.actor, t, || HourActor {
            counts: [0; 24],
            total: 0,
            last_fired: None,
            first_seen: t,
        });
        a.first_seen = a.first_seen.min(t);
        let active_hours = a.counts.iter().filter(|c| **c > 0).count();
        let rare = a.total >= config.unusual_hour_min_events
            && t - a.first_seen >= config.unusual_hour_min_history_days * DAY_SECS
            && active_hours < ROUND_THE_CLOCK_HOURS
            && (f64::from(a.counts[h]) < config.unusual_hour_rare_fraction * a.total as f64);
        let fire = succeeded && rare && a.last_fired.is_none_or(|f| t - f >= 3600);
        let seen_before = a.counts[h];
        let total = a.total;
        a.counts[h] = a.counts[h].saturating_add(1);
        a.total += 1;
        if a.total > HOUR_DECAY_TOTAL {
            for c in &mut a.counts {
                *c /= 2;
            }
            a.total = a.counts.iter().map(|c| u64::from(*c)).sum();
        }
        if !fire {
            return None;
        }
        a.last_fired = Some(t);
        let mut entities = vec![Entity::new(EntityKind::Actor, &e.actor)];
        if let Some(ip) = e.source_ip {
            entities.push(Entity::new(EntityKind::Ip, ip.to_string()));
        }
        Some(detection(
            &DETECTORS[2],
            e,
            entities,
            vec![e.id],
            e.occurred_at,
            &[
                ("Actor".into(), e.actor.clone()),
                ("Hour".into(), h.to_string()),
            ],
            format!(
                "{} was active at {h:02}:00–{h:02}:59 UTC ({}), an hour holding {seen_before} of its {total} earlier accesses.",
                e.actor, e.event_type
            ),
        ))
    }
}

fn median_of(sorted: &[u64]) -> f64 {
    let n = sorted.len();
    debug_assert!(n > 0);
    if n % 2 == 1 {
        sorted[n / 2] as f64
    } else {
        (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0
    }
}

fn detection(
    info: &BehaviorInfo,
    e: &NewEvent,
    mut entities: Vec<Entity>,
    evidence: Vec<Uuid>,
    first_seen: DateTime<Utc>,
    key: &[(String, String)],
    summary: String,
) -> Detection {
    entities.sort();
    entities.dedup();
    Detection {
        rule_id: info.id.to_string(),
        rule_title: info.title.to_string(),
        kind: DetectionKind::Behavior,
        severity: info.severity,
        category: info.category.to_string(),
        attack_techniques: info
            .attack_techniques
            .iter()
            .map(|s| s.to_string())
            .collect(),
        entities,
        evidence,
        first_seen,
        last_seen: e.occurred_at,
        fingerprint: fingerprint(info.id, key),
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::taxonomy::category_of;
    use crate::detect::testing::{at, event};
    use crate::domain::event::{HttpDetails, NetworkDetails};

    const DAY: i64 = 86_400;

    fn vpn(actor: &str, ip: &str, t: i64) -> NewEvent {
        let mut e = event("vpn.connect");
        e.actor = actor.into();
        e.outcome = Outcome::Success;
        e.source_ip = Some(ip.parse().unwrap());
        e.occurred_at = at(t);
        e
    }

    fn feed(s: &mut BehaviorState, c: &BehaviorConfig, e: &NewEvent) -> Vec<Detection> {
        s.observe(c, &HashSet::new(), e, category_of(e))
    }

    #[test]
    fn networks_are_slash_24_and_slash_48() {
        assert_eq!(
            network_of("203.0.113.77".parse().unwrap()),
            "203.0.113.0/24"
        );
        assert_eq!(
            network_of("2001:db8:abcd:12::1".parse().unwrap()),
            "2001:db8:abcd::/48"
        );
    }

    #[test]
    fn vpn_from_a_new_network_fires_after_a_baseline() {
        let c = BehaviorConfig::default();
        let mut s = BehaviorState::new(&c);
        // A brand-new actor builds history silently, even from new networks.
        assert!(feed(&mut s, &c, &vpn("alice", "198.51.100.1", 0)).is_empty());
        assert!(feed(&mut s, &c, &vpn("alice", "192.0.2.9", 60)).is_empty());
        for i in 0..5 {
            assert!(feed(&mut s, &c, &vpn("alice", "198.51.100.20", 3600 * (i + 1))).is_empty());
        }
        // Same /24 as before: quiet.
        assert!(feed(&mut s, &c, &vpn("alice", "198.51.100.200", DAY)).is_empty());
        // New /24: fires.
        let d = feed(&mut s, &c, &vpn("alice", "203.0.113.5", DAY + 60));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].rule_id, VPN_NEW_NETWORK_ID);
        assert!(
            d[0].entities
                .contains(&Entity::new(EntityKind::Ip, "203.0.113.5"))
        );
        assert!(d[0].summary.contains("203.0.113.0/24"), "{}", d[0].summary);
        // Now known: quiet. A failed connection from elsewhere: quiet.
        assert!(feed(&mut s, &c, &vpn("alice", "203.0.113.6", DAY + 120)).is_empty());
        let mut failed = vpn("alice", "100.64.0.1", DAY + 180);
        failed.outcome = Outcome::Failure;
        assert!(feed(&mut s, &c, &failed).is_empty());
    }

    #[test]
    fn vpn_networks_are_forgotten_after_30_days() {
        let c = BehaviorConfig::default();
        let mut s = BehaviorState::new(&c);
        for i in 0..6 {
            feed(&mut s, &c, &vpn("bob", "198.51.100.1", i * 60));
        }
        feed(&mut s, &c, &vpn("bob", "192.0.2.1", 31 * DAY));
        // 198.51.100.0/24 was last seen 31 days before this: new again.
        let d = feed(&mut s, &c, &vpn("bob", "198.51.100.2", 31 * DAY + 60));
        assert_eq!(d.len(), 1);
        s.advance(&c, at(62 * DAY));
        assert_eq!(s.stats().actors, 0);
    }

    fn http_out(actor: &str, bytes: u64, t: i64) -> NewEvent {
        let mut e = event("http_request");
        e.actor = actor.into();
        e.outcome = Outcome::Success;
        e.occurred_at = at(t);
        e.details.http = Some(HttpDetails {
            bytes_out: bytes,
            ..Default::default()
        });
        e
    }

    #[test]
    fn exfiltration_fires_far_above_the_baseline() {
        let c = BehaviorConfig::default();
        let mut s = BehaviorState::new(&c);
        // 48 active hours of 2 MB each: median 2 MB, threshold max(20, 50) = 50 MB.
        for h in 0..48 {
            assert!(feed(&mut s, &c, &http_out("carol", 2 * MB, h * 3600)).is_empty());
        }
        let t0 = 50 * 3600;
        // 45 MB in the window: under 50 MB.
        assert!(feed(&mut s, &c, &http_out("carol", 45 * MB, t0)).is_empty());
        // Another 10 MB 59 minutes later: 55 MB within the hour, fires.
        let d = feed(&mut s, &c, &http_out("carol", 10 * MB, t0 + 59 * 60));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].rule_id, EXFILTRATION_ID);
        assert_eq!(d[0].evidence.len(), 2);
        assert_eq!(d[0].first_seen, at(t0));
        // Fires once per window, even while the volume stays high.
        assert!(feed(&mut s, &c, &http_out("carol", 60 * MB, t0 + 60 * 60)).is_empty());
    }

    #[test]
    fn exfiltration_respects_the_window_and_the_cold_start() {
        let c = BehaviorConfig::default();
        let mut s = BehaviorState::new(&c);
        for h in 0..48 {
            feed(&mut s, &c, &http_out("dave", 2 * MB, h * 3600));
        }
        let t0 = 50 * 3600;
        assert!(feed(&mut s, &c, &http_out("dave", 45 * MB, t0)).is_empty());
        // 61 minutes later the first 45 MB has left the window.
        assert!(feed(&mut s, &c, &http_out("dave", 10 * MB, t0 + 61 * 60)).is_empty());
        // A new actor needs the 500 MB cold-start threshold.
        assert!(feed(&mut s, &c, &http_out("erin", 400 * MB, 0)).is_empty());
        let mut big = http_out("erin", 0, 60);
        big.details.http = None;
        big.details.network = Some(NetworkDetails {
            bytes_sent: 200 * MB,
            ..Default::default()
        });
        assert_eq!(feed(&mut s, &c, &big).len(), 1);
    }

    #[test]
    fn unusual_hours_fire_after_enough_history() {
        let c = BehaviorConfig::default();
        let mut s = BehaviorState::new(&c);
        let login = |t: i64| {
            let mut e = event("user.login");
            e.actor = "frank".into();
            e.outcome = Outcome::Success;
            e.occurred_at = at(t);
            e
        };
        // 60 logins at 09:00-09:59 UTC over 60 days.
        for d in 0..60 {
            assert!(feed(&mut s, &c, &login(d * DAY + 9 * 3600 + 60)).is_empty());
        }
        // 09:30 is usual.
        assert!(feed(&mut s, &c, &login(61 * DAY + 9 * 3600 + 1800)).is_empty());
        // 03:00 is not.
        let d = feed(&mut s, &c, &login(62 * DAY + 3 * 3600));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].rule_id, UNUSUAL_HOUR_ID);
        // Not again within the hour; a failed login never counts.
        assert!(feed(&mut s, &c, &login(62 * DAY + 3 * 3600 + 60)).is_empty());
        let mut failed = login(63 * DAY + 4 * 3600);
        failed.outcome = Outcome::Failure;
        assert!(feed(&mut s, &c, &failed).is_empty());
    }

    #[test]
    fn unusual_hours_learn_from_failures_and_need_days_of_history() {
        let c = BehaviorConfig::default();
        let at_hour = |actor: &str, day: i64, hour: i64, ok: bool| {
            let mut e = event("user.login");
            e.actor = actor.into();
            e.outcome = if ok {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            e.occurred_at = at(day * DAY + hour * 3600 + 60);
            e
        };
        // 100 accesses within one day are not enough history.
        let mut s = BehaviorState::new(&c);
        for i in 0..100 {
            feed(&mut s, &c, &at_hour("ivan", 0, 9 + (i % 2), true));
        }
        assert!(
            feed(&mut s, &c, &at_hour("ivan", 0, 3, true)).is_empty(),
            "one day of history alerted"
        );
        // A service identity active round the clock (some hours only failing) never alerts.
        let mut s = BehaviorState::new(&c);
        for d in 0..10 {
            for h in 0..24 {
                feed(&mut s, &c, &at_hour("svc:etl", d, h, h % 5 != 0));
            }
        }
        assert!(
            feed(&mut s, &c, &at_hour("svc:etl", 11, 5, true)).is_empty(),
            "round-the-clock actor alerted"
        );
        // Hours seen only with failures are still usual hours.
        let mut s = BehaviorState::new(&c);
        for d in 0..10 {
            for _ in 0..6 {
                feed(&mut s, &c, &at_hour("judy", d, 9, true));
            }
            feed(&mut s, &c, &at_hour("judy", d, 14, false));
        }
        assert!(
            feed(&mut s, &c, &at_hour("judy", 11, 14, true)).is_empty(),
            "an hour seen with failures alerted"
        );
        assert_eq!(
            feed(&mut s, &c, &at_hour("judy", 11, 3, true)).len(),
            1,
            "a truly unusual hour must still alert"
        );
    }

    #[test]
    fn unusual_hours_need_history_first() {
        let c = BehaviorConfig::default();
        let mut s = BehaviorState::new(&c);
        for i in 0..10 {
            let mut e = http_out("gina", 1, i * 3600 * 5);
            e.details.http = Some(HttpDetails::default());
            assert!(feed(&mut s, &c, &e).is_empty());
        }
    }

    #[test]
    fn actors_are_bounded_and_detectors_can_be_disabled() {
        let c = BehaviorConfig {
            max_actors: 10,
            ..Default::default()
        };
        let mut s = BehaviorState::new(&c);
        for i in 0..25 {
            feed(&mut s, &c, &vpn(&format!("u{i}"), "198.51.100.1", i));
        }
        assert!(s.vpn.map.len() <= 10);
        assert!(s.stats().evicted >= 15);
        assert!(s.vpn.map.contains_key("u24"), "the newest actor is kept");

        let mut s = BehaviorState::new(&c);
        let disabled: HashSet<String> = [EXFILTRATION_ID.to_string()].into();
        let e = http_out("hank", 600 * MB, 0);
        assert!(s.observe(&c, &disabled, &e, "http").is_empty());
        assert_eq!(s.observe(&c, &HashSet::new(), &e, "http").len(), 1);
    }

    #[test]
    fn baselines_are_capped_and_evict_the_least_recently_seen_actor() {
        let c = BehaviorConfig {
            max_actors: 10,
            ..BehaviorConfig::default()
        };
        let mut s = BehaviorState::new(&c);
        // Alice has a baseline: six connections from one network.
        for k in 0..6 {
            feed(&mut s, &c, &vpn("alice", "198.51.100.1", k * 60));
        }
        for i in 0..9 {
            feed(&mut s, &c, &vpn(&format!("u{i}"), "192.0.2.1", 1000 + i));
        }
        assert_eq!(s.vpn.map.len(), 10);
        // Alice is seen again: u0 is now the least recently seen.
        feed(&mut s, &c, &vpn("alice", "198.51.100.1", 2000));
        feed(&mut s, &c, &vpn("newcomer", "192.0.2.1", 2001));
        assert!(
            !s.vpn.map.contains_key("u0"),
            "the stalest actor is evicted"
        );
        assert!(s.vpn.map.contains_key("alice"));
        assert_eq!(s.vpn.evicted, 1);
        // A storm of new actors never exceeds the cap; every eviction counts.
        for i in 0..500 {
            feed(
                &mut s,
                &c,
                &vpn(&format!("storm{i}"), "192.0.2.1", 3000 + i),
            );
            assert!(s.vpn.map.len() <= 10);
            assert!(s.hours.map.len() <= 10);
        }
        assert_eq!(s.vpn.evicted, 501);
        assert_eq!(s.stats().evicted, s.vpn.evicted + s.hours.evicted);
        // Alice was evicted by the storm: back from a new network she starts
        // a fresh baseline (no alert), where before she would have fired.
        assert!(!s.vpn.map.contains_key("alice"));
        assert!(feed(&mut s, &c, &vpn("alice", "203.0.113.5", 4000)).is_empty());
        assert_eq!(s.vpn.map["alice"].1.connections, 1);
        assert_eq!(s.vpn.map["alice"].1.networks.len(), 1);
    }
}
