//! Several replicas: two `picket serve` processes on one Postgres and one
//! Redis. A change committed through replica A reaches a subscriber on
//! replica B through the Redis signal; when Redis dies both keep serving
//! (local subscribers still see local changes at once), and when it returns
//! B catches up from the change log with nothing lost or repeated. With one
//! detection shard exactly one replica runs detection, a tenant rule created
//! through the other reaches it, and the other takes over when it dies.
//!
//! Both servers re-read the store only every 60 s without a signal
//! (`PICKET_WATCH_POLL_MS`), so a delivery within seconds can only come from
//! the Redis signal (or, after an outage, from the reconnect catch-up).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use picket::grpc::pb;
use picket::storage::Backend;
use tonic::transport::Channel;

use crate::common::{
    OPERATOR_TOKEN, RedisProcess, ServerProcess, TestDb, http1, redis_state_becomes, with_key,
};
use crate::ingest::login;
use crate::rules::{db_drop_rule, drop_event};

type Incidents = pb::incident_service_client::IncidentServiceClient<Channel>;

/// Far longer than any wait below: only a signal delivers sooner.
const POLL_MS: &str = "60000";
/// What "promptly" means for a signalled delivery on a loaded CI machine.
const PROMPT: Duration = Duration::from_secs(5);
/// Upper bound for any single wait in this test.
const DEADLINE: Duration = Duration::from_secs(30);

/// The value of gauge `name` on `addr`'s `/metrics`, if exported.
pub(crate) async fn gauge(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, _, body) = http1(addr, "GET", "/metrics", &[], vec![]).await;
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        })
}

/// Opens WatchIncidents and reads through the (empty) snapshot.
pub(crate) async fn watch(
    channel: Channel,
    key: &str,
) -> tonic::Streaming<pb::WatchIncidentsResponse> {
    let mut s = Incidents::new(channel)
        .watch_incidents(with_key(
            pb::WatchIncidentsRequest {
                filter: None,
                options: Some(pb::WatchOptions {
                    after_cursor: String::new(),
                    heartbeat_interval_seconds: 1,
                }),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    loop {
        let item = s.message().await.unwrap().expect("stream ended");
        if let Some(pb::watch_incidents_response::Item::SnapshotComplete(_)) = item.item {
            return s;
        }
    }
}

/// The next change on `s` as (incident id, kind, cursor), within [`DEADLINE`].
pub(crate) async fn next_change(
    s: &mut tonic::Streaming<pb::WatchIncidentsResponse>,
) -> (String, i32, String) {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let item = s.message().await.unwrap().expect("stream ended");
            if let Some(pb::watch_incidents_response::Item::Change(c)) = item.item {
                return (c.incident.unwrap().id, c.kind, item.cursor);
            }
        }
    })
    .await
    .expect("no change arrived in time")
}

pub(crate) async fn create(channel: Channel, key: &str, title: &str) -> String {
    Incidents::new(channel)
        .create_incident(with_key(
            pb::CreateIncidentRequest {
                title: title.into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
        .incident
        .unwrap()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_changes_through_redis_and_survive_its_outage() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut redis = RedisProcess::start();
    let url = redis.url();
    // One detection shard: exactly one replica leads it (shared detection
    // over many shards is `shards.rs`).
    let env = [
        ("PICKET_REDIS_URL", url.as_str()),
        ("PICKET_WATCH_POLL_MS", POLL_MS),
        ("PICKET_DETECT_SHARDS", "1"),
    ];
    let mut a = ServerProcess::start(&db, &env);
    let mut b = ServerProcess::start(&db, &env);
    redis_state_becomes(a.addr, "up").await;
    redis_state_becomes(b.addr, "up").await;
    let (ca, cb) = (a.channel().await, b.channel().await);

    let tenant = pb::admin_service_client::AdminServiceClient::new(ca.clone())
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "replicas".into(),
                ..Default::default()
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    let key = pb::admin_service_client::AdminServiceClient::new(cb.clone())
        .create_api_key(with_key(
            pb::CreateApiKeyRequest {
                tenant_id: tenant.id,
                name: "replicas".into(),
                scopes: vec![
                    pb::Scope::Admin as i32,
                    pb::Scope::Ingest as i32,
                    pb::Scope::Read as i32,
                    pb::Scope::Respond as i32,
                ],
                expires_at: None,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;

    let mut on_a = watch(ca.clone(), &key).await;
    let mut on_b = watch(cb.clone(), &key).await;

    // 1. A change through A reaches B's subscriber through the signal.
    let started = Instant::now();
    let first = create(ca.clone(), &key, "through A").await;
    let (id, kind, c1) = next_change(&mut on_b).await;
    assert_eq!(
        (id.as_str(), kind),
        (first.as_str(), pb::IncidentChangeKind::Created as i32)
    );
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    assert_eq!(next_change(&mut on_a).await.0, first);

    // Events too: a tail on B sees an event ingested through A.
    let mut tail = pb::ingest_service_client::IngestServiceClient::new(cb.clone())
        .tail_events(with_key(
            pb::TailEventsRequest {
                filter: None,
                options: Some(pb::WatchOptions {
                    after_cursor: String::new(),
                    heartbeat_interval_seconds: 1,
                }),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    // The first heartbeat shows the tail is open (it starts at the head).
    loop {
        let item = tail.message().await.unwrap().expect("tail ended");
        if let Some(pb::tail_events_response::Item::Heartbeat(_)) = item.item {
            break;
        }
    }
    let started = Instant::now();
    pb::ingest_service_client::IngestServiceClient::new(ca.clone())
        .ingest(with_key(
            pb::IngestRequest {
                events: vec![login("replica-event-1", "alice", "10.1.2.3", true)],
            },
            &key,
        ))
        .await
        .unwrap();
    let event = tokio::time::timeout(DEADLINE, async {
        loop {
            let item = tail.message().await.unwrap().expect("tail ended");
            if let Some(pb::tail_events_response::Item::Event(e)) = item.item {
                return e;
            }
        }
    })
    .await
    .expect("the event never reached B's tail");
    assert_eq!(event.idempotency_key, "replica-event-1");
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());

    // 2. Redis dies: both replicas keep serving; A's own subscriber still
    //    sees A's change at once.
    redis.stop();
    redis_state_becomes(a.addr, "down").await;
    redis_state_becomes(b.addr, "down").await;
    let during = create(ca.clone(), &key, "during the outage").await;
    let started = Instant::now();
    assert_eq!(next_change(&mut on_a).await.0, during);
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    let listed = Incidents::new(cb.clone())
        .list_incidents(with_key(pb::ListIncidentsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .incidents;
    assert!(listed.iter().any(|i| i.id == during), "B serves reads");

    // 3. Redis returns: B resubscribes and catches up from the change log,
    //    then signals flow again.
    let started = Instant::now();
    redis.restart();
    let (id, _, c2) = next_change(&mut on_b).await;
    assert_eq!(
        id, during,
        "B caught up with the change made during the outage"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "caught up only after {:?}",
        started.elapsed()
    );
    redis_state_becomes(a.addr, "up").await;
    let after = create(ca.clone(), &key, "after the outage").await;
    let started = Instant::now();
    let (id, _, c3) = next_change(&mut on_b).await;
    assert_eq!(id, after);
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    assert!(c1 != c2 && c2 != c3 && c1 != c3, "cursors are distinct");

    // A resumed subscriber on B, from the first cursor, gets exactly the rest.
    let mut resumed = Incidents::new(cb.clone())
        .watch_incidents(with_key(
            pb::WatchIncidentsRequest {
                filter: None,
                options: Some(pb::WatchOptions {
                    after_cursor: c1,
                    heartbeat_interval_seconds: 1,
                }),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_change(&mut resumed).await.0, during);
    assert_eq!(next_change(&mut resumed).await.0, after);

    // 4. Exactly one replica runs detection; when it dies the other takes over.
    let started = Instant::now();
    let (leader_a, leader_b) = loop {
        let (x, y) = (
            gauge(a.addr, "picket_detection_leader").await,
            gauge(b.addr, "picket_detection_leader").await,
        );
        if let (Some(x), Some(y)) = (x, y) {
            break (x, y);
        }
        assert!(
            started.elapsed() < DEADLINE,
            "leadership never settled: A {x:?}, B {y:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(leader_a + leader_b, 1.0, "exactly one leader");

    // A tenant rule created through the follower reaches the leader's
    // detection through Redis (the follower's own pipeline is not running).
    let follower = if leader_a == 1.0 {
        cb.clone()
    } else {
        ca.clone()
    };
    pb::admin_service_client::AdminServiceClient::new(follower.clone())
        .create_rule(with_key(
            pb::CreateRuleRequest {
                tenant_id: String::new(),
                sigma_yaml: db_drop_rule("Table dropped"),
                enabled: true,
            },
            &key,
        ))
        .await
        .unwrap();
    let mut alerts = pb::alert_service_client::AlertServiceClient::new(follower.clone())
        .watch_alerts(with_key(pb::WatchAlertsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner();
    // A rule applies to events processed after it loads, and the rule and the
    // event travel as separate signals: send drops until one is detected.
    let started = Instant::now();
    let mut n = 0;
    let alert = loop {
        n += 1;
        pb::ingest_service_client::IngestServiceClient::new(follower.clone())
            .ingest(with_key(
                pb::IngestRequest {
                    events: vec![drop_event(&format!("drop-{n}"))],
                },
                &key,
            ))
            .await
            .unwrap();
        let next = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                let item = alerts.message().await.unwrap().expect("alerts ended");
                if let Some(pb::watch_alerts_response::Item::Alert(a)) = item.item {
                    return a;
                }
            }
        })
        .await;
        if let Ok(a) = next {
            break a;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the leader never applied the rule"
        );
    };
    assert_eq!(alert.title, "Table dropped");
    let (dying, survivor) = if leader_a == 1.0 {
        (&mut a, b.addr)
    } else {
        (&mut b, a.addr)
    };
    dying.child.kill().unwrap();
    dying.child.wait().unwrap();
    wait_leader(survivor).await;
}

/// Waits until `addr` reports that it runs detection.
async fn wait_leader(addr: SocketAddr) {
    let started = Instant::now();
    while gauge(addr, "picket_detection_leader").await != Some(1.0) {
        assert!(
            started.elapsed() < DEADLINE,
            "{addr} never took over detection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
