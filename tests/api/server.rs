//! The server shell: reflection, health, /healthz, /metrics, grpc-web, CORS,
//! limits and graceful shutdown.

use picket::grpc::pb;
use picket::storage::Backend;
use prost::Message;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::common::{self, OPERATOR_TOKEN, http1, spawn_app, with_key};

async fn reflection_lists_every_service(backend: Backend) {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let app = spawn_app(backend).await;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in picket::server::startup::SERVICE_NAMES
        .iter()
        .chain(&["grpc.health.v1.Health"])
    {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(
        names.iter().any(|n| n.starts_with("grpc.reflection.")),
        "{names:?}"
    );

    // v1 reflection answers too.
    use tonic_reflection::pb::v1::ServerReflectionRequest as V1Req;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as V1Client;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as V1Request;
    let mut v1 = V1Client::new(app.channel.clone());
    let mut s = v1
        .server_reflection_info(tokio_stream::once(V1Req {
            host: String::new(),
            message_request: Some(V1Request::FileContainingSymbol(
                "picket.v1.IngestService".into(),
            )),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.message()
            .await
            .unwrap()
            .unwrap()
            .message_response
            .is_some()
    );
}

async fn health_http_health_and_metrics(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in ["", "picket.v1.IngestService", "picket.v1.AdminService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
    let err = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let (status, _, body) = http1(app.addr, "GET", "/healthz", &[], vec![]).await;
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["redis"], "off", "{health}");
    // Detection may not have taken its role yet: a lag or null, nothing else.
    let lag = &health["detect_lag_seconds"];
    assert!(
        lag.is_null() || lag.as_f64().is_some_and(|l| l >= 0.0),
        "{health}"
    );
    // Shards led so far: none yet, or all 64 (this process is alone).
    let shards = health["detect_shards"].as_u64();
    assert!(matches!(shards, Some(0 | 64)), "{health}");
    assert_eq!(health.as_object().unwrap().len(), 4, "{health}");

    let (status, headers, body) = http1(app.addr, "GET", "/metrics", &[], vec![]).await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("# TYPE picket_grpc_requests_total counter"),
        "{text}"
    );
    assert!(
        text.contains("picket_grpc_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("method=\"grpc.health.v1.Health/Check\""),
        "{text}"
    );

    let (status, _, _) = http1(app.addr, "GET", "/nope", &[], vec![]).await;
    assert_eq!(status, 404);
}

fn grpc_web_frame(msg: &impl Message) -> Vec<u8> {
    let payload = msg.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Splits a grpc-web response body into (messages, trailers text).
fn grpc_web_parse(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut messages = Vec::new();
    let mut trailers = String::new();
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let data = &body[5..5 + len];
        if flag & 0x80 != 0 {
            trailers = String::from_utf8(data.to_vec()).unwrap();
        } else {
            messages.push(data.to_vec());
        }
        body = &body[5 + len..];
    }
    (messages, trailers)
}

async fn grpc_web_unary_and_cors_preflight(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app.tenant_with_key("webco", &[pb::Scope::Read]).await;

    // Preflight from another origin.
    let (status, headers, _) = http1(
        app.addr,
        "OPTIONS",
        "/picket.v1.AdminService/WhoAmI",
        &[
            ("origin", "http://app.example.com"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type,x-api-key,x-grpc-web",
            ),
        ],
        vec![],
    )
    .await;
    assert!((200..300).contains(&status), "preflight status {status}");
    assert_eq!(headers["access-control-allow-origin"], "*");
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(
        allowed.contains("x-api-key") && allowed.contains("x-grpc-web"),
        "{allowed}"
    );

    // A unary call over grpc-web (HTTP/1.1).
    let (status, headers, body) = http1(
        app.addr,
        "POST",
        "/picket.v1.AdminService/WhoAmI",
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
            ("x-api-key", &key),
            ("origin", "http://app.example.com"),
        ],
        grpc_web_frame(&pb::WhoAmIRequest {}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/grpc-web")
    );
    let exposed = headers["access-control-expose-headers"].to_str().unwrap();
    assert!(exposed.contains("grpc-status"), "{exposed}");
    let (messages, trailers) = grpc_web_parse(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let who = pb::WhoAmIResponse::decode(&messages[0][..]).unwrap();
    assert_eq!(who.tenant_name, "webco");
    assert!(!who.operator);

    // And an error over grpc-web carries its status.
    let (_, headers, body) = http1(
        app.addr,
        "POST",
        "/picket.v1.AdminService/WhoAmI",
        &[
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
        ],
        grpc_web_frame(&pb::WhoAmIRequest {}),
    )
    .await;
    let status_header = headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let (_, trailers) = grpc_web_parse(&body);
    assert!(
        status_header.as_deref() == Some("16") || trailers.contains("grpc-status:16"),
        "expected UNAUTHENTICATED, got {headers:?} {trailers}"
    );
}

async fn unknown_method_is_unimplemented(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/picket.v1.AdminService/NoSuchMethod");
    let err = grpc
        .unary::<pb::WhoAmIRequest, pb::WhoAmIResponse, _>(
            tonic::Request::new(pb::WhoAmIRequest {}),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);

    // Every RPC authenticates first: without a key a report is UNAUTHENTICATED.
    let mut reports = pb::report_service_client::ReportServiceClient::new(app.channel.clone());
    let err = reports
        .get_security_summary(pb::GetSecuritySummaryRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

async fn oversized_messages_are_refused(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let mut settings = common::test_settings(&db);
    settings.max_message_bytes = 16 * 1024;
    let app = common::spawn_with(db, settings).await;
    let err = app
        .admin()
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "big".into(),
                display_name: "x".repeat(64 * 1024),
                retention_days: 0,
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    // RESOURCE_EXHAUSTED, as `picket serve --help` and the protos say
    // (tonic's own OUT_OF_RANGE is remapped; issue 11, item 3).
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("16384"), "{}", err.message());
    // The server is fine afterwards.
    let ok = app
        .admin()
        .create_tenant(with_key(
            pb::CreateTenantRequest {
                name: "small".into(),
                ..Default::default()
            },
            OPERATOR_TOKEN,
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

async fn graceful_shutdown_ends_streams_and_refuses_new_calls(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let started = std::time::Instant::now();
    app.trigger_shutdown();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    // The stream then ends cleanly (OK status, no more items).
    assert!(watch.message().await.unwrap().is_none());
    app.join().await.expect("server exits cleanly");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "shutdown waited for the grace period: streams did not end"
    );

    // New calls are refused: the listener is closed.
    let err = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await;
    assert!(err.is_err(), "listener still accepting after shutdown");
}

crate::both_backends!(
    reflection_lists_every_service,
    health_http_health_and_metrics,
    grpc_web_unary_and_cors_preflight,
    unknown_method_is_unimplemented,
    oversized_messages_are_refused,
    graceful_shutdown_ends_streams_and_refuses_new_calls,
);
