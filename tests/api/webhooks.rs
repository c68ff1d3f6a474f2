//! Signed webhooks: `POST /v1/webhooks/{source}` and the AdminService RPCs
//! that manage sources, on both backends.

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use picket::grpc::pb;
use picket::storage::Backend;
use sha2::Sha256;
use tonic::Code;

use crate::common::{OPERATOR_TOKEN, TestApp, spawn_app, with_key};

/// A plain HTTP/1.1 POST; returns (status, JSON body).
async fn post(
    app: &TestApp,
    source: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/v1/webhooks/{source}", app.addr))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let resp = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .expect("http request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("non-JSON answer {status}: {body:?}"));
    (status, json)
}

fn hmac_hex(secret: &str, parts: &[&[u8]]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// `X-Picket-Signature` for `body` at unix time `t`.
fn signature(secret: &str, t: i64, body: &[u8]) -> (&'static str, String) {
    let sig = hmac_hex(secret, &[t.to_string().as_bytes(), b".", body]);
    ("x-picket-signature", format!("t={t},v1={sig}"))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn payload(ip: &str) -> Vec<u8> {
    serde_json::json!({
        "source": "guardduty",
        "type": "authentication.brute_force",
        "severity": "high",
        "entity": {"kind": "ip", "value": ip},
        "title": "Brute force from outside",
        "summary": "200 failed logins in 5 minutes",
        "raw": {"finding_id": "abc-123"}
    })
    .to_string()
    .into_bytes()
}

/// A tenant, its admin+read key, and a source named `name`; returns (tenant id, key, source, secret).
async fn setup(
    app: &TestApp,
    tenant: &str,
    name: &str,
    allow_body_only: bool,
) -> (String, String, pb::WebhookSource, String) {
    let (tenant_id, key) = app
        .tenant_with_key(tenant, &[pb::Scope::Admin, pb::Scope::Read])
        .await;
    let created = app
        .admin()
        .create_webhook_source(with_key(
            pb::CreateWebhookSourceRequest {
                tenant_id: String::new(),
                name: name.into(),
                allow_body_only_signature: allow_body_only,
            },
            &key,
        ))
        .await
        .expect("create webhook source")
        .into_inner();
    assert!(created.secret.starts_with("whsec_"), "{}", created.secret);
    (tenant_id, key, created.source.unwrap(), created.secret)
}

async fn alerts(app: &TestApp, key: &str) -> Vec<pb::Alert> {
    pb::alert_service_client::AlertServiceClient::new(app.channel.clone())
        .list_alerts(with_key(pb::ListAlertsRequest::default(), key))
        .await
        .unwrap()
        .into_inner()
        .alerts
}

async fn valid_signature_raises_a_listed_alert(backend: Backend) {
    let app = spawn_app(backend).await;
    let (tenant_id, key, source, secret) = setup(&app, "acme", "guardduty", false).await;
    assert_eq!(source.tenant_id, tenant_id);
    let body = payload("203.0.113.7");
    let (status, json) = post(
        &app,
        "guardduty",
        &[
            signature(&secret, now(), &body),
            ("x-picket-delivery", "d-1".into()),
        ],
        body,
    )
    .await;
    assert_eq!(status, 201, "{json}");
    let alert_id = json["alert_id"].as_str().expect("alert_id").to_owned();

    let listed = alerts(&app, &key).await;
    assert_eq!(listed.len(), 1);
    let a = &listed[0];
    assert_eq!(a.id, alert_id);
    assert_eq!(a.source_kind, pb::AlertSourceKind::Webhook as i32);
    assert_eq!(a.source_name, "guardduty");
    assert_eq!(a.category, "authentication");
    assert_eq!(a.severity, pb::Severity::High as i32);
    assert_eq!(a.title, "Brute force from outside");
    assert_eq!(a.entities[0].value, "203.0.113.7");

    // The secret is never listed.
    let list = app
        .admin()
        .list_webhook_sources(with_key(pb::ListWebhookSourcesRequest::default(), &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sources, vec![source]);
    assert!(!format!("{list:?}").contains(&secret));

    // The metric counts it.
    let (_, metrics) = {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let resp = client
            .get(format!("http://{}/metrics", app.addr).parse().unwrap())
            .await
            .unwrap();
        (
            (),
            String::from_utf8(
                resp.into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .to_vec(),
            )
            .unwrap(),
        )
    };
    assert!(
        metrics.contains("picket_webhook_requests_total{outcome=\"accepted\"}"),
        "{metrics}"
    );
}

async fn bad_or_missing_signature_is_401_and_stores_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key, _, secret) = setup(&app, "acme", "hooks", false).await;
    let body = payload("203.0.113.8");
    let (status, json) = post(
        &app,
        "hooks",
        &[signature("whsec_wrong", now(), &body)],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401, "{json}");
    assert!(json["error"].as_str().unwrap().contains("does not match"));
    let (status, json) = post(&app, "hooks", &[], body.clone()).await;
    assert_eq!(status, 401);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("missing signature")
    );
    // Signed over a different body.
    let (status, _) = post(
        &app,
        "hooks",
        &[signature(&secret, now(), b"{}")],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    assert!(alerts(&app, &key).await.is_empty());
}

async fn stale_timestamp_is_refused_with_a_clear_message(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key, _, secret) = setup(&app, "acme", "hooks", false).await;
    let body = payload("203.0.113.9");
    for t in [now() - 301 - 60, now() + 400] {
        let (status, json) =
            post(&app, "hooks", &[signature(&secret, t, &body)], body.clone()).await;
        assert_eq!(status, 401, "{json}");
        let msg = json["error"].as_str().unwrap();
        assert!(msg.contains("timestamp") && msg.contains("300"), "{msg}");
    }
    assert!(alerts(&app, &key).await.is_empty());
}

async fn replayed_delivery_is_a_duplicate(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key, _, secret) = setup(&app, "acme", "hooks", false).await;
    let body = payload("198.51.100.1");
    let headers = [
        signature(&secret, now(), &body),
        ("x-picket-delivery", "evt_0001".to_string()),
    ];
    let (status, first) = post(&app, "hooks", &headers, body.clone()).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = post(&app, "hooks", &headers, body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(again, serde_json::json!({"status": "duplicate"}));
    let listed = alerts(&app, &key).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].occurrence_count, 1,
        "the replay folded nothing in"
    );

    // A different delivery id of the same finding folds into the same alert.
    let headers = [
        signature(&secret, now(), &body),
        ("x-picket-delivery", "evt_0002".to_string()),
    ];
    let (status, json) = post(&app, "hooks", &headers, body).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["status"], "updated");
    assert_eq!(json["alert_id"], first["alert_id"]);
    let listed = alerts(&app, &key).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].occurrence_count, 2);
}

/// The value of a counter on the server's `/metrics` (0 if not exported yet).
async fn counter(app: &TestApp, name: &str) -> f64 {
    let (_, _, body) = crate::common::http1(app.addr, "GET", "/metrics", &[], vec![]).await;
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// With Redis, a committed delivery id is remembered there (`SET NX` with a
/// TTL) and a replay is answered from it; without Redis the store still
/// refuses the replay. Redis sits in front of the store, so one backend
/// (Postgres, the one replicas share) is enough; running it once also keeps
/// the process-wide counter it reads free of other tests' increments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_delivery_is_answered_from_redis() {
    let redis = crate::common::RedisProcess::start();
    let db = crate::common::TestDb::new(Backend::Postgres).await;
    let mut settings = crate::common::test_settings(&db);
    settings.redis_url = Some(secrecy::SecretString::from(redis.url()));
    let app = crate::common::spawn_with(db, settings).await;
    crate::common::redis_state_becomes(app.addr, "up").await;
    let (_, key, source, secret) = setup(&app, "acme", "hooks", false).await;
    let body = payload("198.51.100.7");
    let headers = [
        signature(&secret, now(), &body),
        ("x-picket-delivery", "evt_redis_1".to_string()),
    ];
    let (status, first) = post(&app, "hooks", &headers, body.clone()).await;
    assert_eq!(status, 201, "{first}");

    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let redis_key = format!("picket:v1:delivery:{}:evt_redis_1", source.id);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&redis_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 0,
        "the committed delivery id is in Redis with a TTL ({ttl})"
    );

    let from_redis = counter(&app, "picket_webhook_redis_duplicates_total").await;
    let (status, again) = post(&app, "hooks", &headers, body.clone()).await;
    assert_eq!(
        (status, again),
        (200, serde_json::json!({"status": "duplicate"}))
    );
    assert_eq!(
        counter(&app, "picket_webhook_redis_duplicates_total").await,
        from_redis + 1.0,
        "answered from Redis"
    );

    // Redis forgets (or is gone): the store still knows.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let (status, again) = post(&app, "hooks", &headers, body).await;
    assert_eq!(
        (status, again),
        (200, serde_json::json!({"status": "duplicate"}))
    );
    let listed = alerts(&app, &key).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].occurrence_count, 1, "no replay folded in");
}

async fn legacy_signature_only_when_enabled(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key, _, strict_secret) = setup(&app, "acme", "strict", false).await;
    let legacy = app
        .admin()
        .create_webhook_source(with_key(
            pb::CreateWebhookSourceRequest {
                tenant_id: String::new(),
                name: "legacy".into(),
                allow_body_only_signature: true,
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(legacy.source.as_ref().unwrap().allow_body_only_signature);
    let body = payload("192.0.2.1");
    let header = |secret: &str| {
        (
            "x-signature",
            format!("sha256={}", hmac_hex(secret, &[&body])),
        )
    };
    let (status, json) = post(&app, "strict", &[header(&strict_secret)], body.clone()).await;
    assert_eq!(status, 401);
    assert!(
        json["error"].as_str().unwrap().contains("not enabled"),
        "{json}"
    );
    let (status, json) = post(&app, "legacy", &[header("whsec_wrong")], body.clone()).await;
    assert_eq!(status, 401, "{json}");
    let (status, json) = post(&app, "legacy", &[header(&legacy.secret)], body.clone()).await;
    assert_eq!(status, 201, "{json}");
    assert_eq!(alerts(&app, &key).await.len(), 1);
}

async fn oversized_malformed_and_unknown_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key, _, secret) = setup(&app, "acme", "hooks", false).await;

    let big = vec![b' '; 256 * 1024 + 1];
    let (status, json) = post(&app, "hooks", &[signature(&secret, now(), &big)], big).await;
    assert_eq!(status, 413, "{json}");

    let bad = b"{\"type\": ".to_vec();
    let (status, json) = post(&app, "hooks", &[signature(&secret, now(), &bad)], bad).await;
    assert_eq!(status, 400);
    assert!(
        json["error"].as_str().unwrap().contains("malformed JSON"),
        "{json}"
    );

    let missing = serde_json::json!({
        "type": "x.y", "severity": "low", "entity": {"kind": "host", "value": "h1"}, "raw": null
    })
    .to_string()
    .into_bytes();
    let (status, json) = post(
        &app,
        "hooks",
        &[signature(&secret, now(), &missing)],
        missing,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        json["error"].as_str().unwrap().contains("`title`"),
        "{json}"
    );

    let body = payload("192.0.2.2");
    let (status, json) = post(&app, "nope", &[signature(&secret, now(), &body)], body).await;
    assert_eq!(status, 404, "{json}");

    let (status, _) = post(&app, "Bad_Name", &[], Vec::new()).await;
    assert_eq!(status, 404);
    assert!(alerts(&app, &key).await.is_empty());
}

async fn rotation_invalidates_the_old_secret(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key, source, old) = setup(&app, "acme", "hooks", false).await;
    let rotated = app
        .admin()
        .rotate_webhook_secret(with_key(
            pb::RotateWebhookSecretRequest {
                source_id: source.id.clone(),
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(rotated.secret, old);
    let s = rotated.source.unwrap();
    assert!(s.secret_rotated_at.unwrap().seconds >= source.secret_rotated_at.unwrap().seconds);
    let body = payload("192.0.2.3");
    let (status, _) = post(
        &app,
        "hooks",
        &[signature(&old, now(), &body)],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, json) = post(
        &app,
        "hooks",
        &[signature(&rotated.secret, now(), &body)],
        body,
    )
    .await;
    assert_eq!(status, 201, "{json}");
}

async fn tenants_manage_only_their_own_sources(backend: Backend) {
    let app = spawn_app(backend).await;
    let (a_id, _a_key, a_source, _) = setup(&app, "alpha", "alpha-hook", false).await;
    let (_, b_key) = app
        .tenant_with_key("bravo", &[pb::Scope::Admin, pb::Scope::Read])
        .await;
    let mut admin = app.admin();

    let err = admin
        .list_webhook_sources(with_key(
            pb::ListWebhookSourcesRequest {
                tenant_id: a_id.clone(),
            },
            &b_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = admin
        .create_webhook_source(with_key(
            pb::CreateWebhookSourceRequest {
                tenant_id: a_id.clone(),
                name: "sneaky".into(),
                allow_body_only_signature: false,
            },
            &b_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = admin
        .rotate_webhook_secret(with_key(
            pb::RotateWebhookSecretRequest {
                source_id: a_source.id.clone(),
            },
            &b_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin
        .delete_webhook_source(with_key(
            pb::DeleteWebhookSourceRequest {
                source_id: a_source.id.clone(),
            },
            &b_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Names are unique across the server.
    let err = admin
        .create_webhook_source(with_key(
            pb::CreateWebhookSourceRequest {
                tenant_id: String::new(),
                name: "alpha-hook".into(),
                allow_body_only_signature: false,
            },
            &b_key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // A key without the admin scope may not manage sources.
    let read_only = app.key_for(&a_id, &[pb::Scope::Read]).await;
    let err = admin
        .list_webhook_sources(with_key(
            pb::ListWebhookSourcesRequest::default(),
            &read_only,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The operator must name the tenant, and may manage any source by id.
    let err = admin
        .list_webhook_sources(with_key(
            pb::ListWebhookSourcesRequest::default(),
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let listed = admin
        .list_webhook_sources(with_key(
            pb::ListWebhookSourcesRequest {
                tenant_id: a_id.clone(),
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sources.len(), 1);
    admin
        .delete_webhook_source(with_key(
            pb::DeleteWebhookSourceRequest {
                source_id: a_source.id.clone(),
            },
            OPERATOR_TOKEN,
        ))
        .await
        .unwrap();
    let body = payload("192.0.2.4");
    let (status, _) = post(&app, "alpha-hook", &[signature("x", now(), &body)], body).await;
    assert_eq!(status, 404, "deleted sources are unknown");
}

crate::both_backends!(
    valid_signature_raises_a_listed_alert,
    bad_or_missing_signature_is_401_and_stores_nothing,
    stale_timestamp_is_refused_with_a_clear_message,
    replayed_delivery_is_a_duplicate,
    legacy_signature_only_when_enabled,
    oversized_malformed_and_unknown_are_refused,
    rotation_invalidates_the_old_secret,
    tenants_manage_only_their_own_sources,
);
