//! Restarts of detection: a pipeline that rebuilds its state from the store
//! raises nothing it raised before, and nothing new without new events.

use chrono::{DateTime, Duration, DurationRound, Utc};
use picket::domain::TenantId;
use picket::domain::alert::{AlertQuery, SourceKind};
use picket::grpc::pb;
use picket::pipeline::DetectionPipeline;
use picket::storage::{Backend, Store};

use crate::common::{self, TestApp, with_key};

const MB: u64 = 1 << 20;

fn http(
    key: String,
    actor: &str,
    ip: &str,
    at: DateTime<Utc>,
    status: u32,
    bytes: u64,
) -> pb::Event {
    pb::Event {
        occurred_at: Some(picket::grpc::convert::timestamp(at)),
        event_type: "http_request".into(),
        idempotency_key: key,
        actor: actor.into(),
        action: "GET".into(),
        resource: format!("/app/{}", at.timestamp() % 7),
        outcome: if status < 400 {
            pb::Outcome::Success
        } else {
            pb::Outcome::Failure
        } as i32,
        source_ip: ip.into(),
        http: Some(pb::HttpDetails {
            method: "GET".into(),
            path: "/app".into(),
            status_code: status,
            bytes_out: bytes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pipeline as the server builds one (detection is off in the app, so the
/// test drives it): a fresh process's state, nothing carried over.
fn pipeline(app: &TestApp) -> DetectionPipeline {
    use picket::detect::{Evaluator, EvaluatorConfig, RuleSet};
    use picket::pipeline::PipelineConfig;
    use picket::pipeline::scoring::ScoringConfig;
    DetectionPipeline::new(
        app.store.clone(),
        Evaluator::new(
            RuleSet::builtin().clone(),
            EvaluatorConfig {
                suppress: Duration::zero(),
                ..EvaluatorConfig::default()
            },
        ),
        std::sync::Arc::new(picket::ingest::signal::Signal::new()),
        PipelineConfig::default(),
        tokio_util::sync::CancellationToken::new(),
    )
    .with_scoring(ScoringConfig {
        min_windows: 60,
        ..ScoringConfig::default()
    })
}

/// What a subscriber or an analyst can see of a tenant's alerts: every
/// alert's state and the change-log heads WatchAlerts/WatchIncidents follow.
async fn state(store: &dyn Store, tenant: TenantId) -> (Vec<String>, String, String) {
    let alerts = store
        .list_alerts(
            tenant,
            &AlertQuery {
                limit: 1000,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let alerts = alerts
        .iter()
        .map(|a| {
            format!(
                "{} {} count={} first={} last={} updated={} incident={:?} status={:?}",
                a.id,
                a.title,
                a.occurrence_count,
                a.first_seen,
                a.last_seen,
                a.updated_at,
                a.incident_id,
                a.status
            )
        })
        .collect();
    let head = |s: &'static str| async move {
        format!("{:?}", store.changes_head(tenant, s).await.unwrap())
    };
    (alerts, head("alerts").await, head("incidents").await)
}

/// Item 7 of issue 11: each restart used to raise the last anomaly windows
/// again (replay left them open and the wall clock closed and scored them
/// with raising on), and the first restart raised the exfiltration burst again
/// (the replay, reaching less baseline, fired later in the same burst).
async fn restarts_with_no_new_events_change_no_alert(backend: Backend) {
    let db = common::TestDb::new(backend).await;
    let mut settings = common::test_settings(&db);
    settings.detection = false;
    let app = common::spawn_with(db, settings).await;
    let (tenant, key) = app
        .tenant_with_key("acme", &[pb::Scope::Ingest, pb::Scope::Read])
        .await;
    let tenant = TenantId(tenant.parse().unwrap());

    let now = Utc::now();
    let t0 = (now - Duration::hours(12))
        .duration_trunc(Duration::hours(1))
        .unwrap();
    let mut events = Vec::new();
    // Benign baseline: 8 users, a short window every half hour for 10 hours.
    for u in 0..8i64 {
        for w in 0..20i64 {
            let start = t0 + Duration::minutes(30 * w);
            for r in 0..(2 + (u * 7 + w * 3) % 7) {
                let status = if (u + w + r) % 11 == 0 { 404 } else { 200 };
                events.push(http(
                    format!("b-{u}-{w}-{r}"),
                    &format!("user{u}"),
                    &format!("10.0.0.{u}"),
                    start + Duration::seconds(20 * r),
                    status,
                    2000 + ((u * 31 + w * 7 + r * 13) % 90) as u64 * 150,
                ));
            }
        }
    }
    // Erin sends 1 MB every two hours for 60 hours, ending before the last
    // window (30 active hours: a learned exfiltration threshold live; the
    // 24-hour replay sees only 11, so it applies the cold-start threshold and
    // fires later in the burst).
    for h in (4..64).step_by(2) {
        events.push(http(
            format!("e-{h}"),
            "erin",
            "10.0.1.1",
            now - Duration::hours(h),
            200,
            MB,
        ));
    }
    // The burst: 10 × 60 MB, one a minute.
    for k in 0..10 {
        events.push(http(
            format!("x-{k}"),
            "erin",
            "10.0.1.1",
            t0 + Duration::hours(5) + Duration::minutes(k) + Duration::seconds(7),
            200,
            60 * MB,
        ));
    }
    // The last window of all: user3 far outside the baseline. Nothing
    // follows it, so only the wall clock closes it.
    let last = t0 + Duration::hours(10);
    for i in 0..150 {
        events.push(http(
            format!("a-{i}"),
            "user3",
            "10.0.0.3",
            last + Duration::seconds(i),
            if i % 10 == 0 { 200 } else { 403 },
            5 * MB,
        ));
    }
    events.sort_by_key(|e| {
        let t = e.occurred_at.unwrap();
        (t.seconds, t.nanos)
    });

    // The first process sees every event live.
    let mut first = pipeline(&app);
    first.rebuild(now).await.unwrap();
    for chunk in events.chunks(500) {
        let r = app
            .ingest()
            .ingest(with_key(
                pb::IngestRequest {
                    events: chunk.to_vec(),
                },
                &key,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.rejected, 0);
    }
    let later = now + Duration::minutes(30);
    // On Postgres a commit becomes readable on the feed only once every older
    // transaction of the cluster has ended (another test's may still be
    // open). The first process must have evaluated every event before the
    // restarts (an event it had not read would be new to them), so run
    // passes until a pass began with the whole feed readable (a pass reads
    // each feed to its end) and the setup's alerts are there, or 60 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (alerts, readable) = loop {
        let readable = app
            .store
            .events_after(tenant, Default::default(), 100_000)
            .await
            .unwrap()
            .len();
        first.run_once_at(later).await.unwrap();
        first.run_once_at(later).await.unwrap();
        let alerts = app
            .store
            .list_alerts(
                tenant,
                &AlertQuery {
                    limit: 1000,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        // Both kinds: the exfiltration burst alone can raise two alerts, and
        // the last window closes (by the wall clock) only in a pass after
        // the one that read its events.
        let anomaly = alerts
            .iter()
            .any(|a| a.source_kind == SourceKind::Model && a.title.contains("user3"));
        let exfiltration = alerts.iter().any(|a| a.category == "exfiltration");
        let done = readable == events.len() && anomaly && exfiltration;
        if done || std::time::Instant::now() > deadline {
            break (alerts, readable);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    drop(first);
    assert_eq!(
        readable,
        events.len(),
        "the feed did not show every committed event within 60 s"
    );
    assert!(
        alerts
            .iter()
            .any(|a| a.source_kind == SourceKind::Model && a.title.contains("user3")),
        "the setup must raise the last window's anomaly: {:?}",
        alerts.iter().map(|a| &a.title).collect::<Vec<_>>()
    );
    assert!(
        alerts.iter().any(|a| a.category == "exfiltration"),
        "the setup must raise the exfiltration burst: {:?}",
        alerts.iter().map(|a| &a.title).collect::<Vec<_>>()
    );
    // The first process's last writes must be readable on the change log
    // before its heads are taken (or a restart would seem to add them).
    app.db.feeds_settled().await;
    let before = state(app.store.as_ref(), tenant).await;

    for restart in 1..=3 {
        let mut p = pipeline(&app);
        p.rebuild(Utc::now()).await.unwrap();
        p.run_once_at(later).await.unwrap();
        p.run_once_at(later + Duration::hours(1)).await.unwrap();
        app.db.feeds_settled().await;
        let after = state(app.store.as_ref(), tenant).await;
        assert_eq!(
            after, before,
            "restart {restart} with no new events changed the alerts"
        );
    }
}

crate::both_backends!(restarts_with_no_new_events_change_no_alert);

/// Runs `picket` with `args` over `db` and returns (exit success, stderr),
/// or fails the test if it starts serving instead of exiting.
fn run_picket(db: &common::TestDb, args: &[&str]) -> (bool, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_picket"))
        .args(args)
        .env("PICKET_DATABASE_URL", &db.url)
        .env("PICKET_ADMIN_TOKEN", common::OPERATOR_TOKEN)
        .env("PICKET_KEY_PEPPER", common::KEY_PEPPER)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn picket");
    let mut stderr = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("picket serving") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a second process served the same SQLite store: {stderr}{line}");
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    (child.wait().unwrap().success(), stderr)
}

/// Item 8 of issue 11: two `picket serve` on one SQLite file both ran
/// detection. The second is refused, naming the store and the holder's pid;
/// admin commands keep working beside the server; once the first stops, a
/// new server starts. (Postgres replicas share a store by design: see
/// replicas.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_one_sqlite_store_is_refused() {
    let db = common::TestDb::new(Backend::Sqlite).await;
    let mut first = common::ServerProcess::start(&db, &[]);
    let path = db.url.trim_start_matches("sqlite://").to_owned();

    let (ok, stderr) = run_picket(&db, &["serve", "--listen", "127.0.0.1:0"]);
    assert!(!ok, "the second server must exit with an error: {stderr}");
    assert!(stderr.contains(&path), "names the store: {stderr}");
    assert!(
        stderr.contains(&format!("process {}", first.child.id())),
        "names the holder's pid: {stderr}"
    );

    // Administration beside the running server, as in the README.
    let (ok, stderr) = run_picket(&db, &["admin", "tenant", "create", "globex"]);
    assert!(ok, "admin commands work beside the server: {stderr}");
    let (ok, stderr) = run_picket(&db, &["migrate"]);
    assert!(ok, "migrate works beside the server: {stderr}");

    // The lock ends with its process (here a SIGKILL): a new server starts.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let second = common::ServerProcess::start(&db, &[]);
    drop(second);
}
