//! ReportService: audit exports (ExportEvents and `picket export events`)
//! over a fixed event set, on both backends.

use chrono::{DateTime, Duration, DurationRound, Utc};
use picket::grpc::pb;
use picket::storage::Backend;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::common::{TestApp, spawn_app, with_key};

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    picket::grpc::convert::timestamp(t)
}

fn at(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    let t = t.expect("a timestamp");
    DateTime::from_timestamp(t.seconds, t.nanos as u32).unwrap()
}

fn event(key: String, event_type: &str, actor: &str, when: DateTime<Utc>) -> pb::Event {
    pb::Event {
        occurred_at: Some(ts(when)),
        event_type: event_type.into(),
        idempotency_key: key,
        actor: actor.into(),
        action: "login".into(),
        resource: "/auth/login".into(),
        outcome: pb::Outcome::Success as i32,
        source_ip: "10.0.0.7".into(),
        ..Default::default()
    }
}

fn reports(app: &TestApp) -> pb::report_service_client::ReportServiceClient<Channel> {
    pb::report_service_client::ReportServiceClient::new(app.channel.clone())
}

/// Ingests `events` in batches; returns the new ids in order.
async fn ingest_all(app: &TestApp, key: &str, events: Vec<pb::Event>) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in events.chunks(1000) {
        let r = app
            .ingest()
            .ingest(with_key(
                pb::IngestRequest {
                    events: chunk.to_vec(),
                },
                key,
            ))
            .await
            .expect("ingest")
            .into_inner();
        assert_eq!(r.accepted as usize, chunk.len(), "{:?}", r.receipts);
        ids.extend(r.receipts.into_iter().map(|r| r.event_id));
    }
    ids
}

/// The fixed event set of tenant A over the hour `[start, start + 1h)`:
///
/// - 1,100 `user.login` by alice at start + 3 s × i (i = 0 is exactly on
///   the inclusive start edge),
/// - 4 `user.login` by bob all at start + 1,800.001 s (ties: ordered by id),
/// - 5 `vpn.connect` by carol inside the range (filtered out by type),
/// - 3 `user.login` exactly on the exclusive end edge and 2 one second
///   before the start (outside the range).
///
/// Returns the ids of the 1,104 `user.login` events inside the range.
async fn fixture(app: &TestApp, key: &str, start: DateTime<Utc>) -> Vec<String> {
    let mut events = Vec::new();
    for i in 0..1100 {
        let when = start + Duration::seconds(3 * i);
        events.push(event(format!("alice-{i}"), "user.login", "alice", when));
    }
    for i in 0..4 {
        let when = start + Duration::milliseconds(1_800_001);
        events.push(event(format!("bob-{i}"), "user.login", "bob", when));
    }
    let matching = events.len();
    for i in 0..5 {
        let when = start + Duration::seconds(100 + i);
        events.push(event(format!("carol-{i}"), "vpn.connect", "carol", when));
    }
    for i in 0..3 {
        let when = start + Duration::hours(1);
        events.push(event(format!("edge-{i}"), "user.login", "alice", when));
    }
    for i in 0..2 {
        let when = start - Duration::seconds(1);
        events.push(event(format!("early-{i}"), "user.login", "alice", when));
    }
    let ids = ingest_all(app, key, events).await;
    ids[..matching].to_vec()
}

fn request(
    start: DateTime<Utc>,
    event_types: &[&str],
    after_cursor: String,
) -> pb::ExportEventsRequest {
    pb::ExportEventsRequest {
        time_range: Some(pb::TimeRange {
            start: Some(ts(start)),
            end: Some(ts(start + Duration::hours(1))),
        }),
        filter: Some(pb::EventFilter {
            event_types: event_types.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        }),
        after_cursor,
        max_events_per_message: 0,
    }
}

/// Reads a whole export; the final status, if not OK, is returned with what arrived.
async fn export(
    app: &TestApp,
    key: &str,
    req: pb::ExportEventsRequest,
) -> Result<Vec<pb::ExportEventsResponse>, tonic::Status> {
    let mut stream = reports(app)
        .export_events(with_key(req, key))
        .await?
        .into_inner();
    let mut items = Vec::new();
    while let Some(item) = stream.message().await? {
        items.push(item);
    }
    Ok(items)
}

fn ids(items: &[pb::ExportEventsResponse]) -> Vec<String> {
    items
        .iter()
        .map(|i| i.event.as_ref().unwrap().id.clone())
        .collect()
}

fn field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations[0]
        .field
        .clone()
}

/// The start of the fixture's hour: yesterday, on an hour boundary.
fn fixture_start() -> DateTime<Utc> {
    (Utc::now() - Duration::days(1))
        .duration_trunc(Duration::hours(1))
        .unwrap()
}

async fn export_streams_every_match_in_time_order_and_resumes(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let (_, other) = app
        .tenant_with_key("globex", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let start = fixture_start();
    let mut expected = fixture(&app, &key, start).await;
    // Another tenant's events in the same hour never show up.
    let theirs: Vec<_> = (0..10)
        .map(|i| {
            let when = start + Duration::seconds(i);
            event(format!("g-{i}"), "user.login", "alice", when)
        })
        .collect();
    ingest_all(&app, &other, theirs).await;

    // Every match, oldest first, ties by id; on both range edges exactly.
    let all = export(&app, &key, request(start, &["user.login"], String::new()))
        .await
        .unwrap();
    assert_eq!(all.len(), 1104);
    let order: Vec<(DateTime<Utc>, String)> = all
        .iter()
        .map(|i| {
            let e = i.event.as_ref().unwrap();
            (at(&e.occurred_at), e.id.clone())
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "not in time order");
    assert_eq!(order[0].0, start, "the inclusive start edge is exported");
    assert!(order.last().unwrap().0 < start + Duration::hours(1));
    let mut got = ids(&all);
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    let first = all[0].event.as_ref().unwrap();
    assert_eq!(
        (first.actor.as_str(), first.source_ip.as_str()),
        ("alice", "10.0.0.7")
    );
    // Without a type filter the vpn events come too: 1,104 + 5.
    let everything = export(&app, &key, request(start, &[], String::new()))
        .await
        .unwrap();
    assert_eq!(everything.len(), 1109);

    // In batches: the same events in the same order, at most the size
    // asked for per message, each message's cursor resuming after its last
    // event (and the cursors of both forms are interchangeable).
    let batched = |cursor: String| {
        let mut req = request(start, &["user.login"], cursor);
        req.max_events_per_message = 100;
        req
    };
    let batches = export(&app, &key, batched(String::new())).await.unwrap();
    assert_eq!(batches.len(), 12, "1,104 events in messages of at most 100");
    assert!(batches.iter().all(|b| b.event.is_none()));
    assert!(batches.iter().all(|b| (1..=100).contains(&b.events.len())));
    let flat: Vec<String> = batches
        .iter()
        .flat_map(|b| b.events.iter().map(|e| e.id.clone()))
        .collect();
    assert_eq!(flat, ids(&all), "batches: the same events, same order");
    let after_batch = export(
        &app,
        &key,
        request(start, &["user.login"], batches[6].cursor.clone()),
    )
    .await
    .unwrap();
    let sent: usize = batches[..7].iter().map(|b| b.events.len()).sum();
    assert_eq!(ids(&after_batch), ids(&all[sent..]), "resume after a batch");
    let rest_batched = export(&app, &key, batched(all[699].cursor.clone()))
        .await
        .unwrap();
    let flat: Vec<String> = rest_batched
        .iter()
        .flat_map(|b| b.events.iter().map(|e| e.id.clone()))
        .collect();
    assert_eq!(flat, ids(&all[700..]), "a batched resume after one event");
    let mut too_many = batched(String::new());
    too_many.max_events_per_message = 1001;
    assert_eq!(
        field(&export(&app, &key, too_many).await.unwrap_err()),
        "max_events_per_message"
    );

    // An event received after the export opened is not part of it, even on resume.
    let late = start + Duration::seconds(3500);
    ingest_all(
        &app,
        &key,
        vec![event("late".into(), "user.login", "dave", late)],
    )
    .await;
    let rest = export(
        &app,
        &key,
        request(start, &["user.login"], all[699].cursor.clone()),
    )
    .await
    .unwrap();
    assert_eq!(ids(&rest), ids(&all[700..]), "resume: no gap, no repeat");
    let fresh = export(&app, &key, request(start, &["user.login"], String::new()))
        .await
        .unwrap();
    assert_eq!(fresh.len(), 1105, "a new export sees the late event");

    // A cursor is bound to its filter, range and tenant.
    let err = export(
        &app,
        &key,
        request(start, &["vpn.connect"], all[10].cursor.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(field(&err), "after_cursor");
    let err = export(
        &app,
        &other,
        request(start, &["user.login"], all[10].cursor.clone()),
    )
    .await
    .unwrap_err();
    assert_eq!(field(&err), "after_cursor");

    // Exports are timed (the stream closes only after the time is recorded).
    let (_, _, body) = crate::common::http1(app.addr, "GET", "/metrics", &[], vec![]).await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("picket_report_duration_seconds_bucket{report=\"export_events\""),
        "{text}"
    );
    assert!(text.contains("picket_export_events_total"), "{text}");
}

async fn export_refuses_bad_input_and_missing_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let (tenant, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let start = fixture_start();
    let mut no_end = request(start, &[], String::new());
    no_end.time_range.as_mut().unwrap().end = None;
    assert_eq!(
        field(&export(&app, &key, no_end).await.unwrap_err()),
        "time_range.end"
    );
    let mut no_range = request(start, &[], String::new());
    no_range.time_range = None;
    assert_eq!(
        field(&export(&app, &key, no_range).await.unwrap_err()),
        "time_range.start"
    );
    let mut backwards = request(start, &[], String::new());
    backwards.time_range.as_mut().unwrap().end = Some(ts(start - Duration::hours(1)));
    assert_eq!(
        field(&export(&app, &key, backwards).await.unwrap_err()),
        "time_range.end"
    );
    let bad_type = request(start, &["Not A Type"], String::new());
    assert_eq!(
        field(&export(&app, &key, bad_type).await.unwrap_err()),
        "filter.event_types[0]"
    );
    let garbage = request(start, &[], "garbage".into());
    assert_eq!(
        field(&export(&app, &key, garbage).await.unwrap_err()),
        "after_cursor"
    );
    let ingest_only = app.key_for(&tenant, &[pb::Scope::Ingest]).await;
    let err = export(&app, &ingest_only, request(start, &[], String::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = export(&app, "pk_nope", request(start, &[], String::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

async fn export_ends_unavailable_on_shutdown(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let start = fixture_start();
    fixture(&app, &key, start).await;
    let mut stream = reports(&app)
        .export_events(with_key(request(start, &[], String::new()), &key))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    while received < 10 {
        stream.message().await.unwrap().expect("an event");
        received += 1;
    }
    app.trigger_shutdown();
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the export ended OK after {received} of 1109 events"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(received < 1109);
    app.join().await.unwrap();
}

/// `picket export events` as a child process: CSV and JSON lines, the same
/// events as the RPC, and a second run gives the same file.
async fn cli_exports_csv_and_jsonl(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let start = fixture_start();
    let expected = fixture(&app, &key, start).await;
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("http://{}", app.addr);
    let run = async |format: &str, file: &str| {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_picket"))
            .args(["export", "events", "--quiet", "--event-type", "user.login"])
            .args(["--from", &start.to_rfc3339()])
            .args(["--to", &(start + Duration::hours(1)).to_rfc3339()])
            .args(["--format", format, "--output"])
            .arg(dir.path().join(file))
            .env("PICKET_SERVER", &addr)
            .env("PICKET_API_KEY", &key)
            .output()
            .await
            .expect("run picket");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("exported 1104 events"), "{stderr}");
        std::fs::read_to_string(dir.path().join(file)).unwrap()
    };
    let csv = run("csv", "a.csv").await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1105, "a header and one row per event");
    assert_eq!(lines[0], picket::cli::client::export::CSV_COLUMNS.join(","));
    let mut ids: Vec<String> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap().to_owned())
        .collect();
    assert!(lines[1].contains(&format!(
        ",{},",
        start.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    )));
    assert!(lines[1].contains(",user.login,alice,login,/auth/login,success,info,10.0.0.7,"));
    ids.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(ids, expected);

    let first = run("jsonl", "a.jsonl").await;
    let second = run("jsonl", "a.jsonl").await;
    assert_eq!(first, second, "a second run writes the same file");
    let rows: Vec<serde_json::Value> = first
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1104);
    assert_eq!(rows[0]["actor"], "alice");
    assert_eq!(rows[0]["outcome"], "success");
    assert_eq!(rows[0]["ocsf_class_uid"], 3002);
    let mut ids: Vec<String> = rows
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, expected);
}

crate::both_backends!(
    export_streams_every_match_in_time_order_and_resumes,
    export_refuses_bad_input_and_missing_scope,
    export_ends_unavailable_on_shutdown,
    cli_exports_csv_and_jsonl,
);
