//! Stored documents stay readable across releases: a document written by an
//! older release lacks the fields added since, and one written by a newer
//! release (read after a rollback) carries fields this one does not know.
//! The test fills a real store through the API (events with details, a
//! brute-force alert and its incident, the built-in playbook's run, a
//! manual decision), stops the server, rewrites every JSON document in the
//! store through SQL as such a release would have left it (every field
//! holding its default removed, e.g. `details.http` without `latency_ms`;
//! an unknown field added at every level), starts the server again on the
//! same store and reads everything back through the read RPCs: each answer
//! must equal the one before the rewrite.

use std::time::{Duration, Instant};

use picket::grpc::pb;
use picket::storage::Backend;
use serde_json::Value;
use tonic::transport::Channel;

use crate::common::{self, with_key};
use crate::ingest::login;

/// The JSON documents the store keeps: (table, column).
const DOCUMENTS: &[(&str, &str)] = &[
    ("events", "details"),
    ("alerts", "doc"),
    ("incidents", "doc"),
    ("incident_timeline", "entry"),
    ("playbooks", "doc"),
    ("playbook_runs", "doc"),
    ("decisions", "doc"),
    ("decision_targets", "state"),
    ("decision_log", "entry"),
    ("change_log", "payload"),
];

/// A field a later release added, at every level of every document.
const UNKNOWN: &str = "added_by_a_later_release";

/// `doc` as an older release would have written it (fields holding their
/// default dropped, at every level) with a newer release's unknown field
/// added to the document and, for event details, to each details struct
/// (not to maps such as attributes or step parameters, where a new key is
/// data, not a field). Returns how many fields were dropped.
fn age(doc: &mut Value, table: &str) -> usize {
    let dropped = drop_defaults(doc);
    if let Value::Object(map) = doc {
        if table == "events" {
            for (k, v) in map.iter_mut() {
                if let (false, Value::Object(inner)) = (k == "attributes", v) {
                    inner.insert(UNKNOWN.into(), serde_json::json!({"version": 99}));
                }
            }
        }
        map.insert(UNKNOWN.into(), serde_json::json!({"version": 99}));
    }
    dropped
}

fn drop_defaults(doc: &mut Value) -> usize {
    let mut dropped = 0;
    match doc {
        Value::Object(map) => {
            let before = map.len();
            map.retain(|_, v| !is_default(v));
            dropped += before - map.len();
            for v in map.values_mut() {
                dropped += drop_defaults(v);
            }
        }
        Value::Array(items) => {
            for v in items {
                dropped += drop_defaults(v);
            }
        }
        _ => {}
    }
    dropped
}

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Rewrites every document of the store; returns (documents, fields dropped).
async fn age_store(backend: Backend, url: &str) -> (usize, usize) {
    use sqlx::Connection;
    let (mut docs, mut dropped) = (0, 0);
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
            for (table, col) in DOCUMENTS {
                // tableoid + ctid name a row of a partitioned table too.
                let rows: Vec<(sqlx::postgres::types::Oid, String, Value)> = sqlx::query_as(
                    sqlx::AssertSqlSafe(format!("SELECT tableoid, ctid::text, {col} FROM {table}")),
                )
                .fetch_all(&mut conn)
                .await
                .unwrap();
                for (oid, ctid, mut doc) in rows {
                    dropped += age(&mut doc, table);
                    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET {col} = $1 WHERE tableoid = $2 AND ctid = $3::tid"
                    )))
                    .bind(&doc)
                    .bind(oid)
                    .bind(&ctid)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                    assert_eq!(done.rows_affected(), 1, "{table} row {ctid}");
                    docs += 1;
                }
            }
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
            for (table, col) in DOCUMENTS {
                let rows: Vec<(i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT rowid, {col} FROM {table}"
                )))
                .fetch_all(&mut conn)
                .await
                .unwrap();
                for (rowid, text) in rows {
                    let mut doc: Value = serde_json::from_str(&text).unwrap();
                    dropped += age(&mut doc, table);
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET {col} = ?1 WHERE rowid = ?2"
                    )))
                    .bind(doc.to_string())
                    .bind(rowid)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                    docs += 1;
                }
            }
        }
    }
    (docs, dropped)
}

/// Everything the read RPCs answer about the tenant, in one comparable value.
#[derive(Debug)]
struct Answers {
    events: Vec<pb::Event>,
    alerts: Vec<pb::Alert>,
    alert: pb::Alert,
    incidents: Vec<pb::Incident>,
    incident: pb::Incident,
    playbooks: Vec<pb::Playbook>,
    runs: Vec<pb::PlaybookRun>,
    run: pb::PlaybookRun,
    decisions: Vec<pb::Decision>,
    decision: pb::Decision,
    access: pb::CheckAccessResponse,
}

async fn read_all(channel: &Channel, key: &str) -> Answers {
    let mut ingest = pb::ingest_service_client::IngestServiceClient::new(channel.clone());
    let mut alerts = pb::alert_service_client::AlertServiceClient::new(channel.clone());
    let mut incidents = pb::incident_service_client::IncidentServiceClient::new(channel.clone());
    let mut playbooks = pb::playbook_service_client::PlaybookServiceClient::new(channel.clone());
    let mut enforcement =
        pb::enforcement_service_client::EnforcementServiceClient::new(channel.clone());
    let events = ingest
        .query_events(with_key(
            pb::QueryEventsRequest {
                page_size: 100,
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("QueryEvents")
        .into_inner()
        .events;
    let alert_list = alerts
        .list_alerts(with_key(pb::ListAlertsRequest::default(), key))
        .await
        .expect("ListAlerts")
        .into_inner()
        .alerts;
    let alert = alerts
        .get_alert(with_key(
            pb::GetAlertRequest {
                alert_id: alert_list[0].id.clone(),
            },
            key,
        ))
        .await
        .expect("GetAlert")
        .into_inner()
        .alert
        .unwrap();
    let incident_list = incidents
        .list_incidents(with_key(pb::ListIncidentsRequest::default(), key))
        .await
        .expect("ListIncidents")
        .into_inner()
        .incidents;
    let incident = incidents
        .get_incident(with_key(
            pb::GetIncidentRequest {
                incident_id: incident_list[0].id.clone(),
            },
            key,
        ))
        .await
        .expect("GetIncident")
        .into_inner()
        .incident
        .unwrap();
    let playbook_list = playbooks
        .list_playbooks(with_key(pb::ListPlaybooksRequest::default(), key))
        .await
        .expect("ListPlaybooks")
        .into_inner()
        .playbooks;
    // The built-in pack is loaded at start, stamped with the start time.
    let mut playbook_list = playbook_list;
    for p in &mut playbook_list {
        if p.origin == pb::PlaybookOrigin::Builtin as i32 {
            p.created_at = None;
            p.updated_at = None;
        }
    }
    let runs = playbooks
        .list_playbook_runs(with_key(pb::ListPlaybookRunsRequest::default(), key))
        .await
        .expect("ListPlaybookRuns")
        .into_inner()
        .runs;
    let run = playbooks
        .get_playbook_run(with_key(
            pb::GetPlaybookRunRequest {
                run_id: runs[0].id.clone(),
            },
            key,
        ))
        .await
        .expect("GetPlaybookRun")
        .into_inner()
        .run
        .unwrap();
    let decisions = enforcement
        .list_decisions(with_key(pb::ListDecisionsRequest::default(), key))
        .await
        .expect("ListDecisions")
        .into_inner()
        .decisions;
    let decision = enforcement
        .get_decision(with_key(
            pb::GetDecisionRequest {
                decision_id: decisions[0].id.clone(),
            },
            key,
        ))
        .await
        .expect("GetDecision")
        .into_inner()
        .decision
        .unwrap();
    let mut access = enforcement
        .check_access(with_key(
            pb::CheckAccessRequest {
                ip: "192.0.2.77".into(),
                ..Default::default()
            },
            key,
        ))
        .await
        .expect("CheckAccess")
        .into_inner();
    // The revision the answer reflects may move on (expiry deltas); the
    // decision itself may not.
    access.revision = 0;
    Answers {
        events,
        alerts: alert_list,
        alert,
        incidents: incident_list,
        incident,
        playbooks: playbook_list,
        runs,
        run,
        decisions,
        decision,
        access,
    }
}

async fn documents_of_other_releases_still_read(backend: Backend) {
    let mut app = common::spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key(
            "upgrade",
            &[
                pb::Scope::Ingest,
                pb::Scope::Read,
                pb::Scope::Respond,
                pb::Scope::Admin,
            ],
        )
        .await;
    // An HTTP event whose latency and sizes hold their defaults (so the
    // rewrite drops them from `details.http`), and a brute force.
    let mut http = login("upgrade-http", "alice", "198.51.100.20", true);
    http.event_type = "http.request".into();
    http.http = Some(pb::HttpDetails {
        method: "GET".into(),
        path: "/reports".into(),
        status_code: 200,
        ..Default::default()
    });
    let mut events = vec![http];
    events.extend((0..7).map(|i| login(&format!("upgrade-{i}"), "mallory", "203.0.113.77", false)));
    let r = app
        .ingest()
        .ingest(with_key(pb::IngestRequest { events }, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rejected, 0, "{:?}", r.receipts);
    let mut enforcement =
        pb::enforcement_service_client::EnforcementServiceClient::new(app.channel.clone());
    enforcement
        .create_decision(with_key(
            pb::CreateDecisionRequest {
                decision: Some(pb::NewDecision {
                    scope: pb::DecisionScope::Ip as i32,
                    value: "192.0.2.77".into(),
                    r#type: pb::DecisionType::Ban as i32,
                    duration_seconds: 3600,
                    reason: "upgrade test".into(),
                    ..Default::default()
                }),
            },
            &key,
        ))
        .await
        .expect("CreateDecision");
    // The brute force raises an alert and an incident, and the built-in
    // pack's playbook creates a run (waiting for approval).
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            let mut playbooks =
                pb::playbook_service_client::PlaybookServiceClient::new(app.channel.clone());
            let runs = playbooks
                .list_playbook_runs(with_key(pb::ListPlaybookRunsRequest::default(), &key))
                .await
                .unwrap()
                .into_inner()
                .runs;
            if runs.is_empty() {
                return None;
            }
            Some(read_all(&app.channel, &key).await)
        })
        .await
        .ok()
        .flatten();
        if let Some(a) = got.filter(|a| !a.alerts.is_empty() && !a.incidents.is_empty()) {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no alert, incident and automatic run within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(before.events.len(), 8);
    assert_eq!(
        before.access.verdict,
        pb::Verdict::Deny as i32,
        "{:?}",
        before.access
    );
    let http_before = before
        .events
        .iter()
        .find(|e| e.idempotency_key == "upgrade-http")
        .expect("the http event");
    assert_eq!(http_before.http.as_ref().unwrap().latency_ms, 0.0);

    app.stop().await.unwrap();
    let db = std::mem::replace(&mut app.db, common::TestDb::placeholder());
    drop(app);
    let (docs, dropped) = age_store(backend, &db.url).await;
    assert!(docs >= 20, "only {docs} documents rewritten");
    assert!(dropped >= 20, "only {dropped} default fields dropped");

    let settings = common::test_settings(&db);
    let app = common::spawn_with(db, settings).await;
    let after = read_all(&app.channel, &key).await;
    assert_eq!(after.events, before.events);
    assert_eq!(after.alerts, before.alerts);
    assert_eq!(after.alert, before.alert);
    assert_eq!(after.incidents, before.incidents);
    assert_eq!(after.incident, before.incident);
    assert_eq!(after.playbooks, before.playbooks);
    assert_eq!(after.runs, before.runs);
    assert_eq!(after.run, before.run);
    assert_eq!(after.decisions, before.decisions);
    assert_eq!(after.decision, before.decision);
    assert_eq!(after.access, before.access);
}

crate::both_backends!(documents_of_other_releases_still_read);
