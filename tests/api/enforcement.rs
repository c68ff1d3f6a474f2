//! EnforcementService: decisions resolve into one effective state per target,
//! CheckAccess answers from it, and WatchDecisions streams it so that a
//! client killed at any message boundary and resumed from the last revision
//! it applied always ends with exactly the server's set. Expiries arrive on
//! time with no other traffic, stale or future revisions get an explicit
//! snapshot, and changes cross replicas through Redis.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use picket::grpc::pb;
use picket::grpc::pb::watch_decisions_response::Item;
use picket::storage::Backend;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::common::{self, TestApp, spawn_app, with_key};

type Client = pb::enforcement_service_client::EnforcementServiceClient<Channel>;

/// Upper bound for any single wait.
const DEADLINE: Duration = Duration::from_secs(20);

fn client(channel: &Channel) -> Client {
    Client::new(channel.clone())
}

fn new(scope: pb::DecisionScope, value: &str, ty: pb::DecisionType, secs: u32) -> pb::NewDecision {
    pb::NewDecision {
        scope: scope as i32,
        value: value.into(),
        r#type: ty as i32,
        duration_seconds: secs,
        reason: format!("test {value}"),
        throttle_per_minute: if ty == pb::DecisionType::Throttle {
            30
        } else {
            0
        },
        ..Default::default()
    }
}

fn ban_ip(ip: &str, secs: u32) -> pb::NewDecision {
    new(pb::DecisionScope::Ip, ip, pb::DecisionType::Ban, secs)
}

async fn create(c: &Channel, key: &str, d: pb::NewDecision) -> pb::CreateDecisionResponse {
    client(c)
        .create_decision(with_key(
            pb::CreateDecisionRequest { decision: Some(d) },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn create_all(
    c: &Channel,
    key: &str,
    ds: Vec<pb::NewDecision>,
) -> pb::CreateDecisionsResponse {
    client(c)
        .create_decisions(with_key(pb::CreateDecisionsRequest { decisions: ds }, key))
        .await
        .unwrap()
        .into_inner()
}

async fn revoke(c: &Channel, key: &str, id: &str) -> pb::RevokeDecisionResponse {
    client(c)
        .revoke_decision(with_key(
            pb::RevokeDecisionRequest {
                decision_id: id.into(),
                reason: "test".into(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn check(c: &Channel, key: &str, ip: &str, actor: &str) -> pb::CheckAccessResponse {
    client(c)
        .check_access(with_key(
            pb::CheckAccessRequest {
                ip: ip.into(),
                actor: actor.into(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn watch(c: &Channel, key: &str, after: u64) -> Streaming<pb::WatchDecisionsResponse> {
    client(c)
        .watch_decisions(with_key(
            pb::WatchDecisionsRequest {
                after_revision: after,
                scopes: vec![],
                heartbeat_interval_seconds: 1,
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The next message, within [`DEADLINE`].
async fn next(s: &mut Streaming<pb::WatchDecisionsResponse>) -> Item {
    tokio::time::timeout(DEADLINE, s.message())
        .await
        .expect("no message in time")
        .unwrap()
        .expect("stream ended")
        .item
        .expect("empty message")
}

/// The next delta chunk, skipping heartbeats.
async fn next_deltas(s: &mut Streaming<pb::WatchDecisionsResponse>) -> pb::DecisionDeltaChunk {
    loop {
        match next(s).await {
            Item::Deltas(d) => return d,
            Item::Heartbeat(_) => continue,
            other => panic!("expected deltas, got {other:?}"),
        }
    }
}

/// A target: (scope, value).
type TargetKey = (i32, String);

/// A WatchDecisions client's local copy, as a gateway would keep it. What
/// survives a crash is `set` and `revision` (stored together after each
/// message); an unfinished snapshot is lost.
#[derive(Debug, Clone, Default)]
struct Mirror {
    set: BTreeMap<TargetKey, pb::EffectiveDecision>,
    revision: u64,
    pending: Option<Vec<pb::EffectiveDecision>>,
    /// Reasons of the snapshots received.
    snapshots: Vec<i32>,
}

impl Mirror {
    fn apply(&mut self, item: Item) {
        match item {
            Item::Snapshot(chunk) => {
                assert!(chunk.decisions.len() <= 1000, "a chunk over 1,000 entries");
                self.pending.get_or_insert_default().extend(chunk.decisions);
            }
            Item::SnapshotComplete(c) => {
                let entries = self.pending.take().unwrap_or_default();
                assert_eq!(entries.len(), c.decision_count as usize);
                self.set = entries
                    .into_iter()
                    .map(|e| ((e.scope, e.value.clone()), e))
                    .collect();
                self.revision = c.revision;
                self.snapshots.push(c.reason);
            }
            Item::Deltas(chunk) => {
                assert!(self.pending.is_none(), "deltas inside a snapshot");
                assert!(chunk.deltas.len() <= 1000, "a chunk over 1,000 deltas");
                for d in chunk.deltas {
                    assert!(
                        d.revision > self.revision,
                        "revision {} not after {}",
                        d.revision,
                        self.revision
                    );
                    assert!(d.revision <= chunk.revision);
                    self.revision = d.revision;
                    let e = d.decision.expect("a delta names its target");
                    let k = (e.scope, e.value.clone());
                    match pb::DeltaKind::try_from(d.kind).unwrap() {
                        pb::DeltaKind::Added | pb::DeltaKind::Updated => {
                            self.set.insert(k, e);
                        }
                        pb::DeltaKind::Removed | pb::DeltaKind::Expired => {
                            assert!(
                                self.set.remove(&k).is_some(),
                                "removal of an unknown target {k:?}"
                            );
                        }
                        pb::DeltaKind::Unspecified => panic!("unspecified delta"),
                    }
                }
                self.revision = chunk.revision;
            }
            Item::Heartbeat(h) => {
                if self.pending.is_none() {
                    assert!(h.revision >= self.revision);
                    self.revision = h.revision;
                }
            }
        }
    }

    /// What a crash leaves.
    fn crashed(&self) -> Self {
        Self {
            pending: None,
            ..self.clone()
        }
    }

    /// Reads `s` until the copy is at `revision` (and not inside a snapshot).
    async fn catch_up(&mut self, s: &mut Streaming<pb::WatchDecisionsResponse>, revision: u64) {
        while self.pending.is_some() || self.revision < revision {
            let item = next(s).await;
            self.apply(item);
        }
    }
}

/// The server's effective set and revision, from a fresh snapshot.
async fn server_set(c: &Channel, key: &str) -> (u64, BTreeMap<TargetKey, pb::EffectiveDecision>) {
    let mut s = watch(c, key, 0).await;
    let mut m = Mirror::default();
    while m.snapshots.is_empty() {
        let item = next(&mut s).await;
        m.apply(item);
    }
    (m.revision, m.set)
}

async fn app_with_key(backend: Backend) -> (TestApp, String) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Read, pb::Scope::Respond])
        .await;
    (app, key)
}

/// Builds a history of 5,000+ decisions with every kind of delta, then kills
/// a subscriber at every message boundary (and, separately, after every
/// single message in turn) and resumes it from the revision it stored.
async fn a_subscriber_killed_at_every_boundary_ends_with_the_server_set(backend: Backend) {
    let (app, key) = app_with_key(backend).await;
    let c = &app.channel;
    // Phase 1: 1,000 IP bans; a client takes its snapshot there.
    let phase1: Vec<String> = (0..1000)
        .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let first = create_all(c, &key, phase1.iter().map(|ip| ban_ip(ip, 3600)).collect()).await;
    let (r1, base_set) = server_set(c, &key).await;
    assert_eq!((r1, base_set.len()), (first.revision, 1000));
    let base = Mirror {
        set: base_set,
        revision: r1,
        ..Default::default()
    };
    // Phase 2: actors, IPv4 and IPv6 ranges, throttles, allows over phase-1
    // bans (UPDATED), revocations (REMOVED) and short bans that expire.
    let actors = (0..1000).map(|i| {
        new(
            pb::DecisionScope::Actor,
            &format!("user-{i}@example.com"),
            pb::DecisionType::Ban,
            3600,
        )
    });
    create_all(c, &key, actors.collect()).await;
    let ranges = (0..500)
        .map(|i| {
            new(
                pb::DecisionScope::Cidr,
                &format!("172.{}.{}.0/24", 16 + i / 250, i % 250),
                pb::DecisionType::Ban,
                3600,
            )
        })
        .chain((0..500).map(|i| {
            new(
                pb::DecisionScope::Cidr,
                &format!("2001:db8:{i:x}::/48"),
                pb::DecisionType::Ban,
                3600,
            )
        }));
    create_all(c, &key, ranges.collect()).await;
    let mixed = (0..500)
        .map(|i| {
            new(
                pb::DecisionScope::Ip,
                &phase1[i],
                pb::DecisionType::Allow,
                3600,
            )
        })
        .chain((0..500).map(|i| {
            new(
                pb::DecisionScope::Ip,
                &format!("192.168.{}.{}", i / 250, i % 250 + 1),
                pb::DecisionType::Throttle,
                3600,
            )
        }));
    create_all(c, &key, mixed.collect()).await;
    for d in &first.decisions[900..950] {
        revoke(c, &key, &d.id).await;
    }
    let mut expiring = watch(c, &key, 0).await;
    let short = create_all(
        c,
        &key,
        (0..20)
            .map(|i| ban_ip(&format!("198.18.0.{}", i + 1), 1))
            .collect(),
    )
    .await;
    assert_eq!(short.decisions.len(), 20);
    // Wait until the 20 expiries are delivered: nothing changes after that.
    let mut watcher = Mirror::default();
    let mut expired = 0;
    while expired < 20 {
        let item = next(&mut expiring).await;
        if let Item::Deltas(d) = &item {
            expired += d
                .deltas
                .iter()
                .filter(|d| d.kind == pb::DeltaKind::Expired as i32)
                .count();
        }
        watcher.apply(item);
    }
    drop(expiring);
    let (head, expected) = server_set(c, &key).await;
    assert_eq!(
        watcher.set, expected,
        "a live watcher ends with the server set"
    );
    // 1,000 IPs (500 now allowed, 50 revoked) + 1,000 actors + 1,000 ranges + 500 throttles.
    assert_eq!(expected.len(), 950 + 1000 + 1000 + 500);
    let allowed = expected
        .values()
        .filter(|e| e.r#type == pb::DecisionType::Allow as i32)
        .count();
    assert_eq!(allowed, 500);

    // The full stream from the base copy, to know its message boundaries.
    let mut full = watch(c, &key, r1).await;
    let mut reference = base.clone();
    let mut messages = 0;
    while reference.revision < head {
        let item = next(&mut full).await;
        reference.apply(item);
        messages += 1;
    }
    drop(full);
    assert_eq!(reference.set, expected);
    assert!(messages >= 4, "deltas came in {messages} messages");

    // Killed after i messages, resumed from what it stored: always the server set.
    for (start, label) in [
        (base.clone(), "from revision r1"),
        (Mirror::default(), "from nothing"),
    ] {
        // From nothing: the snapshot's chunks and its end.
        let total = if start.revision == 0 {
            expected.len().div_ceil(1000) + 1
        } else {
            messages
        };
        for i in 0..=total {
            let mut m = start.clone();
            let mut s = watch(c, &key, m.revision).await;
            for _ in 0..i {
                let item = next(&mut s).await;
                m.apply(item);
            }
            drop(s);
            let mut m = m.crashed();
            let mut s = watch(c, &key, m.revision).await;
            m.catch_up(&mut s, head).await;
            assert_eq!(m.revision, head, "{label}, killed after {i} messages");
            assert_eq!(m.set, expected, "{label}, killed after {i} messages");
        }
    }
    // Killed after every single message, over and over.
    let mut m = base.clone();
    let mut reconnects = 0;
    while m.revision < head || m.pending.is_some() {
        let mut s = watch(c, &key, m.revision).await;
        let item = next(&mut s).await;
        m.apply(item);
        m = m.crashed();
        reconnects += 1;
        assert!(reconnects < 10_000);
    }
    assert_eq!(m.set, expected);
}

/// Overlaps resolve server-side: a 60 s ban after a 1 h one does not shorten
/// it, an allow beats a ban, revoking one of two bans keeps the target banned.
async fn overlapping_decisions_resolve_into_one_state(backend: Backend) {
    let (app, key) = app_with_key(backend).await;
    let c = &app.channel;
    let ip = "203.0.113.7";
    let long = create(c, &key, ban_ip(ip, 3600)).await;
    assert!(long.created);
    let mut s = watch(c, &key, long.revision).await;
    let short = create(c, &key, ban_ip(ip, 60)).await;
    let long_id = long.decision.as_ref().unwrap().id.clone();
    let short_id = short.decision.as_ref().unwrap().id.clone();
    let eff = short.effective.unwrap();
    assert_eq!(
        eff.decision_id, long_id,
        "the 60 s ban must not shorten the 1 h one"
    );
    assert_eq!(eff.expires_at, long.decision.as_ref().unwrap().expires_at);
    let verdict = check(c, &key, ip, "").await;
    assert_eq!(verdict.verdict, pb::Verdict::Deny as i32);
    assert_eq!(verdict.decision.unwrap().decision_id, long_id);

    // Allow over ban: the stream says so and CheckAccess lets it through.
    let allow = create(
        c,
        &key,
        new(pb::DecisionScope::Ip, ip, pb::DecisionType::Allow, 600),
    )
    .await;
    let allow_id = allow.decision.as_ref().unwrap().id.clone();
    let d = next_deltas(&mut s).await;
    // The short ban changed nothing: the next delta is the allow.
    assert_eq!(d.deltas.len(), 1);
    assert_eq!(d.deltas[0].kind, pb::DeltaKind::Updated as i32);
    let e = d.deltas[0].decision.as_ref().unwrap();
    assert_eq!(
        (e.r#type, &e.decision_id),
        (pb::DecisionType::Allow as i32, &allow_id)
    );
    let verdict = check(c, &key, ip, "").await;
    assert_eq!(verdict.verdict, pb::Verdict::Allow as i32);
    assert_eq!(verdict.decision.unwrap().decision_id, allow_id);
    // An allow on an IP does not lift a ban on the actor (another dimension).
    create(
        c,
        &key,
        new(
            pb::DecisionScope::Actor,
            "mallory",
            pb::DecisionType::Ban,
            600,
        ),
    )
    .await;
    assert_eq!(
        check(c, &key, ip, "mallory").await.verdict,
        pb::Verdict::Deny as i32
    );
    assert_eq!(
        check(c, &key, ip, "alice").await.verdict,
        pb::Verdict::Allow as i32
    );
    revoke(c, &key, &allow_id).await;
    assert_eq!(
        check(c, &key, ip, "").await.verdict,
        pb::Verdict::Deny as i32
    );

    // Revoke one of the two bans: still banned, now by the other.
    let r = revoke(c, &key, &long_id).await;
    assert_eq!(r.decision.unwrap().state, pb::DecisionState::Revoked as i32);
    assert_eq!(r.effective.unwrap().decision_id, short_id);
    let verdict = check(c, &key, ip, "").await;
    assert_eq!(verdict.verdict, pb::Verdict::Deny as i32);
    assert_eq!(verdict.decision.unwrap().decision_id, short_id);
    let mut m = Mirror::default();
    let mut fresh = watch(c, &key, 0).await;
    m.catch_up(&mut fresh, r.revision).await;
    let entry = &m.set[&(pb::DecisionScope::Ip as i32, ip.to_owned())];
    assert_eq!(
        (entry.r#type, &entry.decision_id),
        (pb::DecisionType::Ban as i32, &short_id)
    );
    // Revoking the last one removes the target.
    let r = revoke(c, &key, &short_id).await;
    assert!(r.effective.is_none());
    assert_eq!(
        check(c, &key, ip, "").await.verdict,
        pb::Verdict::Allow as i32
    );
    m.catch_up(&mut fresh, r.revision).await;
    assert!(
        !m.set
            .contains_key(&(pb::DecisionScope::Ip as i32, ip.to_owned()))
    );

    // Ranges: an IPv4 and an IPv6 range ban cover their addresses; an exact
    // allow inside the range wins; the lowest throttle wins.
    create(
        c,
        &key,
        new(
            pb::DecisionScope::Cidr,
            "198.51.100.0/24",
            pb::DecisionType::Ban,
            600,
        ),
    )
    .await;
    create(
        c,
        &key,
        new(
            pb::DecisionScope::Cidr,
            "2001:db8:7::/48",
            pb::DecisionType::Ban,
            600,
        ),
    )
    .await;
    create(
        c,
        &key,
        new(
            pb::DecisionScope::Ip,
            "198.51.100.9",
            pb::DecisionType::Allow,
            600,
        ),
    )
    .await;
    assert_eq!(
        check(c, &key, "198.51.100.200", "").await.verdict,
        pb::Verdict::Deny as i32
    );
    assert_eq!(
        check(c, &key, "2001:db8:7:1::5", "").await.verdict,
        pb::Verdict::Deny as i32
    );
    assert_eq!(
        check(c, &key, "2001:db8:8::5", "").await.verdict,
        pb::Verdict::Allow as i32
    );
    assert_eq!(
        check(c, &key, "198.51.100.9", "").await.verdict,
        pb::Verdict::Allow as i32
    );
    assert_eq!(
        check(c, &key, "198.51.101.1", "").await.verdict,
        pb::Verdict::Allow as i32
    );
    let mut slow = new(
        pb::DecisionScope::Actor,
        "bot",
        pb::DecisionType::Throttle,
        600,
    );
    slow.throttle_per_minute = 5;
    create(c, &key, slow).await;
    create(
        c,
        &key,
        new(
            pb::DecisionScope::Cidr,
            "192.0.2.0/24",
            pb::DecisionType::Throttle,
            600,
        ),
    )
    .await;
    let t = check(c, &key, "192.0.2.1", "bot").await;
    assert_eq!(
        (t.verdict, t.throttle_per_minute),
        (pb::Verdict::Throttle as i32, 5)
    );
    // A decision made in answer to an alert records it; an unknown alert is NOT_FOUND.
    let mut from_alert = ban_ip("192.0.2.77", 60);
    from_alert.alert_id = uuid::Uuid::new_v4().to_string();
    let err = client(c)
        .create_decision(with_key(
            pb::CreateDecisionRequest {
                decision: Some(from_alert),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// An expiring decision reaches a subscriber as EXPIRED within 1 s of its
/// expiry, with no other traffic.
async fn expiry_is_delivered_within_a_second(backend: Backend) {
    let (app, key) = app_with_key(backend).await;
    let c = &app.channel;
    let mut s = watch(c, &key, 0).await;
    let Item::SnapshotComplete(sc) = next(&mut s).await else {
        panic!("snapshot first")
    };
    assert_eq!(sc.reason, pb::SnapshotReason::Initial as i32);
    let made = create(
        c,
        &key,
        new(pb::DecisionScope::Actor, "eve", pb::DecisionType::Ban, 2),
    )
    .await;
    let expires_at = made.decision.unwrap().expires_at.unwrap();
    let expires_at =
        chrono::DateTime::from_timestamp(expires_at.seconds, expires_at.nanos as u32).unwrap();
    let added = next_deltas(&mut s).await;
    assert_eq!(added.deltas[0].kind, pb::DeltaKind::Added as i32);
    loop {
        match next(&mut s).await {
            Item::Heartbeat(_) => continue,
            Item::Deltas(d) => {
                let arrived = Utc::now();
                assert_eq!(d.deltas.len(), 1);
                assert_eq!(d.deltas[0].kind, pb::DeltaKind::Expired as i32);
                assert!(d.deltas[0].revision > added.revision);
                let lag = arrived - expires_at;
                assert!(lag >= chrono::Duration::zero(), "expired {lag} early");
                assert!(
                    lag < chrono::Duration::seconds(1),
                    "expiry arrived {lag} late"
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        check(c, &key, "", "eve").await.verdict,
        pb::Verdict::Allow as i32
    );
}

/// A revision older than the kept log, or newer than the server's, is
/// answered with a fresh snapshot that says why.
async fn stale_or_future_revisions_get_a_fresh_snapshot(backend: Backend) {
    let (app, key) = app_with_key(backend).await;
    let c = &app.channel;
    let a = create(c, &key, ban_ip("192.0.2.1", 600)).await;
    let b = create(c, &key, ban_ip("192.0.2.2", 600)).await;
    // Resuming within the log: only what came after.
    let mut s = watch(c, &key, a.revision).await;
    let d = next_deltas(&mut s).await;
    assert_eq!(d.revision, b.revision);
    assert_eq!(d.deltas[0].decision.as_ref().unwrap().value, "192.0.2.2");
    // The log is compacted (as the hourly task does after the retention).
    let tenant = app
        .store
        .find_tenant_by_name("acme")
        .await
        .unwrap()
        .unwrap()
        .id;
    let future = Utc::now() + chrono::Duration::seconds(1);
    app.store
        .compact_decisions(tenant, future, Utc::now() - chrono::Duration::days(30))
        .await
        .unwrap();
    let c2 = create(c, &key, ban_ip("192.0.2.3", 600)).await;
    let mut m = Mirror {
        revision: a.revision,
        ..Default::default()
    };
    let mut s = watch(c, &key, a.revision).await;
    m.catch_up(&mut s, c2.revision).await;
    assert_eq!(m.snapshots, [pb::SnapshotReason::Compacted as i32]);
    assert_eq!(m.set.len(), 3);
    // The newest revision resumes with nothing to send, then the next change.
    let mut s = watch(c, &key, c2.revision).await;
    let d = create(c, &key, ban_ip("192.0.2.4", 600)).await;
    let x = next_deltas(&mut s).await;
    assert_eq!(x.revision, d.revision);
    // Ahead of the server: a snapshot saying so.
    let mut s = watch(c, &key, d.revision + 100).await;
    let mut m = Mirror::default();
    while m.snapshots.is_empty() {
        let item = next(&mut s).await;
        if let Item::SnapshotComplete(sc) = &item {
            assert!(sc.message.contains("ahead"), "{}", sc.message);
        }
        m.apply(item);
    }
    assert_eq!(m.snapshots, [pb::SnapshotReason::Ahead as i32]);
    assert_eq!((m.revision, m.set.len()), (d.revision, 4));
}

/// Scopes, tenants and input limits.
async fn scopes_tenants_and_limits(backend: Backend) {
    let app = spawn_app(backend).await;
    let c = &app.channel;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Read, pb::Scope::Respond])
        .await;
    let (_, reader) = app.tenant_with_key("readonly", &[pb::Scope::Read]).await;
    let (_, other) = app
        .tenant_with_key("globex", &[pb::Scope::Read, pb::Scope::Respond])
        .await;
    let made = create(c, &key, ban_ip("203.0.113.9", 600)).await;
    let id = made.decision.unwrap().id;
    // Read scope consults, respond scope changes.
    let err = client(c)
        .create_decision(with_key(
            pb::CreateDecisionRequest {
                decision: Some(ban_ip("203.0.113.10", 60)),
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client(c)
        .check_access(with_key(
            pb::CheckAccessRequest {
                ip: "203.0.113.9".into(),
                actor: String::new(),
            },
            common::OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "the operator has no tenant"
    );
    let err = client(c)
        .check_access(pb::CheckAccessRequest {
            ip: "203.0.113.9".into(),
            actor: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Another tenant sees none of it.
    assert_eq!(
        check(c, &other, "203.0.113.9", "").await.verdict,
        pb::Verdict::Allow as i32
    );
    let err = client(c)
        .get_decision(with_key(
            pb::GetDecisionRequest {
                decision_id: id.clone(),
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(server_set(c, &other).await.1.is_empty());
    let got = client(c)
        .get_decision(with_key(
            pb::GetDecisionRequest {
                decision_id: id.clone(),
            },
            &reader,
        ))
        .await;
    assert_eq!(
        got.unwrap_err().code(),
        Code::NotFound,
        "readonly is a third tenant"
    );

    // Every bad field is named.
    let field = |e: tonic::Status| {
        use tonic_types::StatusExt;
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        e.get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect::<Vec<_>>()
    };
    let bad = |d: pb::NewDecision| {
        let c = c.clone();
        let key = key.clone();
        async move {
            field(
                client(&c)
                    .create_decision(with_key(
                        pb::CreateDecisionRequest { decision: Some(d) },
                        &key,
                    ))
                    .await
                    .unwrap_err(),
            )
        }
    };
    assert_eq!(
        bad(new(
            pb::DecisionScope::Cidr,
            "10.1.2.3/8",
            pb::DecisionType::Ban,
            60
        ))
        .await,
        ["decision.value"]
    );
    assert_eq!(
        bad(new(
            pb::DecisionScope::Cidr,
            "0.0.0.0/0",
            pb::DecisionType::Ban,
            60
        ))
        .await,
        ["decision.value"]
    );
    assert_eq!(
        bad(new(
            pb::DecisionScope::Cidr,
            "::/0",
            pb::DecisionType::Ban,
            60
        ))
        .await,
        ["decision.value"]
    );
    assert_eq!(
        bad(new(
            pb::DecisionScope::Ip,
            "not-an-ip",
            pb::DecisionType::Ban,
            60
        ))
        .await,
        ["decision.value"]
    );
    let mut long_actor = new(
        pb::DecisionScope::Actor,
        &"a".repeat(1025),
        pb::DecisionType::Ban,
        60,
    );
    long_actor.reason = "too long".into();
    assert_eq!(bad(long_actor).await, ["decision.value"]);
    assert_eq!(
        bad(new(
            pb::DecisionScope::Unspecified,
            "x",
            pb::DecisionType::Ban,
            60
        ))
        .await,
        ["decision.scope"]
    );
    assert_eq!(
        bad(new(
            pb::DecisionScope::Ip,
            "192.0.2.1",
            pb::DecisionType::Ban,
            315_360_001
        ))
        .await,
        ["decision.duration_seconds"]
    );
    let mut no_reason = ban_ip("192.0.2.1", 60);
    no_reason.reason.clear();
    assert_eq!(bad(no_reason).await, ["decision.reason"]);
    let mut no_rate = new(
        pb::DecisionScope::Ip,
        "192.0.2.1",
        pb::DecisionType::Throttle,
        60,
    );
    no_rate.throttle_per_minute = 0;
    assert_eq!(bad(no_rate).await, ["decision.throttle_per_minute"]);
    let mut bad_type = ban_ip("192.0.2.1", 60);
    bad_type.r#type = 99;
    assert_eq!(bad(bad_type).await, ["decision.type"]);
    let mut bad_alert = ban_ip("192.0.2.1", 60);
    bad_alert.alert_id = "nope".into();
    assert_eq!(bad(bad_alert).await, ["decision.alert_id"]);
    let mut long_key = ban_ip("192.0.2.1", 60);
    long_key.idempotency_key = "k".repeat(257);
    assert_eq!(bad(long_key).await, ["decision.idempotency_key"]);
    let batch = vec![
        ban_ip("192.0.2.1", 60),
        ban_ip("192.0.2.2", 60),
        ban_ip("x", 60),
    ];
    let e = client(c)
        .create_decisions(with_key(
            pb::CreateDecisionsRequest { decisions: batch },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["decisions[2].value"]);
    let e = client(c)
        .create_decisions(with_key(
            pb::CreateDecisionsRequest {
                decisions: (0..1001)
                    .map(|i| ban_ip(&format!("10.9.{}.{}", i / 200, i % 200 + 1), 60))
                    .collect(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["decisions"]);
    let e = client(c)
        .check_access(with_key(pb::CheckAccessRequest::default(), &key))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["ip"]);
    let e = client(c)
        .check_access(with_key(
            pb::CheckAccessRequest {
                ip: "999.1.1.1".into(),
                actor: String::new(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["ip"]);
    let e = client(c)
        .watch_decisions(with_key(
            pb::WatchDecisionsRequest {
                after_revision: 0,
                scopes: vec![],
                heartbeat_interval_seconds: 301,
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["heartbeat_interval_seconds"]);
    let e = client(c)
        .list_decisions(with_key(
            pb::ListDecisionsRequest {
                page_size: 1001,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["page_size"]);
    let e = client(c)
        .list_decisions(with_key(
            pb::ListDecisionsRequest {
                value: "192.0.2.1".into(),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["value"]);
    let e = client(c)
        .revoke_decision(with_key(
            pb::RevokeDecisionRequest {
                decision_id: "x".into(),
                reason: String::new(),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(field(e), ["decision_id"]);

    // Idempotency: the same key returns the first decision; another target is refused.
    let mut once = ban_ip("192.0.2.50", 600);
    once.idempotency_key = "run:7:step:1".into();
    let first = create(c, &key, once.clone()).await;
    let again = create(c, &key, once.clone()).await;
    assert!(first.created && !again.created);
    assert_eq!(first.decision, again.decision);
    assert_eq!(first.revision, again.revision);
    once.value = "192.0.2.51".into();
    let err = client(c)
        .create_decision(with_key(
            pb::CreateDecisionRequest {
                decision: Some(once),
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // Listing pages through active decisions, newest first, with filters.
    let list = |req: pb::ListDecisionsRequest| {
        let c = c.clone();
        let key = key.clone();
        async move {
            client(&c)
                .list_decisions(with_key(req, &key))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let page = list(pb::ListDecisionsRequest {
        page_size: 1,
        ..Default::default()
    })
    .await;
    assert_eq!(page.decisions.len(), 1);
    assert_eq!(page.decisions[0].value, "192.0.2.50");
    let rest = list(pb::ListDecisionsRequest {
        page_size: 10,
        page_token: page.next_page_token,
        ..Default::default()
    })
    .await;
    assert_eq!(rest.decisions.len(), 1);
    assert_eq!(rest.decisions[0].id, id);
    assert!(rest.next_page_token.is_empty());
    revoke(c, &key, &id).await;
    let active = list(pb::ListDecisionsRequest::default()).await;
    assert_eq!(active.decisions.len(), 1);
    let all = list(pb::ListDecisionsRequest {
        scope: pb::DecisionScope::Ip as i32,
        value: "203.0.113.9".into(),
        include_inactive: true,
        ..Default::default()
    })
    .await;
    assert_eq!(all.decisions.len(), 1);
    assert_eq!(all.decisions[0].state, pb::DecisionState::Revoked as i32);
    assert_eq!(
        all.decisions[0].origin.as_ref().unwrap().kind,
        pb::DecisionOriginKind::Manual as i32
    );
    assert_eq!(
        all.decisions[0].origin.as_ref().unwrap().id,
        app.key_id(&key).await
    );
}

/// `picket decisions add | list | revoke | check` against a running server.
async fn the_cli_adds_lists_checks_and_revokes(backend: Backend) {
    let (app, key) = app_with_key(backend).await;
    let server = format!("http://{}", app.addr);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .arg("decisions")
            .args(args)
            .args(["--server", &server])
            .env("PICKET_API_KEY", &key)
            .output()
            .expect("run picket");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    let (ok, id, err) = run(&[
        "add",
        "--scope",
        "cidr",
        "--value",
        "198.51.100.0/24",
        "--type",
        "ban",
        "--duration",
        "1h",
        "--reason",
        "scanner",
    ]);
    assert!(ok, "{err}");
    let id = id.trim().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let (ok, out, err) = run(&["check", "--ip", "198.51.100.7"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("deny"), "{out}");
    let (ok, out, err) = run(&["list"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&id) && out.contains("198.51.100.0/24") && out.contains("ban"),
        "{out}"
    );
    let (ok, _, err) = run(&[
        "add",
        "--scope",
        "cidr",
        "--value",
        "198.51.100.7/24",
        "--type",
        "ban",
        "--reason",
        "x",
    ]);
    assert!(!ok);
    assert!(err.contains("decision.value"), "{err}");
    let (ok, out, err) = run(&["revoke", &id, "--reason", "done"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (ok, out, _) = run(&["list"]);
    assert!(ok && !out.contains(&id), "{out}");
    let (ok, out, _) = run(&["list", "--all", "--json"]);
    assert!(ok);
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(line["state"], "revoked");
    let (ok, out, _) = run(&["check", "--ip", "198.51.100.7"]);
    assert!(ok && out.starts_with("allow"), "{out}");
}

crate::both_backends!(
    a_subscriber_killed_at_every_boundary_ends_with_the_server_set,
    overlapping_decisions_resolve_into_one_state,
    expiry_is_delivered_within_a_second,
    stale_or_future_revisions_get_a_fresh_snapshot,
    scopes_tenants_and_limits,
    the_cli_adds_lists_checks_and_revokes,
);

/// Two replicas on one Postgres and Redis, re-reading the store only every
/// 60 s: a decision made through A reaches a WatchDecisions subscriber and
/// CheckAccess on B promptly (only the Redis signal can deliver it), and its
/// expiry is delivered once although both replicas run the expiry task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_reach_the_other_replica_and_expire_once() {
    use crate::common::{RedisProcess, ServerProcess, TestDb, redis_state_becomes};
    let db = TestDb::new(Backend::Postgres).await;
    let redis = RedisProcess::start();
    let url = redis.url();
    let env = [
        ("PICKET_REDIS_URL", url.as_str()),
        ("PICKET_WATCH_POLL_MS", "60000"),
    ];
    let a = ServerProcess::start(&db, &env);
    let b = ServerProcess::start(&db, &env);
    redis_state_becomes(a.addr, "up").await;
    redis_state_becomes(b.addr, "up").await;
    let (ca, cb) = (a.channel().await, b.channel().await);
    let tenant = pb::admin_service_client::AdminServiceClient::new(ca.clone())
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "acme".into(),
                ..Default::default()
            },
            common::OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    let key = pb::admin_service_client::AdminServiceClient::new(ca.clone())
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.id,
                name: "t".into(),
                scopes: vec![pb::Scope::Read as i32, pb::Scope::Respond as i32],
                expires_at: None,
            },
            common::OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    // B loads the tenant's index and a subscriber before the change.
    assert_eq!(
        check(&cb, &key, "203.0.113.1", "").await.verdict,
        pb::Verdict::Allow as i32
    );
    let mut s = watch(&cb, &key, 0).await;
    let mut m = Mirror::default();
    while m.snapshots.is_empty() {
        let item = next(&mut s).await;
        m.apply(item);
    }
    let started = std::time::Instant::now();
    let made = create(&ca, &key, ban_ip("203.0.113.1", 3)).await;
    m.catch_up(&mut s, made.revision).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(m.set.len(), 1);
    // B's CheckAccess follows as promptly.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while check(&cb, &key, "203.0.113.1", "").await.verdict != pb::Verdict::Deny as i32 {
        assert!(
            std::time::Instant::now() < deadline,
            "B's index never saw the ban"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both replicas run the expiry task; the expiry arrives once.
    let mut expired = Vec::new();
    while expired.is_empty() {
        if let Item::Deltas(d) = next(&mut s).await {
            expired.extend(d.deltas);
        }
    }
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].kind, pb::DeltaKind::Expired as i32);
    assert_eq!(expired[0].revision, made.revision + 1);
    // Nothing else follows: the next message is a heartbeat at that revision.
    match next(&mut s).await {
        Item::Heartbeat(h) => assert_eq!(h.revision, made.revision + 1),
        other => panic!("a second expiry or other change: {other:?}"),
    }
    drop(redis);
}
