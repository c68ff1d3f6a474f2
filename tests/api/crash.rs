//! Crash safety: SIGKILL the server process in the middle of a streaming
//! ingest, restart it on the same store, resend every unacknowledged batch with
//! the same keys, and check that every acknowledged event is stored exactly once.

use std::collections::{HashMap, HashSet};

use picket::grpc::pb;
use picket::storage::Backend;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::common::{OPERATOR_TOKEN, ServerProcess, TestDb, with_key};
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
    let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
    let tenant = admin
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "crash".into(),
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
                name: "crash".into(),
                scopes: vec![pb::Scope::Ingest as i32, pb::Scope::Read as i32],
                expires_at: None,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;

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

crate::both_backends!(acked_events_survive_sigkill_exactly_once);
