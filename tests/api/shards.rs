//! Detection shared across replicas by tenant: `picket serve` processes on
//! one Postgres split the 64 detection shards among themselves, every
//! tenant's brute-force burst is alerted exactly once (one alert, one
//! occurrence) whichever replica ingested it and whichever leads its shard,
//! a replica that joins takes its share from the others (which hand shards
//! over only after their alerts are committed), and when a replica is killed
//! the others take its shards over within seconds and raise, by replay,
//! exactly what it had not committed.
//!
//! Each round sends every tenant one burst of failed logins from a fresh IP,
//! so after round `r` every tenant must hold exactly `r` alerts, one per
//! round's IP, each with one occurrence: a burst evaluated twice (by two
//! leaders, or live and again by a takeover's replay) would show as a second
//! alert or a second occurrence.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use picket::grpc::pb;
use picket::storage::Backend;
use tonic::transport::Channel;

use crate::common::{
    OPERATOR_TOKEN, RedisProcess, ServerProcess, TestDb, http1, spawn_with, test_settings, with_key,
};
use crate::ingest::login;
use crate::replicas::gauge;

/// Shards in all (the default).
const SHARDS: u64 = 64;
/// Tenants, each with its own key.
const TENANTS: usize = 30;
/// Failed logins per burst: above 5 from one IP for one account, so two
/// rules fire (a burst from one source IP, a burst for one account).
const BURST: usize = 8;
/// Alerts one burst raises.
const PER_BURST: usize = 2;
/// Upper bound for any single wait.
const DEADLINE: Duration = Duration::from_secs(40);
/// What "within seconds" means for a hand-over on a loaded CI machine.
const HANDOVER: Duration = Duration::from_secs(15);

struct Tenant {
    key: String,
}

/// Shards `addr` leads, from `/healthz` (`None` while it reports none yet).
async fn shards_led(addr: SocketAddr) -> u64 {
    let (_, _, body) = http1(addr, "GET", "/healthz", &[], vec![]).await;
    let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
    health["detect_shards"].as_u64().unwrap_or(0)
}

/// The sum of every series of counter `name` on `addr`'s `/metrics`.
async fn counter(addr: SocketAddr, name: &str) -> f64 {
    let (_, _, body) = http1(addr, "GET", "/metrics", &[], vec![]).await;
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `replicas` lead every shard between them, each its fair share
/// (`ceil(64 / replicas)` at most, so none is idle), as `/healthz` and the
/// `picket_detection_shards_led` gauge report; returns the split.
async fn wait_spread(replicas: &[SocketAddr]) -> Vec<u64> {
    let share = SHARDS.div_ceil(replicas.len() as u64);
    let started = Instant::now();
    loop {
        let mut led = Vec::new();
        let mut gauges = Vec::new();
        for addr in replicas {
            led.push(shards_led(*addr).await);
            gauges.push(gauge(*addr, "picket_detection_shards_led").await);
        }
        let settled = led.iter().sum::<u64>() == SHARDS
            && led.iter().all(|n| (1..=share).contains(n))
            && gauges.iter().zip(&led).all(|(g, n)| *g == Some(*n as f64));
        if settled {
            return led;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the shards never spread over {} replicas: {led:?} (gauges {gauges:?})",
            replicas.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates `n` tenants named `prefix-i`, each with a key.
async fn create_tenants(channel: Channel, prefix: &str, n: usize) -> Vec<Tenant> {
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
    let mut tenants = Vec::new();
    for i in 0..n {
        let tenant = admin
            .create_tenant(with_key(
                pb::CreateTenantRequest {
                    name: format!("{prefix}-{i}"),
                    ..Default::default()
                },
                OPERATOR_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner()
            .tenant
            .unwrap();
        let key = admin
            .create_api_key(with_key(
                pb::CreateApiKeyRequest {
                    tenant_id: tenant.id,
                    name: "shards".into(),
                    scopes: vec![pb::Scope::Ingest as i32, pb::Scope::Read as i32],
                    expires_at: None,
                },
                OPERATOR_TOKEN,
            ))
            .await
            .unwrap()
            .into_inner()
            .secret;
        tenants.push(Tenant { key });
    }
    tenants
}

/// The source IP of tenant `i`'s burst in round `round`.
fn ip(round: usize, i: usize) -> String {
    format!("10.{round}.{}.{}", i / 200, i % 200 + 1)
}

/// The account tenant `i`'s burst in round `round` targets.
fn actor(round: usize, i: usize) -> String {
    format!("victim-{round}-{i}")
}

/// Sends every tenant its burst of round `round`, tenant `i` through
/// `through[i % len]` (so the ingesting replica is often not the leader).
async fn send_round(through: &[Channel], tenants: &[Tenant], round: usize) {
    for (i, t) in tenants.iter().enumerate() {
        let events = (0..BURST)
            .map(|n| {
                login(
                    &format!("r{round}-t{i}-{n}"),
                    &actor(round, i),
                    &ip(round, i),
                    false,
                )
            })
            .collect();
        let reply =
            pb::ingest_service_client::IngestServiceClient::new(through[i % through.len()].clone())
                .ingest(with_key(pb::IngestRequest { events }, &t.key))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(reply.accepted as usize, BURST);
    }
}

/// Tenant `t`'s alerts, read through `channel`.
async fn alerts(channel: Channel, t: &Tenant) -> Vec<pb::Alert> {
    pb::alert_service_client::AlertServiceClient::new(channel)
        .list_alerts(with_key(
            pb::ListAlertsRequest {
                page_size: 1000,
                ..Default::default()
            },
            &t.key,
        ))
        .await
        .unwrap()
        .into_inner()
        .alerts
}

/// Waits until every tenant has the alerts of rounds `1..=rounds`, then
/// checks each has exactly those ([`PER_BURST`] per round, naming the
/// round's IP and account), each with one occurrence.
async fn wait_alerted(channel: Channel, tenants: &[Tenant], rounds: usize) {
    let started = Instant::now();
    for (i, t) in tenants.iter().enumerate() {
        let got = loop {
            let got = alerts(channel.clone(), t).await;
            if got.len() >= rounds * PER_BURST {
                break got;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "tenant {i}: {} alerts after {rounds} rounds",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let titles: Vec<&str> = got.iter().map(|a| a.title.as_str()).collect();
        assert_eq!(
            got.len(),
            rounds * PER_BURST,
            "tenant {i}: {PER_BURST} alerts per burst: {titles:?}"
        );
        let named = |kind: pb::EntityKind| -> BTreeSet<String> {
            got.iter()
                .flat_map(|a| a.entities.iter())
                .filter(|e| e.kind == kind as i32)
                .map(|e| e.value.clone())
                .collect()
        };
        let want_ips: BTreeSet<String> = (1..=rounds).map(|r| ip(r, i)).collect();
        let want_actors: BTreeSet<String> = (1..=rounds).map(|r| actor(r, i)).collect();
        assert_eq!(
            named(pb::EntityKind::Ip),
            want_ips,
            "tenant {i}: each round's burst"
        );
        assert_eq!(
            named(pb::EntityKind::Actor),
            want_actors,
            "tenant {i}: each round's burst"
        );
        for a in &got {
            assert_eq!(
                a.occurrence_count, 1,
                "tenant {i}: a burst counted twice ({})",
                a.title
            );
        }
    }
}

/// Kills `victim` (SIGKILL) and waits until `survivors` lead every shard;
/// returns how long the hand-over took.
async fn kill_and_wait_handover(victim: &mut ServerProcess, survivors: &[SocketAddr]) -> Duration {
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let killed = Instant::now();
    wait_spread(survivors).await;
    let took = killed.elapsed();
    assert!(took < HANDOVER, "the dead replica's shards took {took:?}");
    took
}

/// Two replicas without Redis: the second takes half the shards from the
/// first while bursts are being detected, then the first is killed with
/// bursts in flight and the second takes everything over. Without Redis a
/// replica hears of another's ingest only by polling the store, and of
/// tenants created after it took their shard only by looking for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_detection_and_take_over_on_a_kill() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut a = ServerProcess::start(&db, &[]);
    assert_eq!(
        wait_spread(&[a.addr]).await,
        vec![SHARDS],
        "alone, A leads every shard"
    );
    let ca = a.channel().await;
    let tenants = create_tenants(ca.clone(), "tenant", TENANTS).await;

    // Round 1 on A alone.
    send_round(std::slice::from_ref(&ca), &tenants, 1).await;
    wait_alerted(ca.clone(), &tenants, 1).await;

    // Round 2 goes in while B joins: A hands half its shards over.
    send_round(std::slice::from_ref(&ca), &tenants, 2).await;
    let b = ServerProcess::start(&db, &[]);
    let cb = b.channel().await;
    assert_eq!(wait_spread(&[a.addr, b.addr]).await, vec![32, 32]);
    wait_alerted(cb.clone(), &tenants, 2).await;

    // Tenants created now, with their events ingested through A only: B
    // never hears of those of its shards but by looking for new tenants.
    let late = create_tenants(ca.clone(), "late", 6).await;
    send_round(std::slice::from_ref(&ca), &late, 1).await;
    wait_alerted(cb.clone(), &late, 1).await;

    // Round 3 through both, then A dies with it in flight.
    send_round(&[ca.clone(), cb.clone()], &tenants, 3).await;
    kill_and_wait_handover(&mut a, &[b.addr]).await;
    wait_alerted(cb.clone(), &tenants, 3).await;

    // Round 4 on B alone.
    send_round(std::slice::from_ref(&cb), &tenants, 4).await;
    wait_alerted(cb.clone(), &tenants, 4).await;
    drop(b);
}

/// Three replicas with Redis: the shards spread over all three and each
/// raises alerts for its own tenants; one is killed with bursts in flight
/// and the other two share its shards; then one of those loses its lock
/// connection without dying, hands everything over and joins again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_detection_and_take_over_on_a_kill() {
    let db = TestDb::new(Backend::Postgres).await;
    let redis = RedisProcess::start();
    let url = redis.url();
    let env = [("PICKET_REDIS_URL", url.as_str())];
    let mut replicas = [
        ServerProcess::start(&db, &env),
        ServerProcess::start(&db, &env),
        ServerProcess::start(&db, &env),
    ];
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    wait_spread(&addrs).await;
    let mut channels = Vec::new();
    for r in &replicas {
        channels.push(r.channel().await);
    }
    let tenants = create_tenants(channels[0].clone(), "tenant", TENANTS).await;

    send_round(&channels, &tenants, 1).await;
    wait_alerted(channels[1].clone(), &tenants, 1).await;
    // Each replica raised its own tenants' alerts (30 tenants over three
    // thirds of the shards: none is left without one but by a 5e-6 chance).
    for addr in &addrs {
        assert!(
            counter(*addr, "picket_alerts_raised_total").await >= 1.0,
            "{addr} raised no alert: detection is not shared"
        );
    }

    // Round 2 goes in, then the middle replica dies.
    send_round(&channels, &tenants, 2).await;
    kill_and_wait_handover(&mut replicas[1], &[addrs[0], addrs[2]]).await;
    let survivors = [channels[0].clone(), channels[2].clone()];
    wait_alerted(survivors[0].clone(), &tenants, 2).await;

    send_round(&survivors, &tenants, 3).await;
    wait_alerted(survivors[1].clone(), &tenants, 3).await;

    // One survivor's lock connection fails while it keeps running: it stops
    // detecting, the other takes every shard, then it joins again and gets
    // its share back. Still every burst once: the replica that lost its
    // locks evaluates nothing of its old shards.
    let survivor_addrs = [addrs[0], addrs[2]];
    let terminated: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
         AND granted AND objsubid = 2 AND classid::int8 = $1 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         LIMIT 1",
    )
    .bind(0x7069_6b01_i64)
    .fetch_one(&sqlx::PgPool::connect(&db.url).await.unwrap())
    .await
    .unwrap();
    assert!(terminated);
    let started = Instant::now();
    loop {
        let mut lost = 0.0;
        for addr in &survivor_addrs {
            lost += counter(*addr, "picket_detection_shards_lost_total").await;
        }
        if lost >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no replica noticed its lost locks"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_spread(&survivor_addrs).await;
    send_round(&survivors, &tenants, 4).await;
    wait_alerted(survivors[0].clone(), &tenants, 4).await;
}

/// One process (SQLite, or a single replica on Postgres) leads every shard,
/// whatever their count, and evaluates every tenant as before shards.
async fn one_process_leads_every_shard(backend: Backend) {
    for shards in [64, 5] {
        let db = TestDb::new(backend).await;
        let mut settings = test_settings(&db);
        settings.detect_shards = shards;
        // As a served process: a burst fires once (the tests' 0 lets every
        // firing through, which folds as extra occurrences).
        settings.detect_refire_seconds = 60;
        let app = spawn_with(db, settings).await;
        let started = Instant::now();
        while shards_led(app.addr).await != u64::from(shards) {
            assert!(
                started.elapsed() < DEADLINE,
                "never led all {shards} shards"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let tenants = create_tenants(app.channel.clone(), "alone", 4).await;
        send_round(std::slice::from_ref(&app.channel), &tenants, 1).await;
        wait_alerted(app.channel.clone(), &tenants, 1).await;
    }
}

crate::both_backends!(one_process_leads_every_shard);
