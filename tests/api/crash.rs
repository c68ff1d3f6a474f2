//! Crash safety: SIGKILL the server process in the middle of a streaming
//! ingest, restart it on the same store, resend every unacknowledged batch with
//! the same keys, and check that every acknowledged event is stored exactly once.

use std::collections::{HashMap, HashSet};

use picket::grpc::pb;
use picket::storage::Backend;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::common::{self, ServerProcess, TestDb, with_key};
use crate::ingest::login;

const BATCHES: u64 = 60;
const PER_BATCH: usize = 200;

fn batch(seq: u64) -> pb::IngestStreamRequest {
    pb::IngestStreamRequest {
        sequence: seq,
        events: (0..PER_BATCH)
            .map(|i| {
                login(
                    &format!("crash-{seq}-{i}"),
                    &format!("u{i}"),
                    "10.9.9.9",
                    i % 2 == 0,
                )
            })
            .collect(),
    }
}

async fn acked_events_survive_sigkill_exactly_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut server = ServerProcess::start(&db, &[]);
    let channel = server.channel().await;
    let (_, key) =
        common::tenant_with_key(&channel, "crash", &[pb::Scope::Ingest, pb::Scope::Read]).await;

    // First run: send everything with up to 8 batches in flight; kill -9 after some acks.
    let (tx, rx) = mpsc::channel(8);
    let mut acks = pb::ingest_service_client::IngestServiceClient::new(channel)
        .ingest_stream(with_key(ReceiverStream::new(rx), &key))
        .await
        .unwrap()
        .into_inner();
    let sender = tokio::spawn(async move {
        for seq in 1..=BATCHES {
            if tx.send(batch(seq)).await.is_err() {
                break;
            }
        }
    });
    // event id acknowledged per idempotency key
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut acked_batches = HashSet::new();
    while acked_batches.len() < 10 {
        let ack = acks.message().await.unwrap().expect("stream open");
        for r in &ack.receipts {
            acked.insert(
                format!("crash-{}-{}", ack.sequence, r.index),
                r.event_id.clone(),
            );
        }
        acked_batches.insert(ack.sequence);
    }
    server.child.kill().expect("SIGKILL"); // SIGKILL on Unix: no shutdown path runs
    server.child.wait().unwrap();
    // Whatever else arrives is the connection failing; no more acks count.
    while let Ok(Some(ack)) = acks.message().await {
        for r in &ack.receipts {
            acked.insert(
                format!("crash-{}-{}", ack.sequence, r.index),
                r.event_id.clone(),
            );
        }
        acked_batches.insert(ack.sequence);
    }
    sender.abort();
    assert!(
        acked_batches.len() < BATCHES as usize,
        "the kill came too late to test anything"
    );

    // Restart on the same store and resend every unacknowledged batch.
    let server = ServerProcess::start(&db, &[]);
    let channel = server.channel().await;
    let resend: Vec<_> = (1..=BATCHES)
        .filter(|s| !acked_batches.contains(s))
        .map(batch)
        .collect();
    let expected_acks = resend.len();
    let mut acks = pb::ingest_service_client::IngestServiceClient::new(channel.clone())
        .ingest_stream(with_key(tokio_stream::iter(resend), &key))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(ack) = acks.message().await.unwrap() {
        assert_eq!(ack.rejected, 0);
        n += 1;
    }
    assert_eq!(n, expected_acks);

    // Every event is stored exactly once; acknowledged ones kept their ids.
    let mut stored: HashMap<String, String> = HashMap::new();
    let mut token = String::new();
    loop {
        let page = pb::ingest_service_client::IngestServiceClient::new(channel.clone())
            .query_events(with_key(
                pb::QueryEventsRequest {
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                },
                &key,
            ))
            .await
            .unwrap()
            .into_inner();
        for e in page.events {
            assert!(
                stored.insert(e.idempotency_key.clone(), e.id).is_none(),
                "{} stored twice",
                e.idempotency_key
            );
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(stored.len(), BATCHES as usize * PER_BATCH);
    for (k, id) in &acked {
        assert_eq!(
            stored.get(k),
            Some(id),
            "acknowledged event {k} lost or changed id"
        );
    }
}

/// Waits until the server's detection leads its shards.
async fn wait_detecting(server: &ServerProcess) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, _, body) = crate::common::http1(server.addr, "GET", "/healthz", &[], vec![]).await;
        let h: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if h["detect_shards"].as_u64().is_some_and(|n| n > 0) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "detection never led: {h}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every alert of the tenant.
async fn all_alerts(channel: &tonic::transport::Channel, key: &str) -> Vec<pb::Alert> {
    let mut c = pb::alert_service_client::AlertServiceClient::new(channel.clone());
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let page = c
            .list_alerts(with_key(
                pb::ListAlertsRequest {
                    page_size: 500,
                    page_token: token.clone(),
                    ..Default::default()
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
        out.extend(page.alerts);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// Every incident of the tenant.
async fn all_incidents(channel: &tonic::transport::Channel, key: &str) -> Vec<pb::Incident> {
    let mut c = pb::incident_service_client::IncidentServiceClient::new(channel.clone());
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let page = c
            .list_incidents(with_key(
                pb::ListIncidentsRequest {
                    page_size: 500,
                    page_token: token.clone(),
                    ..Default::default()
                },
                key,
            ))
            .await
            .unwrap()
            .into_inner();
        out.extend(page.incidents);
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// The alerts an incident lists (GetIncident).
async fn members(channel: &tonic::transport::Channel, key: &str, id: &str) -> HashSet<String> {
    pb::incident_service_client::IncidentServiceClient::new(channel.clone())
        .get_incident(with_key(
            pb::GetIncidentRequest {
                incident_id: id.into(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner()
        .alerts
        .into_iter()
        .map(|a| a.id)
        .collect()
}

/// Alerts and incidents agree: every alert pointing at an incident is
/// listed by it (and by no other incident still active), and an incident's
/// alert count is what it lists.
async fn consistent(
    channel: &tonic::transport::Channel,
    key: &str,
    alerts: &[pb::Alert],
    incidents: &[pb::Incident],
) {
    let mut holder: HashMap<String, String> = HashMap::new();
    for i in incidents.iter().filter(|i| i.merged_into_id.is_empty()) {
        let listed = members(channel, key, &i.id).await;
        assert_eq!(listed.len() as u32, i.alert_count, "incident {}", i.id);
        for a in listed {
            assert!(
                holder.insert(a.clone(), i.id.clone()).is_none(),
                "alert {a} in two incidents"
            );
        }
    }
    for a in alerts.iter().filter(|a| !a.incident_id.is_empty()) {
        assert_eq!(
            holder.get(&a.id),
            Some(&a.incident_id),
            "alert {} points at an incident that does not list it",
            a.id
        );
    }
}

/// SIGKILL while detection raises the alerts of 40 bursts, and again while
/// incidents are being merged: after each restart every burst has exactly
/// one brute-force alert (none lost, none raised twice), and every merge
/// happened whole or not at all (a merged source is closed into its target,
/// which lists its alerts, and its alerts point at the target; an unmerged
/// one keeps its alerts).
async fn kills_during_detection_and_merges_leave_nothing_half_done(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut server = ServerProcess::start(&db, &[]);
    let channel = server.channel().await;
    let (_, key) = common::tenant_with_key(
        &channel,
        "kills",
        &[pb::Scope::Ingest, pb::Scope::Read, pb::Scope::Respond],
    )
    .await;
    wait_detecting(&server).await;
    let bursts = 40;
    let ip = |k: usize| format!("198.18.{}.{}", k / 200, 1 + k % 200);
    let events: Vec<pb::Event> = (0..bursts)
        .flat_map(|k| {
            (0..8).map(move |i| {
                login(
                    &format!("burst{k}-{i}"),
                    &format!("victim{k}"),
                    &ip(k),
                    false,
                )
            })
        })
        .collect();
    let r = pb::ingest_service_client::IngestServiceClient::new(channel.clone())
        .ingest(with_key(pb::IngestRequest { events }, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted as usize, bursts * 8);
    // Kill once the first alerts are there, while the rest are being raised.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while all_alerts(&channel, &key).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no alert raised");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let killed_at = all_alerts(&channel, &key).await.len();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    server = ServerProcess::start(&db, &[]);
    let channel = server.channel().await;
    wait_detecting(&server).await;
    // Every burst alerted, once per rule and address.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let alerts = loop {
        let alerts = all_alerts(&channel, &key).await;
        let named: HashSet<String> = alerts
            .iter()
            .flat_map(|a| a.entities.iter().map(|e| e.value.clone()))
            .collect();
        if (0..bursts).all(|k| named.contains(&ip(k))) {
            break alerts;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bursts never alerted after the restart ({killed_at} alerts before the kill)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for a in &alerts {
        for e in a.entities.iter().filter(|e| e.value.starts_with("198.18.")) {
            *per.entry((a.source_name.clone(), e.value.clone()))
                .or_default() += 1;
        }
    }
    for ((rule, addr), n) in &per {
        assert_eq!(*n, 1, "{rule} raised {n} alerts for {addr}");
    }
    // Incidents settle (correlation runs after raising).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (incidents, alerts) = loop {
        let alerts = all_alerts(&channel, &key).await;
        if alerts.iter().all(|a| !a.incident_id.is_empty()) {
            let incidents = all_incidents(&channel, &key).await;
            consistent(&channel, &key, &alerts, &incidents).await;
            break (incidents, alerts);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alerts never correlated: {:?}",
            alerts
                .iter()
                .filter(|a| a.incident_id.is_empty())
                .map(|a| (&a.source_name, a.severity, &a.title))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(incidents.len() >= 10, "{} incidents", incidents.len());
    let mut held: HashMap<String, Vec<String>> = HashMap::new();
    for a in &alerts {
        held.entry(a.incident_id.clone())
            .or_default()
            .push(a.id.clone());
    }

    // Merges in flight when the process is killed.
    let ids: Vec<String> = incidents.iter().map(|i| i.id.clone()).collect();
    let pairs: Vec<(String, String)> = (0..ids.len() / 2)
        .map(|k| (ids[2 * k].clone(), ids[2 * k + 1].clone()))
        .collect();
    let mut merges = tokio::task::JoinSet::new();
    for (target, source) in pairs.clone() {
        let (channel, key) = (channel.clone(), key.clone());
        merges.spawn(async move {
            pb::incident_service_client::IncidentServiceClient::new(channel)
                .merge_incidents(with_key(
                    pb::MergeIncidentsRequest {
                        target_incident_id: target,
                        source_incident_ids: vec![source],
                    },
                    &key,
                ))
                .await
                .is_ok()
        });
    }
    // The first answer, then the kill.
    let first = merges.join_next().await.unwrap().unwrap();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    while merges.join_next().await.is_some() {}
    server = ServerProcess::start(&db, &[]);
    let channel = server.channel().await;
    let alerts = all_alerts(&channel, &key).await;
    let incidents = all_incidents(&channel, &key).await;
    consistent(&channel, &key, &alerts, &incidents).await;
    let by_id: HashMap<&str, &pb::Incident> =
        incidents.iter().map(|i| (i.id.as_str(), i)).collect();
    let points_at: HashMap<&str, &str> = alerts
        .iter()
        .map(|a| (a.id.as_str(), a.incident_id.as_str()))
        .collect();
    let mut merged = 0;
    for (target, source) in &pairs {
        let s = by_id[source.as_str()];
        let want = if s.merged_into_id.is_empty() {
            source
        } else {
            merged += 1;
            assert_eq!(&s.merged_into_id, target);
            assert_eq!(s.status, pb::IncidentStatus::Closed as i32);
            target
        };
        // Whole or nothing: every alert the source held points one way.
        for a in held.get(source).into_iter().flatten() {
            assert_eq!(
                points_at[a.as_str()],
                want.as_str(),
                "alert {a} of {source}"
            );
        }
    }
    assert!(
        !first || merged >= 1,
        "the merge answered before the kill is not there"
    );
}

crate::both_backends!(
    acked_events_survive_sigkill_exactly_once,
    kills_during_detection_and_merges_leave_nothing_half_done
);
