//! Anomaly scoring of entity windows: RunDetection over a past range finds an
//! entity behaving far outside the tenant's baseline, and the alert explains why.

use chrono::{Duration, DurationRound, Utc};
use picket::grpc::pb;
use picket::storage::Backend;
use tonic::Code;

use crate::common::{self, with_key};

fn http(
    key: String,
    actor: &str,
    ip: &str,
    at: chrono::DateTime<Utc>,
    status: u32,
    bytes: u64,
    path: &str,
) -> pb::Event {
    pb::Event {
        occurred_at: Some(picket::grpc::convert::timestamp(at)),
        event_type: "http_request".into(),
        idempotency_key: key,
        actor: actor.into(),
        action: "GET".into(),
        resource: path.into(),
        outcome: if status < 400 {
            pb::Outcome::Success
        } else {
            pb::Outcome::Failure
        } as i32,
        source_ip: ip.into(),
        http: Some(pb::HttpDetails {
            method: "GET".into(),
            path: path.into(),
            status_code: status,
            bytes_out: bytes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_detection_finds_and_explains_an_anomalous_window(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let mut settings = common::test_settings(&db);
    settings.anomaly_min_windows = 60;
    let app = common::spawn_with(db, settings).await;
    let (_, key) = app
        .tenant_with_key(
            "acme",
            &[pb::Scope::Ingest, pb::Scope::Read, pb::Scope::Respond],
        )
        .await;
    let mut alerts = pb::alert_service_client::AlertServiceClient::new(app.channel.clone());

    // No history yet: nothing to train on.
    let now = Utc::now();
    let err = alerts
        .run_detection(with_key(
            pb::RunDetectionRequest {
                time_range: Some(pb::TimeRange {
                    start: Some(picket::grpc::convert::timestamp(now - Duration::hours(1))),
                    end: Some(picket::grpc::convert::timestamp(now)),
                }),
                algorithm: pb::AnomalyAlgorithm::Ecod as i32,
                threshold: 0.0,
            },
            &key,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Baseline: 8 users, two days ago, 24 windows each: varied request counts,
    // the odd 404, some early-evening work, ordinary response sizes.
    let day = (now - Duration::days(2))
        .duration_trunc(Duration::days(1))
        .unwrap();
    let mut events = Vec::new();
    for u in 0..8i64 {
        for w in 0..24i64 {
            let hour = if w % 6 == 5 { 18 } else { 9 };
            let t0 = day + Duration::hours(hour) + Duration::minutes(5 * w);
            let n = 2 + (u * 7 + w * 3) % 9;
            for r in 0..n {
                let path = format!("/app/page{}", (u + r + w) % 7);
                let status = if (u + w + r) % 11 == 0 { 404 } else { 200 };
                let bytes = 2000 + ((u * 31 + w * 7 + r * 13) % 90) as u64 * 150;
                events.push(http(
                    format!("b-{u}-{w}-{r}"),
                    &format!("user{u}"),
                    &format!("10.0.0.{u}"),
                    t0 + Duration::seconds(r * 25),
                    status,
                    bytes,
                    &path,
                ));
            }
        }
    }
    for chunk in events.chunks(500) {
        app.ingest()
            .ingest(with_key(
                pb::IngestRequest {
                    events: chunk.to_vec(),
                },
                &key,
            ))
            .await
            .unwrap();
    }
    // The anomaly: one user at 03:00 yesterday, 150 requests, mostly denied,
    // many resources, gigabytes out.
    let t = day + Duration::days(1) + Duration::hours(3);
    let bad: Vec<pb::Event> = (0..150)
        .map(|i| {
            http(
                format!("x-{i}"),
                "user3",
                "10.0.0.3",
                t + Duration::seconds(i),
                if i % 5 == 0 { 200 } else { 403 },
                40_000_000,
                &format!("/export/{i}"),
            )
        })
        .collect();
    app.ingest()
        .ingest(with_key(pb::IngestRequest { events: bad }, &key))
        .await
        .unwrap();

    let r = alerts
        .run_detection(with_key(
            pb::RunDetectionRequest {
                time_range: Some(pb::TimeRange {
                    start: Some(picket::grpc::convert::timestamp(day + Duration::days(1))),
                    end: Some(picket::grpc::convert::timestamp(
                        day + Duration::days(1) + Duration::hours(6),
                    )),
                }),
                algorithm: pb::AnomalyAlgorithm::Ecod as i32,
                threshold: 0.0,
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.windows_analysed >= 2, "{r:?}");
    assert!(r.anomalies_found >= 1, "{r:?}");
    assert!(r.threshold > 0.0);
    let mut found = None;
    for id in &r.alert_ids {
        let a = alerts
            .get_alert(with_key(
                pb::GetAlertRequest {
                    alert_id: id.clone(),
                },
                &key,
            ))
            .await
            .unwrap()
            .into_inner()
            .alert
            .unwrap();
        if a.entities.iter().any(|e| e.value == "user3") {
            found = Some(a);
        }
    }
    let a = found.expect("an anomaly alert names user3");
    assert_eq!(a.source_kind, pb::AlertSourceKind::Model as i32);
    assert_eq!(a.source_name, "ecod");
    assert!(a.anomaly_score > a.anomaly_threshold);
    assert_eq!(a.features.len(), 10);
    assert!(
        a.features
            .windows(2)
            .all(|w| w[0].contribution >= w[1].contribution),
        "features sorted by contribution"
    );
    let top: Vec<&str> = a.features.iter().take(4).map(|f| f.name.as_str()).collect();
    assert!(
        top.iter().any(|n| [
            "failure_ratio",
            "log_bytes_out",
            "log_request_count",
            "log_distinct_resources",
            "off_hours_fraction",
            "http_4xx_ratio"
        ]
        .contains(n)),
        "{top:?}"
    );
    assert!(!a.evidence.is_empty());

    // Isolation Forest answers too, with a score in (0, 1]. (It cannot rank a
    // window beyond the training range above the training extremes, because its
    // split thresholds lie inside that range; this is why ECOD is the default.)
    let r = alerts
        .run_detection(with_key(
            pb::RunDetectionRequest {
                time_range: Some(pb::TimeRange {
                    start: Some(picket::grpc::convert::timestamp(day + Duration::days(1))),
                    end: Some(picket::grpc::convert::timestamp(
                        day + Duration::days(1) + Duration::hours(6),
                    )),
                }),
                algorithm: pb::AnomalyAlgorithm::IsolationForest as i32,
                threshold: 0.0,
            },
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r.windows_analysed >= 2, "{r:?}");
    assert!(r.threshold > 0.0 && r.threshold <= 1.0, "{r:?}");
}

crate::both_backends!(run_detection_finds_and_explains_an_anomalous_window);
