//! The Rust SDK (`sdk/rust`, crate `picket-client`) against the real server
//! on both backends: every event stored exactly once (also across a
//! 10-second outage of a `picket serve` process), queue-full, REJECTED and
//! close-deadline accounting, the tower layer on a real axum app and a real
//! tonic service (one event per request with its fields, 500s, grpc-status),
//! and enforcement: a banned IP refused within a second of the decision.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use picket::grpc::pb;
use picket::storage::Backend;
use picket_client::{
    ActivityEvent, ClientConfig, DropReason, FailureMode, SecurityLayer, TelemetryClient,
};
use tonic::transport::Channel;

use crate::common::{self, ServerProcess, TestDb, spawn_app, spawn_with, test_settings, with_key};

/// Upper bound for any single wait.
const DEADLINE: Duration = Duration::from_secs(30);

const SCOPES: &[pb::Scope] = &[pb::Scope::Ingest, pb::Scope::Read, pb::Scope::Respond];

/// A client for `addr` that flushes quickly (tests wait on receipts, not on
/// the 5-second default).
fn config(addr: SocketAddr, key: &str) -> ClientConfig {
    ClientConfig {
        service_name: "rust-sdk-test".into(),
        environment: "test".into(),
        flush_interval: Duration::from_millis(50),
        ..ClientConfig::new(key, format!("http://{addr}"))
    }
}

/// Every stored event of the key's tenant matching `filter`.
async fn stored(channel: &Channel, key: &str, filter: pb::EventFilter) -> Vec<pb::Event> {
    let mut client = pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .query_events(with_key(
                pb::QueryEventsRequest {
                    filter: Some(filter.clone()),
                    page_size: 1000,
                    page_token,
                    ..Default::default()
                },
                key,
            ))
            .await
            .expect("query events")
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

fn with_resource_prefix(prefix: &str) -> pb::EventFilter {
    pb::EventFilter {
        resource_prefix: prefix.into(),
        ..Default::default()
    }
}

/// The resources of `events`, checking each is there once.
fn unique_resources(events: &[pb::Event]) -> BTreeSet<String> {
    let set: BTreeSet<String> = events.iter().map(|e| e.resource.clone()).collect();
    assert_eq!(set.len(), events.len(), "an event was stored twice");
    set
}

async fn every_event_is_stored_exactly_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("rust-sdk-once", SCOPES).await;
    let client = TelemetryClient::new(ClientConfig {
        max_batch_size: 50,
        ..config(app.addr, &key)
    })
    .unwrap();
    for i in 0..500 {
        assert!(
            client.enqueue_event(
                ActivityEvent::new("user.login")
                    .actor(format!("user{}@example.com", i % 7))
                    .ip("203.0.113.9")
                    .action("login")
                    .resource(format!("/once/{i}"))
                    .extra("n", i.to_string()),
            )
        );
    }
    // Explicit keys sent twice: the second copy is DUPLICATE, stored once.
    for round in 0..2 {
        for i in 0..20 {
            client.enqueue_event(
                ActivityEvent::new("api.call")
                    .resource(format!("/once/keyed/{i}"))
                    .idempotency_key(format!("keyed-{i}")),
            );
        }
        if round == 0 {
            assert!(client.flush(DEADLINE).await, "flush");
        }
    }
    let stats = client.close().await;
    assert_eq!(
        (
            stats.accepted,
            stats.duplicates,
            stats.dropped.total(),
            stats.buffered
        ),
        (520, 20, 0, 0),
        "{stats:?}"
    );
    let events = stored(&app.channel, &key, with_resource_prefix("/once/")).await;
    assert_eq!(unique_resources(&events).len(), 520);
    let e = events
        .iter()
        .find(|e| e.resource == "/once/3")
        .expect("event 3");
    assert_eq!(
        (
            e.actor.as_str(),
            e.source_ip.as_str(),
            e.service.as_str(),
            e.environment.as_str()
        ),
        ("user3@example.com", "203.0.113.9", "rust-sdk-test", "test")
    );
    assert_eq!(e.source_system, "picket-sdk-rust");
    assert_eq!(e.attributes["n"], "3");
}

async fn an_outage_of_ten_seconds_loses_and_duplicates_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Some(ServerProcess::start_on(&db, &listen, &[]));
    let channel = server.as_ref().unwrap().channel().await;
    let (_, key) = common::tenant_with_key(&channel, "rust-sdk-outage", SCOPES).await;
    let addr: SocketAddr = listen.parse().unwrap();
    let client = TelemetryClient::new(ClientConfig {
        max_batch_size: 20,
        max_retry_attempts: 12,
        retry_initial_backoff: Duration::from_millis(200),
        retry_max_backoff: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        ..config(addr, &key)
    })
    .unwrap();
    const N: usize = 1600;
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in 0..N {
                tick.tick().await;
                assert!(client.enqueue_event(
                    ActivityEvent::new("http_request").resource(format!("/outage/{i}"))
                ));
            }
        })
    };
    // The outage: three seconds in, the server dies (SIGKILL) and comes
    // back ten seconds later on the same port and data.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(server.take());
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let restarted = ServerProcess::start_on(&db, &listen, &[]);
    eprintln!("server down for {:?}", down.elapsed());
    producer.await.expect("producer");
    let stats = client.close_within(DEADLINE).await;
    assert_eq!(stats.dropped.total(), 0, "{stats:?}");
    assert_eq!(stats.delivered(), N as u64, "{stats:?}");
    assert!(stats.retries > 0, "the outage was not noticed: {stats:?}");
    let events = stored(
        &restarted.channel().await,
        &key,
        with_resource_prefix("/outage/"),
    )
    .await;
    assert_eq!(unique_resources(&events).len(), N);
}

async fn a_tiny_queue_counts_what_it_drops(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("rust-sdk-queue", SCOPES).await;
    let dropped = Arc::new(Mutex::new(0usize));
    let seen = dropped.clone();
    let client = TelemetryClient::new(ClientConfig {
        max_queue_size: 10,
        flush_interval: Duration::from_secs(3600),
        on_drop: Some(Arc::new(move |reason, events| {
            assert_eq!(reason, DropReason::QueueFull);
            *seen.lock().unwrap() += events.len();
        })),
        ..config(app.addr, &key)
    })
    .unwrap();
    let queued = (0..25)
        .filter(|i| client.enqueue_event(ActivityEvent::new("t").resource(format!("/queue/{i}"))))
        .count();
    assert_eq!(queued, 10);
    let stats = client.stats();
    assert_eq!(
        (stats.enqueued, stats.buffered, stats.dropped.queue_full),
        (10, 10, 15)
    );
    assert_eq!(*dropped.lock().unwrap(), 15);
    let stats = client.close().await;
    assert_eq!(
        (stats.accepted, stats.dropped.total()),
        (10, 15),
        "{stats:?}"
    );
    let events = stored(&app.channel, &key, with_resource_prefix("/queue/")).await;
    assert_eq!(unique_resources(&events).len(), 10);
}

async fn rejected_events_are_reported_not_retried(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("rust-sdk-rejected", SCOPES).await;
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let seen = rejected.clone();
    let client = TelemetryClient::new(ClientConfig {
        on_rejected: Some(Arc::new(move |r| {
            seen.lock().unwrap().push((
                r.event.resource.clone(),
                r.field_path.to_owned(),
                r.reason.to_owned(),
            ));
        })),
        ..config(app.addr, &key)
    })
    .unwrap();
    for i in 0..3 {
        client.enqueue_event(ActivityEvent::new("t").resource(format!("/rej/ok/{i}")));
    }
    client.enqueue_event(ActivityEvent::new("t").resource("/rej/bad").ip("not-an-ip"));
    let stats = client.close().await;
    assert_eq!(
        (
            stats.accepted,
            stats.dropped.rejected,
            stats.retries,
            stats.dropped.total()
        ),
        (3, 1, 0, 1),
        "{stats:?}"
    );
    let rejected = rejected.lock().unwrap().clone();
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (rejected[0].0.as_str(), rejected[0].1.as_str()),
        ("/rej/bad", "source_ip")
    );
    assert!(!rejected[0].2.is_empty());
    let events = stored(&app.channel, &key, with_resource_prefix("/rej/")).await;
    assert_eq!(unique_resources(&events).len(), 3);
}

/// No server: close() gives up at its deadline and reports every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reports_what_it_could_not_send_by_its_deadline() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reported = Arc::new(Mutex::new(Vec::new()));
    let seen = reported.clone();
    let client = TelemetryClient::new(ClientConfig {
        max_retry_attempts: 1000,
        retry_initial_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(200),
        on_drop: Some(Arc::new(move |reason, events| {
            seen.lock().unwrap().push((reason, events.len()));
        })),
        ..config(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "pk_0000000000000000_unused",
        )
    })
    .unwrap();
    for i in 0..30 {
        assert!(client.enqueue_event(ActivityEvent::new("t").resource(format!("/{i}"))));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let stats = client.close_within(Duration::from_secs(1)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "close took {took:?}");
    assert!(stats.retries > 0, "{stats:?}");
    assert_eq!(
        (
            stats.dropped.shutdown_deadline,
            stats.dropped.total(),
            stats.buffered
        ),
        (30, 30, 0),
        "{stats:?}"
    );
    {
        let reported = reported.lock().unwrap();
        assert!(
            reported
                .iter()
                .all(|(r, _)| *r == DropReason::ShutdownDeadline)
        );
        assert_eq!(reported.iter().map(|(_, n)| n).sum::<usize>(), 30);
    }
    // After close, events are refused and counted, never panicking.
    assert!(!client.enqueue_event(ActivityEvent::new("late")));
    assert_eq!(client.stats().dropped.shutdown_deadline, 31);
}

/// An axum app behind the layer, served with peer addresses; its address.
async fn serve_axum(layer: SecurityLayer) -> SocketAddr {
    use axum::Router;
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = Router::new()
        .route(
            "/items/{id}",
            get(
                |axum::extract::Path(id): axum::extract::Path<String>| async move {
                    format!("item {id}")
                },
            ),
        )
        .route(
            "/boom",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
        )
        .route("/health", get(|| async { "ok" }))
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

type Health = tonic_health::pb::health_client::HealthClient<Channel>;

/// tonic's health service behind the layer; a client to it.
async fn serve_tonic(layer: SecurityLayer) -> Health {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("picket.test.Shop", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Health::new(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
}

fn health_check(
    service: &str,
    forwarded_for: Option<&str>,
) -> tonic::Request<tonic_health::pb::HealthCheckRequest> {
    let mut r = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    });
    if let Some(ip) = forwarded_for {
        r.metadata_mut()
            .insert("x-forwarded-for", ip.parse().unwrap());
    }
    r
}

async fn the_layer_records_one_event_per_request(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("rust-sdk-layer", SCOPES).await;
    let client = TelemetryClient::new(config(app.addr, &key)).unwrap();
    let layer = SecurityLayer::new(&client)
        .exclude_paths(["/health"])
        .trusted_proxies(["127.0.0.1"])
        .unwrap();
    let web = serve_axum(layer.clone()).await;
    let headers = [
        ("x-user-id", "alice@example.com"),
        ("x-forwarded-for", "6.6.6.6, 198.51.100.23"),
        ("user-agent", "rust-sdk-test/1"),
    ];
    let (status, _, body) = common::http1(web, "GET", "/items/42", &headers, vec![]).await;
    assert_eq!((status, &body[..]), (200, &b"item 42"[..]));
    let (status, _, _) = common::http1(web, "GET", "/boom", &headers, vec![]).await;
    assert_eq!(status, 500);
    let (status, _, _) = common::http1(web, "GET", "/health", &headers, vec![]).await;
    assert_eq!(status, 200);

    let mut grpc = serve_tonic(layer).await;
    grpc.check(health_check("picket.test.Shop", None))
        .await
        .unwrap();
    let missing = grpc
        .check(health_check("no.such.Service", None))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    assert!(client.flush(DEADLINE).await);
    let http_events = stored(
        &app.channel,
        &key,
        pb::EventFilter {
            event_types: vec!["http_request".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        http_events.len(),
        4,
        "one event per request, /health excluded"
    );
    let by_path =
        |p: &str| -> Vec<&pb::Event> { http_events.iter().filter(|e| e.resource == p).collect() };

    let ok = by_path("/items/42");
    assert_eq!(ok.len(), 1);
    let ok = ok[0];
    let http = ok.http.as_ref().unwrap();
    assert_eq!(
        (
            ok.action.as_str(),
            ok.actor.as_str(),
            ok.source_ip.as_str(),
            ok.outcome
        ),
        (
            "GET",
            "alice@example.com",
            "198.51.100.23",
            pb::Outcome::Success as i32
        )
    );
    assert_eq!(
        (
            http.method.as_str(),
            http.route.as_str(),
            http.status_code,
            http.user_agent.as_str()
        ),
        ("GET", "/items/{id}", 200, "rust-sdk-test/1")
    );
    assert_eq!(http.bytes_out, 7);
    assert!(http.latency_ms > 0.0);
    assert_eq!(ok.service, "rust-sdk-test");

    let boom = by_path("/boom");
    assert_eq!(boom.len(), 1);
    assert_eq!(boom[0].http.as_ref().unwrap().status_code, 500);
    assert_eq!(boom[0].outcome, pb::Outcome::Failure as i32);

    let calls = by_path("/grpc.health.v1.Health/Check");
    assert_eq!(calls.len(), 2);
    let mut codes: Vec<(&str, i32)> = calls
        .iter()
        .map(|e| (e.attributes["grpc_status"].as_str(), e.outcome))
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            ("0", pb::Outcome::Success as i32),
            ("5", pb::Outcome::Failure as i32)
        ]
    );
    assert!(calls.iter().all(|e| e.action == "POST"
        && e.source_ip == "127.0.0.1"
        && e.http.as_ref().unwrap().route == "/grpc.health.v1.Health/Check"));
    let stats = client.close().await;
    assert_eq!((stats.accepted, stats.dropped.total()), (4, 0), "{stats:?}");
}

async fn a_banned_ip_is_refused_within_a_second(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db);
    settings.watch_poll_ms = 100;
    let app = spawn_with(db, settings).await;
    let (_, key) = app.tenant_with_key("rust-sdk-enforce", SCOPES).await;
    let client = TelemetryClient::new(config(app.addr, &key)).unwrap();
    let layer = SecurityLayer::new(&client)
        .trusted_proxies(["127.0.0.1"])
        .unwrap()
        .enforce(FailureMode::FailClosed);
    assert!(
        client
            .decisions(FailureMode::LastKnown)
            .wait_synced(DEADLINE)
            .await
    );
    let web = serve_axum(layer.clone()).await;
    let mut grpc = serve_tonic(layer).await;
    let from = |ip: &'static str| [("x-forwarded-for", ip), ("x-user-id", "bob")];
    let (status, _, _) = common::http1(web, "GET", "/items/1", &from("203.0.113.50"), vec![]).await;
    assert_eq!(status, 200);
    grpc.check(health_check("picket.test.Shop", Some("203.0.113.50")))
        .await
        .unwrap();

    let mut enforcement =
        pb::enforcement_service_client::EnforcementServiceClient::new(app.channel.clone());
    let ban = |scope: pb::DecisionScope, value: &str| pb::CreateDecisionRequest {
        decision: Some(pb::NewDecision {
            scope: scope as i32,
            value: value.into(),
            r#type: pb::DecisionType::Ban as i32,
            duration_seconds: 600,
            reason: "rust sdk test".into(),
            ..Default::default()
        }),
    };
    let banned_at = Instant::now();
    enforcement
        .create_decision(with_key(ban(pb::DecisionScope::Ip, "203.0.113.50"), &key))
        .await
        .unwrap();
    let refused_after = loop {
        let (status, _, body) =
            common::http1(web, "GET", "/items/2", &from("203.0.113.50"), vec![]).await;
        if status == 403 {
            assert_eq!(&body[..], br#"{"detail":"Forbidden"}"#);
            break banned_at.elapsed();
        }
        assert_eq!(status, 200);
        assert!(banned_at.elapsed() < DEADLINE, "never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused_after < Duration::from_secs(1),
        "refused only after {refused_after:?}"
    );
    let denied = grpc
        .check(health_check("picket.test.Shop", Some("203.0.113.50")))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    // Other addresses pass; a banned range and a banned actor are refused.
    let (status, _, _) = common::http1(web, "GET", "/items/3", &from("203.0.113.51"), vec![]).await;
    assert_eq!(status, 200);
    enforcement
        .create_decision(with_key(
            ban(pb::DecisionScope::Cidr, "198.51.100.0/24"),
            &key,
        ))
        .await
        .unwrap();
    enforcement
        .create_decision(with_key(ban(pb::DecisionScope::Actor, "mallory"), &key))
        .await
        .unwrap();
    let cache = client.decisions(FailureMode::LastKnown);
    let deadline = Instant::now() + DEADLINE;
    while cache.len() < 3 {
        assert!(Instant::now() < deadline, "the cache never saw the bans");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, _) = common::http1(web, "GET", "/items/4", &from("198.51.100.9"), vec![]).await;
    assert_eq!(status, 403);
    let (status, _, _) = common::http1(
        web,
        "GET",
        "/items/5",
        &[("x-forwarded-for", "192.0.2.1"), ("x-user-id", "mallory")],
        vec![],
    )
    .await;
    assert_eq!(status, 403);

    assert!(client.flush(DEADLINE).await);
    let refused: Vec<(String, String)> = stored(
        &app.channel,
        &key,
        pb::EventFilter {
            event_types: vec!["http_request".into()],
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .filter_map(|e| {
        e.attributes
            .get("enforced")
            .map(|why| (e.resource.clone(), why.clone()))
    })
    .collect::<BTreeSet<_>>()
    .into_iter()
    .collect();
    assert_eq!(
        refused,
        [
            ("/grpc.health.v1.Health/Check".to_owned(), "ip".to_owned()),
            ("/items/2".into(), "ip".into()),
            ("/items/4".into(), "cidr".into()),
            ("/items/5".into(), "actor".into()),
        ]
    );
    client.close().await;
}

async fn decisions_expire_locally_while_disconnected(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db);
    settings.watch_poll_ms = 100;
    let mut app = spawn_with(db, settings).await;
    let (_, key) = app.tenant_with_key("rust-sdk-expiry", SCOPES).await;
    let client = TelemetryClient::new(config(app.addr, &key)).unwrap();
    let cache = client.decisions(FailureMode::LastKnown);
    assert!(cache.wait_synced(DEADLINE).await);
    pb::enforcement_service_client::EnforcementServiceClient::new(app.channel.clone())
        .create_decision(with_key(
            pb::CreateDecisionRequest {
                decision: Some(pb::NewDecision {
                    scope: pb::DecisionScope::Ip as i32,
                    value: "203.0.113.60".into(),
                    r#type: pb::DecisionType::Ban as i32,
                    duration_seconds: 3,
                    reason: "short".into(),
                    ..Default::default()
                }),
            },
            &key,
        ))
        .await
        .unwrap();
    let ip = "203.0.113.60".parse().unwrap();
    let deadline = Instant::now() + DEADLINE;
    while cache.check(ip).allowed {
        assert!(Instant::now() < deadline, "the ban never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server goes away; the copy still answers, and the ban ends on time.
    app.stop().await.unwrap();
    let banned_since = Instant::now();
    assert!(!cache.check(ip).allowed, "last_known answers from the copy");
    while !cache.check(ip).allowed {
        assert!(
            banned_since.elapsed() < Duration::from_secs(5),
            "never expired locally"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cache.check("203.0.113.61".parse().unwrap()).allowed);
    client.close_within(Duration::from_millis(200)).await;
}

crate::both_backends!(
    every_event_is_stored_exactly_once,
    an_outage_of_ten_seconds_loses_and_duplicates_nothing,
    a_tiny_queue_counts_what_it_drops,
    rejected_events_are_reported_not_retried,
    the_layer_records_one_event_per_request,
    a_banned_ip_is_refused_within_a_second,
    decisions_expire_locally_while_disconnected,
);
