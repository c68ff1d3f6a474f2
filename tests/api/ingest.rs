//! IngestService: receipts, idempotency, durable acks, backpressure, the audit
//! query, the live tail and retention.

use std::collections::HashSet;

use chrono::{Duration, Utc};
use picket::grpc::pb;
use picket::storage::Backend;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{self, RawCodec, TestApp, spawn_app, with_key};

fn ts(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A valid login event.
pub fn login(key: &str, actor: &str, ip: &str, ok: bool) -> pb::Event {
    pb::Event {
        occurred_at: Some(ts(Utc::now())),
        event_type: "user.login".into(),
        idempotency_key: key.into(),
        actor: actor.into(),
        action: "login".into(),
        resource: "/auth/login".into(),
        outcome: if ok {
            pb::Outcome::Success
        } else {
            pb::Outcome::Failure
        } as i32,
        source_ip: ip.into(),
        ..Default::default()
    }
}

async fn ingest(
    app: &TestApp,
    key: &str,
    events: Vec<pb::Event>,
) -> Result<pb::IngestResponse, tonic::Status> {
    app.ingest()
        .ingest(with_key(pb::IngestRequest { events }, key))
        .await
        .map(|r| r.into_inner())
}

async fn mixed_batches_get_one_receipt_per_event(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let mut bad_ip = login("k-bad-ip", "alice", "300.1.1.1", true);
    bad_ip.idempotency_key = "k2".into();
    let mut bad_time = login("k3", "alice", "10.0.0.1", true);
    bad_time.occurred_at = Some(ts(Utc::now() + Duration::hours(1)));
    let mut bad_enum = login("k4", "alice", "10.0.0.1", true);
    bad_enum.severity = 99;
    let mut big_attr = login("k5", "alice", "10.0.0.1", true);
    big_attr.attributes.insert("note".into(), "x".repeat(5000));
    let mut bad_type = login("k6", "alice", "10.0.0.1", true);
    bad_type.event_type = "User Login".into();
    let r = ingest(
        &app,
        &key,
        vec![
            login("k1", "alice", "10.0.0.1", true),
            bad_ip,
            bad_time,
            bad_enum,
            big_attr,
            bad_type,
            login("k1", "alice", "10.0.0.1", true),
            login("", "bob", "::ffff:10.0.0.2", false),
        ],
    )
    .await
    .unwrap();
    assert_eq!((r.accepted, r.duplicates, r.rejected), (2, 1, 5));
    let st = |i: usize| pb::ReceiptStatus::try_from(r.receipts[i].status).unwrap();
    assert_eq!(
        r.receipts.iter().map(|x| x.index).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    assert_eq!(st(0), pb::ReceiptStatus::Accepted);
    for (i, field) in [
        (1, "source_ip"),
        (2, "occurred_at"),
        (3, "severity"),
        (4, "attributes[\"note\"]"),
        (5, "event_type"),
    ] {
        assert_eq!(st(i), pb::ReceiptStatus::Rejected, "{i}");
        assert_eq!(r.receipts[i].field_path, field);
        assert!(!r.receipts[i].reason.is_empty());
        assert!(r.receipts[i].event_id.is_empty());
    }
    // The same key later in the same batch is a duplicate of the first.
    assert_eq!(st(6), pb::ReceiptStatus::Duplicate);
    assert_eq!(r.receipts[6].event_id, r.receipts[0].event_id);
    assert_eq!(st(7), pb::ReceiptStatus::Accepted);

    // And across batches.
    let again = ingest(&app, &key, vec![login("k1", "alice", "10.0.0.1", true)])
        .await
        .unwrap();
    assert_eq!(
        again.receipts[0].status,
        pb::ReceiptStatus::Duplicate as i32
    );
    assert_eq!(again.receipts[0].event_id, r.receipts[0].event_id);

    // Stored once each, normalized.
    let events = app
        .ingest()
        .query_events(with_key(pb::QueryEventsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 2);
    let bob = events.iter().find(|e| e.actor == "bob").unwrap();
    assert_eq!(bob.source_ip, "10.0.0.2");
    assert_eq!(bob.ocsf_class_uid, 3002);
    assert_eq!(bob.ocsf_category_uid, 3);
    assert_eq!(bob.severity, pb::Severity::Info as i32);
    assert!(bob.received_at.is_some());
}

async fn batch_level_errors(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("acme", &[pb::Scope::Ingest]).await;
    let err = ingest(&app, &key, vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request().unwrap().field_violations[0].field,
        "events"
    );
    let many = (0..1001)
        .map(|i| login(&format!("m{i}"), "a", "", true))
        .collect();
    let err = ingest(&app, &key, many).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Garbage bytes instead of a protobuf message: a clear error, server unharmed.
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let err = grpc
        .unary::<Vec<u8>, pb::IngestResponse, _>(
            with_key(vec![0xff, 0xff, 0xff, 0xff, 0x0f], &key),
            http::uri::PathAndQuery::from_static("/picket.v1.IngestService/Ingest"),
            RawCodec::<pb::IngestResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(!err.message().contains("/src/"), "{}", err.message());
    assert!(
        ingest(&app, &key, vec![login("ok", "a", "", true)])
            .await
            .is_ok()
    );
}

async fn streams_ack_each_batch_after_commit(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let batches: Vec<pb::IngestStreamRequest> = (1..=20u64)
        .map(|seq| pb::IngestStreamRequest {
            sequence: seq,
            events: (0..50)
                .map(|i| {
                    login(
                        &format!("s{seq}-{i}"),
                        &format!("u{i}"),
                        "10.1.1.1",
                        i % 3 == 0,
                    )
                })
                .collect(),
        })
        .collect();
    let mut acks = app
        .ingest()
        .ingest_stream(with_key(tokio_stream::iter(batches), &key))
        .await
        .unwrap()
        .into_inner();
    let mut seen = HashSet::new();
    while let Some(ack) = acks.message().await.unwrap() {
        assert!(
            seen.insert(ack.sequence),
            "batch {} acknowledged twice",
            ack.sequence
        );
        assert_eq!((ack.accepted, ack.duplicates, ack.rejected), (50, 0, 0));
        // The ack means committed: the events are readable straight away.
        let ids: HashSet<String> = ack.receipts.iter().map(|r| r.event_id.clone()).collect();
        let stored = app
            .ingest()
            .query_events(with_key(
                pb::QueryEventsRequest {
                    page_size: 1000,
                    ..Default::default()
                },
                &key,
            ))
            .await
            .unwrap()
            .into_inner()
            .events;
        let stored: HashSet<String> = stored.into_iter().map(|e| e.id).collect();
        assert!(ids.is_subset(&stored), "acked events not yet readable");
    }
    assert_eq!(seen.len(), 20);

    // A second stream resending two batches: all duplicates, same ids.
    let resend: Vec<pb::IngestStreamRequest> = (1..=2u64)
        .map(|seq| pb::IngestStreamRequest {
            sequence: seq,
            events: (0..50)
                .map(|i| {
                    login(
                        &format!("s{seq}-{i}"),
                        &format!("u{i}"),
                        "10.1.1.1",
                        i % 3 == 0,
                    )
                })
                .collect(),
        })
        .collect();
    let acks: Vec<_> = app
        .ingest()
        .ingest_stream(with_key(tokio_stream::iter(resend), &key))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(acks.len(), 2);
    for ack in acks {
        let ack = ack.unwrap();
        assert_eq!((ack.accepted, ack.duplicates), (0, 50));
    }
}

async fn overload_is_refused_with_retry_info(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let mut settings = common::test_settings(&db);
    settings.ingest_max_in_flight_events = 10;
    let app = common::spawn_with(db, settings).await;
    let (_, key) = app.tenant_with_key("acme", &[pb::Scope::Ingest]).await;
    let eleven = (0..11)
        .map(|i| login(&format!("o{i}"), "a", "", true))
        .collect();
    let err = ingest(&app, &key, eleven).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.get_details_retry_info().unwrap().retry_delay.is_some());
    // The stream form ends with the same status, after acknowledging what it could.
    let batches = vec![
        pb::IngestStreamRequest {
            sequence: 1,
            events: vec![login("ok1", "a", "", true)],
        },
        pb::IngestStreamRequest {
            sequence: 2,
            events: (0..11)
                .map(|i| login(&format!("p{i}"), "a", "", true))
                .collect(),
        },
    ];
    let items: Vec<_> = app
        .ingest()
        .ingest_stream(with_key(tokio_stream::iter(batches), &key))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let acked: Vec<u64> = items
        .iter()
        .filter_map(|i| i.as_ref().ok().map(|a| a.sequence))
        .collect();
    assert!(!acked.contains(&2));
    let status = items
        .iter()
        .find_map(|i| i.as_ref().err())
        .expect("stream ends with an error");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.get_details_retry_info().is_some());
    // Smaller batches still go through.
    assert!(
        ingest(&app, &key, vec![login("fits", "a", "", true)])
            .await
            .is_ok()
    );
}

async fn query_filters_and_pages_without_gaps(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let (_, other) = app
        .tenant_with_key("other", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let base = Utc::now() - Duration::hours(1);
    let mut events = Vec::new();
    for i in 0..30 {
        let mut e = login(
            &format!("q{i}"),
            if i % 2 == 0 { "alice" } else { "bob" },
            "2001:db8::7",
            i % 3 != 0,
        );
        e.occurred_at = Some(ts(base + Duration::seconds(i)));
        if i % 5 == 0 {
            e.event_type = "vpn.connect".into();
            e.resource = "/vpn/gw1".into();
            e.severity = pb::Severity::High as i32;
            e.source_ip = "198.51.100.9".into();
        }
        events.push(e);
    }
    ingest(&app, &key, events).await.unwrap();
    ingest(&app, &other, vec![login("x", "alice", "2001:db8::7", true)])
        .await
        .unwrap();

    let query = |filter: pb::EventFilter| {
        let app = &app;
        let key = key.clone();
        async move {
            app.ingest()
                .query_events(with_key(
                    pb::QueryEventsRequest {
                        filter: Some(filter),
                        page_size: 1000,
                        ..Default::default()
                    },
                    &key,
                ))
                .await
                .unwrap()
                .into_inner()
                .events
        }
    };
    assert_eq!(query(pb::EventFilter::default()).await.len(), 30);
    let alice = query(pb::EventFilter {
        actor: "alice".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(alice.len(), 15);
    assert!(alice.iter().all(|e| e.actor == "alice"));
    let vpn = query(pb::EventFilter {
        event_types: vec!["vpn.connect".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(vpn.len(), 6);
    assert_eq!(
        query(pb::EventFilter {
            ocsf_class_uids: vec![4001],
            ..Default::default()
        })
        .await
        .len(),
        6
    );
    assert_eq!(
        query(pb::EventFilter {
            source_ip: "2001:0db8:0::7".into(),
            ..Default::default()
        })
        .await
        .len(),
        24
    );
    assert_eq!(
        query(pb::EventFilter {
            resource_prefix: "/vpn/".into(),
            ..Default::default()
        })
        .await
        .len(),
        6
    );
    assert_eq!(
        query(pb::EventFilter {
            min_severity: pb::Severity::High as i32,
            ..Default::default()
        })
        .await
        .len(),
        6
    );
    let failures = query(pb::EventFilter {
        outcome: pb::Outcome::Failure as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(failures.len(), 10);
    // Newest first.
    let all = query(pb::EventFilter::default()).await;
    let times: Vec<i64> = all.iter().map(|e| e.occurred_at.unwrap().seconds).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]));
    // Time range.
    let ranged = app
        .ingest()
        .query_events(with_key(
            pb::QueryEventsRequest {
                time_range: Some(pb::TimeRange {
                    start: Some(ts(base + Duration::seconds(10))),
                    end: Some(ts(base + Duration::seconds(20))),
                }),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(ranged.len(), 10);

    // Paging while new events keep arriving: every original event exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut round = 0;
    loop {
        let page = app
            .ingest()
            .query_events(with_key(
                pb::QueryEventsRequest {
                    page_size: 7,
                    page_token: token.clone(),
                    ..Default::default()
                },
                &key,
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.events.into_iter().map(|e| e.id));
        round += 1;
        // New events, some older than the current page position.
        let mut late = login(&format!("late{round}"), "carol", "", true);
        late.occurred_at = Some(ts(base - Duration::minutes(5)));
        ingest(
            &app,
            &key,
            vec![late, login(&format!("new{round}"), "carol", "", true)],
        )
        .await
        .unwrap();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a page repeated an event");
    let original: HashSet<_> = all.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        unique, original,
        "pages missed events or included later ones"
    );

    // A token is bound to its query.
    let first = app
        .ingest()
        .query_events(with_key(
            pb::QueryEventsRequest {
                page_size: 5,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    let err = app
        .ingest()
        .query_events(with_key(
            pb::QueryEventsRequest {
                page_size: 5,
                page_token: first.next_page_token.clone(),
                filter: Some(pb::EventFilter {
                    actor: "alice".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = app
        .ingest()
        .query_events(with_key(
            pb::QueryEventsRequest {
                page_token: first.next_page_token,
                ..Default::default()
            },
            &other,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = app
        .ingest()
        .query_events(with_key(
            pb::QueryEventsRequest {
                page_size: 1001,
                ..Default::default()
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn tail_delivers_resumes_and_ends_on_shutdown(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let (_, other) = app.tenant_with_key("other", &[pb::Scope::Ingest]).await;
    ingest(&app, &key, vec![login("before", "alice", "", true)])
        .await
        .unwrap();
    let mut tail = app
        .ingest()
        .tail_events(with_key(
            pb::TailEventsRequest {
                filter: Some(pb::EventFilter {
                    actor: "alice".into(),
                    ..Default::default()
                }),
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
    // A heartbeat proves the stream is open. Before it, at most the event
    // committed just before the start (Postgres can make it readable only
    // after the start when another transaction was running; see the proto).
    let mut early = Vec::new();
    loop {
        match tail.message().await.unwrap().unwrap().item {
            Some(pb::tail_events_response::Item::Heartbeat(_)) => break,
            Some(pb::tail_events_response::Item::Event(e)) => {
                early.push(e.idempotency_key);
                assert_eq!(early, ["before"], "nothing else is new yet");
            }
            None => panic!("an empty item"),
        }
    }
    for i in 0..5 {
        ingest(
            &app,
            &key,
            vec![
                login(&format!("t{i}"), "alice", "", true),
                login(&format!("b{i}"), "bob", "", true),
            ],
        )
        .await
        .unwrap();
    }
    ingest(&app, &other, vec![login("o1", "alice", "", true)])
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut cursors = Vec::new();
    while got.len() < 5 {
        let item = tail.message().await.unwrap().unwrap();
        if let Some(pb::tail_events_response::Item::Event(e)) = item.item {
            assert_eq!(e.actor, "alice");
            got.push(e.idempotency_key.clone());
            cursors.push(item.cursor);
        }
    }
    assert_eq!(got, ["t0", "t1", "t2", "t3", "t4"]);
    drop(tail);

    // Resume after the second event: exactly the rest, then new ones.
    let mut resumed = app
        .ingest()
        .tail_events(with_key(
            pb::TailEventsRequest {
                filter: Some(pb::EventFilter {
                    actor: "alice".into(),
                    ..Default::default()
                }),
                options: Some(pb::WatchOptions {
                    after_cursor: cursors[1].clone(),
                    heartbeat_interval_seconds: 5,
                }),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    ingest(&app, &key, vec![login("t5", "alice", "", true)])
        .await
        .unwrap();
    let mut rest = Vec::new();
    while rest.len() < 4 {
        if let Some(pb::tail_events_response::Item::Event(e)) =
            resumed.message().await.unwrap().unwrap().item
        {
            rest.push(e.idempotency_key);
        }
    }
    assert_eq!(rest, ["t2", "t3", "t4", "t5"]);

    // Another tenant's cursor is refused.
    let err = app
        .ingest()
        .tail_events(with_key(
            pb::TailEventsRequest {
                filter: None,
                options: Some(pb::WatchOptions {
                    after_cursor: cursors[0].clone(),
                    heartbeat_interval_seconds: 0,
                }),
            },
            &app.key_for_tenant_named("other", &[pb::Scope::Read]).await,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Shutdown ends the stream cleanly.
    app.trigger_shutdown();
    loop {
        match resumed.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(e) => panic!("tail ended with an error on shutdown: {e:?}"),
        }
    }
    app.join().await.unwrap();
}

async fn retention_and_purge(backend: Backend) {
    let app = spawn_app(backend).await;
    let (tenant_id, key) = app
        .tenant_with_key(
            "acme",
            &[pb::Scope::Ingest, pb::Scope::Read, pb::Scope::Admin],
        )
        .await;
    let mut old = login("old", "a", "", true);
    old.occurred_at = Some(ts(Utc::now() - Duration::days(40)));
    let mut older = login("older", "a", "", true);
    older.occurred_at = Some(ts(Utc::now() - Duration::days(400)));
    let r = ingest(&app, &key, vec![old, older, login("new", "a", "", true)])
        .await
        .unwrap();
    assert_eq!(r.accepted, 3);
    app.admin()
        .update_tenant(with_key(
            pb::UpdateTenantRequest {
                tenant_id: String::new(),
                update_mask: vec!["retention_days".into()],
                display_name: String::new(),
                retention_days: 30,
            },
            &key,
        ))
        .await
        .unwrap();
    // Events older than retention are refused from now on.
    let mut stale = login("stale", "a", "", true);
    stale.occurred_at = Some(ts(Utc::now() - Duration::days(31)));
    let r = ingest(&app, &key, vec![stale]).await.unwrap();
    assert_eq!(r.receipts[0].field_path, "occurred_at");
    // One retention pass deletes the two old events.
    let deleted = picket::ingest::retention::run_once(app.store.as_ref(), Utc::now())
        .await
        .unwrap();
    assert_eq!(deleted.removed(), 2);
    // Purge by an admin: everything before now.
    let purged = app
        .admin()
        .purge_events(with_key(
            pb::PurgeEventsRequest {
                tenant_id: tenant_id.clone(),
                before: Some(ts(Utc::now() + Duration::seconds(1))),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.deleted, 1);
    // Only admins may purge.
    let reader = app.key_for(&tenant_id, &[pb::Scope::Read]).await;
    let err = app
        .admin()
        .purge_events(with_key(
            pb::PurgeEventsRequest {
                tenant_id: String::new(),
                before: Some(ts(Utc::now())),
            },
            &reader,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// Item 1 of issue 11: U+0000 in any string field is refused per event with
/// its field path on both backends (Postgres cannot store it; SQLite could),
/// and the good events of the same batch are stored.
async fn nul_characters_are_rejected_with_their_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let nul = |f: &dyn Fn(&mut pb::Event)| {
        let mut e = login("", "alice", "10.0.0.1", true);
        f(&mut e);
        e
    };
    let events = vec![
        login("good-1", "alice", "10.0.0.1", true),
        nul(&|e| e.actor = "al\0ice".into()),
        nul(&|e| e.resource = "/a\0b".into()),
        nul(&|e| {
            e.http = Some(pb::HttpDetails {
                user_agent: "curl\0".into(),
                ..Default::default()
            })
        }),
        nul(&|e| {
            e.attributes.insert("k\0ey".into(), "v".into());
        }),
        nul(&|e| {
            e.attributes.insert("note".into(), "v\0".into());
        }),
        nul(&|e| e.idempotency_key = "id\0".into()),
        login("good-2", "bob", "10.0.0.2", true),
    ];
    let r = ingest(&app, &key, events).await.unwrap();
    assert_eq!((r.accepted, r.duplicates, r.rejected), (2, 0, 6));
    for (i, path) in [
        (1, "actor"),
        (2, "resource"),
        (3, "http.user_agent"),
        (4, "attributes[\"k\\0ey\"]"),
        (5, "attributes[\"note\"]"),
        (6, "idempotency_key"),
    ] {
        let receipt = &r.receipts[i];
        assert_eq!(receipt.status, pb::ReceiptStatus::Rejected as i32, "{i}");
        assert_eq!(receipt.field_path, path, "{i}");
        assert!(receipt.reason.contains("NUL"), "{}", receipt.reason);
    }
    for i in [0, 7] {
        assert_eq!(r.receipts[i].status, pb::ReceiptStatus::Accepted as i32);
    }
    let stored = app
        .ingest()
        .query_events(with_key(pb::QueryEventsRequest::default(), &key))
        .await
        .unwrap()
        .into_inner()
        .events;
    let mut keys: Vec<String> = stored.into_iter().map(|e| e.idempotency_key).collect();
    keys.sort();
    assert_eq!(keys, ["good-1", "good-2"]);
}

/// Item 1: while one tenant keeps sending batches with NUL characters (unary
/// and on a stream), a second tenant's concurrent batches all succeed and the
/// stream carrying them goes on to acknowledge every batch.
async fn bad_input_of_one_tenant_never_fails_another(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, bad_key) = app.tenant_with_key("mallory", &[pb::Scope::Ingest]).await;
    let (_, good_key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let poisoned = |round: usize| {
        let mut e = login(&format!("bad-{round}"), "eve\0", "10.9.9.9", true);
        e.attributes.insert("x".into(), "\0".into());
        vec![e, login(&format!("ok-{round}"), "eve", "10.9.9.9", true)]
    };
    let rounds = 30;
    let bad = async {
        for round in 0..rounds {
            let r = ingest(&app, &bad_key, poisoned(round)).await.unwrap();
            assert_eq!((r.accepted, r.rejected), (1, 1), "round {round}");
        }
    };
    let good = async {
        for round in 0..rounds {
            let batch = (0..20)
                .map(|i| login(&format!("g{round}-{i}"), "alice", "10.0.0.1", true))
                .collect();
            let r = ingest(&app, &good_key, batch).await.unwrap();
            assert_eq!(r.accepted, 20, "round {round}");
        }
    };
    let stream = async {
        let batches: Vec<pb::IngestStreamRequest> = (1..=rounds as u64)
            .map(|seq| pb::IngestStreamRequest {
                sequence: seq,
                events: poisoned(1000 + seq as usize),
            })
            .collect();
        let acks: Vec<_> = app
            .ingest()
            .ingest_stream(with_key(tokio_stream::iter(batches), &bad_key))
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        assert_eq!(acks.len(), rounds, "every batch acknowledged");
        for ack in acks {
            let ack = ack.expect("the stream goes on");
            assert_eq!((ack.accepted, ack.rejected), (1, 1));
        }
    };
    tokio::join!(bad, good, stream);
    let stored = app
        .ingest()
        .query_events(with_key(
            pb::QueryEventsRequest {
                page_size: 1000,
                ..Default::default()
            },
            &good_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(stored.len(), 20 * rounds);
}

/// Item 1, defence in depth in the writer: batches grouped in one transaction
/// of which one is refused by the database for a reason in its own data (here
/// an event id already stored, which validation cannot know) are committed
/// apart, so only that batch fails, with INTERNAL and no RetryInfo.
async fn a_batch_the_database_refuses_fails_alone(backend: Backend) {
    use picket::domain::TenantId;
    use picket::domain::event::{EventInput, InsertOutcome, NewEvent};
    let app = spawn_app(backend).await;
    let (a, _) = app.tenant_with_key("acme", &[pb::Scope::Ingest]).await;
    let (b, _) = app.tenant_with_key("globex", &[pb::Scope::Ingest]).await;
    let (a, b) = (TenantId(a.parse().unwrap()), TenantId(b.parse().unwrap()));
    let now = Utc::now();
    let event = |key: &str| {
        NewEvent::parse(
            EventInput {
                occurred_at: Some(Ok(now)),
                event_type: "user.login".into(),
                idempotency_key: key.into(),
                ..Default::default()
            },
            now,
            0,
        )
        .unwrap()
    };
    let store = app.store.as_ref();
    let first = vec![event("first")];
    let stored = picket::ingest::commit_batches(store, &[(a, &first)]).await;
    assert!(matches!(
        stored[0].as_ref().unwrap()[0],
        InsertOutcome::Accepted(_)
    ));
    // A different key under an id already stored: a unique index refuses it.
    let mut clash = event("clash");
    clash.id = first[0].id;
    let clash = vec![event("before-clash"), clash];
    let good_a = vec![event("a-1"), event("a-2")];
    let good_b = vec![event("b-1")];
    let results =
        picket::ingest::commit_batches(store, &[(a, &good_a), (a, &clash), (b, &good_b)]).await;
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().expect("first batch stored").len(), 2);
    assert_eq!(
        results[2]
            .as_ref()
            .expect("other tenant's batch stored")
            .len(),
        1
    );
    let status = picket::grpc::status::to_status(match &results[1] {
        Err(_) => results.into_iter().nth(1).unwrap().unwrap_err(),
        Ok(o) => panic!("the refused batch was stored: {o:?}"),
    });
    assert_eq!(status.code(), Code::Internal);
    assert!(status.get_details_retry_info().is_none());
    let keys = |t| async move {
        let q = picket::domain::event::EventQuery {
            limit: 100,
            ..Default::default()
        };
        let mut k: Vec<String> = store
            .query_events(t, &q)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event.details.idempotency_key)
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(a).await, ["a-1", "a-2", "first"]);
    assert_eq!(keys(b).await, ["b-1"]);
    if backend == Backend::Postgres {
        // Below validation, Postgres refuses U+0000 in text (SQLSTATE 22021):
        // the same holds for a data exception as for a constraint.
        let mut nul = event("nul");
        nul.actor = "a\0".into();
        let nul = vec![nul];
        let good = vec![event("a-3")];
        let results = picket::ingest::commit_batches(store, &[(b, &nul), (a, &good)]).await;
        assert!(matches!(
            results[0],
            Err(picket::error::AppError::Internal(_))
        ));
        assert!(results[1].is_ok());
        assert_eq!(keys(a).await, ["a-1", "a-2", "a-3", "first"]);
    }
}

crate::both_backends!(
    mixed_batches_get_one_receipt_per_event,
    batch_level_errors,
    streams_ack_each_batch_after_commit,
    overload_is_refused_with_retry_info,
    query_filters_and_pages_without_gaps,
    tail_delivers_resumes_and_ends_on_shutdown,
    retention_and_purge,
    nul_characters_are_rejected_with_their_field,
    bad_input_of_one_tenant_never_fails_another,
    a_batch_the_database_refuses_fails_alone,
);
